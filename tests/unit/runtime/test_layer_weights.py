"""A weight per component (``lorahot.runtime.layer_weights``) on a runtime over two models: each
component's layers at their part's weight there (1 where the dict leaves the component out),
against float64 dense references, drawn by hypothesis over stacks of two; the range checks of a
float16 runtime read each layer's own weight. Block dicts and diffusers parity:
``tests/system/test_parity_component_scales.py``.
"""

from __future__ import annotations

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
