"""PEFT naming: ``[base_model.model.]<module>.lora_A[.<adapter>].weight`` and friends.

Also the in-memory naming (``lora_A.default.weight``) and embeddings
(``lora_embedding_A`` ``[r, num]`` / ``lora_embedding_B`` ``[dim, r]``).
"""

from __future__ import annotations

import re

import torch

from lorahot.adapter import LoraModule
from lorahot.config import AdapterConfig
from lorahot.errors import AdapterMismatchError, UnknownFormatError, format_problems

__all__ = ["NAME", "PREFIXES", "parse_key", "detect", "build_modules"]

NAME = "peft"
#: Prefixes PEFT puts in front of module names; removed before matching the model.
PREFIXES = ("base_model.model.",)
_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$")
_ROLE = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
#: Keys that are PEFT but not something lorahot can load, with the reason.
_UNSUPPORTED = (
    (re.compile(r"\.lora_magnitude_vector(\.|$)"), "DoRA magnitude vectors (DoRA is not supported)"),
    (re.compile(r"\.lora_B(\.[^.]+)?\.bias$"), "LoRA B biases (lora_bias=True is not supported)"),
)


def parse_key(key: str) -> tuple[str, str] | None:
    """``(module, "A" | "B")`` for a PEFT key, or None if the key is not a LoRA weight."""
    stem = key[: -len(".weight")] if key.endswith(".weight") else key
    m = _KEY.match(stem)
    if m is None:
        return None
    module = m["module"]
    for prefix in PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
    return module, _ROLE[m["role"]]


def detect(keys: list[str]) -> bool:
    """True if every key is a PEFT LoRA key (or a PEFT key lorahot refuses with a reason)."""
    return bool(keys) and all(parse_key(k) is not None or _unsupported(k) for k in keys)


def _unsupported(key: str) -> str | None:
    return next((why for pat, why in _UNSUPPORTED if pat.search(key)), None)


def build_modules(tensors: dict[str, torch.Tensor], config: AdapterConfig, source: str) -> dict[str, LoraModule]:
    """Groups PEFT keys into :class:`LoraModule` objects, with ranks and alphas from ``config``.

    Raises:
        UnknownFormatError: keys that are not PEFT LoRA keys, or PEFT features not supported.
        AdapterMismatchError: an A without its B (or the reverse), or a rank that contradicts
            the config.
    """
    if config.use_dora:
        raise UnknownFormatError(f"{source}: adapter_config.json says use_dora=true; DoRA adapters are not supported yet. Use a plain LoRA adapter.")
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    problems: list[str] = []
    for key, t in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            problems.append(f"{key}: {_unsupported(key) or 'not a LoRA A/B weight'}")
            continue
        module, role = parsed
        if role in parts.setdefault(module, {}):
            problems.append(f"{key}: a second {role} for module {module!r} (also {parts[module][role][0]})")
        parts[module][role] = (key, t)
    if problems:
        raise UnknownFormatError(format_problems(f"{source}: keys lorahot cannot load:", problems) + "\nRemove them or convert the adapter to plain LoRA.")
    return _assemble(parts, config, source)


def _assemble(parts: dict[str, dict[str, tuple[str, torch.Tensor]]], config: AdapterConfig, source: str) -> dict[str, LoraModule]:
    modules, problems = {}, []
    for module, roles in parts.items():
        if set(roles) != {"A", "B"}:
            have, miss = next(iter(roles)), ({"A", "B"} - set(roles)).pop()
            problems.append(f"{module}: has lora_{have} ({roles[have][0]}) but no lora_{miss}")
            continue
        (ka, a), (kb, b) = roles["A"], roles["B"]
        rank = int(a.shape[0]) if a.ndim else 0
        declared = config.rank_for(module)
        if declared is not None and rank != declared:
            problems.append(f"{module}: adapter_config.json says r={declared}, but {ka} has shape {tuple(a.shape)} (rank {rank})")
            continue
        alpha = config.alpha_for(module)
        modules[module] = LoraModule(module, a, b, float(rank) if alpha is None else alpha, config.use_rslora, (ka, kb))
    if problems:
        raise AdapterMismatchError(format_problems(f"{source}: inconsistent adapter:", problems) + "\nRe-save the adapter so tensors and config agree.")
    return modules
