"""Adapter namings lorahot reads, one module per format, tried in the order of :data:`FORMATS`."""

from __future__ import annotations

from types import ModuleType

from lorahot.formats import peft

__all__ = ["FORMATS", "peft"]

#: Every known format module. Each provides ``NAME``, ``detect(keys)`` and
#: ``build_modules(tensors, config, source)``.
FORMATS: tuple[ModuleType, ...] = (peft,)
