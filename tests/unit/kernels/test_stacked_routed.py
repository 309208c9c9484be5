"""The routed-shrink stacking pass (lorahot.kernels.stacked_routed) on hand-made graphs: which
routed calls it groups, and which it leaves alone. End to end (a compiled model, its outputs
against the per-row reference) in tests/system/test_compile_routing.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorahot.kernels import routed_linear, routed_lora, stacked_routed  # noqa: F401 - routed_linear defines the operators

_aten = torch.ops.aten
LINEAR = torch.ops.lorahot.routed_lora_linear.default
SHRINK = torch.ops.lorahot.routed_shrink.default
SLOTS, IN, A_STEP, S_STEP = 3, 8, 4096, 512


def _graph(members: list[dict[str, Any]], rows: int = 4) -> tuple[torch.fx.Graph, list[torch.fx.Node]]:
    """Routed calls over arena placeholders: each member ``{"a": A's offset, "s": S's offset,
    "rank": R}``, optionally ``"x"`` (which input, 0 or 1), ``"sized"``, ``"no_offset"``."""
    g = torch.fx.Graph()
    xs = [g.placeholder(f"x{i}") for i in range(2)]
    for x in xs:
        x.meta["val"] = torch.empty(rows, IN)
    a_arena, s_arena, route, weight, bt = (g.placeholder(n) for n in ("A", "S", "route", "weight", "bt"))
    calls = []
    for m in members:
        r = m["rank"]
        a_args = (a_arena, [SLOTS, r, IN], [A_STEP, IN, 1]) + (() if m.get("no_offset") else (m["a"],))
        a = g.call_function(_aten.as_strided.default, a_args)
        s = g.call_function(_aten.as_strided.default, (s_arena, [SLOTS, r], [S_STEP, 1], m["s"]))
        args = (xs[m.get("x", 0)], weight, None, a, bt, s, route, None)
        calls.append(g.call_function(LINEAR, args, {"sized": True} if m.get("sized") else {}))
    g.output(tuple(calls))
    return g, calls


def _stacked(g: torch.fx.Graph) -> list[torch.fx.Node]:
    return [n for n in g.nodes if n.target is SHRINK]


def test_adjacent_calls_on_one_input_share_one_shrink_each_taking_its_columns() -> None:
    """Three layers, listed in the graph out of their arena order: one shrink over the stacked
    view from the lowest offset, before the first call, and each call the columns of its place
    in the arena."""
    r = 16
    layers = [{"a": i * r * IN, "s": i * r, "rank": r} for i in range(3)]
    g, calls = _graph([layers[1], layers[0], layers[2]])
    assert stacked_routed.stack_routed(g) == 2
    (shrink,) = _stacked(g)
    a_view = shrink.args[1]
    assert a_view.args[1:] == ([SLOTS, 3 * r, IN], [A_STEP, IN, 1], 0)
    assert shrink.args[2].args[1:] == ([SLOTS, 3 * r], [S_STEP, 1], 0)
    order = list(g.nodes)
    assert order.index(shrink) < order.index(calls[0])
    starts = [c.kwargs["h"].args[2] for c in calls]
    assert starts == [r, 0, 2 * r]
    g.lint()


@pytest.mark.parametrize(
    "second",
    [
        {"a": 16 * IN, "s": 20, "rank": 16},  # the scales not adjacent
        {"a": 16 * IN + 8, "s": 16, "rank": 16},  # A not adjacent
        {"a": 16 * IN, "s": 16, "rank": 16, "x": 1},  # another input
        {"a": 16 * IN, "s": 16, "rank": 16, "sized": True},  # the operator decides per call
        {"a": 16 * IN, "s": 16, "rank": 16, "no_offset": True},  # the view's offset not in the graph
        {"a": 16 * IN, "s": 16, "rank": 8},  # another rank
    ],
    ids=["scales apart", "A apart", "other input", "sized", "no offset", "other rank"],
)
def test_calls_that_are_not_one_stacked_view_keep_their_own_shrinks(second: dict[str, Any]) -> None:
    g, _ = _graph([{"a": 0, "s": 0, "rank": 16}, second])
    assert stacked_routed.stack_routed(g) == 0
    assert not _stacked(g)


def test_more_rows_than_the_fused_path_takes_are_not_stacked() -> None:
    g, _ = _graph([{"a": 0, "s": 0, "rank": 16}, {"a": 16 * IN, "s": 16, "rank": 16}], rows=stacked_routed.MAX_ROWS + 1)
    assert stacked_routed.stack_routed(g) == 0


def test_a_run_is_cut_where_the_stacked_rank_would_pad_past_the_limit() -> None:
    """Rank 128: two layers stack to 256, a third would pad to 512, so it keeps its own."""
    r = 128
    g, calls = _graph([{"a": i * r * IN, "s": i * r, "rank": r} for i in range(3)])
    assert routed_lora.rank_pad(3 * r) > stacked_routed.MAX_STACKED_RANK >= routed_lora.rank_pad(2 * r)
    assert stacked_routed.stack_routed(g) == 1
    assert len(_stacked(g)) == 1
    assert [c.kwargs.get("h") is not None for c in calls] == [True, True, False]
