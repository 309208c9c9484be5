"""LyCORIS modules on separate projections joined onto one fused layer with ``fuse=`` (merged
mode): each part's ``ΔW`` fills its rows of the fused weight. The reference is the same file
loaded into an unfused twin model (separate ``q``, ``k``, ``v`` whose weights are the fused
weight's rows), float64; what fuse= cannot join is refused by name, nothing changed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorahot

D = 8


class _Separate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, 4), nn.Linear(D, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)


class _Fused(nn.Module):
    def __init__(self, twin: _Separate) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 16)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([twin.q.weight, twin.k.weight, twin.v.weight]))
            self.qkv.bias.copy_(torch.cat([twin.q.bias, twin.k.bias, twin.v.bias]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


def _models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    twin = _Separate().double()
    return nn.Sequential(twin), nn.Sequential(_Fused(twin).double())


def _file(untrained_v: bool = False) -> dict[str, torch.Tensor]:
    """A LoHa on ``q`` (alpha 3, rank 2), a full LoKr on ``k``, a diff with its ``diff_b`` on ``v``."""
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)

    q = {"hada_w1_a": r(8, 2), "hada_w1_b": r(2, 8), "hada_w2_a": r(8, 2), "hada_w2_b": r(2, 8)}
    tensors = {f"lora_unet_0_q.{k}": v for k, v in q.items()} | {"lora_unet_0_q.alpha": torch.tensor(3.0)}
    tensors |= {"lora_unet_0_k.lokr_w1": r(2, 2), "lora_unet_0_k.lokr_w2": r(2, 4)}
    return tensors if untrained_v else tensors | {"lora_unet_0_v.diff": r(4, 8), "lora_unet_0_v.diff_b": r(4)}


@pytest.mark.parametrize("untrained_v", [False, True], ids=["qkv", "qk-and-v-sized"])
def test_weight_deltas_on_q_k_v_fuse_into_their_rows_of_a_fused_qkv(untrained_v: bool) -> None:
    separate, fused = _models()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    w0, b0, base_out = fused[0].qkv.weight.detach().clone(), fused[0].qkv.bias.detach().clone(), fused(x).detach()
    parts = ["q", "k", ("v", 4)] if untrained_v else ["q", "k", "v"]
    targets = ["0.q", "0.k"] if untrained_v else ["0.q", "0.k", "0.v"]
    twin = lorahot.inject(separate, targets, max_rank=4, merged=True)
    runtime = lorahot.inject(fused, ["0.qkv"], max_rank=4, merged=True)
    tensors = _file(untrained_v)
    twin.load(tensors)
    runtime.load(tensors, fuse={"qkv": parts})
    for scale in (1.0, 0.5, -1.0):
        twin.set_scale(scale)
        runtime.set_scale(scale)
        with torch.no_grad():
            t = separate[0]
            want_w = torch.cat([t.q.weight, t.k.weight, t.v.weight])
            torch.testing.assert_close(fused[0].qkv.weight, want_w, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(fused[0].qkv.bias, torch.cat([t.q.bias, t.k.bias, t.v.bias]), rtol=0, atol=0)
            torch.testing.assert_close(fused(x), separate(x), rtol=1e-12, atol=1e-12)
            assert float((fused(x) - base_out).abs().max()) > 1e-2
    runtime.unload()
    assert torch.equal(fused[0].qkv.weight, w0) and torch.equal(fused[0].qkv.bias, b0)


def test_a_float64_part_keeps_its_precision_beside_a_float16_one() -> None:
    """Parts saved in different dtypes fuse in the widest of them: the stacked ``diff_b`` took
    the first part's dtype (a float16 one promoted to float32), so a float64 part's bias delta
    was rounded to float32 (3e-9 off in a float64 model); now the fused bias is the unfused
    twin's, bitwise."""
    separate, fused = _models()
    twin = lorahot.inject(separate, ["0.q", "0.k", "0.v"], max_rank=4, merged=True)
    runtime = lorahot.inject(fused, ["0.qkv"], max_rank=4, merged=True)
    g = torch.Generator().manual_seed(3)
    tensors = {k: v for k, v in _file().items() if not k.startswith("lora_unet_0_k.")} | {
        "lora_unet_0_k.diff": torch.randn(4, D, generator=g).half(),
        "lora_unet_0_k.diff_b": torch.randn(4, generator=g).half(),
    }
    twin.load(tensors)
    runtime.load(tensors, fuse={"qkv": ["q", "k", "v"]})
    t = separate[0]
    torch.testing.assert_close(fused[0].qkv.bias, torch.cat([t.q.bias, t.k.bias, t.v.bias]), rtol=0, atol=0)
    torch.testing.assert_close(fused[0].qkv.weight, torch.cat([t.q.weight, t.k.weight, t.v.weight]), rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("replace", "match"),
    [
        (
            {"lora_unet_0_q.weight": torch.ones(D), "lora_unet_0_q.on_input": torch.tensor(1)},
            r"part lora_unet_0_q is an \(IA\)\^3 module whose factors do not say how many output rows it acts on "
            r"\(an input-side \(IA\)\^3 scales input columns\); give fuse= its size as \('q', out_features\)",
        ),
        (
            {
                "lora_unet_0_q.lora_down.weight": torch.ones(2, D),
                "lora_unet_0_q.lora_up.weight": torch.ones(8, 2),
                "lora_unet_0_q.dora_scale": torch.ones(8, 1),
            },
            r"qkv: part lora_unet_0_q is DoRA \(a magnitude vector\) beside weight-delta parts",
        ),
        (
            {"lora_unet_0_q.diff": torch.ones(6, D)},
            r"0\.qkv \(.*\): its parts \['lora_unet_0_q', 'lora_unet_0_k', 'lora_unet_0_v'\] have \[6, 4, 4\] "
            r"output rows, 14 in all, but the layer has 16",
        ),
        (  # rows 9 + 4 + 3 add up to the layer's 16: the biases would sit one row off from the first part on
            {
                "lora_unet_0_q.diff": torch.ones(8, D),
                "lora_unet_0_q.diff_b": torch.ones(9),
                "lora_unet_0_v.diff": torch.ones(4, D),
                "lora_unet_0_v.diff_b": torch.ones(3),
            },
            r"qkv: part lora_unet_0_q's diff_b has shape \(9,\), but the part has 8 output rows; a diff_b holds one "
            r"value per row, \(8,\)",
        ),
        (  # as many values as rows, not one per row
            {"lora_unet_0_q.diff": torch.ones(8, D), "lora_unet_0_q.diff_b": torch.ones(2, 4)},
            r"qkv: part lora_unet_0_q's diff_b has shape \(2, 4\), but the part has 8 output rows",
        ),
        (  # stacking would cast it to a float, past the check of its dtype
            {"lora_unet_0_q.diff": torch.ones(8, D), "lora_unet_0_q.diff_b": torch.arange(8)},
            r"qkv: part lora_unet_0_q's diff_b is of dtype torch\.int64; weights must be dense",
        ),
    ],
    ids=[
        "input-side-ia3-without-rows",
        "dora-lora-beside-deltas",
        "rows-do-not-add-up",
        "diff-b-rows-shifted",
        "diff-b-2d",
        "diff-b-int",
    ],
)
def test_what_fuse_cannot_join_is_refused_by_name(replace: dict[str, torch.Tensor], match: str) -> None:
    _, fused = _models()
    w0, b0 = fused[0].qkv.weight.detach().clone(), fused[0].qkv.bias.detach().clone()
    replaced = {k.split(".")[0] + "." for k in replace}  # the modules replace= gives anew
    tensors = {k: v for k, v in _file().items() if not k.startswith(tuple(replaced))} | {
        k: v.double() if v.is_floating_point() else v for k, v in replace.items()
    }
    runtime = lorahot.inject(fused, ["0.qkv"], max_rank=4, merged=True)
    with pytest.raises((lorahot.AdapterMismatchError, lorahot.AdapterReadError), match=match):
        runtime.load(tensors, fuse={"qkv": ["q", "k", "v"]})
    assert torch.equal(fused[0].qkv.weight, w0) and torch.equal(fused[0].qkv.bias, b0) and runtime.info() is None


def test_a_bias_only_diff_part_fills_its_rows_of_the_fused_bias() -> None:
    """A diff of ``v``'s bias alone (``diff_b``, no ``diff``) is a part of as many rows as its bias."""
    separate, fused = _models()
    tensors = {k: v for k, v in _file().items() if k != "lora_unet_0_v.diff"}
    lorahot.inject(separate, ["0.q", "0.k", "0.v"], max_rank=4, merged=True).load(tensors)
    lorahot.inject(fused, ["0.qkv"], max_rank=4, merged=True).load(tensors, fuse={"qkv": ["q", "k", "v"]})
    t = separate[0]
    torch.testing.assert_close(fused[0].qkv.bias, torch.cat([t.q.bias, t.k.bias, t.v.bias]), rtol=0, atol=0)
    torch.testing.assert_close(fused[0].qkv.weight, torch.cat([t.q.weight, t.k.weight, t.v.weight]), rtol=0, atol=1e-15)
