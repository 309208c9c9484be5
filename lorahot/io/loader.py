"""``read_adapter``: any supported source, in any supported naming, to an :class:`Adapter`.

The steps are: open the source (:mod:`lorahot.io.sources`, :mod:`lorahot.io.hub`), detect the naming
(:mod:`lorahot.formats`), group tensors by module and role, give each module its alpha (a
``.alpha`` tensor, else the config, else the rank), then apply the user's ``prefix``,
``key_map`` and ``fuse``. Matching module keys to the model's layers happens at load time
(:mod:`lorahot.resolve.keys`), where the model's names are known.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from lorahot.adapter import Adapter, LoraModule
from lorahot.errors import (
    AdapterMismatchError,
    AdapterReadError,
    UnknownFormatError,
    format_problems,
    public_api,
)
from lorahot.formats import FORMATS, KeyFormat, detect, group_keys
from lorahot.formats.diffusers import METADATA_KEY
from lorahot.formats.table import Parts
from lorahot.io.config import CONFIG_NAME, AdapterConfig
from lorahot.io.sources import RawAdapter, Source, open_source
from lorahot.resolve.user_map import Fuse, apply_key_map, fuse_modules, select_prefix

__all__ = ["read_adapter"]


@public_api
def read_adapter(
    source: Source | Adapter,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    weight_name: str | None = None,
    config: dict[str, Any] | None = None,
    prefix: str | None = None,
    key_map: Mapping[str, str] | None = None,
    fuse: Fuse | None = None,
    device: str | torch.device | None = None,
) -> Adapter:
    """Reads an adapter in any supported naming and normalizes it.

    Args:
        source: a directory, a ``.safetensors`` file, a Hub repo id (``"owner/name"``), a
            mapping of tensors, or an :class:`Adapter` (``prefix``/``key_map``/``fuse`` still
            apply). Pickle files (``.bin``, ``.pt``, ``.ckpt``) are refused.
        revision: Hub branch, tag or commit.
        subfolder: the folder inside the directory or repo that holds the adapter.
        token: Hub token (default: ``huggingface_hub``'s own login).
        weight_name: the weight file inside the directory or repo, if not a usual name.
        config: PEFT config fields (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
            ``use_rslora``, ...) used when the source has none, or overriding it.
        prefix: keep only modules under this component (``"unet"``, ``"text_encoder"``,
            ``"lora_te1"``) and strip it.
        key_map: ``{regex: replacement}`` renaming module keys to the model's module names.
        fuse: ``{fused: [part, ...]}`` merging part LoRAs into a fused projection, e.g.
            ``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``; a part the adapter lacks can be
            given as ``(name, out_features)`` and is filled with zeros.
        device: where tensors read from files land (default: the CPU). ``runtime.load``
            passes its buffers' device, so a GPU receives a file in one transfer.

    Returns:
        The adapter: per module key, ``A [r, in...]``, ``B [out, r/g, ...]``, alpha and
        rsLoRA flag (so the scale), the detected format and the source.

    Raises:
        lorahot.LoraError: a subclass saying what is wrong with the source and how to fix it.
    """
    if isinstance(source, Adapter):
        adapter = source
    else:
        raw = open_source(
            source,
            weight_name=weight_name,
            subfolder=subfolder,
            revision=revision,
            token=token,
            device=None if device is None else torch.device(device),
        )
        adapter = _normalize(raw, config)
    return _user_mapping(adapter, prefix, key_map, fuse)


def _normalize(raw: RawAdapter, overrides: dict[str, Any] | None) -> Adapter:
    keys = list(raw.tensors)
    if not keys:
        raise UnknownFormatError(f"{raw.source}: holds no tensors. Point lorahot at a LoRA adapter.")
    fmt = detect(keys) or _closest_format(keys)
    parts = group_keys(fmt, raw.tensors, raw.source)  # raises, naming the keys, if fmt was a guess
    configs = _component_configs(raw, overrides)
    modules = _assemble(parts, fmt, configs, raw.source)
    cfg_dict = {**(raw.config or {}), **(overrides or {})}
    if len(configs) > 1:
        cfg_dict[METADATA_KEY] = _header_configs(raw)
    return Adapter(modules, fmt.name, raw.source, cfg_dict)


def _closest_format(keys: list[str]) -> KeyFormat:
    """The format that accounts for most keys; its grouping then names the keys it cannot."""
    return max(FORMATS, key=lambda f: f.score(keys))


def _component_configs(raw: RawAdapter, overrides: dict[str, Any] | None) -> dict[str, AdapterConfig]:
    """Config per component prefix (``""``: every module). diffusers' header metadata holds
    one PEFT config per component (``"unet.r"``, ``"text_encoder.lora_alpha"``); ``config=``
    overrides every one of them."""
    configs = {"": {**(raw.config or {}), **(overrides or {})}}
    for component, fields in _header_configs(raw).items():
        configs[component] = {**fields, **(overrides or {})}
    parsed = {c: AdapterConfig.from_dict(d, raw.source) for c, d in configs.items()}
    dora = [c or "adapter_config" for c, cfg in parsed.items() if cfg.use_dora]
    if dora:
        raise UnknownFormatError(
            f"{raw.source}: the config of {', '.join(dora)} says use_dora=true; DoRA adapters are not supported. "
            "Use a plain LoRA adapter."
        )
    return parsed


def _header_configs(raw: RawAdapter) -> dict[str, dict[str, Any]]:
    text = raw.metadata.get(METADATA_KEY)
    if not text:
        return {}
    try:
        meta = json.loads(text)
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    except ValueError as exc:
        raise AdapterReadError(
            f"{raw.source}: malformed {METADATA_KEY} in the safetensors header ({exc}). Re-save the adapter."
        ) from None
    split: dict[str, dict[str, Any]] = {}
    for key, value in meta.items():
        component, _, field = str(key).rpartition(".")
        split.setdefault(component + "." if component else "", {})[field] = value
    return split


def _config_for(module: str, fmt: KeyFormat, configs: dict[str, AdapterConfig]) -> tuple[AdapterConfig, str, str]:
    """The config governing ``module``, the name PEFT's patterns are matched against, and
    where that config came from (for messages)."""
    component = next((c for c in configs if c and module.startswith(c)), "")
    origin = f"{METADATA_KEY} ({component[:-1]})" if component else CONFIG_NAME
    return configs[component], fmt.strip_prefix(module), origin


def _assemble(parts: Parts, fmt: KeyFormat, configs: dict[str, AdapterConfig], source: str) -> dict[str, LoraModule]:
    modules: dict[str, LoraModule] = {}
    problems: list[str] = []
    damaged: list[str] = []
    for module, roles in parts.items():
        if "A" not in roles or "B" not in roles:
            have, miss = ("B", "A") if "A" not in roles else ("A", "B")
            name = dict(zip("AB", fmt.roles))
            problems.append(
                f"{module}: has {name[have]} ({roles[have][0]}) but no {name[miss]}"
                if have in roles
                else f"{module}: has only {roles['alpha'][0]}, no weights"
            )
            continue
        (ka, a), (_, b) = roles["A"], roles["B"]
        rank = int(a.shape[0]) if a.ndim else 0
        cfg, pattern_name, origin = _config_for(module, fmt, configs)
        declared = cfg.rank_for(pattern_name)
        if declared is not None and rank != declared:
            problems.append(f"{module}: {origin} says r={declared}, but {ka} has shape {tuple(a.shape)} (rank {rank})")
            continue
        alpha = _alpha(roles.get("alpha"), damaged)
        if alpha is None:
            alpha = cfg.alpha_for(pattern_name)
        keys = tuple(k for k, _ in roles.values())
        modules[module] = LoraModule(module, a, b, float(rank) if alpha is None else alpha, cfg.use_rslora, keys)
    if damaged:
        raise AdapterReadError(
            format_problems(f"{source}: unusable alpha values:", damaged)
            + "\nFix or delete those .alpha entries (without one, alpha equals the rank)."
        )
    if problems:
        raise AdapterMismatchError(
            format_problems(f"{source}: inconsistent adapter:", problems)
            + "\nRe-save the adapter so tensors and config agree."
        )
    return modules


def _alpha(entry: tuple[str, torch.Tensor] | None, problems: list[str]) -> float | None:
    if entry is None:
        return None
    key, t = entry
    value = float(t.reshape(-1)[0]) if t.numel() == 1 else math.nan
    if not (math.isfinite(value) and value > 0):
        problems.append(
            f"{key}: alpha must be one finite number > 0, got shape {tuple(t.shape)} value {t.reshape(-1)[:3].tolist()}"
        )
        return None
    return value


def _user_mapping(
    adapter: Adapter, prefix: str | None, key_map: Mapping[str, str] | None, fuse: Fuse | None
) -> Adapter:
    if prefix is None and key_map is None and fuse is None:
        return adapter
    modules = adapter.modules
    if prefix is not None:
        modules = select_prefix(modules, prefix, adapter.source)
    if key_map is not None:
        modules = apply_key_map(modules, key_map, adapter.source)
    if fuse is not None:
        modules = fuse_modules(modules, fuse, adapter.source)
    return Adapter(modules, adapter.format, adapter.source, adapter.config)
