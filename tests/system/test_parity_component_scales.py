"""A weight per component and per UNet block (``set_scale({"unet": 0.5, "text_encoder": 0.0})``,
``{"unet": {"down": 0.0, "mid": 1.0, "up": {...}}}``) against diffusers' pipeline ``set_adapters``
with dict weights, on the tiny SDXL pipeline of ``test_parity_pipeline`` in float64, stacks of two
adapters at different dict weights; and every refusal, with the model bitwise unchanged.

The tiny UNet (``layers_per_block=1``) has attentions in ``down_blocks.0`` (one), ``mid_block``
and ``up_blocks.1`` (two); ``down_blocks.1`` and ``up_blocks.0`` have none.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorahot
from tests.system.test_parity_pipeline import TARGETS, _diffusers_file, _pipeline, _run, _tensors

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

#: UNet targets with a block's resnets, down- and upsamplers and time projections beside its attentions
WIDE_UNET = ["to_q", "to_v", "conv1", "conv2", "time_emb_proj", "conv", "proj_in"]


@pytest.fixture(scope="module")
def pipe64() -> diffusers.StableDiffusionXLPipeline:
    return _pipeline().to(torch.float64)


def _file(pipe, seed: int, components: list[str] | None = None) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in _diffusers_file(pipe, components or list(TARGETS), seed).items()}


def _conv_file(pipe, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A diffusers-named LoRA on every Linear and Conv2d of the UNet named by ``targets``, float64."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in pipe.unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(mod, nn.Linear):
            a, b = (4, mod.in_features), (mod.out_features, 4)
        elif isinstance(mod, nn.Conv2d):
            a, b = (4, mod.in_channels, *mod.kernel_size), (mod.out_channels, 4, 1, 1)
        else:
            continue
        out[f"unet.{name}.lora_A.weight"] = torch.randn(*a, generator=g, dtype=torch.float64) * 0.1
        out[f"unet.{name}.lora_B.weight"] = torch.randn(*b, generator=g, dtype=torch.float64) * 0.1
    return out


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: object) -> None:
    for c in TARGETS:
        torch.testing.assert_close(got[c], want[c], rtol=1e-10, atol=1e-10, msg=f"{what} {c}")


#: weights per part of a stack of two, as diffusers' pipeline set_adapters takes them
STACKED = [
    [{"unet": 0.5, "text_encoder": 0.0}, 1.0],
    [{"text_encoder_2": -0.7}, {"unet": 0.0, "text_encoder": 2.0, "text_encoder_2": None}],
    [{"unet": {"down": 0.0, "mid": 1.0, "up": {"block_1": [0.0, 1.0]}}}, {"unet": {"mid": [0.25]}}],
    [{"unet": {"up": [0.3, -0.6], "down": {"block_0": [2.0]}}, "text_encoder": 0.4}, {"unet": {"down": 0.5}}],
    [{"unet": {"up": {"block_1": 0.0}}}, 0.3],
]


def test_component_and_block_dicts_match_diffusers_set_adapters(pipe64) -> None:
    """A stack of two full files, re-weighted by ``set_scale`` and loaded with ``scale=``, each
    part at its own dict (components, UNet blocks, block lists, None, components left out),
    equals diffusers' ``pipe.set_adapters(["a", "b"], adapter_weights=[...])``."""
    a, b = _file(pipe64, 1), _file(pipe64, 2)
    oracle = copy.deepcopy(pipe64)
    oracle.load_lora_weights(dict(a), adapter_name="a")
    oracle.load_lora_weights(dict(b), adapter_name="b")
    ours = copy.deepcopy(pipe64)
    runtime = lorahot.inject(ours, TARGETS, max_rank=8, dtype=torch.float64)
    runtime.load([a, b])
    fresh = copy.deepcopy(pipe64)
    loaded = lorahot.inject(fresh, TARGETS, max_rank=8, dtype=torch.float64)
    base = _run(pipe64, torch.float64)
    for weights in STACKED:
        oracle.set_adapters(["a", "b"], adapter_weights=copy.deepcopy(weights))
        want = _run(oracle, torch.float64)
        runtime.set_scale(weights)
        _close(_run(ours, torch.float64), want, weights)
        info = loaded.load([a, b], scale=weights)
        _close(_run(fresh, torch.float64), want, f"load {weights}")
        assert [p.scale for p in runtime.info().parts] == [p.scale for p in info.parts] == weights
        assert info.scale == tuple(weights)
    assert not torch.allclose(want["unet"], base["unet"])


def test_one_adapter_and_a_preloaded_one_take_a_dict(pipe64) -> None:
    """One adapter (not a stack) with a dict, loaded from a file and from ``preload``, equals
    diffusers' ``set_adapters("a", {...})``."""
    a = _file(pipe64, 3)
    oracle = copy.deepcopy(pipe64)
    oracle.load_lora_weights(dict(a), adapter_name="a")
    weight = {"unet": {"down": -1.0, "up": {"block_1": [0.5, 0.0]}}, "text_encoder": 0.0}
    oracle.set_adapters("a", adapter_weights=copy.deepcopy(weight))
    want = _run(oracle, torch.float64)
    ours = copy.deepcopy(pipe64)
    runtime = lorahot.inject(ours, TARGETS, max_rank=8, dtype=torch.float64)
    info = runtime.load(a, scale=weight)
    assert info.scale == weight and info.parts[0].scale == weight
    _close(_run(ours, torch.float64), want, "load")
    runtime.set_scale(1.0)
    runtime.preload(a, key="a")
    runtime.load("a", scale=weight)
    _close(_run(ours, torch.float64), want, "preloaded")
    runtime.set_scale([weight])
    _close(_run(ours, torch.float64), want, "set_scale")


def test_resnets_and_samplers_take_diffusers_fallback_block_weights(pipe64) -> None:
    """A UNet layer no block entry names takes, as PEFT's ``get_module_weight`` gives it, the
    weight of the attention of its own block and index (``down_blocks.0.resnets.0`` and
    ``down_blocks.0.downsamplers.0`` that of ``down_blocks.0.attentions.0``), else 1 (a block
    without attentions, the mid block's resnets)."""
    unet_only = _conv_file(pipe64, WIDE_UNET, seed=4)
    oracle = copy.deepcopy(pipe64)
    oracle.load_lora_weights(dict(unet_only), adapter_name="a")
    ours = copy.deepcopy(pipe64)
    runtime = lorahot.inject(ours, {"unet": WIDE_UNET}, max_rank=8, dtype=torch.float64)
    info = runtime.load(unet_only)
    assert any(".resnets." in n for n in info.ranks) and any("samplers" in n for n in info.ranks)
    for weight in (
        {"unet": {"down": 0.0, "mid": 0.5, "up": {"block_1": [2.0, -1.0]}}},
        {"unet": {"down": 3.0, "up": 0.0}},
    ):
        oracle.set_adapters("a", adapter_weights=copy.deepcopy(weight))
        runtime.set_scale(weight)
        got, want = _run(ours, torch.float64), _run(oracle, torch.float64)
        torch.testing.assert_close(got["unet"], want["unet"], rtol=1e-10, atol=1e-10)


def test_a_unet_runtime_takes_a_block_dict_as_unet_set_adapters(pipe64) -> None:
    """A runtime over the UNet alone takes a block dict, as diffusers' ``unet.set_adapters``."""
    a = _file(pipe64, 5, ["unet"])
    oracle = copy.deepcopy(pipe64.unet)
    oracle.load_lora_adapter({k[len("unet.") :]: v for k, v in a.items()}, prefix=None, adapter_name="a")
    weight = {"down": 0.0, "mid": 2.0, "up": {"block_1": [0.5, 1.0]}}
    oracle.set_adapters("a", weights=copy.deepcopy(weight))
    ours = copy.deepcopy(pipe64.unet)
    runtime = lorahot.inject(ours, TARGETS["unet"], max_rank=8, dtype=torch.float64)
    runtime.load(a, scale=weight)
    sample, context = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        want = oracle(sample, 7, encoder_hidden_states=context).sample
        got = ours(sample, 7, encoder_hidden_states=context).sample
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    te = copy.deepcopy(pipe64.text_encoder)
    refused = lorahot.inject(te, TARGETS["text_encoder"], max_rank=8)
    with pytest.raises(lorahot.UsageError, match="applies to a diffusers UNet"):
        refused.load(_file(pipe64, 5, ["text_encoder"]), scale={"layers.0": 0.5})


def test_one_dict_for_a_stack_is_refused_where_diffusers_gives_it_to_the_first_adapter_only(pipe64) -> None:
    """diffusers' pipeline ``set_adapters(["a", "b"], {"unet": 0.5})`` pops the UNet's weight from
    the one dict for ``a`` and gives ``b`` 1 there; lorahot refuses one dict for several parts."""
    a, b = _file(pipe64, 1, ["unet"]), _file(pipe64, 2, ["unet"])
    oracle = copy.deepcopy(pipe64)
    oracle.load_lora_weights(dict(a), adapter_name="a")
    oracle.load_lora_weights(dict(b), adapter_name="b")
    oracle.set_adapters(["a", "b"], adapter_weights={"unet": 0.5})
    theirs = _run(oracle, torch.float64)["unet"]
    shared = {"unet": 0.5}
    oracle.set_adapters(["a", "b"], adapter_weights=[shared, shared])  # one dict object twice: the same
    twice = _run(oracle, torch.float64)["unet"]
    oracle.set_adapters(["a", "b"], adapter_weights=[0.5, 1.0])
    assert torch.equal(theirs, _run(oracle, torch.float64)["unet"])  # b at 1, not 0.5
    assert torch.equal(twice, theirs)
    ours = copy.deepcopy(pipe64)
    runtime = lorahot.inject(ours, TARGETS, max_rank=8, dtype=torch.float64)
    runtime.load([a, b])
    before = _tensors(ours)
    with pytest.raises(lorahot.UsageError, match="one dict, but slot 0 holds 2 parts"):
        runtime.set_scale({"unet": 0.5})
    after = _tensors(ours)
    assert all(torch.equal(before[k], after[k]) for k in before)
    runtime.set_scale([shared, shared])  # lorahot: both parts at the dict
    oracle.set_adapters(["a", "b"], adapter_weights=[0.5, 0.5])
    torch.testing.assert_close(_run(ours, torch.float64)["unet"], _run(oracle, torch.float64)["unet"])


#: (weight, what the refusal names, what diffusers does: None where it warns and ignores the key)
REFUSED = {
    "unknown-component": ({"vae": 0.5}, "'vae' is no component", None),
    "block-dict-on-a-text-encoder": ({"text_encoder": {"layers.0": 0.5}}, "applies to a diffusers UNet", None),
    "unknown-block-key": ({"unet": {"middle": 0.5}}, "'middle' is not a block key", ValueError),
    "flat-block-key": ({"unet": {"down.block_0.0": 0.5}}, "is not a block key", None),
    "block-without-attentions": ({"unet": {"down": {"block_1": 0.5}}}, "no block of the UNet's down_blocks", None),
    "list-of-the-wrong-length": ({"unet": {"up": {"block_1": [1.0, 2.0, 3.0]}}}, "has 3 weights", ValueError),
    "mid-of-two": ({"unet": {"mid": [1.0, 2.0]}}, "'mid' has 2 weights", ValueError),
    "mid-dict": ({"unet": {"mid": {"block_0": 1.0}}}, "'mid' is", TypeError),
    "none-in-a-block": ({"unet": {"up": {"block_1": [None, 1.0]}}}, r"block_1\[0\] is None", TypeError),
    "nan": ({"unet": {"down": float("nan")}}, "finite", None),
    "inf-component": ({"text_encoder": float("inf")}, "finite", None),
    "list-for-a-component": ({"text_encoder": [0.5]}, "is a list", None),
    "str-key": ({1: 0.5}, "not a str", None),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_dict_diffusers_fails_on_or_ignores_is_refused_with_the_model_unchanged(pipe64, case: str) -> None:
    weight, match, theirs = REFUSED[case]
    a = _file(pipe64, 1)
    if theirs is not None:  # diffusers fails on it (with a partial change: PEFT sets each layer in turn)
        oracle = copy.deepcopy(pipe64)
        oracle.load_lora_weights(dict(a), adapter_name="a")
        with pytest.raises(theirs):
            oracle.set_adapters("a", adapter_weights=copy.deepcopy(weight))
    ours = copy.deepcopy(pipe64)
    runtime = lorahot.inject(ours, TARGETS, max_rank=8, dtype=torch.float64)
    runtime.load(a, scale=0.5)
    before = _tensors(ours)
    with pytest.raises(lorahot.UsageError, match=match):
        runtime.set_scale(weight)
    with pytest.raises(lorahot.UsageError, match=match):
        runtime.load(a, scale=weight)
    with pytest.raises(lorahot.UsageError, match=match):
        runtime.load([a], scale=[weight])
    after = _tensors(ours)
    assert all(torch.equal(before[k], after[k]) for k in before), case
    assert runtime.info().scale == 0.5


def test_a_block_dict_over_a_layer_diffusers_cannot_weigh_is_refused(pipe64) -> None:
    """A part with modules on ``conv_in`` or ``time_embedding.linear_1`` (paths of fewer than four
    parts no block names): PEFT's ``get_module_weight`` fails there (IndexError); lorahot
    refuses the block dict naming them, the model unchanged, and takes a number."""
    source = _conv_file(pipe64, ["to_q", "conv_in", "linear_1"], seed=6)
    oracle = copy.deepcopy(pipe64)
    oracle.load_lora_weights(dict(source), adapter_name="a")
    with pytest.raises(IndexError):
        oracle.set_adapters("a", adapter_weights={"unet": {"down": 0.5}})
    ours = copy.deepcopy(pipe64)
    runtime = lorahot.inject(ours, {"unet": ["to_q", "conv_in", "linear_1"]}, max_rank=8, dtype=torch.float64)
    runtime.load(source)
    before = _tensors(ours)
    with pytest.raises(lorahot.UsageError, match=r"IndexError\): unet\.conv_in, unet\.time_embedding\.linear_1"):
        runtime.set_scale({"unet": {"down": 0.5}})
    assert all(torch.equal(t, _tensors(ours)[k]) for k, t in before.items())
    runtime.set_scale({"unet": 0.5})  # a number for the UNet: every layer at 0.5
    oracle.set_adapters("a", adapter_weights={"unet": 0.5})
    torch.testing.assert_close(_run(ours, torch.float64)["unet"], _run(oracle, torch.float64)["unet"])


def test_a_block_dict_is_refused_where_another_part_of_the_stack_has_a_layer_diffusers_cannot_weigh(pipe64) -> None:
    """A stack ``[a, b]`` where only ``a`` has a module on ``conv_in``, ``b`` at a block dict:
    diffusers' ``set_adapters`` looks ``b``'s weight up on every LoRA layer of the UNet, ``a``'s
    ``conv_in`` too, and fails there (IndexError); lorahot computed it. Now refused naming the
    layer, by ``set_scale`` and by ``load(..., scale=)``, every parameter and buffer bitwise
    unchanged; a number there is diffusers' output."""
    a = _conv_file(pipe64, ["to_q", "conv_in"], seed=6)
    b = _conv_file(pipe64, ["to_q"], seed=7)
    assert "unet.conv_in.lora_A.weight" in a and not any(".conv_in." in k for k in b)
    weights = [1.0, {"unet": {"down": 0.5}}]
    oracle = copy.deepcopy(pipe64)
    oracle.load_lora_weights(dict(a), adapter_name="a")
    oracle.load_lora_weights(dict(b), adapter_name="b")
    with pytest.raises(IndexError):
        oracle.set_adapters(["a", "b"], adapter_weights=copy.deepcopy(weights))
    ours = copy.deepcopy(pipe64)
    runtime = lorahot.inject(ours, {"unet": ["to_q", "conv_in"]}, max_rank=8, dtype=torch.float64)
    runtime.load([a, b])
    before = _tensors(ours)
    refusal = r"slot has modules \(of this part or another part of its stack\).*IndexError\): unet\.conv_in\."
    with pytest.raises(lorahot.UsageError, match=refusal):
        runtime.set_scale(weights)
    with pytest.raises(lorahot.UsageError, match=refusal):
        runtime.load([a, b], scale=weights)
    after = _tensors(ours)
    assert before.keys() == after.keys() and all(torch.equal(t, after[k]) for k, t in before.items())
    assert runtime.info().scale == (1.0, 1.0)
    runtime.set_scale([1.0, {"unet": 0.5}])
    oracle.set_adapters(["a", "b"], adapter_weights=[1.0, {"unet": 0.5}])
    torch.testing.assert_close(_run(ours, torch.float64)["unet"], _run(oracle, torch.float64)["unet"])


def test_merged_mode_folds_the_weights_of_each_layer(pipe64) -> None:
    """``inject(..., merged=True)``: a dict folds each layer at its own weight, as diffusers
    computes it unmerged; a refused dict leaves the merged weights bitwise unchanged."""
    a, b = _file(pipe64, 1), _file(pipe64, 2)
    oracle = copy.deepcopy(pipe64)
    oracle.load_lora_weights(dict(a), adapter_name="a")
    oracle.load_lora_weights(dict(b), adapter_name="b")
    ours = copy.deepcopy(pipe64)
    runtime = lorahot.inject(ours, TARGETS, max_rank=8, merged=True)
    runtime.load([a, b], scale=STACKED[0])
    for weights in STACKED[1:]:
        runtime.set_scale(weights)
        oracle.set_adapters(["a", "b"], adapter_weights=copy.deepcopy(weights))
        _close(_run(ours, torch.float64), _run(oracle, torch.float64), weights)
    before = _tensors(ours)
    with pytest.raises(lorahot.UsageError, match="has 3 weights"):
        runtime.set_scale([{"unet": {"up": [1.0, 2.0, 3.0]}}, 1.0])
    assert all(torch.equal(t, _tensors(ours)[k]) for k, t in before.items())


def test_dict_weights_do_not_recompile_a_compiled_component(pipe64) -> None:
    """Dict weights only rewrite the scale rows: a compiled text encoder (aot_eager) runs every
    re-weighting, numbers and dicts, without recompiling, equal to its eager output; a new input
    shape does recompile (negative control)."""
    ours = copy.deepcopy(pipe64)
    runtime = lorahot.inject(ours, TARGETS, max_rank=8, dtype=torch.float64)
    runtime.load([_file(pipe64, 1), _file(pipe64, 2)])
    weights = [[1.0, 1.0], *STACKED, [0.5, {"text_encoder": 0.0}]]
    ids = torch.tensor([[0, 5, 9, 3, 1]])
    eager = []
    for w in weights:
        runtime.set_scale(w)
        with torch.no_grad():
            eager.append(ours.text_encoder(ids)[0])
    te = torch.compile(ours.text_encoder, backend="aot_eager")
    runtime.set_scale(weights[0])
    with torch.no_grad():
        te(ids)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for w, want in zip(weights, eager):
            runtime.set_scale(w)
            torch.testing.assert_close(te(ids)[0], want, rtol=1e-12, atol=1e-12)
        with pytest.raises(torch._dynamo.exc.RecompileError):
            te(torch.tensor([[0, 5, 9, 3, 1, 1]]))


def test_dora_factors_follow_each_layer_s_weight(pipe64) -> None:
    """A DoRA file on the UNet (``extras=True``): each layer's factor ``m / ||W0 + s * B A||`` is
    computed at its own block weight, as diffusers' ``set_adapters`` computes it."""
    source = _file(pipe64, 7, ["unet"])
    g = torch.Generator().manual_seed(9)
    for key in [k for k in source if k.endswith("lora_B.weight")]:
        rows = source[key].shape[0]
        source[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.rand(rows, generator=g).double() + 0.5
    oracle = copy.deepcopy(pipe64)
    oracle.load_lora_weights(dict(source), adapter_name="a")
    ours = copy.deepcopy(pipe64)
    runtime = lorahot.inject(ours, TARGETS, max_rank=8, extras=True)
    weight = {"unet": {"down": 0.0, "mid": 0.3, "up": {"block_1": [2.0, -0.5]}}}
    runtime.load(source, scale=weight)
    sample, context = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 5, 32, dtype=torch.float64)
    for w in (weight, {"unet": {"up": 3.0}}):
        runtime.set_scale(w)
        oracle.set_adapters("a", adapter_weights=copy.deepcopy(w))
        with torch.no_grad():
            got = ours.unet(sample, 7, encoder_hidden_states=context).sample
            want = oracle.unet(sample, 7, encoder_hidden_states=context).sample
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=str(w))
