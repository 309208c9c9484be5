"""A weight per component (``lorahot.runtime.layer_weights``) on a runtime over two models: each
component's layers at their part's weight there (1 where the dict leaves the component out),
against float64 dense references, drawn by hypothesis over stacks of two; the range checks of a
float16 runtime read each layer's own weight. Block dicts and diffusers parity:
``tests/system/test_parity_component_scales.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorahot
from tests.helpers import random_lora, stack_reference, tiny_lm, token_ids

Q0, V1, UP0 = "layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.0.mlp.up_proj"
TARGETS = ["q_proj", "v_proj", "up_proj"]
IDS = token_ids((2, 6), 32, seed=3)
COMPONENTS = ("lm", "lm2")
#: each part's modules per component (ranks): parts share some layers and leave others
PARTS = [{"lm": {Q0: 2, V1: 4}, "lm2": {Q0: 4}}, {"lm": {Q0: 4, UP0: 2}, "lm2": {V1: 2}}]


def _parts(models: dict[str, nn.Module], b_scale: float = 1.0, dtype=torch.float64):
    """Each part's diffusers-named file (``<component>.<module>.lora_A.weight``, alpha = rank:
    scale 1) and its ``component -> name -> (A, B)``."""
    out = []
    for p, spec in enumerate(PARTS):
        g = torch.Generator().manual_seed(p + 1)
        source, ab = {}, {}
        for c, ranks in spec.items():
            for name, r in ranks.items():
                a, b = random_lora(models[c].get_submodule(name), r, g, torch.float64)
                b = b * b_scale
                source[f"{c}.{name}.lora_A.weight"], source[f"{c}.{name}.lora_B.weight"] = a.to(dtype), b.to(dtype)
                ab.setdefault(c, {})[name] = (a, b)
        out.append((source, ab))
    return out


def _weight(w: float | dict, c: str) -> float:
    return w if not isinstance(w, dict) else (1.0 if w.get(c) is None else w[c])


def _expected(parts, weights: list) -> dict[str, torch.Tensor]:
    return {
        c: stack_reference(
            tiny_lm(seed=i, dtype=torch.float64),
            IDS,
            [{n: (a, b, _weight(w, c)) for n, (a, b) in ab.get(c, {}).items()} for (_, ab), w in zip(parts, weights)],
        )
        for i, c in enumerate(COMPONENTS)
    }


def _setup(dtype=torch.float64, merged: bool = False):
    models = {c: tiny_lm(seed=i, dtype=dtype) for i, c in enumerate(COMPONENTS)}
    runtime = lorahot.inject(models, TARGETS, max_rank=8, merged=merged)
    return models, runtime


def _outs(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {c: m(IDS) for c, m in models.items()}


WEIGHT = st.one_of(
    st.floats(-4, 4, allow_nan=False, allow_subnormal=False),
    st.dictionaries(
        st.sampled_from(COMPONENTS), st.one_of(st.none(), st.floats(-4, 4, allow_nan=False, allow_subnormal=False))
    ),
)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@settings(max_examples=15, deadline=None)
@given(weights=st.lists(WEIGHT, min_size=2, max_size=2))
def test_each_component_takes_its_part_s_weight_as_a_float64_reference(merged: bool, weights: list) -> None:
    models, runtime = _setup(merged=merged)
    parts = _parts(models)
    runtime.load([s for s, _ in parts], scale=[1.0, {"lm": 0.5}])
    runtime.set_scale(weights)
    want = _expected(parts, weights)
    for c, y in _outs(models).items():
        torch.testing.assert_close(y, want[c], rtol=1e-10, atol=1e-10, msg=c)
    assert [p.scale for p in runtime.info().parts] == [w if isinstance(w, dict) else float(w) for w in weights]


def test_float16_range_checks_read_each_layer_s_own_weight() -> None:
    """A float16 runtime whose ``lm`` updates near float16's largest value at weight 1: a dict
    that pushes ``lm`` further is refused naming an ``lm`` layer, nothing changed; one that
    weighs only ``lm2`` (small updates) by 1000 loads, though 1000 on ``lm`` would not."""
    models = {c: tiny_lm(seed=i, dtype=torch.float16) for i, c in enumerate(COMPONENTS)}
    runtime = lorahot.inject(models, TARGETS, max_rank=8)
    big = _parts(models, dtype=torch.float16)
    sources = []
    for source, _ in big:
        sources.append({k: v * (3000.0 if k.startswith("lm.") and "lora_B" in k else 1.0) for k, v in source.items()})
    runtime.load(sources, scale=[{"lm2": 1000.0}, {"lm2": 1000.0}])
    before = {k: t.clone() for a in runtime.buffers.arenas for k, t in (("S", a.S), ("E", a.E))}
    outs = _outs(models)
    with pytest.raises(lorahot.UsageError, match=r"(?s)would leave the LoRA buffers' dtype.*lm\.layers"):
        runtime.set_scale([{"lm": 1000.0}, {"lm": 1000.0}])
    assert all(torch.equal(before[k], t) for a in runtime.buffers.arenas for k, t in (("S", a.S), ("E", a.E)))
    assert all(torch.equal(outs[c], y) for c, y in _outs(models).items())
    assert runtime.info().parts[0].scale == {"lm2": 1000.0}
    assert math.isfinite(float(_outs(models)["lm2"].abs().max()))


def test_a_dict_on_a_runtime_over_one_model_that_is_no_unet_is_refused() -> None:
    model = tiny_lm(dtype=torch.float64)
    runtime = lorahot.inject(model, TARGETS, max_rank=8)
    parts = _parts({"lm": model, "lm2": tiny_lm(seed=1, dtype=torch.float64)})
    source = {k[len("lm.") :]: v for k, v in parts[0][0].items() if k.startswith("lm.")}
    with pytest.raises(lorahot.UsageError, match=r"applies to a diffusers UNet .* the runtime.s model is a TinyLM"):
        runtime.load(source, scale={"lm": 0.5})
    assert runtime.info(0) is None


def test_set_scale_with_a_dict_takes_the_ordinary_path_past_the_cuda_graph_replay() -> None:
    """set_scale's CUDA graph replay uploads one weight per part: a weight per layer never goes
    to it (the ordinary path writes every row), and a number after a dict does again, each at
    its float64 reference."""
    models, runtime = _setup()
    parts = _parts(models)
    runtime.load([s for s, _ in parts])
    seen: list[tuple] = []

    def replay(slot, live, stack, weights) -> bool:
        seen.append(tuple(weights))
        return False  # as on the CPU: the caller writes the rows itself

    runtime._replay = replay  # type: ignore[method-assign]
    for weights in ([0.5, 2.0], [{"lm": 0.0}, 1.0], [-1.0, 0.25], [1.0, {"lm2": 3.0, "lm": None}]):
        runtime.set_scale(weights)
        want = _expected(parts, weights)
        for c, y in _outs(models).items():
            torch.testing.assert_close(y, want[c], rtol=1e-10, atol=1e-10, msg=f"{weights} {c}")
    assert seen == [(0.5, 2.0), (-1.0, 0.25)]


def _state(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (the LoRA buffers too) of every model, copied."""
    return {
        f"{c}.{n}": t.detach().clone()
        for c, m in models.items()
        for n, t in [*m.named_parameters(), *m.named_buffers()]
    }


def test_info_reads_back_the_dict_given_whatever_the_caller_does_to_an_earlier_info() -> None:
    """``info()`` hands the caller the dict weight: editing what it returned (or what ``load``
    returned) leaves the runtime's record as set, and the next ``info()`` reads back the weight
    in force."""
    models, runtime = _setup()
    parts = _parts(models)
    given = [{"lm": 0.5, "lm2": None}, {"lm2": 2.0}]
    loaded = runtime.load([s for s, _ in parts], scale=given)
    loaded.parts[0].scale["lm"] = 9.0  # type: ignore[index]
    runtime.info().scale[1]["lm2"] = -1.0  # type: ignore[index]
    assert [p.scale for p in runtime.info().parts] == given
    runtime.set_scale(given[::-1])
    runtime.info().parts[1].scale["lm2"] = 7.0  # type: ignore[index]
    assert runtime.info().scale == tuple(given[::-1])
    want = _expected(parts, given[::-1])
    for c, y in _outs(models).items():
        torch.testing.assert_close(y, want[c], rtol=1e-10, atol=1e-10, msg=c)


class _Endless(dict):
    """A dict whose ``items`` yields distinct keys far past any weight's size."""

    def items(self):  # type: ignore[override]
        return ((f"k{i}", 1.0) for i in range(10**6))


class _Unreadable(list):
    def __iter__(self):  # type: ignore[override]
        raise RuntimeError("no entries")


class _Lying(list):
    """A list of len 0 that yields numbers without end (stopped at 10**6 to keep the test finite)."""

    def __iter__(self):  # type: ignore[override]
        for _ in range(10**6):
            yield 0.5
        raise RuntimeError("read past 10**6 entries")


def _nested(depth: int) -> dict:
    out: object = 0.5
    for _ in range(depth):
        out = {"lm": out}
    return out  # type: ignore[return-value]


def _self_containing() -> dict:
    d: dict = {}
    d["lm"] = d
    return d


#: a dict weight the caller's types make unreadable or endless: (weight, what the refusal says)
UNREADABLE = {
    "self-containing": (_self_containing, "levels of dicts and lists"),
    "nested-5000-deep": (lambda: _nested(5000), "levels of dicts and lists"),
    "endless-items": (lambda: _Endless(), "more than 65536 entries"),
    "list-whose-iter-raises": (lambda: {"lm": _Unreadable([1.0])}, r"cannot be read \(_Unreadable raised"),
    "list-yielding-past-its-len": (lambda: {"lm": _Lying()}, "yields another count"),
}


@pytest.mark.parametrize("case", UNREADABLE)
def test_a_dict_weight_that_cannot_be_read_in_bounds_is_refused_with_the_models_unchanged(case: str) -> None:
    """A self-containing or deeply nested dict (RecursionError), a list whose ``__iter__`` raises,
    and lazy mappings or lists that yield without end (a hang) are each a UsageError, for
    ``set_scale`` and ``load``, after a dict weight already in force, every parameter and buffer
    bitwise unchanged."""
    make, match = UNREADABLE[case]
    models, runtime = _setup()
    parts = _parts(models)
    runtime.load([s for s, _ in parts], scale=[{"lm": 0.5}, 2.0])
    before = _state(models)
    with pytest.raises(lorahot.UsageError, match=match):
        runtime.set_scale([make(), 1.0])
    with pytest.raises(lorahot.UsageError, match=match):
        runtime.load([s for s, _ in parts], scale=[1.0, make()])
    after = _state(models)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert runtime.info().scale == ({"lm": 0.5}, 2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merged_weights_after_dicts_numbers_and_swaps_are_a_fresh_merge_bitwise(dtype: torch.dtype) -> None:
    """Merged mode re-folds from the base, never from the last fold: after dict and number
    weights in turn, ``slot=`` re-weightings and activations there and back, every merged weight
    is bitwise what a fresh runtime loading the last weights folds."""
    models = {c: tiny_lm(seed=i, dtype=dtype) for i, c in enumerate(COMPONENTS)}
    runtime = lorahot.inject(models, TARGETS, max_rank=8, merged=True, slots=2)
    sources = [s for s, _ in _parts(models, dtype=dtype)]
    last = [{"lm": -0.75, "lm2": None}, {"lm2": 2.5}]
    runtime.load(sources, scale=[{"lm": 3.0}, 0.5])
    runtime.load(sources[0], slot=1, scale={"lm2": -2.0})
    for weights in ([0.3, {"lm": 0.0}], [{"lm2": 1.7}, -1.25], last, [2.0, 2.0], last):
        runtime.set_scale(weights)
        runtime.set_scale({"lm": 0.6}, slot=1)
        runtime.activate(1)
        runtime.activate(0)
    fresh = {c: tiny_lm(seed=i, dtype=dtype) for i, c in enumerate(COMPONENTS)}
    lorahot.inject(fresh, TARGETS, max_rank=8, merged=True).load(sources, scale=last)
    want = {f"{c}.{n}": p for c, m in fresh.items() for n, p in m.named_parameters()}
    got = {f"{c}.{n}": p for c, m in models.items() for n, p in m.named_parameters()}
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    base = {c: tiny_lm(seed=i, dtype=dtype) for i, c in enumerate(COMPONENTS)}
    lorahot.inject(base, TARGETS, max_rank=8, merged=True)  # nothing loaded: the base weights, named as merged
    # the five layers the parts have modules on (lm: q0, v1, up0; lm2: q0, v1) hold their folds
    assert sum(not torch.equal(got[f"{c}.{n}"], p) for c, m in base.items() for n, p in m.named_parameters()) == 5


def _unet_file(unet: nn.Module, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A rank-2 LoRA in the UNet's own names on each of its Linears and Conv2ds named by ``targets``, float64."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in unet.named_modules():
        if not any(name.endswith("." + t) for t in targets) or not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(mod, nn.Linear):
            a, b = (2, mod.in_features), (mod.out_features, 2)
        else:
            a, b = (2, mod.in_channels, *mod.kernel_size), (mod.out_channels, 2, 1, 1)
        out[f"{name}.lora_A.weight"] = torch.randn(*a, generator=g, dtype=torch.float64) * 0.1
        out[f"{name}.lora_B.weight"] = torch.randn(*b, generator=g, dtype=torch.float64) * 0.1
    return out


@pytest.mark.parametrize("wrapper", ["checkpoint", "compile", "checkpoint whole"])
def test_a_unet_wrapped_before_inject_takes_its_block_weights_as_diffusers_gives_the_unwrapped_unet(
    wrapper: str,
) -> None:
    """A UNet block compiled or checkpoint-wrapped before inject names its layers
    ``down_blocks.0._checkpoint_wrapped_module.attentions.0...``; block weights read the UNet's paths
    with only leading ``_orig_mod.`` levels dropped, so ``{"down": 0.0, ...}`` was refused as naming
    ``down_blocks.0.attentions.0``, an attention the UNet has, and its layers could take no entry; a UNet
    checkpoint-wrapped whole was refused as no UNet. Its paths are now the UNet's own (the wrapper levels
    dropped wherever they are, as key matching reads them): the output is diffusers' ``set_adapters`` on
    the unwrapped UNet, in float64."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from tests.helpers import tiny_unet

    unet = tiny_unet().double()
    targets = ["to_q", "to_v", "conv1"]
    file = _unet_file(unet, targets, 3)
    weight = {"down": 0.0, "mid": 2.0, "up": {"block_1": [0.5, 1.0]}}
    oracle = copy.deepcopy(unet)
    oracle.load_lora_adapter(dict(file), prefix=None, adapter_name="a")
    oracle.set_adapters("a", weights=copy.deepcopy(weight))
    ours = copy.deepcopy(unet)
    if wrapper == "checkpoint whole":
        ours, path = checkpoint_wrapper(ours), "_checkpoint_wrapped_module.down_blocks.0.attentions.0"
    elif wrapper == "compile":
        ours.down_blocks[0], path = torch.compile(ours.down_blocks[0], backend="eager"), "down_blocks.0._orig_mod"
    else:
        ours.down_blocks[0], path = checkpoint_wrapper(ours.down_blocks[0]), "down_blocks.0._checkpoint_wrapped_module"
    runtime = lorahot.inject(ours, targets, max_rank=2, dtype=torch.float64)
    assert any(n.startswith(path + ".") for n in runtime.layers)
    runtime.load(file, scale=weight)
    sample, context = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        want = oracle(sample, 7, encoder_hidden_states=context).sample
        got = ours(sample, 7, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
