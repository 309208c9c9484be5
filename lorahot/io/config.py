"""The adapter config fields lorahot honours, with PEFT's meaning.

``r`` and ``lora_alpha`` are the defaults; ``rank_pattern`` and ``alpha_pattern`` override
them per module, each key a regex matched as PEFT matches it: a module whose name ends with
``.<pattern>`` (or equals it) takes the first matching entry. ``use_rslora`` divides by
``sqrt(r)`` instead of ``r``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorahot.errors import AdapterReadError

__all__ = ["AdapterConfig", "CONFIG_NAME"]

#: The file PEFT writes beside the weights.
CONFIG_NAME = "adapter_config.json"

_MAX_RANK = 1 << 16  # no real adapter comes close; larger values are treated as corrupt


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``adapter_config.json`` that decide ranks and scales.

    Attributes:
        r: default rank (None when the config does not say; the tensors decide then).
        lora_alpha: default alpha (None: alpha equals the module's rank, so scale 1).
        rank_pattern: regex -> rank overrides.
        alpha_pattern: regex -> alpha overrides.
        use_rslora: scale by ``alpha / sqrt(r)``.
        use_dora: DoRA adapters are refused (not supported yet).
        fan_in_fan_out: recorded only. PEFT saves A ``[r, in]`` and B ``[out, r]`` whatever
            the base layout; lorahot's linear layer reads a ``Conv1D`` base the right way itself.
        target_modules: the module names (or a regex) the adapter was trained on; used in
            messages when modules do not map.
    """

    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str = "<config>") -> AdapterConfig:
        """Parses and checks a config dict; absurd values raise :class:`AdapterReadError`."""
        if not raw:
            return cls()
        problems: list[str] = []
        r = _opt_int(raw.get("r"), "r", problems)
        alpha = _opt_alpha(raw.get("lora_alpha"), "lora_alpha", problems)
        rank_pattern = _pattern(raw.get("rank_pattern"), "rank_pattern", _opt_int, problems)
        alpha_pattern = _pattern(raw.get("alpha_pattern"), "alpha_pattern", _opt_alpha, problems)
        flags = {k: raw.get(k, False) for k in ("use_rslora", "use_dora", "fan_in_fan_out")}
        for k, v in flags.items():
            if not isinstance(v, bool):
                problems.append(f"{k} must be true or false, got {v!r}")
        targets = _targets(raw.get("target_modules"), problems)
        if problems:
            raise AdapterReadError(
                f"{source}: invalid adapter config: " + "; ".join(problems) + ". Fix adapter_config.json."
            )
        return cls(r, alpha, rank_pattern, alpha_pattern, **flags, target_modules=targets)

    def rank_for(self, module: str) -> int | None:
        """The rank the config declares for ``module``, or None if it declares none."""
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module: str) -> float | None:
        """The alpha the config declares for ``module``, or None if it declares none."""
        key = _pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha


def _targets(v: Any, problems: list[str]) -> tuple[str, ...] | str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return tuple(v)
    problems.append(f"target_modules must be a string or a list of strings, got {v!r}")
    return None


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


def _opt_int(v: Any, name: str, problems: list[str]) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= _MAX_RANK:
        problems.append(f"{name} must be an integer in 1..{_MAX_RANK}, got {v!r}")
        return None
    return v


def _opt_alpha(v: Any, name: str, problems: list[str]) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        problems.append(f"{name} must be a finite number > 0, got {v!r}")
        return None
    return float(v)


def _pattern(v: Any, name: str, parse: Any, problems: list[str]) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        problems.append(f"{name} must be an object, got {type(v).__name__}")
        return {}
    out = {}
    for k, x in v.items():
        try:
            re.compile(k)
        except re.error as exc:
            problems.append(f"{name} key {k!r} is not a valid regex ({exc})")
            continue
        parsed = parse(x, f"{name}[{k!r}]", problems)
        if parsed is not None:
            out[k] = parsed
    return out
