"""LyCORIS LoHa, LoKr (Tucker included), Tucker LoCon and full diffs in merged mode, LoCon
trained with weight decomposition (DoRA) merged and unmerged, and the other kinds trained with
it (and LoCon's over the input channels) merged, against the ``lycoris-lora`` package's own
modules as the oracle.

Each case builds a LyCORIS module on a Linear or Conv2d with random factors (every factor,
not LyCORIS' zero init, so ΔW is not zero), writes its ``custom_state_dict`` under kohya
names, loads the file into lorahot (``merged=True``) and compares with the LyCORIS module's
forward (``apply_to``: the module's own ``get_weight`` and scale) and with its
``get_weight`` ΔW. Alpha differs from the rank where the kind has one.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
from tests.helpers import Conv1D, assert_swaps_without_recompile

lycoris = pytest.importorskip("lycoris")
from lycoris.modules import LoConModule, LohaModule, LokrModule  # noqa: E402 - after the importorskip
from lycoris.modules.glora import GLoRAModule  # noqa: E402

CASES = [
    ("loha-linear", LohaModule, "linear", {"lora_dim": 4, "alpha": 2.0}),
    ("loha-conv", LohaModule, "conv", {"lora_dim": 4, "alpha": 3.0}),
    ("loha-conv-tucker", LohaModule, "conv", {"lora_dim": 3, "alpha": 5.0, "use_tucker": True}),
    ("lokr-linear-full", LokrModule, "linear", {"lora_dim": 64, "alpha": 3.0, "factor": 4}),
    ("lokr-linear-low", LokrModule, "linear", {"lora_dim": 2, "alpha": 3.0, "factor": 8, "decompose_both": True}),
    ("lokr-conv-full", LokrModule, "conv", {"lora_dim": 2, "alpha": 1.0, "factor": 4}),
    ("lokr-conv-low", LokrModule, "wide-conv", {"lora_dim": 2, "alpha": 1.0, "factor": 4}),
    ("lokr-conv-tucker", LokrModule, "wide-conv", {"lora_dim": 2, "alpha": 7.0, "factor": 4, "use_tucker": True}),
    ("locon-conv-tucker", LoConModule, "conv", {"lora_dim": 3, "alpha": 2.0, "use_tucker": True}),
    # rsLoRA (alpha saved as alpha * sqrt(r)), use_scalar (the scalar folded into a saved factor),
    # unbalanced LoKr (w1 low-rank, w2 whole)
    ("loha-linear-rs", LohaModule, "linear", {"lora_dim": 4, "alpha": 2.0, "rs_lora": True}),
    ("loha-conv-scalar", LohaModule, "conv", {"lora_dim": 4, "alpha": 2.0, "use_scalar": True}),
    ("lokr-conv-scalar", LokrModule, "wide-conv", {"lora_dim": 2, "alpha": 1.0, "factor": 4, "use_scalar": True}),
    (
        "lokr-linear-unbalanced",
        LokrModule,
        "linear",
        {"lora_dim": 1, "alpha": 3.0, "factor": 4, "decompose_both": True, "unbalanced_factorization": True},
    ),
]


def _base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(16, 24)).double()
    if kind == "wide-conv":  # wide enough for LoKr to decompose its second factor
        return nn.Sequential(nn.Conv2d(32, 64, 3, padding=1)).double()
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)).double()


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    shape = {"linear": (3, 16), "conv": (2, 8, 5, 5), "wide-conv": (2, 32, 5, 5)}[kind]
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _lycoris(cls: type, kind: str, options: dict) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """``(oracle model, the LyCORIS module, its state dict under kohya names)``."""
    model = _base(kind)
    module = cls("lora_unet_0", model[0], 1.0, **options).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    module.apply_to()
    sd = {f"lora_unet_0.{k}": v.detach().clone() for k, v in module.custom_state_dict().items()}
    return model, module, sd


def _delta(module: nn.Module) -> torch.Tensor:
    """LyCORIS' scaled ΔW: LoHa/LoKr ``get_weight`` (which applies ``alpha / r`` once; their
    ``get_diff_weight`` multiplies by it a second time, so it is not used) times ``scalar`` as
    their forward does, LoCon ``get_diff_weight``."""
    if isinstance(module, LoConModule):
        return module.get_diff_weight()[0]
    return module.get_weight(module.shape) * module.scalar  # the forward's use_scalar factor (1 without)


@pytest.mark.parametrize(("case", "cls", "kind", "options"), CASES, ids=[c[0] for c in CASES])
def test_lycoris_kinds_merge_like_lycoris(case: str, cls: type, kind: str, options: dict) -> None:
    oracle, module, sd = _lycoris(cls, kind, options)
    x = _input(kind)
    with torch.no_grad():
        want = oracle(x)
        delta = _delta(module).reshape(oracle[0].weight.shape)
    model = _base(kind)
    base_out = model(x).detach()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    info = runtime.load(sd, scale=1.0)
    assert set(info.ranks) == {"0"}
    with torch.no_grad():
        torch.testing.assert_close(model[0].weight, _base(kind)[0].weight + delta, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model(x), want, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(want, base_out)
    runtime.set_scale(0.5)  # every swap starts from the pristine weights
    with torch.no_grad():
        torch.testing.assert_close(model[0].weight, _base(kind)[0].weight + 0.5 * delta, rtol=1e-10, atol=1e-10)
    runtime.unload()
    assert torch.equal(model(x), base_out)


def test_stacked_loha_lokr_and_lora_add_their_weighted_deltas() -> None:
    """A LoHa, a LoKr (each against LyCORIS' own ``get_weight``) and a plain LoCon LoRA in one
    slot: the merged weight is ``W0`` plus each part's ΔW at its weight, re-weighted in place."""
    loha, loha_module, loha_sd = _lycoris(LohaModule, "conv", {"lora_dim": 4, "alpha": 3.0})
    _, lokr_module, lokr_sd = _lycoris(LokrModule, "conv", {"lora_dim": 2, "alpha": 1.0, "factor": 4})
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 8, 3, 3, generator=g, dtype=torch.float64), torch.randn(16, 2, 1, 1, generator=g).double()
    lora = {"lora_unet_0.lora_down.weight": a, "lora_unet_0.lora_up.weight": b, "lora_unet_0.alpha": torch.tensor(1.0)}
    with torch.no_grad():
        shape = loha[0].weight.shape
        deltas = [_delta(loha_module).reshape(shape), _delta(lokr_module).reshape(shape)]
        deltas.append(0.5 * (b.reshape(16, 2) @ a.reshape(2, -1)).reshape(shape))
    model = _base("conv")
    w0 = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    info = runtime.load([loha_sd, lokr_sd, lora], scale=[0.5, -1.0, 2.0])
    assert [p.format for p in info.parts] == ["kohya"] * 3 and info.ranks == {"0": 4 + 0 + 2}  # a full LoKr: no rank
    for weights in ([0.5, -1.0, 2.0], [1.0, 0.25, 0.0]):
        runtime.set_scale(weights)
        want = w0 + sum(w * d for w, d in zip(weights, deltas))
        torch.testing.assert_close(model[0].weight, want, rtol=1e-10, atol=1e-10)
    runtime.unload()
    assert torch.equal(model[0].weight, w0)


def test_full_diff_and_bias_diff() -> None:
    model, x = _base("conv"), _input("conv")
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    g = torch.Generator().manual_seed(3)
    diff, diff_b = torch.randn(w0.shape, generator=g).double(), torch.randn(b0.shape, generator=g).double()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True, slots=2)
    runtime.load({"lora_unet_0.diff": diff, "lora_unet_0.diff_b": diff_b}, scale=0.5)
    want = torch.nn.functional.conv2d(x, w0 + 0.5 * diff, b0 + 0.5 * diff_b, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    a, b = torch.randn(2, 8, 3, 3, dtype=torch.float64), torch.randn(16, 2, 1, 1, dtype=torch.float64)
    runtime.load({"lora_unet_0.lora_down.weight": a, "lora_unet_0.lora_up.weight": b}, slot=1)
    runtime.activate(1)  # a plain LoRA: the bias is pristine again
    assert torch.equal(model[0].bias, b0)
    runtime.activate(0)
    lorahot.eject(model)  # eject puts the pristine weight and bias back
    assert torch.equal(model[0].weight, w0) and torch.equal(model[0].bias, b0)


def test_weight_kinds_refused_unmerged_with_the_fix() -> None:
    _, _, sd = _lycoris(LohaModule, "linear", {"lora_dim": 4, "alpha": 2.0})
    model = _base("linear")
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"loads only in merged mode:\n  - 0 \(loha: [\s\S]*merged=True"
    ):
        runtime.load(sd)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"merged=True"):
        runtime.preload(sd)


#: the spellings of a LoRA module with a ``dora_scale`` (and ``lora_down``/``lora_up``, ``.alpha``)
#: ComfyUI reads, each the head of the module's key: kohya's, ComfyUI's, and the model's own
#: names under diffusers' ``transformer.`` (OneTrainer's HiDream and Chroma files) or bare
DORA_SCALE_NAMINGS = {
    "kohya": "lora_unet_0.",
    "comfyui": "diffusion_model.0.",
    "diffusers": "transformer.0.",
    "peft": "0.",
}


#: LyCORIS modules trained with weight decomposition that lorahot folds in merged mode (a
#: LoCon with LyCORIS' default wd_on_out=True loads as DoRA, merged or not: see below).
DECOMPOSED = [
    ("loha", LohaModule, {}),
    ("lokr", LokrModule, {"factor": 4}),
    ("locon-tucker", LoConModule, {"use_tucker": True}),
    ("locon-wd-on-in", LoConModule, {"wd_on_out": False}),
    ("loha-wd-on-in", LohaModule, {"wd_on_out": False}),
]


def _decomposed(cls: type, kind: str, options: dict) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``(oracle model, state dict under kohya names)`` of a LyCORIS ``cls`` module trained with
    weight decomposition, random factors and ``dora_scale``, alpha != rank."""
    oracle, _, sd = _lycoris(cls, kind, {"lora_dim": 2, "alpha": 3.0, "weight_decompose": True, **options})
    return oracle, sd


def _conv1d(kind: str) -> nn.Module:
    """``_base(kind)``, a Linear, as a transformers-style ``Conv1D`` (weight ``[in, out]``)."""
    linear = _base(kind)[0]
    model = nn.Sequential(Conv1D(linear.out_features, linear.in_features)).double()
    with torch.no_grad():
        model[0].weight.copy_(linear.weight.t())
        model[0].bias.copy_(linear.bias)
    return model


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv"])
@pytest.mark.parametrize(
    ("cls", "options", "naming"),
    [(*c[1:], "kohya") for c in DECOMPOSED] + [(LoConModule, {"wd_on_out": False}, n) for n in ("diffusers", "peft")],
    ids=[c[0] for c in DECOMPOSED] + ["locon-wd-on-in-diffusers", "locon-wd-on-in-peft"],
)
def test_weight_decomposed_lycoris_modules_merge_as_lycoris_computes(
    cls: type, options: dict, naming: str, kind: str
) -> None:
    """A LoHa, LoKr or Tucker LoCon with a ``dora_scale``, or a LoCon whose ``dora_scale`` is
    per input channel (``wd_on_out=False``, ``[1, in, ...]``: OneTrainer's DoRA, which it also
    writes in the model's own names under ``transformer.``), folds in merged mode as LyCORIS
    computes it at multiplier 1: ``V * dora_scale / (||V|| + eps)``, ``V = W + ΔW``, the norm per
    output row or per input column (a ``Conv1D``'s ``[in, out]`` weight read transposed);
    float64, against LyCORIS' own forward (max abs diff ~1e-15). Unload restores the base
    weight bitwise."""
    oracle, sd = _decomposed(cls, "linear" if kind == "conv1d" else kind, options)
    assert "lora_unet_0.dora_scale" in sd
    sd = {k.replace("lora_unet_0.", DORA_SCALE_NAMINGS[naming]): v for k, v in sd.items()}
    x = _input("linear" if kind == "conv1d" else kind)
    with torch.no_grad():
        want = oracle(x)
    model = _conv1d("linear") if kind == "conv1d" else _base(kind)
    base_out, w0 = model(x).detach(), model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    runtime.load(sd)
    with torch.no_grad():
        assert (want - base_out).abs().max() > 0.5
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    runtime.unload()
    assert torch.equal(model[0].weight, w0)


@pytest.mark.parametrize(("cls", "options"), [c[1:] for c in DECOMPOSED], ids=[c[0] for c in DECOMPOSED])
def test_weight_decomposed_lycoris_modules_are_refused_unmerged_and_at_other_scales(cls: type, options: dict) -> None:
    """Unmerged, such a module is refused naming merged mode (lorahot's unmerged DoRA factor is
    per output channel, over a ``B @ A`` update); merged, any scale but 1 is refused naming the
    ``dora_scale`` and the fix (LyCORIS and ComfyUI compute other weights there). Nothing
    changed: parameters and buffers bitwise as before."""
    _, sd = _decomposed(cls, "conv", options)
    model = _base("conv")
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True)
    snapshot = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with pytest.raises(lorahot.AdapterMismatchError, match=r"loads only in merged mode:[\s\S]*merged=True"):
        runtime.load(sd)
    state = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())
    lorahot.eject(model)
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    runtime.load(sd)
    snapshot = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    refused = r"scale=0\.5, but 0 \([^)]*lora_unet_0\.dora_scale.*LyCORIS weight decomposition.*Load it at scale 1"
    with pytest.raises(lorahot.UsageError, match=refused):
        runtime.set_scale(0.5)
    with pytest.raises(lorahot.UsageError, match=refused):
        runtime.load(sd, scale=0.5)
    state = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())
    assert runtime.info(0).scale == 1.0


def test_a_weight_decomposed_module_is_alone_on_its_layer_in_a_stack() -> None:
    """LyCORIS normalizes the weight a decomposed module makes (``W + ΔW``), not one with
    another part's update in it: a stack that puts another part on its layer is refused naming
    the layer, the part and the fix; nothing changed."""
    _, sd = _decomposed(LohaModule, "conv", {})
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 8, 3, 3, generator=g, dtype=torch.float64), torch.randn(16, 2, 1, 1, generator=g).double()
    lora = {"lora_unet_0.lora_down.weight": a, "lora_unet_0.lora_up.weight": b}
    model = _base("conv")
    w0 = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"0 \(lora_unet_0[^)]*\): part 0 of the stack \(.*\) has a LoHa module with weight decomposition "
        r"\(dora_scale\) on a "
        r"layer parts 0, 1 all load into[\s\S]*Load an adapter with DoRA \(or dora_scale\)",
    ):
        runtime.load([sd, lora])
    assert torch.equal(model[0].weight, w0) and runtime.info(0) is None


#: weight-decomposed modules lorahot refuses, and what the refusal says
REFUSED_DECOMPOSED = [
    ("locon-other-shape", {"lora_unet_0.dora_scale": torch.ones(16, 8, 1, 1)}, r"expected \(16, 1, 1, 1\)"),
    ("diff", {"lora_unet_0.diff": torch.ones(16, 8, 3, 3)}, r"mixes diff weights with dora_scale"),
]


@pytest.mark.parametrize(
    ("extra", "match"), [c[1:] for c in REFUSED_DECOMPOSED], ids=[c[0] for c in REFUSED_DECOMPOSED]
)
def test_weight_decomposed_lycoris_modules_lorahot_cannot_compute_are_refused_whole(
    extra: dict[str, torch.Tensor], match: str
) -> None:
    """A ``dora_scale`` with one value neither per output nor per input channel, or beside a
    full diff, is refused naming the key and why; with ``strict=False`` the module is skipped
    with every key (without its ``dora_scale`` it would compute another weight)."""
    _, sd = _decomposed(LoConModule, "conv", {})
    sd = {k: v for k, v in sd.items() if k.endswith("dora_scale") or "diff" not in extra} | extra
    model = _base("conv")
    before = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    with pytest.raises(lorahot.UnknownFormatError, match=rf"lora_unet_0[\s\S]*lora_unet_0\.dora_scale[\s\S]*{match}"):
        runtime.load(sd)
    with pytest.raises(lorahot.UnknownFormatError, match=rf"none of its {len(sd)} tensors is a loadable LoRA weight"):
        runtime.load(sd, strict=False)
    assert torch.equal(model[0].weight, before)


def _decomposed_locon(kind: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``(oracle model, state dict under kohya names)`` of a LyCORIS LoCon trained with weight
    decomposition (``wd_on_out=True``), random factors and ``dora_scale``, alpha != rank."""
    oracle, _, sd = _lycoris(LoConModule, kind, {"lora_dim": 3, "alpha": 2.0, "weight_decompose": True})
    assert sd["lora_unet_0.dora_scale"].shape == (oracle[0].weight.shape[0], *[1] * (oracle[0].weight.ndim - 1))
    return oracle, sd


@pytest.mark.parametrize("naming", list(DORA_SCALE_NAMINGS))
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_weight_decomposed_locon_computes_what_lycoris_computes(kind: str, merged: bool, naming: str) -> None:
    """A LoRA/LoCon with a ``dora_scale`` (``[out, 1, ...]``) loads as DoRA with that magnitude:
    at scale 1 LyCORIS' ``V * dora_scale / (||V|| + eps)`` (``V = W + alpha / r * up @ down``,
    the norm per output channel) is PEFT's DoRA; float64, against LyCORIS' own forward, in kohya
    names, in ComfyUI's (``diffusion_model.<module>``) and in the model's own names, under
    ``transformer.`` or bare, as OneTrainer writes them (these two were refused: 'not a LoRA key
    of the diffusers naming')."""
    oracle, sd = _decomposed_locon(kind)
    sd = {k.replace("lora_unet_0.", DORA_SCALE_NAMINGS[naming]): v for k, v in sd.items()}
    x = _input(kind)
    with torch.no_grad():
        want = oracle(x)
    model = _base(kind)
    base_out = model(x).detach()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=merged, extras=not merged)
    info = runtime.load(sd)
    assert set(info.ranks) == {"0"} and info.format == naming
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
        assert (want - base_out).abs().max() > 0.5
    runtime.unload()
    assert torch.equal(model(x), base_out)


def test_a_module_with_both_dora_magnitudes_is_refused_and_nothing_changes() -> None:
    """A module whose file gives it PEFT's ``lora_magnitude_vector`` and LyCORIS' ``dora_scale``
    (the diffusers and PEFT namings read both) has two magnitudes and no single weight: refused
    naming the module and both keys, nothing changed (before, the PEFT one was taken silently)."""
    _, sd = _decomposed_locon("linear")
    sd = {k.replace("lora_unet_0.", "transformer.0."): v for k, v in sd.items()}
    sd["transformer.0.lora_magnitude_vector"] = sd["transformer.0.dora_scale"].flatten() + 1.0
    model = _base("linear")
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True)
    before = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"transformer\.0: both transformer\.0\.lora_magnitude_vector and transformer\.0\.dora_scale give it a "
        r"DoRA magnitude",
    ):
        runtime.load(sd)
    state = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(state[k], v) for k, v in before.items())


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_dora_scale_on_an_embedding_is_refused_and_nothing_changes(merged: bool) -> None:
    """LyCORIS decomposes the weights of Linear and conv layers only (its LoCon, LoHa and LoKr
    modules wrap no embedding), so a kohya-named LoRA with a ``dora_scale`` on an
    ``nn.Embedding`` has no reference: it is refused naming the module, its keys and why, alone
    and as a part of a stack, and nothing changes (before, it loaded as DoRA with LyCORIS' eps,
    a number no library computes). PEFT's DoRA on an embedding (``lora_magnitude_vector``) still
    loads: ``tests/system/test_dora_bias.py``."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "lin": nn.Linear(6, 4)}).double()
    sd = {
        "lora_unet_emb.lora_down.weight": torch.randn(2, 10, generator=g, dtype=torch.float64),
        "lora_unet_emb.lora_up.weight": torch.randn(4, 2, generator=g, dtype=torch.float64),
        "lora_unet_emb.dora_scale": torch.rand(4, 1, generator=g, dtype=torch.float64) + 1,
    }
    other = {
        f"lora_unet_lin.lora_{k}.weight": torch.randn(s, generator=g) for k, s in (("down", (2, 6)), ("up", (4, 2)))
    }
    runtime = lorahot.inject(model, ["emb", "lin"], max_rank=4, merged=merged, extras=True)
    before = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    for adapter in (sd, [other, sd]):
        with pytest.raises(
            lorahot.AdapterMismatchError,
            match=r"emb \(lora_unet_emb\.lora_down\.weight, .*lora_unet_emb\.dora_scale\): a dora_scale "
            r"\(LyCORIS weight decomposition\) on an embedding layer, where LyCORIS decomposes the weights of Linear "
            r"and conv layers only",
        ):
            runtime.load(adapter)
    state = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(state[k], v) for k, v in before.items())


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    state = dict([*model.named_parameters(), *model.named_buffers()])
    return state.keys() == before.keys() and all(torch.equal(state[k], v) for k, v in before.items())


#: a LoRA on an ``nn.Embedding(10, 4)`` in each spelling no reference reads as an embedding's
#: LoRA: ``(key of A, key of B, A's shape, B's shape)`` (PEFT's layout, A ``[r, num]``, or
#: ComfyUI's, the table read as a linear's weight: down ``[r, dim]``, up ``[num, r]``)
EMBEDDING_SPELLINGS = {
    "kohya": ("lora_unet_emb.lora_down.weight", "lora_unet_emb.lora_up.weight", (2, 10), (4, 2)),
    "kohya-comfyui-layout": ("lora_unet_emb.lora_down.weight", "lora_unet_emb.lora_up.weight", (2, 4), (10, 2)),
    "comfyui": ("diffusion_model.emb.lora_down.weight", "diffusion_model.emb.lora_up.weight", (2, 10), (4, 2)),
    "lycoris": ("lycoris_emb.lora_down.weight", "lycoris_emb.lora_up.weight", (2, 10), (4, 2)),
    "peft-lora_A": ("base_model.model.emb.lora_A.weight", "base_model.model.emb.lora_B.weight", (2, 10), (4, 2)),
}


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("spelling", list(EMBEDDING_SPELLINGS))
def test_a_lora_on_an_embedding_in_another_spelling_than_peft_s_is_refused_and_nothing_changes(
    spelling: str, merged: bool
) -> None:
    """No reference reads a LoRA on an ``nn.Embedding`` spelled otherwise than PEFT's
    ``lora_embedding_A``/``lora_embedding_B``: LyCORIS' loader raises (its modules wrap Linear and
    conv layers only), PEFT leaves ``lora_A.weight``/``lora_B.weight`` there unloaded (the output
    stays the base's), sd-scripts wraps no embedding, diffusers' kohya conversion raises, and
    ComfyUI adds ``up @ down`` reshaped to the table's ``[num, dim]``. It loaded before, read as
    PEFT's ``(B @ A).T``, a number none of them gives. Now refused naming the module, its keys, the
    shapes, what the references do and the fix, alone, in a stack and by ``plan_targets``, every
    parameter and buffer bitwise unchanged; the same tensors in PEFT's spelling still load, at
    PEFT's float64 output."""
    ka, kb, sa, sb = EMBEDDING_SPELLINGS[spelling]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "lin": nn.Linear(6, 4)}).double()
    a, b = torch.randn(sa, generator=g, dtype=torch.float64), torch.randn(sb, generator=g, dtype=torch.float64)
    sd = {ka: a, kb: b}
    other = {"lora_unet_lin.lora_down.weight": torch.randn(2, 6), "lora_unet_lin.lora_up.weight": torch.randn(4, 2)}
    if spelling == "lycoris":  # LyCORIS' own loader raises on it
        with pytest.raises(ValueError, match="not supported"):
            weights = {k: v.float() for k, v in sd.items()} | {"lycoris_emb.alpha": torch.tensor(2.0)}
            lycoris.create_lycoris_from_weights(1.0, "", copy.deepcopy(model), weights)
    if spelling == "peft-lora_A":  # PEFT leaves the keys unloaded: the base's output
        peft = pytest.importorskip("peft")
        oracle = peft.inject_adapter_in_model(
            peft.LoraConfig(r=2, lora_alpha=2, target_modules=["emb"]), copy.deepcopy(model)
        )
        loaded = peft.set_peft_model_state_dict(oracle, {k.removeprefix("base_model.model."): v for k, v in sd.items()})
        assert {k.removeprefix("base_model.model.") for k in sd} <= set(loaded.unexpected_keys)
        ids = torch.tensor([1, 7, 3])
        with torch.no_grad():
            assert torch.equal(oracle["emb"](ids), model["emb"](ids))
    refused = (
        rf"emb \({re.escape(ka)}, {re.escape(kb)}\): a LoRA \(A {re.escape(str(sa))}, B {re.escape(str(sb))}\) on an "
        r"nn\.Embedding of 10 rows of 4 in another spelling than PEFT's lora_embedding_A / lora_embedding_B, which no "
        r"reference library reads[\s\S]*LyCORIS' loader and diffusers' kohya conversion raise[\s\S]*ComfyUI[\s\S]*"
        r"Rename the pair lora_embedding_A \(r, 10\) and lora_embedding_B \(4, r\)"
    )
    with pytest.raises(lorahot.AdapterMismatchError, match=refused):
        lorahot.plan_targets(sd, model=model)
    table = model["emb"].weight.detach().clone()
    runtime = lorahot.inject(model, ["emb", "lin"], max_rank=4, merged=merged)
    before = _state(model)
    for adapter in (sd, [other, sd]):
        with pytest.raises(lorahot.AdapterMismatchError, match=refused):
            runtime.load(adapter)
        assert _unchanged(model, before)
    ids = torch.tensor([1, 7, 3])
    peft_a, peft_b = (a, b) if sa == (2, 10) else (b.T, a.T)  # ComfyUI's layout turned into PEFT's
    runtime.load({"base_model.model.emb.lora_embedding_A": peft_a, "base_model.model.emb.lora_embedding_B": peft_b})
    with torch.no_grad():
        got = model["emb"](ids)
    want = torch.nn.functional.embedding(ids, table + (peft_b @ peft_a).T)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("layer", "flat"),
    [(nn.Conv2d(3, 4, 3), (4, 27)), (nn.Conv1d(3, 4, 3), (4, 9)), (nn.Conv2d(3, 4, (1, 3)), (4, 9))],
    ids=["conv2d", "conv1d", "conv2d-1x3"],
)
def test_a_flat_full_diff_on_a_conv_is_refused_and_nothing_changes(layer: nn.Module, flat: tuple[int, ...]) -> None:
    """A ``.diff`` of a conv flattened over its kernel (``[out, in * prod(kernel)]``) is read by
    no reference: LyCORIS' loader fails to copy it into the conv's weight, ComfyUI skips a diff
    whose shape is not the weight's (``SHAPE MISMATCH ... WEIGHT NOT MERGED``). It folded before,
    read in the layer's order. Now refused naming the module, the shapes and the fix, every
    parameter bitwise unchanged; the same values in the weight's shape fold at the float64
    reference, as LyCORIS' forward computes them, and a 1x1 conv's flat diff (its weight is a
    linear's) still folds."""
    torch.manual_seed(0)
    model = nn.Sequential(layer).double()
    w0 = model[0].weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    diff = torch.randn(flat, generator=g, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must match"):  # LyCORIS' own loader
        lycoris.create_lycoris_from_weights(1.0, "", copy.deepcopy(model).float(), {"lycoris_0.diff": diff.float()})
    oracle = copy.deepcopy(model)
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    before = _state(model)
    shape = re.escape(str(tuple(w0.shape)))
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=rf"0 \(lora_unet_0\.diff\): its full diff has shape {re.escape(str(flat))}, the conv's weight {shape} "
        rf"flattened over its kernel, which no reference library reads[\s\S]*Reshape it to {shape} in the file",
    ):
        runtime.load({"lora_unet_0.diff": diff})
    assert _unchanged(model, before)
    network, _ = lycoris.create_lycoris_from_weights(0.5, "", oracle, {"lycoris_0.diff": diff.reshape(w0.shape)})
    network.apply_to()
    runtime.load({"lora_unet_0.diff": diff.reshape(w0.shape)}, scale=0.5)
    x = torch.randn(2, *w0.shape[1:2], *(5,) * (w0.ndim - 2), generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x), rtol=0, atol=1e-12)
    one = nn.Sequential(nn.Conv2d(3, 4, 1)).double()
    want = one[0].weight.detach() + diff[:, :3].reshape(4, 3, 1, 1)
    lorahot.inject(one, ["0"], max_rank=4, merged=True).load({"lora_unet_0.diff": diff[:, :3].contiguous()})
    torch.testing.assert_close(one[0].weight.detach(), want, rtol=0, atol=1e-15)


def test_weight_decomposed_locon_refuses_every_scale_but_one(tmp_path: Path) -> None:
    """At another strength LyCORIS and ComfyUI compute different weights for such a module, and
    neither is DoRA at that scale: ``load(scale=)`` (from a file read again and from the host
    cache too), ``set_scale`` and a stack weight other than 1 are refused naming the module and
    the fix; nothing changed."""
    _, sd = _decomposed_locon("conv")
    path = tmp_path / "dora.safetensors"
    save_file(sd, str(path))
    x = _input("conv")
    model = _base("conv")
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True, slots=2)
    runtime.load(sd, slot=1)
    runtime.activate(1)
    with torch.no_grad():
        at_one = model(x)
    snapshot = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    refused = (
        r"scale=0\.5, but 0 \([^)]*lora_unet_0\.dora_scale.*LyCORIS weight decomposition.*Load it at scale 1, or merge"
    )
    with pytest.raises(lorahot.UsageError, match=refused):
        runtime.load(sd, slot=0, scale=0.5)
    with pytest.raises(lorahot.UsageError, match=refused):
        runtime.set_scale(0.5)
    with pytest.raises(lorahot.UsageError, match=refused):
        runtime.load([sd], slot=1, scale=[0.5])
    for _ in range(2):  # the second read follows the file's recipe
        assert lorahot.read_adapter(path).modules["lora_unet_0"].unit_scale
        with pytest.raises(lorahot.UsageError, match=refused):
            runtime.load(path, slot=0, scale=0.5)
    runtime.preload(path)
    with pytest.raises(lorahot.UsageError, match=refused):
        runtime.load(path, slot=0, scale=0.5)
    with pytest.raises(lorahot.UsageError, match=r"scale=0, but 0 \("):
        runtime.set_scale(0.0)
    state = dict([*model.named_parameters(), *model.named_buffers()])
    assert len(snapshot) == 6 and all(torch.equal(state[k], v) for k, v in snapshot.items())
    assert runtime.info(0) is None and runtime.info(1).scale == 1.0
    with torch.no_grad():
        assert torch.equal(model(x), at_one)


def test_wrong_shape_and_missing_factor_are_named() -> None:
    _, _, sd = _lycoris(LohaModule, "linear", {"lora_dim": 4, "alpha": 2.0})
    runtime = lorahot.inject(nn.Sequential(nn.Linear(16, 20)).double(), ["0"], max_rank=4, merged=True)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"loha factors \(.*\) make a weight of shape \(24, 16\)"):
        runtime.load(sd)
    del sd["lora_unet_0.hada_w2_b"]
    with pytest.raises(lorahot.UnknownFormatError, match=r"lora_unet_0 \(.*\): lacks hada_w2_b"):
        lorahot.read_adapter(sd)


def _conv_file(kind: str) -> dict[str, torch.Tensor]:
    """Factors of a ``Conv2d(8, 16, (1, 9))`` (72 kernel entries per output channel, as many as
    a 3x3 one's over 8 inputs) in LyCORIS' layouts: LoKr with a whole 4-D second half, LoHa with
    Tucker cores, LoCon with a Tucker middle."""
    g = torch.Generator().manual_seed(3)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3

    files = {
        "lokr": {"lokr_w1": r(4, 2), "lokr_w2": r(4, 4, 1, 9)},
        "loha-tucker": {
            "hada_w1_a": r(2, 16),
            "hada_w1_b": r(2, 8),
            "hada_t1": r(2, 2, 1, 9),
            "hada_w2_a": r(2, 16),
            "hada_w2_b": r(2, 8),
            "hada_t2": r(2, 2, 1, 9),
        },
        "locon-tucker": {
            "lora_down.weight": r(2, 8, 1, 1),
            "lora_mid.weight": r(2, 2, 1, 9),
            "lora_up.weight": r(16, 2, 1, 1),
        },
    }
    return {f"lycoris_0.{k}": v for k, v in {**files[kind], "alpha": torch.tensor(2.0)}.items()}


@pytest.mark.parametrize("kind", ["lokr", "loha-tucker", "locon-tucker"])
def test_a_kernel_of_another_shape_with_as_many_entries_is_refused(kind: str) -> None:
    """A ``(1, 9)`` kernel is not a ``(3, 3)`` one: LyCORIS refuses to apply the file to a 3x3
    conv, and lorahot refuses it too, naming both shapes, where it used to reshape the weight
    into the layer's kernel (a silent wrong weight). The model stays bitwise as it was."""
    from lycoris import create_lycoris_from_weights

    sd = _conv_file(kind)
    model = _base("conv")
    with pytest.raises(RuntimeError):  # the oracle: the sizes do not match
        create_lycoris_from_weights(1.0, "", copy.deepcopy(model), weights_sd=dict(sd))
    before = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=8, merged=True)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"make a weight of shape \(16, 8, 1, 9\), expected \(16, 8, 3, 3\)"
    ):
        runtime.load(sd)
    assert torch.equal(model[0].weight, before)


def test_the_same_factors_for_a_kernel_of_their_shape_load_like_lycoris() -> None:
    """The negative control: the LoKr factors above, on the ``(1, 9)`` conv they were made for,
    load and fold as LyCORIS folds them."""
    from lycoris import create_lycoris_from_weights

    sd = _conv_file("lokr")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, (1, 9), padding=(0, 4))).double()
    oracle = copy.deepcopy(model)
    network, _ = create_lycoris_from_weights(1.0, "", oracle, weights_sd=dict(sd))
    network.apply_to()
    lorahot.inject(model, ["0"], max_rank=8, merged=True).load(sd)
    x = _input("conv")
    with torch.no_grad():  # LyCORIS keeps the factors it loads in float32
        torch.testing.assert_close(model(x), oracle(x), rtol=1e-6, atol=1e-6)


def test_loha_factors_with_kernel_dimensions_must_match_the_kernel() -> None:
    """LoHa factors saved with their kernel dimensions (``hada_w*_b [r, in, 1, 9]``) make a
    (1, 9) kernel: refused on a 3x3 conv, as the LoKr and LoCon forms are, loaded on the (1, 9)
    conv (found by an independent audit: the flat reshape hid their kernel from the check)."""
    g = torch.Generator().manual_seed(5)
    factors = {
        k: torch.randn(*shape, generator=g, dtype=torch.float64)
        for k, shape in (
            ("hada_w1_a", (16, 2)), ("hada_w1_b", (2, 8, 1, 9)), ("hada_w2_a", (16, 2)), ("hada_w2_b", (2, 8, 1, 9))
        )
    }  # fmt: skip
    sd = {f"lycoris_0.{k}": v for k, v in factors.items()}
    square = lorahot.inject(_base("conv"), ["0"], max_rank=4, merged=True)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"shape \(16, 8, 1, 9\), expected \(16, 8, 3, 3\)"):
        square.load(sd)
    lorahot.inject(nn.Sequential(nn.Conv2d(8, 16, (1, 9))).double(), ["0"], max_rank=4, merged=True).load(sd)


def test_a_1x1_conv_delta_loads_into_the_equivalent_linear() -> None:
    """A 1x1 conv's ``[out, in, 1, 1]`` weight delta is a linear's ``[out, in]`` one: a full
    ``diff`` saved so still loads into a Linear and folds exactly (it did before the kernel
    check; found by an independent audit)."""
    g = torch.Generator().manual_seed(6)
    diff = torch.randn(24, 16, 1, 1, generator=g, dtype=torch.float64)
    model = _base("linear")
    want = model[0].weight.detach() + diff.reshape(24, 16)
    lorahot.inject(model, ["0"], max_rank=4, merged=True).load({"lycoris_0.diff": diff})
    torch.testing.assert_close(model[0].weight.detach(), want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("case", ["loha-ranks", "lokr-both-forms", "lokr-ranks", "locon-core", "lokr-w1-4d"])
def test_factors_that_contradict_each_other_are_refused(case: str) -> None:
    """LoHa halves of different ranks (which one does the alpha divide?), a LoKr half given
    both whole and as two factors (which one is the weight, and is it scaled?), LoKr halves
    both factored at different ranks (ComfyUI divides the alpha by the second half's rank, where
    lorahot took the first's), a Tucker LoCon whose core is not square (ComfyUI's build of the
    weight fails on it) and a conv LoKr whose whole ``lokr_w1`` is 4-D, ``[2, 2, 1, 1]``
    (ComfyUI's ``kron`` of it with ``lokr_w2`` is a 6-D product it reshapes, another order of the
    weight's rows and columns than lorahot's ``kron``): LyCORIS refuses the five files, and
    lorahot did load them, with a reading of its choosing. Now refused, naming the
    contradiction; nothing changes."""
    from lycoris import create_lycoris_from_weights

    g = torch.Generator().manual_seed(4)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3

    if case == "loha-ranks":
        factors = {"hada_w1_a": r(24, 4), "hada_w1_b": r(4, 16), "hada_w2_a": r(24, 2), "hada_w2_b": r(2, 16)}
        message = r"the two Hadamard halves have ranks 4 and 2"
    elif case == "lokr-both-forms":
        factors = {"lokr_w1": r(4, 4), "lokr_w2": r(6, 4), "lokr_w2_a": r(6, 2), "lokr_w2_b": r(2, 4)}
        message = r"lokr_w2 is given both whole and as lokr_w2_a/lokr_w2_b"
    elif case == "lokr-ranks":
        factors = {"lokr_w1_a": r(4, 1), "lokr_w1_b": r(1, 4), "lokr_w2_a": r(6, 2), "lokr_w2_b": r(2, 4)}
        message = r"the two Kronecker halves are factored at ranks 1 and 2; LoKr's halves share one rank"
    elif case == "locon-core":  # on the conv _base("conv"), Conv2d(8, 16, 3), as the next
        factors = {
            "lora_down.weight": r(2, 8, 1, 1),
            "lora_mid.weight": r(3, 2, 3, 3),
            "lora_up.weight": r(16, 3, 1, 1),
        }
        message = r"lora_mid has shape \(3, 2, 3, 3\), where a Tucker LoCon's core is square"
    else:
        factors = {"lokr_w1": r(2, 2, 1, 1), "lokr_w2": r(8, 4, 3, 3)}
        message = r"lokr_w1 has shape \(2, 2, 1, 1\), where LoKr's first half is a matrix \[out1, in1\]"
    sd = {f"lycoris_0.{k}": v for k, v in {**factors, "alpha": torch.tensor(1.0)}.items()}
    model = _base("linear" if case in ("loha-ranks", "lokr-both-forms", "lokr-ranks") else "conv")
    with pytest.raises((RuntimeError, AttributeError, ValueError)):  # the oracle refuses
        create_lycoris_from_weights(1.0, "", copy.deepcopy(model), weights_sd=dict(sd))
    runtime = lorahot.inject(model, ["0"], max_rank=8, merged=True)
    before = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with pytest.raises(lorahot.AdapterMismatchError, match=f"contradict each other: {message}"):
        runtime.load(sd)
    state = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_eject_after_a_merged_lokr_restores_every_weight() -> None:
    _, _, sd = _lycoris(LokrModule, "linear", {"lora_dim": 2, "alpha": 3.0, "factor": 4})
    model = _base("linear")
    snapshot = copy.deepcopy(model.state_dict())
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    runtime.load(sd)
    runtime.eject()
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_preloaded_loha_swaps_with_lora_from_the_host_cache(tmp_path: Path) -> None:
    oracle, _, sd = _lycoris(LohaModule, "linear", {"lora_dim": 4, "alpha": 2.0})
    path = tmp_path / "loha.safetensors"
    save_file(sd, str(path))
    x = _input("linear")
    model = _base("linear")
    base_out = model(x).detach()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True, slots=2)
    runtime.preload(path)
    lora = {
        "lora_unet_0.lora_down.weight": torch.randn(2, 16).double(),
        "lora_unet_0.lora_up.weight": torch.randn(24, 2).double(),
    }
    runtime.load(lora, slot=1)
    runtime.load(path)  # from the cache: the factors are on the host, dW is built at the fold
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x), rtol=1e-9, atol=1e-9)
        runtime.activate(1)
        lora_out = base_out + x @ lora["lora_unet_0.lora_down.weight"].T @ lora["lora_unet_0.lora_up.weight"].T
        torch.testing.assert_close(model(x), lora_out, rtol=1e-9, atol=1e-9)
        runtime.activate(0)
        torch.testing.assert_close(model(x), oracle(x), rtol=1e-9, atol=1e-9)


def test_prefix_and_key_map_rename_weight_kinds_too() -> None:
    oracle, _, sd = _lycoris(LohaModule, "linear", {"lora_dim": 4, "alpha": 2.0})
    te = {k.replace("lora_unet_0", "lora_te1_text_model_fc9"): v for k, v in sd.items()}
    x = _input("linear")
    for options in ({"prefix": "lora_unet"}, {"key_map": {r"lora_unet_0": "0"}, "strict": False}):
        model = _base("linear")
        runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
        info = runtime.load(sd | te, **options)
        assert set(info.ranks) == {"0"}
        assert set(info.skipped) == (set(te) if "strict" in options else set())
        with torch.no_grad():
            torch.testing.assert_close(model(x), oracle(x), rtol=1e-9, atol=1e-9)


def test_compiled_merged_swaps_across_kinds_do_not_recompile() -> None:
    loha_oracle, _, loha = _lycoris(LohaModule, "linear", {"lora_dim": 4, "alpha": 2.0})
    lokr_oracle, _, lokr = _lycoris(LokrModule, "linear", {"lora_dim": 2, "alpha": 3.0, "factor": 8})
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 16, generator=g).double(), torch.randn(24, 3, generator=g).double()
    lora = {"lora_unet_0.lora_down.weight": a, "lora_unet_0.lora_up.weight": b}
    diff = {"lora_unet_0.diff": torch.randn(24, 16, generator=g).double()}
    model, x = _base("linear"), _input("linear")
    base = _base("linear")[0]
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    with torch.no_grad():
        expected = [
            (loha, loha_oracle(x)),
            (lora, base(x) + x @ a.T @ b.T),
            (lokr, lokr_oracle(x)),
            (diff, torch.nn.functional.linear(x, base.weight + diff["lora_unet_0.diff"], base.bias)),
            (loha, loha_oracle(x)),
        ]
    assert_swaps_without_recompile(runtime, model, x, expected, tol=1e-9)


def test_loha_on_conv1d_folds_transposed_and_biasless_diff_b_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(24, 16)).double()  # weight [in 16, out 24]
    linear = nn.Linear(16, 24).double()
    with torch.no_grad():
        linear.weight.copy_(model[0].weight.t())
        linear.bias.copy_(model[0].bias)
    oracle = nn.Sequential(linear)
    loha = LohaModule("lora_unet_0", linear, 1.0, lora_dim=4, alpha=2.0).double()
    with torch.no_grad():
        for p in loha.parameters():
            p.normal_(0, 0.3)
    loha.apply_to()
    sd = {f"lora_unet_0.{k}": v.detach().clone() for k, v in loha.custom_state_dict().items()}
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    runtime.load(sd)
    x = _input("linear")
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle(x), rtol=1e-9, atol=1e-9)
    biasless = nn.Sequential(nn.Linear(16, 24, bias=False))
    rt = lorahot.inject(biasless, ["0"], max_rank=4, merged=True)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"a bias diff \(diff_b\) for layers without a bias:\n  - 0"):
        rt.load({"lora_unet_0.diff_b": torch.randn(24)})


def test_merged_weight_kind_that_overflows_float16_is_refused() -> None:
    model = nn.Sequential(nn.Linear(16, 24)).half()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    w0 = model[0].weight.detach().clone()
    big = {"lora_unet_0.diff": torch.full((24, 16), 60000.0)}
    with pytest.raises(
        lorahot.UsageError, match=r"scale=2: merged weights would overflow the model's dtype in:\n  - 0"
    ):
        runtime.load(big, scale=2.0)
    with pytest.raises(
        lorahot.AdapterReadError,
        match=r"merged weights would overflow the model's dtype in:\n  - 0\nThe adapter's values are too large for "
        r"merged mode; re-save it with smaller values \(its LyCORIS or diff modules load in merged mode only\)\.$",
    ):  # not "inject without merged=True": these modules load in merged mode only
        runtime.load({"lora_unet_0.diff": torch.full((24, 16), 1e6)})
    runtime.load(big, scale=0.5)  # within range: loads, folded from the pristine weights
    assert torch.equal(model[0].weight, (w0.float() + 30000.0).half())


@pytest.mark.parametrize(("algo", "merged"), [("lora", False), ("lora", True), ("loha", True), ("lokr", True)])
def test_files_of_lycoris_own_network_wrapper_load(algo: str, merged: bool, tmp_path: Path) -> None:
    """``lycoris.create_lycoris`` on any model saves kohya's spelling under the prefix
    ``lycoris_`` (``lycoris_0.lora_down.weight``); they were refused as an unknown naming."""
    from lycoris import create_lycoris

    base = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).double()
    oracle = copy.deepcopy(base)
    network = create_lycoris(oracle, 1.0, linear_dim=4, linear_alpha=2.0, algo=algo, factor=4).double()
    network.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    tensors = {k: v.detach().float().contiguous() for k, v in network.state_dict().items()}
    assert all(k.startswith("lycoris_") for k in tensors)
    save_file(tensors, tmp_path / "net.safetensors")
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = oracle(x)
    model = copy.deepcopy(base)
    lorahot.inject(model, ["0", "2"], max_rank=8, merged=merged).load(tmp_path / "net.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
@pytest.mark.parametrize(
    ("cls", "options", "merged"),
    [
        (LohaModule, {"lora_dim": 4, "alpha": 3.0}, True),
        (LokrModule, {"lora_dim": 2, "alpha": 1.0, "factor": 4}, True),
        (LoConModule, {"lora_dim": 3, "alpha": 2.0}, True),
        (LoConModule, {"lora_dim": 3, "alpha": 2.0}, False),
    ],
    ids=["loha", "lokr", "locon-merged", "locon-unmerged"],
)
def test_a_padded_conv_computes_its_merged_weight_not_lycoris_zero_padded_forward(
    cls: type, options: dict, merged: bool, padding_mode: str
) -> None:
    """A divergence the README states: lycoris-lora's unmerged forward convolves the input with
    its delta (LoCon: its ``lora_down`` conv) padded with zeros, whatever the conv's
    ``padding_mode``; lorahot computes the conv of ``W0 + ΔW`` with the conv's own padding, as
    merging the delta into the weight does."""
    oracle, module, sd = _lycoris(cls, "conv", options)
    oracle[0].padding_mode = padding_mode
    x = _input("conv")
    with torch.no_grad():
        theirs = oracle(x)
        reference = copy.deepcopy(_base("conv"))
        reference[0].padding_mode = padding_mode
        reference[0].weight += _delta(module).reshape(reference[0].weight.shape)
        want = reference(x)
        model = _base("conv")
        model[0].padding_mode = padding_mode
        lorahot.inject(model, ["0"], max_rank=4, merged=merged).load(sd)
        ours = model(x)
    torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-9)
    assert float((ours - theirs).abs().max()) > 1e-3


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("kind", ["conv", "conv1d-1x1"])
def test_a_dylora_conv_file_with_a_flat_up_loads_as_its_full_rank_lora(kind: str, merged: bool, tmp_path: Path) -> None:
    """LyCORIS' DyLoRA saves a conv's ``lora_up`` flat (``[out, r]``, where LoCon saves
    ``[out, r, 1, 1]``) beside a ``lora_down`` with its kernel; the file is a LoRA at its full
    rank, ``alpha / r``. It was refused as 'B has shape (16, 4), expected (16, 4, 1, 1)' (by
    ``plan_targets`` too); a flat B beside a conv's A is now that 1x1 B. float64 against the
    dense ``W + alpha / r * up @ down``."""
    from lycoris.modules import DyLoraModule

    torch.manual_seed(0)
    layer = nn.Conv2d(8, 16, 3, padding=1) if kind == "conv" else nn.Conv1d(6, 5, 1)
    model = nn.Sequential(layer).double()
    dylora = DyLoraModule("lycoris_0", model[0], 1.0, lora_dim=4, alpha=2.0, block_size=2).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in dylora.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    sd = {f"lycoris_0.{k}": v.detach().clone().contiguous() for k, v in dylora.custom_state_dict().items()}
    up, down = sd["lycoris_0.lora_up.weight"], sd["lycoris_0.lora_down.weight"]
    assert up.ndim == 2 and down.ndim == model[0].weight.ndim
    path = tmp_path / "dylora.safetensors"
    save_file(sd, str(path))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference[0].weight += (2.0 / 4 * up @ down.flatten(1)).reshape(reference[0].weight.shape)
    x = _input("conv") if kind == "conv" else torch.randn(2, 6, 7, generator=g, dtype=torch.float64)
    plan = lorahot.plan_targets([path], model=model)
    assert plan.targets == ["0"] and plan.inject_options()["max_rank"] == 4
    lorahot.inject(model, plan.targets, max_rank=4, merged=merged).load(path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)


class _NormedBlock(nn.Module):
    """Two linears around a LayerNorm and a GroupNorm, each of which LyCORIS' ``train_norm`` trains."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.gn, self.fc2 = (
            nn.Linear(16, 16),
            nn.LayerNorm(16),
            nn.GroupNorm(4, 16),
            nn.Linear(16, 8),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(self.fc1(x))
        h = self.gn(h.unsqueeze(-1)).squeeze(-1)  # (B, 16, 1): GroupNorm's channels second
        return self.fc2(torch.tanh(h))


def test_a_train_norm_network_merges_its_norm_deltas_like_lycoris(tmp_path: Path) -> None:
    """LyCORIS' ``train_norm`` adds a ``NormModule`` on every norm, saved as ``<norm>.w_norm`` and
    ``<norm>.b_norm`` (``w0 + m * w_norm``, ``b0 + m * b_norm`` at multiplier ``m``): they were
    refused as unsupported. Merged, the file now computes LyCORIS' own forward at multipliers 1 and
    0.5 (lorahot's scale), and the folded norm weights are LyCORIS' ``get_merged_weight``."""
    from lycoris import create_lycoris

    torch.manual_seed(0)
    base = _NormedBlock().double()
    oracle = copy.deepcopy(base)
    network = create_lycoris(oracle, 1.0, linear_dim=4, linear_alpha=2.0, algo="lora", train_norm=True)
    network.apply_to()
    network.double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    tensors = {k: v.detach().clone() for k, v in network.state_dict().items()}
    assert {"lycoris_ln.w_norm", "lycoris_ln.b_norm", "lycoris_gn.w_norm", "lycoris_gn.b_norm"} <= set(tensors)
    save_file(tensors, tmp_path / "net.safetensors")
    model = copy.deepcopy(base)
    plan = lorahot.plan_targets(tmp_path / "net.safetensors", model)
    assert list(plan.targets) == ["fc1", "ln", "gn", "fc2"] and plan.inject_options() == {"max_rank": 4, "merged": True}
    runtime = lorahot.inject(model, plan.targets, **plan.inject_options())
    runtime.load(tmp_path / "net.safetensors")
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)
    norms = {m.lora_name: m for m in network.loras if m.lora_name in ("lycoris_ln", "lycoris_gn")}
    for multiplier in (1.0, 0.5):
        for module in network.loras:
            module.multiplier = multiplier
        runtime.set_scale(multiplier)
        with torch.no_grad():
            torch.testing.assert_close(model(x), oracle(x), rtol=1e-12, atol=1e-12)
            for name, layer in (("lycoris_ln", model.ln), ("lycoris_gn", model.gn)):
                weight, bias = norms[name].get_merged_weight(multiplier)
                torch.testing.assert_close(layer.weight, weight, rtol=0, atol=1e-15)
                torch.testing.assert_close(layer.bias, bias, rtol=0, atol=1e-15)
    unmerged = lorahot.inject(copy.deepcopy(base), ["fc1", "fc2"], max_rank=4)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"lycoris_ln: matches no injected layer.*merged=True"):
        unmerged.load(tmp_path / "net.safetensors")


def _tiny(
    cls: type, kind: str, options: dict, size: float = 1e-14
) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """``_lycoris`` of a module with weight decomposition on a base whose weight is scaled by
    ``size`` (its bias zero) and an update of that size, so each channel's norm ``||V||`` is
    about ``size``: at 1e-14, within a few hundred of float64's machine epsilon, and LyCORIS'
    ``eps`` moves the merged weight by about 1%. ``(oracle model, the base it was made on,
    state dict under kohya names)``."""
    model = _base(kind)
    with torch.no_grad():  # no bias: the unmerged forward's f * b0 + (1 - f) * b0 would cancel at f ~ 1e13
        model[0].weight.mul_(size)
        model[0].bias.zero_()
    base = copy.deepcopy(model)
    module = cls("lora_unet_0", model[0], 1.0, lora_dim=2, alpha=3.0, weight_decompose=True, **options).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            factor = 0.3 if name == "dora_scale" else (size if name.endswith(("up.weight", "_a", "w1")) else 1.0)
            p.copy_(
                torch.randn(p.shape, generator=g, dtype=p.dtype).abs() * factor + (0.2 if name == "dora_scale" else 0)
            )
    module.apply_to()
    sd = {f"lora_unet_0.{k}": v.detach().clone() for k, v in module.custom_state_dict().items()}
    return model, base, sd


@pytest.mark.parametrize(
    ("cls", "options", "merged"),
    [
        (LoConModule, {}, False),
        (LoConModule, {}, True),
        (LohaModule, {}, True),
        (LoConModule, {"wd_on_out": False}, True),
    ],
    ids=["locon-unmerged", "locon-merged", "loha-merged", "locon-wd-on-in-merged"],
)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_dora_scale_normalizes_with_lycoris_eps(cls: type, options: dict, merged: bool, kind: str) -> None:
    """LyCORIS' weight decomposition divides by ``||V|| + eps``, ``eps`` the machine epsilon of
    the dtype it computes in, for every kind: a LoRA/LoCon's ``dora_scale`` (which lorahot runs
    as DoRA, merged or not) as well as a LoHa's or a per-input one. On channels whose norm is
    about 1e-14 the eps is 1% of it: float64, against LyCORIS' own forward within 1e-12 of the
    largest output. A LoCon's ``dora_scale`` was divided by ``||V||`` alone, 1.5% off."""
    oracle, base, sd = _tiny(cls, kind, options)
    x = _input(kind)
    with torch.no_grad():
        want = oracle(x)
        no_eps = float((want - base(x)).abs().max())
    runtime = lorahot.inject(base, ["0"], max_rank=4, merged=merged, extras=not merged)
    runtime.load(sd)
    with torch.no_grad():
        got = base(x)
        top = float(want.abs().max())
        assert top > 0.1 and no_eps > 0.1
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * top)


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("cls", "merged"), [(LoConModule, False), (LoConModule, True), (LohaModule, True)])
def test_the_eps_of_a_dora_scale_is_the_computing_dtype_s_not_the_file_s(
    cls: type, merged: bool, saved: torch.dtype
) -> None:
    """A file saved in bfloat16 or float16 on a float32 model: LyCORIS' own loader
    (``create_lycoris_from_weights``) keeps the ``dora_scale`` in float32 and adds float32's eps
    (1.2e-7), as ComfyUI adds that of its float32 copy of the weight; lorahot adds the same
    (its LoHa's decomposition added the file dtype's, 7.8e-3 for bfloat16). Channels of norm
    about 1e-4, where either eps shows: against LyCORIS' forward within float32's rounding."""
    from lycoris import create_lycoris_from_weights

    _, base, sd = _tiny(cls, "linear", {}, size=1e-4)
    sd = {k.replace("lora_unet_0.", "lycoris_0."): v.to(saved) for k, v in sd.items()}
    base = base.float()
    oracle = copy.deepcopy(base)
    network, _ = create_lycoris_from_weights(1.0, "", oracle, weights_sd=dict(sd))
    network.apply_to()
    assert all(m.dora_scale.dtype == torch.float32 for m in network.loras)
    x = _input("linear").float()
    with torch.no_grad():
        want = oracle(x)
    runtime = lorahot.inject(base, ["0"], max_rank=4, merged=merged, extras=not merged)
    runtime.load(sd)
    with torch.no_grad():
        got = base(x)
    top = float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * top)


#: LyCORIS kinds built with a negative alpha: LyCORIS scales each by alpha / r as given (only 0
#: reads as the rank), a whole LoKr at 1 whatever its alpha; ComfyUI reads the same. The last
#: field: LyCORIS' own loader rebuilds the module from its file (it builds a Tucker LoKr without
#: its w2 factors, and a LoCon decomposed over its inputs as one over its outputs)
NEGATIVE_ALPHA = [
    ("loha-linear", LohaModule, "linear", {"lora_dim": 4}, True),
    ("loha-conv-tucker", LohaModule, "conv", {"lora_dim": 3, "use_tucker": True}, True),
    ("lokr-linear-low", LokrModule, "linear", {"lora_dim": 2, "factor": 8, "decompose_both": True}, True),
    ("lokr-conv-tucker", LokrModule, "wide-conv", {"lora_dim": 2, "factor": 4, "use_tucker": True}, False),
    ("lokr-linear-full", LokrModule, "linear", {"lora_dim": 64, "factor": 4}, True),
    ("locon-conv-tucker", LoConModule, "conv", {"lora_dim": 3, "use_tucker": True}, True),
    ("loha-linear-decomposed", LohaModule, "linear", {"lora_dim": 2, "weight_decompose": True}, True),
    ("locon-linear-decomposed-on-in", LoConModule, "linear",
     {"lora_dim": 2, "weight_decompose": True, "wd_on_out": False}, False),
    ("glora-linear", GLoRAModule, "linear", {"lora_dim": 4}, True),
]  # fmt: skip


def _file(cls: type, kind: str, options: dict, alpha: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """``(oracle model, file)``: a LyCORIS ``cls`` module built with ``alpha`` (as LyCORIS' loader
    builds it from a file's ``.alpha``) applied to a float64 base layer, and its file under
    LyCORIS' own names (``lycoris_0.``), random factors whose values float32 holds exactly
    (LyCORIS' loader builds its modules in float32), the ``.alpha`` ``alpha`` (a whole LoKr
    saves its rank there)."""
    oracle = _base(kind)
    module = cls("lycoris_0", oracle[0], 1.0, alpha=alpha, **options).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3).float())
    module.apply_to()
    saved = module.custom_state_dict() or {k: v for k, v in module.state_dict().items() if k in module.weight_list}
    sd = {f"lycoris_0.{k}": v.detach().clone().double() for k, v in saved.items()}
    sd["lycoris_0.alpha"] = torch.tensor(alpha, dtype=torch.float64)
    return oracle, sd


def _read_by_lycoris(sd: dict[str, torch.Tensor], kind: str) -> tuple[nn.Module, nn.Module]:
    """``(model, module)``: LyCORIS' own loader (``create_lycoris_from_weights``) on the file,
    the module applied to a float64 base layer."""
    from lycoris import create_lycoris_from_weights

    model = _base(kind)
    network, _ = create_lycoris_from_weights(1.0, "", model, weights_sd=dict(sd))
    (module,) = network.loras  # a plain list: network.double() does not reach it
    module.double()
    network.apply_to()
    return model, module


@pytest.mark.parametrize(
    ("case", "cls", "kind", "options", "readable"), NEGATIVE_ALPHA, ids=[c[0] for c in NEGATIVE_ALPHA]
)
def test_a_negative_lycoris_alpha_scales_by_alpha_over_rank_as_lycoris_and_comfyui_do(
    case: str, cls: type, kind: str, options: dict, readable: bool
) -> None:
    """A LyCORIS module's negative ``.alpha`` (LoHa, LoKr, Tucker LoCon, GLoRA, with or without
    weight decomposition) was refused as not > 0. LyCORIS' loader reads it as given (``alpha /
    r``, only 0 taken as the rank; a whole LoKr ignores it) and ComfyUI's adapters divide it by
    the rank alike (a whole LoKr at 1), so lorahot loads it so: float64, against LyCORIS' module
    built with that alpha and, where LyCORIS' loader rebuilds it, against the module that loader
    reads from the file, within 1e-12; the adapter read back (a hand-built WeightModule with
    that alpha) loads the same."""
    oracle, sd = _file(cls, kind, options, -2.5)
    x = _input(kind)
    with torch.no_grad():
        want = oracle(x)
    if readable:
        read, module = _read_by_lycoris(sd, kind)
        assert module.scale == (1.0 if case == "lokr-linear-full" else -2.5 / options["lora_dim"])
        with torch.no_grad():
            torch.testing.assert_close(read(x), want, rtol=1e-12, atol=1e-12)
    for source in (sd, lorahot.read_adapter(sd)):
        model = _base(kind)
        base_out = model(x).detach()
        runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
        runtime.load(source)
        with torch.no_grad():
            assert (want - base_out).abs().max() > 0.1
            torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


def test_a_negative_alpha_on_a_diffs_lora_scales_it_as_comfyui_does() -> None:
    """A diff module with a LoRA beside it (ComfyUI patches both; LyCORIS has no such module)
    and a negative ``.alpha``: ``W + diff + alpha / r * up @ down`` in float64, as ComfyUI's LoRA
    adapter scales it (``alpha / rank`` as given)."""
    model = _base("linear")
    w0 = model[0].weight.detach().clone()
    g = torch.Generator().manual_seed(5)
    diff, up, down = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((24, 16), (24, 3), (3, 16)))
    sd = {
        "lora_unet_0.diff": diff,
        "lora_unet_0.lora_up.weight": up,
        "lora_unet_0.lora_down.weight": down,
        "lora_unet_0.alpha": torch.tensor(-1.5, dtype=torch.float64),
    }
    lorahot.inject(model, ["0"], max_rank=4, merged=True).load(sd)
    torch.testing.assert_close(model[0].weight, w0 + diff + (-1.5 / 3) * up @ down, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("case", "cls", "kind", "options", "readable"), NEGATIVE_ALPHA[:3], ids=[c[0] for c in NEGATIVE_ALPHA[:3]]
)
def test_a_lycoris_alpha_of_0_is_refused_naming_the_two_readings(
    case: str, cls: type, kind: str, options: dict, readable: bool
) -> None:
    """An alpha of 0: LyCORIS' loader takes it as the rank (scale 1), ComfyUI divides it by the
    rank (scale 0). The two disagree, so it stays refused, the message naming both; nothing
    changes, every parameter and buffer bitwise."""
    _, sd = _file(cls, kind, options, 0.0)
    assert _read_by_lycoris(sd, kind)[1].scale == 1.0  # LyCORIS: alpha = rank
    model = _base(kind)
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.raises(
        lorahot.AdapterReadError,
        match=r"lycoris_0\.alpha: alpha must be one finite number other than 0, got shape \(\) value \[0\.0\] "
        r"\(LyCORIS, which trains and loads these modules, reads an alpha of 0 as alpha = rank, a scale of 1; "
        r"ComfyUI reads it as a scale of 0: drop the \.alpha tensors",
    ):
        runtime.load(sd)
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_stack_s_part_refused_at_a_scale_but_1_is_named_by_its_index_and_source(merged: bool, tmp_path: Path) -> None:
    """A stack whose part holds a ``dora_scale`` module, at a weight but 1, is refused naming
    that part as ``part i of the stack (<source>)``: two parts read from mappings are both
    ``<mapping>``, so the index says which (the message read ``<mapping>: scale=0.5``), from a
    load and a set_scale alike, and a file's part by its path. Nothing changed: parameters and
    buffers bitwise as before, the slot's weights too."""
    _, sd = _decomposed_locon("conv")
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 16, 1, 1, generator=g, dtype=torch.float64), torch.randn(16, 2, 1, 1, generator=g).double()
    lora = {"lora_unet_1.lora_down.weight": a, "lora_unet_1.lora_up.weight": b}
    path = tmp_path / "dora.safetensors"
    save_file(sd, str(path))
    model = _base("conv").append(nn.Conv2d(16, 16, 1).double())
    runtime = lorahot.inject(model, ["0", "1"], max_rank=4, merged=merged, extras=not merged)
    runtime.load([lora, sd])
    snapshot = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    why = r"scale=0\.5, but 0 \([^)]*lora_unet_0\.dora_scale"
    cases = [
        (lambda: runtime.load([sd, lora], scale=[0.5, 1]), rf"^part 0 of the stack \(<mapping>\): {why}"),
        (lambda: runtime.load([lora, sd], scale=[1, 0.5]), rf"^part 1 of the stack \(<mapping>\): {why}"),
        (lambda: runtime.set_scale([1, 0.5]), rf"^part 1 of the stack \(<mapping>\): {why}"),
        (
            lambda: runtime.load([lora, path], scale=[1, 0.5]),
            rf"^part 1 of the stack \({re.escape(str(path))}\): {why}",
        ),
    ]
    for call, refused in cases:
        with pytest.raises(lorahot.UsageError, match=refused):
            call()
    state = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())
    assert runtime.info(0).scale == (1.0, 1.0)
