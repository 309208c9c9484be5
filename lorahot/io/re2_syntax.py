"""A Python regex, as Python parses it, written out in RE2's syntax.

PEFT matches ``rank_pattern`` / ``alpha_pattern`` keys with Python's ``re``; lorahot runs them
with RE2 (:mod:`lorahot.io.patterns`). The two dialects read some text differently, and both
accept it: ``[[:digit:]]`` is a POSIX class in RE2 but, in Python, a set of ``[:digt`` followed by
a literal ``]``; ``a{,3}`` is ``a`` zero to three times in Python and literal text in RE2. Handing
a key to RE2 as written would then match other names than PEFT does, and give those layers
another rank or alpha, silently.

So a key is never handed over as written. :func:`to_re2` parses it with Python's own parser
(which never backtracks; the key's length is bounded) and writes the tree out in a subset of
RE2's syntax that RE2 reads only one way: every literal that is not an ASCII letter or digit as
``\\x{...}``, sets as explicit members and ranges, every repeat as ``{m,n}``, every group
non-capturing, flags as scoped groups, Python's ``\\Z`` (end of the text) as RE2's ``\\z``.
What Python computes and RE2 cannot (lookarounds, backreferences, conditionals, atomic groups,
possessive repeats) raises :class:`Untranslatable`, which the caller turns into an error naming
the key.

The differences left are documented in :mod:`lorahot.io.patterns`: ``\\d``, ``\\w``, ``\\s`` and
``\\b`` are ASCII-only in RE2, and case folding beyond ASCII may differ (module names are ASCII).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

try:  # Python 3.11+ (private modules: an unknown opcode is refused, never guessed at)
    _c: Any = importlib.import_module("re._constants")
    _p: Any = importlib.import_module("re._parser")
except ImportError:  # Python 3.10
    _c = importlib.import_module("sre_constants")
    _p = importlib.import_module("sre_parse")

__all__ = ["Untranslatable", "to_re2"]


class Untranslatable(ValueError):
    """The key uses Python-only syntax (the message says which), or does not parse on its own."""


#: Python's flags that change what a pattern matches, and RE2's letters for them
_FLAGS = ((_c.SRE_FLAG_IGNORECASE, "i"), (_c.SRE_FLAG_MULTILINE, "m"), (_c.SRE_FLAG_DOTALL, "s"))

_CATEGORIES = {
    _c.CATEGORY_DIGIT: r"\d",
    _c.CATEGORY_NOT_DIGIT: r"\D",
    _c.CATEGORY_SPACE: r"\s",
    _c.CATEGORY_NOT_SPACE: r"\S",
    _c.CATEGORY_WORD: r"\w",
    _c.CATEGORY_NOT_WORD: r"\W",
}

_AT = {
    _c.AT_BEGINNING: "^",
    _c.AT_BEGINNING_STRING: r"\A",
    _c.AT_END: "$",
    _c.AT_BOUNDARY: r"\b",
    _c.AT_NON_BOUNDARY: r"\B",
}

#: Python-only constructs, by opcode name (names, not objects: some exist only in newer Pythons)
_REFUSED = {
    "ASSERT": "a lookahead or lookbehind",
    "ASSERT_NOT": "a negative lookahead or lookbehind",
    "GROUPREF": "a backreference",
    "GROUPREF_EXISTS": "a conditional group",
    "ATOMIC_GROUP": "an atomic group",
    "POSSESSIVE_REPEAT": "a possessive repeat",
}


#: What ``\\Z`` becomes where the text RE2 reads is the name less its final newline: it holds
#: nowhere, as the name's true end lies past that newline (an empty set, which matches nothing)
_NOWHERE = r"[^\x00-\x{10ffff}]"


def to_re2(key: str, newline_cut: bool = False) -> bytes:
    """``key`` as Python's ``re`` reads it, in RE2 syntax (UTF-8).

    Args:
        key: the Python regex.
        newline_cut: the program reads a name whose final newline was cut off (to stand for
            Python's ``$`` before it), so ``\\Z``, the end of the whole name, holds nowhere.

    Raises:
        Untranslatable: the key does not parse on its own, or uses a Python-only construct.
    """
    try:
        with warnings.catch_warnings():  # "possible nested set": Python's reading is the one kept
            warnings.simplefilter("ignore")
            tree = _p.parse(key)
    except (_c.error, OverflowError, RecursionError, ValueError) as exc:
        raise Untranslatable(f"does not parse as a regex on its own ({exc})") from None
    body = _sequence(tree, _NOWHERE if newline_cut else r"\z")
    flags = _letters(tree.state.flags)
    return (f"(?{flags}:{body})" if flags else body).encode("utf-8")


def _letters(flags: int) -> str:
    return "".join(letter for bit, letter in _FLAGS if flags & bit)


def _sequence(items: Any, end: str) -> str:
    """``items`` in RE2 syntax; ``end``: what Python's ``\\Z`` is written as."""
    return "".join(_item(op, av, end) for op, av in items)


def _item(op: Any, av: Any, end: str) -> str:
    name = str(op)
    if name in _REFUSED:
        raise Untranslatable(f"uses {_REFUSED[name]}, which RE2 cannot evaluate in linear time")
    if op is _c.LITERAL:
        return _literal(av)
    if op is _c.NOT_LITERAL:
        return f"[^{_literal(av)}]"
    if op is _c.ANY:
        return "."
    if op is _c.IN:
        return _set(av)
    if op is _c.BRANCH:
        return "(?:" + "|".join(_sequence(branch, end) for branch in av[1]) + ")"
    if op is _c.SUBPATTERN:
        _group, add, remove, sub = av
        on, off = _letters(add), _letters(remove)
        flags = on + (f"-{off}" if off else "")
        return f"(?{flags}:{_sequence(sub, end)})"
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
        low, high, sub = av
        count = f"{{{low},}}" if high == _c.MAXREPEAT else f"{{{low},{high}}}"
        return f"(?:{_sequence(sub, end)}){count}" + ("?" if op is _c.MIN_REPEAT else "")
    if op is _c.AT:
        if av is _c.AT_END_STRING:
            return end
        if av not in _AT:
            raise Untranslatable(f"uses the anchor {av}, which lorahot does not translate for RE2")
        return _AT[av]
    raise Untranslatable(f"uses {name}, which lorahot does not translate for RE2")


def _set(items: Any) -> str:
    out = []
    for op, av in items:
        if op is _c.NEGATE:
            out.append("^")
        elif op is _c.LITERAL:
            out.append(_literal(av))
        elif op is _c.RANGE:
            out.append(f"{_literal(av[0])}-{_literal(av[1])}")
        elif op is _c.CATEGORY and av in _CATEGORIES:
            out.append(_CATEGORIES[av])
        else:
            raise Untranslatable(f"uses {op} {av} in a set, which lorahot does not translate for RE2")
    return "[" + "".join(out) + "]"


def _literal(code: int) -> str:
    char = chr(code)
    return char if char.isascii() and char.isalnum() else f"\\x{{{code:x}}}"
