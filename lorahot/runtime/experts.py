"""Which injected layers belong to a mixture-of-experts block's experts.

An expert runs on the tokens its router picked, gathered in the router's order: its rows are
not the batch's, and a per-row routing cannot give them their rows' slots
(:func:`lorahot.runtime.routing.check_experts` refuses to try). A layer's input shape cannot
tell (a subset of exactly ``L`` tokens fits a routing of ``L`` entries), so the runtime finds
the experts when it is built, by either of two signs:

- **the name**: a component ``experts`` in the layer's path
  (:func:`lorahot.layers.routing.is_expert`), which every MoE block of transformers and
  diffusers uses;
- **the structure**, for blocks named otherwise: the layer sits under a list of ``n >= 2``
  modules whose parent also holds a router, a 2-D weight with one dimension ``n`` and the other
  the width of a linear layer in the list's first entry. A list is an ``nn.ModuleList`` or
  ``nn.ModuleDict``, or a module whose children are all of one class and each holds modules of
  its own (transformers' Switch Transformers keeps its experts so). The router is the parent's
  own parameter or a weight of its child or grandchild outside the list (``gate``,
  ``router.classifier``).

A false sign costs an error (the adapter cannot be routed per row; ``activate(k)`` still runs
it), where a missed one would cost wrong numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lorahot.layers.base import LoRALayer
from lorahot.layers.routing import is_expert
from lorahot.runtime.module_paths import above

__all__ = ["find_experts", "expert_lists"]


def find_experts(model: nn.Module, names: Iterable[str]) -> frozenset[str]:
    """The layers among ``names`` (dotted module paths in ``model``) that belong to a
    mixture-of-experts block's experts, by name or by structure (see the module docstring)."""
    lists = set(expert_lists(model))
    return frozenset(n for n in names if is_expert(n) or any(p in lists for p in above(n)))


def expert_lists(model: nn.Module) -> list[str]:
    """The paths of the lists in ``model`` that hold a mixture-of-experts block's experts by
    structure: ``n >= 2`` entries beside a router (see the module docstring)."""
    found = []
    for path, parent in model.named_modules():
        routers: _Routers | None = None  # made for the first list of ``parent`` that needs it
        for name, child in parent.named_children():
            entries = _entries(child)
            if entries:
                widths = _widths(entries[0])
                if widths:
                    routers = routers or _Routers(parent)
                    if routers.route(child, len(entries), widths):
                        found.append(f"{path}.{name}" if path else name)
    return found


def _entries(module: nn.Module) -> list[nn.Module]:
    """The entries of ``module`` where it is a list of at least two (see the module
    docstring), else none."""
    children = list(module.children())
    if len(children) < 2:
        return []
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return children
    kind = type(children[0])
    # each entry holds modules of its own (an expert's MLP), not a leaf layer, nor a leaf
    # wrapped by inject (whose one child is the layer it wraps)
    if all(type(c) is kind and next(c.children(), None) is not None for c in children) and not issubclass(
        kind, LoRALayer
    ):
        return children
    return []


def _widths(entry: nn.Module) -> set[int]:
    """Both dimensions of every linear weight in ``entry`` (the input widths it may take:
    ``nn.Linear`` stores ``[out, in]``, a GPT-2 ``Conv1D`` ``[in, out]``)."""
    return {
        size
        for module in entry.modules()
        for weight in [module._parameters.get("weight")]
        if isinstance(weight, torch.Tensor) and weight.dim() == 2
        for size in weight.shape
    }


class _Routers:
    """The 2-D weights that may route ``parent``'s lists: its own parameters and the weights of
    its children and grandchildren, indexed by ``(n, width)`` for either orientation, each with
    the modules it comes from. A parent holding many lists (a ``ModuleList`` of blocks, each a
    ``ModuleDict``) had its every child and grandchild scanned for each list: the blocks squared."""

    def __init__(self, parent: nn.Module) -> None:
        #: (n, width) -> the modules each such weight comes from (none: ``parent``'s own)
        self._weights: dict[tuple[int, int], list[tuple[nn.Module, ...]]] = {}
        for weight in parent._parameters.values():
            self._add(weight, ())
        for child in parent.children():
            self._add(child._parameters.get("weight"), (child,))
            for grand in child.children():
                self._add(grand._parameters.get("weight"), (child, grand))

    def _add(self, weight: object, sources: tuple[nn.Module, ...]) -> None:
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            rows, cols = weight.shape
            self._weights.setdefault((rows, cols), []).append(sources)
            if cols != rows:
                self._weights.setdefault((cols, rows), []).append(sources)

    def route(self, experts: nn.Module, n: int, widths: set[int]) -> bool:
        """Whether a weight of ``n`` rows (or columns) over one of ``widths`` comes from outside
        ``experts``: ``parent``'s own, or a child's or grandchild's other than ``experts``. Only
        the weights of ``experts`` and its children are passed over before one is found."""
        for width in widths:
            for sources in self._weights.get((n, width), ()):
                if all(module is not experts for module in sources):
                    return True
        return False
