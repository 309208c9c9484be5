"""What the compiler passes (:mod:`lorahot.kernels.stacked_shrinks`, :mod:`lorahot.kernels.extern_inputs`)
share for reading and editing inductor's post-grad FX graph: a node's rows behind reshapes, the
fake values new nodes need, and erasing what a rewrite left unused."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import torch

__all__ = ["RESHAPES", "erase_unused", "fake_mode", "set_fake_values", "source"]

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
            node.meta["val"] = node.target(*args)  # type: ignore[operator]


def erase_unused(graph: torch.fx.Graph, node: torch.fx.Node, removable: Collection[Any]) -> None:
    """``node`` if nothing uses it, then, the same way, its inputs whose op is in ``removable``
    (the views only it read)."""
    if node.users:
        return
    inputs = [a for a in node.all_input_nodes if a.target in removable]
    graph.erase_node(node)
    for a in inputs:
        erase_unused(graph, a, removable)
