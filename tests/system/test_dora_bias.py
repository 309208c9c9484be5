"""DoRA and LoRA bias against PEFT: tiny models, PEFT ``use_dora=True`` / ``lora_bias=True``
adapters with random nonzero weights (magnitudes perturbed away from the base norm), saved by
``save_pretrained``, loaded by lorahot; outputs equal PEFT's within rounding. Also: set_scale on
a DoRA slot, DoRA -> LoRA -> DoRA swaps on a compiled model with no recompile, several slots,
a failed load that changes nothing (the extras included), and the host cache writing bitwise
what a file load writes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorahot
from lorahot.runtime import wide

TARGETS = ["q", "n", "g", "c", "e"]


class _Model(nn.Module):
    """Linear with and without bias, transformers Conv1D, Conv2d, Embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.n = nn.Linear(8, 6, bias=False)
        self.g = Conv1D(6, 8)  # weight [in=8, out=6]
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.e = nn.Embedding(10, 5)

    def forward(self, x: torch.Tensor, img: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        parts = (self.q(x), self.n(x), self.g(x), self.c(img), self.e(ids))
        return torch.cat([p.reshape(-1) for p in parts])


def _base(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = _Model().to(dtype)
    with torch.no_grad():
        model.g.bias.normal_()
    return model


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, generator=g).to(dtype)
    img = torch.randn(2, 3, 6, 6, generator=g).to(dtype)
    return x, img, torch.randint(0, 10, (4,), generator=g)


def _peft(base: nn.Module, path: Path, seed: int, targets: list[str], **config) -> nn.Module:
    """A PEFT model with random nonzero LoRA weights (magnitudes perturbed), saved to ``path``."""
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=3, target_modules=targets, **config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device, p.dtype)
                p.copy_(p * (1 + 0.3 * noise) if "magnitude" in name else 0.3 * noise)
    model.eval()
    model.save_pretrained(path)
    return model


def _scale_peft(model: nn.Module, factor: float) -> None:
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            scaling["default"] *= factor


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    tol = 1e-12 if want.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("widened", [False, True], ids=["library", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dora_matches_peft(tmp_path: Path, dtype: torch.dtype, widened: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if widened:  # the one-GEMM path of CUDA, run on the CPU (see tests/unit/runtime/test_wide.py)
        monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    base, inputs = _base(dtype), _inputs(dtype)
    peft = _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, extras=True)
    assert runtime.layers["q"].wide == widened and runtime.layers["n"].wide == widened
    runtime.load(tmp_path / "dora")
    with torch.no_grad():
        _close(model(*inputs), peft(*inputs))
        runtime.set_scale(0.4)
        _scale_peft(peft, 0.4)
        _close(model(*inputs), peft(*inputs))


@pytest.mark.parametrize("widened", [False, True], ids=["library", "wide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lora_bias_matches_peft(
    tmp_path: Path, dtype: torch.dtype, widened: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if widened:
        monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    targets = ["q", "g", "c"]  # PEFT allows lora_bias only where the base layer has a bias
    base, inputs = _base(dtype), _inputs(dtype)
    peft = _peft(base, tmp_path / "bias", 2, targets, lora_bias=True)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, targets, max_rank=4, extras=True)
    assert runtime.layers["q"].wide == widened
    runtime.load(tmp_path / "bias")
    with torch.no_grad():
        _close(model(*inputs), peft(*inputs))
        runtime.set_scale(-1.5)
        _scale_peft(peft, -1.5)
        _close(model(*inputs), peft(*inputs))


@pytest.mark.parametrize("widened", [False, True], ids=["library", "wide"])
def test_dora_lora_dora_swaps_on_a_compiled_model_do_not_recompile(
    tmp_path: Path, widened: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if widened:
        monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    base, inputs = _base(), _inputs()
    oracles = {
        "dora1": _peft(base, tmp_path / "dora1", 1, TARGETS, use_dora=True),
        "lora": _peft(base, tmp_path / "lora", 2, TARGETS),
        "bias": _peft(base, tmp_path / "bias", 3, ["q", "g", "c"], lora_bias=True),
        "dora2": _peft(base, tmp_path / "dora2", 4, TARGETS, use_dora=True),
    }
    with torch.no_grad():
        want = {k: m(*inputs) for k, m in oracles.items()}
        want["none"] = base(*inputs)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, extras=True, slots=2)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        _close(compiled(*inputs), want["none"])  # compiled once, with no adapter
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("dora1", "lora", "dora2", "bias", "dora1"):
                runtime.load(tmp_path / name)
                _close(compiled(*inputs), want[name])
            runtime.load(tmp_path / "lora", slot=1)
            runtime.activate(1)
            _close(compiled(*inputs), want["lora"])
            runtime.activate(0)
            _close(compiled(*inputs), want["dora1"])
            runtime.set_scale(0.5)
            _scale_peft(oracles["dora1"], 0.5)
            _close(compiled(*inputs), oracles["dora1"](*inputs))
            runtime.unload(0)
            _close(compiled(*inputs), want["none"])


def _both_active(base: nn.Module, paths: dict[str, Path], weights: dict[str, float]) -> nn.Module:
    """PEFT with several adapters active together, each weighted (``set_scale`` per layer)."""
    names = list(paths)
    model = PeftModel.from_pretrained(copy.deepcopy(base), paths[names[0]], adapter_name=names[0]).eval()
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, w in weights.items():
                module.set_scale(name, w)
    return model


@pytest.mark.parametrize("mode", ["library", "wide", "merged"])
def test_stacked_with_dora_and_lora_bias_parts_matches_peft_active_together(
    tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DoRA adapter on layers no other part touches, a LoRA-bias adapter and a plain one
    sharing layers (the bias's part is laid first in those rows), against PEFT running the
    three as active adapters: each DoRA factor over its own adapter, each bias times its own
    scale. Re-weighted, and in merged mode (layers with a base bias only take a LoRA bias)."""
    if mode == "wide":
        monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    base, inputs = _base(), _inputs()
    _peft(base, tmp_path / "dora", 1, ["n", "e"], use_dora=True)
    _peft(base, tmp_path / "bias", 2, ["q", "g"], lora_bias=True)
    _peft(base, tmp_path / "plain", 3, ["q", "g", "c"])
    paths = {k: tmp_path / k for k in ("plain", "dora", "bias")}
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, merged=mode == "merged", extras=True)
    assert runtime.layers["q"].wide == (mode == "wide")
    runtime.load(list(paths.values()), scale=[0.7, 1.3, -0.6])
    assert runtime.info().ranks == {"q": 4, "g": 4, "c": 2, "n": 2, "e": 2}
    for weights in ([0.7, 1.3, -0.6], [-1.1, 0.4, 2.0]):
        runtime.set_scale(weights)
        peft = _both_active(base, paths, dict(zip(paths, weights)))
        with torch.no_grad():
            _close(model(*inputs), peft(*inputs))
    with pytest.raises(lorahot.AdapterMismatchError, match=r"  - q \(.*\): part 1 of the stack \(.*\) has DoRA"):
        _peft(base, tmp_path / "dora_q", 4, ["q"], use_dora=True)
        runtime.load([paths["plain"], tmp_path / "dora_q"])


def test_dora_slots_and_activate_match_peft(tmp_path: Path) -> None:
    base, inputs = _base(), _inputs()
    one = _peft(base, tmp_path / "one", 1, TARGETS, use_dora=True)
    two = _peft(base, tmp_path / "two", 5, TARGETS, use_dora=True)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, extras=True, slots=3)
    runtime.load(tmp_path / "one", slot=0)
    runtime.load(tmp_path / "two", slot=2, scale=0.5)  # not active: the factors use its own scale
    _scale_peft(two, 0.5)
    with torch.no_grad():
        _close(model(*inputs), one(*inputs))
        runtime.activate(2)
        _close(model(*inputs), two(*inputs))
        runtime.set_scale(1.0, slot=0)  # inactive slot: the live region keeps slot 2
        _close(model(*inputs), two(*inputs))
        runtime.activate(0)
        _close(model(*inputs), one(*inputs))


@pytest.mark.parametrize("widened", [False, True], ids=["library", "wide"])
def test_a_base_checkpoint_loaded_after_dora_adapters_recomputes_their_factors(
    tmp_path: Path, widened: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PEFT computes a DoRA layer's norm from the base weight it has at each forward. After a
    base checkpoint is loaded into the injected model (``load_state_dict``), the DoRA factors
    of every slot follow the new base: the active slot's and an inactive one's, which is then
    activated. Before, the factors computed at load were kept, and the output was silently
    off (by 0.4 on a float64 Linear, found by an independent audit)."""
    if widened:
        monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    base, inputs = _base(torch.float64), _inputs(torch.float64)
    _peft(base, tmp_path / "one", 1, TARGETS, use_dora=True)
    _peft(base, tmp_path / "two", 5, TARGETS, use_dora=True)
    new = copy.deepcopy(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, extras=True, slots=2)
    runtime.load(tmp_path / "one", slot=0)
    runtime.load(tmp_path / "two", slot=1, scale=0.5)
    model.load_state_dict(new.state_dict())
    one = PeftModel.from_pretrained(copy.deepcopy(new), tmp_path / "one").eval()
    two = PeftModel.from_pretrained(copy.deepcopy(new), tmp_path / "two").eval()
    _scale_peft(two, 0.5)
    with torch.no_grad():
        _close(model(*inputs), one(*inputs))
        runtime.activate(1)
        _close(model(*inputs), two(*inputs))
        # a load into the wrapped module itself, not through the model (the base module's hooks)
        newer = copy.deepcopy(new)
        newer.q.weight.mul_(1.5)
        runtime.layers["q"].base_layer.load_state_dict(newer.q.state_dict())
        two_newer = PeftModel.from_pretrained(copy.deepcopy(newer), tmp_path / "two").eval()
        _scale_peft(two_newer, 0.5)
        _close(model(*inputs), two_newer(*inputs))
    lorahot.eject(model)
    assert not any(type(h).__name__ == "_BaseLoadHook" for h in model.q._load_state_dict_post_hooks.values())


def test_a_copy_of_the_model_refuses_a_base_checkpoint_under_a_dora_adapter(tmp_path: Path) -> None:
    """A deepcopy of an injected model has no runtime to compute its DoRA factors again: a
    base checkpoint loaded into it raises instead of leaving the old factors (found by an
    independent audit), while a copy holding plain LoRA loads it and computes PEFT's output."""
    base, inputs = _base(torch.float64), _inputs(torch.float64)
    _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    _peft(base, tmp_path / "plain", 2, TARGETS)
    new = copy.deepcopy(base)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.2)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, extras=True)
    runtime.load(tmp_path / "dora")
    with pytest.raises(lorahot.UsageError, match="a copy of an injected model"):
        copy.deepcopy(model).load_state_dict(new.state_dict())
    runtime.load(tmp_path / "plain")
    twin = copy.deepcopy(model)
    twin.load_state_dict(new.state_dict())
    want = PeftModel.from_pretrained(copy.deepcopy(new), tmp_path / "plain").eval()
    with torch.no_grad():
        _close(twin(*inputs), want(*inputs))


def _peft_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base-model state-dict keys as a PEFT model names its wrapped layers' (``q.weight`` ->
    ``base_model.model.q.base_layer.weight``); every targeted layer is wrapped."""
    return {f"base_model.model.{k.rsplit('.', 1)[0]}.base_layer.{k.rsplit('.', 1)[1]}": v for k, v in state.items()}


@pytest.mark.parametrize("changed", ["q.weight", "c.bias", "e.weight"])
def test_functional_call_with_other_base_values_for_a_dora_layer_is_refused(tmp_path: Path, changed: str) -> None:
    """``torch.func.functional_call`` with other values for a DoRA layer's base weight or bias:
    PEFT's forward takes the norm of ``m / ||W0 + s B A||`` from the call's weight (and adds the
    call's bias outside the factor), lorahot's factors were computed from the model's own; the
    call computed with them, silently (2.0 off PEFT's output on this model). Refused with a
    typed error naming the layer, every parameter and the output bitwise as before. The same
    values on a slot of plain LoRA compute PEFT's output with them, and the model's own state
    dict (or parameters, as ``torch.func.grad`` passes them) computes what the model does."""
    base, inputs = _base(torch.float64), _inputs(torch.float64)
    peft = _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    plain = _peft(base, tmp_path / "plain", 2, TARGETS)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, extras=True, slots=2)
    runtime.load(tmp_path / "plain", slot=1)
    runtime.load(tmp_path / "dora")
    other = {k: v + 0.25 if k == changed else v for k, v in model.state_dict().items()}
    params = {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}
    with torch.no_grad():
        before = model(*inputs)
        _close(torch.func.functional_call(model, model.state_dict(), inputs), peft(*inputs))
        layer, name = changed.split(".")
        with pytest.raises(lorahot.UsageError, match=rf"^{layer}: torch.func.functional_call .*'s {name} .*DoRA"):
            torch.func.functional_call(model, other, inputs)
        assert torch.equal(model(*inputs), before)
        for k, (tensor, values) in params.items():
            now = model.state_dict(keep_vars=True)[k]
            assert now is tensor and torch.equal(now, values), k
        runtime.unload(0)  # the plain LoRA alone (slot 1), the DoRA adapter gone from every slot
        runtime.activate(1)
        want = torch.func.functional_call(plain, _peft_state(other), inputs)
        _close(torch.func.functional_call(model, other, inputs), want)


def test_functional_call_with_other_values_under_the_base_layer_keys_of_a_dora_layer_is_refused(tmp_path: Path) -> None:
    """``functional_call`` naming the base parameters by the wrapped layers' own keys
    (``q.base_layer.weight``, as ``named_parameters()`` gives them) puts the values past the
    wrapper's check; the forward's base check then computed the factors of that call's weight
    into the arena (PEFT's output for the call) and left them there, so a compiled forward run
    next computed with them (1.19 off its output before the call), silently. Refused as the
    wrapper refuses it: every parameter and buffer, the eager and the compiled output bitwise as
    before; the model's own parameters under those keys compute PEFT's output."""
    base, inputs = _base(torch.float64), _inputs(torch.float64)
    peft = _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    model = copy.deepcopy(base)
    lorahot.inject(model, TARGETS, max_rank=4, extras=True).load(tmp_path / "dora")
    own = {k: v.detach() for k, v in model.named_parameters() if "lora_" not in k}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        before, compiled_before = model(*inputs), compiled(*inputs)
        state = {k: (v, v.detach().clone()) for k, v in [*model.named_parameters(), *model.named_buffers()]}
        with pytest.raises(lorahot.UsageError, match=r"^q: torch.func.functional_call .*'s weight .*DoRA"):
            torch.func.functional_call(model, {k: 1.5 * v for k, v in own.items()}, inputs)
        for k, (tensor, values) in state.items():
            now = dict([*model.named_parameters(), *model.named_buffers()])[k]
            assert now is tensor and torch.equal(now, values), k
        assert torch.equal(compiled(*inputs), compiled_before) and torch.equal(model(*inputs), before)
        _close(torch.func.functional_call(model, own, inputs), peft(*inputs))
    torch._dynamo.reset()


@pytest.mark.parametrize("keys", ["parameters", "state dict"])
def test_vmap_over_stacked_base_parameters_of_a_dora_layer_is_refused(tmp_path: Path, keys: str) -> None:
    """``torch.func.vmap`` of a ``functional_call`` over stacked copies of the base parameters
    (model ensembling, ``torch.func.stack_module_state``): each member's DoRA factor would be the
    norm of its own weight, which lorahot cannot compute under the transform, and the forward
    computed every member with the model's factors, silently (1.32 off PEFT's vmapped output with
    one member's weights times 1.5). Refused with the functional_call refusal naming the layer,
    whichever keys name the parameters (the wrapped layers' ``base_layer`` ones bypass the
    wrapper), every parameter and the output bitwise as before; a plain LoRA model vmapped the
    same way gives PEFT's output, and ``vmap`` over the input alone still runs."""
    base, inputs = _base(torch.float64), _inputs(torch.float64)
    peft = _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    plain = _peft(base, tmp_path / "plain", 2, TARGETS)
    models = []
    for source in ("dora", "plain"):
        model = copy.deepcopy(base)
        lorahot.inject(model, TARGETS, max_rank=4, extras=True).load(tmp_path / source)
        models.append(model)

    def stacked(module: nn.Module) -> dict[str, torch.Tensor]:
        own = dict(module.named_parameters()) if keys == "parameters" else module.state_dict()
        return {k: torch.stack([v.detach(), 1.5 * v.detach()]) for k, v in own.items() if "lora_" not in k}

    def ensemble(module: nn.Module, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.vmap(lambda p: torch.func.functional_call(module, p, inputs))(params)

    dora, lora = models
    params = {k: (v, v.detach().clone()) for k, v in dora.state_dict(keep_vars=True).items()}
    with torch.no_grad():
        before = dora(*inputs)
        with pytest.raises(lorahot.UsageError, match=r"^q: torch.func.functional_call .*'s weight .*DoRA"):
            ensemble(dora, stacked(dora))
        assert torch.equal(dora(*inputs), before)
        for k, (tensor, values) in params.items():
            now = dora.state_dict(keep_vars=True)[k]
            assert now is tensor and torch.equal(now, values), k
        peft_params = {
            k: torch.stack([v.detach(), 1.5 * v.detach()]) for k, v in plain.named_parameters() if "lora_" not in k
        }
        _close(ensemble(lora, stacked(lora)), ensemble(plain, peft_params))
        x = torch.stack([inputs[0], 2 * inputs[0]])
        _close(torch.func.vmap(lambda z: dora(z, *inputs[1:]))(x), torch.func.vmap(lambda z: peft(z, *inputs[1:]))(x))


def test_plain_lora_after_dora_is_bitwise_a_fresh_load(tmp_path: Path) -> None:
    base, inputs = _base(), _inputs()
    _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    _peft(base, tmp_path / "lora", 2, TARGETS)
    swapped, fresh = copy.deepcopy(base), copy.deepcopy(base)
    runtime = lorahot.inject(swapped, TARGETS, max_rank=4, extras=True)
    runtime.load(tmp_path / "dora")
    runtime.load(tmp_path / "lora")
    lorahot.inject(fresh, TARGETS, max_rank=4, extras=True).load(tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(swapped(*inputs), fresh(*inputs))
    runtime.unload()
    with torch.no_grad():
        assert torch.equal(swapped(*inputs), base(*inputs))
    extras = runtime.buffers.arenas[0].E
    assert torch.equal(
        extras, lorahot.inject(copy.deepcopy(base), TARGETS, max_rank=4, extras=True).buffers.arenas[0].E
    )


def _buffers(runtime: lorahot.LoraRuntime) -> list[torch.Tensor]:
    return [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]


@pytest.mark.parametrize("slots", [1, 2])
def test_host_cache_writes_bitwise_what_a_file_load_writes(tmp_path: Path, slots: int) -> None:
    base = _base()
    _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    _peft(base, tmp_path / "bias", 3, ["q", "g", "c"], lora_bias=True)
    runtimes = [lorahot.inject(copy.deepcopy(base), TARGETS, max_rank=4, extras=True, slots=slots) for _ in range(2)]
    for name in ("dora", "bias", "dora"):
        runtimes[0].load(tmp_path / name, scale=0.7)
        runtimes[1].preload(tmp_path / name)
        runtimes[1].load(tmp_path / name, scale=0.7)
        assert all(torch.equal(t, u) for t, u in zip(_buffers(runtimes[0]), _buffers(runtimes[1])))


def test_failed_load_changes_nothing_including_the_extras(tmp_path: Path) -> None:
    base, inputs = _base(), _inputs()
    _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, extras=True, slots=2)
    runtime.load(tmp_path / "dora")
    runtime.load(tmp_path / "dora", slot=1, scale=0.3)
    before, out = _buffers(runtime), model(*inputs).detach()
    tensors = lorahot.read_adapter(tmp_path / "dora")
    bad = {
        "wrong length": {"base_model.model.q.lora_magnitude_vector": torch.ones(7)},
        "nan": {"base_model.model.c.lora_magnitude_vector": torch.full((1, 4, 1, 1), float("nan"))},
        "inf bias": {"base_model.model.q.lora_B.bias": torch.full((6,), float("inf"))},
    }
    from safetensors.torch import load_file

    good = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    assert tensors.modules["q"].magnitude is not None
    for edit in bad.values():
        for slot in (0, 1):
            with pytest.raises(lorahot.LoraError):
                runtime.load(good | edit, slot=slot)
            with pytest.raises(lorahot.LoraError):
                runtime.preload(good | edit)
    assert all(torch.equal(t, u) for t, u in zip(before, _buffers(runtime)))
    assert torch.equal(model(*inputs), out)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_magnitude_or_lora_bias_of_two_dimensions_is_refused(tmp_path: Path, merged: bool) -> None:
    """A DoRA magnitude or LoRA bias holds one value per output channel along one dimension
    (PEFT's ``[out]``, a conv's ``[1, out, 1, 1]``): one of 6 values laid out ``[2, 3]`` says
    no order of the channels (PEFT refuses its shape), and lorahot took it flattened. Now
    refused naming the module and the shape, every parameter and buffer bitwise unchanged; a
    ``[1, 6]`` one (one dimension) still loads as the ``[6]`` it holds."""
    from safetensors.torch import load_file

    base, inputs = _base(), _inputs()
    _peft(base, tmp_path / "dora", 1, ["q"], use_dora=True)
    _peft(base, tmp_path / "bias", 2, ["q"], lora_bias=True)
    dora = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    bias = load_file(tmp_path / "bias" / "adapter_model.safetensors")
    magnitude, lora_bias = "base_model.model.q.lora_magnitude_vector", "base_model.model.q.lora_B.bias"
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["q"], max_rank=4, merged=merged, extras=not merged)
    before = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    for adapter, key in ((dora, magnitude), (bias, lora_bias)):
        which = "DoRA magnitude vector" if key == magnitude else "LoRA bias"
        with pytest.raises(
            lorahot.AdapterMismatchError,
            match=rf"q \(.*\): {which} has shape \(2, 3\), expected 6 values \(one per output channel\) along one",
        ):
            runtime.load(adapter | {key: adapter[key].reshape(2, 3)})
    state = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(state[k], v) for k, v in before.items())
    runtime.load(dora)
    with torch.no_grad():
        want = model(*inputs)
        runtime.load(dora | {magnitude: dora[magnitude].reshape(1, 6)})
        assert torch.equal(model(*inputs), want)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_module_with_a_dora_magnitude_and_a_lora_bias_is_refused(tmp_path: Path, merged: bool) -> None:
    """PEFT refuses ``use_dora`` with ``lora_bias`` (its ``LoraConfig`` raises): its DoRA forward
    would scale the bias by the DoRA factor and its merge adds it unscaled, so a module carrying
    both (a file with ``lora_magnitude_vector`` and ``lora_B.bias``, with or without such a
    config) has no one result. It loaded, at lorahot's choice of the two; now refused naming the
    module, every parameter and buffer bitwise unchanged."""
    import json

    from safetensors.torch import load_file, save_file

    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        LoraConfig(r=2, target_modules=["q"], use_dora=True, lora_bias=True)
    base = _base()
    _peft(base, tmp_path / "dora", 1, ["q"], use_dora=True)
    _peft(base, tmp_path / "bias", 2, ["q"], lora_bias=True)
    both = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    both["base_model.model.q.lora_B.bias"] = load_file(tmp_path / "bias" / "adapter_model.safetensors")[
        "base_model.model.q.lora_B.bias"
    ]
    (tmp_path / "both").mkdir()
    save_file(both, tmp_path / "both" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text()) | {"lora_bias": True}
    (tmp_path / "both" / "adapter_config.json").write_text(json.dumps(config))
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["q"], max_rank=4, merged=merged, extras=not merged)
    before = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    for adapter in (both, tmp_path / "both"):
        with pytest.raises(
            lorahot.AdapterMismatchError,
            match=r"q \(.*\): both a DoRA magnitude and a LoRA bias, which PEFT refuses to combine",
        ):
            runtime.load(adapter)
    state = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(state[k], v) for k, v in before.items())


def test_merged_mode_folds_dora_and_lora_bias_as_peft_computes(tmp_path: Path) -> None:
    base, inputs = _base(), _inputs()
    oracles = {
        "dora": _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True),
        "bias": _peft(base, tmp_path / "bias", 2, ["q", "g", "c"], lora_bias=True),
        "lora": _peft(base, tmp_path / "lora", 3, TARGETS),
    }
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, merged=True, slots=2)
    with torch.no_grad():
        for name in ("dora", "bias", "lora", "dora"):
            runtime.load(tmp_path / name)
            _close(model(*inputs), oracles[name](*inputs))
        runtime.set_scale(0.5)
        _scale_peft(oracles["dora"], 0.5)
        _close(model(*inputs), oracles["dora"](*inputs))
        runtime.load(tmp_path / "bias", slot=1)
        runtime.activate(1)
        _close(model(*inputs), oracles["bias"](*inputs))
    lorahot.eject(model)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), base.state_dict().values()))


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_dora_at_weight_zero_keeps_its_magnitude_rescale_as_peft_does(tmp_path: Path, merged: bool) -> None:
    """At weight 0 PEFT still scales each output channel by m / |W0|: a DoRA adapter is not
    the base model there, in merged mode too (set_scale(0) and load(scale=0) alike)."""
    base, inputs = _base(), _inputs()
    oracle = _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    _scale_peft(oracle, 0.0)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, merged=merged, extras=True)
    with torch.no_grad():
        want = oracle(*inputs)
        assert not torch.allclose(want, base(*inputs))
        runtime.load(tmp_path / "dora", scale=0.0)
        _close(model(*inputs), want)
        runtime.set_scale(1.0)
        runtime.set_scale(0.0)
        _close(model(*inputs), want)


def test_merged_mode_refuses_a_lora_bias_on_a_layer_without_bias(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 6, bias=False))
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    tensors = {
        "base_model.model.0.lora_A.weight": torch.randn(2, 8),
        "base_model.model.0.lora_B.weight": torch.randn(6, 2),
        "base_model.model.0.lora_B.bias": torch.randn(6),
    }
    with pytest.raises(lorahot.AdapterMismatchError, match=r"0 \(.*\): merged mode folds the LoRA bias"):
        runtime.load(tensors)
    lorahot.inject(nn.Sequential(nn.Linear(8, 6, bias=False)), ["0"], max_rank=4, extras=True).load(
        tensors
    )  # unmerged: fine


def test_extras_false_refuses_dora_and_bias_and_computes_plain_lora_alike(tmp_path: Path) -> None:
    base, inputs = _base(), _inputs()
    _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    _peft(base, tmp_path / "bias", 1, ["q"], lora_bias=True)
    _peft(base, tmp_path / "lora", 2, TARGETS)
    plain, full = copy.deepcopy(base), copy.deepcopy(base)
    runtime = lorahot.inject(plain, TARGETS, max_rank=4)  # extras=False is the default
    for name in ("dora", "bias"):
        with pytest.raises(lorahot.AdapterMismatchError, match=r"injected with extras=False \(the default\)"):
            runtime.load(tmp_path / name)
        plan = lorahot.plan_targets([tmp_path / name, tmp_path / "lora"])
        assert plan.extras and plan.inject_options() == {"max_rank": plan.max_rank, "extras": True}
    assert not lorahot.plan_targets(tmp_path / "lora").extras
    runtime.load(tmp_path / "lora")
    lorahot.inject(full, TARGETS, max_rank=4, extras=True).load(tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(plain(*inputs), full(*inputs))  # float32: the extras change no bit
    with pytest.raises(lorahot.UsageError, match=r"extras='yes' must be True or False"):
        lorahot.inject(copy.deepcopy(base), TARGETS, max_rank=4, extras="yes")


def test_diffusers_naming_loads_dora_and_bias_as_peft_naming_does(tmp_path: Path) -> None:
    """diffusers saves PEFT's roles under a component prefix (``unet.<module>.lora_magnitude_vector``)."""
    from safetensors.torch import load_file

    base, inputs = _base(), _inputs()
    holder, twin = nn.Module(), nn.Module()
    holder.unet, twin.unet = copy.deepcopy(base), copy.deepcopy(base)
    for name, config in (("dora", {"use_dora": True}), ("bias", {"lora_bias": True})):
        _peft(base, tmp_path / name, 1, ["q", "g", "c"], **config)
        peft_named = load_file(tmp_path / name / "adapter_model.safetensors")
        diffusers_named = {"unet." + k.removeprefix("base_model.model."): v for k, v in peft_named.items()}
        assert lorahot.read_adapter(diffusers_named).format == "diffusers"
        lorahot.inject(holder, ["q", "g", "c"], max_rank=4, extras=True).load(diffusers_named)
        lorahot.inject(twin.unet, ["q", "g", "c"], max_rank=4, extras=True).load(peft_named)
        with torch.no_grad():
            assert torch.equal(holder.unet(*inputs), twin.unet(*inputs))
        lorahot.eject(holder)
        lorahot.eject(twin.unet)


def test_dora_on_a_grouped_conv_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True)
    tensors = {
        "base_model.model.0.lora_A.weight": torch.randn(2, 4, 3, 3),
        "base_model.model.0.lora_B.weight": torch.randn(4, 1, 1, 1),
        "base_model.model.0.lora_magnitude_vector": torch.ones(1, 4, 1, 1),
    }
    with pytest.raises(lorahot.AdapterMismatchError, match=r"DoRA on a conv with groups=2 is not supported"):
        runtime.load(tensors)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_diff_b_beside_a_lora_with_dora_scale_is_refused(merged: bool) -> None:
    """ComfyUI, the tool that reads a LoRA with a ``dora_scale`` and a ``.diff_b`` beside it, adds
    the ``.diff_b`` to the bias on its own, outside the weight decomposition; lorahot ran it as the
    LoRA's bias, which DoRA scales by its factor per output channel (``b0 + f * diff_b``): a
    bias 0.51 off ComfyUI's here, unmerged and merged alike. Refused naming both keys, nothing
    changed; skipped with ``strict=False``; without the ``.diff_b`` the file loads."""
    g = torch.Generator().manual_seed(0)
    key = "diffusion_model.blocks.0.q"
    tensors = {
        f"{key}.lora_down.weight": 0.3 * torch.randn(2, 8, generator=g, dtype=torch.float64),
        f"{key}.lora_up.weight": 0.3 * torch.randn(8, 2, generator=g, dtype=torch.float64),
        f"{key}.alpha": torch.tensor(1.0),
        f"{key}.dora_scale": 1 + 0.3 * torch.randn(8, 1, generator=g, dtype=torch.float64),
        f"{key}.diff_b": 0.3 * torch.randn(8, generator=g, dtype=torch.float64),
    }
    other = {
        "diffusion_model.blocks.0.k.lora_down.weight": torch.randn(2, 8, generator=g, dtype=torch.float64),
        "diffusion_model.blocks.0.k.lora_up.weight": torch.randn(8, 2, generator=g, dtype=torch.float64),
    }
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"blocks": nn.ModuleList([nn.ModuleDict({"q": nn.Linear(8, 8), "k": nn.Linear(8, 8)})])}
    ).double()
    before = copy.deepcopy(model.state_dict())
    runtime = lorahot.inject(model, ["q", "k"], max_rank=2, merged=merged, extras=not merged)
    with pytest.raises(
        lorahot.UnknownFormatError,
        match=rf"(?s)- {key}: {key}\.diff_b beside a LoRA with weight decomposition \({key}\.dora_scale\): ComfyUI "
        r"adds the \.diff_b to the layer's bias on its own, outside the weight decomposition.*\(factor - 1\) \* diff_b",
    ):
        runtime.load(tensors | other)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and runtime.info() is None
    assert set(runtime.load(tensors | other, strict=False).skipped) == set(tensors)
    without = {k: v for k, v in tensors.items() if not k.endswith("diff_b")}
    assert runtime.load(without).ranks == {"blocks.0.q": 2}


# -- GPU: the fused kernel (<= 16 rows) and the wide GEMM (many rows), compiled ----------------


class _Linears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(256, 128)
        self.n = nn.Linear(128, 256, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.n(self.q(x))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_fused_and_wide_paths_match_peft_through_dora_swaps(tmp_path: Path, mode: str) -> None:
    torch.manual_seed(0)
    base = _Linears().cuda().to(torch.bfloat16)
    oracle_base = copy.deepcopy(base).float()  # the same weights, computed in float32
    oracles = {
        "dora1": _peft(oracle_base, tmp_path / "dora1", 1, ["q", "n"], use_dora=True),
        "lora": _peft(oracle_base, tmp_path / "lora", 2, ["q", "n"]),
        "bias": _peft(oracle_base, tmp_path / "bias", 3, ["q"], lora_bias=True),
        "dora2": _peft(oracle_base, tmp_path / "dora2", 4, ["q", "n"], use_dora=True),
    }
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["q", "n"], max_rank=8, extras=True)
    assert all(layer.fused and layer.wide for layer in runtime.layers.values())
    inputs = [
        torch.randn(rows, 256, device="cuda", generator=torch.Generator("cuda").manual_seed(rows)) for rows in (4, 512)
    ]
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    with torch.no_grad(), torch._inductor.config.patch("triton.cudagraph_support_input_mutation", False):
        for _ in range(3):
            for x in inputs:
                compiled(x.bfloat16()).clone()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ("dora1", "lora", "dora2", "bias", "dora1"):
                runtime.load(tmp_path / name)
                for x in inputs:
                    want = oracles[name](x)
                    got = compiled(x.bfloat16()).float()
                    err = float((got - want).norm() / want.norm())
                    assert err < 2e-2, (name, x.shape[0], err)
            runtime.set_scale(0.5)
            _scale_peft(oracles["dora1"], 0.5)
            for x in inputs:
                want, got = oracles["dora1"](x), compiled(x.bfloat16()).float()
                assert float((got - want).norm() / want.norm()) < 2e-2
