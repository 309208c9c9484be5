"""The adapter config fields lorahot honours, with PEFT's meaning, and the ones it refuses.

``r`` and ``lora_alpha`` are the defaults; ``rank_pattern`` and ``alpha_pattern`` override
them per module, each key a regex matched as PEFT matches it: a module whose name ends with
``.<pattern>`` (or equals it) takes the first matching entry. The patterns come from files, so
they are evaluated in linear time (:mod:`lorahot.io.patterns`). ``use_rslora`` divides by
``sqrt(r)`` instead of ``r``; ``use_dora`` and ``lora_bias`` say which tensors the file must
carry (the loader checks that the magnitude vectors and biases agree with them).
``target_modules``, ``exclude_modules``, ``layers_to_transform`` and ``layers_pattern`` say which
modules PEFT builds a layer for (:mod:`lorahot.io.selection`): the loader refuses a module of a
PEFT file they leave out, whose weights PEFT drops.

Every other field is accounted for: :data:`INERT` lists the ones that do not change what a
saved adapter computes, :data:`UNSUPPORTED` the ones that switch on features lorahot does not
load (``modules_to_save``, ``target_parameters``, trainable tokens, ...), named when refused.
A field in neither list (a newer PEFT's, another tool's) is refused when set, as is a
``peft_type`` other than ``LORA`` and an ``init_lora_weights`` lorahot does not know: what
they change cannot be known, and a wrong output is worse than an error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lorahot.errors import AdapterReadError, shown
from lorahot.io.patterns import PatternSet
from lorahot.io.selection import ModuleSelection

__all__ = [
    "AdapterConfig",
    "CONFIG_NAME",
    "INERT",
    "KEPT_INITS",
    "LORA_TYPE",
    "PEFT_DEFAULT_ALPHA",
    "PEFT_DEFAULT_R",
    "READ",
    "REWRITING_INITS",
    "UNSUPPORTED",
    "finite",
]

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

#: ``init_lora_weights`` values (or prefixes) that rewrite the base weights the adapter is trained
#: over: PiSSA, OLoRA, CorDA, LoRA-GA and ASTRA (PEFT 0.22) subtract the adapter's initial product
#: from them, LoftQ replaces them with a quantized residual. B @ A over the original base is then not what was
#: trained; PEFT also redoes PiSSA, OLoRA and LoftQ on the base when it loads the adapter.
REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "astra")

#: ``init_lora_weights`` values that leave the base weights alone (only A and B start elsewhere):
#: PEFT's default (B zero), random A and B, Gaussian, EVA, orthogonal, MiCA and NoRA (PEFT 0.22: A's
#: columns normalized, B zero) initializations.
KEPT_INITS = (True, False, None, "gaussian", "eva", "orthogonal", "mica", "nora")

#: PEFT's ``peft_type`` of a LoRA adapter; a config naming another type (AdaLoRA, VeRA, LoHa,
#: X-LoRA, ...) describes another kind of adapter, whose fields mean other things.
LORA_TYPE = "LORA"

#: The fields :class:`AdapterConfig` reads or checks.
READ = (
    "peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias",
    "fan_in_fan_out", "target_modules", "init_lora_weights", "exclude_modules", "layers_to_transform", "layers_pattern",
)  # fmt: skip

#: PEFT ``LoraConfig`` fields (0.21 and 0.22) that do not change what a saved adapter computes at
#: inference: field -> why.
INERT: dict[str, str] = {
    "task_type": "the model class PEFT wraps (a task that adds modules sets modules_to_save)",
    "auto_mapping": "the base model's class, for PEFT's loader",
    "peft_version": "the PEFT version that saved the adapter",
    "base_model_name_or_path": "where the base model came from",
    "revision": "the base model's revision",
    "inference_mode": "whether PEFT's parameters were trainable",
    "lora_dropout": "training only: dropout is off at inference",
    "megatron_config": "Megatron's parallel layers compute the same B @ A",
    "megatron_core": "the module Megatron's layers come from",
    "loftq_config": "LoftQ's settings; init_lora_weights says whether LoftQ was used",
    "eva_config": "EVA's settings, an initialization of A",
    "corda_config": "CorDA's settings; init_lora_weights says whether CorDA was used",
    "lora_ga_config": "LoRA-GA's settings; init_lora_weights says whether LoRA-GA was used",
    "astra_config": "ASTRA's settings; init_lora_weights says whether ASTRA was used",
    "qalora_group_size": "QA-LoRA's pooling size; use_qalora says whether QA-LoRA is on",
    "runtime_config": "how PEFT places weights while it loads (ephemeral GPU offload)",
    "ensure_weight_tying": "tied layers' adapters are saved under each layer's name",
    "velora_config": "VeLoRA compresses the input only in training; at inference it is plain LoRA",
    "monteclora_config": "MonteCLoRA samples A only in training; at inference it is plain LoRA",
    "merge_weights": "early PEFT's merge-on-eval switch; the saved A and B are the same",
}

#: PEFT's ``LoraConfig.lora_alpha`` default, which a config without the field takes
PEFT_DEFAULT_ALPHA = 8.0

#: PEFT's ``LoraConfig.r`` default: the rank PEFT (and diffusers, from ``lora_adapter_metadata``)
#: builds a module at where its config states no ``r`` and no ``rank_pattern`` key matches it
PEFT_DEFAULT_R = 8


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of a PEFT ``adapter_config.json`` that decide ranks and scales.

    Attributes:
        r: default rank (None when the config does not say: PEFT's default where :attr:`r_omitted`,
            else the tensors decide).
        lora_alpha: default alpha: PEFT's default (8) for a config without the field, None with
            no config at all (alpha then equals the module's rank, so scale 1). Any finite
            number, as in PEFT: 0 makes the adapter a no-op (DoRA then still rescales the base
            weight's columns by magnitude / norm), a negative alpha flips its sign.
        rank_pattern: regex -> rank overrides.
        alpha_pattern: regex -> alpha overrides.
        use_rslora: scale by ``alpha / sqrt(r)``.
        use_dora: every module of the file carries a DoRA magnitude vector. With it, a module
            without one is refused (PEFT would run it as DoRA with the base's own norms); without
            it (PEFT's default, where a config is :attr:`present`), a magnitude vector is refused
            (PEFT ignores it and runs plain LoRA).
        lora_bias: the modules' ``lora_B`` carry biases; without it (PEFT's default, where a
            config is :attr:`present`), a bias in the file is refused (PEFT ignores it).
        fan_in_fan_out: recorded only. PEFT saves A ``[r, in]`` and B ``[out, r]`` whatever
            the base layout; lorahot's linear layer reads a ``Conv1D`` base the right way itself.
        target_modules: the module names (or a regex) the adapter was trained on, for messages
            (:attr:`selection` is what the loader checks).
        unsupported: ``"field=value; why"`` for each set :data:`UNSUPPORTED` field, each set
            field lorahot does not know, a ``peft_type`` other than LoRA and an
            ``init_lora_weights`` that rewrote the base weights or that lorahot does not know.
        alpha_stated: whether the config names ``lora_alpha`` itself (else the default applies).
        r_null: the config's ``r`` is null: a module no ``rank_pattern`` key matches has no rank
            (PEFT fails to build its layer), where one it leaves out has PEFT's default.
        r_omitted: a PEFT config (an ``adapter_config.json`` or the header's
            ``lora_adapter_metadata``, with any ``config=`` over it) states no ``r``: PEFT builds a
            module no ``rank_pattern`` key matches at :data:`PEFT_DEFAULT_R`. The loader sets it;
            ``config=`` alone leaves the rank to the tensors.
        present: whether there is a config at all (any field): PEFT's defaults then hold for the
            fields it leaves out; without one the tensors decide.
        origin: where the fields came from, for messages (``adapter_config.json``, the
            safetensors header's metadata, ``config=``); empty where not known.
        selection: the modules ``target_modules``, ``exclude_modules`` and ``layers_to_transform``
            select, as ``PeftModel.from_pretrained`` reads them; None where they select every one.
    """

    r: int | None = None
    lora_alpha: float | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    target_modules: tuple[str, ...] | str | None = None
    unsupported: tuple[str, ...] = ()
    alpha_stated: bool = False
    r_null: bool = False
    r_omitted: bool = False
    present: bool = False
    origin: str = field(default="", compare=False)
    selection: ModuleSelection | None = field(default=None, compare=False)
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
        foreign = _foreign_type(raw.get("peft_type", LORA_TYPE))
        if foreign:  # another kind of adapter: its fields mean other things, so none is checked
            return cls(unsupported=(foreign,), present=True), []
        problems: list[str] = []
        r = _opt_int(raw.get("r"), "r", problems)
        alpha = _opt_alpha(raw.get("lora_alpha"), "lora_alpha", problems)
        if "lora_alpha" not in raw:  # as PEFT reads a config without it
            alpha = PEFT_DEFAULT_ALPHA
        elif raw["lora_alpha"] is None:
            problems.append("lora_alpha is null (PEFT cannot scale with it either); set it to the adapter's alpha")
        rank_pattern, rank_set = _pattern(raw.get("rank_pattern"), "rank_pattern", _opt_int, problems)
        alpha_pattern, alpha_set = _pattern(raw.get("alpha_pattern"), "alpha_pattern", _opt_alpha, problems)
        flags = {k: raw.get(k, False) for k in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias")}
        for k, v in flags.items():
            if not isinstance(v, bool):
                problems.append(f"{k} must be true or false, got {shown(v)}")
                flags[k] = False
        targets = _targets(raw.get("target_modules"), problems)
        selection = ModuleSelection.parse(dict(raw), problems)
        unsupported = tuple(f"{k}={_json(raw[k])}; {why}" for k, why in UNSUPPORTED.items() if _set(raw.get(k)))
        unsupported += _init_refusal(raw.get("init_lora_weights", True))
        unsupported += tuple(
            f"{k if isinstance(k, str) and len(k) <= 60 else shown(k, 60)}={_json(v)}; {_UNKNOWN_FIELD}"
            for k, v in raw.items()
            if k not in READ and k not in INERT and k not in UNSUPPORTED and _set(v)
        )
        config = cls(
            r, alpha, rank_pattern, alpha_pattern, **flags, target_modules=targets, unsupported=unsupported,
            alpha_stated="lora_alpha" in raw, r_null="r" in raw and raw["r"] is None, present=True,
            selection=selection, _rank_set=rank_set, _alpha_set=alpha_set,
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


_UNKNOWN_FIELD = (
    "a config field lorahot does not know (a newer PEFT's, or another tool's), which may change what the adapter "
    "computes; if it does not, pass config= with it set to null to load the adapter without it"
)


def _foreign_type(v: Any) -> str | None:
    """The refusal of a ``peft_type`` that is not LoRA's, or None for LoRA's (or none)."""
    if v is None or (isinstance(v, str) and v.upper() == LORA_TYPE):
        return None
    return (
        f"peft_type={_json(v)}; this is not a LoRA adapter (PEFT's peft_type {LORA_TYPE}) but another PEFT method, "
        "which computes something else from its weights"
    )


def _init_refusal(v: Any) -> tuple[str, ...]:
    """The refusal of an ``init_lora_weights`` value (empty where the base weights were left alone)."""
    if any(v is kept or (isinstance(v, str) and v.lower() == kept) for kept in KEPT_INITS):
        return ()
    if isinstance(v, str) and v.lower().startswith(REWRITING_INITS):
        how = (
            "load it onto the base model saved with it (LoftQ's quantized residual)"
            if v.lower().startswith("loftq")
            else "convert it to plain LoRA with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion="
            "...), or load it onto the rewritten base model saved with it"
        )
        return (
            f"init_lora_weights={_json(v)}; this initialization rewrote the base weights the adapter was trained over, "
            f"and B @ A over the original ones is not what was trained: {how}, passing config= with "
            "init_lora_weights set to true",
        )
    return (
        f"init_lora_weights={_json(v)}; an initialization lorahot does not know (PEFT refuses unknown ones too), which "
        "may have rewritten the base weights",
    )


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
    """A PEFT alpha: any finite number, as PEFT scales by it (0 turns the module off, a negative
    one flips its sign)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not finite(v):
        problems.append(f"{name} must be a finite number, got {shown(v)}")
        return None
    try:
        return float(v)
    except Exception:  # a number type of the caller's (config=) whose __float__ raises anything
        problems.append(f"{name} must be a finite number, got {shown(v)}, which cannot be read as a float")
        return None


def finite(v: int | float) -> bool:
    """Whether the real number ``v`` is a finite float (an int beyond float range is not)."""
    try:
        return math.isfinite(v)  # an int beyond float range raises OverflowError
    except OverflowError:
        return False


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
