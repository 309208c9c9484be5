"""The Triton half of a kernel, imported only where it can run.

Each kernel module keeps its Triton code in a ``triton_*`` module of its own, which imports
Triton at the top: a CPU-only install (no Triton, or a Triton this torch cannot use) must
still import lorahot. :func:`triton_module` imports such a module once, where CUDA is present,
and gives None elsewhere; the callers then keep their library-call path.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

__all__ = ["triton_module"]


@functools.cache
def triton_module(name: str) -> ModuleType | None:
    """``lorahot.kernels.<name>``, or None where CUDA or a usable Triton is missing."""
    if not torch.cuda.is_available():
        return None
    try:
        return importlib.import_module(f"lorahot.kernels.{name}")
    except Exception:  # no Triton, or a Triton this torch cannot use
        return None
