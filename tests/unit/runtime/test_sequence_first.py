"""lorahot.runtime.sequence_first: a layer that sees its input sequence-first (``[T, B, in]``)
has time steps as its first dimension. Where ``T`` equals the routing's length the shapes
cannot tell, so such layers are found by what the model declares (``batch_first=False``, a
transformers model type that runs sequence-first): a per-row routing to an adapter with
weights on one is refused, and under any per-row routing they compute their base output."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import lorahot
from lorahot.runtime import lora_runtime
from lorahot.runtime.sequence_first import find_sequence_first, sequence_first_paths
from tests.helpers import count_calls, make_adapter, model_reference

SEQUENCE_FIRST = ["block.linear1", "block.linear2"]


class Decoder(nn.Module):
    """An ``nn.TransformerDecoderLayer`` over the batch's rows, then a head: ``x [B, T, 8]`` in,
    ``[B, T, 6]`` out. ``batch_first=False`` runs the block on ``x.transpose(0, 1)`` (``[T, B,
    8]``), as seq-first models do; the head always sees ``[B, T, 8]``."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.block = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.block.self_attn.batch_first
        h = x if first else x.transpose(0, 1)  # (B, T, 8) or (T, B, 8)
        h = self.block(h, h)
        return self.head(h if first else h.transpose(0, 1))  # (B, T, 6)


def _decoder(batch_first: bool) -> nn.Module:
    torch.manual_seed(0)
    return Decoder(batch_first).double().eval()


def _routed(batch_first: bool) -> tuple[nn.Module, nn.Module, lorahot.LoraRuntime, list[dict]]:
    """The decoder, injected on its block's linears and its head, slot 0 an adapter on all of
    them, slot 1 one on the head alone; and its untouched twin."""
    base = _decoder(batch_first)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, [*SEQUENCE_FIRST, "head"], max_rank=4, slots=2, dtype=torch.float64)
    held = []
    for slot, ranks in enumerate((dict.fromkeys(runtime.layers, 2), {"head": 3})):
        tensors, ab = make_adapter(base, ranks, seed=slot, dtype=torch.float64)
        runtime.load(tensors, slot=slot)
        held.append({n: (a, b, 1.0) for n, (a, b) in ab.items()})
    return base, model, runtime, held


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


def test_layers_under_a_module_that_declares_batch_first_false_are_sequence_first() -> None:
    """torch's transformer modules declare it: ``nn.TransformerDecoderLayer`` in its
    ``self_attn``, ``nn.Transformer`` itself; with ``batch_first=True`` nothing is."""
    names = [*SEQUENCE_FIRST, "head"]
    assert find_sequence_first(_decoder(False), names) == set(SEQUENCE_FIRST)
    assert find_sequence_first(_decoder(True), names) == set()
    transformer = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0)
    assert sequence_first_paths(transformer)[0] == ""  # the whole model
    assert find_sequence_first(transformer, ["decoder.layers.0.linear1"]) == {"decoder.layers.0.linear1"}
    assert find_sequence_first(nn.Transformer(8, 2, 1, 1, 16, batch_first=True), ["decoder.layers.0.linear1"]) == set()


def test_transformers_models_that_run_sequence_first_are_found_by_their_model_type() -> None:
    """XLNet transposes its ids and runs every layer on ``[T, B, d]``; a Llama does not."""
    xlnet = transformers.XLNetLMHeadModel(
        transformers.XLNetConfig(vocab_size=64, d_model=16, n_layer=1, n_head=2, d_inner=32)
    )
    assert find_sequence_first(xlnet, ["transformer.layer.0.ff.layer_1"]) == {"transformer.layer.0.ff.layer_1"}
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    assert find_sequence_first(llama, ["model.layers.0.mlp.up_proj"]) == set()


@pytest.mark.parametrize("tokens", [3, 5], ids=["T-equals-B", "T-differs"])
def test_a_routing_to_an_adapter_on_sequence_first_layers_is_refused_and_changes_nothing(tokens: int) -> None:
    """Three rows of three tokens: the block's linears see ``[3, 3, 8]``, which fits a routing
    of 3 by shape, and rows took the slots of time steps (max abs diff 1.6 against each row
    run alone). The routing is refused at activate, naming the layers, and a load of such an
    adapter into a routed slot too; nothing changes."""
    _, model, runtime, _ = _routed(batch_first=False)
    x = torch.randn(3, tokens, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runtime.activate(1)
    before = _forward(model, x)
    with pytest.raises(lorahot.UsageError, match=r"slot 0, .*sequence-first \('block.linear1', 'block.linear2'\)"):
        runtime.activate([0, 1, -1])
    assert runtime.routing is None and runtime.active_slot == 1
    assert torch.equal(_forward(model, x), before)
    runtime.activate([1, -1, 1])  # the head alone: fine
    on_block, _ = make_adapter(model, {"block.linear1": 2}, seed=5, dtype=torch.float64)
    with pytest.raises(lorahot.UsageError, match=r"slot 1, .*sequence-first \('block.linear1'\)"):
        runtime.load(on_block, slot=1)
    assert runtime.routing == (1, -1, 1)


@pytest.mark.parametrize("batch_first", [False, True])
def test_rows_route_per_row_where_the_adapter_leaves_sequence_first_layers_out(batch_first: bool) -> None:
    """Sequence-first: slot 1 (on the head alone) routes, the block computing its base output
    under the routing, every row equal to itself run alone with its slot (float64), T == B
    included. Batch-first: the block routes too, slot 0 included."""
    base, model, runtime, held = _routed(batch_first)
    x = torch.randn(3, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    route = [1, -1, 1] if not batch_first else [0, -1, 1]
    runtime.activate(route)
    got = _forward(model, x)
    want = torch.cat([model_reference(base, x[i : i + 1], held[s] if s >= 0 else {}) for i, s in enumerate(route)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_negative_control_without_the_declaration_time_steps_take_rows_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """With sequence-first layers found nowhere, the routing is accepted and the T == B batch
    computes wrong numbers: what the declaration prevents."""
    monkeypatch.setattr(lora_runtime, "find_sequence_first", lambda model, names: frozenset())
    base, model, runtime, held = _routed(batch_first=False)
    x = torch.randn(3, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runtime.activate([0, 1, -1])
    got = _forward(model, x)
    want = torch.cat([model_reference(base, x[i : i + 1], held[s] if s >= 0 else {}) for i, s in enumerate([0, 1, -1])])
    assert float((got - want).abs().max()) > 0.1


class _Declaring(nn.Module):
    """A block that declares it runs sequence-first, holding two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_first = False
        self.linear1, self.linear2 = nn.Linear(2, 2), nn.Linear(2, 2)


def _sequence_first_calls(blocks: int) -> int:
    model = nn.ModuleDict({"blocks": nn.Sequential(*[_Declaring() for _ in range(blocks)]), "head": nn.Linear(2, 2)})
    names = [f"blocks.{b}.linear{i}" for b in range(blocks) for i in (1, 2)]
    found: set[str] = set()
    count = count_calls(lambda: found.update(find_sequence_first(model, [*names, "head"])))
    assert found == set(names)
    return count


def test_finding_sequence_first_layers_does_not_compare_each_layer_with_each_block() -> None:
    """A module per block may declare it (every ``nn.TransformerEncoderLayer``'s ``self_attn``):
    each layer was compared with every declaring module, the blocks squared. Each path above a
    layer is now looked up, so four times the blocks cost at most four times the calls."""
    _sequence_first_calls(2)  # first-call costs out of the counts
    assert _sequence_first_calls(32) <= 4 * _sequence_first_calls(8)
