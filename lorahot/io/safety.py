"""Checks on an untrusted safetensors file, made before the parser is handed the file.

An adapter from a stranger may be truncated, damaged or built to hurt. Before safetensors
opens a file, :func:`check_safetensors` reads only its 8-byte header length and its JSON
header (both capped in size) and checks every entry against the file's real size:

- the header length fits the file and :data:`MAX_HEADER_BYTES`;
- the header is one JSON object without duplicate keys; ``__metadata__`` maps str to str
  and stays within :data:`MAX_METADATA_BYTES`;
- every tensor has a known dtype, a shape of at most :data:`MAX_NDIM` non-negative ints, and
  ``data_offsets`` whose length is exactly ``numel * itemsize``;
- the tensors tile the data section exactly: no overlap, no gap, nothing past the end.

A shape declaring terabytes is therefore refused from its header entry, before any tensor is
allocated. :func:`read_json_file` does the same for ``adapter_config.json``: a size cap, and
nesting too deep for the parser is an error rather than a crash. Failures raise
:class:`~lorahot.errors.AdapterReadError` naming the file, the key and the fix.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorahot.errors import AdapterReadError
from lorahot.io.dtypes import DTYPE_BYTES

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_TENSORS",
    "MAX_NDIM",
    "MAX_CONFIG_BYTES",
    "SafetensorsHeader",
    "check_safetensors",
    "read_json_file",
]

MAX_HEADER_BYTES = 8 << 20  # safetensors allows 100 MB; 50,000 tensor entries fit in 8 MB
MAX_METADATA_BYTES = 4 << 20  # kohya training metadata (tag frequencies) reaches a few 100 KB
MAX_TENSORS = 1 << 16  # an all-linear LoRA of an 80-layer LLM has about 1,200
MAX_NDIM = 8  # LoRA weights have 2 (linear) to 5 (conv3d) dims
MAX_CONFIG_BYTES = 1 << 20  # a PEFT adapter_config.json is a few KB


_FIX = "Re-download or re-save the adapter (safetensors.torch.save_file)."


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: where the data section starts and each tensor's place in it.

    Attributes:
        data_start: byte offset of the data section in the file.
        data_size: bytes in the data section (the tensors tile it exactly).
        entries: ``key -> (dtype, shape, begin, end)``, offsets relative to ``data_start``.
        metadata: ``__metadata__`` (str -> str).
    """

    data_start: int
    data_size: int
    entries: dict[str, tuple[str, tuple[int, ...], int, int]]
    metadata: dict[str, str]


def check_safetensors(path: Path) -> SafetensorsHeader:
    """Refuses a damaged or hostile safetensors file before anything is allocated for it.

    Reads at most ``8 + MAX_HEADER_BYTES`` bytes of the file.

    Returns:
        The checked header, so the caller can read the data without parsing it again.

    Raises:
        AdapterReadError: the header length, the header or any tensor entry is invalid; the
            message names the file and the entry.
    """
    size = _file_size(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _error(path, f"{size} bytes, too short to hold the 8-byte header length (empty or truncated file)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise _error(
                path,
                f"header declares {n} bytes, more than the {MAX_HEADER_BYTES} lorahot reads (not a safetensors "
                "file, or damaged)",
            )
        if n > size - 8:
            raise _error(path, f"header declares {n} bytes but only {size - 8} follow (truncated file)")
        raw = f.read(n)
    checked = _check_header(path, raw, size)
    # each caller gets its own dicts: the memoized ones stay as checked
    return SafetensorsHeader(checked.data_start, checked.data_size, dict(checked.entries), dict(checked.metadata))


@functools.lru_cache(maxsize=64)
def _check_header(path: Path, raw: bytes, size: int) -> SafetensorsHeader:
    """Checks header bytes ``raw`` of a ``size``-byte file; memoized, since a swap back to a
    file re-reads the same header (the check is pure: same bytes and size, same verdict)."""
    n = len(raw)
    header = _parse_json(raw, path, "header", _FIX)
    if not isinstance(header, dict):
        raise _error(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    _check_metadata(path, metadata)
    if len(header) > MAX_TENSORS:
        raise _error(path, f"header lists {len(header)} tensors, more than {MAX_TENSORS}")
    spans = [_check_entry(path, key, entry) for key, entry in header.items()]
    _check_tiling(path, spans, size - 8 - n)
    entries = {k: (e["dtype"], tuple(e["shape"]), *e["data_offsets"]) for k, e in header.items()}
    return SafetensorsHeader(8 + n, size - 8 - n, entries, dict(metadata or {}))


def read_json_file(path: Path, what: str = "adapter config") -> Any:
    """Parses a small JSON file (at most :data:`MAX_CONFIG_BYTES`).

    Raises:
        AdapterReadError: the file is too large, not UTF-8, not JSON, or nested too deep.
    """
    size = _file_size(path)
    if size > MAX_CONFIG_BYTES:
        raise AdapterReadError(
            f"{path}: {what} is {size} bytes, more than the {MAX_CONFIG_BYTES} lorahot reads. Fix or delete the file."
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AdapterReadError(f"{path}: cannot read the {what} ({exc}).") from None
    return _parse_json(raw, path, what, "Fix or delete the file.")


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise AdapterReadError(f"{path}: cannot read the file ({exc}).") from None


def _error(path: Path, problem: str) -> AdapterReadError:
    return AdapterReadError(f"{path}: not a valid safetensors file: {problem}. {_FIX}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_json(raw: bytes, path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        problem = "nested too deep" if isinstance(exc, RecursionError) else str(exc)
        raise AdapterReadError(f"{path}: the {what} is not valid JSON ({problem}). {fix}") from None


def _check_metadata(path: Path, metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _error(path, "__metadata__ must map strings to strings")
    nbytes = sum(len(k) + len(v) for k, v in metadata.items())
    if nbytes > MAX_METADATA_BYTES:
        raise _error(path, f"__metadata__ holds {nbytes} characters, more than {MAX_METADATA_BYTES}")


def _check_entry(path: Path, key: str, entry: Any) -> tuple[int, int, str]:
    """``(begin, end, key)`` of one tensor entry, after checking dtype, shape and offsets."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _error(
            path,
            f"tensor {key!r}: entry must be an object with exactly dtype, shape, data_offsets; got {_short(entry)}",
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise _error(
            path, f"tensor {key!r}: unsupported dtype {_short(dtype)} (expected one of {', '.join(DTYPE_BYTES)})"
        )
    if not _int_list(shape) or len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise _error(
            path, f"tensor {key!r}: shape {_short(shape)} is not a list of at most {MAX_NDIM} non-negative integers"
        )
    if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise _error(
            path, f"tensor {key!r}: data_offsets {_short(offsets)} must be [begin, end] with 0 <= begin <= end"
        )
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _error(
            path,
            f"tensor {key!r}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets {offsets} span "
            f"{offsets[1] - offsets[0]}",
        )
    return offsets[0], offsets[1], key


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    pos, prev = 0, "the header"
    for begin, end, key in sorted(spans):
        if begin != pos:
            kind = "overlaps" if begin < pos else "leaves a gap after"
            raise _error(path, f"tensor {key!r} at bytes [{begin}, {end}) {kind} {prev}, which ends at {pos}")
        pos, prev = end, repr(key)
    if pos != data_size:
        where = (
            "past the end of the file (truncated file)"
            if pos > data_size
            else "short of the end of the file (trailing bytes)"
        )
        raise _error(
            path, f"tensor data ends at byte {pos} of the data section, {where}; the file holds {data_size} data bytes"
        )


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in v)


def _short(v: Any, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
