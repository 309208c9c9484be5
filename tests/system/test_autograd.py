"""Gradients through lorahot's layers against PEFT's and a float64 dense reference.

A served model may still be differentiated: input gradients (guidance, textual inversion,
adversarial inputs) and base-weight gradients (fine-tuning the base under a frozen adapter).
Float64 models, gradients of a weighted sum of every output: with respect to the inputs and
every base weight and bias, 1e-10 relative to PEFT's (the same adapter saved by
``save_pretrained``, its base unfrozen) or to the dense reference ``base(x) + s * dW(x)``.
The LoRA buffers are not parameters: they take no gradient.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lorahot
from lorahot.runtime import wide
from tests.helpers import Conv1D, dense_delta, make_adapter
from tests.system.test_dora_bias import TARGETS, _base, _peft

D = torch.float64
#: each adapter kind, its PEFT config and the layers it takes (a LoRA bias needs a base bias)
KINDS = {
    "lora": ({}, TARGETS),
    "dora": ({"use_dora": True}, TARGETS),
    "lora_bias": ({"lora_bias": True}, ["q", "g", "c"]),
}


def _leaves(batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of test_dora_bias's model with ``batch`` rows each, the float ones requiring grad."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 8, generator=g, dtype=D).requires_grad_()
    img = torch.randn(batch, 3, 6, 6, generator=g, dtype=D).requires_grad_()
    return x, img, torch.randint(0, 10, (batch, 2), generator=g)


def _unfrozen(model: nn.Module) -> nn.Module:
    """Every base parameter requires grad (PEFT freezes them; lorahot's LoRA has none)."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" not in name)
    return model


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A sum over every output element on its own (so rows computed apart add up alike)."""
    return 0.5 * (out**2).sum()


def _grads(models: list[nn.Module], inputs: tuple[torch.Tensor, ...], loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """``loss``'s gradients w.r.t. the float ``inputs`` and every base parameter of ``models``
    (named as in the base model, summed over models sharing one name), gradients cleared after."""
    loss.backward()
    grads = {f"input{i}": t.grad for i, t in enumerate(inputs) if t.is_floating_point()}
    for model in models:
        for name, p in model.named_parameters():
            if "lora_" in name or p.grad is None:
                continue
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            grads[key] = grads[key] + p.grad if key in grads else p.grad
            p.grad = None
    for t in inputs:
        t.grad = None
    return grads


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-10, msg=key)


@pytest.mark.parametrize("mode", ["library", "wide", "merged"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_gradients_match_peft(tmp_path: Path, kind: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linear with and without a bias, Conv1D, Conv2d and Embedding. DoRA's bias gradient was
    ``f = m / ||W0 + s B A||`` per channel, not PEFT's 1: lorahot adds ``b0`` inside the factor
    and takes it out again with ``(1 - f) * b0``, a constant of the load."""
    if mode == "wide":  # the one-GEMM path of CUDA, run on the CPU (autograd takes the library formula)
        monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    config, targets = KINDS[kind]
    base = _base(D)
    peft = _unfrozen(_peft(base, tmp_path / kind, 1, targets, **config))
    model = _unfrozen(copy.deepcopy(base))
    runtime = lorahot.inject(model, targets, max_rank=4, merged=mode == "merged", extras=True)
    runtime.load(tmp_path / kind, scale=0.6)
    for module in peft.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            scaling["default"] *= 0.6
    if mode == "merged":
        peft.merge_adapter()  # merged, the weight's gradient is the merged weight's: PEFT's merged one
    inputs = _leaves()
    want = _grads([peft], inputs, _loss(peft(*inputs)))
    _assert_same(_grads([model], inputs, _loss(model(*inputs))), want)
    assert all(t.grad is None for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E))


def test_routed_dora_gradients_match_peft_row_by_row(tmp_path: Path) -> None:
    """A DoRA adapter in each slot routed per row (one row of no slot): the gradients are those
    of PEFT's model with each row's adapter run on its rows, summed (the base parameters' over
    all of them), eagerly and through ``torch.compile`` (aot_eager: autograd of the traced
    graph)."""
    base = _unfrozen(_base(D))
    oracles = [_unfrozen(_peft(base, tmp_path / f"d{k}", k + 1, TARGETS, use_dora=True)) for k in range(2)]
    model = _unfrozen(copy.deepcopy(base))
    runtime = lorahot.inject(model, TARGETS, max_rank=4, extras=True, slots=2)
    for k in range(2):
        runtime.load(tmp_path / f"d{k}", slot=k)
    inputs = _leaves()
    rows = {0: [0], 1: [1, 3], -1: [2]}
    runs = {slot: oracles[slot] if slot >= 0 else base for slot in rows}
    loss = sum(_loss(runs[slot](*(t[r] for t in inputs))) for slot, r in rows.items())
    want = _grads([*oracles, base], inputs, loss)
    runtime.activate([0, 1, -1, 1])
    _assert_same(_grads([model], inputs, _loss(model(*inputs))), want)
    compiled = torch.compile(model, backend="aot_eager")
    _assert_same(_grads([model], inputs, _loss(compiled(*inputs))), want)


class _Convs(nn.Module):
    """Every layer kind lorahot wraps, each on its own input (a grouped Conv2d where ``groups``)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.l = nn.Linear(8, 6)
        self.g = Conv1D(6, 8)
        self.c1 = nn.Conv1d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.c3 = nn.Conv3d(2, 4, 2)
        self.e = nn.Embedding(10, 5)

    def forward(self, x: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor, i3: torch.Tensor, ids: torch.Tensor):
        parts = (self.l(x), self.g(x), self.c1(i1), self.c2(i2), self.c3(i3), self.e(ids))
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], 1)


CONV_TARGETS = ["l", "g", "c1", "c2", "c3", "e"]


def _conv_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 8), (4, 3, 5), (4, 4, 4, 4), (4, 2, 3, 3, 3)]
    floats = [torch.randn(s, generator=g, dtype=D).requires_grad_() for s in shapes]
    return (*floats, torch.randint(0, 10, (4, 2), generator=g))


def _reference(base: nn.Module, parts: list[tuple[dict[str, Any], float]]) -> nn.Module:
    """``base`` (a copy) whose targeted layers add ``sum s * dW(x)`` over ``parts`` (``name -> (A, B)``, weight)."""
    ref = copy.deepcopy(base)
    for name in CONV_TARGETS:

        def hook(m: nn.Module, args: tuple, out: torch.Tensor, name: str = name) -> torch.Tensor:
            return out + sum(s * dense_delta(m, args[0], *ab[name]) for ab, s in parts)

        ref.get_submodule(name).register_forward_hook(hook)
    return ref


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_every_layer_kind_stacked_and_routed_matches_the_dense_reference(merged: bool) -> None:
    """Linear, Conv1D, Conv1d, Conv2d (grouped unmerged: merged mode cannot fold a LoRA there),
    Conv3d, Embedding: one adapter, a stack of two, and (unmerged) the two in two slots routed
    per row with a row of no slot."""
    torch.manual_seed(0)
    base = _Convs(1 if merged else 2).to(D)
    ab = [make_adapter(base, dict.fromkeys(CONV_TARGETS, 2), seed=k, dtype=D) for k in (1, 2)]
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, CONV_TARGETS, max_rank=4, slots=2, merged=merged)
    inputs = _conv_inputs()

    def check(ref: nn.Module | list[tuple[nn.Module, list[int]]]) -> None:
        got = _grads([model], inputs, _loss(model(*inputs)))
        if isinstance(ref, nn.Module):
            want = _grads([ref], inputs, _loss(ref(*inputs)))
        else:  # each reference on its rows
            loss = sum(_loss(r(*(t[rows] for t in inputs))) for r, rows in ref)
            want = _grads([r for r, _ in ref], inputs, loss)
        _assert_same(got, want)

    runtime.load(ab[0][0], scale=0.7)
    check(_reference(base, [(ab[0][1], 0.7)]))
    runtime.load([ab[0][0], ab[1][0]], scale=[0.5, -1.2])
    check(_reference(base, [(ab[0][1], 0.5), (ab[1][1], -1.2)]))
    if not merged:
        runtime.load(ab[0][0], slot=0)
        runtime.load(ab[1][0], slot=1)
        runtime.activate([0, 1, -1, 1])
        refs = [_reference(base, [(ab[0][1], 1.0)]), _reference(base, [(ab[1][1], 1.0)]), copy.deepcopy(base)]
        check([(refs[0], [0]), (refs[1], [1, 3]), (refs[2], [2])])


def test_torch_func_grad_over_the_models_own_parameters_matches_peft(tmp_path: Path) -> None:
    """``torch.func.grad`` of a ``functional_call`` over the model's own parameters (detached, as
    functorch takes them) on a DoRA adapter: the wrappers take them as the model's (no refusal
    of other values, see test_dora_bias.py), and every base parameter's gradient, the DoRA
    bias's included, is PEFT's."""
    base = _base(D)
    peft = _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    model = copy.deepcopy(base)
    lorahot.inject(model, TARGETS, max_rank=4, extras=True).load(tmp_path / "dora")
    inputs = _leaves()

    def grads(module: nn.Module) -> dict[str, torch.Tensor]:
        params = {k: v.detach() for k, v in module.named_parameters() if "lora_" not in k}
        found = torch.func.grad(lambda p: _loss(torch.func.functional_call(module, p, inputs)))(params)
        return {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in found.items()}

    _assert_same(grads(model), grads(peft))


def _peft_names(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in params.items()}


def _forward_mode(module: nn.Module, how: str, tangents: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s output and its forward-mode derivative along ``tangents`` (one per base
    parameter, by its name in the base model), through ``functional_call`` over the module's own
    parameters: ``torch.func.jvp``, or dual tensors of ``torch.autograd.forward_ad`` with grad
    mode on or off (forward mode does not need it)."""
    import torch.autograd.forward_ad as fwad

    params = {k: v.detach() for k, v in module.named_parameters() if "lora_" not in k}
    along = {k: tangents[n] for k, n in zip(params, _peft_names(params))}
    inputs = tuple(t.detach() for t in _leaves())
    if how == "func.jvp":
        out, tangent = torch.func.jvp(lambda p: torch.func.functional_call(module, p, inputs), (params,), (along,))
        return out, tangent
    with torch.set_grad_enabled(how == "forward_ad"), fwad.dual_level():
        dual = {k: fwad.make_dual(v, along[k]) for k, v in params.items()}
        found = fwad.unpack_dual(torch.func.functional_call(module, dual, inputs))
        return found.primal.clone(), found.tangent.clone()


@pytest.mark.parametrize("how", ["func.jvp", "forward_ad", "forward_ad under no_grad"])
def test_forward_mode_derivatives_along_the_base_parameters_match_peft(tmp_path: Path, how: str) -> None:
    """Forward-mode AD along every base weight and bias of a DoRA model (``torch.func.jvp`` of a
    ``functional_call``, or ``torch.autograd.forward_ad`` dual tensors, grad mode on or off)
    gives PEFT's output and derivative. A DoRA layer's base bias enters its output as ``f * b0``
    plus the constant ``(1 - f) * b0``; the term that gives it PEFT's derivative 1 was added
    only where autograd records the bias (``requires_grad``), which a tangent on a tensor that
    requires none is not: the derivative was ``f`` per channel, 1.36 off PEFT's."""
    base = _base(D)
    peft = _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    model = copy.deepcopy(base)
    lorahot.inject(model, TARGETS, max_rank=4, extras=True).load(tmp_path / "dora")
    g = torch.Generator().manual_seed(7)
    tangents = {k: torch.randn(p.shape, generator=g, dtype=D) for k, p in base.named_parameters()}
    got, want = _forward_mode(model, how, tangents), _forward_mode(peft, how, tangents)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_torch_func_transforms_over_the_inputs_match_peft(tmp_path: Path) -> None:
    """``vmap`` (against a loop too), ``jvp``, ``jacrev``, ``hessian`` and ``vmap`` of ``grad``
    over the input of a DoRA model, and a forward-mode dual input: PEFT's numbers (the LoRA
    buffers are constants of every transform)."""
    import torch.autograd.forward_ad as fwad

    base = _base(D)
    peft = _peft(base, tmp_path / "dora", 1, TARGETS, use_dora=True)
    model = copy.deepcopy(base)
    lorahot.inject(model, TARGETS, max_rank=4, extras=True).load(tmp_path / "dora")
    x, img, ids = (t.detach() for t in _leaves())
    xs, t = torch.stack([x, 2 * x]), torch.ones_like(x)

    def transforms(m: nn.Module) -> list[torch.Tensor]:
        def f(z: torch.Tensor) -> torch.Tensor:
            return m(z, img, ids)  # type: ignore[no-any-return]

        with fwad.dual_level():
            dual = fwad.unpack_dual(f(fwad.make_dual(x, t))).tangent.clone()
        return [
            torch.func.vmap(f)(xs),
            *torch.func.jvp(f, (x,), (t,)),
            torch.func.jacrev(f)(x),
            torch.func.hessian(lambda z: f(z).square().sum())(x),
            torch.func.vmap(torch.func.grad(lambda z: f(z).square().sum()))(xs),
            dual,
        ]

    for a, b in zip(transforms(model), transforms(peft), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        torch.func.vmap(lambda z: model(z, img, ids))(xs), torch.stack([model(z, img, ids) for z in xs])
    )


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("route", [[0, 1, -1, 1], 1], ids=["routed", "whole-batch"])
def test_activation_checkpointing_gives_the_gradients_of_the_forward_it_recomputes(
    reentrant: bool, route: list[int] | int
) -> None:
    """``torch.utils.checkpoint`` (transformers' ``gradient_checkpointing_enable``) runs the
    forward again in the backward: with the slot or routing of the forward still in force, the
    gradients are the unchecked forward's, bitwise. Two micro-batches, each one's backward
    before the next one's ``activate`` (the order README's Execution contexts asks for: the
    recompute reads the state in force at the backward)."""
    from torch.utils.checkpoint import checkpoint

    base = _unfrozen(_base(D))
    model = _unfrozen(copy.deepcopy(base))
    runtime = lorahot.inject(model, TARGETS, max_rank=4, slots=2)
    for k in range(2):
        runtime.load(make_adapter(base, dict.fromkeys(TARGETS, 2 + k), seed=k, dtype=D)[0], slot=k, scale=0.5 + k)
    inputs = _leaves()
    steps = [(route, inputs), ([1, -1, 0, 0] if isinstance(route, list) else 0, _leaves())]

    def run(checked: bool) -> list[dict[str, torch.Tensor]]:
        found = []
        for slots, x in steps:
            runtime.activate(slots)
            out = checkpoint(model, *x, use_reentrant=reentrant) if checked else model(*x)
            found.append(_grads([model], x, _loss(out)))
        return found

    for got, want in zip(run(True), run(False), strict=True):
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


CALLS = {
    "new routing": lambda runtime, adapter: runtime.activate([1, 1, 0, -1]),
    "load": lambda runtime, adapter: runtime.load(adapter, slot=1),
    "set_scale": lambda runtime, adapter: runtime.set_scale(3.0, slot=1),
    "unload": lambda runtime, adapter: runtime.unload(1),
    "activate(k)": lambda runtime, adapter: runtime.activate(1),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_backward_never_computes_with_a_state_set_after_its_forward(call: str) -> None:
    """Without checkpointing, a call between a forward and its backward: under a per-row routing
    the backward keeps the forward's gradients (gradient accumulation over routed
    micro-batches); after a whole-batch forward, a call that writes the live weights makes the
    backward raise torch's in-place error (a new routing writes none)."""
    base = _unfrozen(_base(D))
    adapters = [make_adapter(base, dict.fromkeys(TARGETS, 2 + k), seed=k, dtype=D)[0] for k in range(3)]
    for routed in (True, False):
        model = _unfrozen(copy.deepcopy(base))
        runtime = lorahot.inject(model, TARGETS, max_rank=4, slots=2)
        for k in range(2):
            runtime.load(adapters[k], slot=k, scale=0.5 + k)
        inputs = _leaves()
        runtime.activate([0, 1, -1, 1] if routed else 0)
        want = _grads([model], inputs, _loss(model(*inputs)))
        loss = _loss(model(*inputs))
        CALLS[call](runtime, adapters[2])
        if routed or call == "new routing":
            _assert_same(_grads([model], inputs, loss), want)
        else:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("route", [[0, 1, -1, 1], 1], ids=["routed", "whole-batch"])
def test_a_call_between_a_checkpointed_forward_and_its_backward_is_refused(call: str, route: list[int] | int) -> None:
    """``torch.utils.checkpoint(..., use_reentrant=False)`` recomputes the forward in the
    backward: a runtime call in between would give the new state's gradients, so the backward
    raises a typed error naming a layer; the same micro-batch with no call in between gives the
    unchecked forward's gradients bitwise (the negative control). A call that switches between a
    per-row routing and the whole batch changes which tensors the forward saves, and torch's own
    checkpoint refuses the recompute first (``CheckpointError``)."""
    from torch.utils.checkpoint import CheckpointError, checkpoint

    base = _unfrozen(_base(D))
    adapters = [make_adapter(base, dict.fromkeys(TARGETS, 2 + k), seed=k, dtype=D)[0] for k in range(3)]
    model = _unfrozen(copy.deepcopy(base))
    runtime = lorahot.inject(model, TARGETS, max_rank=4, slots=2)
    for k in range(2):
        runtime.load(adapters[k], slot=k, scale=0.5 + k)
    inputs = _leaves()
    runtime.activate(route)
    want = _grads([model], inputs, _loss(model(*inputs)))
    _assert_same(_grads([model], inputs, _loss(checkpoint(model, *inputs, use_reentrant=False))), want)
    loss = _loss(checkpoint(model, *inputs, use_reentrant=False))
    CALLS[call](runtime, adapters[2])
    switched = call == ("activate(k)" if isinstance(route, list) else "new routing")  # routed <-> whole batch
    with pytest.raises(CheckpointError if switched else lorahot.UsageError, match="checkpoint"):
        loss.backward()


class _Checkpointed(nn.Module):
    """``module`` run through ``torch.utils.checkpoint``, as a model's own forward calls it on each
    block under gradient checkpointing."""

    def __init__(self, module: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.module, self.reentrant = module, reentrant

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.module, *x, use_reentrant=self.reentrant)  # type: ignore[no-any-return]


def _two_slots() -> tuple[nn.Module, lorahot.LoraRuntime, list[dict[str, torch.Tensor]]]:
    """test_dora_bias's model, unfrozen, with an adapter in each of two slots, and a third adapter."""
    base = _unfrozen(_base(D))
    adapters = [make_adapter(base, dict.fromkeys(TARGETS, 2 + k), seed=k, dtype=D)[0] for k in range(3)]
    model = _unfrozen(copy.deepcopy(base))
    runtime = lorahot.inject(model, TARGETS, max_rank=4, slots=2)
    for k in range(2):
        runtime.load(adapters[k], slot=k, scale=0.5 + k)
    return model, runtime, adapters


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("route", [[0, 1, -1, 1], 1], ids=["routed", "whole-batch"])
def test_a_call_between_a_forward_compiled_with_its_checkpoint_and_its_backward_raises_or_changes_nothing(
    route: list[int] | int, reentrant: bool
) -> None:
    """A checkpoint inside the compiled region (``torch.compile`` over a forward that calls
    ``torch.utils.checkpoint``, reentrant or not): the compiled backward recomputes from the
    graph's inputs, the arena among them, which it saved, so each call that writes what the
    forward read (every call of :data:`CALLS`) makes it raise torch's in-place error, and one that
    writes nothing it read (a new routing after a whole-batch forward) leaves the forward's
    gradients. With no call in between the gradients are the unchecked forward's (the negative
    control); the state is loaded again after each call (no recompile)."""
    model, runtime, adapters = _two_slots()
    runtime.activate(route)
    inputs = _leaves()
    want = _grads([model], inputs, _loss(model(*inputs)))
    torch._dynamo.reset()
    compiled = torch.compile(_Checkpointed(model, reentrant), backend="aot_eager")
    _assert_same(_grads([model], inputs, _loss(compiled(*inputs))), want)
    for call in CALLS:
        loss = _loss(compiled(*inputs))
        CALLS[call](runtime, adapters[2])
        if call == "new routing" and not isinstance(route, list):
            _assert_same(_grads([model], inputs, loss), want)
        else:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
        runtime.load(adapters[1], slot=1, scale=1.5)
        runtime.activate(route)
        _assert_same(_grads([model], inputs, _loss(compiled(*inputs))), want)
    torch._dynamo.reset()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_checkpoint_around_a_compiled_module_gives_the_forward_s_gradients_with_each_backward_before_the_next_call(
    reentrant: bool,
) -> None:
    """A checkpoint around a module compiled on its own (regional compilation: ``torch.compile``
    on each block, diffusers' ``compile_repeated_blocks``) recomputes in the compiled graph,
    which reads the slot, routing and scales in force at the backward and cannot count the
    runtime calls since its forward (README, Execution contexts): with each micro-batch's
    backward before the next call, routed and whole-batch, the gradients are the unchecked
    forward's."""
    model, runtime, _ = _two_slots()
    steps = [([0, 1, -1, 1], _leaves()), (1, _leaves()), ([1, -1, 0, 0], _leaves())]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    checked = _Checkpointed(compiled, reentrant)
    for route, inputs in steps:
        runtime.activate(route)
        want = _grads([model], inputs, _loss(model(*inputs)))
        _assert_same(_grads([model], inputs, _loss(checked(*inputs))), want)
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_transformers_gradient_checkpointing_refuses_a_call_between_a_forward_and_its_backward(compiled: bool) -> None:
    """A tiny float64 Llama with ``gradient_checkpointing_enable()`` (non-reentrant, transformers'
    default) in training mode, eager and under ``torch.compile``: with no call in between, the
    base parameters' gradients are those without checkpointing; a ``set_scale`` or a new
    routing between a forward and its backward raises the ``UsageError`` naming a layer."""
    from tests.helpers import tiny_llama

    base = tiny_llama().double()
    targets = ["q_proj", "v_proj", "down_proj"]
    shapes = {n: 2 for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in targets}
    model = copy.deepcopy(base).train()
    runtime = lorahot.inject(model, targets, max_rank=4, slots=2)
    for k in range(2):
        runtime.load(make_adapter(base, shapes, seed=k, dtype=D)[0], slot=k, scale=0.5 + k)
    runtime.activate([0, 1, -1, 1])
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))
    params = [p for n, p in model.named_parameters() if "layers.0." in n]
    want = torch.autograd.grad(model(input_ids=ids).logits.square().sum(), params)
    model.gradient_checkpointing_enable()
    torch._dynamo.reset()
    run = torch.compile(model, backend="aot_eager") if compiled else model
    got = torch.autograd.grad(run(input_ids=ids).logits.square().sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    for call in (lambda: runtime.set_scale(2.0, slot=1), lambda: runtime.activate([1, 1, 0, -1])):
        loss = run(input_ids=ids).logits.square().sum()
        call()
        with pytest.raises(lorahot.UsageError, match="recomputes a checkpointed forward"):
            loss.backward()
    torch._dynamo.reset()


@pytest.mark.parametrize("route", [0, [0, 1, -1, 1, 1, 0]], ids=["whole-batch", "routed"])
@pytest.mark.parametrize("how", ["func.jvp", "forward_ad"])
def test_forward_mode_and_torch_func_take_the_library_formula_not_the_kernels(
    how: str, route: list[int] | int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused kernels have no derivative and were chosen wherever nothing required a
    gradient, so a ``torch.func.jvp`` over the input went through them: the routed kernels'
    operators (their CPU formulas standing in here) gave a zero tangent for what they compute
    (1.9 and 5.3 off the float64 derivative at 6 and 200 rows of a two-linear model), and on
    CUDA the kernels themselves would drop a forward-mode tangent too. Under forward-mode AD or
    a ``torch.func`` transform every layer now takes the library formula: no kernel is called
    and the tangent is autograd's Jacobian along it; plain inference still takes the kernels
    (the negative control)."""
    from lorahot.kernels import lora_linear as fused_kernel
    from lorahot.kernels import routed_linear, routed_lora

    calls: list[str] = []

    def formula(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, *lora: torch.Tensor) -> torch.Tensor:
        a, bt, s = lora
        calls.append("lora_linear")
        return torch.nn.functional.linear(x, w, bias) + ((x @ a.t()) * s).to(x.dtype) @ bt

    monkeypatch.setattr(fused_kernel, "supports", lambda base, a: True)
    monkeypatch.setattr(fused_kernel, "lora_linear", formula)
    monkeypatch.setattr(routed_lora, "available", lambda: True)
    for module, name in ((routed_linear, "routed_lora_linear"), (routed_lora, "routed_lora")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6)).to(D)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, slots=2)
    assert model[0]._plan[1]  # fused
    for k in range(2):
        runtime.load(make_adapter(base, {"0": 2 + k, "2": 3}, seed=k, dtype=D)[0], slot=k, scale=0.5 + k)
    runtime.activate(route)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(6, 8, generator=g, dtype=D), torch.randn(6, 8, generator=g, dtype=D)
    jacobian = torch.autograd.functional.jacobian(model, x.clone().requires_grad_())
    want = torch.einsum("abcd,cd->ab", jacobian, t)
    with torch.no_grad():
        model(x)
    assert calls  # the kernels serve plain inference
    calls.clear()
    with torch.no_grad():
        if how == "func.jvp":
            got = torch.func.jvp(model, (x,), (t,))[1]
        else:
            import torch.autograd.forward_ad as fwad

            with fwad.dual_level():
                got = fwad.unpack_dual(model(fwad.make_dual(x, t))).tangent
    assert calls == []
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
