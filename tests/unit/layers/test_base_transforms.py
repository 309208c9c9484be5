"""A layer honours what its base module does to its output, in both modes.

Scaled embeddings (Gemma-style ``super().forward(ids) * self.embed_scale``) scale the LoRA
delta too; an embedding class that overrides ``forward`` any other way is refused at inject;
in merged mode a Linear/Conv subclass must still compute its weight's linear map.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorahot
from tests.helpers import ScaledEmbedding, make_adapter, token_ids

VOCAB, DIM = 20, 8


class ShiftedEmbedding(nn.Embedding):
    """Overrides forward with something lorahot cannot follow (and no embed_scale)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) + 1.0


class LyingEmbedding(ScaledEmbedding):
    """Has an ``embed_scale`` but its forward does not (only) multiply by it."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


class Holder(nn.Module):
    def __init__(self, embed: nn.Module) -> None:
        super().__init__()
        self.embed = embed
        self.proj = nn.Linear(DIM, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


def _holder(embed_scale: float | torch.Tensor = 3.0, cls: type[nn.Embedding] = ScaledEmbedding) -> Holder:
    torch.manual_seed(0)
    embed = cls(VOCAB, DIM, embed_scale) if issubclass(cls, ScaledEmbedding) else cls(VOCAB, DIM)
    return Holder(embed).double()


IDS = token_ids((2, 7), VOCAB, seed=1)


def _expected(holder: Holder, a: torch.Tensor, b: torch.Tensor, scale: float, factor: float) -> torch.Tensor:
    """``proj(embed(ids) + scale * factor * dW[ids])`` in float64, independent of lorahot."""
    with torch.no_grad():
        h = holder.embed(IDS).double() + scale * factor * F.embedding(IDS, (b.double() @ a.double()).t())
        return holder.proj(h)


@pytest.mark.parametrize("embed_scale", [3.0, torch.tensor(2.5, dtype=torch.float64)], ids=["number", "tensor"])
def test_scaled_embedding_scales_the_delta(embed_scale: float | torch.Tensor) -> None:
    holder = _holder(embed_scale)
    reference = copy.deepcopy(holder)
    runtime = lorahot.inject(holder, ["embed"], max_rank=4)
    tensors, ab = make_adapter(holder, {"embed": 4}, seed=2, dtype=torch.float64)
    runtime.load(tensors, config={"lora_alpha": 2}, scale=1.5)
    with torch.no_grad():
        y = holder(IDS)
    torch.testing.assert_close(y, _expected(reference, *ab["embed"], 0.75, float(embed_scale)), rtol=1e-12, atol=1e-12)


def test_merged_equals_unmerged_on_a_scaled_embedding() -> None:
    plain, merged = _holder(torch.tensor(4.0)), _holder(torch.tensor(4.0))
    rt_plain = lorahot.inject(plain, ["embed", "proj"], max_rank=4)
    rt_merged = lorahot.inject(merged, ["embed", "proj"], max_rank=4, merged=True)
    for seed, rank in enumerate((4, 2)):
        tensors = make_adapter(plain, {"embed": rank, "proj": rank}, seed=seed, dtype=torch.float64)[0]
        for rt in (rt_plain, rt_merged):
            rt.load(tensors, scale=0.5 + seed)
        with torch.no_grad():
            torch.testing.assert_close(merged(IDS), plain(IDS), rtol=1e-12, atol=1e-12)


def test_embed_scale_is_read_at_forward_time() -> None:
    """Changing the base's ``embed_scale`` buffer (in place, or by a dtype cast) is followed."""
    holder = _holder(torch.tensor(2.0, dtype=torch.float64))
    reference = copy.deepcopy(holder)
    runtime = lorahot.inject(holder, ["embed"], max_rank=4)
    tensors, ab = make_adapter(holder, {"embed": 3}, seed=3, dtype=torch.float64)
    runtime.load(tensors)
    with torch.no_grad():
        holder.embed.base_layer.embed_scale.fill_(5.0)
        reference.embed.embed_scale.fill_(5.0)
        torch.testing.assert_close(holder(IDS), _expected(reference, *ab["embed"], 1.0, 5.0), rtol=1e-12, atol=1e-12)


def test_plain_embedding_with_an_unused_embed_scale_is_not_scaled() -> None:
    """Only what the base's forward does counts: an attribute its forward ignores is ignored."""
    torch.manual_seed(0)
    embed = nn.Embedding(VOCAB, DIM).double()
    embed.embed_scale = 7.0  # type: ignore[assignment]
    holder = Holder(embed).double()
    reference = copy.deepcopy(holder)
    runtime = lorahot.inject(holder, ["embed"], max_rank=4)
    tensors, ab = make_adapter(holder, {"embed": 2}, seed=4, dtype=torch.float64)
    runtime.load(tensors)
    with torch.no_grad():
        torch.testing.assert_close(holder(IDS), _expected(reference, *ab["embed"], 1.0, 1.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (
            ShiftedEmbedding,
            r"embed: ShiftedEmbedding overrides nn\.Embedding\.forward, and lorahot cannot tell what it does to the "
            r"output \(it recognizes only a scalar `embed_scale` attribute.*\)\. Exclude this module from targets\.",
        ),
        (
            LyingEmbedding,
            r"embed: LyingEmbedding overrides nn\.Embedding\.forward and has embed_scale, but its output is not "
            r"nn\.Embedding\.forward\(ids\) \* embed_scale: on a probe input its output differs .*Exclude this module",
        ),
    ],
)
@pytest.mark.parametrize("merged", [False, True])
def test_embedding_forward_lorahot_cannot_follow_is_refused(cls: type, message: str, merged: bool) -> None:
    holder = _holder(cls=cls)
    embed = holder.embed
    with torch.no_grad():
        before = holder(IDS)
    with pytest.raises(lorahot.UsageError, match=message):
        lorahot.inject(holder, ["proj", "embed"], max_rank=4, merged=merged)
    assert holder.embed is embed and isinstance(holder.proj, nn.Linear)  # nothing was wrapped
    with torch.no_grad():
        assert torch.equal(holder(IDS), before)


def test_non_scalar_embed_scale_is_refused() -> None:
    holder = _holder(torch.ones(DIM, dtype=torch.float64))
    with pytest.raises(
        lorahot.UsageError, match=r"embed: ScaledEmbedding\.embed_scale is \(8,\); lorahot applies only"
    ):
        lorahot.inject(holder, ["embed"], max_rank=4)


class DoublingLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


class LoggingLinear(nn.Linear):
    """Overrides forward but computes exactly ``F.linear``: merging is right for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class DoublingConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            DoublingLinear(6, 6),
            r"0: DoublingLinear overrides forward and does not compute the linear map of its weight",
        ),
    ],
    ids=["linear"],
)
def test_merged_mode_refuses_a_forward_that_is_not_the_weights_map(module: nn.Module, message: str) -> None:
    model = nn.Sequential(module)
    with pytest.raises(lorahot.UsageError, match=message + r".*; inject without merged=True\."):
        lorahot.inject(model, ["0"], max_rank=2, merged=True)
    assert model[0] is module
    lorahot.inject(model, ["0"], max_rank=2)  # unmerged, LoRA adds to whatever the base returns (as PEFT)


@pytest.mark.parametrize("merged", [False, True])
def test_a_conv_whose_forward_is_not_its_convolution_is_refused_in_either_mode(merged: bool) -> None:
    """A conv subclass that transforms its output cannot take lorahot's LoRA, which adds to the
    torch convolution's output: PEFT builds its LoRA factors from the subclass (for a doubling
    forward, 4x the delta), the weight-space update gives 2x, lorahot's sum 1x. Refused in
    both modes (found by an independent audit: unmerged was accepted, 7.7 off PEFT); the model
    is unchanged."""
    module = DoublingConv(3, 4, 3, padding=1)
    model = nn.Sequential(module)
    with pytest.raises(
        lorahot.UsageError, match=r"0: DoublingConv overrides forward and does not compute its convolution"
    ):
        lorahot.inject(model, ["0"], max_rank=2, merged=merged)
    assert model[0] is module


class _Observer(nn.Linear):
    """A linear that records the largest input it has seen (an activation-range observer) and
    counts its calls: a forward with state, computing the plain linear map."""

    def __init__(self, fin: int, fout: int) -> None:
        super().__init__(fin, fout)
        self.register_buffer("seen", torch.zeros(()))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = torch.maximum(self.seen, x.detach().abs().max())
        self.calls += 1
        return super().forward(x)


def test_the_probe_forward_leaves_a_stateful_module_as_it_was() -> None:
    """Merged mode runs an overriding forward once on a probe input to check its map; what
    that forward changes in the module (a buffer reassigned, a counter) is put back (found by
    an independent audit: an observer kept the probe's range after inject and eject)."""
    module = _Observer(6, 5)
    model = nn.Sequential(module)
    fired: list[int] = []
    handle = module.register_forward_hook(lambda *_: fired.append(1))
    # a hooked layer is refused in merged mode (runtime.merge.hooked), after the probe ran
    with pytest.raises(lorahot.UsageError, match=r"has forward hooks, which would act on the folded LoRA"):
        lorahot.inject(model, ["0"], max_rank=2, merged=True)
    assert model[0] is module and float(module.seen) == 0.0 and module.calls == 0 and not fired
    handle.remove()  # the hook dict is the one its handle refers to (restored in place, not replaced)
    assert not module._forward_hooks
    lorahot.inject(model, ["0"], max_rank=2, merged=True)
    assert float(module.seen) == 0.0 and module.calls == 0
    lorahot.eject(model)
    assert model[0] is module and float(module.seen) == 0.0 and module.calls == 0


class _Buffered(nn.Linear):
    """A linear with one extra buffer, which its forward converts in place where ``convert``."""

    def __init__(self, buffer: torch.Tensor, convert: bool = False) -> None:
        super().__init__(4, 4)
        self.register_buffer("extra", buffer)
        self.convert = convert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.convert:
            self.extra.data = self.extra.data.double()
        return super().forward(x)


@pytest.mark.parametrize("kind", ["quantized", "meta", "converted in place", "inference"])
def test_the_probe_forward_puts_back_buffers_of_every_kind(kind: str) -> None:
    """The probe forward's buffers are put back whatever they hold: a quantized or meta buffer
    (whose bytes cannot be compared: the comparison crashed the process, or failed and read as
    the module's own mismatch), one the forward converted in place to another dtype, and an
    inference tensor (written back only inside inference mode)."""
    if kind == "quantized":
        buffer = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)
    elif kind == "meta":
        buffer = torch.empty(3, device="meta")
    elif kind == "inference":
        with torch.inference_mode():
            buffer = torch.randn(3)
    else:
        buffer = torch.zeros(3)
    module = _Buffered(buffer, convert=kind == "converted in place")
    before = module.extra
    lorahot.inject(nn.Sequential(module), ["0"], max_rank=2, merged=True)
    assert module.extra is before and module.extra.dtype == buffer.dtype and module.extra.device == buffer.device


def test_merged_mode_accepts_an_override_that_computes_the_same_map() -> None:
    torch.manual_seed(0)
    plain, merged = nn.Sequential(LoggingLinear(6, 5)).double(), nn.Sequential(LoggingLinear(6, 5)).double()
    merged.load_state_dict(plain.state_dict())
    rt_plain, rt_merged = (
        lorahot.inject(plain, ["0"], max_rank=2),
        lorahot.inject(merged, ["0"], max_rank=2, merged=True),
    )
    tensors = make_adapter(plain, {"0": 2}, seed=5, dtype=torch.float64)[0]
    rt_plain.load(tensors)
    rt_merged.load(tensors)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), plain(x), rtol=1e-12, atol=1e-12)


class _CachedLinear(nn.Linear):
    """Computes from a transposed copy of its weight made at construction (a layout cache)."""

    def __init__(self) -> None:
        super().__init__(6, 5)
        self.register_buffer("cached", self.weight.detach().t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.cached + self.bias


class _LazyLinear(nn.Linear):
    """Copies its weight at its first call and computes from that copy from then on."""

    def __init__(self) -> None:
        super().__init__(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "cached" not in self.__dict__:
            self.cached = self.weight.detach().clone()
        return F.linear(x, self.cached, self.bias)


class Conv1D(nn.Module):
    """transformers' Conv1D (``x @ weight + bias``, weight ``[in, out]``), computing from a copy."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5))
        self.bias = nn.Parameter(torch.randn(5))
        self.register_buffer("cached", self.weight.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.cached + self.bias


class _CachedConv(nn.Conv2d):
    def __init__(self) -> None:
        super().__init__(3, 4, 3, padding=1)
        self.register_buffer("cached", self.weight.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.cached, self.bias)


class _CachedEmbedding(ScaledEmbedding):
    def __init__(self) -> None:
        super().__init__(VOCAB, DIM, 2.0)
        self.register_buffer("cached", self.weight.detach().clone(), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.cached) * self.embed_scale


class _ViewLinear(nn.Linear):
    """Computes from a transposed view of its weight: it reads what is written into the weight."""

    def __init__(self) -> None:
        super().__init__(6, 5, dtype=torch.float64)
        self.transposed = self.weight.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.transposed + self.bias


_CACHED = {
    "linear": (_CachedLinear, r"_CachedLinear overrides forward and does not compute the linear map of its weight"),
    "linear cached at its first call": (
        _LazyLinear,
        r"_LazyLinear overrides forward and does not compute the linear map of its weight",
    ),
    "Conv1D": (Conv1D, r"Conv1D does not compute the linear map of its weight"),
    "conv": (_CachedConv, r"_CachedConv overrides forward and does not compute its convolution"),
    "embedding": (_CachedEmbedding, r"_CachedEmbedding overrides forward and does not compute from its table"),
}


def _input(module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Embedding):
        return IDS
    if isinstance(module, nn.Conv2d):
        return torch.randn(2, 3, 5, 5, dtype=torch.float64)
    return torch.randn(3, 6, dtype=torch.float64)


@pytest.mark.parametrize("kind", list(_CACHED))
def test_merged_mode_refuses_a_forward_that_computes_from_a_copy_of_its_weight(kind: str) -> None:
    """A forward that computes from a copy of its weight (made at construction or at its first
    call: a transposed layout, a converted dtype) gives its weight's map on a probe input, so it
    passed merged mode's check; the rewrites went into the weight it never reads again, and the
    adapter was dropped, silently (the model's output the base's, the whole update missing: max
    abs diff 7 on a Linear, 3.2 on a Conv2d, 1.3 on a scaled Embedding). The probe now also
    writes a change into the weight and bias in place, as merged mode does, and the forward
    must follow it. Refused, the model bitwise as it was (the probe change put back); unmerged
    serves it."""
    cls, message = _CACHED[kind]
    torch.manual_seed(0)
    module = cls().double()
    model = nn.Sequential(module)
    x = _input(module)
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.UsageError, match=rf"^0: {message} \(on a probe input, after a probe change was"):
        lorahot.inject(model, ["0"], max_rank=2, merged=True)
    assert model[0] is module and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    lorahot.inject(model, ["0"], max_rank=2)


def test_merged_mode_accepts_a_forward_that_reads_a_view_of_its_weight() -> None:
    """A forward that reads its weight through a view follows merged mode's writes: accepted,
    and the merged model computes what the unmerged one does."""
    torch.manual_seed(0)
    plain, merged = nn.Sequential(_ViewLinear()), nn.Sequential(_ViewLinear())
    with torch.no_grad():
        merged[0].weight.copy_(plain[0].weight)
        merged[0].bias.copy_(plain[0].bias)
    weight = merged[0].weight.detach().clone()
    rt_plain, rt_merged = (
        lorahot.inject(plain, ["0"], max_rank=2),
        lorahot.inject(merged, ["0"], max_rank=2, merged=True),
    )
    assert torch.equal(merged[0].weight, weight)  # the probe change put back
    tensors = make_adapter(plain, {"0": 2}, seed=5, dtype=torch.float64)[0]
    rt_plain.load(tensors)
    rt_merged.load(tensors)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), plain(x), rtol=1e-12, atol=1e-12)


class _QuantState:
    """What a quantized weight carries beside its data (bitsandbytes' ``QuantState``): the
    layout its data is in and a scale its forward multiplies by."""

    def __init__(self) -> None:
        self.packed = False
        self.scale = torch.ones(())


class _RepackingLinear(nn.Linear):
    """A linear whose first call in eval mode without autograd repacks its weight, as
    bitsandbytes' ``Linear4bit`` does on a CPU: it rebinds ``weight.data`` to another layout
    (transposed, doubled) and records it in the state object its weight carries (packed, scale
    0.5), from which later calls compute. The map stays ``x @ W0.T + b``."""

    def __init__(self, fin: int, fout: int) -> None:
        super().__init__(fin, fout)
        self.weight.quant_state = _QuantState()  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.weight.quant_state  # type: ignore[attr-defined]
        if not self.training and not torch.is_grad_enabled() and not state.packed:
            self.weight.data = (2 * self.weight.data).t().contiguous()
            state.packed, state.scale = True, torch.full((), 0.5)
        weight = self.weight.t() if state.packed else self.weight
        return F.linear(x, weight * state.scale, self.bias)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged refused"])
def test_a_probe_forward_that_repacks_its_weight_is_undone(merged: bool) -> None:
    """Inject calls an overriding forward on a probe input; one that rebinds its weight's data
    and changes the state object its weight carries (bitsandbytes' lazy CPU repacking) kept the
    repacked weight: inject, and a refused merged inject, changed the model's bits, and eject did
    not give back the module of before. Now the weight's data, its attributes and the objects
    they hold are put back together (one without the other computes ``0.5 * x @ W0.T``):
    bitwise the model of before, and the LoRA over it the float64 reference."""
    torch.manual_seed(0)
    model = nn.Sequential(_RepackingLinear(6, 6)).eval()
    module, weight = model[0], model[0].weight
    data, state = weight.detach(), weight.quant_state
    values, fields = data.clone(), dict(vars(state))
    if merged:
        with pytest.raises(
            lorahot.UsageError, match=r"^0: _RepackingLinear overrides forward and does not compute the linear map"
        ):
            lorahot.inject(model, ["0"], max_rank=2, merged=True)
    else:
        runtime = lorahot.inject(model, ["0"], max_rank=2)
    assert module.weight is weight and weight.quant_state is state and vars(state) == fields
    assert weight.data_ptr() == data.data_ptr() and weight.shape == data.shape and torch.equal(weight, values)
    if merged:
        return
    tensors, ab = make_adapter(model, {"0": 2}, seed=3)
    runtime.load(tensors)
    (a, b), x = ab["0"], torch.randn(3, 6)
    want = F.linear(x.double(), values.double(), module.bias.double()) + x.double() @ (b.double() @ a.double()).t()
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)
        assert weight.quant_state.packed  # the real call repacked it, as the module does
        torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)
