"""What a LoRA layer answers torch's reparametrizations applied to it rather than to its base.

A :class:`~lorahot.layers.base.LoRALayer` holds no parameter: reading ``layer.weight`` gives its
base module's. torch's weight utilities, applied to the layer, reach for the weight as the
layer's own, and failed with torch's errors naming neither the layer nor the fix (or changed the
base half way). Two places are where they all reach first, and each answers with a
:class:`~lorahot.errors.UsageError` before anything changed:

- the layer's ``_parameters`` (:class:`NoParameters`): ``torch.nn.utils.weight_norm`` deletes the
  weight from it, ``torch.nn.utils.spectral_norm`` (and ``remove_spectral_norm``'s kind) looks
  it up by name, which raised ``KeyError: 'weight'``;
- the layer's ``parametrizations`` (:class:`NoParametrizations`), which
  ``torch.nn.utils.parametrize.register_parametrization`` (under every
  ``torch.nn.utils.parametrizations`` utility: ``weight_norm``, ``spectral_norm``,
  ``orthogonal``) and ``remove_parametrizations`` ask first whether the tensor is parametrized.
  Before, the layer forwarded the base module's, so registering one raised ``ValueError``, and
  removing a base's parametrization through the layer wrote the parametrized weight into the
  base's original, then raised ``AttributeError`` on the layer's class: the base computed the
  parametrization twice from then on. Anything else reading it (``is_parametrized(layer)``,
  ``type_before_parametrizations``, ``hasattr(m, "parametrizations") and "weight" in
  m.parametrizations``) finds the layer not parametrized, which it is not: its base module is
  asked on its own.

The removals of torch's older, hook-based reparametrizations (``remove_weight_norm``,
``remove_spectral_norm``, ``torch.nn.utils.prune.remove``) look for their hook among the layer's
own, find none (it is on the base module), and raise ``ValueError`` with the layer in the message;
the layer's ``extra_repr`` asks :func:`refuse_removal` first, which raises the
:class:`~lorahot.errors.UsageError` instead (nothing was changed: they search before they
remove). The layer's hooks are left as torch's: nothing is added to its forward.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any

from torch import nn
from torch.nn.utils import parametrize, prune, remove_spectral_norm, remove_weight_norm

from lorahot.errors import UsageError

__all__ = ["NoParameters", "NoParametrizations", "refusal", "refuse_removal"]

#: the base module's parameters torch's utilities reach for on the layer
_NAMES = ("weight", "bias")
#: torch's functions that change a module's parametrizations, each asking ``is_parametrized``
#: first: the frames a question from them comes through
_CHANGES = {
    parametrize.register_parametrization.__code__: "register_parametrization",
    parametrize.remove_parametrizations.__code__: "remove_parametrizations",
}

#: torch's removals of a hook-based reparametrization, each raising ``ValueError`` with the
#: module in its message where the module holds no such hook
_REMOVALS = {
    remove_weight_norm.__code__: "remove_weight_norm",
    remove_spectral_norm.__code__: "remove_spectral_norm",
    prune.remove.__code__: "prune.remove",
}


def refuse_removal(layer: nn.Module, path: str) -> None:
    """Raises the :class:`UsageError` for torch's removal of a weight norm, spectral norm or
    pruning applied to ``layer`` (the LoRA layer named ``path``) itself, where the caller (its
    ``extra_repr``, from ``nn.Module.__repr__``) is formatting it into that removal's
    ``ValueError``; returns otherwise (a removal applied to a module holding the layer formats
    the layer too, and raises torch's own error about that module)."""
    frame: FrameType | None = sys._getframe(2)  # the layer's extra_repr <- nn.Module.__repr__ <- ...
    for _ in range(2):  # the removal's f-string calls __repr__, or format() does, in that frame
        frame = frame.f_back if frame is not None else None
        removal = None if frame is None else _REMOVALS.get(frame.f_code)
        if removal is not None and frame is not None and frame.f_locals.get("module") is layer:
            name = frame.f_locals.get("name", "weight")
            raise UsageError(refusal(path, f"torch.nn.utils.{removal} of {name!r}"))


def refusal(layer: str, what: str) -> str:
    """The message for ``what`` (torch's utility and the tensor it reached for) applied to the
    LoRA layer named ``layer`` (its module path, or its class where unbound)."""
    return (
        f"{layer}: {what} on the LoRA layer itself, which holds no parameter (reading its weight gives its base "
        f"module's); nothing was changed. Apply it to the module that holds the weight, {layer}.base_layer (merged "
        "mode refuses such a base at its next call), or before inject."
    )


class NoParameters(dict[str, Any]):
    """A LoRA layer's ``_parameters``: empty (:meth:`~lorahot.layers.base.LoRALayer.register_parameter`
    refuses one), and a lookup or deletion of the base module's ``weight`` or ``bias`` by name
    there (``torch.nn.utils.weight_norm``, ``spectral_norm``) raises a :class:`UsageError` naming
    the layer (:attr:`layer`, set at bind) instead of torch's ``KeyError``. Other names, and
    ``in`` or ``get``, behave as a dict's."""

    #: the layer's module path (its class before bind), for the message
    layer: str = "LoRALayer"

    def __missing__(self, key: str) -> Any:
        if key in _NAMES:
            raise UsageError(refusal(self.layer, f"torch.nn.utils.weight_norm or spectral_norm of {key!r}"))
        raise KeyError(key)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            self.__missing__(key)
        super().__delitem__(key)


class NoParametrizations(nn.ModuleDict):
    """What a LoRA layer gives as its ``parametrizations``: none (``is_parametrized(layer)`` is
    False), and where ``register_parametrization`` or ``remove_parametrizations`` asks whether
    one of its tensors is parametrized, a :class:`UsageError` naming the layer. Asked from
    anywhere else, it holds none."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def __contains__(self, key: object) -> bool:
        asker = sys._getframe(1)  # torch's is_parametrized, where it asks on behalf of a change
        caller = asker.f_back if asker.f_code is parametrize.is_parametrized.__code__ else None
        change = _CHANGES.get(caller.f_code) if caller is not None else None
        if change is not None:
            raise UsageError(refusal(self.layer, f"torch.nn.utils.parametrize.{change} of {key!r}"))
        return False

    def __getitem__(self, key: str) -> nn.Module:
        raise UsageError(refusal(self.layer, f"torch.nn.utils.parametrize's parametrization of {key!r} read"))
