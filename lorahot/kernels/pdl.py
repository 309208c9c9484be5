"""Programmatic dependent launch: a kernel of a LoRA layer starts before the one it follows ends.

A LoRA layer of the fused path runs two to four kernels back to back (the routed decode: a zero
fill, the segmented shrink, the fused kernel, the split-K sum); a routed layer above the fused
path's rows runs the base GEMM, then the segmented shrink and expand
(:func:`lorahot.kernels.triton_routed_lora.launch` with ``early``). Each waits, by the stream's
order, for the whole of the one before it: its launch, its prologue and, in the routed fused
kernel, its whole base product over K, which needs nothing the shrink writes. On an sm90 GPU
(H100/H200) a kernel launched with programmatic stream serialization may start as soon as every
program of the kernel before it has signalled (``griddepcontrol.launch_dependents``) or ended,
and then waits (``griddepcontrol.wait``) only where it first needs that kernel's results. CUDA
graphs keep such edges when a stream is captured.

The rules the kernels follow, so that an early start never reads or overwrites what it must
not (:mod:`lorahot.kernels.triton_lora_linear`, :mod:`lorahot.kernels.triton_routed_lora`):

- every program of a kernel launched this way waits before its first store, and before its
  first load of anything the kernels before it in the stream may still be writing; a program
  that ends early waits too, so that the kernel's end implies the end of every kernel before it;
- the only loads before the wait are of the layer's input ``x`` (whose writer ended before the
  first kernel of the op was launched, or passed its own wait), the base weight, the adapter's
  slots and the routing (written by swaps and ``activate``, which end before a forward begins);
- the first kernel of an op waits before it signals, so nothing after it can start before the
  kernels before the op have ended. One exception: a routed linear given a stacked shrink's
  result (``h``, :mod:`lorahot.kernels.stacked_routed`) starts with its fused kernel, which
  signals at once and waits before it reads ``h``; the kernels between the stacked shrink and
  it (the earlier layers of its group) each waited in turn, so that wait still implies the end
  of everything before the stacked shrink.

:func:`active` decides per call (read at each launch, so a captured graph keeps what it was
captured with): on when :data:`ENABLED`, the device is sm90 or newer, and Triton has the
``griddepcontrol`` intrinsics.

**On by default where supported; ``LORAHOT_PDL=0`` turns it off.** On an H200 it took the mixed
suite's routed decode from 1.69-1.79x the base model to 1.47-1.64x and the single-adapter decode
from 1.25x to 1.19-1.21x (``benchmarks/README.md``, "Thirteenth session"), and its kernels
compile with every wait where the rules put it (checked in the SASS: each ``ACQBULK`` before
the first load it guards). Its GPU test (``tests/unit/kernels/test_pdl.py``) checks each layer
of an early-launched chain against the same layer recomputed in stream order from its recorded
input, bitwise where no atomics run; an earlier form that compared whole-chain outputs, where a
rounding flip from the shrink's atomic order compounds through seven layers, failed once in
three runs, and the layer-by-layer form held in five of five runs on an H200 ("Fourteenth
session"), with the whole GPU suite run with it on.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["ENABLED", "active"]

#: Whether lorahot's kernels launch with programmatic dependent launch where the GPU supports it
#: (see the module docstring): on unless ``LORAHOT_PDL=0`` at import. Set it before a model is
#: compiled or captured, as the graphs keep the launches they were captured with.
ENABLED = os.environ.get("LORAHOT_PDL", "1") != "0"


@functools.cache
def _supported(index: int) -> bool:
    if torch.cuda.get_device_capability(index) < (9, 0):
        return False
    return importlib.util.find_spec("triton.language.extra.cuda.gdc") is not None


def active(device: torch.device) -> bool:
    """Whether a launch on ``device`` uses programmatic dependent launch now."""
    if not ENABLED or device.type != "cuda":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())
