"""Normalization layers in merged mode: a norm's weight and bias deltas (a ComfyUI-extracted
``.diff`` / ``.diff_b``, LyCORIS' ``w_norm`` / ``b_norm``) fold into a pristine copy at the
user's scale, swap without recompiling, and hostile deltas are refused with nothing changed.
(LyCORIS' own ``train_norm`` network is the oracle in ``tests/system/test_parity_lycoris.py``.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import lorahot
from tests.helpers import tiny_lm, token_ids

D, H = 16, 24  # tiny_lm's width (each layers.{i}.norm is a LayerNorm(16)) and its MLP's


class T5LayerNorm(nn.Module):
    """transformers' T5 norm as it is written there (a scale, no bias, no mean subtracted)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class AdaLayerNorm(nn.Module):
    """An adaptive norm: its scale comes from a linear inside (the linear is the target)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)


def _file(seed: int = 1, scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A ComfyUI-extracted-style file for tiny_lm: a LoRA with its bias delta on each MLP down_proj,
    and each layer's norm as a ``.diff`` / ``.diff_b``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        key = f"diffusion_model.layers.{i}"
        sd |= {
            f"{key}.mlp.down_proj.lora_down.weight": torch.randn(2, H, generator=g, dtype=torch.float64) * scale,
            f"{key}.mlp.down_proj.lora_up.weight": torch.randn(D, 2, generator=g, dtype=torch.float64) * scale,
            f"{key}.mlp.down_proj.diff_b": torch.randn(D, generator=g, dtype=torch.float64) * scale,
            f"{key}.norm.diff": torch.randn(D, generator=g, dtype=torch.float64) * scale,
            f"{key}.norm.diff_b": torch.randn(D, generator=g, dtype=torch.float64) * scale,
        }
    return sd


def _expected(model: nn.Module, sd: dict[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    """The float64 merged state of ``model`` (not injected) under ``sd`` at scale ``s``."""
    return _merged({k: v.detach().double() for k, v in model.state_dict().items()}, sd, s)


def _merged(state: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], s: float) -> dict[str, torch.Tensor]:
    """``state`` with ``sd``'s deltas added at scale ``s`` (a LoRA's ``diff_b`` where it has one)."""
    out = {k: v.clone() for k, v in state.items()}
    for i in range(2):
        key, at = f"diffusion_model.layers.{i}", f"layers.{i}"
        down, up = sd[f"{key}.mlp.down_proj.lora_down.weight"], sd[f"{key}.mlp.down_proj.lora_up.weight"]
        out[f"{at}.mlp.down_proj.weight"] += s * up @ down
        out[f"{at}.mlp.down_proj.bias"] += s * sd.get(f"{key}.mlp.down_proj.diff_b", torch.tensor(0.0))
        out[f"{at}.norm.weight"] += s * sd[f"{key}.norm.diff"]
        out[f"{at}.norm.bias"] += s * sd[f"{key}.norm.diff_b"]
    return out


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


def test_a_norm_delta_folds_at_the_user_scale_and_unloads_to_the_pristine_weights() -> None:
    sd = _file()
    oracle = tiny_lm(dtype=torch.float64)
    model = tiny_lm(dtype=torch.float64)
    pristine = _snapshot(model)
    plan = lorahot.plan_targets(dict(sd), model)
    assert list(plan.targets) == [f"layers.{i}.{m}" for i in range(2) for m in ("norm", "mlp.down_proj")]
    assert plan.inject_options() == {"max_rank": 2, "merged": True}
    runtime = lorahot.inject(model, plan.targets, **plan.inject_options())
    assert isinstance(model.layers[0].norm, lorahot.layers.LoRANorm)
    ids = token_ids((2, 5), 32)
    for s in (1.0, 0.5, -2.0):
        runtime.load(dict(sd), scale=s)
        expected = _expected(oracle, sd, s)
        got = model.state_dict()
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=1e-13, atol=1e-13, msg=k)
        oracle_now = tiny_lm(dtype=torch.float64)
        oracle_now.load_state_dict(expected)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), oracle_now(ids), rtol=1e-12, atol=1e-12)
    runtime.unload()
    assert _same(model, pristine)
    runtime.load(dict(sd))
    runtime.eject()
    assert type(model.layers[0].norm) is nn.LayerNorm and _same(model, pristine)


#: the devices of the device-generic tests (the CUDA case runs on a GPU machine only: ``-m gpu``)
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def _without_lora_bias(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` without the LoRAs' ``diff_b``: a LoRA with one is a LoRA with a bias (an extra),
    whose merged rewrite takes the ordinary path; without it, the rewrite of a swap repeated at
    the same scale is a CUDA graph replay (:meth:`lorahot.runtime.merge.Merger._replayed`),
    captured at its second use."""
    return {k: v for k, v in sd.items() if not k.endswith("down_proj.diff_b")}


def _assert_within_rounding(
    model: nn.Module, base: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], s: float
) -> None:
    """Every entry of ``model``'s state is the float64 merge of ``base`` (its pristine values)
    under ``sd`` at ``s`` within ``2 (eps + eps64) (|w0| + |s| |delta|)``, ``|delta|`` the entry
    of ``|B| |A|`` or ``|diff|``: the merged value rounded once to the dtype (``eps / 2`` of
    ``|w|``) from factors rounded once each to it (``eps / 2`` of ``|s| |B| |A|`` per factor), the
    float32 accumulation far below that; in float64 the reference's own roundings as many again.
    A value that underflows is off by at most half the dtype's subnormal spacing."""
    dtype = next(iter(model.state_dict().values())).dtype
    eps = torch.finfo(dtype).eps + torch.finfo(torch.float64).eps
    floor = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    want = _merged(base, sd, s)
    size = _merged({k: v.abs() for k, v in base.items()}, {k: v.abs() for k, v in sd.items()}, abs(s))
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert v.dtype == dtype, k
        error = (v.double().cpu() - want[k]).abs().flatten()
        bound = (2 * eps * size[k] + floor).flatten()
        worst = int((error / bound).argmax()) if error.numel() else 0
        assert bool((error <= bound).all()), f"{k}: off by {float(error[worst]):.3g}, allowed {float(bound[worst]):.3g}"


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["float64", "float16", "bfloat16"]
)
@pytest.mark.parametrize("lora_bias", [False, True], ids=["lora", "lora-with-bias"])
@pytest.mark.parametrize("device", DEVICES)
def test_norm_swaps_on_the_device_equal_the_float64_merge_and_a_user_edit_is_refused(
    device: str, lora_bias: bool, dtype: torch.dtype
) -> None:
    """On the model's device and in its dtype, through three loads of one file (on CUDA the second
    captures the rewrite as a graph and the third replays it, without a LoRA bias), a new scale,
    an unload and a load after it (replayed again), every weight and bias is the float64 merge
    within the dtype's rounding, and the unload restores the model bitwise. A state dict the user
    then loads into a norm makes the next load refuse, naming the norm, with nothing changed."""
    sd = _file() if lora_bias else _without_lora_bias(_file())
    model = tiny_lm(dtype=dtype).to(device)
    pristine = _snapshot(model)
    base = {k: v.double().cpu() for k, v in pristine.items()}
    runtime = lorahot.inject(model, ["down_proj", "norm"], max_rank=2, merged=True)
    merger = runtime._merger
    assert merger is not None
    replayed = device == "cuda" and not lora_bias

    def step(s: float, replays: int) -> None:
        _assert_within_rounding(model, base, sd, s)
        assert merger._replays.replays == (replays if replayed else 0)

    for replays in (0, 1, 2):
        runtime.load(dict(sd))
        step(1.0, replays)
    runtime.set_scale(0.5)  # a rewrite not seen before: the ordinary path
    step(0.5, 2)
    runtime.unload()
    assert _same(model, pristine)
    runtime.load(dict(sd))
    step(1.0, 3)

    norm = model.layers[0].norm
    norm.load_state_dict({k: 2 * pristine[f"layers.0.norm.{k}"] for k in ("weight", "bias")})
    assert torch.equal(model.layers[0].norm.weight, 2 * pristine["layers.0.norm.weight"])
    before = _snapshot(model)
    with pytest.raises(
        lorahot.UsageError,
        match=r"targeted weights or biases changed since lorahot last wrote them .*:\n  - "
        r"layers\.0\.norm\n",
    ):
        runtime.load(dict(sd))
    assert _same(model, before)


def test_the_common_norm_classes_are_targets_and_an_adaptive_norm_is_not() -> None:
    model = nn.Sequential(nn.GroupNorm(2, 8), nn.RMSNorm(8), T5LayerNorm(8), AdaLayerNorm(8)).double()
    lorahot.inject(model, ["0", "1", "2"], max_rank=1, merged=True)
    assert all(isinstance(model[i], lorahot.layers.LoRANorm) for i in range(3))
    with pytest.raises(lorahot.UsageError, match=r"^0: cannot add LoRA to AdaLayerNorm\. Supported: "):
        lorahot.inject(nn.Sequential(AdaLayerNorm(8)), ["0"], max_rank=1, merged=True)
    with pytest.raises(lorahot.UsageError, match=r"^0: its weight is missing, so merged mode has no weight"):
        lorahot.inject(nn.Sequential(nn.LayerNorm(8, elementwise_affine=False)), ["0"], max_rank=1, merged=True)


def test_unmerged_a_norm_is_refused_at_inject_and_its_delta_at_load_with_the_fix() -> None:
    model = tiny_lm()
    with pytest.raises(
        lorahot.UsageError,
        match=r"^layers\.0\.norm: cannot add LoRA to LayerNorm, a normalization layer: lorahot folds the deltas of "
        r"its weight and bias .* in merged mode only\. Inject with merged=True, or narrow targets to exclude it\.$",
    ):
        lorahot.inject(model, ["norm", "down_proj"], max_rank=2)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())
    runtime = lorahot.inject(model, ["down_proj"], max_rank=2)
    before = _snapshot(model)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"diffusion_model\.layers\.0\.norm: matches no injected layer.*; it is a normalization layer's weight "
        r"delta \(shape \(16,\)\), which lorahot folds only into a norm injected with merged=True: add that norm to "
        r"targets .* or load with strict=False to skip it",
    ):
        runtime.load({k: v.float() for k, v in _file().items() if "down_proj" not in k})
    assert _same(model, before)


def test_a_norm_left_out_of_the_targets_is_named_and_skipped_with_strict_false() -> None:
    sd = _file()
    model = tiny_lm(dtype=torch.float64)
    runtime = lorahot.inject(model, ["down_proj", "layers.0.norm"], max_rank=2, merged=True)
    before = _snapshot(model)
    with pytest.raises(lorahot.AdapterMismatchError) as refused:
        runtime.load(dict(sd))
    message = str(refused.value)
    assert "diffusion_model.layers.1.norm: matches no injected layer" in message
    assert "layers.0.norm:" not in message.replace("layers.1.norm", "")
    assert "add that norm to targets" in message and "strict=False" in message
    assert _same(model, before)
    info = runtime.load(dict(sd), strict=False)
    assert set(info.skipped) == {"diffusion_model.layers.1.norm.diff", "diffusion_model.layers.1.norm.diff_b"}
    expected = _expected(tiny_lm(dtype=torch.float64), sd, 1.0)
    torch.testing.assert_close(model.layers[0].norm.weight, expected["layers.0.norm.weight"], rtol=0, atol=1e-15)
    assert torch.equal(model.layers[1].norm.weight, before["layers.1.norm.weight"])


def _hostile(sd: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**sd, key: value}


NORM = "diffusion_model.layers.0.norm"


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            lambda sd: _hostile(sd, f"{NORM}.diff", torch.randn(D + 1, dtype=torch.float64)),
            lorahot.AdapterMismatchError,
            r"layers\.0\.norm \(.*norm\.diff.*\): its weight delta has shape \(17,\), expected \(16,\) \(the norm's "
            r"weight\)",
        ),
        (
            lambda sd: _hostile(sd, f"{NORM}.diff_b", torch.randn(D // 2, dtype=torch.float64)),
            lorahot.AdapterMismatchError,
            r"layers\.0\.norm \(.*\): its bias delta has shape \(8,\), expected \(16,\) \(the norm's bias\)",
        ),
        (
            lambda sd: _hostile(sd, f"{NORM}.diff", torch.full((D,), float("nan"), dtype=torch.float64)),
            lorahot.AdapterReadError,
            r"layers\.0\.norm \(.*\): NaN or Inf in its diff factors",
        ),
        (
            lambda sd: _hostile(sd, f"{NORM}.diff_b", torch.full((D,), float("inf"), dtype=torch.float64)),
            lorahot.AdapterReadError,
            r"layers\.0\.norm \(.*\): NaN or Inf in its diff factors",
        ),
        (
            lambda sd: (
                {k: v for k, v in sd.items() if not k.startswith(f"{NORM}.diff")}
                | {
                    f"{NORM}.hada_w1_a": torch.randn(D, 2, dtype=torch.float64),
                    f"{NORM}.hada_w1_b": torch.randn(2, 1, dtype=torch.float64),
                    f"{NORM}.hada_w2_a": torch.randn(D, 2, dtype=torch.float64),
                    f"{NORM}.hada_w2_b": torch.randn(2, 1, dtype=torch.float64),
                }
            ),
            lorahot.AdapterMismatchError,
            r"layers\.0\.norm \(.*\): loha factors \(.*\) on a normalization layer, which takes only deltas of its "
            r"weight and bias",
        ),
    ],
    ids=["weight-delta-wrong-shape", "bias-delta-wrong-shape", "nan-weight-delta", "inf-bias-delta", "loha-on-norm"],
)
def test_a_hostile_norm_delta_is_refused_typed_and_nothing_changes(
    change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], error: type[Exception], match: str
) -> None:
    model = tiny_lm(dtype=torch.float64)
    runtime = lorahot.inject(model, ["down_proj", "norm"], max_rank=2, merged=True)
    runtime.load(_file(seed=5))
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        runtime.load(change(_file()))
    assert _same(model, before)


def test_a_lora_on_a_norm_and_a_bias_delta_on_a_biasless_norm_are_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8)).double()
    runtime = lorahot.inject(model, ["0", "1"], max_rank=2, merged=True)
    before = _snapshot(model)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"a bias diff \(diff_b\) for layers without a bias:\n  - 1"):
        runtime.load({"lora_unet_1.diff": torch.randn(8), "lora_unet_1.diff_b": torch.randn(8)})
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"1 \(lora_unet_1\.lora_down\.weight, lora_unet_1\.lora_up\.weight\): a LoRA \(A and B\) on a "
        r"normalization layer",
    ):
        runtime.load(
            {"lora_unet_1.lora_down.weight": torch.randn(2, 1), "lora_unet_1.lora_up.weight": torch.randn(8, 2)}
        )
    assert _same(model, before)


def test_compiled_swaps_between_norm_files_and_a_plain_lora_do_not_recompile() -> None:
    sd = _file()
    plain = {k: v for k, v in _file(seed=9).items() if "lora_" in k}
    model = tiny_lm(dtype=torch.float64)
    runtime = lorahot.inject(model, ["down_proj", "norm"], max_rank=2, merged=True)
    ids = token_ids((2, 5), 32)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)

    def oracle(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        reference = tiny_lm(dtype=torch.float64)
        merged = _snapshot(reference)
        for i in range(2):
            key, at = f"diffusion_model.layers.{i}", f"layers.{i}"
            down, up = (
                tensors[f"{key}.mlp.down_proj.lora_down.weight"],
                tensors[f"{key}.mlp.down_proj.lora_up.weight"],
            )
            merged[f"{at}.mlp.down_proj.weight"] += up @ down
            merged[f"{at}.mlp.down_proj.bias"] += tensors.get(f"{key}.mlp.down_proj.diff_b", 0)
            merged[f"{at}.norm.weight"] += tensors.get(f"{key}.norm.diff", 0)
            merged[f"{at}.norm.bias"] += tensors.get(f"{key}.norm.diff_b", 0)
        reference.load_state_dict(merged)
        return reference(ids)

    with torch.no_grad():
        compiled(ids)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for tensors in (sd, plain, sd):
                runtime.load(dict(tensors))
                torch.testing.assert_close(compiled(ids), oracle(tensors), rtol=1e-12, atol=1e-12)
            with pytest.raises(torch._dynamo.exc.RecompileError):  # negative control: a new input shape
                compiled(token_ids((3, 7), 32))
    assert counter.frame_count == 1


def test_a_norm_delta_that_overflows_the_weights_dtype_is_refused_and_nothing_changes() -> None:
    """The exact check of a merged weight near its dtype's limit reads a norm's 1-D weight too."""
    model = nn.Sequential(nn.LayerNorm(8)).half()
    runtime = lorahot.inject(model, ["0"], max_rank=1, merged=True)
    before = _snapshot(model)
    with pytest.raises(
        lorahot.UsageError, match=r"^scale=2: merged weights would overflow the model's dtype in:\n  - 0"
    ):
        runtime.load({"lora_unet_0.diff": torch.full((8,), 60000.0)}, scale=2.0)
    assert _same(model, before)
    runtime.load({"lora_unet_0.diff": torch.full((8,), 60000.0)}, scale=0.5)
    assert torch.equal(model[0].weight, torch.full((8,), 30001.0, dtype=torch.float16))
