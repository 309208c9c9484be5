"""Global handles on the arena tensors, so a compiled graph reads them once, not once per layer.

``torch.compile`` guards every tensor it reaches through a module attribute, once per
attribute path, and makes each one a graph input: with views registered on each of a model's
154 LoRA layers, every call re-checks 462 tensors (dtype, device, shape, strides) and passes 462
inputs. Reached through one global key instead, each arena tensor is guarded and passed once.
Its shape is marked static (under ``dynamic=True`` a batch size that happens to equal one of its
sizes would otherwise be tied to it, and a later batch size would recompile), and on CUDA its
address too, so CUDA graphs read it in place. Marking imports ``torch._dynamo`` (about 1.4 s
once on a CPU box), which ``torch.compile`` imports anyway.

A :class:`TensorHandle` owns one entry of :data:`TENSORS`; the arena and every layer bound to
it hold the handle. When the handle is collected its entries are emptied in place (the tensors
released; the dictionaries keep their size) and removed when the next handle is made. A
collection can run in the middle of the compiler's tracing of another model, while it iterates
over these dictionaries: removing the entry then made the trace fail with "dictionary changed
size during iteration". It owns the same key of :data:`ROUTES`: None
while the whole batch computes with the live region, else the per-row routing (an int64 device
tensor ``[L]``, one slot per row, -1 for none; see :mod:`lorahot.layers.routing`), and the same
key of :data:`TOKENS`: whether that routing has one entry per token of packed input
(``activate(slots, lengths=...)``) rather than one per row, and of :data:`SEGMENTS`: that routing
grouped by slot, for the segmented kernels, and of
:data:`WORKSPACES`: a float32 workspace, zero between calls, that the routed decode's shrink adds
into (:mod:`lorahot.kernels.routed_linear`). Only the runtime writes them, in place for a new
routing of the same length; it makes the workspace once, with the first routing. A copy of a
handle (a copied or pickled model's) owns a new key, over the copied tensors, with copies of
the routing the original had when it was copied (a copy has no runtime: its routing stays).

A new handle takes the smallest key that no live handle holds (a collected handle's key is
free once its entries are removed): a model injected after the last one was ejected and dropped
reads its arenas under that one's keys, so its compiled forward is served by the graph compiled
for the last one, whose guards read the entries' shapes and kinds, not which tensors they are;
a fresh model without LoRA is served the same way. With a new key for every handle, each fresh
model compiled again, and past dynamo's ``recompile_limit`` (8) its class ran eagerly.
"""

from __future__ import annotations

import itertools
import weakref

import torch

__all__ = [
    "TensorHandle",
    "TENSORS",
    "ROUTES",
    "TOKENS",
    "SEGMENTS",
    "WORKSPACES",
    "FROZEN",
    "publish_workspace",
    "mark_static",
]

#: key -> tensors; read by the layers' forward under ``torch.compile`` (see :mod:`lorahot.layers.base`).
TENSORS: dict[int, tuple[torch.Tensor, ...]] = {}
#: key -> the per-row routing of the layers bound to that arena, or None (the whole batch reads
#: the live region). A compiled graph guards on which of the two it is, and on the routing's length.
ROUTES: dict[int, torch.Tensor | None] = {}
#: key -> whether the routing in :data:`ROUTES` has one entry per token of packed input
#: (``activate(slots, lengths=...)``), not one per row: which inputs fit it
#: (:func:`lorahot.layers.routing.row_misfit`). False with no routing.
TOKENS: dict[int, bool] = {}
#: key -> the routing in :data:`ROUTES` grouped by slot (:func:`lorahot.kernels.routed_lora.segments`),
#: computed once per routing so that no layer sorts it again; None with no routing.
SEGMENTS: dict[int, torch.Tensor | None] = {}
#: key -> the routed shrink's workspace (float32 ``[rows, rank]``, all zero whenever no layer is
#: running; see :mod:`lorahot.kernels.routed_linear`), or None (the kernels then zero one per call).
WORKSPACES: dict[int, torch.Tensor | None] = {}
#: keys whose arena a graph compiled with inductor's ``freezing`` read, holding it as constants
#: (:func:`lorahot.layers.recording._compiled`); a key leaves it with its entries (:func:`_purge`)
FROZEN: set[int] = set()
#: a handle's routing as :meth:`TensorHandle.__reduce__` copies it: ``(ROUTES, TOKENS, SEGMENTS)`` entries
Routing = tuple[torch.Tensor | None, bool, torch.Tensor | None]
#: keys of collected handles, emptied in place, to remove at the next safe point
_retired: list[int] = []


class TensorHandle:
    """Keeps ``tensors`` in :data:`TENSORS` under :attr:`key` for as long as it lives."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], routing: Routing | None = None) -> None:
        _purge()  # a safe point: inject, not a compiled model's trace
        self.key = next(k for k in itertools.count() if k not in TENSORS)  # see _purge
        TENSORS[self.key] = tensors
        ROUTES[self.key] = SEGMENTS[self.key] = WORKSPACES[self.key] = None
        TOKENS[self.key] = False
        if routing is not None:  # a copy's (see __reduce__)
            ROUTES[self.key], TOKENS[self.key], SEGMENTS[self.key] = routing
        weakref.finalize(self, _retire, self.key)
        for t in tensors:  # not the routing: a graph takes it as an input, as the runtime's own
            mark_static(t)

    def __reduce__(self) -> tuple[type[TensorHandle], tuple[tuple[torch.Tensor, ...], Routing]]:
        """A copy (``deepcopy``, ``torch.save`` of the model) is a handle of its own, on the
        copied tensors and a copy of the routing in force (the per-row slots, whether they are
        per token, their segments): sharing this key, a copy's compiled forward would read the
        original's arena and its forward the original's later routings; without the routing,
        every row of a routed model's copy computed with the live slot."""
        routing = (ROUTES.get(self.key), TOKENS.get(self.key, False), SEGMENTS.get(self.key))
        return (TensorHandle, (TENSORS.get(self.key, ()), routing))


def mark_static(t: torch.Tensor) -> None:
    """``t``'s shape static for the compiler, and on CUDA its address too (CUDA graphs read it
    in place, not copied in at each replay)."""
    from torch._dynamo import mark_static as static_shape
    from torch._dynamo import mark_static_address

    static_shape(t)
    if t.is_cuda:
        mark_static_address(t, guard=False)


def _retire(key: int) -> None:
    """A collected handle's entries emptied in place: its tensors and routing released, no
    dictionary resized (see the module docstring)."""
    if key in TENSORS:
        TENSORS[key] = ()
    if key in ROUTES:
        ROUTES[key] = None
    if key in TOKENS:
        TOKENS[key] = False
    if key in SEGMENTS:
        SEGMENTS[key] = None
    if key in WORKSPACES:
        WORKSPACES[key] = None
    _retired.append(key)


def _purge() -> None:
    """Removes the entries of collected handles."""
    while _retired:
        key = _retired.pop()
        for table in (TENSORS, ROUTES, TOKENS, SEGMENTS, WORKSPACES):
            table.pop(key, None)
        FROZEN.discard(key)


def publish_workspace(key: int, workspace: torch.Tensor) -> None:
    """Publishes ``workspace`` (zeroed) under ``key`` in :data:`WORKSPACES`, marked as the
    arena tensors are (:func:`mark_static`)."""
    mark_static(workspace)
    WORKSPACES[key] = workspace
