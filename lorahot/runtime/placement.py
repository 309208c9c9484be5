"""Whether a runtime's LoRA layers are still where inject put them, on the buffers it bound.

A load or an activate writes the buffers inject bound to each layer; once a layer has left
the model (a module on its path replaced or deleted), its base was parallelized or FSDP
sharded it, or its buffers moved to new memory, those writes would change nothing the model
computes, or something it no longer reads. :class:`Placement` records at inject what each
check compares with, and :meth:`LoraRuntime._check_usable
<lorahot.runtime.lora_runtime.LoraRuntime._check_usable>` runs its checks before each call.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

from torch import nn

from lorahot.errors import UsageError
from lorahot.layers import LoRALayer
from lorahot.layers.sharded import is_sharded
from lorahot.runtime.targets import flattened_on_path, fsdp_owner_on_path, fsdp_refusal, submodule_at, through_wrappers

__all__ = ["Placement"]


class Placement:
    """Where inject put a runtime's layers: every ``(parent's children, child name, child)``
    link on the paths to them (as three lists, checked by ``map()`` in C: about 3 us for 154
    layers), each layer's bound buffer address, and whether its base layer was sharded."""

    def __init__(self, model: nn.Module, layers: dict[str, LoRALayer]) -> None:
        self.addresses = {name: layer.bound_address() for name, layer in layers.items()}
        self._link(model, layers)
        self.first = next(iter(layers))  # the layer checked where not every layer is
        self.sharded = {name: is_sharded(layer.base_layer) for name, layer in layers.items()}
        # each base weight's class as inject saw it (None: no weight Parameter, always looked at in full)
        self._kinds = {name: _weight_kind(layer) for name, layer in layers.items()}

    def _link(self, model: nn.Module, layers: dict[str, LoRALayer]) -> None:
        """Records every link on the paths from ``model`` to ``layers`` (:func:`_links`)."""
        links = _links(model, layers)
        self._children = [children for children, _, _ in links]
        self._names = [child for _, child, _ in links]
        self._modules = [module for _, _, module in links]
        self._originals = list(self._modules)  # the wrapped-since are checked against these

    def check_linked(self, model: nn.Module, layers: dict[str, LoRALayer]) -> None:
        """Refuses a layer no longer in ``model`` (a module on its path replaced or deleted
        since inject; FSDP's wrapper on its path: :func:`check_fsdp`). A module on the paths
        replaced by one that holds the same layers at the same paths
        (``model.layers = nn.ModuleList(list(model.layers))``, a shallow copy of a block put
        back) leaves every layer where inject put it: its links are recorded anew.

        Raises:
            UsageError: naming the first such layer and the fix (eject, inject again).
        """
        found = map(dict.get, self._children, self._names)
        if all(map(operator.is_, found, self._modules)) or self._relinked():
            return
        name = next((n for n, m in layers.items() if through_wrappers(submodule_at(model, n)) is not m), None)
        if name is None:  # each layer is still at its path
            self._link(model, layers)
            return
        check_fsdp(model, name, None)  # FSDP wrapped a module on its path
        raise UsageError(
            f"{name}: this LoRA layer is no longer in the model (a module on its path was replaced or deleted "
            "after inject), so a load would change nothing the model computes. Call runtime.eject(), then "
            "inject into the model as it is now."
        )

    def check_layers(self, model: nn.Module, layers: dict[str, LoRALayer], names: Iterable[str]) -> None:
        """Refuses any of layers ``names`` that FSDP1 flattened, whose base layer was
        parallelized (or gathered) since inject, or whose buffers moved to new memory.

        Raises:
            UsageError: naming the first such layer, what changed and the fix.
        """
        names = list(names)
        # a base weight of the class inject saw, unmarked, was neither flattened by FSDP1 nor
        # parallelized or gathered since (a DTensor weight is of DTensor's class, a plain one is
        # not): one lookup per layer, where the full checks below cost several (a load checks
        # every layer, twice)
        changed = [n for n in names if not self._same_kind(n, layers[n])]
        if isinstance(model, nn.Module):
            for n in changed:  # FSDP1 wrapped the model: its flat parameters hold the layers' weights
                if not _maybe_flattened(layers[n]):
                    continue
                check_fsdp(model, n, flattened_on_path(model, n))
        parallelized = [n for n in changed if is_sharded(layers[n].base_layer) != self.sharded[n]]
        if parallelized:
            name = parallelized[0]
            check_fsdp(model, name, None)  # FSDP2's DTensors
            now = "no longer" if self.sharded[name] else "now"
            raise UsageError(
                f"{name}: its base layer was parallelized (or gathered) after inject: its weight is {now} a DTensor, "
                "and lorahot shards the LoRA buffers like the base layer at inject. Call runtime.eject(), parallelize "
                "the model, then inject."
            )
        moved = [n for n in names if layers[n].bound_address() != self.addresses[n]]
        if moved:
            raise UsageError(
                f"{moved[0]}: its LoRA buffers were replaced or moved to new memory (model.to(), "
                "model.share_memory(), load_state_dict(assign=True) or weight.data = ... after inject?), where the "
                "runtime's writes and captured graphs no longer reach. Move or share the model first, then inject "
                "(or call runtime.eject() and inject again)."
            )

    def _same_kind(self, name: str, layer: LoRALayer) -> bool:
        """Whether ``layer``'s base weight is a Parameter of the class inject saw, not marked by
        FSDP1."""
        kind = self._kinds[name]
        weight = layer._base._parameters.get("weight")
        return kind is not None and type(weight) is kind and not getattr(weight, "_fsdp_flattened", False)

    def _relinked(self) -> bool:
        """Whether each parent on the paths to the layers still holds its child, itself or a
        wrapper made of it since that calls it (``model.layers[0] = torch.compile(model.layers[0])``,
        activation checkpointing's: :func:`~lorahot.runtime.targets.through_wrappers`); the check
        then expects the wrapper."""
        now = [children.get(name) for children, name in zip(self._children, self._names)]
        if not all(map(operator.is_, map(through_wrappers, now), self._originals)):
            return False
        self._modules = now  # type: ignore[assignment]  # each one is a module: the check above
        return True


def check_fsdp(model: nn.Module, name: str, holder: str | None) -> None:
    """Refuses layer ``name`` where FSDP sharded ``model`` after inject: ``holder`` (the module
    holding FSDP1's flat parameter on its path: :func:`flattened_on_path`), or an FSDP module
    on its path (:func:`~lorahot.runtime.targets.fsdp_owner_on_path`; None: looked up
    here, along the path only).

    Raises:
        UsageError: naming the layer, FSDP's wrapper, and the fix (eject first).
    """
    if holder is None:
        holder = fsdp_owner_on_path(model, name) if isinstance(model, nn.Module) else None
    refusal = None if holder is None else fsdp_refusal(name, [holder])
    if refusal is not None:
        raise UsageError(f"{refusal} FSDP sharded it after inject: call runtime.eject() first.")


def _weight_kind(layer: LoRALayer) -> type | None:
    """The class of ``layer``'s base weight Parameter, or None where it has none (a
    parametrized weight, a base without ``weight``: those take the full checks each call). No
    reference to the weight itself is kept: a weakref would make ``torch.utils.swap_tensors``
    (``model.to()`` with ``swap_module_params_on_conversion``) refuse it, and a strong one
    would keep a replaced weight alive."""
    weight = layer._base._parameters.get("weight")
    return None if weight is None else type(weight)


def _maybe_flattened(layer: LoRALayer) -> bool:
    """Whether FSDP1 may have taken ``layer``'s base weight into a flat parameter: the weight
    left its module's parameters (``use_orig_params=False`` puts a plain view there) or is
    marked ``_fsdp_flattened`` (``use_orig_params=True``). A base without a ``weight``
    parameter is looked at in full (:func:`~lorahot.runtime.targets.flattened_on_path`). One
    lookup per layer where the full look walks each module on its path: a load checks every
    layer, twice."""
    weight = layer.base_layer._parameters.get("weight")
    return weight is None or bool(getattr(weight, "_fsdp_flattened", False))


def _links(model: nn.Module, layers: dict[str, LoRALayer]) -> list[tuple[dict[str, Any], str, nn.Module]]:
    """Every ``(parent's children, child name, child)`` on the paths from ``model`` to its
    layers, once each: checking that each parent still holds its child proves every layer is
    still in the model (about 3 us for 154 layers)."""
    links: dict[tuple[int, str], tuple[dict[str, Any], str, nn.Module]] = {}
    for name in layers:
        parent = model
        for part in name.split("."):
            if part not in parent._modules:  # a wrapper made since inject: its module holds the child
                parent = through_wrappers(parent)  # type: ignore[assignment]  # (submodule_at found it)
            child = parent._modules[part]
            if child is None:  # inject just put the layer there
                break
            links.setdefault((id(parent), part), (parent._modules, part, child))
            parent = child
    return list(links.values())
