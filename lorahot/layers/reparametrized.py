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
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from lorahot.errors import UsageError

__all__ = ["NoParameters", "NoParametrizations", "refusal"]

#: the base module's parameters torch's utilities reach for on the layer
_NAMES = ("weight", "bias")
#: torch's functions that change a module's parametrizations, each asking ``is_parametrized``
#: first: the frames a question from them comes through
_CHANGES = {
    parametrize.register_parametrization.__code__: "register_parametrization",
    parametrize.remove_parametrizations.__code__: "remove_parametrizations",
}


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
