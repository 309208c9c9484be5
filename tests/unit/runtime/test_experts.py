"""lorahot.runtime.experts: a mixture-of-experts block's experts found by structure where they
are named otherwise, so that a per-row routing is refused rather than give an expert's
gathered tokens other rows' slots."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorahot
from lorahot.layers.routing import is_expert
from lorahot.runtime import experts as experts_module
from lorahot.runtime.experts import expert_lists, find_experts
from tests.helpers import count_calls, make_adapter

D = 8


class _Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w_in, self.w_out = nn.Linear(D, 2 * D, dtype=torch.float64), nn.Linear(2 * D, D, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(torch.relu(self.w_in(x)))


class _Router(nn.Module):
    """Switch Transformers' shape: the router's weight one module down (``router.classifier``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(D, n, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.classifier(x)
        return out


class _Experts(nn.Module):
    """Experts held as a module of their own, not a list (transformers' Switch Transformers)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for e in range(n):
            self.add_module(f"expert_{e}", _Expert())

    def __getitem__(self, e: int) -> nn.Module:
        expert: nn.Module = getattr(self, f"expert_{e}")
        return expert

    def __len__(self) -> int:
        return len(self._modules)


class _MoE(nn.Module):
    """An MoE block whose experts are not named ``experts``: ``ffns`` beside a router ``gate``
    (``router="linear"``), ``router.classifier`` (``"nested"``) or a bare parameter
    (``"parameter"``), the experts in a list or a module of their own (``held="module"``). Each
    token goes to its top expert; every expert runs on the tokens it was given, gathered in
    order."""

    def __init__(self, n: int = 2, router: str = "linear", held: str = "list") -> None:
        super().__init__()
        self.ffns: nn.Module = nn.ModuleList(_Expert() for _ in range(n)) if held == "list" else _Experts(n)
        self.proj = nn.Linear(D, D, dtype=torch.float64)  # before the block: every row's own
        if router == "linear":
            self.gate: nn.Module = nn.Linear(D, n, bias=False, dtype=torch.float64)
        elif router == "nested":
            self.gate = _Router(n)
        else:
            self.gate_weight = nn.Parameter(torch.randn(n, D, dtype=torch.float64))
        self.router = router

    def logits(self, flat: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = flat @ self.gate_weight.T if self.router == "parameter" else self.gate(flat)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.proj(x).reshape(-1, D)
        choice = self.logits(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e in range(len(self.ffns)):
            picked = (choice == e).nonzero().flatten()
            out = out.index_add(0, picked, self.ffns[e](flat[picked]))
        return out.reshape(x.shape)


class _Stack(nn.Module):
    """A dense stack: a list of layers beside an embedding whose rows are the vocabulary, not
    the list's entries (no router)."""

    def __init__(self, layers: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, D, dtype=torch.float64)
        self.layers = nn.ModuleList(nn.Linear(D, D, dtype=torch.float64) for _ in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize(
    ("router", "held"), [("linear", "list"), ("nested", "list"), ("parameter", "list"), ("nested", "module")]
)
def test_a_list_beside_a_router_is_experts_whatever_their_names(router: str, held: str) -> None:
    model = nn.ModuleDict({"block": _MoE(3, router, held)})
    assert expert_lists(model) == ["block.ffns"]
    e = "expert_" if held == "module" else ""
    names = ["block.proj", f"block.ffns.{e}0.w_in", f"block.ffns.{e}2.w_out"]
    assert find_experts(model, names) == set(names[1:])
    assert not any(is_expert(n) for n in names)  # the name alone would miss them


def test_a_list_without_a_router_is_not_experts() -> None:
    """Negative controls: a dense stack beside an embedding of another row count; the same
    stack where the embedding's rows happen to be the layers' count but its width is none of
    theirs; a router whose width is not the experts'; a list of one."""
    assert expert_lists(_Stack(layers=4, vocab=11)) == []
    wide = _Stack(layers=4, vocab=4)
    wide.embed = nn.Embedding(4, D + 1, dtype=torch.float64)
    assert expert_lists(wide) == []
    block = _MoE(2)
    block.gate = nn.Linear(D + 3, 2, dtype=torch.float64)
    assert expert_lists(block) == []
    assert expert_lists(_MoE(1)) == []
    # leaves wrapped by inject (each holding its base layer) beside a weight of a router's shape
    # are not a list
    projections = nn.Module()
    projections.a, projections.b = nn.Linear(D, D, dtype=torch.float64), nn.Linear(D, D, dtype=torch.float64)
    holder = nn.Module()
    holder.projections, holder.gate = projections, nn.Linear(D, 2, dtype=torch.float64)
    lorahot.inject(holder, ["projections.a", "projections.b"], max_rank=2)
    assert expert_lists(holder) == []
    # the same stack whose embedding is a router's shape: taken for experts (an error, not a wrong number)
    assert expert_lists(_Stack(layers=4, vocab=4)) == ["layers"]


def _split_input() -> torch.Tensor:
    """Two rows of two tokens each, the router sending row 0's tokens to expert 0 and row 1's
    to expert 1 (the gate reads feature 0's sign): expert 0 gets two tokens, both row 0's."""
    x = torch.randn(2, 2, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[0, :, 0], x[1, :, 0] = 5.0, -5.0
    return x


def _model() -> _MoE:
    torch.manual_seed(0)
    model = _MoE(2)
    with torch.no_grad():
        model.proj.weight.copy_(torch.eye(D, dtype=torch.float64))
        model.proj.bias.zero_()
        model.gate.weight.zero_()
        model.gate.weight[0, 0], model.gate.weight[1, 0] = 1.0, -1.0
    return model


def test_a_routing_to_an_adapter_on_structural_experts_is_refused_and_changes_nothing() -> None:
    """An adapter on ``ffns`` (experts by structure) cannot be routed per row: refused, naming
    the layers, with the routing in force and the outputs unchanged. It runs on a batch of its
    own (``activate(k)``), and rows routed elsewhere run and equal each row alone, with the
    expert layers at their base output."""
    model = _model()
    runtime = lorahot.inject(model, ["proj", "ffns.0.w_in", "ffns.1.w_out"], max_rank=2, slots=3)
    assert runtime.layers["ffns.0.w_in"]._plan[8] and not runtime.layers["proj"]._plan[8]
    on_experts, _ = make_adapter(model, {"ffns.0.w_in": 2, "proj": 1}, seed=1, dtype=torch.float64)
    elsewhere, _ = make_adapter(model, {"proj": 2}, seed=2, dtype=torch.float64)
    runtime.load(on_experts, slot=0)
    runtime.load(elsewhere, slot=1)
    x = _split_input()
    runtime.activate([1, -1])
    with torch.no_grad():
        before = model(x)
        refused = r"slot 0, whose adapter has weights on the experts .*'ffns.0.w_in'"
        with pytest.raises(lorahot.UsageError, match=refused):
            runtime.activate([0, -1])
        assert runtime.routing == (1, -1)
        assert torch.equal(model(x), before)
        with pytest.raises(lorahot.UsageError, match=r"slot 1, whose adapter has weights on the experts"):
            runtime.load(on_experts, slot=1)
        assert torch.equal(model(x), before)
        for i, slot in enumerate((1, -1)):
            runtime.activate(slot if slot >= 0 else 2)
            torch.testing.assert_close(before[i : i + 1], model(x[i : i + 1]), rtol=1e-12, atol=1e-12)
        runtime.activate(0)  # the expert adapter on a batch of its own
        alone = model(x[:1])
        assert not torch.equal(alone, before[:1])


def test_negative_control_without_the_structure_the_routing_gives_wrong_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With experts found by name only, the same routing is accepted, and expert 0's two
    gathered tokens (both row 0's) take the routing's two entries: row 0's second token runs
    on the base model, and the output is not row 0's run alone. This is the wrong number the
    structural sign refuses."""
    monkeypatch.setattr(experts_module, "expert_lists", lambda model: [])
    model = _model()
    runtime = lorahot.inject(model, ["proj", "ffns.0.w_in", "ffns.1.w_out"], max_rank=2, slots=2)
    on_experts, _ = make_adapter(model, {"ffns.0.w_in": 2}, seed=1, dtype=torch.float64)
    runtime.load(on_experts, slot=0)
    x = _split_input()
    with torch.no_grad():
        runtime.activate([0, -1])
        routed = model(x)
        runtime.activate(0)
        alone = model(x[:1])
    assert not torch.allclose(routed[:1], alone, rtol=1e-6, atol=1e-6)


class _Block(nn.Module):
    """An attention projection beside a mixture of four experts found by structure."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(D, D)
        self.gate = nn.Linear(D, 4, bias=False)
        self.mix = nn.ModuleList([nn.Sequential(nn.Linear(D, D), nn.ReLU()) for _ in range(4)])


def _find_calls(blocks: int) -> int:
    """How many Python and C functions one :func:`find_experts` of ``blocks`` blocks calls."""
    model = nn.ModuleList([_Block() for _ in range(blocks)])
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("gate")]
    found: set[str] = set()

    def find() -> None:
        found.update(find_experts(model, names))

    count = count_calls(find)
    assert found == {n for n in names if ".mix." in n}
    return count


def test_finding_the_experts_does_not_compare_each_layer_with_each_block() -> None:
    """Each layer was compared with every list of experts in the model (a list per MoE block):
    the layers times the blocks. Each path above a layer is now looked up, so four times the
    blocks cost at most four times the calls."""
    _find_calls(2)  # first-call costs out of the counts
    assert _find_calls(32) <= 4 * _find_calls(8)


def _dict_blocks(blocks: int) -> tuple[nn.Module, list[str]]:
    """``blocks`` blocks, each an ``nn.ModuleDict`` (a list by structure, a linear its first
    entry) of an attention projection, a router and a mixture of four experts, in one
    ``nn.ModuleList``; the names of its linears other than the routers."""
    model = nn.ModuleList(
        [
            nn.ModuleDict(
                {
                    "attn": nn.Linear(D, D),
                    "gate": nn.Linear(D, 4, bias=False),
                    "mix": nn.ModuleList([nn.Sequential(nn.Linear(D, D), nn.ReLU()) for _ in range(4)]),
                }
            )
            for _ in range(blocks)
        ]
    )
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("gate")]
    return model, names


def _dict_calls(blocks: int) -> int:
    model, names = _dict_blocks(blocks)
    found: set[str] = set()
    count = count_calls(lambda: found.update(find_experts(model, names)))
    assert found == {n for n in names if ".mix." in n}
    return count


def test_a_parent_of_many_lists_is_searched_for_routers_once() -> None:
    """A ``ModuleList`` of blocks, each block a ``ModuleDict`` (a list by structure): each block
    was checked for a router by scanning every child and grandchild of the ``ModuleList``, all
    the blocks, so the blocks squared (an 800-layer model of such blocks spent 0.37 s there).
    The parent's weights are now indexed once by their shape: four times the blocks cost at most
    four times the calls, and the experts found are the same."""
    _dict_calls(2)  # first-call costs out of the counts
    assert _dict_calls(32) <= 4 * _dict_calls(8)


@pytest.mark.parametrize("where", ["the list", "a sibling"])
def test_a_router_is_a_weight_outside_the_list(where: str) -> None:
    """The parent's weights are indexed once for all its lists, each with the modules it comes
    from: a weight of a router's shape held by the list itself is still no router for it, and
    the same weight held beside it is one."""
    block = nn.Module()
    block.mix = nn.ModuleList([nn.Sequential(nn.Linear(D, D), nn.ReLU()) for _ in range(4)])
    block.other = nn.Module()
    holder = block.mix if where == "the list" else block.other
    holder.weight = nn.Parameter(torch.zeros(4, D))
    assert expert_lists(nn.Sequential(block)) == ([] if where == "the list" else ["0.mix"])
