"""``fuse=`` parts whose weight is built from their own rows of the base weight (OFT, BOFT,
sd-scripts' OFT, (IA)^3, GLoRA), parts with a ``dora_scale``, and LoRA parts beside weight-delta
parts, joined onto one fused layer (merged mode). Each part's rows of the fused weight are what
its own layer would hold: the reference is the same file loaded into an unfused twin model
(separate ``q``, ``k``, ``v`` whose weights are the fused weight's rows), float64, at the scales
the kinds take; what cannot be computed is refused by name, nothing changed.
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
        self.o = nn.Linear(16, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.cat([self.q(x), self.k(x), self.v(x)], -1))


class _Fused(nn.Module):
    def __init__(self, twin: _Separate) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 16), nn.Linear(16, D)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([twin.q.weight, twin.k.weight, twin.v.weight]))
            self.qkv.bias.copy_(torch.cat([twin.q.bias, twin.k.bias, twin.v.bias]))
            self.o.load_state_dict(twin.o.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.qkv(x))


def _models(conv1d: bool = False) -> tuple[nn.Module, nn.Module]:
    """The twin and the fused model; ``conv1d``: the fused qkv a transformers ``Conv1D``
    (weight ``[in, out]``, as GPT-2's ``c_attn``)."""
    torch.manual_seed(0)
    twin = _Separate().double()
    fused = _Fused(twin).double()
    if conv1d:
        conv = pytest.importorskip("transformers.pytorch_utils").Conv1D(16, D).double()
        with torch.no_grad():
            conv.weight.copy_(fused.qkv.weight.t()), conv.bias.copy_(fused.qkv.bias)
        fused.qkv = conv
    return nn.Sequential(twin), nn.Sequential(fused)


def _r(g: torch.Generator, *shape: int) -> torch.Tensor:
    return 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)


def _named(prefix: str, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k.replace('__', '.')}": v for k, v in tensors.items()}


def _rotations(g: torch.Generator) -> dict[str, torch.Tensor]:
    """LyCORIS OFT on ``q`` (2 blocks of 4 rows, a norm constraint, a rescale), BOFT on ``k``
    (2 stages of 2 blocks of 2 rows), an output-side (IA)^3 on ``v``."""
    return (
        _named("lora_unet_0_q", oft_blocks=_r(g, 2, 4, 4), alpha=torch.tensor(0.05), rescale=1 + _r(g, 8, 1))
        | _named("lora_unet_0_k", oft_blocks=_r(g, 2, 2, 2, 2), alpha=torch.tensor(0.0))
        | _named("lora_unet_0_v", weight=_r(g, 4), on_input=torch.tensor(0))
    )


def _kohya_oft(g: torch.Generator) -> dict[str, torch.Tensor]:
    """sd-scripts' OFT on ``q`` (2 blocks of 4 rows, a binding constraint) and ``k`` (2 blocks
    of 2, a loose one); ``v`` untrained."""
    return _named("oft_unet_0_q", oft_blocks=_r(g, 2, 4, 4), alpha=torch.tensor(1e-2)) | _named(
        "oft_unet_0_k", oft_blocks=_r(g, 2, 2, 2), alpha=torch.tensor(10.0)
    )


def _ia3_and_glora(g: torch.Generator) -> dict[str, torch.Tensor]:
    """An output-side (IA)^3 on ``q``, an input-side one on ``k`` (its rows given to fuse=), a
    GLoRA on ``v`` (rank 2, alpha 3)."""
    return (
        _named("lora_unet_0_q", weight=_r(g, 8), on_input=torch.tensor(0))
        | _named("lora_unet_0_k", weight=_r(g, D), on_input=torch.tensor(1))
        | _named(
            "lora_unet_0_v",
            a1__weight=_r(g, D, 2),
            a2__weight=_r(g, 2, D),
            b1__weight=_r(g, 4, 2),
            b2__weight=_r(g, 2, D),
            alpha=torch.tensor(3.0),
        )
    )


def _decomposed(g: torch.Generator) -> dict[str, torch.Tensor]:
    """LyCORIS weight decomposition on every part: a LoHa (``dora_scale`` per output row) on
    ``q``, a LoKr (per output row) on ``k``, a LoCon normalizing each input column over its own
    rows (``dora_scale`` ``[1, in]``, wd_on_out=False) on ``v``."""
    return (
        _named(
            "lora_unet_0_q",
            hada_w1_a=_r(g, 8, 2),
            hada_w1_b=_r(g, 2, D),
            hada_w2_a=_r(g, 8, 2),
            hada_w2_b=_r(g, 2, D),
            alpha=torch.tensor(3.0),
            dora_scale=1 + _r(g, 8, 1),
        )
        | _named("lora_unet_0_k", lokr_w1=_r(g, 2, 2), lokr_w2=_r(g, 2, 4), dora_scale=1 + _r(g, 4, 1))
        | _named(
            "lora_unet_0_v",
            lora_down__weight=_r(g, 2, D),
            lora_up__weight=_r(g, 4, 2),
            alpha=torch.tensor(1.0),
            dora_scale=1 + _r(g, 1, D),
        )
    )


def _lora_beside_deltas(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A plain LoRA on ``q`` (rank 2, alpha 3), a LoHa on ``k``, a diff with its ``diff_b`` on ``v``."""
    return (
        _named("lora_unet_0_q", lora_down__weight=_r(g, 2, D), lora_up__weight=_r(g, 8, 2), alpha=torch.tensor(3.0))
        | _named(
            "lora_unet_0_k",
            hada_w1_a=_r(g, 4, 2),
            hada_w1_b=_r(g, 2, D),
            hada_w2_a=_r(g, 4, 2),
            hada_w2_b=_r(g, 2, D),
        )
        | _named("lora_unet_0_v", diff=_r(g, 4, D), diff_b=_r(g, 4))
    )


#: (id, file, fuse='s parts, whether every part scales with the user's scale)
FILES = [
    ("oft-boft-ia3", _rotations, ["q", "k", "v"], False),
    ("kohya-oft", _kohya_oft, ["q", "k", ("v", 4)], True),
    ("ia3-glora", _ia3_and_glora, ["q", ("k", 4), "v"], True),
    ("dora-scale", _decomposed, ["q", "k", "v"], False),
    ("lora-beside-deltas", _lora_beside_deltas, ["q", "k", "v"], True),
]


def _assert_twin(separate: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """The fused layer holds the twin's q/k/v rows, weight and bias; both models compute alike."""
    t, f = separate[0], fused[0]
    with torch.no_grad():
        weight = f.qkv.weight if f.qkv.weight.shape == (16, D) else f.qkv.weight.t()  # a Conv1D's [in, out]
        torch.testing.assert_close(weight, torch.cat([t.q.weight, t.k.weight, t.v.weight]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(f.qkv.bias, torch.cat([t.q.bias, t.k.bias, t.v.bias]), rtol=0, atol=1e-15)
        torch.testing.assert_close(f.o.weight, t.o.weight, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused(x), separate(x), rtol=1e-12, atol=1e-12)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize(("make", "parts", "scales"), [f[1:] for f in FILES], ids=[f[0] for f in FILES])
def test_parts_fold_into_their_rows_as_their_own_layers_would(
    make: object, parts: list, scales: bool, conv1d: bool
) -> None:
    separate, fused = _models(conv1d)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pristine, base_out = _snapshot(fused), fused(x).detach()
    twin = lorahot.inject(separate, ["0.q", "0.k", "0.v"], max_rank=4, merged=True)
    runtime = lorahot.inject(fused, ["0.qkv"], max_rank=4, merged=True)
    tensors = make(torch.Generator().manual_seed(1))  # type: ignore[operator]
    twin.load(tensors)
    runtime.load(tensors, fuse={"qkv": parts})
    _assert_twin(separate, fused, x)
    assert float((fused(x) - base_out).detach().abs().max()) > 1e-2
    for scale in (0.5, -1.0, 1.0) if scales else ():
        twin.set_scale(scale)
        runtime.set_scale(scale)
        _assert_twin(separate, fused, x)
    if not scales:  # LyCORIS' OFT/BOFT and weight decomposition: scale 1 only, nothing changed
        loaded = _snapshot(fused)
        with pytest.raises(lorahot.UsageError, match=r"scale=0\.5, but 0\.qkv \(lora_unet_0_[qk]\..*\) is"):
            runtime.set_scale(0.5)
        assert _unchanged(fused, loaded)
    runtime.unload()
    assert _unchanged(fused, pristine)


@pytest.mark.parametrize(("make", "parts", "scales"), [f[1:] for f in FILES], ids=[f[0] for f in FILES])
def test_a_fused_part_stacks_with_an_adapter_on_another_layer(make: object, parts: list, scales: bool) -> None:
    """A stack of the fused file and a LoRA on ``o``: each layer as the twin's, at the stack's
    scales where every part scales."""
    separate, fused = _models()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pristine = _snapshot(fused)
    g = torch.Generator().manual_seed(5)
    other = _named("lora_unet_0_o", lora_down__weight=_r(g, 2, 16), lora_up__weight=_r(g, D, 2))
    twin = lorahot.inject(separate, ["0.q", "0.k", "0.v", "0.o"], max_rank=4, merged=True)
    runtime = lorahot.inject(fused, ["0.qkv", "0.o"], max_rank=4, merged=True)
    tensors = make(torch.Generator().manual_seed(1))  # type: ignore[operator]
    twin.load([tensors, other])
    runtime.load([tensors, other], fuse={"qkv": parts})
    _assert_twin(separate, fused, x)
    if scales:
        twin.set_scale([0.5, -2.0])
        runtime.set_scale([0.5, -2.0])
        _assert_twin(separate, fused, x)
    runtime.unload()
    assert _unchanged(fused, pristine)


def test_a_part_built_from_the_base_weight_is_refused_beside_another_adapter_on_its_layer() -> None:
    """Stacked with another update on the fused layer, an OFT part's result would depend on the
    order the two apply in, as on a layer of its own: refused by name, nothing changed."""
    _, fused = _models()
    pristine = _snapshot(fused)
    g = torch.Generator().manual_seed(5)
    other = _named("lora_unet_0_qkv", lora_down__weight=_r(g, 2, D), lora_up__weight=_r(g, 16, 2))
    runtime = lorahot.inject(fused, ["0.qkv"], max_rank=4, merged=True)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"has a fused module on a layer parts 0, 1 all load into"):
        runtime.load([_rotations(torch.Generator().manual_seed(1)), other], fuse={"qkv": ["q", "k", "v"]})
    assert _unchanged(fused, pristine) and runtime.info() is None


def _with(make: object, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """``make``'s file with ``tensors`` (``<part>__<factor>``) in place of its own."""
    out = make(torch.Generator().manual_seed(1))  # type: ignore[operator]
    for name, t in tensors.items():
        part, _, factor = name.partition("__")
        out[f"lora_unet_0_{part}.{factor.replace('__', '.')}"] = t
    return out


_NAN = torch.full((2, 4, 4), float("nan"), dtype=torch.float64)
_G = torch.Generator().manual_seed(9)

#: (id, file, fuse='s parts, error, message); an input-side (IA)^3 without its rows and a DoRA
#: LoRA beside weight deltas are in test_parity_lycoris_fuse.py's table
REFUSED = [
    (
        "oft-blocks-not-dividing-the-part",
        _with(_rotations, q__oft_blocks=_r(_G, 2, 3, 3)),
        [("q", 8), "k", "v"],
        lorahot.AdapterMismatchError,
        r"qkv: part 'q' has 6 output rows, but fuse= says 8",
    ),
    (
        "boft-butterfly-not-fitting-the-part",
        _with(_rotations, k__oft_blocks=_r(_G, 2, 1, 4, 4)),
        ["q", "k", "v"],
        lorahot.AdapterMismatchError,
        r"0\.qkv \(lora_unet_0_k\.oft_blocks, lora_unet_0_k\.alpha\): .*a butterfly of 2 stages needs an even block "
        r"size and a block count that is a multiple of 2\^\(stages - 1\) = 2",
    ),
    (
        "oft-part-without-a-finite-rotation",
        _with(_rotations, q__oft_blocks=_NAN),
        ["q", "k", "v"],
        lorahot.AdapterReadError,
        r"0\.qkv \(lora_unet_0_q\.oft_blocks, lora_unet_0_q\.alpha, lora_unet_0_q\.rescale\): NaN or Inf in its oft",
    ),
    (
        "glora-part-not-fitting-its-rows",
        _with(_ia3_and_glora, v__a1__weight=_r(_G, D, 3)),
        ["q", ("k", 4), "v"],
        lorahot.AdapterMismatchError,
        r"0\.qkv \(lora_unet_0_v\.a1\.weight, .*\): its glora factors .* not LyCORIS' GLoRA layout for a "
        r"\[4, 8\] weight",
    ),
    (
        "dora-scale-of-the-fused-layer-on-a-part",
        _with(_decomposed, q__dora_scale=1 + _r(_G, 16, 1)),
        ["q", "k", "v"],
        lorahot.AdapterMismatchError,
        r"0\.qkv \(lora_unet_0_q\.hada_w1_a, .*\): dora_scale has shape \(16, 1\), expected \(8, 1\)",
    ),
]


@pytest.mark.parametrize(("tensors", "parts", "error", "match"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_what_a_part_cannot_compute_on_its_rows_is_refused_by_name(
    tensors: dict[str, torch.Tensor], parts: list, error: type, match: str
) -> None:
    _, fused = _models()
    pristine = _snapshot(fused)
    runtime = lorahot.inject(fused, ["0.qkv"], max_rank=4, merged=True)
    with pytest.raises(error, match=match):
        runtime.load(tensors, fuse={"qkv": parts})
    assert _unchanged(fused, pristine) and runtime.info() is None


def test_a_lora_part_keeps_its_bias_and_rslora_scale_beside_weight_deltas() -> None:
    """A LoRA part with a LoRA bias and rsLoRA's ``alpha / sqrt(r)`` beside a LoHa and a diff:
    its rows of the fused weight and bias are the twin's ``q`` at every scale."""
    tensors = {k: v for k, v in _lora_beside_deltas(torch.Generator().manual_seed(1)).items() if "_q." not in k}
    adapter = lorahot.read_adapter(tensors)
    g = torch.Generator().manual_seed(3)
    adapter.modules["lora_unet_0_q"] = lorahot.LoraModule(
        "lora_unet_0_q", _r(g, 2, D), _r(g, 8, 2), 3.0, use_rslora=True, bias=_r(g, 8)
    )
    separate, fused = _models()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    twin = lorahot.inject(separate, ["0.q", "0.k", "0.v"], max_rank=4, merged=True)
    runtime = lorahot.inject(fused, ["0.qkv"], max_rank=4, merged=True)
    twin.load(adapter)
    runtime.load(adapter, fuse={"qkv": ["q", "k", "v"]})
    for scale in (1.0, 0.5, -1.0):
        twin.set_scale(scale)
        runtime.set_scale(scale)
        _assert_twin(separate, fused, x)
