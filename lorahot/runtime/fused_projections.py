"""diffusers' QKV fusion refused, before it changes anything, where lorahot wraps a projection
it would fuse.

``model.fuse_qkv_projections()`` (and a pipeline's, which calls its UNet's or transformer's)
calls ``fuse_projections`` on each attention module: it builds a new linear layer (``to_qkv``,
``to_kv``, ``to_added_qkv``) from the weights of ``to_q``, ``to_k``, ``to_v`` (reading
through lorahot's layer to its base weight) and from then on computes the attention with it,
never calling the projections it copied. A LoRA layer lorahot put there would no longer run:
the model computed without (part of) the adapter while loads and swaps went on writing into
it. :func:`install` gives each attention module with a LoRA layer on a projection it fuses, and
each module with a ``fuse_qkv_projections``, a method of that name of their own, an instance
attribute that raises :class:`~lorahot.errors.UsageError` naming the wrapped projections and
the fix, and otherwise calls the class's method; eject takes it away. As in
:mod:`~lorahot.runtime.embedding_resize`, the method holds its module, so that ``torch.save``
pickles it and ``deepcopy`` gives the copy its own.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorahot.errors import UsageError
from lorahot.layers import LoRALayer
from lorahot.runtime.hooked import Hooked
from lorahot.runtime.module_paths import above

__all__ = ["install", "uninstall", "release", "FUSED_PROJECTIONS"]

#: an attention module's own fusion, and a model's over all its attention modules
_NAMES = ("fuse_projections", "fuse_qkv_projections")

#: the projections diffusers' ``fuse_projections`` copies into a fused one (none of its
#: implementations reads another)
FUSED_PROJECTIONS = frozenset({"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"})

#: the modules :func:`install` gave a method, until :func:`release` takes it away
_HOOKED = Hooked()


def _wrapped(module: nn.Module) -> list[str]:
    """The paths (from ``module``) of the LoRA layers that are a projection an attention module
    (one that has ``fuse_projections``) at or under ``module`` would fuse (:data:`FUSED_PROJECTIONS`)."""
    found = []
    for path, attention in module.named_modules():
        if callable(getattr(type(attention), _NAMES[0], None)):
            found += [
                f"{path}.{name}" if path else name
                for name, child in attention._modules.items()
                if name in FUSED_PROJECTIONS and isinstance(child, LoRALayer)
            ]
    return found


class _Refusing:
    """The method :func:`install` gives a module: a callable that holds the module (a plain
    object, so that ``torch.save`` pickles it and ``deepcopy`` binds it to the copy)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        wrapped = _wrapped(module)
        if wrapped:
            shown = ", ".join(wrapped[:4]) + (f" and {len(wrapped) - 4} more" if len(wrapped) > 4 else "")
            raise UsageError(
                f"{type(module).__name__}.{self.name} on attention projections lorahot wraps ({shown}): the fused "
                "projection (to_qkv, to_kv) is built from their base weights and replaces them in the attention, so "
                "the model would run without their LoRA while loads kept writing into it. Nothing was changed. Keep "
                "the projections unfused while adapters are served, or eject first (runtime.eject()), fuse, then "
                "inject into the fused projections."
            )
        return getattr(type(module), self.name)(module, *args, **kwargs)


def install(root: nn.Module) -> None:
    """Gives the refusing methods to ``root``'s attention modules (a class with
    ``fuse_projections``: diffusers') with a LoRA layer as a projection they fuse, and to the
    modules above them whose class has ``fuse_qkv_projections`` (a diffusers model or
    autoencoder); once, however often called."""
    modules = list(root.named_modules())
    attentions = {
        path
        for path, module in modules
        if callable(getattr(type(module), _NAMES[0], None))
        and any(n in FUSED_PROJECTIONS and isinstance(c, LoRALayer) for n, c in module._modules.items())
    }
    # the attentions and every path above one: a lookup per module, where each module was
    # compared with every attention (a model of many diffusers models, each holding attentions)
    holding = attentions.union(*(above(a) for a in attentions))
    for path, module in modules:
        if path in attentions:
            _give(module, _NAMES[0])
        if callable(getattr(type(module), _NAMES[1], None)) and path in holding:
            _give(module, _NAMES[1])


def _give(module: nn.Module, name: str) -> None:
    if not isinstance(module.__dict__.get(name), _Refusing):
        module.__dict__[name] = _Refusing(module, name)
    _HOOKED.add(module)


def uninstall(module: nn.Module) -> None:
    """Takes :func:`install`'s methods from ``module`` (a copy's too)."""
    for name in _NAMES:
        if isinstance(module.__dict__.get(name), _Refusing):
            del module.__dict__[name]


def release(module: nn.Module) -> None:
    """:func:`uninstall` from ``module`` and from every module :func:`install` changed, each once
    it holds no LoRA layer (:class:`~lorahot.runtime.hooked.Hooked`)."""
    _HOOKED.release([module], uninstall)
