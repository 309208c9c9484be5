"""``load_state_dict(assign=True)`` refused before it loads anything, not halfway.

A widened or merged layer refuses a new tensor for its base layer's weight (it computes from
its own copy, or holds the adapter merged in). Its own load hook can refuse only when torch
reaches it, after the modules before it were loaded: a refused load then leaves the model half
old, half new. :func:`install` hooks the model (or each component) and every module on the way
to a LoRA layer, so that the load's first hooked module checks every layer under it first
(:func:`lorahot.layers.base_guards.refuse_assigned_load_under`): the model's hook at whatever prefix
the load reaches it (a wrapper made after inject, such as ``torch.compile``'s, is not hooked),
an inner module's only where the load was called on it. The hooks do nothing for a load
without ``assign``, and a load pays for one pass over the model's modules. Left: a module of
such a wrapper that torch loads before the model (a sibling in front of it) is loaded before
the refusal.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorahot.layers import LoRALayer
from lorahot.layers.base_guards import refuse_assigned_load_under
from lorahot.runtime.hooked import Hooked

__all__ = ["install", "release"]

#: the modules :func:`install` hooked, until :func:`release` unhooks them
_HOOKED = Hooked()


def _check_root(module: nn.Module, state_dict: Any, prefix: str, local_metadata: dict[str, Any], *_: Any) -> None:
    """The model's (or a component's) hook: a load with ``assign`` that reaches it, directly
    or through a wrapper made after inject (``torch.compile``'s, whose keys start with
    ``_orig_mod.``), checks every layer under it first."""
    if local_metadata.get("assign_to_params_buffers"):
        refuse_assigned_load_under(module, state_dict, prefix)


def _check_inner(module: nn.Module, state_dict: Any, prefix: str, local_metadata: dict[str, Any], *_: Any) -> None:
    """A module's between the model and its layers: checks only a load called on it (the
    model's own hook checked the loads that come through the model)."""
    if prefix == "" and local_metadata.get("assign_to_params_buffers"):
        refuse_assigned_load_under(module, state_dict)


def install(root: nn.Module) -> None:
    """Hooks ``root`` and every module between it and a LoRA layer (once each)."""
    ancestors: dict[int, nn.Module] = {}
    for path, module in root.named_modules():
        if isinstance(module, LoRALayer) and path:
            at = root
            for part in path.split(".")[:-1]:
                at = at._modules[part]  # type: ignore[assignment]
                ancestors[id(at)] = at
    _hook(root, _check_root)
    for module in ancestors.values():
        if module is not root:
            _hook(module, _check_inner)


def _hook(module: nn.Module, check: Any) -> None:
    """One of the two checks on ``module``: the root's where it is any runtime's root (it
    checks whatever an inner one does, and more)."""
    hooks = module._load_state_dict_pre_hooks
    have = {getattr(h, "hook", h): k for k, h in hooks.items() if _is_check(h)}
    if check is _check_root and _check_inner in have:
        del hooks[have.pop(_check_inner)]
    if not have:
        module.register_load_state_dict_pre_hook(check)
    _HOOKED.add(module)


def release(root: nn.Module) -> None:
    """Unhooks ``root``, its modules and every module :func:`install` hooked, each once it
    holds no LoRA layer (:class:`~lorahot.runtime.hooked.Hooked`)."""
    _HOOKED.release(root.modules(), _unhook)


def _unhook(module: nn.Module) -> None:
    for key in [k for k, hook in module._load_state_dict_pre_hooks.items() if _is_check(hook)]:
        del module._load_state_dict_pre_hooks[key]


def _is_check(hook: Any) -> bool:
    """Whether ``hook`` is one of this module's (torch keeps a load pre hook wrapped in a
    ``_WrappedHook``, whose ``hook`` is the function)."""
    return getattr(hook, "hook", hook) in (_check_root, _check_inner)
