"""An adapter whose tensors share memory with what a load writes is copied first.

A user may hand ``load`` views of the runtime's own buffers: a layer's ``lora_A`` / ``lora_B``
(the live adapter, to store it again in a slot) or rows of an arena. The write would then read
what it is overwriting: ``copy_`` refuses overlapping memory once every check has passed,
which empties the slot (a :class:`~lorahot.WriteError`), and a partial overlap would read
half-written values. Such tensors hold a valid adapter, so the load copies them before it
plans anything, and writes from the copies.

:func:`own_storages` lists the memory a write may change (the model's parameters and buffers,
the layers' arenas and wide buffers); :func:`unaliased` copies an adapter's tensors that lie in
it, and returns the adapter itself, untouched, when none does (the usual case: a file's tensors,
or a dict of the user's own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lorahot.adapter import Adapter, LoraModule, WeightModule

__all__ = ["own_storages", "plain", "unaliased"]


def own_storages(model: nn.Module, tensors: Iterable[torch.Tensor]) -> frozenset[int]:
    """The data pointers of the storages of ``model``'s parameters and buffers and of
    ``tensors`` (the runtime's arenas and wide buffers), on any device."""
    every = [*model.parameters(), *model.buffers(), *tensors]
    local = [getattr(t, "to_local", lambda t=t: t)() for t in every]  # a DTensor's: its shard
    return frozenset(_storage(t) for t in local if plain(t))


def unaliased(adapter: Adapter, storages: frozenset[int]) -> Adapter:
    """``adapter`` with every tensor that lies in ``storages`` replaced by a copy (the same
    object if none does)."""
    modules = {k: _module(m, storages) for k, m in adapter.modules.items()}
    weights = {k: _weights(w, storages) for k, w in adapter.weights.items()}
    same = all(modules[k] is m for k, m in adapter.modules.items()) and all(
        weights[k] is w for k, w in adapter.weights.items()
    )
    return adapter if same else dataclasses.replace(adapter, modules=modules, weights=weights)


def _storage(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


def plain(t: torch.Tensor) -> bool:
    """Whether ``t`` is a dense tensor with memory of its own kind (not meta, sparse, nested or
    quantized: a load refuses those, and they share no dense memory; nor a wrapper subclass, such
    as torchao's quantized weights, whose memory is its inner tensors': its own storage has no
    data to point at; nor a lazy module's parameter or buffer not yet materialized, which has no
    memory until its module's first call and raises on any use before it)."""
    return (
        not isinstance(t, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer))
        and t.layout == torch.strided
        and t.device.type != "meta"
        and not t.is_nested
        and not t.is_quantized
        and not is_traceable_wrapper_subclass(t)
    )


def _copied(t: torch.Tensor | None, storages: frozenset[int]) -> torch.Tensor | None:
    if t is None or not plain(t):
        return t  # refused by the checks, whatever its memory
    return t.clone() if _storage(t) in storages else t


def _module(m: LoraModule, storages: frozenset[int]) -> LoraModule:
    fields = {name: getattr(m, name) for name in ("A", "B", "base_weight", "magnitude", "bias")}
    copies = {name: _copied(t, storages) for name, t in fields.items()}
    if all(copies[name] is t for name, t in fields.items()):
        return m
    return dataclasses.replace(m, **copies)  # type: ignore[arg-type]


def _weights(w: WeightModule, storages: frozenset[int]) -> WeightModule:
    copies = {name: _copied(t, storages) for name, t in w.factors.items()}
    if all(copies[name] is t for name, t in w.factors.items()):
        return w
    return dataclasses.replace(w, factors=copies)  # type: ignore[arg-type]
