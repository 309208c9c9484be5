"""Which injected layers see their input sequence-first: ``[T, B, ...]``, time steps first.

A per-row routing gives row ``i`` of a layer's input the slot ``slots[i]``, row meaning the
first leading dimension (:mod:`lorahot.layers.routing`). A model that runs its blocks
sequence-first hands such a layer ``[T, B, in]``: with ``T != B`` the routing refuses the input
by its shape, but with ``T == B`` the shapes agree and each time step would take a row's slot
(wrong numbers, silently; 1.6 max abs diff on a float64 ``nn.TransformerDecoderLayer`` of three
rows of three tokens). Nothing in the input tells the two layouts apart, so the runtime finds
these layers by what the model declares when it is built:

- **torch's transformer modules**: a layer under a module whose ``batch_first`` is False
  (``nn.Transformer``, ``nn.MultiheadAttention``, any module of the caller's that declares it),
  or whose ``self_attn`` says so (``nn.TransformerEncoderLayer`` and
  ``nn.TransformerDecoderLayer`` keep the flag there);
- **transformers models that run sequence-first inside**: a layer under a module whose
  ``config.model_type`` is in :data:`SEQUENCE_FIRST_TYPES` (the whole model, embeddings and
  heads included, though some of those see the batch first: an error, never a wrong number).

The runtime refuses a per-row routing that sends rows to an adapter with weights on such a
layer (:func:`lorahot.runtime.routing.check_sequence_first`), as for a vision tower; under a
per-row routing these layers compute their base output, whatever their input's shape. A model
that transposes to sequence-first in its own code without declaring it is not found.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lorahot.runtime.module_paths import within

__all__ = ["SEQUENCE_FIRST_TYPES", "find_sequence_first", "sequence_first_paths"]

#: the ``config.model_type`` of transformers models whose layers see ``[T, B, ...]``: FSMT's
#: encoder and decoder layers, XLNet's layers and word embedding (it transposes the ids),
#: Longformer's and LED's encoder self-attention (``hidden_states.transpose(0, 1)`` before
#: ``query``, ``key``, ``value``), Mask2Former's masked-attention decoder
SEQUENCE_FIRST_TYPES = frozenset({"fsmt", "xlnet", "longformer", "led", "mask2former"})


def find_sequence_first(model: nn.Module, names: Iterable[str]) -> frozenset[str]:
    """The layers among ``names`` (dotted module paths in ``model``) that see their input
    sequence-first (see the module docstring)."""
    paths = set(sequence_first_paths(model))  # a lookup per level of a name (a module per block may declare it)
    return frozenset(n for n in names if within(n, paths))


def sequence_first_paths(model: nn.Module) -> list[str]:
    """The paths of the modules of ``model`` (``""`` for the model itself) under which every
    layer sees its input sequence-first, in the model's module order."""
    return [path for path, module in model.named_modules() if _declares(module)]


def _declares(module: nn.Module) -> bool:
    """Whether ``module`` says it runs sequence-first: ``batch_first`` False (its own, or its
    ``self_attn``'s), or a transformers config of a model type in :data:`SEQUENCE_FIRST_TYPES`."""
    if _batch_first(module) is False or _batch_first(module._modules.get("self_attn")) is False:
        return True
    config = module.__dict__.get("config")
    return getattr(config, "model_type", None) in SEQUENCE_FIRST_TYPES


def _batch_first(module: object) -> bool | None:
    """``module``'s own ``batch_first`` where it is a bool (not a property's or a child's)."""
    if not isinstance(module, nn.Module):
        return None
    flag = module.__dict__.get("batch_first")
    return flag if isinstance(flag, bool) else None
