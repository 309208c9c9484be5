"""LyCORIS (IA)^3 and GLoRA in merged mode, against lycoris-lora's own modules as the oracle.

Each case builds an ``IA3Module`` or ``GLoRAModule`` on a Linear or Conv2d in float64 with
random parameters (LyCORIS zero-initializes half of them), writes its state dict under kohya,
LyCORIS' own (``lycoris_``) or ComfyUI names and loads the file into lorahot (``merged=True``):
the merged weight must be LyCORIS' ``get_merged_weight`` at the same multiplier, and the
model's output LyCORIS' forward, within 1e-12. Both kinds are built from the pristine base
weight (``W0 * w``; ``W0 a1 a2 + b1 b2``) and scale linearly in every tool that reads them.
In a float16 or bfloat16 model (on the CPU, and on CUDA under the ``gpu`` marker) the merged
weight is LyCORIS' float64 one over the model's own rounded weight, rounded once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
from lorahot.cli import main
from tests.helpers import COMPILED_DEVICES, HALF_PRECISION, assert_rounded_once, assert_swaps_without_recompile

lycoris = pytest.importorskip("lycoris")
from lycoris.modules import LohaModule  # noqa: E402 - after the importorskip
from lycoris.modules.glora import GLoRAModule  # noqa: E402
from lycoris.modules.ia3 import IA3Module  # noqa: E402

#: (id, LyCORIS class, layer, options, naming prefix)
CASES = [
    ("ia3-linear-out", IA3Module, "linear", {}, "lora_unet_0"),
    ("ia3-linear-in", IA3Module, "linear", {"train_on_input": True}, "lycoris_0"),
    ("ia3-conv-out", IA3Module, "conv", {}, "lora_unet_0"),
    ("ia3-conv-in", IA3Module, "conv", {"train_on_input": True}, "lora_unet_0"),
    ("glora-linear", GLoRAModule, "linear", {"lora_dim": 4, "alpha": 2.0}, "lora_unet_0"),
    ("glora-linear-scalar", GLoRAModule, "linear", {"lora_dim": 3, "alpha": 5.0, "use_scalar": True}, "lycoris_0"),
    ("glora-conv", GLoRAModule, "conv", {"lora_dim": 4, "alpha": 1.0}, "diffusion_model.0"),
]


def _base(kind: str, through: torch.dtype = torch.float64) -> nn.Sequential:
    """The float64 layer, its parameters first rounded to ``through`` (a half-precision
    model's own values, for its float64 reference)."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 24) if kind == "linear" else nn.Conv2d(8, 16, 3, padding=1)
    return nn.Sequential(layer).to(through).double()


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(*((2, 8, 5, 5) if kind == "conv" else (3, 16)), generator=g, dtype=torch.float64)


def _lycoris(
    cls: type, kind: str, options: dict, prefix: str, through: torch.dtype = torch.float64
) -> tuple[nn.Module, nn.Module, dict]:
    """``(oracle model with the module applied, the module, its file under prefix)``, all float64
    over the base weight rounded to ``through``."""
    oracle = _base(kind, through)
    module = cls("lora_unet_0", oracle[0], 1.0, **options).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    saved = module.custom_state_dict() or {k: v for k, v in module.state_dict().items() if k in module.weight_list}
    tensors = {f"{prefix}.{k}": v.detach().clone() for k, v in saved.items()}
    module.apply_to()
    return oracle, module, tensors


@pytest.mark.parametrize(("case", "cls", "kind", "options", "prefix"), CASES, ids=[c[0] for c in CASES])
def test_ia3_and_glora_merge_like_lycoris(case: str, cls: type, kind: str, options: dict, prefix: str) -> None:
    oracle, module, tensors = _lycoris(cls, kind, options, prefix)
    x = _input(kind)
    model = _base(kind)
    w0, base_out = model[0].weight.detach().clone(), model(x).detach()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    runtime.load(tensors)
    for scale in (1.0, 0.5, -1.0):
        runtime.set_scale(scale)
        module.multiplier = scale
        with torch.no_grad():
            want = module.get_merged_weight(scale, w0.shape, "cpu")[0]
            torch.testing.assert_close(model[0].weight, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(model(x), oracle(x), rtol=1e-12, atol=1e-12)
            assert float((want - w0).abs().max()) > 1e-3
    runtime.unload()
    assert torch.equal(model(x), base_out)


@pytest.mark.parametrize(("device", "dtype"), HALF_PRECISION)
@pytest.mark.parametrize(("case", "cls", "kind", "options", "prefix"), CASES, ids=[c[0] for c in CASES])
def test_ia3_and_glora_merge_in_half_precision_as_float64_rounds(
    case: str, cls: type, kind: str, options: dict, prefix: str, device: str, dtype: torch.dtype
) -> None:
    """Each kind merged into a float16 and a bfloat16 model (on the CPU and on CUDA): at every
    scale the weight is LyCORIS' float64 merged weight over the model's own rounded ``W0``,
    rounded once (:func:`~tests.helpers.assert_rounded_once`), the bias untouched, and unload
    puts ``W0`` back bitwise."""
    _, module, tensors = _lycoris(cls, kind, options, prefix, through=dtype)
    model = _base(kind).to(device, dtype)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    runtime.load(tensors)
    for scale in (1.0, 0.5, -1.0):
        runtime.set_scale(scale)
        with torch.no_grad():
            want = module.get_merged_weight(scale, w0.shape, "cpu")[0]
        bound = assert_rounded_once(model[0].weight, want)
        assert float((want - w0.cpu().double()).abs().max()) > 10 * bound  # the update is far above the rounding
    assert torch.equal(model[0].bias, b0)
    runtime.unload()
    assert torch.equal(model[0].weight, w0)


def test_inspect_names_ia3_and_glora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, ia3 = _lycoris(IA3Module, "linear", {}, "lora_unet_a")
    _, _, glora = _lycoris(GLoRAModule, "linear", {"lora_dim": 4, "alpha": 2.0}, "lora_unet_b")
    save_file(ia3 | glora, str(tmp_path / "both.safetensors"))
    assert main(["inspect", str(tmp_path / "both.safetensors"), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["table"]
    rows = {r["module"]: (r["kind"], r["rank"], r["alpha"], r["scale"]) for r in table}
    assert rows == {"lora_unet_a": ("ia3", 0, None, 1.0), "lora_unet_b": ("glora", 4, 2.0, 0.5)}
    assert main(["inspect", str(tmp_path / "both.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "(glora, ia3: load with inject(..., merged=True))" in text
    assert [line.split() for line in text.splitlines() if line.startswith("lora_unet_a")] == [
        ["lora_unet_a", "ia3", "0", "-", "1", "on_input=()", "weight=24"]
    ]


def test_ia3_and_glora_are_refused_unmerged_and_beside_other_parts_on_a_layer() -> None:
    _, _, ia3 = _lycoris(IA3Module, "linear", {}, "lora_unet_0")
    _, _, glora = _lycoris(GLoRAModule, "linear", {"lora_dim": 4, "alpha": 2.0}, "lora_unet_0")
    model = _base("linear")
    w0 = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    for tensors, kind in ((ia3, "ia3"), (glora, "glora")):
        with pytest.raises(lorahot.AdapterMismatchError, match=rf"loads only in merged mode:\n  - 0 \({kind}: "):
            runtime.load(tensors)
    lorahot.eject(model)
    runtime = lorahot.inject(model, ["0"], max_rank=8, merged=True)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"has an \(IA\)\^3 module on a layer parts 0, 1 all load into"
    ):
        runtime.load([ia3, glora])
    assert torch.equal(model[0].weight, w0) and runtime.info() is None


def _file(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"lora_unet_0.{k.replace('__', '.')}": v for k, v in tensors.items()}


def _glora(r: int = 2, out: int = 24, fan_in: int = 16, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    shapes = {"a1__weight": (fan_in, r), "a2__weight": (r, fan_in), "b1__weight": (out, r), "b2__weight": (r, fan_in)}
    return _file(**{k: torch.randn(s, generator=g) for k, s in shapes.items()}, **extra)


HOSTILE = [
    (
        "ia3-wrong-size",
        _file(weight=torch.randn(16), on_input=torch.tensor(0)),
        lorahot.AdapterMismatchError,
        r"weight has shape \(16,\), expected \(24,\) \(one factor per output channel\)",
    ),
    (
        "ia3-flag-not-0-or-1",
        _file(weight=torch.randn(24), on_input=torch.tensor(2)),
        lorahot.AdapterMismatchError,
        r"on_input is 2; it must be 0 or 1",
    ),
    (
        "ia3-flag-not-one-number",
        _file(weight=torch.randn(24), on_input=torch.tensor([0, 1])),
        lorahot.AdapterMismatchError,
        r"on_input has shape \(2,\); it must be one number, 0 or 1",
    ),
    (
        "ia3-without-flag",
        _file(weight=torch.randn(24)),
        lorahot.UnknownFormatError,
        r"lora_unet_0 \(lora_unet_0\.weight\): lacks on_input",
    ),
    (
        "ia3-nan",
        _file(weight=torch.full((24,), float("nan")), on_input=torch.tensor(0)),
        lorahot.AdapterReadError,
        r"NaN or Inf in its ia3 factors",
    ),
    (
        "ia3-flag-complex",
        _file(weight=torch.randn(24), on_input=torch.tensor(1 + 5j)),
        lorahot.AdapterMismatchError,
        r"0 \(lora_unet_0\.weight, lora_unet_0\.on_input\): its ia3 factors \(weight \(24,\), on_input \(\)\) do not "
        r"fit: on_input is torch\.complex64; it must be one real number, 0 or 1",
    ),
    ("glora-without-b2", _glora(), lorahot.UnknownFormatError, None),
    (
        "glora-rank-0",
        _glora(r=0),
        lorahot.AdapterMismatchError,
        r"a2 has no rows: its rank is 0, where a GLoRA's is at least 1 \(LyCORIS scales it by alpha / rank\)",
    ),
    (
        "glora-wrong-size",
        _glora(out=12),
        lorahot.AdapterMismatchError,
        r"not LyCORIS' GLoRA layout for a \[24, 16\] weight: b1 \(12, 2\) \(expected \(24, 2\)\)",
    ),
    (
        "glora-tucker",
        _glora(bm__weight=torch.randn(2, 2, 3, 3)),
        lorahot.UnknownFormatError,
        r"mixes glora weights with bm",
    ),
    (
        "glora-alpha-zero",
        _glora(alpha=torch.tensor(0.0)),
        lorahot.AdapterReadError,
        r"lora_unet_0\.alpha: alpha must be one finite number other than 0, got shape \(\) value \[0\.0\] \(LyCORIS, "
        r"which trains and loads these modules, reads an alpha of 0 as alpha = rank, a scale of 1; ComfyUI reads it as "
        r"a scale of 0",
    ),
]


@pytest.mark.parametrize(("case", "tensors", "error", "match"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_malformed_ia3_or_glora_is_refused_and_nothing_changes(
    case: str, tensors: dict[str, torch.Tensor], error: type, match: str | None
) -> None:
    if match is None:  # drop a factor
        tensors = {k: v for k, v in tensors.items() if not k.endswith("b2.weight")}
        match = r"lora_unet_0 \(.*\): lacks b2"
    _, _, good = _lycoris(IA3Module, "linear", {}, "lora_unet_0")
    model, x = _base("linear"), _input("linear")
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True, slots=2)
    runtime.load(good)
    weight, out = model[0].weight.detach().clone(), model(x).detach()
    for slot in (0, 1):
        with pytest.raises(error, match=match):
            runtime.load(tensors, slot=slot)
        assert torch.equal(model[0].weight, weight) and torch.equal(model(x), out)


def test_a_glora_whose_rank_is_the_layers_size_is_refused_where_comfyui_reads_another_layout() -> None:
    """Rank = in = out: ComfyUI's GLoRA reads the factors as the older layout (``b2 b1 + W0 a2
    a1``), LyCORIS as ``W0 a1 a2 + b1 b2``; the two weights differ, so lorahot refuses it."""
    model = nn.Sequential(nn.Linear(4, 4)).double()
    w0 = model[0].weight.detach().clone()
    tensors = _glora(r=4, out=4, fan_in=4)
    a1, a2, b1, b2 = (tensors[f"lora_unet_0.{k}.weight"].double() for k in ("a1", "a2", "b1", "b2"))
    assert not torch.allclose(w0 @ a1 @ a2 + b1 @ b2, b2 @ b1 + w0 @ a2 @ a1)  # the two readings differ
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"its rank 4 equals the layer's input and output size"):
        runtime.load(tensors)
    assert torch.equal(model[0].weight, w0)


def test_ia3_in_comfyui_naming_is_refused_naming_where_it_loads() -> None:
    """ComfyUI loads no (IA)^3, and in its naming ``<module>.weight`` names a model weight."""
    _, _, tensors = _lycoris(IA3Module, "linear", {}, "diffusion_model.0")
    runtime = lorahot.inject(_base("linear"), ["0"], max_rank=4, merged=True)
    with pytest.raises(lorahot.UnknownFormatError, match=r"on_input: LyCORIS \(IA\)\^3 weights[\s\S]*in kohya naming"):
        runtime.load(tensors)


@pytest.mark.parametrize(("device", "mode"), COMPILED_DEVICES)
def test_compiled_merged_swaps_across_base_kinds_do_not_recompile(device: str, mode: str) -> None:
    """LoHa, (IA)^3 on the input and on the output, GLoRA and LoHa again in one compiled float64
    merged model under error_on_recompile=True (on CUDA under CUDA graphs, each output a
    replay), each output the float64 reference's of LyCORIS' merged weight on the CPU within
    1e-10."""
    kinds = [
        (LohaModule, {"lora_dim": 4, "alpha": 2.0}),
        (IA3Module, {"train_on_input": True}),
        (GLoRAModule, {"lora_dim": 4, "alpha": 2.0}),
        (IA3Module, {}),
    ]
    expected = []
    for cls, options in kinds:
        _, module, tensors = _lycoris(cls, "linear", options, "lora_unet_0")
        with torch.no_grad():
            if cls is LohaModule:
                weight = module.org_weight + module.get_weight(module.shape)
            else:
                weight = module.get_merged_weight(1.0, module.shape, "cpu")[0]
        expected.append((tensors, weight))
    expected.append(expected[0])
    model, x = _base("linear"), _input("linear")
    b0 = model[0].bias.detach().clone()
    runtime = lorahot.inject(model.to(device), ["0"], max_rank=4, merged=True)
    with torch.no_grad():
        swaps = [(tensors, nn.functional.linear(x, weight, b0).to(device)) for tensors, weight in expected]
    assert_swaps_without_recompile(runtime, model, x.to(device), swaps, tol=1e-10, mode=mode)
