"""Which modules a PEFT config builds a LoRA layer for: ``target_modules``, ``exclude_modules``,
``layers_to_transform`` and ``layers_pattern``, with PEFT's meaning.

``PeftModel.from_pretrained`` builds a LoRA layer on each module of the model its config selects
(``peft.tuners.tuners_utils.check_target_module_exists``) and then loads the file's weights into
those layers: the weights of a module the config leaves out are dropped, with a warning at most,
and that module computes the base model's output. lorahot places every module of the file, so the
loader refuses a module :meth:`ModuleSelection.leaves_out` names instead of computing what PEFT
does not (a file PEFT saved selects all of its own modules; one whose config was edited, or whose
weights were merged from several, may not).

PEFT's rules, for a module path ``name`` (the model's, without PEFT's ``base_model.model.``):

- ``exclude_modules`` (a regex, full match; or names: ``name`` equal to one or ending with
  ``.<it>``) leaves the module out;
- ``target_modules`` as a string is a regex that must match ``name`` whole (``"all-linear"``:
  every linear layer, taken here as every module); as names, ``name`` must equal one or end
  with ``.<it>``; in the second case only, ``layers_to_transform`` (an index or a list) keeps the
  module where its layer index is one of them: the number after the first ``<layers_pattern>.``
  (at the start of ``name`` or after a dot), or without ``layers_pattern`` the first number
  that is a whole level after the second level.

With ``ensure_weight_tying``, PEFT also builds a layer on each module whose weight the model ties
to a selected one's (``lm_head`` to ``embed_tokens``), which only the model knows: such a config
selects every module here.

The regexes come from a file: a ``target_modules`` / ``exclude_modules`` regex runs on RE2 in
linear time (:class:`lorahot.io.patterns.FullMatch`; one RE2 cannot run, such as a lookaround,
is not checked: :func:`_runnable`); a ``layers_pattern`` must be a plain
module name (letters, digits, ``_`` and dots), as PEFT's own are (``layers``, ``h``, ``blocks``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lorahot.errors import cut, shown
from lorahot.io.patterns import FullMatch

__all__ = ["SELECTION_FIELDS", "ModuleSelection"]

#: The config fields that choose the modules PEFT builds a layer for.
SELECTION_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")

#: PEFT's shorthand for every linear layer but the output layer
_ALL_LINEAR = "all-linear"
#: a layers_pattern lorahot evaluates: a module name, no regex syntax but PEFT's dots
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_MAX_PATTERN = 200


@dataclass(frozen=True)
class ModuleSelection:
    """The modules a PEFT config selects (see the module docstring).

    Attributes:
        targets: ``target_modules``: names, a regex, or None (every module: PEFT then takes its
            defaults for the model's type, which the file's modules are).
        exclude: ``exclude_modules``: names, a regex, or None.
        layers: ``layers_to_transform`` as a tuple, or None.
        layers_pattern: ``layers_pattern`` as a tuple (empty: PEFT's default index).
    """

    targets: tuple[str, ...] | str | None = None
    exclude: tuple[str, ...] | str | None = None
    layers: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] = ()
    _target_re: FullMatch | None = field(default=None, compare=False, repr=False)
    _exclude_re: FullMatch | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, raw: dict[str, Any], problems: list[str]) -> ModuleSelection | None:
        """The selection of config fields ``raw``, None where they select every module; each
        value PEFT refuses (or lorahot cannot evaluate) appended to ``problems``."""
        before = len(problems)
        targets = _names_or_regex(raw.get("target_modules"), "target_modules", problems)
        exclude = _names_or_regex(raw.get("exclude_modules"), "exclude_modules", problems)
        layers = _layers(raw.get("layers_to_transform"), problems)
        pattern = _layers_pattern(raw.get("layers_pattern"), problems)
        # PEFT >= 0.14's LoraConfig refuses layers_pattern without layers_to_transform, and either beside a
        # str target_modules; earlier versions saved such configs, and its selection reads neither field
        # there (check_target_module_exists): the modules are the same with the fields ignored, as here
        if isinstance(targets, str) and targets.lower() == _ALL_LINEAR:
            targets = None
        target_re = _runnable(targets, "target_modules", problems)
        exclude_re = _runnable(exclude, "exclude_modules", problems)
        if len(problems) > before:
            return None
        if isinstance(targets, str) and target_re is None:
            targets = None  # a regex RE2 cannot run (a lookaround): the file's modules, as PEFT saved them
        if isinstance(exclude, str) and exclude_re is None:
            exclude = None
        if (targets is None and not exclude) or raw.get("ensure_weight_tying"):
            return None  # with ensure_weight_tying, PEFT adds the modules the model ties to targeted ones
        return cls(targets, exclude, layers, pattern, target_re, exclude_re)

    def leaves_out(self, name: str) -> str | None:
        """Why PEFT builds no LoRA layer on module ``name``, or None where it builds one."""
        if self._exclude_re is not None and self._exclude_re.matches(name):
            return f"exclude_modules {shown(self.exclude, 80)} matches it"
        if isinstance(self.exclude, tuple) and _listed(name, self.exclude):
            return f"exclude_modules {shown(list(self.exclude), 80)} lists it"
        if self._target_re is not None and not self._target_re.matches(name):
            return f"target_modules {shown(self.targets, 80)} does not match it"
        if self._target_re is not None:
            return None
        if not isinstance(self.targets, tuple) or name in self.targets:
            return None
        if not _listed(name, self.targets):
            return f"target_modules {shown(list(self.targets), 80)} does not name it"
        if self.layers is None:
            return None
        index = self._layer_index(name)
        if index is None:
            return f"layers_to_transform is set and its layer index cannot be read from the name{self._pattern_text()}"
        if index not in self.layers:
            return f"its layer index {index} is not in layers_to_transform {list(self.layers)}"
        return None

    def _layer_index(self, name: str) -> int | None:
        """The index PEFT reads from ``name``: the first after a ``layers_pattern``, else after
        the second level (lazy matches, as PEFT's: the layer's, not an expert's)."""
        patterns = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in self.layers_pattern] or [r".*?\.[^.]*\.(?P<idx>\d+)\."]
        for pattern in patterns:
            found = re.match(pattern, name)
            if found is not None:
                return int(found.group("idx"))
        return None

    def _pattern_text(self) -> str:
        return f" (layers_pattern {shown(list(self.layers_pattern), 80)})" if self.layers_pattern else ""


def _runnable(v: tuple[str, ...] | str | None, what: str, problems: list[str]) -> FullMatch | None:
    """The matcher of a regex field ``v``; None for names, None, or a regex RE2 cannot run. A
    string Python's ``re`` cannot compile, as PEFT's ``re.fullmatch`` would raise on, is
    appended to ``problems``.

    PEFT's own configs carry lookarounds (``^(?!.*vision).*q_proj``, to leave a vision tower
    out), which RE2 does not run and Python's engine would run in exponential time on a hostile
    one. Such a field is not checked: every module of the file is taken, as lorahot took them
    all before these fields were read, which is what PEFT does with the file it saved (its
    modules are the ones its config selected); only a config edited to disagree with its file
    goes unnoticed there."""
    if not isinstance(v, str):
        return None
    try:  # compiling never backtracks
        re.compile(v)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        problems.append(f"{what} {shown(v, 80)} is not a valid regex (Python: {cut(str(exc), 120)})")
        return None
    return FullMatch.compile(v, what, [])


def _listed(name: str, names: Sequence[str]) -> bool:
    """PEFT's test of a name list: ``name`` is one of them, or ends with ``.<one>``."""
    return name in names or any(name.endswith(f".{n}") for n in names)


def _names_or_regex(v: Any, what: str, problems: list[str]) -> tuple[str, ...] | str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return tuple(v)
    if what != "target_modules":  # target_modules' type is checked with the config's other fields
        problems.append(f"{what} must be a string or a list of strings, got {shown(v, 80)}")
    return None


def _layers(v: Any, problems: list[str]) -> tuple[int, ...] | None:
    if v is None or (isinstance(v, list) and not v):  # PEFT: an empty list selects by no index
        return None
    items = v if isinstance(v, list) else [v]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        problems.append(f"layers_to_transform must be an integer or a list of integers, got {shown(v, 80)}")
        return None
    return tuple(items)


def _layers_pattern(v: Any, problems: list[str]) -> tuple[str, ...]:
    if v is None or v == "" or v == []:  # PEFT: an empty pattern reads the default index
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(
        isinstance(p, str) and len(p) <= _MAX_PATTERN and _PLAIN_NAME.fullmatch(p) for p in items
    ):
        problems.append(
            f"layers_pattern must be a module name or a list of them (letters, digits, _ and dots), got {shown(v, 80)}"
        )
        return ()
    return tuple(items)
