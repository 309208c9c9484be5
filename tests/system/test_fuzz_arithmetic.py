"""The LoRA arithmetic across dtypes, ranks, alphas and scales against a float64 dense reference.

Hypothesis draws a model dtype, a LoRA buffer dtype (``inject(..., dtype=...)``) or merged mode,
``max_rank``, and one to two adapters stacked in a slot, each in a PEFT directory (``r``,
``lora_alpha`` present or absent, ``rank_pattern``, ``alpha_pattern`` keys that also match other
modules by PEFT's suffix rule, ``use_rslora``), a kohya file (per-module ``.alpha`` tensors of any
float dtype, some absent) or a bare mapping, with tensors of any float dtype, ranks from 1 to
``max_rank`` (past ``min(in, out)`` on a 3 -> 2 Linear), on a Linear, a nested Linear, a strided
Conv1d, a dilated grouped Conv2d (groups 1 in merged mode) and an Embedding; load weights
(negative and zero ones included), then ``set_scale``, a swap to another slot and back, a load
of the same sources at other weights, ``unload``.

After every step each layer's output must equal ``base(x) + sum_p w_p * alpha_p / r_p * B_p A_p
x``, computed in float64 from the file's tensors, within ``16 * eps * |W0||x| + |bias| + sum |s|
|B||A||x|`` element by element (``eps`` of the coarsest dtype the layer computes in; unmerged
float16 buffers whose rank-wide intermediate or LoRA output may pass 65504 are left out, their
inf or NaN being what the README says of them); after
``unload`` and ``eject`` the outputs are bitwise the base model's. A load or ``set_scale`` may be
refused only with a lorahot error saying that an update leaves the LoRA buffers' range, and then
only where the float64 update does come within a rounding of that range, at the weights given or
(a load) at the adapter's own scale; the refused call changes no output.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import lorahot
from tests.helpers import PREFIX, dense_delta, dense_delta_weight, lora_shapes, peft_keys

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}
LAYERS = ["lin", "sub.lin", "tiny", "emb", "c1", "c2"]
WEIGHTS = [1.0, 0.5, -1.3, 0.0, 2.5, 1e-3, 40.0]
#: alpha_pattern keys: "lin" and "sub.lin" both match sub.lin (PEFT's suffix rule; the first wins)
PATTERN_KEYS = ["lin", r"sub\..*", "c.", "tiny|emb", "sub.lin"]


def _exactly(name: str) -> str:
    """A pattern key that matches ``name`` alone under PEFT's rule (not ``sub.lin`` for ``lin``)."""
    return "^" + re.escape(name)


def _model(groups: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.lin = nn.Linear(12, 10)
    model.sub = nn.Module()
    model.sub.lin = nn.Linear(12, 6, bias=False)
    model.tiny = nn.Linear(3, 2)  # ranks past min(in, out)
    model.emb = nn.Embedding(20, 9)
    model.c1 = nn.Conv1d(5, 7, 3, stride=2, padding=1)
    model.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=groups)
    return model


def _inputs(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    ids = torch.randint(0, 20, (3, 5), generator=g)
    return {"lin": rand(3, 12), "sub.lin": rand(2, 3, 12), "tiny": rand(4, 3), "emb": ids, "c1": rand(2, 5, 8),
            "c2": rand(2, 4, 9, 9)}  # fmt: skip


def _outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {n: model.get_submodule(n)(inputs[n]) for n in LAYERS}


@st.composite
def _adapters(draw: st.DrawFn, max_rank: int, grouped: bool) -> dict:
    """One adapter's description: naming, per-layer ranks, magnitudes, dtype, alphas."""
    naming = draw(st.sampled_from(["peft", "peft", "kohya", "raw"]))
    ranks = {}
    for name in LAYERS:
        if naming == "kohya" and name == "emb":
            continue
        if draw(st.booleans()):
            rank = min(draw(st.sampled_from([1, 2, 3, 5, max_rank])), max_rank)
            if name == "c2" and grouped:
                rank -= rank % 2  # a multiple of the conv's groups
            if rank:
                ranks[name] = rank
    ranks = ranks or {"tiny": max_rank}
    magnitude = st.sampled_from([1e-2, 0.3, 1.0, 10.0, 30.0])
    spec = {"naming": naming, "ranks": ranks, "a": draw(magnitude), "b": draw(magnitude),
            "dtype": draw(st.sampled_from(list(DTYPES)))}  # fmt: skip
    if naming == "peft":
        r = draw(st.sampled_from(sorted(set(ranks.values()))))
        keys = draw(st.lists(st.sampled_from(PATTERN_KEYS), max_size=3, unique=True))
        spec["config"] = {
            "peft_type": "LORA",
            "r": r,
            "rank_pattern": {_exactly(n): k for n, k in ranks.items() if k != r},
            "alpha_pattern": {k: draw(st.sampled_from([1, 3, 0.5, 64, 7.3])) for k in keys},
            "use_rslora": draw(st.booleans()),
        }
        if draw(st.booleans()):
            spec["config"]["lora_alpha"] = draw(st.sampled_from([1, 8, 3, 0.1, 200]))
    if naming == "kohya":
        spec["alphas"] = {n: draw(st.sampled_from([None, 1.0, 0.37, 4.0, 128.0])) for n in ranks}
        spec["alpha_dtype"] = draw(st.sampled_from(list(DTYPES)))
    return spec


def _pattern_value(pattern: dict, name: str, default: float) -> float:
    """PEFT's lookup: the first key (in order) that matches the whole name or its part after a dot."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", name)), default)


def _write(model64: nn.Module, spec: dict, directory: Path, seed: int) -> tuple[str, dict]:
    """The adapter file(s) and ``layer -> (A, B, alpha / r)`` read back from what was saved."""
    g = torch.Generator().manual_seed(seed)
    dtype, tensors, made = DTYPES[spec["dtype"]], {}, {}
    for name, rank in spec["ranks"].items():
        module = model64.get_submodule(name)
        a_shape, b_shape = lora_shapes(module, rank)
        a = torch.randn(a_shape, generator=g, dtype=torch.float64) * spec["a"] / math.sqrt(math.prod(a_shape[1:]))
        b = torch.randn(b_shape, generator=g, dtype=torch.float64) * spec["b"] / math.sqrt(rank)
        a, b = a.to(dtype), b.to(dtype)
        scale = 1.0
        if spec["naming"] == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = a, b
            alpha = spec["alphas"][name]
            if alpha is not None:
                tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=DTYPES[spec["alpha_dtype"]])
                scale = float(tensors[f"{stem}.alpha"]) / rank
        else:
            ka, kb = peft_keys(module, name)
            tensors[ka], tensors[kb] = a, b
            if spec["naming"] == "peft":
                cfg = spec["config"]
                alpha = _pattern_value(cfg["alpha_pattern"], name, cfg.get("lora_alpha", 8))
                scale = alpha / (math.sqrt(rank) if cfg["use_rslora"] else rank)
        made[name] = (a, b, scale)
    directory.mkdir(parents=True)
    if spec["naming"] == "peft":
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        (directory / "adapter_config.json").write_text(json.dumps(spec["config"]))
        return str(directory), made
    if spec["naming"] == "raw":
        tensors = {k.removeprefix(PREFIX): v for k, v in tensors.items()}
    save_file(tensors, str(directory / "adapter.safetensors"))
    return str(directory / "adapter.safetensors"), made


def _terms(parts: list[dict], weights: list[float]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for made, w in zip(parts, weights):
        for name, (a, b, scale) in made.items():
            out.setdefault(name, []).append((a, b, scale * w))
    return out


def _dense(model64: nn.Module, inputs: dict, terms: dict, absolute: bool = False) -> dict[str, torch.Tensor]:
    """Per layer ``base(x) + sum s * dW(x)`` in float64 (absolute: every factor by its magnitude)."""
    out = {}
    with torch.no_grad():
        for name in LAYERS:
            module = model64.get_submodule(name)
            x = inputs[name] if name == "emb" else inputs[name].double()
            if absolute:
                module = copy.deepcopy(module).requires_grad_(False)
                for p in module.parameters():
                    p.abs_()
                x = x if name == "emb" else x.abs()
            y = module(x)
            for a, b, s in terms.get(name, []):
                a, b = (a.double().abs(), b.double().abs()) if absolute else (a.double(), b.double())
                y = y + (abs(s) if absolute else s) * dense_delta(module, x, a, b)
            out[name] = y
    return out


def _update_max(model64: nn.Module, terms: dict, merged: bool) -> float:
    """The largest ``|value|`` of any layer's summed update (merged: of its merged weight)."""
    most = 0.0
    for name, items in terms.items():
        module = model64.get_submodule(name)
        total = module.weight.double().clone() if merged else 0.0
        for a, b, s in items:
            total = total + s * dense_delta_weight(module, a.double(), b.double())
        most = max(most, float(torch.as_tensor(total).abs().max()))
    return most


def _past_float16(model64: nn.Module, inputs: dict, terms: dict) -> set[str]:
    """The layers whose rank-wide intermediate ``x A^T`` or ``x A^T s``, or whose LoRA output
    ``B (s A x)``, may pass float16's largest value (bounded by magnitudes): float16 buffers
    compute those in float16, where they turn into inf or NaN, as the README says (inject with
    ``dtype=torch.float32`` for such adapters), even where the model's dtype holds the sum."""
    out, top = set(), torch.finfo(torch.float16).max * 0.99
    with torch.no_grad():
        for name, items in terms.items():
            module = model64.get_submodule(name)
            x = inputs[name] if name == "emb" else inputs[name].double().abs()
            for a, b, s in items:
                a, b = a.double().abs(), b.double().abs()
                ones = torch.ones(b.shape, dtype=torch.float64)
                h = float(dense_delta(module, x, a, ones).max())
                if h * max(1.0, abs(s)) >= top or abs(s) * float(dense_delta(module, x, a, b).max()) >= top:
                    out.add(name)
    return out


def _assert_close(got: dict, want: dict, bound: dict, eps: float, what: str, skip: set[str]) -> None:
    for name in LAYERS:
        top = torch.finfo(got[name].dtype).max
        if name in skip or not bool(want[name].abs().max() <= top * (1 - eps)):
            continue  # the output itself leaves the model's dtype, as the base layer computes it
        err = (got[name].double() - want[name]).abs()
        worst = float((err / (bound[name] * eps + 1e-300)).max())
        assert worst <= 16, f"{what}: {name} off by {worst:.3g} eps x magnitude (max abs diff {float(err.max()):.3g})"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_outputs_match_the_float64_reference_across_dtypes_ranks_alphas_and_scales(data, tmp_path_factory) -> None:
    draw = data.draw
    merged = draw(st.booleans(), label="merged")
    model_dtype = draw(st.sampled_from(list(DTYPES)), label="model dtype")
    buffers = None if merged else draw(st.sampled_from([None, "f16", "bf16", "f32", "f64"]), label="buffers")
    max_rank = draw(st.sampled_from([2, 4, 6, 8]), label="max_rank")
    n_parts = draw(st.sampled_from([1, 1, 2]), label="parts")
    specs = [draw(_adapters(max_rank // n_parts, not merged)) for _ in range(n_parts)]
    other = draw(_adapters(max_rank, not merged))
    weights = [draw(st.sampled_from(WEIGHTS)) for _ in specs]
    reweights = [draw(st.sampled_from(WEIGHTS)) for _ in specs]

    dtype = DTYPES[model_dtype]
    model = _model(1 if merged else 2).to(dtype)
    model64 = copy.deepcopy(model).double()
    inputs = _inputs(dtype)
    base = _outputs(model, inputs)
    eps = max(torch.finfo(dtype).eps, torch.finfo(DTYPES[buffers]).eps if buffers else 0.0)
    tmp = tmp_path_factory.mktemp("adapters")
    written = [_write(model64, spec, tmp / f"part{p}", seed=p + 1) for p, spec in enumerate(specs)]
    sources, parts = [s for s, _ in written], [m for _, m in written]
    other_source, other_made = _write(model64, other, tmp / "other", seed=77)
    half = not merged and (buffers == "f16" or (buffers is None and model_dtype == "f16"))
    runtime = lorahot.inject(
        model, LAYERS, max_rank=max_rank, slots=2, dtype=DTYPES[buffers] if buffers else None, merged=merged
    )

    def step(call, terms: dict, what: str, made: list[dict]) -> bool:
        """Runs ``call``; True if it went through and the outputs match ``terms``' reference. A
        refusal must be for an update that reaches the buffers' range at the weights given, or
        for an adapter of ``made`` whose update does at weight 1 (a load reads each adapter at
        its own ``alpha / r`` first)."""
        before = _outputs(model, inputs)
        try:
            call()
        except lorahot.LoraError as error:
            assert re.search("range|overflow", str(error)), f"{what}: {type(error).__name__}: {error}"
            top = torch.finfo(next(iter(runtime.layers.values())).lora_A.dtype).max
            alone = [_update_max(model64, _terms([m], [1.0]), merged) for m in made]
            reached = max([_update_max(model64, terms, merged), *alone])
            assert reached >= top * (1 - 64 * eps), f"{what} refused an update of {reached:.6g} (max {top:.6g})"
            after = _outputs(model, inputs)
            assert all(torch.equal(before[n], after[n]) for n in LAYERS), f"{what}: the refusal changed outputs"
            return False
        got = _outputs(model, inputs)
        skip = _past_float16(model64, inputs, terms) if half else set()
        _assert_close(got, _dense(model64, inputs, terms), _dense(model64, inputs, terms, True), eps, what, skip)
        return True

    def load(scale: list[float]) -> None:
        runtime.load(sources if n_parts > 1 else sources[0], scale=scale if n_parts > 1 else scale[0])

    if not step(lambda: load(weights), _terms(parts, weights), "load", parts):
        return
    now = weights
    if step(lambda: runtime.set_scale(reweights if n_parts > 1 else reweights[0]), _terms(parts, reweights), "set", []):
        now = reweights
    if step(lambda: (runtime.load(other_source, slot=1, scale=-0.7), runtime.activate(1)),
            _terms([other_made], [-0.7]), "other", [other_made]):  # fmt: skip
        step(lambda: runtime.activate(0), _terms(parts, now), "back", [])
    halves = [w / 2 for w in weights]
    step(lambda: load(halves), _terms(parts, halves), "again", parts)
    runtime.unload(0)
    runtime.unload(1)
    after = _outputs(model, inputs)
    assert all(torch.equal(base[n], after[n]) for n in LAYERS), "unload"
    runtime.eject()
    after = _outputs(model, inputs)
    assert all(torch.equal(base[n], after[n]) for n in LAYERS), "eject"
