"""Per-row routing inside a layer: row ``i`` of a batch computes with slot ``route[i]``.

The runtime publishes a routing (``runtime.activate([2, 0, -1, 2])``) as an int64 device tensor
``route [L]`` under the arena's key in :data:`~lorahot.layers.tensor_handles.ROUTES`; ``-1``
means the base model only. A layer then reads every slot's region of the arena at once (its
*slot views*: ``A [slots, R, ...]``, ``B``, ``S [slots, R]``, extras ``[slots, 4, out, ...]``,
rebuilt from the arena tensors like the live views) and gives each row its own slot's update.

Which part of the layer's input is a "row" (:func:`row_misfit`, :func:`misfit_message`):

- a convolution: its batch dimension, so ``x.shape[0] == L`` (batched input only);
- a linear or an embedding, under a routing of one entry per row (``activate(slots)``): the
  first of its leading dimensions (all but ``in`` for a linear, all for the ids of an
  embedding), the batch: ``[B, T, in]`` or ``[B, H, T, d]`` with ``L = B`` routes each
  sequence, ``[B, in]`` each row. Tokens flattened to one leading dimension, ``[B * T, in]``
  with ``L = B``, split into ``L`` equal consecutive groups: each row's ``T`` tokens take its
  slot (a linear only: an embedding's 1-D ids ``[k * L]`` are as often one sequence every row
  shares, such as positions ``arange(T)``, and are refused; route flattened ids per token with
  ``lengths=``);
- a linear or an embedding, under a routing of one entry per token of packed input
  (``activate(slots, lengths=...)``, ``L`` tokens in all): every leading position, rows
  outermost (``[1, N, in]``, ``[N, in]`` or ``[B, T, in]`` with ``L = N = B * T``).

Anything else (a routing left from a batch of another size, a batch expanded after the
routing was set, sequence-first input, packed input whose ``lengths`` do not add up to its
tokens, an input shared by every row such as position embeddings ``[1, T]`` under a routing of
``B`` rows, ``T == B`` included) could give rows the wrong slots, so it is refused. A routing of
one entry per token is only read as such when it says so (``lengths=``): by its shape alone a
batch of ``B`` rows of ``B`` tokens cannot be told from ``B`` packed tokens.
The shape alone cannot catch a routing left from another batch whose length equals this
batch's size (or divides its flattened tokens), so each batch's routing is set before its
forward; nor rows a layer sees in another order than the batch's, which is why the runtime
refuses to route the experts of a mixture-of-experts block (each runs on the tokens its router
picked: :func:`lorahot.runtime.routing.check_experts`). A batch of ``k * L`` rows may have
been expanded either way: doubled for classifier-free guidance (``[uncond; cond]``, routed
``slots + slots``) or with each row repeated in place (beam search, routed with each entry
repeated); lorahot cannot tell which, so it asks for the routing as expanded. The refusal is
a :class:`~lorahot.errors.UsageError` when the layer runs (:func:`lorahot.layers.refusal.refuse`:
under ``torch.compile`` too, without breaking the compiled model for the inputs that fit).

The rank-wide per-row scales ``s[route[i]]`` are zero on ``-1`` rows, their extras (DoRA
factor, LoRA bias) take the no-adapter values, and the library formula keeps their base output
as it is (selected, not added: an update that overflowed would not be zeroed by a zero scale),
so such a row computes the base output bitwise. (On CUDA the routed fused kernel, which takes
inputs of up to 128 rows (``lora_linear.routed_worth_it``), computes the base product itself:
its ``-1`` rows equal the base layer's output to the dtype's rounding, not bitwise.) The
library formula gathers each entry's A and B where that copy is shared by enough rows
(:func:`gathers`); where the entries outnumber the slots and each holds fewer rows than there
are slots (a decode batch, one entry per token of packed input) a linear or an embedding
instead runs every slot's shrink over every row and keeps each row's own slot's columns, so
no slot's weights are copied per entry. Every routed layer takes that form too where batched
products are miscomputed (:func:`batched_products`: the CPU under ``torch.compile`` with
max-autotune), a conv with every slot's B in one grouped convolution.
On CUDA a linear layer takes the routed kernel (:mod:`lorahot.kernels.routed_lora`), which
reads each slot's weights once per tile of rows.
"""

from __future__ import annotations

import math
import re

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lorahot.kernels import compile_mode
from lorahot.layers.refusal import literal

__all__ = [
    "EXPERTS",
    "is_expert",
    "slot_geometry",
    "row_misfit",
    "misfit_message",
    "row_scales",
    "gathers",
    "batched_products",
    "every_slot_expand",
    "constant",
]

#: the module name under which a mixture-of-experts block keeps its experts, in every
#: implementation of one that lorahot knows (transformers' Mixtral, Qwen-MoE, DeepSeek, OLMoE,
#: Jamba, Switch Transformers and NLLB-MoE; diffusers' HiDream): a layer with this component in
#: its path is an expert's (:func:`is_expert`). A block's shared experts (``shared_experts``,
#: ``shared_expert``) run on every token and are not experts here.
EXPERTS = "experts"


def is_expert(path: str) -> bool:
    """Whether the layer at module ``path`` (dotted; a runtime over several models may prefix
    a component with ``:``) belongs to a mixture-of-experts block's experts. Such a layer runs
    on the tokens its router gathered, not on the batch's rows: the runtime refuses a routing
    that sends rows to an adapter with weights on one
    (:func:`lorahot.runtime.routing.check_experts`), so under a per-row routing the layer
    computes its base output alone, whatever its input's shape."""
    return EXPERTS in re.split(r"[.:/]", path)


#: ``(shape, stride, storage offset)`` of a view of an arena tensor.
Geometry = tuple[tuple[int, ...], tuple[int, ...], int]


def slot_geometry(view: torch.Tensor, root: torch.Tensor) -> Geometry:
    """The geometry of ``view`` (a layer's view of one region of ``root [regions, ...]``) over
    every slot: a leading dimension of ``slots`` regions (``regions - 1`` when a live region
    follows them, else 1), the slot's region at the same place as the view in its own. A view
    that covers all of its root is one slot."""
    if view.numel() == root.numel():  # the view is all of its tensor (bound by hand, or one region): one slot
        return (1, *view.shape), (0, *view.stride()), int(view.storage_offset())
    regions = root.shape[0]
    slots = regions - 1 if regions > 1 else 1
    step = root.stride(0)
    return (slots, *view.shape), (step, *view.stride()), int(view.storage_offset()) % step


def row_misfit(x: torch.Tensor, length: int, kind: str, dims: int, tokens: bool = False) -> bool:
    """Whether ``x`` does not split into ``length`` routed rows (see the module docstring).

    Args:
        x: the layer's input.
        length: entries of the routing.
        kind: the layer kind (``"conv"`` routes the batch dimension only).
        dims: trailing dimensions that are not rows (1 for a linear's ``in``, 0 for ids, the
            channels and spatial dimensions for a conv).
        tokens: whether the routing has one entry per token of packed input
            (``activate(slots, lengths=...)``), not one per row.
    """
    leading = tuple(x.shape)[: x.dim() - dims]
    if kind == "conv":
        return not (len(leading) == 1 and leading[0] == length)
    if tokens:  # every leading position is one token, rows outermost
        return not (leading and math.prod(leading) == length)
    if leading and leading[0] == length:
        return False
    if dims == 0:  # an embedding's 1-D ids: flattened rows, or one sequence every row shares (arange(T))
        return True
    return not (len(leading) == 1 and leading[0] % length == 0)  # tokens flattened, rows outermost


def misfit_message(what: str, kind: str, tokens: bool = False) -> str:
    """The message of the :class:`~lorahot.errors.UsageError` for an input that does not fit
    the routing (:func:`row_misfit`), as a :func:`lorahot.layers.refusal.refuse` template:
    ``{0}`` the input's shape, ``{1[0]}`` the routing's length. ``what``: the layer (its module
    path and kind); ``tokens``: whether the routing has one entry per token of packed input."""
    if kind == "conv":
        rule = "a conv routes its batch dimension, so its input must be batched with one row per entry"
    elif tokens:
        rule = (
            "this routing has one entry per token of packed input (activate(slots, lengths=...)), so the input's "
            "leading dimensions must hold exactly that many tokens, rows outermost"
        )
    else:
        rule = (
            "one entry per row of its first dimension (the batch) or, with the tokens flattened to one dimension, "
            "per equal group of them, rows outermost (a linear's input only: an embedding's 1-D ids may be one "
            "sequence every row shares); an input every row shares (position ids [1, T] or [T]) cannot take a "
            "slot per row, and packed input is routed per token with activate(slots, lengths=...)"
        )
    return (
        f"{literal(what)}: its input {{0}} does not fit a routing of {{1[0]}} entries: {rule}. Call runtime.activate "
        "with one slot per row of this batch (a batch expanded after the routing was set needs the routing expanded "
        "the same way: doubled for classifier-free guidance, each entry repeated for beams; "
        "activate(slots, lengths=...) expands the slots to packed tokens), or runtime.activate(k) to run the whole "
        "batch with slot k."
    )


def row_scales(scales: torch.Tensor, route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(on [L] bool, index [L] int64, s [L, R])``: whether each row has a slot, its slot (0 for
    none) and its per-rank-row scales (zero for none), from ``scales [slots, R]``."""
    on = route >= 0
    index = route.clamp_min(0)
    return on, index, scales[index] * on[:, None].to(scales.dtype)


def gathers(length: int | torch.SymInt, rows: int | torch.SymInt, slots: int) -> bool:
    """Whether the library formula gathers each of ``length`` entries' A and B (a copy of a
    slot's weights per entry, two batched products), rather than running every slot's shrink
    over every row and keeping each row's own (``slots`` times the shrink's work, no copy): where
    the entries are no more than the slots, or each holds at least as many ``rows`` as there are
    slots (the copy shared by them), or the rows per entry are symbolic (sequences of any
    length). More entries than slots, each with fewer rows than there are slots (a decode
    batch, per-token routing of packed input: thousands of entries), take the other form.
    Asked without a guard."""
    if constant(length) and length <= slots:
        return True
    return not (constant(rows) and rows < slots)


def batched_products(x: torch.Tensor) -> bool:
    """Whether the library formula may give each row its own weights by batched products
    (``bmm``, ``einsum``) over the rows of ``x`` (a layer's input): not on the CPU under
    ``torch.compile`` with max-autotune, whose ``bmm`` miscomputes a symbolic batch
    (:func:`lorahot.kernels.compile_mode.autotunes_gemms`). There the layers take the form of
    :func:`every_slot_expand`, whose products are 2-D. Asked without a guard."""
    return x.device.type != "cpu" or not compile_mode.autotunes_gemms()


def every_slot_expand(h: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[L, T, out]``: each row's own slot's columns of ``h [L, T, slots, R]`` (every slot's
    shrink of every row; selected, not multiplied, so another slot's overflow stays out) times
    its per-rank-row ``scales [L, R]``, expanded by one product with every slot's ``b [slots, R,
    out]`` (the other slots' columns zero); ``index [L]`` each entry's slot."""
    slots, rank = b.shape[0], b.shape[1]
    own = (index[:, None] == torch.arange(slots, device=index.device))[:, None, :, None]  # (L, 1, S, 1)
    h = torch.where(own, h * scales[:, None, None, :], 0).to(h.dtype).flatten(-2)  # (L, T, S * R)
    return torch.matmul(h, b.reshape(slots * rank, b.shape[-1]))


def constant(size: int | torch.SymInt) -> bool:
    """Whether ``size`` is a constant: always eagerly, and under ``torch.compile`` with static
    shapes; not for a symbolic batch under dynamic shapes. Asked without a guard: a symbol's
    known range never settles its parity, a constant's always does (``isinstance`` cannot tell,
    the compiler answers it as for an ``int``)."""
    return statically_known_true(size % 2 == 0) or statically_known_true(size % 2 == 1)
