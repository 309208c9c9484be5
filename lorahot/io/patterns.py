"""PEFT's ``rank_pattern`` / ``alpha_pattern`` matching, in time linear in the input whatever the pattern.

The patterns are regexes written by whoever made the file. Python's ``re`` backtracks: a key
such as ``((a|.)*)*#`` stalls a load for minutes, ``a{99999999999}`` raises ``OverflowError``
and deep nesting ``RecursionError``. lorahot therefore never hands them to ``re``. It evaluates
them with RE2 (the ``google-re2`` package, imported only when a config has patterns), which
runs in time linear in the text, bounds each compiled program's memory, and refuses the
constructs that need backtracking (lookarounds, backreferences). A pattern RE2 cannot take, or
one over :data:`MAX_PATTERN_BYTES`, is an :class:`~lorahot.errors.AdapterReadError` naming the
file, the field and the pattern; so is a field with more than :data:`MAX_PATTERNS` entries, and
a key that is no valid Python regex (PEFT could not load it: ``re.compile`` is used only for
this check, which on a pattern of bounded size is quick; only matching backtracks).

Semantics are PEFT's: a module name takes the first key (in the file's order) for which
``re.match(rf"(.*\\.)?({key})$", name)`` holds, i.e. the key fully matches the name or the part
after one of its dots. Each field's keys go into RE2 sets, which report every key matching a
text in one pass: the key from the start of the name, and ``\\.(key)`` from each dot on (so
``^`` and ``\\b`` see the dot, as in Python; only dots before a newline count, as ``.*`` stops
there). Python's ``$`` also holds before a final newline, so a name ending in one is matched
again without it (where a key's ``\\Z``, the end of the whole name, holds nowhere). The smallest
reported index wins. A compiled set answers exactly: RE2 compiles a set only when its DFA has
the memory to run, and a set's DFA never gives up on a slow search. A key reaches RE2 as Python
parses it, written out in RE2's syntax (:func:`lorahot.io.re2_syntax.to_re2`): text both
dialects accept but read differently (``[[:digit:]]``, ``a{,3}``) keeps Python's reading. What
remains different from ``re``: ``\\d``, ``\\w``, ``\\s`` and ``\\b`` are ASCII-only in RE2
(module names are ASCII), and ``re``-only syntax (lookarounds, backreferences, conditionals,
atomic groups, possessive quantifiers) is refused rather than guessed at. ``\\Z`` is RE2's
``\\z``.

Cost: compiling is linear in the keys' size; matching one name costs one pass per dot in it,
each linear in the name (names are at most :data:`~lorahot.io.safety.MAX_KEY_CHARS` long).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lorahot.errors import AdapterReadError, shown
from lorahot.io.re2_syntax import Untranslatable, to_re2
from lorahot.io.safety import cut

__all__ = ["MAX_PATTERN_BYTES", "MAX_PATTERNS", "MAX_PATTERN_TOTAL_BYTES", "FullMatch", "PatternSet", "budget_problem"]

MAX_PATTERN_BYTES = 1000  # a PEFT key is a module path, tens of characters
MAX_PATTERNS = 4096  # diffusers writes one key per module whose rank differs: ~1,000 at most
MAX_PATTERN_TOTAL_BYTES = 256 << 10  # all keys of an adapter's configs together
_PATTERN_MEM = 256 << 10  # RE2 max_mem of one pattern alone: ~10,000 instructions


def _set_mem(nbytes: int) -> int:
    """RE2 max_mem for a set of keys totalling ``nbytes``: module paths need ~50 bytes of program
    and DFA per key byte; hostile keys that need more are refused as too large."""
    return _PATTERN_MEM + 128 * nbytes


def budget_problem(configs: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the pattern keys of all ``configs`` (one adapter's) are too many to evaluate, or None.

    RE2's memory grows with the keys' size, so the limits hold for an adapter as a whole, not
    per field: diffusers' metadata can hold one config per pipeline component.
    """
    keys = [k for c in configs for f in _FIELDS if isinstance(c.get(f), Mapping) for k in c[f]]
    nbytes = sum(len(k.encode("utf-8", "surrogatepass")) for k in keys if isinstance(k, str))
    if len(keys) > MAX_PATTERNS or nbytes > MAX_PATTERN_TOTAL_BYTES:
        return (
            f"its configs hold {len(keys)} rank_pattern/alpha_pattern keys of {nbytes} bytes in all, more than the "
            f"{MAX_PATTERNS} keys or {MAX_PATTERN_TOTAL_BYTES} bytes lorahot evaluates"
        )
    return None


_FIELDS = ("rank_pattern", "alpha_pattern")


class PatternSet:
    """The keys of one ``*_pattern`` field, compiled into RE2 sets.

    Build it with :meth:`compile`; :meth:`first` is PEFT's ``get_pattern_key``.
    """

    def __init__(self, sets: tuple[Any, Any], keys: list[str]) -> None:
        # (key)\n? from the start, \.(key)\n? from a dot on (^ and \b see the dot, as in Python)
        self._sets = sets
        self._exact: tuple[Any, Any] | None = None  # both without \n? (and \Z), for names ending in one
        self.keys = keys

    @classmethod
    def compile(cls, keys: Sequence[Any], field: str, problems: list[str]) -> PatternSet | None:
        """The sets of ``keys``, or None with the reasons appended to ``problems``."""
        if not keys:
            return None
        if len(keys) > MAX_PATTERNS:
            problems.append(f"{field} has {len(keys)} entries, more than the {MAX_PATTERNS} lorahot evaluates")
            return None
        bad = [f"{field} key {shown(k)} {why}" for k in keys if (why := _problem(k)) is not None]
        sets = None
        if not bad:
            programs = [to_re2(k) for k in keys]
            sets = _sets([_wrapped(p, newline=True) for p in programs])
            if sets is None:
                bad = _too_large(keys, programs, field)
        problems.extend(bad)
        return None if bad or sets is None else cls(sets, list(keys))

    def first(self, name: str) -> str | None:
        """The first key matching ``name`` as PEFT matches it, or None."""
        text = name.encode("utf-8", "surrogatepass")
        hits = _hits(text, *self._sets)
        if text.endswith(b"\n"):  # Python's $ inside a key also holds before a final newline
            hits |= _hits(text[:-1], *self._exact_sets())
        return self.keys[min(hits)] if hits else None

    def _exact_sets(self) -> tuple[Any, Any]:
        if self._exact is None:
            exact = _sets([_wrapped(to_re2(k, newline_cut=True), newline=False) for k in self.keys])
            if exact is None:  # cannot be: these programs are smaller than the ones that compiled
                raise AdapterReadError(f"rank/alpha pattern keys {shown(self.keys)} stopped compiling in RE2.")
            self._exact = exact
        return self._exact


class FullMatch:
    """One regex of a file matched as ``re.fullmatch`` matches it (PEFT's ``target_modules`` and
    ``exclude_modules`` strings), on RE2: linear time whatever the pattern.

    Build it with :meth:`compile`; :meth:`matches` is ``re.fullmatch(key, name) is not None``.
    """

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    @classmethod
    def compile(cls, key: str, field: str, problems: list[str]) -> FullMatch | None:
        """The matcher of ``key``, or None with the reason appended to ``problems``."""
        why = _problem(key)
        sets = _sets([_wrapped(to_re2(key), newline=False)]) if why is None else None
        if sets is None:
            problems.append(f"{field} {shown(key)} {why or 'compiles to too large a program for RE2'}")
            return None
        return cls(sets[0])

    def matches(self, name: str) -> bool:
        """Whether ``key`` matches the whole of ``name``."""
        return bool(self._matcher.Match(name.encode("utf-8", "surrogatepass")))


def _hits(text: bytes, at_start: Any, after_dot: Any) -> set[int]:
    """Indices of the keys matching ``text`` whole, or after one of its dots (before a newline)."""
    newline = text.find(b"\n")
    limit = len(text) if newline < 0 else newline  # PEFT's (.*\.) cannot cross a newline
    hits = set(at_start.Match(text) or ())
    dot = text.find(b".", 0, limit)
    while dot >= 0:
        hits.update(after_dot.Match(text[dot:]) or ())
        dot = text.find(b".", dot + 1, limit)
    return hits


def _problem(key: Any) -> str | None:
    """Why ``key`` is no pattern lorahot evaluates, or None."""
    if not isinstance(key, str):
        return f"must be a string, got {type(key).__name__}"
    try:
        raw = key.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 text"
    if len(raw) > MAX_PATTERN_BYTES:
        return f"is {len(raw)} bytes long, more than the {MAX_PATTERN_BYTES} lorahot evaluates"
    try:  # PEFT compiles it with re: what re refuses is no valid key (compiling never backtracks)
        re.compile(_PEFT_PREFIX + key + _PEFT_SUFFIX)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        return f"is not a valid regex (Python: {cut(_python_error(exc, key), 120)})"
    try:  # on its own: 'a)|(b' would change the wrapper's structure
        program = to_re2(key)
    except Untranslatable as exc:
        return str(exc)
    re2 = _re2()
    alone = re2.Set.FullMatchSet(_options(re2, _PATTERN_MEM))
    try:
        alone.Add(program)
        alone.Add(_wrapped(program, newline=True)[1])
        return None
    except re2.error:
        return f"is not a regex lorahot can evaluate in linear time (RE2: {_reason(re2, program)})"


#: PEFT's wrapper around a rank or alpha pattern key: ``(.*\.)?({key})$``
_PEFT_PREFIX, _PEFT_SUFFIX = r"(.*\.)?(", ")$"


def _python_error(exc: Exception, key: str) -> str:
    """Python's complaint about PEFT's wrapped ``key``, its position counted in the key itself
    (re counts it in the wrapper, eight characters further on)."""
    if not isinstance(exc, re.error) or exc.pos is None:
        return str(exc)
    at = exc.pos - len(_PEFT_PREFIX)
    where = f"at position {at} of the key" if 0 <= at <= len(key) else f"in PEFT's {_PEFT_PREFIX}key{_PEFT_SUFFIX}"
    return f"{exc.msg} {where}"


def _wrapped(raw: bytes, newline: bool) -> tuple[bytes, bytes]:
    """PEFT's ``({key})$`` from the start and after a dot (``$`` allowing a final newline or not)."""
    end = b"\n?" if newline else b""
    return b"(?:" + raw + b")" + end, b"\\.(?:" + raw + b")" + end


def _sets(wrapped: list[tuple[bytes, bytes]]) -> tuple[Any, Any] | None:
    """The two compiled sets (from the start, after a dot), or None if RE2 lacks the memory."""
    re2 = _re2()
    mem = _set_mem(sum(len(w[0]) for w in wrapped))
    sets = (re2.Set.FullMatchSet(_options(re2, mem)), re2.Set.FullMatchSet(_options(re2, mem)))
    try:
        for start, dot in wrapped:
            sets[0].Add(start)
            sets[1].Add(dot)
        for matcher in sets:
            matcher.Compile()
    except re2.error:
        return None
    return sets


def _reason(re2: Any, raw: bytes) -> str:
    """RE2's own words for why ``raw`` does not compile (only called on failure: nothing is cached)."""
    try:
        re2.compile(raw, _options(re2, _PATTERN_MEM))
    except re2.error as exc:
        msg = exc.args[0] if exc.args else exc
        return msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)
    return "unbalanced parentheses or pattern too large"


def _too_large(keys: Sequence[str], programs: Sequence[bytes], field: str) -> list[str]:
    """The keys whose program alone is too large for RE2; else the whole field is."""
    bad = [
        f"{field} key {shown(k)} compiles to too large a program for RE2"
        for k, p in zip(keys, programs)
        if _sets([_wrapped(p, newline=True)]) is None
    ]
    return bad or [f"{field}: its {len(keys)} keys together compile to too large a program for RE2"]


def _options(re2: Any, max_mem: int) -> Any:
    options = re2.Options()
    options.max_mem = max_mem
    options.log_errors = False  # RE2 would print every refused pattern on stderr
    return options


def _re2() -> Any:
    try:
        import re2  # type: ignore[import-untyped]
    except ImportError:
        raise AdapterReadError(
            "the adapter config has rank_pattern/alpha_pattern entries, which lorahot evaluates with RE2, but the "
            "google-re2 package is not installed. pip install google-re2 (a lorahot dependency)."
        ) from None
    return re2
