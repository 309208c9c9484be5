"""The routed LoRA linear: each row of a batch adds its own slot's update, in one op per layer.

``routed_lora(x, y, a, bt, s, route)`` returns ``y + B_k(s_k * A_k x)`` row by row, ``k`` the
row's slot (``-1``: none, the row is ``y`` as it is), for the slot views of a layer's arena
(``a [slots, R, in]``, ``bt [slots, R, out]``, ``s [slots, R]``) and ``y`` the base output. It
is the operator ``lorahot::routed_lora`` (:mod:`lorahot.kernels.op_registry`): opaque to the
compiler (one node per layer, not a ``triton_op``, for the reason
:mod:`lorahot.kernels.triton_lora_linear` gives), shape-stable for CUDA graphs, with a
registered fake.

On CUDA (fp16/bf16, Triton present) it runs one of two Triton kernel pairs
(:mod:`lorahot.kernels.triton_routed_lora`), each a shrink then an expand:

- *gather* (as Punica's BGMV) for decode-sized inputs, at most :data:`GATHER_ROWS` rows: one
  program per row reads its own slot's A and B. Few rows read little, and nothing is sorted.
- *segmented* (as Punica's SGMV) above that: the rows grouped by slot (:func:`segments`, a
  stable sort of the routing's entries with each slot's start and count; the runtime computes
  it once per routing, at ``activate``, and every layer reads it), and each program multiplies
  a tile of rows that share a slot (16 rows up to 256 in all, 64 above) by that slot's A or B
  with tensor-core dots: a slot's weights are read once per tile of rows, not once per row.

Elsewhere it runs the library formula (gather + batched products), which is also the reference
the kernels are tested against. Rows are ``x``'s leading dimensions flattened; ``route [L]``
gives each of ``L`` equal consecutive groups of them its slot (one per sequence, or per token).
"""

from __future__ import annotations

from typing import Any

import torch

from lorahot.kernels import pdl
from lorahot.kernels.device_guard import launching_on
from lorahot.kernels.op_registry import define, refuse_grad
from lorahot.kernels.rows import as_rows
from lorahot.kernels.triton_import import triton_module

__all__ = [
    "GATHER_ROWS",
    "available",
    "check_rows",
    "check_segments",
    "rank_pad",
    "routed_lora",
    "reference",
    "reference_expand",
    "reference_shrink",
    "segments",
    "segments_fit",
    "token_route",
]

#: Up to this many rows the gather kernels run; above it, the segmented ones. A starting point
#: from the bytes: with more rows than slots, rows share slots and the gather kernels re-read
#: each shared slot's A and B once per row (from L2 at best).
GATHER_ROWS = 8


def _kernel() -> Any:
    """The Triton module, or None where Triton (or CUDA) is missing."""
    return triton_module("triton_routed_lora")


def available() -> bool:
    """Whether the routed kernels can run on this machine (CUDA and Triton present)."""
    return _kernel() is not None


def token_route(route: torch.Tensor, rows: int) -> torch.Tensor:
    """``[rows]``: the slot of each row of the flattened input, ``route [L]`` spread over ``L``
    equal consecutive groups (``rows`` a multiple of ``L``); no host sync."""
    length = route.shape[0]
    if rows == length:
        return route
    return route[:, None].expand(length, rows // length).reshape(rows)


def segments(route: torch.Tensor, slots: int) -> torch.Tensor:
    """The routing ``route [L]`` grouped by slot, as one int64 tensor ``[2 * (slots + 1) + L]``:
    each segment's first position and its count (``slots + 1`` segments, the entries of no slot
    last), then the entries' indices in slot order (stable). Fixed shapes and no host sync, on
    the host (the runtime, once per routing) or the device."""
    seg = torch.where(route < 0, slots, route)
    order = torch.argsort(seg, stable=True)
    counts = torch.zeros(slots + 1, dtype=torch.int64, device=route.device)
    counts.scatter_add_(0, seg, torch.ones_like(seg))
    return torch.cat([torch.cumsum(counts, 0) - counts, counts, order])


def segments_fit(segs: torch.Tensor, slots: int, length: int) -> bool:
    """Whether ``segs`` is :func:`segments` of a routing of ``length`` entries over ``slots`` slots
    (by its size: a shape, so a compiled graph decides it when it is traced)."""
    return segs.shape[0] == 2 * (slots + 1) + length


def check_segments(segs: torch.Tensor | None, slots: int, length: int) -> None:
    """Raises ValueError when ``segs`` is given and does not fit (see :func:`segments_fit`)."""
    if segs is not None and not segments_fit(segs, slots, length):
        raise ValueError(f"segs of {segs.shape[0]} entries do not go with {slots} slots and {length} rows")


def check_rows(rows: int, length: int) -> None:
    """Raises ValueError unless ``rows`` split into ``length`` equal groups, one per entry of a
    routing (asked inside the operators, where the sizes are numbers: the kernels would leave
    the rows past ``length`` groups unset, or read past the routing, on CUDA)."""
    fits = rows % length == 0 if length else rows == 0
    if not fits:
        raise ValueError(
            f"{rows} rows do not split into {length} equal groups: a routing has one entry per row, or per equal "
            "group of consecutive rows"
        )


def rank_pad(rank: int) -> int:
    """The rank as the routed kernels hold it: a power of two, at least 16 (a tensor-core dot's
    smallest side); a shrink's result ``H`` has this many columns."""
    return max(16, 1 << (max(rank, 1) - 1).bit_length())


def reference(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, s: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """The library formula on 2-D ``x [M, in]``, ``y [M, out]`` and ``tokens [M]``: each row's
    slot's A and B gathered, two batched products, the scales zero for ``-1`` rows."""
    return reference_expand(y, reference_shrink(x, a, s, tokens), bt, tokens)


def reference_shrink(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`reference`'s first half: each row's ``s_k * (x @ A_k.T)`` ``[M, R]``, zero on ``-1`` rows."""
    on = tokens >= 0
    index = tokens.clamp_min(0)
    h = torch.bmm(x[:, None, :].to(a.dtype), a[index].transpose(1, 2))[:, 0]  # (M, R)
    return h * (s[index] * on[:, None].to(s.dtype))


def reference_expand(y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """:func:`reference`'s second half: ``y`` plus each row's expand of its scaled shrink ``h [M,
    >= R]``; ``-1`` rows keep ``y`` whatever ``h`` holds there (a kernel may leave them unset)."""
    index = tokens.clamp_min(0)
    hr = torch.where((tokens >= 0)[:, None], h[:, : bt.shape[-2]], 0)  # not a product: unset rows may be NaN
    return y + torch.bmm(hr.to(bt.dtype)[:, None, :], bt[index])[:, 0].to(y.dtype)


def _fake(x: torch.Tensor, y: torch.Tensor, *_: object) -> torch.Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@define(
    "routed_lora(Tensor x, Tensor y, Tensor a, Tensor bt, Tensor s, Tensor route, Tensor? segs=None) -> Tensor", _fake
)
def _routed_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    segs: torch.Tensor | None = None,
) -> torch.Tensor:
    refuse_grad("routed_lora", x, y, a, bt)
    x2 = as_rows(x)
    check_rows(x2.shape[0], route.shape[0])
    y2 = as_rows(y)
    kernel = _kernel() if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) else None
    if kernel is None or x2.shape[0] == 0:
        return reference(x2, y2, a, bt, s, token_route(route, x2.shape[0])).view(y.shape)
    x2, y2 = x2.contiguous(), y2.contiguous()
    out = torch.empty_like(y2)
    with launching_on(x.device):
        gather = x2.shape[0] <= GATHER_ROWS
        kernel.launch(x2, y2, a, bt, s, route, out, gather=gather, segs=segs, early=pdl.active(x.device))
    return out.view(y.shape)


def routed_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    segs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y`` plus each row's own slot's update (see the module docstring).

    Args:
        x: ``[..., in]`` the layer's input.
        y: ``[..., out]`` its base output.
        a: ``[slots, R, in]`` every slot's A (rows of each slot contiguous).
        bt: ``[slots, R, out]`` every slot's B transposed.
        s: ``[slots, R]`` every slot's per-rank-row scales (float32).
        route: ``[L]`` int64, each group of rows' slot or -1; ``x``'s rows a multiple of ``L``.
        segs: ``segments(route, slots)``, where the caller keeps it per routing (else the
            segmented kernels compute it).

    Returns:
        ``[..., out]`` in ``y``'s dtype.
    """
    check_segments(segs, a.shape[0], route.shape[0])
    out: torch.Tensor = torch.ops.lorahot.routed_lora(x, y, a, bt, s, route, segs)
    return out
