"""Compiled wide layers whose input no generated kernel writes: one GEMM over ``[W; A]`` and an expand, no copy.

Compiled, a wide layer (:mod:`lorahot.kernels.wide_linear`) computes ``h = x @ A.T``, then one
GEMM over ``[x | h]`` and ``[W | B_s]``. The concatenation is free when ``x`` comes from a
kernel the compiler generates (a norm, an activation): that kernel writes ``x`` straight into
the buffer. When ``x`` comes from a kernel the compiler calls instead (attention, a GEMM, a
convolution) or is the graph's input, the compiler copies it into the buffer: one more kernel
per layer. On the SDXL-shaped UNet those are the 140 ``to_out.0`` layers after attention:
0.42 ms of GPU time per step and, in default mode, where each launch costs the host about
20 us, about 2.8 ms of the step (``benchmarks/README.md``, tenth session).

This pass rewrites such a layer into the formula that needs no buffer::

    [y | h] = x @ [W; A].T          # one GEMM, x read once (the wide buffer's first columns)
    out = y + h @ B_s.T (+ bias)    # the expand, its add folded into the output's consumer

Two launches, the shrink's and the copy's gone and the expand's added: one fewer per layer.
The GEMM is ``R`` outputs wider, and the expand's output is written and read once more, so it
only pays where the copy it saves is a launch: where the consumer is elementwise (a residual
add, as after ``to_out.0``), the add costs no kernel of its own.

A layer whose input feeds other wide layers too (cross-attention's k and v over the text
states) keeps the concatenated form: the stacked-shrink pass gives the group one shrink and one
copy kernel, ``g + 2`` launches for ``g`` layers where this form takes ``2 g``.

It runs in :class:`lorahot.kernels.stacked_shrinks.StackShrinks`, before the shrinks are
stacked, and matches only the wide layer's traced form::

    addmm(bias, cat([x, mm(x, permute(as_strided(arena, [R, in], ...)))]), permute(slice(wide, 0, 0, out)))

(``mm`` without a bias) with ``wide`` a graph input of shape ``[out + R, in + R]``. The rewrite
reads ``A`` from ``wide``'s last rows, not from the view the shrink reads: the two hold the same
values only for lorahot's own layers (the runtime keeps them equal). So a match needs two
things:

- *identity*: the GEMM, the concatenation, the shrink and their views were all traced from one
  call of ``lorahot::wide_traced`` (:func:`lorahot.kernels.fx_graph.traced_call`: dynamo records
  the call, AOTAutograd tags every aten node of its formula with it), which only a wide layer's
  compiled forward makes (with extras or without). A user's graph of the formula's shape, even
  with exactly a live layer's sizes, strides and offset (``cat([x, x @ bank.as_strided(...).T]) @
  mat[:n].T``), is traced from ``cat`` and ``matmul`` and passes through unchanged; rewritten,
  it would read ``mat``'s rows for ``A`` and give wrong numbers.
- *geometry*: the buffer and the A view have a live wide layer's shapes, strides and offset
  (:func:`register`), so a direct call of the private operator with other tensors is not
  rewritten either.

Where a torch version traced no ``source_fn_stack``, nothing matches: the layers keep their
concatenation (a launch more each), never a wrong number. The pass's cache id includes
:data:`ENABLED` and the registered geometries (:func:`signatures`).

**On by default, measured on the SDXL-shaped UNet** (H200, torch 2.11, the rest of lorahot the
same, ``benchmarks/README.md``, eleventh session): 140 fewer kernels per step (2534 to 2394); GPU
time 34.31 to 34.08 ms under CUDA graphs and 35.05 / 35.02 to 34.64 ms in default mode; the
step under CUDA graphs 39.83 to 39.36 ms (base 33.84). In default mode the steps of those runs
spread too widely (44-63 ms) to confirm the predicted -2.8 ms. Not measured on an LLM compiled
with static shapes, where its attention output projections at 2048 rows would take a GEMM
``R`` outputs wider (a 2048-wide layer took 44 us over 2112 outputs against 36 over 2048,
eighth session); with dynamic shapes (the default there) the layers run the wide operator,
which this pass does not match. ``ENABLED = False`` turns it off (the benchmarks'
``lorahot_noextern`` configuration does, in its own process).
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Any, TypeGuard

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lorahot.kernels.fx_graph import erase_unused, fake_mode, set_fake_values, source, traced_call

__all__ = ["ENABLED", "WIDE_TRACED", "rewrite_extern_inputs", "needs_copy", "register", "unregister", "signatures"]

#: whether :class:`~lorahot.kernels.stacked_shrinks.StackShrinks` runs this rewrite (on: see
#: the module docstring for what it was measured to save)
ENABLED = True

_aten = torch.ops.aten
#: ops that give another view of the same data: the producer is looked for behind them
_VIEWS = frozenset(
    {
        _aten.view.default,
        _aten.reshape.default,
        _aten._unsafe_view.default,
        _aten.permute.default,
        _aten.transpose.int,
        _aten.t.default,
        _aten.slice.Tensor,
        _aten.expand.default,
        _aten.squeeze.dim,
        _aten.unsqueeze.default,
        _aten.as_strided.default,
    }
)
#: the operator a wide layer's compiled forward calls (:func:`lorahot.kernels.wide_linear.wide_traced`):
#: the nodes of a match must all have been traced from one call of it
WIDE_TRACED = "lorahot::wide_traced"
#: producers the compiler calls rather than generates (default mode: library GEMMs,
#: convolutions, attention); a custom operator's output is one too (see :func:`needs_copy`)
_EXTERN = frozenset(
    {
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten.baddbmm.default,
        _aten.convolution.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
        _aten._efficient_attention_forward.default,
        _aten._flash_attention_forward.default,
    }
)


#: ``(wide shape, wide dtype, arena shape, A size, A strides, A offset)``: how a wide layer's
#: compiled forward reads its buffer and its live A (an ``as_strided`` view of the arena tensor)
Signature = tuple[tuple[int, ...], torch.dtype, tuple[int, ...], tuple[int, ...], tuple[int, ...], int]
#: every live wide layer's buffer -> its :data:`Signature` (gone with the buffer)
_LAYERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register(wide: torch.Tensor, root: torch.Tensor, a: tuple[tuple[int, ...], tuple[int, ...], int]) -> None:
    """Marks ``wide`` as a wide layer's buffer whose compiled forward reads its live A as
    ``root.as_strided(*a)`` (``root``: the arena tensor), where the runtime keeps the same
    values as ``wide``'s last rows: the rewrite, which reads them there, matches only graphs of
    such a geometry (see the module docstring)."""
    size, stride, offset = a
    _LAYERS[wide] = (tuple(wide.shape), wide.dtype, tuple(root.shape), tuple(size), tuple(stride), int(offset))


def unregister(wide: torch.Tensor) -> None:
    """Forgets ``wide`` (its layer was unwidened or ejected; something may still hold it)."""
    _LAYERS.pop(wide, None)


def signatures() -> tuple[Signature, ...]:
    """The live wide layers' geometries, sorted: part of the passes' cache id
    (:meth:`lorahot.kernels.stacked_shrinks.StackShrinks.uuid`), so that a graph compiled where
    the rewrite applied is not taken from inductor's cache into a process where it would not."""
    return tuple(sorted(set(_LAYERS.values()), key=repr))


def needs_copy(node: torch.fx.Node) -> bool:
    """Whether the compiler must copy ``node``'s data to put it in a concatenation: it is the
    graph's input, or (behind views) the output of a kernel the compiler calls rather than
    generates (:data:`_EXTERN`, an item of such an op's outputs, a custom operator)."""
    while node.op == "call_function" and node.target in _VIEWS and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if node.op == "placeholder":
        return True
    if node.op != "call_function":
        return False
    if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]  # one output of a multi-output op (attention's)
    target = node.target
    if target in _EXTERN:
        return True
    namespace = getattr(target, "namespace", None)
    return namespace is not None and namespace not in ("aten", "prims")


def rewrite_extern_inputs(graph: torch.fx.Graph) -> int:
    """Rewrites every compiled wide layer whose input :func:`needs_copy` and feeds no other
    wide layer (see the module docstring); returns how many. Layers that share an input keep
    the concatenated form: their shrinks are stacked into one GEMM and the copies into one
    kernel, ``g + 2`` launches for ``g`` layers where this form takes ``2 g``."""
    known = set(_LAYERS.values())
    if not known:
        return 0
    found = [(node, match) for node in graph.nodes if (match := _match(node, known)) is not None]
    sharing = Counter(source(match[0]) for _, match in found)
    done = 0
    for node, _ in found:
        # matched again: a rewrite before this one may have replaced this layer's input (a
        # wide layer over another's output now reads that layer's expand, an addition)
        match = _match(node, known)
        if match is not None and sharing.get(source(match[0]), 1) == 1 and needs_copy(match[0]):
            _rewrite(graph, node, *match)
            done += 1
    return done


#: ``(x, shrink, wide, bias, out, in, rank)`` of a matched layer
Match = tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node, Any, int, int, int]


def _match(node: torch.fx.Node, known: set[Signature]) -> Match | None:
    """The parts of a wide layer's main GEMM ``node`` (see the module docstring), or None;
    ``known``: the live wide layers' geometries (:func:`register`)."""
    if node.op != "call_function" or node.target not in (_aten.addmm.default, _aten.mm.default):
        return None
    args: Any = node.args  # the graph's arguments, checked below
    bias, cat, weight = (None, *args) if node.target is _aten.mm.default else args[:3]
    if node.kwargs or len(node.args) > (2 if bias is None else 3):  # beta / alpha given
        return None
    if not (_is(cat, _aten.cat.default) and _is(weight, _aten.permute.default)) or len(cat.users) != 1:
        return None
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and dim in (1, -1)):
        return None
    x, shrink = parts
    if not (isinstance(x, torch.fx.Node) and _is(shrink, _aten.mm.default)) or shrink.args[0] is not x:
        return None
    if len(shrink.users) != 1 or not _is(shrink.args[1], _aten.permute.default):
        return None
    strided = shrink.args[1].args[0]
    if not _is(strided, _aten.as_strided.default) or not isinstance(strided.args[0], torch.fx.Node):
        return None
    rows = weight.args[0]  # slice(wide, 0, 0, out)
    order: Any = weight.args[1]
    if not _is(rows, _aten.slice.Tensor) or list(order) != [1, 0]:
        return None
    wide, dim0, start, stop = (*rows.args, None, None, None)[:4]
    if not (isinstance(wide, torch.fx.Node) and wide.op == "placeholder" and dim0 == 0 and start == 0):
        return None
    shapes = [_shape(n) for n in (x, shrink, wide)]
    if any(s is None or len(s) != 2 for s in shapes):
        return None
    (_, k), (_, r), (rows_total, cols_total) = shapes  # type: ignore[misc]
    n = rows_total - r
    if cols_total != k + r or stop != n or not all(isinstance(v, int) for v in (k, r, n)):
        return None
    if not _one_wide_call(node, cat, shrink, shrink.args[1], weight, rows):  # a user's graph of the formula
        return None
    if _signature(wide, strided) not in known:  # the formula's shape, not a lorahot layer's reads
        return None
    return x, shrink, wide, bias, n, k, r


def _one_wide_call(*nodes: torch.fx.Node) -> bool:
    """Whether every one of ``nodes`` was traced from the same call of :data:`WIDE_TRACED`."""
    calls = {traced_call(node) for node in nodes}
    if len(calls) != 1:
        return False
    call = calls.pop()
    return call is not None and call[1] == WIDE_TRACED


def _signature(wide: torch.fx.Node, strided: torch.fx.Node) -> Signature | None:
    """The :data:`Signature` of a matched GEMM's ``wide`` input and its shrink's ``as_strided``
    A, as the graph reads them; None where a size is symbolic or missing."""
    root: Any = strided.args[0]  # a node: _match checked it
    val, base = wide.meta.get("val"), root.meta.get("val")
    args: Any = (*strided.args[1:], 0)[:3]
    if not (isinstance(val, torch.Tensor) and isinstance(base, torch.Tensor)):
        return None
    try:
        size, stride, offset = (tuple(int(v) for v in args[0]), tuple(int(v) for v in args[1]), int(args[2]))
        return (tuple(int(v) for v in val.shape), val.dtype, tuple(int(v) for v in base.shape), size, stride, offset)
    except (TypeError, ValueError):  # a symbolic size (the compiler's own) or an argument of another kind
        return None


def _rewrite(graph: torch.fx.Graph, main: torch.fx.Node, x: torch.fx.Node, shrink: torch.fx.Node,
             wide: torch.fx.Node, bias: Any, n: int, k: int, r: int) -> None:  # fmt: skip
    """``main`` (the GEMM over ``[x | h]``) becomes ``[y | h] = x @ wide[:, :k].T``, then
    ``y + h @ wide[:n, k:].T (+ bias)``."""
    cat: Any = main.args[1] if bias is not None else main.args[0]
    new: list[torch.fx.Node] = []

    def call(target: Any, *args: Any) -> torch.fx.Node:
        node = graph.call_function(target, args)
        new.append(node)
        return node

    with graph.inserting_before(main):
        columns = call(_aten.slice.Tensor, wide, 1, 0, k)  # [W; A]
        both = call(_aten.mm.default, x, call(_aten.permute.default, columns, [1, 0]))
        y = call(_aten.slice.Tensor, both, 1, 0, n)
        h = call(_aten.slice.Tensor, both, 1, n, n + r)
        b_s = call(_aten.slice.Tensor, call(_aten.slice.Tensor, wide, 0, 0, n), 1, k, k + r)
        out = call(_aten.add.Tensor, y, call(_aten.mm.default, h, call(_aten.permute.default, b_s, [1, 0])))
        if bias is not None:
            out = call(_aten.add.Tensor, out, bias)
    set_fake_values(fake_mode(main), new)
    main.replace_all_uses_with(out)
    for old in (main, cat, shrink):
        erase_unused(graph, old, _VIEWS)


def _is(node: Any, target: Any) -> TypeGuard[torch.fx.Node]:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is target


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
