"""Small host-to-device uploads that do not wait for the device.

A copy from pageable host memory to a CUDA tensor returns only once the stream has reached
it: every ``set_scale`` or ``activate([...])`` would then wait for all the work queued before
it (a whole forward), and a serving loop could not queue its next step while the GPU runs.
:class:`Staging` keeps one host buffer per destination, pinned on CUDA, and queues the copies
from it without waiting. The buffer is written again only once the previous upload from it
has been carried out: an event, normally long past by then. On the CPU the copies are plain.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Staging"]


class Staging:
    """One host buffer of ``numel`` elements of ``dtype`` for uploads to ``device``."""

    def __init__(self, numel: int, dtype: torch.dtype, device: torch.device) -> None:
        self.device = device
        with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
            self.buffer = torch.empty(numel, dtype=dtype, pin_memory=device.type == "cuda")
        self._sent: torch.cuda.Event | None = None

    def acquire(self) -> torch.Tensor:
        """The host buffer, once the last upload from it has been carried out."""
        if self._sent is not None:
            self._sent.synchronize()
        return self.buffer

    def send(self, copies: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """``dst.copy_(src)`` for each pair (``src`` a view of :attr:`buffer`), queued on the
        current stream of the device without waiting for it."""
        with torch.no_grad():
            for dst, src in copies:
                dst.copy_(src, non_blocking=True)
        self.record()

    def record(self) -> None:
        """Marks the buffer in use by the work queued so far on the device's current stream
        (the copies :meth:`send` queued, or a CUDA graph replayed that reads the buffer):
        :meth:`acquire` waits for it."""
        if self.device.type == "cuda":
            if self._sent is None:  # one event, recorded again after each upload
                self._sent = torch.cuda.Event()
            self._sent.record(torch.cuda.current_stream(self.device))
