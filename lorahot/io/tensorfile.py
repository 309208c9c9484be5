"""Reading the tensors of a checked safetensors file in one pass, optionally onto a GPU.

After :func:`lorahot.io.safety.check_safetensors` has validated the header (every tensor tiles
the data section exactly), the whole data section is read with a few large positioned reads
into one buffer (pinned when the tensors are headed for a GPU), copied to the device in one
transfer if asked, and every tensor becomes a view of that buffer. Nothing is unpickled, and
no per-tensor allocation or transfer happens. Where a runtime lends its own buffers for the
read (:mod:`lorahot.io.read_buffers`), the data lands in those, and nothing is allocated.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from pathlib import Path

import torch

from lorahot.errors import AdapterMismatchError, AdapterReadError, shown
from lorahot.io.digests import note_data
from lorahot.io.dtypes import TORCH_DTYPES
from lorahot.io.read_buffers import lent
from lorahot.io.safety import SafetensorsHeader, regular_file
from lorahot.io.scoped import scoped

__all__ = ["read_tensors", "file_stamp", "largest_tensor", "refuse_oversized"]

_LARGEST: ContextVar[int | None] = ContextVar("lorahot_largest_tensor", default=None)


@contextlib.contextmanager
def largest_tensor(numel: int) -> Iterator[None]:
    """Within the block, a file whose header declares a tensor of more than ``numel`` elements
    is refused before its data is read (a runtime sets the most any factor of its layers could
    hold, with a margin): a sparse file of a few kilobytes can declare gigabytes."""
    with scoped(_LARGEST, numel):
        yield


def _check_sizes(path: Path, header: SafetensorsHeader) -> None:
    """Raises :class:`AdapterMismatchError` for a tensor larger than :func:`largest_tensor` allows."""
    refuse_oversized(
        str(path), ((key, shape) for key, (_, shape, _, _) in header.entries.items()), "file's data was not read"
    )


def refuse_oversized(where: str, shapes: Iterable[tuple[str, Sequence[int]]], untouched: str) -> None:
    """Raises :class:`AdapterMismatchError` for the first ``(key, shape)`` of more elements than
    :func:`largest_tensor` allows (nothing outside its block): a file's header entries before its
    data is read, or a caller's tensors before they are copied (an expanded view of a few bytes
    can declare terabytes too). ``untouched`` says what was spared (``"file's data was not read"``).
    """
    limit = _LARGEST.get()
    if limit is None:
        return
    for key, shape in shapes:
        numel = math.prod(shape)
        if numel > limit:
            raise AdapterMismatchError(
                f"{where}: {shown(key, 200)} declares shape {tuple(shape)} ({numel} elements), more than any "
                f"LoRA, LyCORIS "
                f"or diff factor of the injected layers could hold ({limit}, with a margin); the {untouched}. "
                "Load an adapter made for this model (is it an adapter?)."
            )


_CHUNK = 16 << 20  # bytes per positioned read; several run at once for large files


def read_tensors(
    path: Path,
    header: SafetensorsHeader,
    device: torch.device | None = None,
    fd: int | None = None,
    stamp: tuple[int, int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` as a view of one buffer, on ``device`` (default: the CPU).

    Args:
        path: the file, for messages (and opened with :func:`regular_file` unless ``fd`` is given).
        header: its checked header.
        device: where the tensors land.
        fd: the descriptor the header was checked on: the same file is read, whatever happens to
            the path meanwhile.
        stamp: :func:`file_stamp` of ``fd`` when its header was read: the file must still have
            it after the data is read (default: its stamp just before the data is read).

    With ``device`` the meta device, nothing past the header is read: the tensors are meta
    tensors of the header's shapes and dtypes (what planning needs, see
    :func:`lorahot.plan_targets`).

    Raises:
        AdapterReadError: the file shrank since its header was checked, or changed while its
            data was read (its size or modification times moved); its data is
            larger than the machine's memory, or cannot be allocated.
        AdapterMismatchError: a tensor larger than :func:`largest_tensor` allows.
    """
    if device is not None and device.type == "meta":
        return {
            k: torch.empty(shape, dtype=TORCH_DTYPES[dt], device=device)
            for k, (dt, shape, _, _) in header.entries.items()
        }
    _check_sizes(path, header)
    on_gpu = device is not None and device.type == "cuda"
    memory = _physical_memory()
    if memory is not None and header.data_size > memory:  # a sparse file can claim terabytes cheaply
        raise AdapterReadError(
            f"{path}: its tensor data is {header.data_size} bytes, more than this machine's {memory} bytes of memory. "
            "Load it on a larger machine, or check the file (is it an adapter?)."
        )
    borrowed = lent(device)
    if borrowed is not None and header.data_size:  # a runtime's own buffers (lorahot.io.read_buffers)
        buffers, part = borrowed

        def fill(host: torch.Tensor) -> None:
            _read_fd(path, fd, header.data_start, host, stamp=stamp)
            note_data(path, header.identity, host)

        def allocate(make: Callable[[], torch.Tensor]) -> torch.Tensor:
            return _allocate(path, header.data_size, make)

        return _views(buffers.read(part, header.data_size, fill, allocate), header)
    buf = _allocate(path, header.data_size, lambda: torch.empty(header.data_size, dtype=torch.uint8, pin_memory=on_gpu))
    if header.data_size:
        _read_fd(path, fd, header.data_start, buf, stamp=stamp)
    note_data(path, header.identity, buf)  # for the host cache's recent files
    if device is not None and device.type != "cpu":
        host = buf
        buf = _allocate(path, header.data_size, lambda: host.to(device, non_blocking=on_gpu))
    return _views(buf, header)


def _read_fd(
    path: Path,
    fd: int | None,
    start: int,
    buf: torch.Tensor,
    stamp: tuple[int, int, int] | None = None,
) -> None:
    """:func:`_read_into` from ``fd`` or, if None, from ``path`` opened here; refused where the
    file's :func:`file_stamp` after the read is not ``stamp`` (or its stamp before the read)."""
    if fd is None:
        with regular_file(path, "safetensors file") as opened:
            _read_fd(path, opened, start, buf)
        return
    before = file_stamp(fd, path) if stamp is None else stamp
    _read_into(fd, path, start, buf)
    if file_stamp(fd, path) != before:  # written meanwhile: the data may mix two versions of the file
        raise AdapterReadError(
            f"{path}: the file changed while its tensor data was read (another process writing it?). Load it "
            "again once it is written."
        )


def file_stamp(fd: int, path: Path) -> tuple[int, int, int]:
    """``(size, mtime, ctime)`` of the open file ``path``, in nanoseconds: what a write in place
    changes.

    Raises:
        AdapterReadError: the file system cannot say (EIO, ESTALE): the read is refused, naming
            the file.
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise AdapterReadError(f"{path}: cannot read the file ({exc.strerror or exc}).") from None
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _physical_memory() -> int | None:
    """Bytes of RAM, if the system says (POSIX); reading more cannot succeed."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _allocate(path: Path, nbytes: int, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, the buffer for a file's tensor data; out of memory is an error naming the file."""
    try:
        return make()
    except (RuntimeError, MemoryError) as exc:  # torch reports a failed allocation as RuntimeError
        raise AdapterReadError(
            f"{path}: cannot allocate {nbytes} bytes for its tensor data ({str(exc).strip()[:200]}). Free memory, or "
            "load a smaller adapter."
        ) from None


def _read_into(fd: int, path: Path, start: int, buf: torch.Tensor) -> None:
    """Fills ``buf`` from ``fd`` at ``start`` with large positioned reads, several at once."""
    view = memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
    spans = [(off, min(_CHUNK, len(view) - off)) for off in range(0, len(view), _CHUNK)]
    if not spans:
        return

    def read(span: tuple[int, int]) -> int:
        off, size = span
        return os.preadv(fd, [view[off : off + size]], start + off)

    chunks = _Chunks(read)
    try:  # before the first chunk is submitted: an interrupt between two submissions stops them too
        futures = [_readers().submit(chunks.read, span) for span in spans] if len(spans) > 1 else []
        got = [f.result() for f in futures] if futures else [read(spans[0])]
    except OSError as exc:
        raise AdapterReadError(f"{path}: cannot read the tensor data ({exc}). Re-download the adapter.") from None
    finally:  # a failed or interrupted read returns only once no chunk still reads fd or writes buf
        chunks.stop()
    if got != [size for _, size in spans]:
        raise AdapterReadError(
            f"{path}: the file is shorter than its header says (changed while reading?). Re-download the adapter."
        )


class _Chunks:
    """The chunks of one read submitted to the reader threads: :meth:`stop` returns once none
    reads, and a chunk that starts after it reads nothing (the read has gone: its descriptor
    may be closed and its buffer another read's). Holding no future, it stops the chunks of a
    submission that an interrupt cut short as well."""

    def __init__(self, read: Callable[[tuple[int, int]], int]) -> None:
        self._read = read
        self._turn = threading.Condition()
        self._running = 0
        self._stopped = False

    def read(self, span: tuple[int, int]) -> int:
        """Reads ``span`` (on a reader thread), unless the read was stopped (0 bytes)."""
        with self._turn:
            if self._stopped:
                return 0
            self._running += 1
        try:
            return self._read(span)
        finally:
            with self._turn:
                self._running -= 1
                self._turn.notify_all()

    def stop(self) -> None:
        """No chunk starts from now on; returns once none reads."""
        with self._turn:
            self._stopped = True
            self._turn.wait_for(lambda: self._running == 0)


@functools.cache
def _readers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="lorahot-read")


def _views(buf: torch.Tensor, header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """Every tensor of ``header`` as a view of its data ``buf``, in the header's order.

    An aligned tensor is one ``as_strided`` of ``buf`` reinterpreted as its dtype, with the
    strides and offset :attr:`SafetensorsHeader.layout` computed once per distinct header
    (308 tensors: 0.3 ms on the CPU box, against 1.2 ms computing them on every read); one
    that does not start on an element boundary is a copy.
    """
    typed = {dtype: _typed(buf, dtype) for dtype in {entry[1] for entry in header.layout}}
    out = {
        key: typed[dtype].as_strided(shape, strides, offset)
        for key, dtype, shape, strides, offset in header.layout
        if offset >= 0
    }
    if len(out) == len(header.layout):
        return out
    for key, dtype, shape, _, offset in header.layout:  # a view must start on an element boundary
        if offset < 0:
            begin, end = header.entries[key][2:]
            out[key] = buf[begin:end].clone().view(TORCH_DTYPES[dtype]).view(shape)
    return {key: out[key] for key, *_ in header.layout}  # the header's order


def _typed(buf: torch.Tensor, dtype: str) -> torch.Tensor:
    """``buf`` (bytes) reinterpreted as ``dtype``, its tail short of one element left out."""
    t = TORCH_DTYPES[dtype]
    return buf[: len(buf) - len(buf) % t.itemsize].view(t)
