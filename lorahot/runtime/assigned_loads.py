"""``load_state_dict(assign=True)`` refused before it loads anything, not halfway.

A widened or merged layer refuses a new tensor for its base layer's weight (it computes from
its own copy, or holds the adapter merged in). Its own load hook can refuse only when torch
reaches it, after the modules before it were loaded: a refused load then leaves the model half
old, half new. :func:`install` hooks the model (or each component) and every module on the way
to a LoRA layer, so that the load's first module checks every layer under it first
(:func:`lorahot.layers.base.refuse_assigned_load_under`). The hook does nothing for a load
without ``assign``, nor for the modules a load reaches after its first (their prefix is not
empty), so a load pays for one pass over the model's modules at most.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from lorahot.layers import LoRALayer
from lorahot.layers.base import refuse_assigned_load_under

__all__ = ["install", "release"]

#: the modules :func:`install` hooked, until :func:`release` unhooks them
_HOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _check(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], *_: Any) -> None:
    if prefix == "" and local_metadata.get("assign_to_params_buffers"):  # the module load_state_dict was called on
        refuse_assigned_load_under(module, state_dict)


def install(root: nn.Module) -> None:
    """Hooks ``root`` and every module between it and a LoRA layer (once each)."""
    ancestors: dict[int, nn.Module] = {}
    for path, module in root.named_modules():
        if isinstance(module, LoRALayer):
            parts = path.split(".") if path else []
            at = root
            ancestors[id(at)] = at
            for part in parts[:-1]:
                at = at._modules[part]  # type: ignore[assignment]
                ancestors[id(at)] = at
    for module in ancestors.values():
        if not any(_is_check(hook) for hook in module._load_state_dict_pre_hooks.values()):
            module.register_load_state_dict_pre_hook(_check)
        _HOOKED.add(module)


def release(root: nn.Module) -> None:
    """Unhooks ``root`` and every module :func:`install` hooked, each once it holds no LoRA
    layer (another runtime's may remain; a copy of an injected model keeps the hooks)."""
    for hooked in [*root.modules(), *_HOOKED]:
        if not any(isinstance(m, LoRALayer) for m in hooked.modules()):
            for key in [k for k, hook in hooked._load_state_dict_pre_hooks.items() if _is_check(hook)]:
                del hooked._load_state_dict_pre_hooks[key]
            _HOOKED.discard(hooked)


def _is_check(hook: Any) -> bool:
    """torch keeps a load pre hook wrapped (``_WrappedHook``); its ``hook`` is the function."""
    return hook is _check or getattr(hook, "hook", None) is _check
