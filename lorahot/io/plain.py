"""A caller's read options as plain data, read once, before lorahot looks at them.

``config=``, ``key_map=``, ``fuse=`` and ``split=`` are mappings (and lists) of the caller's
own: a ``dict`` subclass whose ``items`` raises, a ``str`` subclass key whose ``__eq__`` or
``lower`` raises, an ``int`` subclass whose comparisons raise. Reading them as they are runs
the caller's code wherever lorahot parses, hashes or compares them, and an exception there
reached the caller as an :class:`~lorahot.errors.UnexpectedError`. :func:`plain` copies them
once into ``dict``, ``list``, ``tuple``, ``str`` and ``int`` of the same values (a subclass's
value as its base class holds it, without calling its overrides); anything that raises while
it is read is a :class:`~lorahot.errors.UsageError` naming the option. Other objects (tensors,
arrays, floats and a caller's number types, which the checks convert and refuse where that
raises) pass as they are.

A mapping source (a dict of tensors) is read the same way (:mod:`lorahot.io.sources`,
:func:`lorahot.runtime.cache.private`): lorahot's memos keep the key names they parse, and a
kept ``str`` subclass ran its ``__eq__`` in every later read of the same names, a plain dict's
or a file's too (a hand-built :class:`~lorahot.Adapter`'s names are made plain by
:func:`lorahot.io.loader.checked_adapter`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from lorahot.errors import UsageError, shown

__all__ = ["plain"]

#: nesting copied (a PEFT config nests 3 deep); anything deeper passes as it is
_DEPTH = 16
#: entries of one mapping or list read (the parsers cap theirs far below)
_MOST = 1 << 20


def plain(value: Any, name: str, wanted: str = "a dict of plain values") -> Any:
    """``value`` (the read option or source ``name``) as plain data; see the module docstring.

    Raises:
        UsageError: reading the option or one of its entries raised, or one of its mappings
            holds more than 2**20 entries, or two of its keys are one string once plain.
    """
    try:
        return _plain(value, 0)
    except _Unreadable as exc:
        raise UsageError(f"{name}={shown(value, 80)} cannot be read: {exc}. Pass {wanted}.") from None
    except Exception as exc:  # the caller's own type raised anything while it was read
        raise UsageError(
            f"{name}={shown(value, 80)} cannot be read ({type(exc).__name__} raised while its entries were read: "
            f"{shown(str(exc), 120)}). Pass {wanted}."
        ) from None


class _Unreadable(Exception):
    """A problem :func:`plain` names itself."""


def _plain(value: Any, depth: int) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__index__(value)
    if depth >= _DEPTH or not isinstance(value, (Mapping, list, tuple)):
        return value
    if isinstance(value, Mapping):
        items = _read(value.items())
        out = {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in items}
        if len(out) != len(items):
            raise _Unreadable("two of its keys are the same string")
        return out
    entries = [_plain(v, depth + 1) for v in _read(value)]
    return entries if isinstance(value, list) else tuple(entries)


def _read(values: Any) -> list[Any]:
    read = list(itertools.islice(iter(values), _MOST + 1))
    if len(read) > _MOST:
        raise _Unreadable(f"it holds more than {_MOST:,} entries")
    return read
