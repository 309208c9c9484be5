"""diffusers' QKV fusion (``fuse_qkv_projections`` of a model, ``fuse_projections`` of an
attention module) over projections lorahot wraps is refused with a UsageError before anything
changes: the fused projection is built from the base weights and replaces them in the
attention, so the model ran without their LoRA (max abs diff 0.64 on the tiny UNet, 0.066 on
the tiny Flux transformer, against the float64 reference) while loads went on writing into
them. A fusion that reaches no wrapped projection, and one after eject, runs diffusers' own;
projections fused before inject are refused as targets."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lorahot
from lorahot.runtime import fused_projections
from tests.helpers import count_calls, make_adapter, model_reference, tiny_unet

pytest.importorskip("diffusers")


def _unet_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 7]), torch.randn(2, 5, 16, generator=g)


def _flux() -> nn.Module:
    from tests.system.test_parity_flux import tiny_flux

    return tiny_flux()


def _flux_inputs() -> dict[str, torch.Tensor]:
    from tests.system.test_parity_flux import flux_inputs

    return flux_inputs()


def _run(model: nn.Module, inputs: object) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(inputs, dict):
            return model(**inputs)[0]
        return model(*inputs)[0]


MODELS = {
    "unet": (tiny_unet, _unet_inputs, "down_blocks.0.attentions.0.transformer_blocks.0.attn1"),
    "flux": (_flux, _flux_inputs, "transformer_blocks.0.attn"),
}


def _injected(kind: str, targets: list[str]) -> tuple[nn.Module, nn.Module, lorahot.LoraRuntime, torch.Tensor]:
    """The model, its un-injected copy, the runtime with an adapter on every wrapped layer,
    and the float64 reference of base + LoRA."""
    build, inputs, _ = MODELS[kind]
    model = build()
    base = copy.deepcopy(model)
    runtime = lorahot.inject(model, targets, max_rank=4)
    tensors, ab = make_adapter(base, dict.fromkeys(runtime.layers, 2), seed=3)
    runtime.load(tensors, config={"r": 2, "lora_alpha": 2})
    loras = {f"m.{n}": (a, b, 1.0) for n, (a, b) in ab.items()}
    return model, base, runtime, model_reference(_Call(base, inputs()), torch.zeros(1), loras)


class _Call(nn.Module):
    """Runs ``m`` on fixed inputs (cast to the module's dtype), for :func:`model_reference`."""

    def __init__(self, m: nn.Module, inputs: object) -> None:
        super().__init__()
        self.m = m
        self.inputs = inputs

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        dtype = next(self.m.parameters()).dtype

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype) if t.is_floating_point() else t

        if isinstance(self.inputs, dict):
            return self.m(**{k: cast(v) for k, v in self.inputs.items()})[0]
        return self.m(*(cast(t) for t in self.inputs))[0]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _modules(model: nn.Module) -> list[tuple[str, int]]:
    return [(n, id(m)) for n, m in model.named_modules()]


def _fusions(kind: str) -> dict[str, Callable[[nn.Module], object]]:
    path = MODELS[kind][2]
    return {
        "model": lambda model: model.fuse_qkv_projections(),
        "attention": lambda model: model.get_submodule(path).fuse_projections(),
    }


@pytest.mark.parametrize("call", ["model", "attention"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_a_fusion_of_wrapped_projections_is_refused_changing_nothing(kind: str, call: str) -> None:
    """The wrapped projections are named with the fix; the weights, the modules, the attention
    processors and the output (float64 reference of base + LoRA) are as before. Negative
    control: the same call on an un-injected copy fuses and changes the modules."""
    model, base, runtime, want = _injected(kind, ["to_q", "to_k", "to_v"])
    x = MODELS[kind][1]()
    torch.testing.assert_close(_run(model, x).double(), want, rtol=0, atol=1e-5)
    before, modules = _state(model), _modules(model)
    processors = {n: type(p) for n, p in model.attn_processors.items()}
    with pytest.raises(lorahot.UsageError, match=r"fuse_(qkv_)?projections on attention projections lorahot wraps \("):
        _fusions(kind)[call](model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    assert _modules(model) == modules
    assert {n: type(p) for n, p in model.attn_processors.items()} == processors
    torch.testing.assert_close(_run(model, x).double(), want, rtol=0, atol=1e-5)
    _fusions(kind)[call](base)
    assert any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in base.modules())
    runtime.eject()
    assert not any("fuse_projections" in m.__dict__ or "fuse_qkv_projections" in m.__dict__ for m in model.modules())
    _fusions(kind)[call](model)
    assert any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in model.modules())


@pytest.mark.parametrize("kind", list(MODELS))
def test_a_fusion_that_reaches_no_wrapped_projection_runs_and_the_adapter_still_applies(kind: str) -> None:
    """The refusal's scope: with LoRA on the output projection only, diffusers fuses q, k, v
    and the model still computes base + LoRA."""
    model, _, _, want = _injected(kind, ["to_out.0"])
    x = MODELS[kind][1]()
    model.fuse_qkv_projections()
    assert any(hasattr(m, "to_qkv") for m in model.modules())
    torch.testing.assert_close(_run(model, x).double(), want, rtol=0, atol=1e-5)


def test_projections_fused_before_inject_are_refused_as_targets_and_left_out_of_all_linear() -> None:
    """A diffusers attention module whose projections were fused before inject computes with
    ``to_qkv`` and no longer calls ``to_q``, ``to_k``, ``to_v``: a LoRA injected there never
    applied (max abs diff 0.066 from the float64 base + LoRA on the tiny Flux transformer, the
    output the base's). inject now refuses them as targets, naming the fix, with the model
    untouched; ``"all-linear"`` takes the fused projections instead; unfused, they inject."""
    model = _flux()
    model.fuse_qkv_projections()
    with pytest.raises(
        lorahot.UsageError,
        match=r"^transformer_blocks\.0\.attn\.to_q: its parent FluxAttention computes with its weight directly .*"
        r"\(its projections are fused: call unfuse_qkv_projections\(\) first\)",
    ):
        lorahot.inject(model, ["to_q", "to_out.0"], max_rank=4)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())
    runtime = lorahot.inject(model, "all-linear", max_rank=4)
    attention = {n.rpartition(".")[2] for n in runtime.layers if ".attn." in n}
    assert {"to_qkv", "to_added_qkv"} <= attention and not attention & {"to_q", "to_k", "to_v", "add_q_proj"}
    runtime.eject()
    model.unfuse_qkv_projections()
    assert len(lorahot.inject(model, ["to_q"], max_rank=4).layers) == 2


class _Attention(nn.Module):
    """An attention module that fuses its projections (as diffusers' do)."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k = nn.Linear(2, 2), nn.Linear(2, 2)

    def fuse_projections(self) -> None:
        raise AssertionError("refused before it runs")


class _Fusing(nn.Module):
    """A model that fuses its attentions (as a diffusers model does), holding one."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.out = _Attention(), nn.Linear(2, 2)

    def fuse_qkv_projections(self) -> None:
        raise AssertionError("refused before it runs")


def _install_calls(models: int) -> int:
    """The calls of installing the refusals on ``models`` fusing models in a list, each with a
    wrapped projection; each model and attention then refuses its fusion."""
    root = nn.ModuleList([_Fusing() for _ in range(models)])
    lorahot.inject(root, [f"{k}.attn.to_q" for k in range(models)], max_rank=2)
    count = count_calls(lambda: fused_projections.install(root))
    for model in root:
        with pytest.raises(lorahot.UsageError, match=r"to_q"):
            model.fuse_qkv_projections()
        with pytest.raises(lorahot.UsageError, match=r"to_q"):
            model.attn.fuse_projections()
    return count


def test_the_refusals_are_installed_with_a_lookup_per_module() -> None:
    """Each module was compared with every attention holding a wrapped projection (is it one,
    is one below it): the modules times the attentions, with many fusing models in one root.
    Each is now a set lookup: four times the models cost at most four times the calls."""
    _install_calls(2)  # first-call costs out of the counts
    assert _install_calls(32) <= 4 * _install_calls(8)
