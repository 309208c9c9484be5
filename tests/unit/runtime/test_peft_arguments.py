"""PEFT's ``adapter_names=`` on an injected model's forward is refused with a UsageError that
names the call to make instead; before inject and after eject the model takes it as it did
(a model whose forward takes ``**kwargs`` drops it)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import lorahot
from lorahot.runtime import peft_arguments
from tests.helpers import make_adapter, tiny_llama, token_ids


class _Dropping(nn.Module):
    """A forward that takes and drops unknown keyword arguments, as transformers models do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.q(x)


def _hooked(module: nn.Module) -> int:
    return sum(hook is peft_arguments._refuse for hook in module._forward_pre_hooks.values())


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))


def test_adapter_names_is_refused_after_inject_naming_activate_and_runs_before_and_after_eject() -> None:
    model = _Dropping()
    before = model(X, adapter_names=["a", "b"])
    runtime = lorahot.inject(model, ["q"], max_rank=2, slots=2)
    runtime.load(make_adapter(model, {"q": 2}, seed=0)[0], slot=1)
    runtime.activate([1, -1])
    with pytest.raises(
        lorahot.UsageError, match=r"_Dropping.forward got adapter_names=\['a', 'b'\].*runtime\.activate"
    ):
        model(X, adapter_names=["a", "b"])
    assert runtime.routing == (1, -1)  # nothing changed
    assert not torch.equal(model(X), before)  # the routed forward still runs without it
    assert _hooked(model) == 1
    runtime.eject()
    assert _hooked(model) == 0
    assert torch.equal(model(X, adapter_names=["a", "b"]), before)


def test_a_copy_refuses_too_until_lorahot_eject_and_a_second_runtime_keeps_the_hook() -> None:
    model = _Dropping()
    first = lorahot.inject(model, ["q"], max_rank=2)
    copied = copy.deepcopy(model)
    with pytest.raises(lorahot.UsageError):
        copied(X, adapter_names=["a"])
    lorahot.eject(copied)
    copied(X, adapter_names=["a"])
    assert _hooked(copied) == 0

    other = _Dropping()
    model.add_module("other", other)
    second = lorahot.inject(model, ["other.q"], max_rank=2)
    assert _hooked(model) == 1  # installed once
    first.eject()
    with pytest.raises(lorahot.UsageError):  # the second runtime's layer is still there
        model(X, adapter_names=["a"])
    second.eject()
    model(X, adapter_names=["a"])


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Dropping()
        self.inner.add_module("v", nn.Linear(4, 4))  # not in inner's forward: a layer for the outer runtime
        self.v = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return self.v(self.inner(x))


@pytest.mark.parametrize("how", ["lorahot.eject", "outer first", "inner first"])
def test_runtimes_in_a_submodule_and_its_parent_leave_no_hook_after_both_ejects(how: str) -> None:
    """One runtime in ``model.inner``, another in ``model``: whichever was ejected first found
    the other's layers under the module it had hooked and kept the hook, and the second's eject
    did not know that module (an independent audit: the ejected model still refused
    ``adapter_names=``)."""
    model = _Nested()
    inner = lorahot.inject(model.inner, ["q"], max_rank=2)
    outer = lorahot.inject(model, ["v"], max_rank=2)  # model.v and model.inner.v
    if how == "lorahot.eject":
        lorahot.eject(model)
    else:
        for runtime in (outer, inner) if how == "outer first" else (inner, outer):
            runtime.eject()
    assert _hooked(model) == 0 and _hooked(model.inner) == 0
    model(X, adapter_names=["a"])
    model.inner(X, adapter_names=["a"])


def test_each_component_of_several_models_refuses_it() -> None:
    unet, te = _Dropping(), _Dropping()
    runtime = lorahot.inject({"unet": unet, "text_encoder": te}, {"unet": ["q"], "text_encoder": ["q"]}, max_rank=2)
    for module in (unet, te):
        with pytest.raises(lorahot.UsageError, match="adapter_names"):
            module(X, adapter_names=["a"])
    runtime.eject()
    assert _hooked(unet) == _hooked(te) == 0


def test_a_compiled_transformers_model_refuses_it_and_compiles_once() -> None:
    model = tiny_llama()
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4, slots=2)
    for slot in range(2):
        runtime.load(make_adapter(model, {"model.layers.0.self_attn.q_proj": 2}, seed=slot)[0], slot=slot)
    ids = token_ids((2, 5), 64, seed=3)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        runtime.activate([0, 1])
        want = compiled(input_ids=ids).logits
        with pytest.raises(lorahot.UsageError, match=r"LlamaForCausalLM\.forward got adapter_names"):
            model(input_ids=ids, adapter_names=["a", "b"])
        with pytest.raises(lorahot.UsageError, match="adapter_names"):
            compiled(input_ids=ids, adapter_names=["a", "b"])
        frames = counter.frame_count
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(compiled(input_ids=ids).logits, want, rtol=0, atol=0)
    assert counter.frame_count == frames
