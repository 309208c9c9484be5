"""PEFT's per-call arguments refused on an injected model's forward, not silently dropped.

PEFT routes each batch row to a named adapter with ``model(..., adapter_names=[...])``. A
transformers model takes unknown keyword arguments into ``**kwargs`` and drops them, so on a
lorahot model that call would run every row on the active slot without a word. :func:`install`
hooks the model's (or each component's) forward so that the argument raises
:class:`~lorahot.errors.UsageError` naming what to call instead: :meth:`LoraRuntime.activate
<lorahot.runtime.lora_runtime.LoraRuntime.activate>` with one slot per row. The check is one
dictionary lookup per call, before the forward; it is traced like the forward under
``torch.compile``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorahot.errors import UsageError, shown
from lorahot.runtime.hooked import Hooked

__all__ = ["install", "uninstall", "release", "REFUSED"]

#: PEFT's per-call keyword arguments that lorahot does not read
REFUSED = ("adapter_names",)

#: the modules :func:`install` hooked, until :func:`release` unhooks them
_HOOKED = Hooked()


def _refuse(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for name in REFUSED:
        if name in kwargs:
            raise UsageError(
                f"{type(module).__name__}.forward got {name}={shown(kwargs[name])}: that is PEFT's per-row adapter "
                "argument, which lorahot does not read (the model would have dropped it and run every row on the "
                "active slot). Route the rows before the call: runtime.activate([slot of each row, -1 for the base "
                "model]), or runtime.activate(k) for the whole batch; then call the model without it."
            )


def install(module: nn.Module) -> None:
    """Hooks ``module``'s forward to refuse :data:`REFUSED` (once, however often called)."""
    if not any(hook is _refuse for hook in module._forward_pre_hooks.values()):
        module.register_forward_pre_hook(_refuse, with_kwargs=True)
    _HOOKED.add(module)


def uninstall(module: nn.Module) -> None:
    """Removes :func:`install`'s hook from ``module`` (a copy's too: ``deepcopy`` keeps it)."""
    for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _refuse]:
        del module._forward_pre_hooks[key]
        module._forward_pre_hooks_with_kwargs.pop(key, None)


def release(module: nn.Module) -> None:
    """:func:`uninstall` from ``module`` and from every module :func:`install` hooked, each once
    it holds no LoRA layer (:class:`~lorahot.runtime.hooked.Hooked`)."""
    _HOOKED.release([module], uninstall)
