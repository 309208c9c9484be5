"""The adapter config fields lorahot honours, with PEFT's meaning, and the ones it refuses.

``r`` and ``lora_alpha`` are the defaults; ``rank_pattern`` and ``alpha_pattern`` override
them per module, each key a regex matched as PEFT matches it: a module whose name ends with
``.<pattern>`` (or equals it) takes the first matching entry. The patterns come from files, so
they are evaluated in linear time (:mod:`lorahot.io.patterns`). ``use_rslora`` divides by
``sqrt(r)`` instead of ``r``; ``use_dora`` and ``lora_bias`` need no handling (the tensors
carry the magnitude vectors and biases). Fields that switch on features lorahot does not load (
``modules_to_save``, ``target_parameters``, trainable tokens, ...) are listed in
:data:`UNSUPPORTED` and named when refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lorahot.errors import AdapterReadError, shown
from lorahot.io.patterns import PatternSet

__all__ = ["AdapterConfig", "CONFIG_NAME", "UNSUPPORTED", "REWRITING_INITS", "PEFT_DEFAULT_ALPHA", "finite"]

#: The file PEFT writes beside the weights.
CONFIG_NAME = "adapter_config.json"

_MAX_RANK = 1 << 16  # no real adapter comes close; larger values are treated as corrupt

#: PEFT config fields that switch on what lorahot does not load: field -> why. A field counts
#: as set unless it is absent, null, false, empty or "none".
UNSUPPORTED: dict[str, str] = {
    "target_parameters": "LoRA on parameters such as MoE experts (PEFT's ParamWrapper) is not supported; its A and "
    "B hold every expert's rank",
    "modules_to_save": "full copies of these modules are saved beside the LoRA weights, and lorahot loads only "
    "LoRA weights",
    "trainable_token_indices": "trainable tokens (new embedding rows saved beside the LoRA weights) are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA, applied only after its invocation tokens) is not supported",
    "layer_replication": "layer replication changes the model's layer stack; not supported",
    "use_qalora": "QA-LoRA (which pools the layer input) is not supported",
    "bias": "biases of the base model were trained and saved beside the LoRA weights; not supported",
    "kasa_config": "KaSA (a singular-value diagonal between B and A, over a truncated base weight) is not supported",
    "use_bdlora": "BD-LoRA (block-diagonal A or B, saved in their blocks) is not supported",
    "arrow_config": "Arrow (a per-token router over several adapters) is not supported",
}

#: ``init_lora_weights`` values with which PEFT rewrites the base weights when it loads the
#: adapter (PiSSA, OLoRA, CorDA: the base minus the adapter's initial product; LoftQ: a
#: quantized residual), so B @ A alone over the original base is not what PEFT computes
REWRITING_INITS = ("pissa", "olora", "corda", "loftq")

#: PEFT's ``LoraConfig.lora_alpha`` default, which a config without the field takes
PEFT_DEFAULT_ALPHA = 8.0


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``adapter_config.json`` that decide ranks and scales.

    Attributes:
        r: default rank (None when the config does not say; the tensors decide then).
        lora_alpha: default alpha: PEFT's default (8) for a config without the field, None with
            no config at all (alpha then equals the module's rank, so scale 1).
        rank_pattern: regex -> rank overrides.
        alpha_pattern: regex -> alpha overrides.
        use_rslora: scale by ``alpha / sqrt(r)``.
        use_dora: the magnitude vectors in the file decide which modules are DoRA; a module
            without one is refused (PEFT would run it as DoRA with the base's own norms).
        fan_in_fan_out: recorded only. PEFT saves A ``[r, in]`` and B ``[out, r]`` whatever
            the base layout; lorahot's linear layer reads a ``Conv1D`` base the right way itself.
        target_modules: the module names (or a regex) the adapter was trained on; used in
            messages only, never matched.
        unsupported: ``"field=value; why"`` for each set :data:`UNSUPPORTED` field.
        alpha_stated: whether the config names ``lora_alpha`` itself (else the default applies).
        origin: where the fields came from, for messages (``adapter_config.json``, the
            safetensors header's metadata, ``config=``); empty where not known.
    """

    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    target_modules: tuple[str, ...] | str | None = None
    unsupported: tuple[str, ...] = ()
    alpha_stated: bool = False
    origin: str = field(default="", compare=False)
    _rank_set: PatternSet | None = field(default=None, compare=False, repr=False)
    _alpha_set: PatternSet | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:  # built directly rather than by parse(): compile the patterns here
        if self.rank_pattern and self._rank_set is None:
            object.__setattr__(self, "_rank_set", _compiled(self.rank_pattern, "rank_pattern"))
        if self.alpha_pattern and self._alpha_set is None:
            object.__setattr__(self, "_alpha_set", _compiled(self.alpha_pattern, "alpha_pattern"))

    @classmethod
    def from_dict(
        cls, raw: Mapping[str, Any] | None, source: str = "<config>", fix: str = "Fix adapter_config.json."
    ) -> AdapterConfig:
        """Parses and checks a config dict; absurd values raise :class:`AdapterReadError`.

        Args:
            raw: the config fields.
            source: where they came from (the config file), for the message.
            fix: the message's last sentence.
        """
        config, problems = cls.parse(raw)
        if problems:
            raise AdapterReadError(f"{source}: invalid adapter config: " + "; ".join(problems) + f". {fix}")
        return config

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> tuple[AdapterConfig, list[str]]:
        """The config and every problem with it (empty when it is valid)."""
        if not raw:
            return cls(), []
        problems: list[str] = []
        r = _opt_int(raw.get("r"), "r", problems)
        alpha = _opt_alpha(raw.get("lora_alpha"), "lora_alpha", problems)
        if "lora_alpha" not in raw:  # as PEFT reads a config without it
            alpha = PEFT_DEFAULT_ALPHA
        elif raw["lora_alpha"] is None:
            problems.append("lora_alpha is null (PEFT cannot scale with it either); set it to the adapter's alpha")
        rank_pattern, rank_set = _pattern(raw.get("rank_pattern"), "rank_pattern", _opt_int, problems)
        alpha_pattern, alpha_set = _pattern(raw.get("alpha_pattern"), "alpha_pattern", _opt_alpha, problems)
        flags = {k: raw.get(k, False) for k in ("use_rslora", "use_dora", "fan_in_fan_out")}
        for k, v in flags.items():
            if not isinstance(v, bool):
                problems.append(f"{k} must be true or false, got {shown(v)}")
                flags[k] = False
        targets = _targets(raw.get("target_modules"), problems)
        unsupported = tuple(f"{k}={_json(raw[k])}; {why}" for k, why in UNSUPPORTED.items() if _set(raw.get(k)))
        init = raw.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(REWRITING_INITS):
            unsupported += (
                f"init_lora_weights={_json(init)}; PEFT rewrites the base weights with this initialization when it "
                "loads the adapter, which lorahot does not (PEFT converts such an adapter to plain LoRA with "
                "save_pretrained(..., path_initial_model_for_weight_conversion=...))",
            )
        config = cls(
            r, alpha, rank_pattern, alpha_pattern, **flags, target_modules=targets, unsupported=unsupported,
            alpha_stated="lora_alpha" in raw, _rank_set=rank_set, _alpha_set=alpha_set,
        )  # fmt: skip
        return config, problems

    def rank_for(self, module: str) -> int | None:
        """The rank the config declares for ``module``, or None if it declares none."""
        key = self._rank_set.first(module) if self._rank_set is not None else None
        return self.rank_pattern[key] if key is not None else self.r

    def states_alpha(self, module: str) -> bool:
        """Whether the config itself gives ``module``'s alpha (``lora_alpha`` or a pattern)."""
        return self.alpha_stated or (self._alpha_set is not None and self._alpha_set.first(module) is not None)

    def alpha_for(self, module: str) -> float | None:
        """The alpha the config declares for ``module``, or None if it declares none."""
        key = self._alpha_set.first(module) if self._alpha_set is not None else None
        return self.alpha_pattern[key] if key is not None else self.lora_alpha


def _json(v: Any) -> str:
    """``v`` as the config file spells it, cut short."""
    try:
        text = json.dumps(v)
    except Exception:  # not JSON (a caller's dict), or an object whose own methods raise
        text = shown(v, 60)
    return text if len(text) <= 60 else text[:57] + "..."


def _set(v: Any) -> bool:
    """Whether a config value switches its feature on (PEFT's defaults are None, False, [] or "none")."""
    return not (v is None or v is False or (isinstance(v, (str, list, dict)) and v in ("none", "", [], {})))


def _targets(v: Any, problems: list[str]) -> tuple[str, ...] | str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return tuple(v)
    problems.append(f"target_modules must be a string or a list of strings, got {shown(v)}")
    return None


def _compiled(patterns: dict[str, Any], name: str) -> PatternSet | None:
    problems: list[str] = []
    matcher = PatternSet.compile(list(patterns), name, problems)
    if problems:
        raise AdapterReadError("<config>: invalid adapter config: " + "; ".join(problems) + ".")
    return matcher


def _opt_int(v: Any, name: str, problems: list[str]) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= _MAX_RANK:
        problems.append(f"{name} must be an integer in 1..{_MAX_RANK}, got {shown(v)}")
        return None
    return v


def _opt_alpha(v: Any, name: str, problems: list[str]) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not _finite_positive(v):
        problems.append(f"{name} must be a finite number > 0, got {shown(v)}")
        return None
    try:
        return float(v)
    except Exception:  # a number type of the caller's (config=) whose __float__ raises anything
        problems.append(f"{name} must be a finite number > 0, got {shown(v)}, which cannot be read as a float")
        return None


def finite(v: int | float) -> bool:
    """Whether the real number ``v`` is a finite float (an int beyond float range is not)."""
    try:
        return math.isfinite(v)  # an int beyond float range raises OverflowError
    except OverflowError:
        return False


def _finite_positive(v: int | float) -> bool:
    return finite(v) and v > 0


def _pattern(
    v: Any, name: str, parse: Callable[[Any, str, list[str]], Any], problems: list[str]
) -> tuple[dict[str, Any], PatternSet | None]:
    """The ``{regex: value}`` field ``name`` with its compiled matcher; keys and values checked."""
    if v is None:
        return {}, None
    if not isinstance(v, Mapping):
        problems.append(f"{name} must be an object, got {type(v).__name__}")
        return {}, None
    out: dict[str, Any] = {}
    for k, x in v.items():
        parsed = parse(x, f"{name}[{shown(k, 60)}]", problems)
        if parsed is not None:
            out[k] = parsed
    before = len(problems)
    matcher = PatternSet.compile(list(out), name, problems)
    if len(problems) > before:
        problems[-1] += " (write each key as a module name or an RE2-compatible regex)"
        return {}, None
    return out, matcher
