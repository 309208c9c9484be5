"""Stacks (``lorahot.runtime.stack``): several adapters in one slot, their rows side by side,
each with its own per-module scale and weight, against float64 dense references; re-weighting
that reads no file and copies no weight; and what a stack refuses, with every buffer, the
bookkeeping and the output bitwise as before.
"""

from __future__ import annotations

import functools
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorahot
from lorahot.runtime import lora_runtime, wide
from tests.helpers import (
    COMPILED_DEVICES,
    assert_swaps_without_recompile,
    make_adapter,
    save_peft,
    stack_reference,
    tiny_convnet,
    tiny_lm,
    token_ids,
)
from tests.reliability_helpers import Q0, V1, assert_unchanged, build_rig, snapshot, write_valid

TARGETS = ["q_proj", "v_proj", "up_proj", "embed_tokens"]
UP0, EMB = "layers.0.mlp.up_proj", "embed_tokens"
IDS = token_ids((2, 6), 32, seed=3)


def _setup(max_rank: int = 8, slots: int = 1, **kwargs: bool) -> tuple[nn.Module, lorahot.LoraRuntime]:
    """A float64 model (float64 scales too), so outputs match the reference to 1e-10."""
    model = tiny_lm(dtype=torch.float64)
    return model, lorahot.inject(model, TARGETS, max_rank=max_rank, slots=slots, **kwargs)


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _expected(*parts: tuple[dict, dict[str, float]], weights: list[float]) -> torch.Tensor:
    """Each part: ``name -> (A, B)`` and ``name -> alpha / r``; times its weight, summed."""
    loras = [{n: (a, b, w * scales[n]) for n, (a, b) in ab.items()} for (ab, scales), w in zip(parts, weights)]
    return stack_reference(tiny_lm(dtype=torch.float64), IDS, loras)


def _close(y: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


def _three_parts(tmp_path: Path, model: nn.Module) -> tuple[list, list[tuple[dict, dict[str, float]]]]:
    """Sources and ``(A/B, alpha / r)`` of three adapters of different ranks, alphas and
    targets: PEFT rank and alpha patterns; rsLoRA; a mapping without config (alpha = rank)."""
    ta, aba = make_adapter(model, {Q0: 2, V1: 4, EMB: 4}, seed=1, dtype=torch.float64)
    config = {"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3}}
    a = save_peft(tmp_path / "a", ta, **config)
    tb, abb = make_adapter(model, {Q0: 4, UP0: 4}, seed=2, dtype=torch.float64)
    b = save_peft(tmp_path / "b", tb, r=4, lora_alpha=6, use_rslora=True)
    tc, abc = make_adapter(model, {V1: 2, EMB: 2}, seed=3, dtype=torch.float64)
    parts = [
        (aba, {Q0: 8 / 2, V1: 3 / 4, EMB: 8 / 4}),
        (abb, {Q0: 6 / math.sqrt(4), UP0: 6 / math.sqrt(4)}),
        (abc, {V1: 1.0, EMB: 1.0}),
    ]
    return [a, b, tc], parts


def test_a_stack_adds_its_parts_each_at_its_own_scale(tmp_path: Path) -> None:
    model, runtime = _setup()
    sources, parts = _three_parts(tmp_path, model)
    info = runtime.load(sources, scale=[0.5, -1.0, 2.0])
    _close(_out(model), _expected(*parts, weights=[0.5, -1.0, 2.0]))
    assert info.ranks == {Q0: 6, V1: 6, EMB: 6, UP0: 4}  # the rows each layer uses
    assert [p.ranks for p in info.parts] == [{Q0: 2, V1: 4, EMB: 4}, {Q0: 4, UP0: 4}, {V1: 2, EMB: 2}]
    assert info.scale == (0.5, -1.0, 2.0) and [p.scale for p in info.parts] == [0.5, -1.0, 2.0]
    assert info.format == "peft" and info.source.endswith(" + <mapping>") and info.source.count(" + ") == 2
    assert info.nbytes == sum(p.nbytes for p in info.parts) and runtime.info() == info
    q = runtime.layers[Q0].lora_scale.tolist()  # part 0's rows, then part 1's, then padding
    assert q == [0.5 * 4.0] * 2 + [-1.0 * 3.0] * 4 + [0.0] * 2
    runtime.load(sources, scale=0.25)  # one number: every part's weight
    _close(_out(model), _expected(*parts, weights=[0.25] * 3))


def test_set_scale_rewrites_the_row_scales_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, runtime = _setup(slots=2)
    sources, parts = _three_parts(tmp_path, model)
    runtime.load(sources, scale=[1.0, 1.0, 1.0])
    runtime.load(sources, slot=1)
    weights = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.E)]
    pointers = [t.data_ptr() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]

    def no_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("set_scale read an adapter")

    monkeypatch.setattr(lora_runtime, "read_adapter", no_read)
    for value, w in (([2.0, 0.0, -0.5], [2.0, 0.0, -0.5]), (0.75, [0.75] * 3), ((-1.0, 3.0, 0.5), [-1.0, 3.0, 0.5])):
        runtime.set_scale(value)  # type: ignore[arg-type]
        _close(_out(model), _expected(*parts, weights=w))
        assert runtime.info().scale == tuple(w) and [p.scale for p in runtime.info().parts] == w
    assert all(torch.equal(t, u) for t, u in zip((t for a in runtime.buffers.arenas for t in (a.A, a.B, a.E)), weights))
    assert [t.data_ptr() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)] == pointers
    before = _out(model)
    runtime.set_scale([0.0, 0.0, 5.0], slot=1)  # not the active slot: the output stays
    assert torch.equal(_out(model), before)
    runtime.activate(1)
    _close(_out(model), _expected(*parts, weights=[0.0, 0.0, 5.0]))


@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=3, max_size=3))
def test_scales_are_each_rows_part_weight_times_its_own_scale_bit_for_bit(weights: list[float]) -> None:
    """Stack.scales (own * w[part], also what set_scale's CUDA graph computes on the device)
    equals the sum over parts of w_p * rows_p, the definition, in every bit."""
    model, runtime = _setup()
    sources, _ = _three_parts(Path(tempfile.mkdtemp()), model)
    runtime.load(sources, scale=[1.0, 1.0, 1.0])
    stack = runtime._stacks[0]
    assert stack is not None and len(stack.parts) == 3
    for rows, got, (own, part) in zip(stack.rows, stack.scales(weights), stack.owners):
        want = sum(rows[p] * weights[p] for p in range(3))
        assert torch.equal(got, want)
        on_device = torch.from_numpy(own) * torch.tensor(weights, dtype=torch.float64)[torch.from_numpy(part)]
        assert torch.equal(on_device.float(), want.float())


def test_a_list_of_one_writes_what_a_single_load_writes() -> None:
    one, two = _setup(), _setup()
    tensors = make_adapter(one[0], {Q0: 3, EMB: 5}, seed=4, dtype=torch.float64)[0]
    single = one[1].load(tensors, scale=0.5, config={"lora_alpha": 6})
    listed = two[1].load([tensors], scale=0.5, config={"lora_alpha": 6})
    for x, y in zip(one[1].buffers.arenas, two[1].buffers.arenas):
        assert all(torch.equal(s, t) for s, t in zip((x.A, x.B, x.S, x.E), (y.A, y.B, y.S, y.E)))
    assert (single.scale, listed.scale) == (0.5, (0.5,)) and single.parts == listed.parts
    assert single.ranks == listed.ranks == single.parts[0].ranks


def test_one_adapter_takes_a_list_of_one_weight_as_set_scale_does() -> None:
    """One adapter is a stack of one part, for ``load`` as for ``set_scale``: ``scale=[w]`` is
    ``scale=w`` (a NumPy scalar too); the slot then reports one adapter, as it was loaded."""
    one, two = _setup(), _setup()
    tensors = make_adapter(one[0], {Q0: 3, EMB: 5}, seed=4, dtype=torch.float64)[0]
    plain = one[1].load(tensors, scale=0.5)
    listed = two[1].load(tensors, scale=(np.float64(0.5),))
    assert listed == plain and listed.scale == 0.5
    _close(_out(two[0]), _out(one[0]))
    two[1].set_scale([0.25])
    one[1].set_scale(0.25)
    assert torch.equal(_out(two[0]), _out(one[0]))


def test_parts_from_the_host_cache_stack_as_parts_read_from_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, runtime = _setup()
    sources, _ = _three_parts(tmp_path, model)
    runtime.preload(sources[0], key="style")
    prepared = [runtime.preload(s) for s in sources[1:]]
    fresh = _setup()[1]
    fresh.load(sources, scale=[0.3, 1.2, -2.0])
    monkeypatch.setattr(lora_runtime, "read_adapter", lambda *a, **k: pytest.fail("a cached part was read again"))
    info = runtime.load(["style", *prepared], scale=[0.3, 1.2, -2.0])
    assert info.ranks == fresh.info().ranks
    for x, y in zip(runtime.buffers.arenas, fresh.buffers.arenas):
        assert all(torch.equal(s, t) for s, t in zip((x.A, x.B, x.S, x.E), (y.A, y.B, y.S, y.E)))


def test_grouped_conv_parts_fill_their_rows_of_every_group_slice() -> None:
    model = tiny_convnet().double()  # conv: groups=2
    runtime = lorahot.inject(model, ["embed", "conv", "proj"], max_rank=8)
    ta, aba = make_adapter(model, {"conv": 2, "proj": 3}, seed=1, dtype=torch.float64)
    tb, abb = make_adapter(model, {"conv": 4, "embed": 5}, seed=2, dtype=torch.float64)
    runtime.load([ta, tb], scale=[0.5, 2.0], config={"lora_alpha": 4})
    conv = runtime.layers["conv"]
    a, b = aba["conv"][0], abb["conv"][0]  # [r, in, k, k]; group j holds rows [j * r/2, (j + 1) * r/2)
    rows = conv.lora_A  # [8, in, k, k]: group 0 in rows 0..3, group 1 in rows 4..7
    for group in range(2):
        got = rows[4 * group : 4 * group + 4]
        assert torch.equal(got[0], a[group]) and torch.equal(got[1:3], b[2 * group : 2 * group + 2])
        assert not got[3].any()
    assert conv.lora_scale.tolist() == [0.5 * 2.0, 2.0 * 1.0, 2.0 * 1.0, 0.0] * 2
    ids = token_ids((2, 5, 5), 16, seed=2)
    loras = [{n: (a_, b_, w * 4 / a_.shape[0]) for n, (a_, b_) in ab.items()} for ab, w in ((aba, 0.5), (abb, 2.0))]
    with torch.no_grad():
        _close(model(ids), stack_reference(tiny_convnet(), ids, loras))


def test_info_and_repr_describe_every_part(tmp_path: Path) -> None:
    model, runtime = _setup(slots=2)
    sources, _ = _three_parts(tmp_path, model)
    assert "active=0: empty" in repr(runtime)
    runtime.load(sources[:2], scale=[0.8, 0.5])
    assert [(p.format, p.skipped, p.components) for p in runtime.info().parts] == [("peft", (), {})] * 2
    shown = (
        r"active=0: \.\.\.[^ ]*/a/adapter_model\.safetensors x0\.8 \+ \.\.\.[^ ]*/b/adapter_model\.safetensors x0\.5, "
    )
    assert re.search(shown, repr(runtime)), repr(runtime)
    runtime.load(sources[2], slot=1, scale=2.0)
    runtime.activate(1)
    assert "active=1: <mapping> x2," in repr(runtime)
    assert runtime.info().scale == 2.0 and len(runtime.info().parts) == 1  # one source: a number, as always


# -- what a stack refuses, and nothing changes ---------------------------------------------------------


def _parts(tmp: Path, model: nn.Module, *ranks: dict[str, int]) -> list[Path]:
    return [write_valid(tmp / f"part{i}", model, r, seed=50 + i) for i, r in enumerate(ranks)]


@pytest.mark.parametrize("slot", [0, 1])
def test_ranks_past_max_rank_in_a_layer_are_refused_and_change_nothing(tmp_path: Path, slot: int) -> None:
    rig = build_rig(tmp_path / "rig")
    parts = _parts(tmp_path, rig.model, {Q0: 4, V1: 4}, {Q0: 8})
    before = snapshot(rig)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"^a stack of 2 adapters does not fit together in one slot:\n  - layers\.0\.self_attn\.q_proj: ranks 4 "
        r"\(part 0 of the stack \(.*part0/adapter_model\.safetensors\)\) \+ 8 "
        r"\(part 1 of the stack \(.*part1/adapter_model\.safetensors\)\) = 12 > "
        r"max_rank 8\nInject with max_rank >= 12: a stack needs the sum of its parts' ranks in each layer "
        r"\(lorahot\.plan_targets\(sources, model, stacked=True\) plans it\), or stack fewer adapters\.$",
    ):
        rig.runtime.load(parts, slot=slot)
    assert_unchanged(rig, before)


def test_a_part_that_loads_nothing_even_with_strict_false_is_named_and_changes_nothing(tmp_path: Path) -> None:
    """``strict=False`` skips the keys that fit no layer; a part none of whose keys fit would
    load nothing. The refusal names the part (every mapping's source is ``<mapping>``), says that
    strict=False was in force, and the fix; it said "strict=False would skip all keys" as if it
    had not been passed. A part that fails any check is named the same way; one adapter is not."""
    rig = build_rig(tmp_path / "rig")
    good = make_adapter(rig.model, {Q0: 2}, seed=1)[0]
    stranger = {k.replace("q_proj", "nowhere_proj"): v for k, v in good.items()}
    rig.runtime.load([good, good], scale=[0.5, 1.5])
    before = snapshot(rig)
    unmatched = (
        r"<mapping>: no module of the adapter \(peft naming\) maps onto an injected layer, even with strict=False: it "
        r"skips the keys that fit no layer, and here that is all 2 of them \(e\.g\. .*nowhere_proj.*\), which would "
        r"load nothing\. Inject those modules \(targets=\.\.\.\), map the names with prefix=/key_map=, or leave this "
        r"adapter out of the load\.$"
    )
    with pytest.raises(lorahot.AdapterMismatchError, match="^part 1 of the stack: " + unmatched):
        rig.runtime.load([good, stranger], strict=False)
    assert_unchanged(rig, before)
    with pytest.raises(lorahot.AdapterMismatchError, match="^" + unmatched):
        rig.runtime.load(stranger, strict=False)
    assert_unchanged(rig, before)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"(?s)^part 0 of the stack: <mapping>: .*nowhere_proj"):
        rig.runtime.load([stranger, good])
    assert_unchanged(rig, before)


def test_a_refused_stack_of_many_parts_names_a_few_in_a_bounded_message(tmp_path: Path) -> None:
    """Forty parts of rank 2 on one layer (max_rank 8): the message names the first eight parts
    and sums the rest; a stack of thousands made a message of hundreds of kilobytes."""
    rig = build_rig(tmp_path / "rig")
    part = _parts(tmp_path, rig.model, {Q0: 2})[0]
    before = snapshot(rig)
    with pytest.raises(lorahot.AdapterMismatchError) as raised:
        rig.runtime.load([part] * 40)
    message = str(raised.value)
    assert re.search(
        r"ranks 2 \(part 0 of the stack \(.*\)\) \+ .* \+ 2 \(part 7 of the stack \(.*\)\) \+ 64 "
        r"\(parts 8-39, 32 more\) = 80 > max_rank 8",
        message,
    )
    assert message.count("part0/adapter_model.safetensors") == 8 and len(message) < 2000
    assert_unchanged(rig, before)


def test_a_bad_part_or_a_bad_call_changes_nothing(tmp_path: Path) -> None:
    rig = build_rig(tmp_path / "rig")
    good = _parts(tmp_path, rig.model, {Q0: 2, V1: 2}, {V1: 4})
    rig.runtime.load(good, scale=[0.5, 1.5])  # a stack in the active slot
    before = snapshot(rig)
    nan = make_adapter(rig.model, {Q0: 2}, seed=9)[0]
    next(iter(nan.values()))[0, 0] = math.nan
    calls = [
        (lambda: rig.runtime.load([good[0], nan]), lorahot.AdapterReadError, r"NaN or Inf in LoRA weights of"),
        (lambda: rig.runtime.load([good[0], tmp_path / "nowhere"]), lorahot.SourceNotFoundError, "nowhere"),
        (lambda: rig.runtime.load([good[0], good[1]], scale=[1.0, 2.0, 3.0]), lorahot.UsageError,
         r"^scale has 3 weights but the stack has 2 parts; pass one weight per part \(in the order loaded\), or one "
         r"number for all\.$"),
        (lambda: rig.runtime.load(good, scale=[1.0, float("nan")]), lorahot.UsageError, r"^scale\[1\]=nan must be"),
        (lambda: rig.runtime.load([]), lorahot.UsageError, r"^load\(\[\]\) has no adapter to load"),
        (lambda: rig.runtime.load([good]), lorahot.UsageError, r"^source\[0\] is a list; a stack's parts are single"),
        (lambda: rig.runtime.load(good[0], scale=[1.0, 2.0]), lorahot.UsageError,
         r"^scale has 2 weights but one adapter is a stack of 1 part; pass one weight per part"),
        (lambda: rig.runtime.preload(good), lorahot.UsageError, r"^preload takes one adapter, got a list"),
        (lambda: rig.runtime.prefetch(tuple(good)), lorahot.UsageError, r"^prefetch takes one adapter, got a tuple"),
        (lambda: rig.runtime.set_scale([1.0]), lorahot.UsageError, r"^scale has 1 weight but slot 0 holds 2 parts"),
        (lambda: rig.runtime.set_scale([1.0, "x"]), lorahot.UsageError, r"^scale\[1\]='x' is not a number"),
        (lambda: rig.runtime.set_scale([1e39, 1.0]), lorahot.UsageError,
         r"^part 0 of the stack \(.*part0/adapter_model\.safetensors\): scale=1e\+39 times the adapter's largest "
         r"alpha/r \(2\)"),
        (lambda: rig.runtime.set_scale([1.0, 1.0], slot=1), lorahot.UsageError, r"but slot 1 holds 1 part;"),
    ]  # fmt: skip
    for call, error, message in calls:
        with pytest.raises(error, match=message):
            call()
        assert_unchanged(rig, before)


def _bias_and_dora(tmp: Path) -> tuple[nn.Module, lorahot.LoraRuntime, dict, dict, dict]:
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double()
    runtime = lorahot.inject(model, ["0", "1"], max_rank=8, extras=True)
    g = torch.Generator().manual_seed(0)

    def lora(names: list[str], **extra: str) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            fin, fout = model[int(n)].in_features, model[int(n)].out_features
            out[f"{n}.lora_A.weight"] = torch.randn(2, fin, generator=g, dtype=torch.float64)
            out[f"{n}.lora_B.weight"] = torch.randn(fout, 2, generator=g, dtype=torch.float64)
            if "dora" in extra:
                out[f"{n}.lora_magnitude_vector"] = torch.rand(fout, generator=g, dtype=torch.float64) + 0.5
            if "bias" in extra:
                out[f"{n}.lora_B.bias"] = torch.randn(fout, generator=g, dtype=torch.float64)
        return out

    return model, runtime, lora(["0"], dora="yes"), lora(["0", "1"], bias="yes"), lora(["0", "1"])


def test_dora_on_a_shared_layer_is_refused_and_one_lora_bias_per_layer_loads(tmp_path: Path) -> None:
    """Unmerged: DoRA shares no layer (PEFT computes one factor per adapter), refused with nothing
    changed; a part with a LoRA bias beside one without takes the first rows (its row-0 scale)."""
    model, runtime, dora, biased, plain = _bias_and_dora(tmp_path)
    runtime.load(plain)
    state = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"  - 0 \(0\.lora_A\.weight, 0\.lora_B\.weight, 0\.lora_magnitude_vector\): part 0 of the stack "
        r"\(<mapping>\) has DoRA "
        r"\(a magnitude vector\) on a layer parts 0, 1 all load into; PEFT computes one DoRA factor per adapter",
    ):
        runtime.load([dora, plain])
    assert all(
        torch.equal(t, u) for t, u in zip((t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)), state)
    )
    runtime.load([plain, biased], scale=[2.0, 0.5])  # one bias per layer: its part's rows come first
    assert runtime.layers["0"].lora_scale.tolist()[:4] == [0.5, 0.5, 2.0, 2.0]
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        h = model[0].base_layer(x)
        for src, w in ((plain, 2.0), (biased, 0.5)):
            h = h + w * (x @ src["0.lora_A.weight"].T @ src["0.lora_B.weight"].T + src.get("0.lora_B.bias", 0.0))
        _close(model[0](x), h)


# -- several LoRA biases on one layer, unmerged ------------------------------------------------------

#: per part: rank, alpha, and the layers whose module carries a LoRA bias (layer 1 has no base bias)
_BIASED = [(2, 3.0, ("0", "1")), (3, 1.5, ("0", "1")), (1, 4.0, ("0",))]


def _biased_stack(model: nn.Module, n: int, seed: int, bias: float = 1.0) -> list[tuple[lorahot.Adapter, dict]]:
    """``n`` PEFT LoRAs (:data:`_BIASED`: ranks, alphas, biases of their own) on both layers of
    ``model``, each ``(adapter, name -> (A, B, c or None, alpha / r))`` in float64."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rank, alpha, biased in _BIASED[:n]:
        tensors, terms = {}, {}
        for i, layer in enumerate(model):
            a = torch.randn(rank, layer.in_features, generator=g, dtype=torch.float64)
            b = torch.randn(layer.out_features, rank, generator=g, dtype=torch.float64)
            c = torch.randn(layer.out_features, generator=g, dtype=torch.float64) * bias if str(i) in biased else None
            tensors |= {f"{i}.lora_A.weight": a, f"{i}.lora_B.weight": b}
            if c is not None:
                tensors[f"{i}.lora_B.bias"] = c
            terms[str(i)] = (a, b, c, alpha / rank)
        config = {"r": rank, "lora_alpha": alpha, "lora_bias": True}
        out.append((lorahot.read_adapter(tensors, config=config), terms))
    return out


def _biased_output(
    base: dict[str, torch.Tensor], x: torch.Tensor, parts: list[dict], weights: list[float]
) -> torch.Tensor:
    """float64 ``base(x) + sum_p w_p * s_p * (B_p A_p x + c_p)`` layer by layer: PEFT's sum of
    several active adapters, each ``lora_B`` with its bias, scaled by its ``alpha / r``."""
    h = x
    for i in range(2):
        y = F.linear(h, base[f"{i}.weight"], base.get(f"{i}.bias"))
        for terms, w in zip(parts, weights):
            a, b, c, s = terms[str(i)]
            y = y + w * s * (h @ a.T @ b.T + (0.0 if c is None else c))
        h = y
    return h


def _two_layers() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """float64 ``Linear(6, 5)`` (bias) -> ``Linear(5, 4)`` (no bias), and its state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4, bias=False)).double()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _regions(runtime: lorahot.LoraRuntime) -> list[torch.Tensor]:
    return [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]


@pytest.mark.parametrize("n", [2, 3])
def test_unmerged_stacks_add_the_lora_biases_of_parts_on_one_layer(n: int) -> None:
    """Unmerged, a stack whose parts each carry a LoRA bias on the same layers (one layer without a
    base bias) computes PEFT's sum of active adapters, ``base(x) + sum_p w_p s_p (B_p A_p x + c_p)``
    (float64, 1e-12), after load, set_scale (part 0 at weight 0, negative weights), a set_scale of
    the slot while another is active, activate of another slot and back, a per-row routing of both
    slots; a load of the same parts
    from the host cache writes the same buffers bitwise; unload gives the base output and default
    extras bitwise. These loads were refused ('an unmerged layer holds one')."""
    model, base = _two_layers()
    runtime = lorahot.inject(model, ["0", "1"], max_rank=8, slots=2, extras=True)
    fresh = _regions(runtime)
    stack = _biased_stack(model, n, seed=1)
    adapters, parts = [a for a, _ in stack], [t for _, t in stack]
    other = _biased_stack(model, 1, seed=2)
    x = torch.randn(3, 6, dtype=torch.float64)

    def check(p: list[dict], weights: list[float]) -> None:
        with torch.no_grad():
            torch.testing.assert_close(model(x), _biased_output(base, x, p, weights), rtol=1e-12, atol=1e-12)

    weights = [1.0, 0.5, -2.0][:n]
    runtime.load(adapters, scale=weights)
    check(parts, weights)
    for weights in ([0.0, 1.5, 0.25][:n], [-0.7, 2.0, 1.0][:n], [1.0] * n):
        runtime.set_scale(weights)
        check(parts, weights)
    runtime.load(other[0][0], slot=1, scale=0.5)
    runtime.activate(1)
    check([other[0][1]], [0.5])
    runtime.set_scale([0.3, -1.25, 0.5][:n], slot=0)  # slot 0 not live: its region only
    check([other[0][1]], [0.5])
    runtime.activate(0)
    check(parts, [0.3, -1.25, 0.5][:n])
    runtime.activate([0, 1, 0])  # per row: each row its own slot's extras
    with torch.no_grad():
        want = _biased_output(base, x, parts, [0.3, -1.25, 0.5][:n])
        want[1] = _biased_output(base, x, [other[0][1]], [0.5])[1]
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    runtime.activate(0)
    written = _regions(runtime)
    keys = [runtime.preload(a, key=f"part{p}") for p, a in enumerate(adapters)]
    runtime.unload(0)
    runtime.load([k.key for k in keys], scale=[0.3, -1.25, 0.5][:n])
    assert all(torch.equal(t, u) for t, u in zip(_regions(runtime), written))
    runtime.unload()
    with torch.no_grad():
        assert torch.equal(model(x), F.linear(F.linear(x, base["0.weight"], base["0.bias"]), base["1.weight"]))
    assert all(torch.equal(t, u) for t, u in zip(_regions(runtime), fresh))


@pytest.mark.parametrize(("device", "mode"), COMPILED_DEVICES)
def test_a_compiled_unmerged_model_swaps_and_reweights_lora_biases_without_recompiling(device: str, mode: str) -> None:
    """A compiled unmerged model under error_on_recompile=True: a stack of two and of three parts with
    LoRA biases on the same layers, re-weighted, a single biased adapter in another slot, activated in
    turn; each output the float64 reference's. The negative control, a new batch size, recompiles."""
    model, base = _two_layers()
    stacks = {n: _biased_stack(model, n, seed=n) for n in (2, 3)}
    runtime = lorahot.inject(model.to(device), ["0", "1"], max_rank=8, slots=2, extras=True)
    x = torch.randn(3, 6, dtype=torch.float64)
    counter = torch._dynamo.testing.CompileCounterWithBackend(
        functools.partial(torch._inductor.compile_fx.compile_fx, config_patches=torch._inductor.list_mode_options(mode))
    )
    compiled = torch.compile(model, backend=counter)

    def check(parts: list[tuple[lorahot.Adapter, dict]], weights: list[float]) -> None:
        want = _biased_output(base, x, [t for _, t in parts], weights).to(device)
        torch.testing.assert_close(compiled(x.to(device)), want, rtol=1e-10, atol=1e-10)

    runtime.load([a for a, _ in stacks[2]], scale=[1.0, 0.5])
    runtime.load(stacks[3][0][0], slot=1, scale=2.0)
    with torch.no_grad():
        for _ in range(3):
            compiled(x.to(device))
        with torch._dynamo.config.patch(error_on_recompile=True):
            check(stacks[2], [1.0, 0.5])
            for weights in ([0.0, -1.5], [2.0, 0.25]):
                runtime.set_scale(weights)
                check(stacks[2], weights)
            runtime.activate(1)
            check(stacks[3][:1], [2.0])
            runtime.activate(0)
            check(stacks[2], [2.0, 0.25])
            runtime.load([a for a, _ in stacks[3]], scale=[0.5, -1.0, 1.5])
            check(stacks[3], [0.5, -1.0, 1.5])
            with pytest.raises(torch._dynamo.exc.RecompileError):  # negative control
                compiled(torch.randn(5, 6, dtype=torch.float64, device=device))
    assert counter.frame_count == 1


@pytest.mark.usefixtures("replaying_cuda")
def test_replayed_set_scale_writes_the_summed_lora_biases_as_the_ordinary_path() -> None:
    """set_scale's graph replay (:mod:`lorahot.runtime.scale_replay`) on the CPU stand-in, which runs
    the captured steps again: a stack with several LoRA biases on one layer, re-weighted live and not
    live, gives bitwise the buffers and outputs of a twin whose replays are off, with replays run.
    Without the bias sums among the steps the replayed g rows keep the weights of before."""
    models = [_two_layers()[0] for _ in range(2)]
    runtimes = [lorahot.inject(m, ["0", "1"], max_rank=8, slots=2, extras=True) for m in models]
    runtimes[0]._replay.device = torch.device("cpu")  # as on one CUDA device
    x = torch.randn(3, 6, dtype=torch.float64)
    for r, m in zip(runtimes, models):
        stack = _biased_stack(m, 3, seed=4)
        r.load([a for a, _ in stack], scale=[1.0, 0.5, 0.25])
        r.load(stack[0][0], slot=1)
    steps = [([0.5, 1.0, -1.0], 0), ([2.0, 0.0, 1.0], 0), ([0.5, 1.0, -1.0], 0), ([2.0, 0.0, 1.0], 0)]
    steps += [([-1.0, 0.5, 3.0], None), ("activate", 1), ([0.25, 0.75, 1.0], 0), ([-1.0, 0.5, 3.0], 0), ("activate", 0)]
    for weights, slot in steps * 2:
        for r in runtimes:
            if weights == "activate":
                r.activate(slot)
            else:
                r.set_scale(weights, slot=slot)
        assert all(torch.equal(t, u) for t, u in zip(_regions(runtimes[0]), _regions(runtimes[1])))
        with torch.no_grad():
            assert torch.equal(models[0](x), models[1](x)), (weights, slot)
    assert runtimes[0]._replay.replays >= 4 and runtimes[1]._replay.replays == 0


# -- merged mode, the wide layers ------------------------------------------------------------------------


def _biased_parts(model: nn.Module, n: int, seed: int, scale: float = 0.3) -> list[dict[str, torch.Tensor]]:
    """``n`` PEFT LoRAs (rank 2, alpha = rank) on every layer of ``model``, each with a LoRA bias."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(n):
        part: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(model):
            part[f"{i}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g, dtype=torch.float64)
            part[f"{i}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g, dtype=torch.float64)
            part[f"{i}.lora_B.bias"] = torch.randn(layer.out_features, generator=g, dtype=torch.float64) * scale
        parts.append(part)
    return parts


def _biased_reference(
    model: nn.Module, base: dict[str, torch.Tensor], parts: list[dict[str, torch.Tensor]], weights: list[float]
) -> dict[str, torch.Tensor]:
    """float64 ``W0 + sum_p w_p B_p A_p`` and ``b0 + sum_p w_p c_p`` (PEFT's sum of active adapters,
    each ``lora_B`` with its bias, at ``alpha / r`` 1)."""
    out = {k: v.double().clone() for k, v in base.items()}
    for part, w in zip(parts, weights):
        for i in range(len(model)):
            out[f"{i}.weight"] += w * part[f"{i}.lora_B.weight"] @ part[f"{i}.lora_A.weight"]
            out[f"{i}.bias"] += w * part[f"{i}.lora_B.bias"]
    return out


def test_merged_mode_adds_the_lora_biases_of_parts_on_one_layer() -> None:
    """Merged, a stack whose parts each carry a LoRA bias on the same layers folds their sum, each at its
    part's ``w * alpha / r`` (as PEFT adds several active adapters' outputs), after load, set_scale,
    activate of another slot and back; unload puts the base back bitwise. These loads were refused
    ("a layer holds one"), while fuse= folded the same biases."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = lorahot.inject(model, ["0", "1"], max_rank=8, slots=2, merged=True)
    parts = _biased_parts(model, 3, seed=0)
    runtime.load(parts[:2], scale=[1.0, 0.5])
    runtime.load(parts[2], slot=1, scale=0.25)
    for weights in ([1.0, 0.5], [0.7, -1.0], [0.0, 2.0]):
        runtime.set_scale(weights)
        for k, v in _biased_reference(model, base, parts[:2], weights).items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-12, atol=1e-12)
    runtime.activate(1)
    for k, v in _biased_reference(model, base, parts[2:], [0.25]).items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-12, atol=1e-12)
    runtime.activate(0)
    for k, v in _biased_reference(model, base, parts[:2], [0.0, 2.0]).items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-12, atol=1e-12)
    runtime.unload()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())


def test_merged_lora_biases_that_overflow_only_summed_are_refused_with_nothing_changed() -> None:
    """float16: two LoRA biases of 33000 each fit alone and at weights [1, 0.5] (49500), not summed at
    [1, 1] (66000 > 65504): the load and the set_scale are refused, the weights and biases bitwise as they
    were."""
    model = nn.Sequential(nn.Linear(6, 5)).half()
    runtime = lorahot.inject(model, ["0"], max_rank=8, merged=True)
    parts = [
        {
            "0.lora_A.weight": torch.zeros(2, 6, dtype=torch.float16),
            "0.lora_B.weight": torch.zeros(5, 2, dtype=torch.float16),
            "0.lora_B.bias": torch.full((5,), 33000.0, dtype=torch.float16),
        }
        for _ in range(2)
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.UsageError, match=r"scale=\[1, 1\]: merged weights would overflow the model's dtype"):
        runtime.load(parts)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    runtime.load(parts, scale=[1.0, 0.5])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.UsageError, match=r"scale=\[1, 1\]: merged weights would overflow the model's dtype"):
        runtime.set_scale([1.0, 1.0])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert runtime.info().scale == (1.0, 0.5)


@pytest.mark.parametrize(("device", "mode"), COMPILED_DEVICES)
def test_a_compiled_merged_model_swaps_between_one_and_two_lora_biases_without_recompiling(
    device: str, mode: str
) -> None:
    """A compiled merged model under error_on_recompile=True: a part with a LoRA bias, then a stack of
    two on the same layers, then back; each output the float64 reference's."""
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    parts = _biased_parts(model, 2, seed=3)
    x = torch.randn(3, 6, dtype=torch.float64)

    def output(params: dict[str, torch.Tensor]) -> torch.Tensor:
        h = F.linear(x, params["0.weight"], params["0.bias"])
        return F.linear(h, params["1.weight"], params["1.bias"]).to(device)

    runtime = lorahot.inject(model.to(device), ["0", "1"], max_rank=8, merged=True)
    swaps = [
        (parts[0], output(_biased_reference(model, base, parts[:1], [1.0]))),
        (parts, output(_biased_reference(model, base, parts, [1.0, 1.0]))),
        (parts[0], output(_biased_reference(model, base, parts[:1], [1.0]))),
    ]
    assert_swaps_without_recompile(runtime, model, x.to(device), swaps, tol=1e-10, mode=mode)


def test_merged_mode_sums_lora_and_diff_parts_into_the_weight() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24)).double()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    g = torch.Generator().manual_seed(1)
    diff = {
        "lora_unet_0.diff": torch.randn(24, 16, generator=g).double(),
        "lora_unet_0.diff_b": torch.randn(24).double(),
    }
    lora = {"0.lora_A.weight": torch.randn(4, 16, generator=g).double(), "0.lora_B.weight": torch.randn(24, 4).double()}
    delta = lora["0.lora_B.weight"] @ lora["0.lora_A.weight"] * (8 / 4)
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    with pytest.raises(lorahot.UsageError, match=r"In a stack, config= applies to every part") as refused:
        runtime.load([lora, diff], scale=[0.5, -2.0], config={"lora_alpha": 8})  # the diff part takes no config
    assert "lora_unet_0: lora_alpha=8.0 (from config=)" in str(refused.value)
    assert torch.equal(model[0].weight, w0) and torch.equal(model[0].bias, b0) and runtime.info() is None
    info = runtime.load([lorahot.read_adapter(lora, config={"lora_alpha": 8}), diff], scale=[0.5, -2.0])
    assert info.format == "peft+kohya"
    x = torch.randn(3, 16, dtype=torch.float64)
    for w in ([0.5, -2.0], [1.5, 0.25]):
        runtime.set_scale(w)
        want = F.linear(x, w0 + w[0] * delta + w[1] * diff["lora_unet_0.diff"], b0 + w[1] * diff["lora_unet_0.diff_b"])
        with torch.no_grad():
            _close(model(x), want)
    runtime.unload()
    assert torch.equal(model[0].weight, w0) and torch.equal(model[0].bias, b0)
    unmerged = lorahot.inject(nn.Sequential(nn.Linear(16, 24)).double(), ["0"], max_rank=4)
    with pytest.raises(lorahot.AdapterMismatchError, match="lorahot loads only in merged mode"):
        unmerged.load([lora, diff])


@pytest.fixture
def widen_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    yield


def test_wide_rows_hold_each_row_times_its_own_scale(tmp_path: Path, widen_on_cpu: None) -> None:
    model, runtime = _setup()
    assert runtime.layers[Q0].wide
    sources, parts = _three_parts(tmp_path, model)
    for scale in ([0.5, -1.0, 2.0], [3.0, 0.0, -0.25]):
        runtime.load(sources, scale=scale)
        _close(_out(model), _expected(*parts, weights=scale))
        runtime.set_scale(scale[::-1])
        _close(_out(model), _expected(*parts, weights=scale[::-1]))
        for name in (Q0, V1, UP0):
            layer = runtime.layers[name]
            assert torch.equal(layer.wide_rows(), layer.lora_B * layer.lora_scale[:, None]), name
    runtime.load(sources[0])  # one adapter again: the rows past its rank go back to zero
    assert not runtime.layers[Q0].wide_rows()[2:].any()
    _close(_out(model), _expected(parts[0], weights=[1.0]))


# -- any sequence of operations ----------------------------------------------------------------------------

IN, HID, OUT, R = 10, 12, 6, 8
_PART = st.tuples(st.integers(1, 4), st.sampled_from(["0", "2", "both"]), st.sampled_from([1.0, 0.5, 3.0]))  # alpha/r
#: every field drawn for every operation (each kind reads its own), so the kinds come up evenly
OPS = st.tuples(
    st.sampled_from(["load", "load", "scale", "scale_list", "activate", "unload"]),
    st.sampled_from([None, None, 0, 1]),  # the slot (None: the active one)
    st.lists(_PART, min_size=1, max_size=2),  # the parts of a load
    st.booleans(),  # a load of one part given as a list
    # weights (none that takes a scale below float32's normal range: refused, test_plan.py)
    st.lists(st.floats(-3, 3).filter(lambda w: w == 0 or abs(w) >= 1e-30), min_size=2, max_size=2),
)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, OUT, bias=False)).double()


def _random_part(rank: int, where: str, scale: float, seed: int) -> tuple[lorahot.Adapter, dict[str, torch.Tensor]]:
    """An adapter (read with its own alpha, ``scale * r``: the parts of a stack share read
    options) and its dense ``scale * B @ A`` per layer."""
    g = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    for name, (fin, fout) in {"0": (IN, HID), "2": (HID, OUT)}.items():
        if where in (name, "both"):
            a = torch.randn(rank, fin, generator=g, dtype=torch.float64)
            b = torch.randn(fout, rank, generator=g, dtype=torch.float64)
            tensors |= {f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b}
            dense[name] = scale * (b @ a)
    return lorahot.read_adapter(tensors, config={"lora_alpha": scale * rank}), dense


def _mlp_reference(weights: dict[str, torch.Tensor], held: list[tuple[dict, float]] | None, x: torch.Tensor):
    def w(name: str) -> torch.Tensor:
        return weights[f"{name}.weight"] + sum((wt * d[name] for d, wt in held or [] if name in d), torch.zeros(()))

    return F.gelu(x @ w("0").T + weights["0.bias"]) @ w("2").T


@pytest.mark.parametrize("mode", ["library", "wide", "merged"])
def test_any_sequence_of_loads_stacks_and_weights_matches_the_dense_reference(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if mode == "wide":
        monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops=st.lists(OPS, min_size=3, max_size=8), seed=st.integers(0, 10_000))
    def run(ops: list[tuple], seed: int) -> None:
        model = _mlp()
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        runtime = lorahot.inject(model, ["0", "2"], max_rank=R, slots=2, merged=mode == "merged")
        held: list[list[tuple[dict, float]] | None] = [None, None]  # per slot: (dense deltas, weight) per part
        active = 0
        x = torch.randn(4, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        for k, (kind, which, specs, listed, ws) in enumerate(ops):
            slot = active if which is None else which
            if kind == "load":
                made = [_random_part(r, where, s, seed + 10 * k + i) for i, (r, where, s) in enumerate(specs)]
                if listed or len(made) > 1:
                    runtime.load([a for a, _ in made], slot=slot, scale=ws[: len(made)])
                else:
                    runtime.load(made[0][0], slot=slot, scale=ws[0])
                held[slot] = [(d, w) for (_, d), w in zip(made, ws)]
            elif kind in ("scale", "scale_list"):
                parts = held[slot]
                if parts is None:
                    continue
                value = ws[: len(parts)] if kind == "scale_list" else ws[0]
                runtime.set_scale(value, slot=which)
                held[slot] = [(d, w) for (d, _), w in zip(parts, value if isinstance(value, list) else ws[:1] * 2)]
            elif kind == "activate":
                runtime.activate(slot)
                active = slot
            else:
                runtime.unload(slot)
                held[slot] = None
            with torch.no_grad():
                got = model(x)
            _close(got, _mlp_reference(weights, held[active], x))

    run()
