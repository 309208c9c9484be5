"""Buffers a runtime lends the file reader, so that a warm load allocates nothing.

A load from a safetensors file reads the file's bytes into host memory (pinned when the
tensors are headed for a GPU), copies them to the device in one transfer, and views the tensors
there (:mod:`lorahot.io.tensorfile`). Through torch's caching allocators every load asks for
blocks the size of the file. On an H200 the loads that got fresh blocks from the driver
(``cudaHostAlloc``, ``cudaMalloc``) were the slow ones: swaps of an SDXL-sized adapter (335 MB)
took 150-300 ms against 40-60 for those that did not, and under CUDA graphs that was the first
three of six (``benchmarks/README.md``, eleventh session). On the CPU a fresh buffer of more
than 32 MB is mapped anew by the allocator on every read, and its page faults cost more than
the read.

:class:`ReadBuffers` keeps, for each part of a load (a stack reads all its files before it
writes any), one host buffer and on CUDA one device buffer, grown to the largest file read and
never shrunk. The runtime lends them for its reads (:meth:`ReadBuffers.lend`: a context
variable that :func:`lorahot.io.tensorfile.read_tensors` consults, so nothing in between
changes) and holds :attr:`ReadBuffers.lock` for the whole load. A load from the host cache
copies its pinned packs into the device buffers too (:meth:`ReadBuffers.upload`).

What makes reuse safe:

- the next read writes a host buffer only once the transfer from it has been carried out
  (an event, long past by then);
- the next transfer into a device buffer waits, on the device, for the work queued by the
  load that last used it (:meth:`ReadBuffers.used`: the runtime records it after its write);
- nothing keeps views of a buffer past its load. The runtime drops the tensors of the plans it
  keeps once the arena holds their values (:func:`lorahot.runtime.plan.forget_values`), and
  lends the buffers only where nothing reads those tensors later (not in merged mode).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from lorahot.io.scoped import scoped

__all__ = ["ReadBuffers", "lent"]

_LENT: ContextVar[tuple[ReadBuffers, int] | None] = ContextVar("lorahot_read_buffers", default=None)

#: capacity granularity: a buffer grows to the next multiple of this (and by at least a quarter)
_ROUND = 2 << 20


@dataclass
class _Part:
    """The buffers of one part of a load."""

    host: torch.Tensor | None = None
    device: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None  # the transfer out of ``host`` (CUDA)


class ReadBuffers:
    """Host (and device) buffers for the files a runtime reads onto ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lock = threading.Lock()
        self._parts: list[_Part] = []
        self._used: torch.cuda.Event | None = None

    @contextmanager
    def lend(self, part: int) -> Iterator[None]:
        """Within the block, a file read onto :attr:`device` lands in the
        buffers of ``part``: its tensors are views of them until the next read of that part."""
        with scoped(_LENT, (self, part)):
            yield

    def read(
        self,
        part: int,
        nbytes: int,
        fill: Callable[[torch.Tensor], None],
        make: Callable[[Callable[[], torch.Tensor]], torch.Tensor],
    ) -> torch.Tensor:
        """``fill(host)`` writes the file's ``nbytes`` bytes into a host buffer of exactly
        that length; returns them on :attr:`device` (``uint8 [nbytes]``, a view of the part's
        buffer). ``make(allocate)`` runs an allocation (the reader's, which names the file when
        memory runs out)."""
        held = self._part(part)
        cuda = self.device.type == "cuda"
        if held.copied is not None:
            held.copied.synchronize()  # the last transfer out of the host buffer is done
        held.host = _grown(held.host, nbytes, lambda n: make(lambda: _empty(n, pin=cuda)))
        host = held.host[:nbytes]
        fill(host)
        if not cuda:
            return host
        return self._to_device(held, host, make)

    def upload(self, part: int, host: torch.Tensor) -> torch.Tensor:
        """``host`` (pinned bytes that their owner keeps unchanged, such as a pack of the host
        cache) on :attr:`device`, in the device buffer of ``part``: a view of it, valid until
        the next read or upload of that part."""
        return self._to_device(self._part(part), host, lambda allocate: allocate())

    def _part(self, part: int) -> _Part:
        while len(self._parts) <= part:
            self._parts.append(_Part())
        return self._parts[part]

    def _to_device(
        self, held: _Part, host: torch.Tensor, make: Callable[[Callable[[], torch.Tensor]], torch.Tensor]
    ) -> torch.Tensor:
        """``host`` copied, without blocking the host, into ``held``'s device buffer (grown if
        need be), after the last load's work on the device buffers."""
        nbytes = host.numel()
        held.device = _grown(held.device, nbytes, lambda n: make(lambda: _empty(n, device=self.device)))
        stream = torch.cuda.current_stream(self.device)
        if self._used is not None:
            stream.wait_event(self._used)  # the last load's reads of the device buffers come first
        out = held.device[:nbytes]
        out.copy_(host, non_blocking=True)
        held.copied = held.copied or torch.cuda.Event()
        held.copied.record(stream)
        return out

    def used(self) -> None:
        """Marks the device buffers read by the work queued so far (a load's checks and
        writes) on the device's current stream: the next transfer into them waits for it."""
        if self.device.type == "cuda":
            self._used = self._used or torch.cuda.Event()
            self._used.record(torch.cuda.current_stream(self.device))


def lent(device: torch.device | None) -> tuple[ReadBuffers, int] | None:
    """The buffers and part lent for a read onto ``device`` in this context, if any."""
    found = _LENT.get()
    if found is None or device is None or found[0].device != device:
        return None
    return found


def _empty(n: int, *, pin: bool = False, device: torch.device | None = None) -> torch.Tensor:
    with torch.inference_mode(False):  # a normal tensor, whatever mode the load runs in
        return torch.empty(n, dtype=torch.uint8, pin_memory=pin, device=device)


def _grown(buf: torch.Tensor | None, nbytes: int, allocate: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """``buf`` if it holds ``nbytes``, else a new buffer of at least ``nbytes`` (and a quarter
    more than ``buf``), rounded up to :data:`_ROUND`. The old one goes back to torch's caching
    allocators, which keep it until the work queued on it is done."""
    if buf is not None and buf.numel() >= nbytes:
        return buf
    want = max(nbytes, 0 if buf is None else buf.numel() + buf.numel() // 4)
    return allocate(-(-want // _ROUND) * _ROUND)
