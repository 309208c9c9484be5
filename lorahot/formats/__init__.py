"""Adapter namings lorahot reads, one declarative :class:`KeyFormat` per naming.

Detection tries :data:`FORMATS` in order and takes the first whose table accounts for every
key; more specific namings (required prefixes, distinct roles) come before PEFT's.
"""

from __future__ import annotations

import functools

from lorahot.formats import comfyui, diffusers, kohya, peft
from lorahot.formats.table import KeyFormat, Rule, group_keys

__all__ = ["FORMATS", "KeyFormat", "Rule", "detect", "format_named", "group_keys"]

#: Every known naming, in detection order.
FORMATS: tuple[KeyFormat, ...] = (kohya.FORMAT, comfyui.FORMAT, diffusers.FORMAT, diffusers.OLD_FORMAT, peft.FORMAT)


def detect(keys: list[str]) -> KeyFormat | None:
    """The first format in :data:`FORMATS` that accounts for every key, or None."""
    return _detect(tuple(keys))


@functools.lru_cache(maxsize=64)
def _detect(keys: tuple[str, ...]) -> KeyFormat | None:
    """:func:`detect`, memoized by the key list: a file loaded again skips the format scans."""
    return next((f for f in FORMATS if f.detect(list(keys))), None)


def format_named(name: str) -> KeyFormat:
    """The format called ``name``; PEFT's for names lorahot does not know (user-built adapters)."""
    return next((f for f in FORMATS if f.name == name), peft.FORMAT)
