"""What the compiler passes (:mod:`lorahot.kernels.stacked_shrinks`, :mod:`lorahot.kernels.extern_inputs`)
share for reading and editing inductor's post-grad FX graph: a node's rows behind reshapes, the
fake values new nodes need, and erasing what a rewrite left unused."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

import torch

__all__ = [
    "RESHAPES",
    "adjacent_runs",
    "arena_view",
    "erase_unused",
    "traced_call",
    "fake_mode",
    "set_fake_values",
    "source",
    "splice",
]

_T = TypeVar("_T")

_aten = torch.ops.aten
#: ops that give the same rows another shape (a layer reshapes its input to 2-D)
RESHAPES = frozenset({_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default})


def source(node: torch.fx.Node) -> tuple[Any, ...]:
    """What ``node`` reads, up to reshapes, and its shape (a string: a symbolic row count is not
    hashable): two layers reshaping one input to 2-D make two view nodes of the same rows."""
    shape = str(tuple(node.meta["val"].shape)) if "val" in node.meta else None
    while node.op == "call_function" and node.target in RESHAPES and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return (node, shape)


def traced_call(node: torch.fx.Node) -> tuple[str, str] | None:
    """The call of the user's program that ``node`` was traced from: ``(the call's name in the
    compiler's first graph, the qualified name of what it called)``, from the ``source_fn_stack``
    that dynamo records and AOTAutograd copies to every aten node of the call's decomposition
    (one call of ``lorahot::wide_traced`` gives ``("wide_traced_3", "lorahot::wide_traced")`` on
    each node of its formula); None where the node carries none (a node a pass made)."""
    stack = node.meta.get("source_fn_stack")
    if not stack:
        return None
    name, fn = stack[-1]
    what = getattr(fn, "_qualified_op_name", None) or getattr(fn, "__qualname__", None) or repr(fn)
    return str(name), str(what)


def arena_view(node: Any, dims: int) -> tuple[torch.fx.Node, list[int], list[int], int] | None:
    """``(arena, size, stride, offset)`` where ``node`` is ``as_strided(arena, size, stride,
    offset)`` of a graph input (how a compiled layer reads its arena view), ``dims`` integer
    dimensions, the last contiguous; else None. Without an offset ``as_strided`` keeps its
    input's own, which the graph does not show: None too."""
    if not (isinstance(node, torch.fx.Node) and node.target is _aten.as_strided.default):
        return None
    arena, size, stride = node.args[:3]
    offset = node.args[3] if len(node.args) > 3 else node.kwargs.get("storage_offset")
    if not (isinstance(arena, torch.fx.Node) and arena.op == "placeholder" and isinstance(offset, int)):
        return None
    if not (isinstance(size, (list, tuple)) and isinstance(stride, (list, tuple))):
        return None
    if len(size) != dims or len(stride) != dims or not all(isinstance(v, int) for v in (*size, *stride)):
        return None
    if stride[-1] != 1:
        return None
    return arena, list(size), list(stride), offset


def adjacent_runs(members: list[_T], follows: Callable[[_T, _T], bool]) -> list[list[_T]]:
    """``members`` (in the order of their place in a buffer) cut into runs in which each one
    ``follows`` the one before it (lies right after it in the buffer)."""
    runs: list[list[_T]] = []
    for member in members:
        if runs and follows(runs[-1][-1], member):
            runs[-1].append(member)
        else:
            runs.append([member])
    return runs


def fake_mode(node: torch.fx.Node) -> Any:
    """The fake mode of ``node``'s value, or None."""
    return getattr(node.meta.get("val"), "fake_mode", None)


def set_fake_values(fake: Any, nodes: Iterable[torch.fx.Node]) -> None:
    """Gives new nodes the ``val`` (a fake tensor) later passes read, by running them in order
    in the graph's fake mode."""
    if fake is None:
        return
    with fake:
        for node in nodes:
            args = torch.fx.node.map_arg(node.args, lambda n: n.meta["val"])
            kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: n.meta["val"])
            node.meta["val"] = node.target(*args, **kwargs)  # type: ignore[operator]


def splice(
    graph: torch.fx.Graph,
    fn: Callable[..., list[torch.Tensor]],
    args: tuple[torch.fx.Node, ...],
    fake: Any,
    memo: dict[Any, torch.fx.Graph] | None = None,
    key: Any = None,
    own_values: bool = True,
) -> list[torch.fx.Node]:
    """``fn`` traced to aten on the fake values of ``args`` (in the graph's fake mode ``fake``,
    with inductor's decompositions, symbolic sizes read from the inputs), its nodes copied into
    ``graph`` at the insertion point with ``args`` for its inputs; returns its outputs' nodes.

    With ``memo`` (a dict the caller keeps for one graph) and ``key`` (what ``fn`` computes,
    beyond its inputs' metadata), a trace is made once per key and metadata of ``args`` (shapes,
    strides, offsets, dtypes, devices) and copied again for later calls: tracing costs tens of
    milliseconds, which the UNet's 70 lowered groups paid each (:mod:`lorahot.kernels.wide_groups`).
    Each copy's nodes get fake values of their own (:func:`set_fake_values`), never the first
    copy's: inductor's passes read a node's storage from its value. Without ``own_values`` they keep
    the trace's (right in shape and layout), for a caller whose graph is fake-run again before
    any pass reads a storage (:func:`lorahot.kernels.wide_groups.lower_early`)."""
    values = [a.meta["val"] for a in args]
    memo_key = (key, *(_metadata(v) for v in values))
    traced = None if memo is None else memo.get(memo_key)
    fresh = traced is None
    if traced is None:
        from torch._dispatch.python import enable_python_dispatcher
        from torch._inductor.decomposition import select_decomp_table
        from torch.fx.experimental.proxy_tensor import make_fx

        with fake, enable_python_dispatcher():
            traced = make_fx(fn, select_decomp_table(), tracing_mode="real")(*values).graph
        if memo is not None:
            memo[memo_key] = traced
    inputs = [n for n in traced.nodes if n.op == "placeholder"]
    copies: dict[torch.fx.Node, torch.fx.Node] = dict(zip(inputs, args, strict=True))
    out = graph.graph_copy(traced, copies)
    if own_values and not fresh:
        set_fake_values(fake, [copies[n] for n in traced.nodes if n.op == "call_function"])
    return list(out)  # type: ignore[arg-type]


def _metadata(value: Any) -> tuple[Any, ...]:
    """What a trace of :func:`splice` depends on in an input's fake value (sizes as strings: a
    symbolic size is not hashable, and the same symbol reads the same)."""
    if not isinstance(value, torch.Tensor):
        return (type(value), str(value))
    return (str(tuple(value.shape)), str(value.stride()), str(value.storage_offset()), value.dtype, value.device)


def erase_unused(graph: torch.fx.Graph, node: torch.fx.Node, removable: Collection[Any]) -> None:
    """``node`` if nothing uses it, then, the same way, its inputs whose op is in ``removable``
    (the views only it read)."""
    if node.users:
        return
    inputs = [a for a in node.all_input_nodes if a.target in removable]
    graph.erase_node(node)
    for a in inputs:
        erase_unused(graph, a, removable)
