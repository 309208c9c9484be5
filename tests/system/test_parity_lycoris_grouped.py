"""LyCORIS kinds on grouped and depthwise convolutions, in merged mode.

A grouped conv's weight is ``[out, in / groups, *kernel]``. LyCORIS builds LoHa, LoKr and full
diffs in that layout, rotates its output rows (OFT, BOFT) and scales them ((IA)^3 on the
output) as they are, so each has a merged weight; lorahot folds it into the grouped weight.
Oracles: the LyCORIS module's own forward and ``ΔW`` (float64; OFT and BOFT compute their
rotation in float32, so within 1e-5) and, for the rotations, a float64 dense reference
(1e-12). Refused, naming the layer and why: an input-side (IA)^3 and a GLoRA (their factors
read every input channel of the conv; LyCORIS builds no merged weight for them there), and a
LoRA merged into a grouped conv (its A mixes the input channels of every group).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lorahot
from tests.system.test_parity_lycoris_oft import _dense_weight

lycoris = pytest.importorskip("lycoris")
from lycoris.modules import (  # noqa: E402 - after the importorskip
    ButterflyOFTModule,
    DiagOFTModule,
    FullModule,
    IA3Module,
    LohaModule,
    LokrModule,
)

#: (id, LyCORIS class, options, whether ΔW scales with the user's scale)
KINDS = [
    ("loha", LohaModule, {"lora_dim": 2, "alpha": 3.0}, True),
    ("lokr", LokrModule, {"lora_dim": 2, "alpha": 1.0, "factor": 4}, True),
    ("full", FullModule, {}, True),
    ("ia3-out", IA3Module, {}, True),
    ("oft", DiagOFTModule, {"lora_dim": 4, "rescaled": True, "constraint": 0.1}, False),
    ("boft", ButterflyOFTModule, {"lora_dim": 2, "rescaled": True}, False),
]
LAYERS = [
    pytest.param(2, 2, id="conv2d-grouped"),
    pytest.param(2, 8, id="conv2d-depthwise"),
    pytest.param(1, 2, id="conv1d-grouped"),
    pytest.param(1, 4, id="conv1d-depthwise-x2"),  # 8 inputs in 4 groups of 2, 16 outputs
]


def _base(nd: int, groups: int, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    conv = nn.Conv2d if nd == 2 else nn.Conv1d
    return nn.Sequential(conv(8, 16, 3, padding=1, groups=groups)).to(dtype)


def _input(nd: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 8, *(5,) * nd, generator=g, dtype=torch.float64)


def _lycoris(cls: type, options: dict, nd: int, groups: int) -> tuple[nn.Module, nn.Module, dict]:
    """``(oracle model with the module applied, the module, its file under kohya names)``: every
    factor random (0.3 scale, a rescale near 1); the rotations in float32, as LyCORIS computes
    them, the others in float64."""
    rotates = cls in (DiagOFTModule, ButterflyOFTModule)
    oracle = _base(nd, groups, torch.float32 if rotates else torch.float64)
    module = cls("lora_unet_0", oracle[0], 1.0, **options)
    module = module if rotates else module.double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_((1.0 if name == "rescale" else 0.0) + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    saved = module.custom_state_dict() or {k: v for k, v in module.state_dict().items() if k in module.weight_list}
    tensors = {f"lora_unet_0.{k}": v.detach().clone() for k, v in saved.items()}
    module.apply_to()
    return oracle, module, tensors


@pytest.mark.parametrize(("nd", "groups"), LAYERS)
@pytest.mark.parametrize(("kind", "cls", "options", "scales"), KINDS, ids=[k[0] for k in KINDS])
def test_lycoris_kinds_merge_into_a_grouped_conv_as_lycoris_computes(
    kind: str, cls: type, options: dict, scales: bool, nd: int, groups: int
) -> None:
    oracle, module, tensors = _lycoris(cls, options, nd, groups)
    x = _input(nd)
    model = _base(nd, groups)
    w0, b0, base_out = model[0].weight.detach().clone(), model[0].bias.detach().clone(), model(x).detach()
    runtime = lorahot.inject(model, ["0"], max_rank=8, merged=True)
    runtime.load(tensors)
    if not scales:  # a rotation: scale 1 only, against LyCORIS (float32) and the float64 reference
        with torch.no_grad():
            want = oracle(x.float()).double()
            lycoris_weight = module.get_merged_weight(1.0, w0.shape, "cpu")[0].double()
        torch.testing.assert_close(model[0].weight, _dense_weight(tensors, w0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model[0].weight, lycoris_weight, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x).detach(), want, rtol=1e-5, atol=1e-5)
        assert float((want - base_out).abs().max()) > 0.05
    for scale in (1.0, 0.5, -1.0) if scales else ():
        runtime.set_scale(scale)
        module.multiplier = scale
        with torch.no_grad():
            want, delta = oracle(x), module.get_diff_weight(scale, w0.shape, "cpu")[0]
        if kind in ("loha", "lokr"):  # get_diff_weight applies alpha / r twice (test_parity_lycoris._delta)
            delta = module.get_weight(w0.shape) * scale
        bias_diff = tensors.get("lora_unet_0.diff_b")
        if kind == "full":  # its module's forward reads its weight, not the diff it saves: the file is the reference
            delta = scale * tensors["lora_unet_0.diff"]
            twin = _base(nd, groups)
            with torch.no_grad():
                twin[0].weight.add_(delta), twin[0].bias.add_(scale * bias_diff)
                want = twin(x)
        torch.testing.assert_close(model[0].weight, w0 + delta, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(x).detach(), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model[0].bias, b0 + (0 if bias_diff is None else scale * bias_diff), rtol=0, atol=0)
        assert float((want - base_out).abs().max()) > 1e-3
    runtime.unload()
    assert torch.equal(model[0].weight, w0) and torch.equal(model[0].bias, b0)
    assert torch.equal(model(x), base_out)


@pytest.mark.parametrize("groups", [2, 8], ids=["grouped", "depthwise"])
@pytest.mark.parametrize("kind", ["ia3-in", "glora", "lora"])
def test_what_a_grouped_weight_cannot_hold_is_refused_by_name(kind: str, groups: int) -> None:
    """An input-side (IA)^3 (one factor per input channel of the whole conv), a GLoRA (``a1 a2``
    mixes every input channel) and a LoRA (A reads every input channel) have no merged weight in
    ``[out, in / groups, *kernel]``: each is refused naming the layer, the grouping and why,
    nothing changed. LyCORIS itself builds no merged weight for the first two there."""
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)

    tensors = {
        "ia3-in": {"weight": r(1, 8, 1, 1), "on_input": torch.tensor(1)},
        "glora": {
            "a1.weight": r(8, 2, 1, 1),
            "a2.weight": r(2, 8, 1, 1),
            "b1.weight": r(16, 2, 1, 1),
            "b2.weight": r(2, 8, 3, 3),
        },
        "lora": {"lora_down.weight": r(8, 8, 3, 3), "lora_up.weight": r(16, 8 // groups, 1, 1)},
    }[kind]
    model = _base(2, groups)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=8, merged=True)
    with pytest.raises(lorahot.AdapterMismatchError) as refused:
        runtime.load({f"lora_unet_0.{k}": v for k, v in tensors.items()})
    per_group = (16, 8 // groups, 3, 3)
    why = {
        "ia3-in": r"an \(IA\)\^3 module on a conv with groups=\d: an input-side \(IA\)\^3 scales every input channel",
        "glora": r"a GLoRA module on a conv with groups=\d: a GLoRA's a1 a2 mixes every input channel",
        "lora": r"a LoRA's A mixes the input channels of every group",
    }[kind]
    assert re.search(rf"\b0\b.*{why}.*{re.escape(str(per_group))}", str(refused.value)), str(refused.value)
    assert torch.equal(model[0].weight, w0) and torch.equal(model[0].bias, b0) and runtime.info() is None


def test_an_unmerged_grouped_conv_sends_weight_kinds_to_merged_mode() -> None:
    """A LoHa on a grouped conv of an unmerged runtime is refused saying that it loads in merged
    mode (which now folds it), not to convert it to plain LoRA; nothing changed."""
    _, _, tensors = _lycoris(LohaModule, {"lora_dim": 2, "alpha": 3.0}, 2, 2)
    model = _base(2, 2)
    w0 = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=8)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"(?s)loads only in merged mode:\n  - 0 \(loha: .*merged=True"
    ):
        runtime.load(tensors)
    assert torch.equal(model[0].weight, w0) and runtime.info() is None


@pytest.mark.parametrize("groups", [2, 4], ids=["grouped", "depthwise"])
@pytest.mark.parametrize("how", ["fuse", "split"])
def test_rows_cut_from_or_stacked_into_a_grouped_conv_are_refused(how: str, groups: int) -> None:
    """A grouped conv's output channel reads the input group its row's place picks, so a fused
    grouped conv is not its parts' grouped convs stacked by rows: ``fuse=`` (separate diffs
    stacked onto one grouped ``qkv``) and ``split=`` (a LoHa of a fused ``qkv`` cut onto grouped
    ``q``/``k``/``v``) would give rows of ``ΔW`` other input channels than those they were
    trained on. Both are refused naming the layer and the grouping, nothing changed; on
    ungrouped convs, where stacking rows is exact, the same kind of file loads."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64)

    def setup(grouping: int) -> tuple[nn.Module, list[str], dict[str, torch.Tensor], dict[str, object]]:
        """The model (fused qkv for fuse=, separate q/k/v for split=), its targets, a file and the option."""
        torch.manual_seed(0)
        parts = {n: nn.Conv2d(4, 4, 1, groups=grouping).double() for n in "qkv"}
        fused = nn.Conv2d(4, 12, 1, groups=grouping).double()
        with torch.no_grad():
            fused.weight.copy_(torch.cat([parts[n].weight for n in "qkv"]))
            fused.bias.copy_(torch.cat([parts[n].bias for n in "qkv"]))
            stacked = torch.allclose(fused(x), torch.cat([parts[n](x) for n in "qkv"], 1))
            assert stacked == (grouping == 1)  # a grouped fused conv is not its parts stacked
        width = 4 // grouping  # the input channels each output channel reads
        if how == "fuse":
            tensors = {f"lora_unet_0_{n}.diff": 0.3 * torch.randn(4, width, 1, 1, generator=g) for n in "qkv"}
            return nn.Sequential(nn.ModuleDict({"qkv": fused})), ["0.qkv"], tensors, {"fuse": {"qkv": list("qkv")}}
        shapes = {"hada_w1_a": (12, 2), "hada_w1_b": (2, width), "hada_w2_a": (12, 2), "hada_w2_b": (2, width)}
        tensors = {f"lora_unet_0_qkv.{k}": 0.3 * torch.randn(v, generator=g) for k, v in shapes.items()}
        split = {"split": {"qkv": [("q", 4), ("k", 4), ("v", 4)]}}
        return nn.Sequential(nn.ModuleDict(parts)), ["0.q", "0.k", "0.v"], tensors, split

    model, targets, tensors, option = setup(groups)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = lorahot.inject(model, targets, max_rank=4, merged=True)
    joins = "joins separate modules onto" if how == "fuse" else "cuts rows of a fused module onto"
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=rf"(?s)- {re.escape(targets[0])} \(.*module that {joins} a conv with groups={groups}: .*other input "
        "channels than they were trained on",
    ):
        runtime.load(tensors, **option)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and runtime.info() is None
    model, targets, tensors, option = setup(1)  # the refusal is the grouping's alone
    assert lorahot.inject(model, targets, max_rank=4, merged=True).load(tensors, **option).ranks
