"""LyCORIS diagonal OFT and BOFT, and sd-scripts' own OFT network, in merged mode.

Each LyCORIS case builds a ``DiagOFTModule`` or ``ButterflyOFTModule`` on a Linear or Conv2d,
randomizes its parameters (LyCORIS initializes the blocks to zero: no rotation), writes its
state dict under kohya or ComfyUI names and loads the file into lorahot (``merged=True``). Two
oracles: LyCORIS' own forward and merged weight (computed in float32 whatever the module's dtype:
its Cayley transform inverts ``(I - Q).float()``, so within 1e-5), and a float64 dense
reference built as explicit matrices (the block-diagonal rotation, each butterfly stage its
permutation matrices around it) within 1e-12. sd-scripts is not installed: its OFT is checked
against a dense float64 reference of ``networks/oft.py``'s formula (its clamped constraint and
``I + m (R - I)`` multiplier). In a float16 or bfloat16 model (on the CPU, and on CUDA under
the ``gpu`` marker) the merged weight is the float64 reference of the model's own rounded
weight, rounded once.
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
from tests.helpers import (
    COMPILED_DEVICES,
    HALF_PRECISION,
    Conv1D,
    assert_rounded_once,
    assert_swaps_without_recompile,
)

lycoris = pytest.importorskip("lycoris")
from lycoris.modules import ButterflyOFTModule, DiagOFTModule, LohaModule  # noqa: E402 - after the importorskip

#: (id, LyCORIS class, layer, options, naming prefix)
CASES = [
    ("oft-linear", DiagOFTModule, "linear", {"lora_dim": 4}, "lora_unet_0"),
    ("oft-linear-rescaled", DiagOFTModule, "linear", {"lora_dim": 4, "rescaled": True}, "diffusion_model.0"),
    ("oft-linear-constrained", DiagOFTModule, "linear", {"lora_dim": 4, "constraint": 0.01}, "lora_unet_0"),
    ("oft-conv", DiagOFTModule, "conv", {"lora_dim": 4, "rescaled": True, "constraint": 0.1}, "lora_unet_0"),
    ("boft-linear", ButterflyOFTModule, "wide-linear", {"lora_dim": 4}, "lora_unet_0"),
    (
        "boft-linear-constrained",
        ButterflyOFTModule,
        "wide-linear",
        {"lora_dim": 4, "rescaled": True, "constraint": 0.01},
        "diffusion_model.0",
    ),
    ("boft-conv", ButterflyOFTModule, "conv", {"lora_dim": 2, "rescaled": True}, "lora_unet_0"),
]


def _base(kind: str, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    layer = {
        "linear": lambda: nn.Linear(16, 24),
        "wide-linear": lambda: nn.Linear(16, 32),  # BOFT: a butterfly of 4 stages over 8 blocks of 4
        "conv": lambda: nn.Conv2d(8, 16, 3, padding=1),
    }[kind]()
    return nn.Sequential(layer).to(dtype)


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(*((2, 8, 5, 5) if kind == "conv" else (3, 16)), generator=g, dtype=torch.float64)


def _lycoris(cls: type, kind: str, options: dict, prefix: str) -> tuple[nn.Module, nn.Module, dict]:
    """``(float32 oracle model with the module applied, the module, its file under prefix)``:
    random blocks (0.3 scale) and a rescale near 1."""
    oracle = _base(kind, torch.float32)
    module = cls("lora_unet_0", oracle[0], 1.0, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if name == "rescale" else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    tensors = {k: v.detach().clone() for k, v in module.state_dict().items() if k.split(".")[0] in module.weight_list}
    module.apply_to()
    return oracle, module, {f"{prefix}.{k}": v for k, v in tensors.items()}


def _cayley(blocks: torch.Tensor, limit: float, kohya: bool = False) -> torch.Tensor:
    """Each block's ``(I + Q) @ inverse(I - Q)`` in float64, ``Q`` the skew part under the
    constraint ``limit`` (LyCORIS' rule, or sd-scripts' clamp)."""
    blocks = blocks.double()
    q = blocks - blocks.transpose(-1, -2)
    norm = torch.norm(q)
    if kohya:
        q = q * ((torch.clamp(norm, max=limit) + 1e-8) / (norm + 1e-8))
    elif limit > 0 and norm + 1e-8 > limit:
        q = q * limit / (norm + 1e-8)
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _dense_rotation(tensors: dict[str, torch.Tensor], out: int) -> torch.Tensor:
    """The ``[out, out]`` matrix a LyCORIS OFT/BOFT file applies to the weight's rows."""
    (blocks,) = (t for k, t in tensors.items() if k.endswith("oft_blocks"))
    (alpha,) = (float(t) for k, t in tensors.items() if k.endswith("alpha"))
    r = _cayley(blocks, alpha * out)
    if blocks.ndim == 3:  # diagonal OFT: block k's transpose on its rows
        return torch.block_diag(*[rk.T for rk in r])
    total = torch.eye(out, dtype=torch.float64)
    for i, stage in enumerate(r):  # stage i mixes rows 2^i * b/2 apart: P^T blockdiag(R_i) P
        k = (1 << i) * (stage.shape[-1] // 2)
        perm = torch.arange(out).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
        p = torch.eye(out, dtype=torch.float64)[perm]
        total = p.T @ torch.block_diag(*stage) @ p @ total
    return total


def _dense_weight(tensors: dict[str, torch.Tensor], w0: torch.Tensor) -> torch.Tensor:
    """``rescale * R W0`` in float64, from explicit matrices."""
    out = w0.shape[0]
    rotated = (_dense_rotation(tensors, out) @ w0.reshape(out, -1)).reshape(w0.shape)
    rescale = [t for k, t in tensors.items() if k.endswith("rescale")]
    return rescale[0].double() * rotated if rescale else rotated


@pytest.mark.parametrize(("case", "cls", "kind", "options", "prefix"), CASES, ids=[c[0] for c in CASES])
def test_oft_and_boft_merge_like_lycoris(case: str, cls: type, kind: str, options: dict, prefix: str) -> None:
    oracle, module, tensors = _lycoris(cls, kind, options, prefix)
    x = _input(kind)
    with torch.no_grad():
        want = oracle(x.float()).double()
        lycoris_weight = module.get_merged_weight(1.0, oracle[0].weight.shape, "cpu")[0].double()
    model = _base(kind)
    w0, base_out = model[0].weight.detach().clone(), model(x).detach()
    dense = _dense_weight(tensors, w0)
    if "constraint" in options:  # the constraint binds: the blocks' skew part is scaled down
        q = tensors[f"{prefix}.oft_blocks"] - tensors[f"{prefix}.oft_blocks"].transpose(-1, -2)
        assert float(torch.norm(q)) > options["constraint"] * w0.shape[0]
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    runtime.load(tensors)
    with torch.no_grad():
        torch.testing.assert_close(model[0].weight, dense, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model[0].weight, lycoris_weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        assert float((want - base_out).abs().max()) > 0.05
    merged = model[0].weight.detach().clone()
    with pytest.raises(lorahot.UsageError, match=r"LyCORIS (oft|boft) module, which lorahot loads at scale 1 only"):
        runtime.set_scale(0.5)
    # a scale that only rounds to 1 is shown as it is, not as the 1 the refusal asks for
    with pytest.raises(lorahot.UsageError, match=r"^scale=1\.0000000000009095, but 0 \("):
        runtime.set_scale(1 + 2**-40)
    assert torch.equal(model[0].weight, merged)
    runtime.unload()
    assert torch.equal(model[0].weight, w0)


@pytest.mark.parametrize(("device", "dtype"), HALF_PRECISION)
@pytest.mark.parametrize(("case", "cls", "kind", "options", "prefix"), CASES, ids=[c[0] for c in CASES])
def test_oft_and_boft_merge_in_half_precision_as_float64_rounds(
    case: str, cls: type, kind: str, options: dict, prefix: str, device: str, dtype: torch.dtype
) -> None:
    """Each rotation kind merged into a float16 and a bfloat16 model (on the CPU and on CUDA):
    the weight is the float64 dense reference built from the model's own rounded ``W0``,
    rounded once (:func:`~tests.helpers.assert_rounded_once`), the bias untouched, and unload
    puts ``W0`` back bitwise."""
    _, _, tensors = _lycoris(cls, kind, options, prefix)
    model = _base(kind, dtype).to(device)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    want = _dense_weight(tensors, w0.cpu().double())
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    runtime.load(tensors)
    bound = assert_rounded_once(model[0].weight, want)
    assert float((want - w0.cpu().double()).abs().max()) > 10 * bound  # the rotation is far above the rounding
    assert torch.equal(model[0].bias, b0)
    runtime.unload()
    assert torch.equal(model[0].weight, w0)


def test_oft_on_conv1d_rotates_the_transposed_weight() -> None:
    """A transformers ``Conv1D`` (weight ``[in, out]``) is rotated on its output channels."""
    oracle, _, tensors = _lycoris(DiagOFTModule, "linear", {"lora_dim": 4, "rescaled": True}, "lora_unet_0")
    linear = _base("linear")[0]
    model = nn.Sequential(Conv1D(24, 16)).double()
    with torch.no_grad():
        model[0].weight.copy_(linear.weight.t())
        model[0].bias.copy_(linear.bias)
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    runtime.load(tensors)
    x = _input("linear")
    with torch.no_grad():
        torch.testing.assert_close(model[0].weight.t(), _dense_weight(tensors, linear.weight), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x), oracle(x.float()).double(), rtol=1e-5, atol=1e-5)


def _kohya_reference(blocks: torch.Tensor, alpha: float, w0: torch.Tensor, multiplier: float) -> torch.Tensor:
    """sd-scripts' ``OFTModule``: ``R = I + m (R - I)`` per block, each block's transpose on its
    rows (``einsum("k n m, k n ... -> k m ...")``), the constraint ``alpha * out`` clamped."""
    out = w0.shape[0]
    r = _cayley(blocks, alpha * out, kohya=True)
    eye = torch.eye(r.shape[-1], dtype=torch.float64)
    weighted = multiplier * (r - eye) + eye
    return (torch.block_diag(*[rk.T for rk in weighted]) @ w0.reshape(out, -1)).reshape(w0.shape)


@pytest.mark.parametrize(("device", "dtype"), [pytest.param("cpu", torch.float64, id="cpu-float64"), *HALF_PRECISION])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("alpha", [1e-3, 1.0, 0.0], ids=["constraint-binds", "loose", "zero"])
def test_kohya_oft_merges_as_sd_scripts_computes(kind: str, alpha: float, device: str, dtype: torch.dtype) -> None:
    """sd-scripts' OFT (``oft_unet_`` names) at its alpha: a binding constraint, a loose one,
    and 0 (sd-scripts clamps the skew part to norm 0: no rotation, where LyCORIS' rule would
    leave it unconstrained); its multiplier is linear, so any scale loads. A float64 model
    within 1e-12 of the reference; a float16 or bfloat16 one (on the CPU and on CUDA) the
    reference of its own rounded ``W0`` rounded once (:func:`~tests.helpers.assert_rounded_once`)."""
    model = _base(kind, dtype).to(device)
    w0 = model[0].weight.detach().clone()
    out = w0.shape[0]
    g = torch.Generator().manual_seed(3)
    blocks = 0.3 * torch.randn(4, out // 4, out // 4, generator=g, dtype=torch.float64)
    tensors = {"oft_unet_0.oft_blocks": blocks, "oft_unet_0.alpha": torch.tensor(alpha)}
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    info = runtime.load(tensors)
    assert info.format == "kohya" and set(info.ranks) == {"0"}
    bound = 1e-12
    for scale in (1.0, 0.5, -1.0):
        runtime.set_scale(scale)
        alpha_read = float(tensors["oft_unet_0.alpha"])  # as the file rounds it
        want = _kohya_reference(blocks, alpha_read, w0.cpu().double(), scale)
        if dtype == torch.float64:
            torch.testing.assert_close(model[0].weight, want, rtol=1e-12, atol=1e-12)
        else:
            bound = max(bound, assert_rounded_once(model[0].weight, want))
    if alpha == 0.0:
        torch.testing.assert_close(model[0].weight, w0, rtol=0, atol=1e-7)
    else:
        # bfloat16 under the binding constraint: the rotation moves the weight ~4x the bound
        assert float((model[0].weight.detach() - w0).abs().max()) > max(1e-4, 3 * bound)


MAGNITUDES = [
    # (model dtype, prefix, alpha, magnitude): in float32, ||Q|| past its range made the
    # constraint scale Q to 0 (the weight stayed W0), and Q past it made the weight NaN
    (torch.float32, "lora_unet_0", 1e-3, 1e19),
    (torch.float32, "oft_unet_0", 1e-3, 1e19),
    (torch.float32, "lora_unet_0", None, 1e38),
    (torch.float16, "lora_unet_0", None, 1e38),
    (torch.float64, "lora_unet_0", 1e-3, 5e307),  # Q itself past float64, scaled to the bound
    (torch.float64, "oft_unet_0", 1e-3, 5e307),
]


@pytest.mark.parametrize(
    ("dtype", "prefix", "alpha", "magnitude"),
    MAGNITUDES,
    ids=[f"{str(d)[6:]}-{p.split('_')[0]}-{a}-{m:g}" for d, p, a, m in MAGNITUDES],
)
def test_blocks_of_any_magnitude_rotate_as_float64_computes(
    dtype: torch.dtype, prefix: str, alpha: float | None, magnitude: float
) -> None:
    """Blocks far past the model dtype's range: the rotation is the float64 dense reference's.
    Under a binding constraint ``R`` depends only on the direction of ``Q``, so the reference
    takes the blocks scaled to 1e8 (where the formula's 1e-8 is below float64's precision)."""
    model = _base("linear", dtype)
    w0 = model[0].weight.detach().double().clone()
    g = torch.Generator().manual_seed(6)
    unit = torch.randn(4, 6, 6, generator=g, dtype=torch.float64)
    blocks = (magnitude * unit).clamp(-3e38, 3e38) if dtype != torch.float64 else magnitude * unit
    blocks = blocks.to(torch.float64 if dtype == torch.float64 else torch.float32)
    constraint = {} if alpha is None else {f"{prefix}.alpha": torch.tensor(alpha, dtype=torch.float64)}
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    runtime.load({f"{prefix}.oft_blocks": blocks, **constraint})
    ref = blocks.double() if alpha is None else 1e8 * unit
    r = _cayley(ref, (alpha or 0.0) * 24, kohya=prefix.startswith("oft_"))
    want = (torch.block_diag(*[rk.T for rk in r]) @ w0).to(dtype)
    tol = {torch.float16: 1e-3, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(model[0].weight.detach(), want, rtol=tol, atol=tol)
    assert float((want.double() - w0).abs().max()) > 1e-3


def test_inspect_names_the_rotation_kinds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, oft = _lycoris(DiagOFTModule, "linear", {"lora_dim": 4, "rescaled": True}, "lora_unet_a")
    _, _, boft = _lycoris(ButterflyOFTModule, "wide-linear", {"lora_dim": 4}, "lora_unet_b")
    kohya = {"oft_unet_c.oft_blocks": torch.randn(4, 6, 6), "oft_unet_c.alpha": torch.tensor(1e-3)}
    save_file(oft | boft | kohya, str(tmp_path / "oft.safetensors"))
    assert main(["inspect", str(tmp_path / "oft.safetensors"), "--json"]) == 0
    rows = {
        r["module"]: (r["kind"], r["rank"], r["alpha"], r["scale"])
        for r in json.loads(capsys.readouterr().out)["table"]
    }
    assert rows == {
        "lora_unet_a": ("oft", 0, 0.0, 1.0),
        "lora_unet_b": ("boft", 0, 0.0, 1.0),
        "oft_unet_c": ("kohya-oft", 0, pytest.approx(1e-3), 1.0),
    }


def test_rotations_are_refused_unmerged_and_beside_other_parts_on_a_layer() -> None:
    _, _, tensors = _lycoris(DiagOFTModule, "linear", {"lora_dim": 4}, "lora_unet_0")
    model = _base("linear")
    w0 = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"loads only in merged mode:\n  - 0 \(oft: [\s\S]*merged=True"
    ):
        runtime.load(tensors)
    lorahot.eject(model)
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    g = torch.Generator().manual_seed(4)
    lora = {
        "lora_unet_0.lora_down.weight": torch.randn(2, 16, generator=g),
        "lora_unet_0.lora_up.weight": torch.randn(24, 2, generator=g),
    }
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"has an OFT module on a layer parts 0, 1 all load into; its update is built from the weight",
    ):
        runtime.load([tensors, lora])
    assert torch.equal(model[0].weight, w0) and runtime.info() is None


def _linear_file(**tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"lora_unet_0.{k}": v for k, v in tensors.items()}


HOSTILE = [
    ("non-square", _linear_file(oft_blocks=torch.randn(4, 6, 5)), lorahot.AdapterMismatchError, r"square blocks"),
    ("flat", _linear_file(oft_blocks=torch.randn(4, 6)), lorahot.AdapterMismatchError, r"square blocks"),
    (
        "count-not-dividing",
        _linear_file(oft_blocks=torch.randn(5, 5, 5)),
        lorahot.AdapterMismatchError,
        r"5 blocks of 5 rows rotate 25 output rows, but the layer has 24",
    ),
    (
        "nan",
        _linear_file(oft_blocks=torch.full((4, 6, 6), float("nan"))),
        lorahot.AdapterReadError,
        r"NaN or Inf in its oft factors",
    ),
    (
        "rescale-flat",
        _linear_file(oft_blocks=torch.randn(4, 6, 6), rescale=torch.ones(24)),
        lorahot.AdapterMismatchError,
        r"rescale has shape \(24,\), expected \(24, 1\)",
    ),
    (
        "negative-constraint",
        _linear_file(oft_blocks=torch.randn(4, 6, 6), alpha=torch.tensor(-1.0)),
        lorahot.AdapterReadError,
        r"an OFT's alpha \(the norm constraint on its blocks, 0 for none\) must be one finite number >= 0",
    ),
    (
        "nan-constraint",
        _linear_file(oft_blocks=torch.randn(4, 6, 6), alpha=torch.tensor(float("nan"))),
        lorahot.AdapterReadError,
        r"must be one finite number >= 0",
    ),
    (
        "blocks-past-float64",  # unconstrained: B - B^T overflows float64, no rotation to write
        _linear_file(oft_blocks=torch.full((4, 6, 6), 1.7e308, dtype=torch.float64).triu()),
        lorahot.AdapterReadError,
        r"0 \(lora_unet_0\.oft_blocks\): oft_blocks holds values up to 1\.7e\+308, whose skew part B - B\^T leaves "
        r"float64's range without a norm constraint to scale it: no finite rotation",
    ),
    (
        "boft-odd-block",
        _linear_file(oft_blocks=torch.randn(2, 8, 3, 3)),
        lorahot.AdapterMismatchError,
        r"a butterfly of 2 stages needs an even block size",
    ),
    (
        "boft-too-many-stages",
        _linear_file(oft_blocks=torch.randn(3, 3, 8, 8)),
        lorahot.AdapterMismatchError,
        r"a block count that is a multiple of 2\^\(stages - 1\) = 4",
    ),
    (
        "mixed-with-loha",
        _linear_file(oft_blocks=torch.randn(4, 6, 6), hada_w1_a=torch.randn(24, 2)),
        lorahot.UnknownFormatError,
        r"mixes oft weights with hada_w1_a",
    ),
    (
        "kohya-without-alpha",
        {"oft_unet_0.oft_blocks": torch.randn(4, 6, 6)},
        lorahot.UnknownFormatError,
        r"oft_unet_0 \(oft_unet_0\.oft_blocks\): lacks alpha",
    ),
    (
        "kohya-with-rescale",
        {
            "oft_unet_0.oft_blocks": torch.randn(4, 6, 6),
            "oft_unet_0.alpha": torch.tensor(1e-3),
            "oft_unet_0.rescale": torch.ones(24, 1),
        },
        lorahot.UnknownFormatError,
        r"mixes kohya-oft weights with rescale",
    ),
    (
        "old-spelling",
        _linear_file(oft_diag=torch.randn(4, 6, 6)),
        lorahot.UnknownFormatError,
        r"oft_diag: OFT weights in another spelling than LyCORIS' oft_blocks",
    ),
]


@pytest.mark.parametrize(("case", "tensors", "error", "match"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_a_malformed_rotation_is_refused_and_nothing_changes(
    case: str, tensors: dict[str, torch.Tensor], error: type, match: str
) -> None:
    _, _, good = _lycoris(DiagOFTModule, "linear", {"lora_dim": 4, "rescaled": True}, "lora_unet_0")
    model, x = _base("linear"), _input("linear")
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True, slots=2)
    runtime.load(good)
    weight, bias, out = model[0].weight.detach().clone(), model[0].bias.detach().clone(), model(x).detach()
    for call in (lambda: runtime.load(tensors), lambda: runtime.load(tensors, slot=1)):
        with pytest.raises(error, match=match):
            call()
        assert torch.equal(model[0].weight, weight) and torch.equal(model[0].bias, bias)
        assert torch.equal(model(x), out)


@pytest.mark.parametrize(("device", "mode"), COMPILED_DEVICES)
def test_compiled_merged_swaps_across_rotation_kinds_do_not_recompile(device: str, mode: str) -> None:
    """LoHa, LyCORIS OFT and BOFT, sd-scripts' OFT and LoHa again, swapped into one compiled
    float64 merged model with error_on_recompile=True (on CUDA under CUDA graphs, each output a
    replay): each swap rotates the pristine weight, the output the float64 reference's on the
    CPU within 1e-10."""
    kind = "wide-linear"
    _, _, loha = _lycoris(LohaModule, kind, {"lora_dim": 4, "alpha": 2.0}, "lora_unet_0")
    _, _, oft = _lycoris(DiagOFTModule, kind, {"lora_dim": 4, "rescaled": True}, "lora_unet_0")
    _, _, boft = _lycoris(ButterflyOFTModule, kind, {"lora_dim": 4}, "lora_unet_0")
    g = torch.Generator().manual_seed(5)
    kohya_blocks = 0.3 * torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    kohya = {"oft_unet_0.oft_blocks": kohya_blocks, "oft_unet_0.alpha": torch.tensor(1.0)}
    model, x = _base(kind), _input(kind)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    model.to(device)
    loha_model = _base(kind)
    lorahot.inject(loha_model, ["0"], max_rank=4, merged=True).load(loha)
    loha_weight = loha_model[0].weight.detach().clone()
    weights = [
        (loha, loha_weight),
        (oft, _dense_weight(oft, w0)),
        (boft, _dense_weight(boft, w0)),
        (kohya, _kohya_reference(kohya_blocks, 1.0, w0, 1.0)),  # alpha 1.0: exact in float32
        (loha, loha_weight),
    ]
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    with torch.no_grad():
        swaps = [(tensors, nn.functional.linear(x, weight, b0).to(device)) for tensors, weight in weights]
    assert_swaps_without_recompile(runtime, model, x.to(device), swaps, tol=1e-10, mode=mode)


def test_split_refuses_a_rotation_of_a_fused_layer() -> None:
    """split= cuts a weight delta by its rows, but a rotation is built from the whole fused
    weight, which no part holds: refused naming the module, nothing loaded."""
    model = nn.ModuleDict({"q": nn.Linear(16, 12), "k": nn.Linear(16, 12)}).double()
    w0 = {n: m.weight.detach().clone() for n, m in model.items()}
    runtime = lorahot.inject(model, ["q", "k"], max_rank=4, merged=True)
    tensors = {"lora_unet_qk.oft_blocks": torch.randn(4, 6, 6)}
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"it is an OFT module, a rotation of its layer's output rows[\s\S]*cannot be cut by rows",
    ):
        runtime.load(tensors, split={"lora_unet_qk": [("q", 12), ("k", 12)]})
    assert all(torch.equal(m.weight, w0[n]) for n, m in model.items())
