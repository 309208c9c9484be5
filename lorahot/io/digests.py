"""Content digests of the files a read sees, taken from the bytes the read itself had.

The host cache trusts a file's stat (size, mtime, ctime, inode) to say whether it changed,
except for a file written so recently that a same-size rewrite could keep that stat
(:mod:`lorahot.runtime.racy`). For those files the runtime asks the read for a digest of what
it read (:func:`recording`): the reader notes, for each such file it reads, a digest of the
bytes it already holds (no second read), and :func:`digest_of` computes the same digest from
the file as it is now, for a later load to compare.

The digest of a safetensors file covers its header (through
:attr:`~lorahot.io.safety.SafetensorsHeader.identity`: the header's blake2b and the file's size)
and its whole data section; that of ``adapter_config.json``, the config as read (canonical
JSON); that of any other file (a Hub ref), its bytes. A read that has only part of a file's
data (a tensor-parallel rank's slices) notes :data:`UNKNOWN`, which no digest equals.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from lorahot.io.config import CONFIG_NAME
from lorahot.io.safety import check_safetensors, read_json_file, regular_file
from lorahot.io.scoped import scoped

__all__ = ["recording", "note_data", "note_config", "digest_of", "UNKNOWN"]

#: what a read that did not have a file's whole content notes: equal to no digest
UNKNOWN = b""

#: real path -> its digest once a read noted it (None until then), for the files asked for
_WANTED: ContextVar[dict[str, bytes | None] | None] = ContextVar("lorahot_digests", default=None)

_CHUNK = 16 << 20


@contextlib.contextmanager
def recording(paths: Iterable[str]) -> Iterator[dict[str, bytes | None]]:
    """Within the block, a read of any of ``paths`` (real paths) notes its digest in the dict
    yielded (None for those no read opened). Other files cost the reader nothing."""
    found: dict[str, bytes | None] = dict.fromkeys(paths)
    with scoped(_WANTED, found or None):
        yield found


def _wanted(path: Path | str) -> tuple[dict[str, bytes | None], str] | None:
    found = _WANTED.get()
    if not found:
        return None
    real = os.path.realpath(path)
    return (found, real) if real in found else None


def note_data(path: Path, identity: tuple[bytes, int], data: torch.Tensor | None) -> None:
    """The reader read safetensors file ``path`` (header ``identity``): ``data``, its whole data
    section as ``uint8`` on the CPU, or None where it read only part of it."""
    wanted = _wanted(path)
    if wanted is not None:
        found, real = wanted
        found[real] = UNKNOWN if data is None else _safetensors(identity, [data.numpy()])


def note_config(path: Path, config: dict[str, Any] | None) -> None:
    """The reader read the config at ``path`` as ``config`` (None: there was none)."""
    wanted = _wanted(path)
    if wanted is not None:
        found, real = wanted
        found[real] = _config(config)


def digest_of(path: str) -> bytes:
    """The digest of the file at real path ``path`` now, as a read would note it.

    Raises:
        LoraError, OSError, ValueError: the file cannot be read as the reader reads it (the
            caller treats that as changed: a read of it says what is wrong).
    """
    if Path(path).name == CONFIG_NAME:
        return _config(read_json_file(Path(path)))
    with regular_file(Path(path), "file") as fd:
        if not path.lower().endswith(".safetensors"):
            digest = hashlib.blake2b(digest_size=32)
            for chunk in _chunks(fd, 0, os.fstat(fd).st_size):
                digest.update(chunk)
            return digest.digest()
        header = check_safetensors(Path(path), fd)
        return _safetensors(header.identity, _chunks(fd, header.data_start, header.data_size))


def _chunks(fd: int, start: int, size: int) -> Iterator[bytes]:
    done = 0
    while done < size:
        chunk = os.pread(fd, min(_CHUNK, size - done), start + done)
        if not chunk:
            raise ValueError("the file shrank while it was hashed")
        done += len(chunk)
        yield chunk


def _safetensors(identity: tuple[bytes, int], data: Iterable[Any]) -> bytes:
    digest = hashlib.blake2b(identity[0] + identity[1].to_bytes(8, "little"), digest_size=32)
    for part in data:
        digest.update(part)
    return digest.digest()


def _config(config: Any) -> bytes:
    return hashlib.blake2b(json.dumps(config, sort_keys=True).encode(), digest_size=32).digest()
