"""An unmerged DoRA layer's eager forward after its base weight or bias was written in place.

PEFT's DoRA forward computes ``f = m / ||W0 + s B A||`` from the weight it reads at each call;
lorahot computes ``f`` when the adapter, its scale or the base changes. A base written in place
(an optimizer's step on the base, ``weight.mul_``, ``model.apply``) used to be seen only by the
next runtime call: the forwards before it computed with the factor of the weight before (49.5
off PEFT after one SGD step of lr 0.5, 0.64 after ``weight.mul_(1.5)``). An eager forward of a
layer holding a DoRA adapter now compares its base's version counters and addresses first and has
the runtime compute its factors again where they moved; compiled graphs are unchanged (no new
guard, the factors of the last runtime call), and layers without DoRA compare nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch import nn

import lorahot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CONFIG = {"r": 4, "lora_alpha": 8, "use_dora": True}


def _base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6)).double()
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).double()


def _input(kind: str, rows: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    shape = (rows, 8) if kind == "linear" else (rows, 3, 6, 6)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _peft(
    base: nn.Module, seed: int, targets: tuple[str, ...] = ("0", "2")
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A PEFT DoRA model of a copy of ``base`` (random B and magnitudes) and its adapter's tensors."""
    torch.manual_seed(seed)
    config = LoraConfig(**CONFIG, target_modules=list(targets), init_lora_weights=False)  # type: ignore[arg-type]
    model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    return model, {f"base_model.model.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _injected(base: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, lorahot.LoraRuntime]:
    """A copy of ``base`` with lorahot on its two linears (or convs), extras on, the adapter loaded."""
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, extras=True)
    runtime.load(tensors, config=CONFIG)
    return model, runtime


def _bases(model: nn.Module) -> list[nn.Module]:
    """The base modules the adapters wrap, in model order (lorahot's and PEFT's alike)."""
    return [m.base_layer for m in model.modules() if "base_layer" in m._modules]


def _sgd(models: list[nn.Module], x: torch.Tensor) -> None:
    """One SGD step (lr 0.5) of every base weight and bias, with PEFT's gradients for all."""
    oracle = models[-1]
    params = [p for m in _bases(oracle) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(oracle(x).square().sum(), params)
    for model in models:
        with torch.no_grad():
            for p, g in zip((p for m in _bases(model) for p in m.parameters()), grads):
                p.sub_(0.5 * g)


def _mul(models: list[nn.Module], x: torch.Tensor) -> None:
    with torch.no_grad():
        for model in models:
            _bases(model)[0].weight.mul_(1.5)


def _apply(models: list[nn.Module], x: torch.Tensor) -> None:
    def shift(m: nn.Module) -> None:
        if any(m is b for b in bases):
            m.weight.mul_(0.75)
            m.bias.add_(0.25)

    with torch.no_grad():
        for model in models:
            bases = _bases(model)
            model.apply(shift)


WRITES: dict[str, Callable[[list[nn.Module], torch.Tensor], None]] = {"sgd": _sgd, "mul_": _mul, "apply": _apply}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("write", list(WRITES))
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_an_eager_forward_after_a_base_write_computes_what_peft_computes(kind: str, write: str, device: str) -> None:
    """Float64, against PEFT's DoRA forward on the same written weights, before any runtime call
    (49.5 off after the SGD step before, 0.64 after ``mul_``); the factors in the slot's own
    region are those a runtime call computes (bitwise). On CUDA too: the check reads the version
    counters of the device's tensors, and the recompute runs there."""
    base = _base(kind).to(device)
    oracle, tensors = _peft(base, seed=3)
    model, runtime = _injected(base, tensors)
    x = _input(kind).to(device)
    with torch.no_grad():
        assert _diff(model(x), oracle(x)) < 1e-12
        before = oracle(x)
    WRITES[write]([model, oracle], x)
    with torch.no_grad():
        assert _diff(oracle(x), before) > 1e-2  # the write does change PEFT's output
        assert _diff(model(x), oracle(x)) < 1e-12
        factors = [a.E.clone() for a in runtime.buffers.arenas]
        runtime.set_scale(1.0)  # a runtime call computes the same factors
        assert all(torch.equal(f, a.E) for f, a in zip(factors, runtime.buffers.arenas))
        assert _diff(model(x), oracle(x)) < 1e-12


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_every_slot_holding_dora_follows_the_base_the_forward_saw(kind: str) -> None:
    """Two slots, each a DoRA adapter: after ``mul_``, the forward of slot 0 computes every
    slot's factors again, so slot 1 activated next (whose call sees no base moved any more) and a
    per-row routing over both compute what PEFT computes with each adapter."""
    base = _base(kind)
    (oracle0, t0), (oracle1, t1) = _peft(base, seed=3), _peft(base, seed=4)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, extras=True, slots=2)
    runtime.load(t0, slot=0, config=CONFIG)
    runtime.load(t1, slot=1, config=CONFIG)
    runtime.activate(0)
    x = _input(kind, rows=4)
    _mul([model, oracle0, oracle1], x)
    with torch.no_grad():
        assert _diff(model(x), oracle0(x)) < 1e-12
        runtime.activate(1)
        assert _diff(model(x), oracle1(x)) < 1e-12
        runtime.activate([0, 1, 1, 0])
        _apply([model, oracle0, oracle1], x)
        out = model(x)
        want = torch.stack(
            [oracle0(x[i : i + 1])[0] if s == 0 else oracle1(x[i : i + 1])[0] for i, s in enumerate([0, 1, 1, 0])]
        )
        assert _diff(out, want) < 1e-12


def test_layers_without_dora_compare_nothing_and_merged_mode_is_unchanged() -> None:
    """A plain LoRA layer, a layer whose DoRA adapter was unloaded or replaced by a plain one, and
    every layer in merged mode keep :attr:`_dora_seen` None (one attribute test per forward);
    merged, a written weight's forward is the base module's, the arena untouched."""
    base = _base("linear")
    _, tensors = _peft(base, seed=3)
    plain = {k: v for k, v in tensors.items() if "magnitude" not in k}
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, extras=True, slots=2)
    layers = [model[0], model[2]]
    runtime.load(plain, config={**CONFIG, "use_dora": False})
    assert all(layer._dora_seen is None for layer in layers)
    runtime.load(tensors, slot=1, config=CONFIG)
    assert all(layer._dora_seen is not None for layer in layers)  # an inactive slot's too
    runtime.load(plain, slot=1, config={**CONFIG, "use_dora": False})
    assert all(layer._dora_seen is None for layer in layers)
    runtime.load(tensors, slot=1, config=CONFIG)
    runtime.unload(1)
    assert all(layer._dora_seen is None for layer in layers)

    merged = copy.deepcopy(base)
    runtime = lorahot.inject(merged, ["0", "2"], max_rank=4, merged=True)
    runtime.load(tensors, config=CONFIG)
    assert all(layer._dora_seen is None for layer in (merged[0], merged[2]))
    arenas = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
    x = _input("linear")
    with torch.no_grad():
        merged[0].base_layer.weight.mul_(1.5)
        assert torch.equal(merged(x), merged[2].base_layer(torch.relu(merged[0].base_layer(x))))
    assert all(
        torch.equal(t, u) for t, u in zip(arenas, (t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)))
    )


def test_a_compiled_forward_keeps_the_factors_of_the_last_runtime_call_without_recompiling() -> None:
    """Compiled, no new guard: DoRA and plain swaps and a base written in place run one graph
    under ``error_on_recompile=True``, the compiled forward with the factors of the last runtime
    call (PEFT's output after the next one); the negative control, another input dtype, does
    recompile."""
    base = _base("linear")
    (oracle, t0), (_, t1) = _peft(base, seed=3), _peft(base, seed=4)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, extras=True)
    runtime.load(t0, config=CONFIG)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    x = _input("linear")
    with torch.no_grad():
        assert _diff(compiled(x), oracle(x)) < 1e-12
        with torch._dynamo.config.patch(error_on_recompile=True):
            runtime.load(t1, config=CONFIG)
            compiled(x)
            runtime.load({k: v for k, v in t0.items() if "magnitude" not in k}, config={**CONFIG, "use_dora": False})
            compiled(x)
            runtime.load(t0, config=CONFIG)
            stale = compiled(x)
            _mul([model, oracle], x)
            assert torch.equal(compiled(x), compiled(x))
            assert _diff(compiled(x), oracle(x)) > 1e-3  # compiled: the factors as of the last runtime call
            runtime.set_scale(1.0)
            assert _diff(compiled(x), oracle(x)) < 1e-12
            assert _diff(stale, oracle(x)) > 1e-3
            with pytest.raises(torch._dynamo.exc.RecompileError):  # negative control
                compiled(x.float())
    torch._dynamo.reset()


def _trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    """The base layers' weights and biases, trained (PEFT freezes them)."""
    params = [p for name, p in model.named_parameters() if "lora_" not in name]  # in model order
    for p in params:
        p.requires_grad_(True)
    return params


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_training_the_base_under_a_dora_adapter_follows_peft_step_by_step(kind: str) -> None:
    """SGD on the base weights and biases with a DoRA adapter on top, three steps: each
    forward's check computes the factors of the weights the last step wrote, and its backward
    runs (the recompute moves no version counter that the layers' saved extras share: the
    first layer, injected without an adapter, saved its own before the DoRA layers' checks ran),
    with PEFT's loss and gradients."""
    first = nn.Linear(8, 8) if kind == "linear" else nn.Conv2d(3, 3, 1)
    base = nn.Sequential(first.double(), nn.ReLU(), *_base(kind))
    oracle, tensors = _peft(base, seed=3, targets=("2", "4"))
    model = copy.deepcopy(base)
    lorahot.inject(model, ["0", "2", "4"], max_rank=4, extras=True).load(tensors, config=CONFIG)
    assert model[0]._dora_seen is None and model[2]._dora_seen is not None
    runs = [(m, _trainable(m)) for m in (model, oracle)]
    optimizers = [torch.optim.SGD(params, lr=0.05) for _, params in runs]
    x = _input(kind)
    for _ in range(3):
        losses, grads = [], []
        for (m, params), optimizer in zip(runs, optimizers):
            optimizer.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in params])
            optimizer.step()
        assert _diff(*losses) < 1e-10
        assert all(_diff(g, h) < 1e-10 for g, h in zip(*grads))


def test_a_pending_backward_computes_with_the_factor_of_its_own_forward() -> None:
    """A forward whose backward has not run, a base write, a second forward (whose check computes
    the factors again): the first backward gives the first forward's gradients, as PEFT's does
    (its norm is a tensor of that forward), not the new factor's. Under activation checkpointing,
    reentrant or not, the recompute reads the base as it is then and computes its factors again,
    as PEFT's does: the input's gradients equal PEFT's."""
    base = _base("linear")
    oracle, tensors = _peft(base, seed=3)
    model, _ = _injected(base, tensors)
    x = _input("linear")
    grads = []
    for m in (model, oracle):
        params = _trainable(m)
        pending = m(x).square().sum()
        _mul([m], x)  # the first layer's weight, which the first forward did not save (x needs no gradient)
        m(x)
        grads.append(torch.autograd.grad(pending, params))
    assert all(_diff(g, h) < 1e-10 for g, h in zip(*grads))

    from torch.utils.checkpoint import checkpoint

    x.requires_grad_(True)
    for reentrant in (False, True):
        grads = []
        for m in (model, oracle):
            x.grad = None
            out = checkpoint(m, x, use_reentrant=reentrant).square().sum()
            _mul([m], x)
            out.backward()
            grads.append(x.grad.clone())
        assert _diff(*grads) < 1e-10


def test_a_copy_of_the_model_computes_with_its_copied_factors_and_leaves_the_original_alone() -> None:
    """A deep copy's layers have no runtime: a base write on the copy is not computed again (its
    forward stops comparing), and the original's buffers and parameters stay bitwise as they were."""
    base = _base("linear")
    _, tensors = _peft(base, seed=3)
    model, runtime = _injected(base, tensors)
    before = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    arenas = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
    twin = copy.deepcopy(model)
    x = _input("linear")
    with torch.no_grad():
        want = twin(x)
        twin[0].base_layer.weight.mul_(1.0)  # a write that changes no value
        assert torch.equal(twin(x), want)
        assert twin[0]._dora_seen is None
    assert all(torch.equal(v, before[k]) for k, v in [*model.named_parameters(), *model.named_buffers()])
    assert all(
        torch.equal(t, u) for t, u in zip(arenas, (t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)))
    )


def test_a_forward_that_sees_a_moved_base_waits_for_a_runtime_call_under_way() -> None:
    """The recompute holds the runtime's call lock: a forward on another thread while a call holds
    it (here the lock itself, held by a third thread) writes nothing until the call returns, then
    computes PEFT's output."""
    import threading

    base = _base("linear")
    oracle, tensors = _peft(base, seed=3)
    model, runtime = _injected(base, tensors)
    x = _input("linear")
    _mul([model, oracle], x)
    held, release = threading.Event(), threading.Event()

    def call() -> None:
        with runtime._guard.calls:
            held.set()
            release.wait(10)

    outs: list[torch.Tensor] = []

    def forward() -> None:
        with torch.no_grad():
            outs.append(model(x))

    holder = threading.Thread(target=call)
    holder.start()
    assert held.wait(10)
    extras = [a.E.clone() for a in runtime.buffers.arenas]
    worker = threading.Thread(target=forward)
    worker.start()
    worker.join(0.3)
    assert worker.is_alive() and not outs  # waiting for the call
    assert all(torch.equal(e, a.E) for e, a in zip(extras, runtime.buffers.arenas))
    release.set()
    holder.join(10)
    worker.join(10)
    with torch.no_grad():
        assert _diff(outs[0], oracle(x)) < 1e-12


@pytest.mark.parametrize("mode", ["autocast", "inference_mode"])
def test_factors_a_forward_computes_are_a_runtime_calls_bitwise(mode: str) -> None:
    """A forward under ``torch.autocast`` (bfloat16 on the CPU) or ``torch.inference_mode`` that
    computes the factors again computes them as ``set_scale`` does, bitwise: autocast is off for
    the recompute (under bfloat16 autocast its matmul ran in bfloat16, and the factors differed)."""
    base = _base("linear").float()
    _, tensors = _peft(base, seed=3)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, extras=True)
    runtime.load({k: v.float() for k, v in tensors.items()}, config=CONFIG)
    x = _input("linear").float()
    with torch.no_grad():
        model[0].base_layer.weight.mul_(1.5)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else torch.inference_mode()
    with context:
        model(x)
    extras = [a.E.clone() for a in runtime.buffers.arenas]
    runtime.set_scale(1.0)
    assert all(torch.equal(e, a.E) for e, a in zip(extras, runtime.buffers.arenas))


def _routed_peft_grads(oracles: tuple[nn.Module, ...], route: list[int], x: torch.Tensor) -> list[torch.Tensor]:
    """PEFT's gradients of the base weights and biases for a batch whose row ``i`` runs adapter
    ``route[i]`` (``oracles[k]`` holding adapter ``k``), through the sequence of
    :func:`test_a_backward_pending_from_a_compiled_forward_computes_with_the_factor_of_its_own_forward`."""
    total: list[torch.Tensor] = []
    for k, oracle in enumerate(oracles):
        params = _trainable(oracle)
        rows = [i for i, slot in enumerate(route) if slot == k]
        pending = oracle(x[rows]).square().sum()
        _mul([oracle], x)
        oracle(x)
        grads = torch.autograd.grad(pending, params)
        total = list(grads) if not total else [t + g for t, g in zip(total, grads)]
    return total


def _pending_backward_off_peft(backend: str, routed: bool, settings: dict[str, Any]) -> float:
    """How far from PEFT's gradients (float64) the base weights and biases get from a compiled
    forward whose backward has not run, across a base write and an eager forward (whose check
    computes the factors again into the arena); the compile runs under AOTAutograd's
    ``settings`` (``torch._functorch.config``)."""
    base = _base("linear")
    (oracle0, t0), (oracle1, t1) = _peft(base, seed=3), _peft(base, seed=4)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, extras=True, slots=2)
    runtime.load(t0, slot=0, config=CONFIG)
    runtime.load(t1, slot=1, config=CONFIG)
    route = [0, 1, 1, 0] if routed else [0, 0, 0, 0]
    runtime.activate(route if routed else 0)
    x = _input("linear", rows=4)
    torch._dynamo.reset()
    params = _trainable(model)
    with torch._functorch.config.patch(settings):
        pending = torch.compile(model, backend=backend)(x).square().sum()
    _mul([model], x)  # the first layer's weight, which the forward did not save (x needs no gradient)
    model(x)
    got = torch.autograd.grad(pending, params)
    want = _routed_peft_grads((oracle0, oracle1) if routed else (oracle0,), route, x)
    torch._dynamo.reset()
    return max(_diff(g, h) for g, h in zip(got, want))


@pytest.mark.parametrize("routed", [False, True], ids=["one slot", "per-row routing"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_a_backward_pending_from_a_compiled_forward_computes_with_the_factor_of_its_own_forward(
    backend: str, routed: bool
) -> None:
    """A compiled forward whose backward has not run, a base write, an eager forward (whose check
    computes the factors again into the arena), then the compiled forward's backward: PEFT's
    gradients in float64. The compiled graph used to save views of the arena's extras (or, with
    AOTAutograd's partitioner, the arena itself, recomputing a clone in the backward), so its
    backward read the new factor: 3.0-3.3 off on the first layer's weight with every backend. A
    per-row routing's extras are indexed per row, which the partitioner may recompute too."""
    assert _pending_backward_off_peft(backend, routed, {}) < 1e-10


PARTITIONER_SETTINGS = {
    "aggressive_recomputation": {"aggressive_recomputation": True},
    "no_allowlist": {"ban_recompute_not_in_allowlist": False},
    "memory_budget_0.5": {"activation_memory_budget": 0.5},
}


#: each setting, one slot and per-row routing, under ``aot_eager`` and under inductor's
#: partitioning: ``aot_eager_decomp_partition`` (inductor's decompositions and its partitioner,
#: the graphs inductor would be given, without their code), and inductor itself for
#: ``aggressive_recomputation`` with one slot (whose graphs are those of the default settings:
#: the copy saved, nothing else recomputed; inductor's code for the per-row routing's graphs is
#: checked by
#: :func:`test_a_backward_pending_from_a_compiled_forward_computes_with_the_factor_of_its_own_forward`)
PARTITIONER_CASES = [
    pytest.param(setting, backend, routed, id=f"{setting}-{backend}-{'per-row routing' if routed else 'one slot'}")
    for setting in PARTITIONER_SETTINGS
    for routed in (False, True)
    for backend in (
        "aot_eager",
        "inductor" if setting == "aggressive_recomputation" and not routed else "aot_eager_decomp_partition",
    )
]


@pytest.mark.parametrize(("setting", "backend", "routed"), PARTITIONER_CASES)
def test_the_saved_copy_of_the_extras_is_never_recomputed_whatever_the_partitioner_may_recompute(
    setting: str, backend: str, routed: bool
) -> None:
    """The sequence of the test above under the partitioner's settings that let it recompute
    operators outside its allowlist: ``aggressive_recomputation`` (or the allowlist turned off)
    recomputed ``lorahot::saved_copy`` in the backward from the arena, which now held the new
    factor (2.96 off PEFT's gradient one slot, 1.69 routed); the copy is now marked must-save,
    which every setting honours, and the backward gets PEFT's gradients in float64. What
    recomputes is the partitioner's choice, made on the graphs before inductor generates code:
    each setting runs under ``aot_eager`` and under inductor's decompositions and partitioner
    (:data:`PARTITIONER_CASES`)."""
    assert _pending_backward_off_peft(backend, routed, PARTITIONER_SETTINGS[setting]) < 1e-10


def _aot_graphs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.fx.GraphModule]:
    """The forward and backward graphs AOTAutograd's min-cut partitioner gives ``model``'s
    compiled forward and backward of ``x``, under the default settings."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs: dict[str, torch.fx.GraphModule] = {}

    def keep(name: str) -> Callable[..., Any]:
        def compiler(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
            graphs[name] = gm
            return make_boxed_func(gm.forward)  # type: ignore[no-any-return]

        return compiler

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
        return aot_module_simplified(  # type: ignore[no-any-return]
            gm,
            inputs,
            fw_compiler=keep("forward"),
            bw_compiler=keep("backward"),
            partition_fn=min_cut_rematerialization_partition,
        )

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    torch._dynamo.reset()
    return graphs


@pytest.mark.parametrize("routed", [False, True], ids=["one slot", "per-row routing"])
def test_the_must_save_mark_changes_nothing_else_in_the_compiled_graphs(
    routed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the default settings the forward and backward graphs (every node's operation, in
    order, and what the forward saves) are those of the same copy unmarked, the copies alone
    carry the mark (``CheckpointPolicy.MUST_SAVE``), and nothing is marked for a recompute: the
    mark costs no operation, no host sync and no dynamic shape where the unmarked copy had none."""
    from torch.utils.checkpoint import CheckpointPolicy

    import lorahot.layers.base as layers_base

    def unmarked(e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and torch.is_grad_enabled() and z.requires_grad:
            out: torch.Tensor = torch.ops.lorahot.saved_copy(e)
            return out
        return e

    base = _base("linear")
    tensors = _peft(base, seed=3)[1]
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, extras=True, slots=2)
    runtime.load(tensors, slot=0, config=CONFIG)
    runtime.load(tensors, slot=1, config=CONFIG)
    runtime.activate([0, 1, 1, 0] if routed else 0)
    x = _input("linear", rows=4).requires_grad_(True)
    marked = _aot_graphs(model, x)
    with monkeypatch.context() as patch:
        patch.setattr(layers_base, "saved_extras", unmarked)
        plain = _aot_graphs(model, x)

    def ops(gm: torch.fx.GraphModule) -> list[tuple[str, str, str]]:
        """Each node's operation and arguments, nodes named by their place in the graph."""
        place = {n: f"%{i}" for i, n in enumerate(gm.graph.nodes)}
        return [(n.op, str(n.target), str(torch.fx.node.map_arg(n.args, place.get))) for n in gm.graph.nodes]

    assert ops(marked["forward"]) == ops(plain["forward"]) and ops(marked["backward"]) == ops(plain["backward"])
    marks = {n.name: n.meta.get("recompute") for n in marked["forward"].graph.nodes if "recompute" in n.meta}
    assert marks == {"saved_copy": CheckpointPolicy.MUST_SAVE, "saved_copy_1": CheckpointPolicy.MUST_SAVE}
    assert not any("recompute" in n.meta for gm in plain.values() for n in gm.graph.nodes)


def _copies(graphs: list[torch.fx.GraphModule]) -> int:
    """How many ``lorahot::saved_copy`` calls the captured graphs hold, in their subgraphs too
    (each copy is the body of a ``tag_activation_checkpoint`` region)."""
    modules = [m for gm in graphs for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    return sum("saved_copy" in str(node.target) for m in modules for node in m.graph.nodes)


def test_only_a_compiled_forward_that_autograd_records_copies_the_extras_and_swaps_still_do_not_recompile() -> None:
    """The copy is traced once per extras layer in a graph whose output autograd records, and
    nowhere else: a graph under ``no_grad``, one where nothing requires a gradient, and the
    layers injected without extras trace none (their graphs are as before). Swaps DoRA -> plain ->
    DoRA with gradients run under ``error_on_recompile=True``, each backward PEFT's; the negative
    control, another input dtype, recompiles."""
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)  # type: ignore[no-any-return]

    base = _base("linear")
    (oracle, t0), (_, t1) = _peft(base, seed=3), _peft(base, seed=4)
    plain = {k: v for k, v in t0.items() if "magnitude" not in k}
    x = _input("linear")
    for extras, want in ((False, 0), (True, 2)):
        model = copy.deepcopy(base)
        runtime = lorahot.inject(model, ["0", "2"], max_rank=4, extras=extras)
        runtime.load(t0 if extras else plain, config=CONFIG if extras else {**CONFIG, "use_dora": False})
        torch._dynamo.reset()
        graphs.clear()
        compiled = torch.compile(model, backend=capture)
        with torch.no_grad():
            compiled(x)
        assert len(graphs) == 1 and _copies(graphs) == 0
        params = _trainable(model)
        compiled(x).sum().backward()
        assert len(graphs) == 2 and _copies(graphs[1:]) == want
        for p in params:
            p.requires_grad_(False)
        compiled(x)
        assert len(graphs) == 3 and _copies(graphs[2:]) == 0

    params = _trainable(model)
    runtime.load(t0, config=CONFIG)  # the runtime injected with extras, its graphs compiled above
    oracle_params = _trainable(oracle)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for tensors, config in ((t1, CONFIG), (plain, {**CONFIG, "use_dora": False}), (t0, CONFIG)):
            runtime.load(tensors, config=config)
            grads = torch.autograd.grad(compiled(x).square().sum(), params)
        assert all(
            _diff(g, h) < 1e-10 for g, h in zip(grads, torch.autograd.grad(oracle(x).square().sum(), oracle_params))
        )
        with pytest.raises(torch._dynamo.exc.RecompileError):  # negative control
            compiled(x.float())
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_backward_pending_from_a_compiled_forward_on_cuda_computes_with_the_factor_of_its_own_forward(
    mode: str,
) -> None:
    """The sequence of the test above on CUDA with inductor, default mode and CUDA graphs: the
    extras' saved copy (``lorahot::saved_copy``) is captured with the forward's graph, and the
    backward still gets PEFT's gradients in float64 after a base write and an eager forward."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base = _base("linear")
    oracle, tensors = _peft(base, seed=3)
    model = copy.deepcopy(base).cuda()
    oracle = oracle.cuda()
    lorahot.inject(model, ["0", "2"], max_rank=4, extras=True).load(tensors, config=CONFIG)
    x = _input("linear", rows=4).cuda()
    torch._dynamo.reset()
    params = _trainable(model)
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    for _ in range(2):  # under CUDA graphs the second call replays what the first recorded
        pending = compiled(x).square().sum()
    _mul([model], x)
    model(x)
    got = torch.autograd.grad(pending, params)
    want = _routed_peft_grads((oracle,), [0, 0, 0, 0], x)
    assert all(_diff(g, h) < 1e-10 for g, h in zip(got, want))
    torch._dynamo.reset()
