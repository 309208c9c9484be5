"""Checks on untrusted files and JSON, made before anything is allocated for them.

An adapter from a stranger may be truncated, damaged or built to hurt. Before its tensors are
read, :func:`check_safetensors` reads only the 8-byte header length and the JSON header (both
capped in size) and checks every entry against the file's real size:

- the header length fits the file and :data:`MAX_HEADER_BYTES`;
- the header is one JSON object, nested at most :data:`MAX_JSON_DEPTH` deep, without duplicate
  keys; ``__metadata__`` maps str to str and stays within :data:`MAX_METADATA_BYTES`;
- every tensor key is at most :data:`MAX_KEY_CHARS` long; every tensor has a known dtype, a
  shape of at most :data:`MAX_NDIM` non-negative ints whose (non-zero) product stays within
  :data:`MAX_NUMEL`, and ``data_offsets`` whose length is exactly ``numel * itemsize``;
- the tensors tile the data section exactly: no overlap, no gap, nothing past the end.

A shape declaring terabytes is therefore refused from its header entry, before any tensor is
allocated. Files are opened with :func:`regular_file`: non-blocking, and checked on the open
descriptor (no race between check and use), so a FIFO, a device or a directory named
``*.safetensors`` is refused instead of blocking forever. :func:`parse_json` is the one JSON
parser of the read side (``adapter_config.json``, the safetensors header, the
``lora_adapter_metadata`` string): a size cap and a nesting cap checked by a linear scan before
the recursive parser sees the text. Failures raise :class:`~lorahot.errors.AdapterReadError`
naming the file, the key and the fix.

Checked headers are memoized by the digest of their bytes within a byte budget
(:data:`HEADER_MEMO_BYTES`), so a swap back to a file skips the parse; a rejected header is
never stored.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lorahot.errors import MAX_KEY_CHARS, AdapterReadError, SourceNotFoundError, cut, long_name, shown
from lorahot.io.dtypes import DTYPE_BYTES
from lorahot.memo import BoundedMemo

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_TENSORS",
    "MAX_NDIM",
    "MAX_NUMEL",
    "MAX_KEY_CHARS",
    "MAX_CONFIG_BYTES",
    "MAX_JSON_DEPTH",
    "HEADER_MEMO_BYTES",
    "SafetensorsHeader",
    "check_safetensors",
    "regular_file",
    "read_json_file",
    "parse_json",
    "path_error",
    "file_kind",
    "cut",
    "PICKLE_SUFFIXES",
]

#: File endings of pickle-based checkpoints, which lorahot refuses to open (or download).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

MAX_HEADER_BYTES = 8 << 20  # safetensors allows 100 MB; 50,000 tensor entries fit in 8 MB
MAX_METADATA_BYTES = 4 << 20  # kohya training metadata (tag frequencies) reaches a few 100 KB
MAX_TENSORS = 1 << 16  # an all-linear LoRA of an 80-layer LLM has about 1,200
MAX_NDIM = 8  # LoRA weights have 2 (linear) to 5 (conv3d) dims
MAX_NUMEL = 1 << 48  # elements, counting a 0 dim as 1: keeps shapes and strides within int64
MAX_CONFIG_BYTES = 1 << 20  # a PEFT adapter_config.json is a few KB
MAX_JSON_DEPTH = 64  # a PEFT config nests 4 deep, a safetensors header 3
HEADER_MEMO_BYTES = 32 << 20  # a 154-layer adapter's header is ~40 KB (~0.2 MB parsed)

_FIX = "Re-download or re-save the adapter (safetensors.torch.save_file)."


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: where the data section starts and each tensor's place in it.

    Attributes:
        data_start: byte offset of the data section in the file.
        data_size: bytes in the data section (the tensors tile it exactly).
        entries: ``key -> (dtype, shape, begin, end)``, offsets relative to ``data_start``.
        metadata: ``__metadata__`` (str -> str).
        layout: per entry, in the same order, ``(key, dtype, shape, strides, offset)``: the
            contiguous strides and the offset in elements of the dtype, -1 where the tensor
            does not start on an element boundary. What a reader needs to make each tensor
            one view of the data, computed once per distinct header (the header is memoized).
        identity: the digest of the header's bytes and the file's size: equal for two files
            exactly when their keys, dtypes, shapes, offsets and metadata are (what memos of
            a file's structure are keyed by; the tensors' values are not part of it).
    """

    data_start: int
    data_size: int
    entries: dict[str, tuple[str, tuple[int, ...], int, int]]
    metadata: dict[str, str]
    layout: tuple[tuple[str, str, tuple[int, ...], tuple[int, ...], int], ...]
    identity: tuple[bytes, int]


#: (blake2b of the header bytes, file size) -> the checked header
_HEADERS: BoundedMemo[tuple[bytes, int], SafetensorsHeader] = BoundedMemo(
    HEADER_MEMO_BYTES, lambda k, h: _header_cost(h)
)


def check_safetensors(path: Path, fd: int | None = None) -> SafetensorsHeader:
    """Refuses a damaged or hostile safetensors file before anything is allocated for it.

    Reads at most ``8 + MAX_HEADER_BYTES`` bytes of the file.

    Args:
        path: the file (opened with :func:`regular_file` unless ``fd`` is given).
        fd: an open descriptor of ``path`` to read instead.

    Returns:
        The checked header, so the caller can read the data without parsing it again.

    Raises:
        AdapterReadError: not a regular file, or the header length, the header or any tensor
            entry is invalid; the message names the file and the entry.
        SourceNotFoundError: the file cannot be opened.
    """
    if fd is None:
        with regular_file(path, "safetensors file") as opened:
            return check_safetensors(path, opened)
    size = _fd_size(fd, path)
    head = _pread(fd, 8, 0, path)
    if len(head) < 8:
        found = len(head) if len(head) < size else size
        raise _error(
            path,
            f"{found} bytes, too short to hold the 8-byte header length (empty or truncated file"
            + (", or it shrank while lorahot read it)" if len(head) < min(size, 8) else ")"),
        )
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise _error(
            path,
            f"header declares {n} bytes, more than the {MAX_HEADER_BYTES} lorahot reads (not a safetensors "
            "file, or damaged)",
        )
    if n > size - 8:
        raise _error(path, f"header declares {n} bytes but only {max(size - 8, 0)} follow (truncated file)")
    raw = _pread(fd, n, 8, path)
    key = _identity(raw, size)
    checked = _HEADERS.get(key, _check_header, path, raw, size)
    # each caller gets its own dicts: the memoized ones stay as checked
    return SafetensorsHeader(
        checked.data_start, checked.data_size, dict(checked.entries), dict(checked.metadata), checked.layout, key
    )


def _header_cost(header: SafetensorsHeader) -> int:
    """Bytes a checked header keeps alive: its parsed entries take about three times their JSON
    (measured), its layout about as much again, so seven times the header's length."""
    return 7 * (header.data_start - 8)


def _check_header(path: Path, raw: bytes, size: int) -> SafetensorsHeader:
    """Checks header bytes ``raw`` of a ``size``-byte file (pure: same bytes and size, same verdict)."""
    n = len(raw)
    header = parse_json(raw, str(path), "header", _FIX, MAX_HEADER_BYTES)
    if not isinstance(header, dict):
        raise _error(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    _check_metadata(path, metadata)
    if len(header) > MAX_TENSORS:
        raise _error(path, f"header lists {len(header)} tensors, more than {MAX_TENSORS}")
    spans = [_check_entry(path, key, entry) for key, entry in header.items()]
    _check_tiling(path, spans, size - 8 - n)
    entries = {k: (e["dtype"], tuple(e["shape"]), *e["data_offsets"]) for k, e in header.items()}
    layout = tuple(_layout(k, *entry) for k, entry in entries.items())
    return SafetensorsHeader(8 + n, size - 8 - n, entries, dict(metadata or {}), layout, _identity(raw, size))


def _identity(raw: bytes, size: int) -> tuple[bytes, int]:
    """:attr:`SafetensorsHeader.identity` of header bytes ``raw`` in a ``size``-byte file."""
    return hashlib.blake2b(raw, digest_size=32).digest(), size


def _layout(
    key: str, dtype: str, shape: tuple[int, ...], begin: int, end: int
) -> tuple[str, str, tuple[int, ...], tuple[int, ...], int]:
    """``(key, dtype, shape, strides, offset)`` of a checked entry (see :class:`SafetensorsHeader`)."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    size = DTYPE_BYTES[dtype]
    return key, dtype, shape, tuple(strides), -1 if begin % size else begin // size


# -- opening files -----------------------------------------------------------------------------

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words (``"a FIFO (named pipe)"``)."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file" if stat.S_ISREG(mode) else "special")


@contextlib.contextmanager
def regular_file(path: Path, what: str) -> Iterator[int]:
    """A read-only descriptor of ``path``, which must be a regular file, for the ``with`` block.

    Opened non-blocking (a FIFO cannot stall the open) and checked with ``fstat`` on the
    descriptor itself, so the file checked is the file read. Held by a file object from the
    open on, in a ``with`` that closes it: an interrupt anywhere between the open and the end
    of the caller's block (``KeyboardInterrupt``) leaves no descriptor open, where a descriptor
    returned to the caller and closed by its ``try`` leaked at the line between the two.

    Raises:
        SourceNotFoundError: the path cannot be opened (missing, too long, no permission).
        AdapterReadError: it is not a regular file (FIFO, device, socket, directory).
    """
    with _opened(path, what) as file:
        fd = file.fileno()
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise path_error(path, what, exc) from None
        if not stat.S_ISREG(mode):
            raise AdapterReadError(
                f"{cut(str(path))}: the {what} is {file_kind(mode)}, not a regular file; lorahot reads only "
                "regular files. Replace it with the real file."
            )
        yield fd


def _opened(path: Path, what: str) -> io.FileIO:
    """``path`` opened read-only, non-blocking, as an unbuffered file object (which closes its
    descriptor: :func:`regular_file`'s ``with``, or its finalizer where the open fails after it)."""
    try:
        return io.FileIO(path, "r", opener=_nonblocking)
    except (OSError, ValueError) as exc:
        kind = _special(path)  # a socket cannot be opened at all, a directory not as a file: say what it is
        if kind is not None:
            raise AdapterReadError(
                f"{cut(str(path))}: the {what} is {kind}, not a regular file; lorahot reads only regular files. "
                "Replace it with the real file."
            ) from None
        raise path_error(path, what, exc) from None


def _nonblocking(path: str, _: int) -> int:
    """The open of :func:`_opened`: read-only, non-blocking, close-on-exec, no controlling tty."""
    return os.open(
        path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    )


def _special(path: Path) -> str | None:
    """What ``path`` is where it exists and is not a regular file (a socket, say), else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) else file_kind(mode)


def path_error(path: Path | str, what: str, exc: BaseException) -> SourceNotFoundError:
    """The error for an ``OSError`` (or a NUL byte) met while locating or opening ``path``."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOENT:
        return SourceNotFoundError(f"{cut(str(path))}: no such file or directory. Check the path.")
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return SourceNotFoundError(f"{cut(str(path))}: cannot open the {what} ({why}). Check the path.")


def _fd_size(fd: int, path: Path) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as exc:
        raise AdapterReadError(f"{path}: cannot read the file ({exc.strerror}).") from None


def _pread(fd: int, n: int, offset: int, path: Path) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer only at the end of the file)."""
    parts: list[bytes] = []
    got = 0
    try:
        while got < n:
            part = os.pread(fd, n - got, offset + got)
            if not part:
                break
            parts.append(part)
            got += len(part)
    except OSError as exc:
        raise AdapterReadError(f"{path}: cannot read the file ({exc.strerror}). Re-download the adapter.") from None
    return b"".join(parts)


def read_json_file(path: Path, what: str = "adapter config", fd: int | None = None) -> Any:
    """Parses a small JSON file (at most :data:`MAX_CONFIG_BYTES`), see :func:`parse_json`.

    Raises:
        AdapterReadError: not a regular file, too large, not UTF-8, not JSON, or nested too deep.
        SourceNotFoundError: the file cannot be opened.
    """
    if fd is None:
        with regular_file(path, what) as opened:
            return read_json_file(path, what, opened)
    size = _fd_size(fd, path)
    if size > MAX_CONFIG_BYTES:
        raise AdapterReadError(
            f"{path}: {what} is {size} bytes, more than the {MAX_CONFIG_BYTES} lorahot reads. Fix or delete the file."
        )
    raw = _pread(fd, MAX_CONFIG_BYTES + 1, 0, path)  # the file may have grown since fstat
    return parse_json(raw, str(path), what, "Fix or delete the file.", MAX_CONFIG_BYTES)


# -- JSON ------------------------------------------------------------------------------------


def parse_json(raw: bytes | str, where: str, what: str, fix: str, max_bytes: int) -> Any:
    """Parses untrusted JSON: at most ``max_bytes`` bytes (UTF-8) and :data:`MAX_JSON_DEPTH` deep,
    objects without duplicate keys.

    The depth is measured by a linear scan before ``json`` (which recurses once per level) sees
    the text, so hostile nesting costs an error, never a ``RecursionError`` or a stack overflow.

    Args:
        raw: the JSON text, as bytes or str.
        where: the file (or source) for the message.
        what: what the JSON is (``"header"``, ``"adapter config"``), for the message.
        fix: the last sentence of the message.
        max_bytes: the size cap.

    Raises:
        AdapterReadError: too large, not UTF-8, nested too deep, or not valid JSON.
    """
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    if len(data) > max_bytes:
        raise AdapterReadError(
            f"{where}: the {what} is {len(data)} bytes, more than the {max_bytes} lorahot reads. {fix}"
        )
    openers = data.count(b"[") + data.count(b"{")  # an upper bound on the depth, at C speed
    depth = _max_depth(data) if openers > MAX_JSON_DEPTH else 0
    if depth > MAX_JSON_DEPTH:
        raise AdapterReadError(
            f"{where}: the {what} is not valid JSON (nested too deep: {depth} levels, at most {MAX_JSON_DEPTH}). {fix}"
        )
    try:
        text = data.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        problem = "nested too deep" if isinstance(exc, RecursionError) else cut(str(exc), 200)
        raise AdapterReadError(f"{where}: the {what} is not valid JSON ({problem}). {fix}") from None


_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPEN, _CLOSE = np.array([ord("["), ord("{")], np.uint8), np.array([ord("]"), ord("}")], np.uint8)


def _max_depth(data: bytes) -> int:
    """The deepest ``[``/``{`` nesting of JSON text, brackets inside strings not counted.

    Vectorized and linear: a quote starts or ends a string unless an odd run of backslashes
    precedes it; a bracket is inside a string when an odd number of such quotes precede it.
    Wherever the text is a valid JSON prefix (all the parser ever reaches) this is exact; past
    an error it may overcount, which only turns one refusal into another. UTF-8 continuation
    bytes are >= 0x80, so scanning bytes is safe.
    """
    b = np.frombuffer(data, dtype=np.uint8)
    opens, closes = np.flatnonzero(np.isin(b, _OPEN)), np.flatnonzero(np.isin(b, _CLOSE))
    if not opens.size:
        return 0
    quotes = _unescaped(b, np.flatnonzero(b == _QUOTE))
    brackets = np.concatenate([opens, closes])
    steps = np.concatenate([np.ones(opens.size, np.int64), -np.ones(closes.size, np.int64)])
    outside = np.searchsorted(quotes, brackets) % 2 == 0
    order = np.argsort(brackets[outside], kind="stable")
    return int(np.cumsum(steps[outside][order]).max(initial=0))


def _unescaped(b: np.ndarray, quotes: np.ndarray) -> np.ndarray:
    """The quotes not preceded by an odd run of backslashes."""
    slashes = np.flatnonzero(b == _BACKSLASH)
    if not slashes.size or not quotes.size:
        return quotes
    # run_start[k]: index (in slashes) where the backslash run holding slashes[k] starts
    starts = np.ones(slashes.size, bool)
    starts[1:] = np.diff(slashes) != 1
    run_start = np.maximum.accumulate(np.where(starts, np.arange(slashes.size), 0))
    k = np.searchsorted(slashes, quotes - 1)  # the backslash just before each quote, if any
    k_ok = np.minimum(k, slashes.size - 1)
    before = (k < slashes.size) & (slashes[k_ok] == quotes - 1)
    run = np.where(before, k_ok - run_start[k_ok] + 1, 0)
    unescaped: np.ndarray = quotes[run % 2 == 0]
    return unescaped


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {shown(k)}")
        out[k] = v
    return out


# -- header entries ----------------------------------------------------------------------------


def _error(path: Path, problem: str) -> AdapterReadError:
    return AdapterReadError(f"{cut(str(path))}: not a valid safetensors file: {problem}. {_FIX}")


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
    """``(begin, end, key)`` of one tensor entry, after checking key, dtype, shape and offsets."""
    if (problem := long_name(key)) is not None:
        raise _error(path, f"tensor key {shown(key)} {problem}")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _error(
            path,
            f"tensor {shown(key)}: entry must be an object with exactly dtype, shape, data_offsets; got {shown(entry)}",
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _error(
            path, f"tensor {shown(key)}: unsupported dtype {shown(dtype)} (expected one of {', '.join(DTYPE_BYTES)})"
        )
    if not _int_list(shape) or len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise _error(
            path, f"tensor {shown(key)}: shape {shown(shape)} is not a list of at most {MAX_NDIM} non-negative integers"
        )
    if math.prod(max(d, 1) for d in shape) > MAX_NUMEL:
        raise _error(
            path, f"tensor {shown(key)}: shape {shown(shape)} has dimensions whose product exceeds {MAX_NUMEL}"
        )
    if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise _error(
            path, f"tensor {shown(key)}: data_offsets {shown(offsets)} must be [begin, end] with 0 <= begin <= end"
        )
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _error(
            path,
            f"tensor {shown(key)}: shape {shape} of {dtype} needs {nbytes} bytes but data_offsets {shown(offsets)} "
            f"span {offsets[1] - offsets[0]}",
        )
    return offsets[0], offsets[1], key


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_size: int) -> None:
    # a tensor placed past the end names itself (tiled in order, the gap it leaves would be
    # blamed on its innocent neighbour)
    beyond = sorted((b, e, k) for b, e, k in spans if e > data_size)
    if beyond:
        begin, end, key = beyond[-1]
        raise _error(
            path,
            f"tensor {shown(key)} at bytes [{begin}, {end}) of the data section ends past the end of the file, "
            f"whose data section holds {data_size} bytes (a truncated file, or data_offsets that are wrong)",
        )
    pos, prev = 0, "the header"
    for begin, end, key in sorted(spans):
        if begin != pos:
            kind = "overlaps" if begin < pos else "leaves a gap after"
            raise _error(path, f"tensor {shown(key)} at bytes [{begin}, {end}) {kind} {prev}, which ends at {pos}")
        pos, prev = end, shown(key)
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
