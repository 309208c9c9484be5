"""Modules whose weight the model's code reads instead of calling them
(:mod:`lorahot.runtime.weight_reads`): refused as targets where nothing calls them, refused in
merged mode wherever such a read runs, and metadata reads left alone."""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorahot
from lorahot.runtime import weight_reads
from lorahot.runtime.weight_reads import class_uses
from tests.helpers import make_adapter, model_reference


class _ReadHead(nn.Module):
    """Computes with ``proj``'s weight and never calls it (as MobileBERT's prediction head)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self._project(x))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.weight.T


class _ReadByAnotherName(nn.Module):
    """As :class:`_ReadHead`, its methods naming their instance otherwise than ``self`` (the
    language allows any name for the first parameter)."""

    def __init__(this) -> None:
        super().__init__()
        this.proj = nn.Linear(8, 6)
        this.out = nn.Linear(6, 4)

    def forward(me, x: torch.Tensor) -> torch.Tensor:
        return me.out(me._project(x))

    def _project(module, x: torch.Tensor) -> torch.Tensor:
        return x @ module.proj.weight.T


def _convolve(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    return F.conv1d(x, conv.weight, conv.bias, padding=1)


class _Handed(nn.Module):
    """Hands ``conv`` to a function that computes with its weight (as the Mamba mixers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(_convolve(self.conv, x.transpose(1, 2)).transpose(1, 2))


class _OnePath(nn.Module):
    """Calls ``proj`` on one path and computes with its weight on the other (Jamba's dt_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)
        self.quantized = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) if self.quantized else x @ self.proj.weight.T + self.proj.bias
        return self.out(h)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _TiedHead(nn.Module):
    """Calls ``block.proj`` through ``block``, and computes its head with that weight."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) @ self.block.proj.weight


class _Described(nn.Module):
    """Reads only what describes ``proj``'s weight."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj.weight, torch.Tensor) and self.proj.weight is not None:
            x = x.to(device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        assert self.proj.weight.shape[1] == x.shape[-1]
        return self.proj(x)


def _traced(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return wrapper


class _Decorated(nn.Module):
    """A decorated forward that reaches a read through a helper method."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)

    @_traced
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self._project(x))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.weight.T


class _Pair(nn.Module):
    """A projection and an output head (the forms below reach ``proj`` differently)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)


class _LocalName(_Pair):
    """Reads ``proj``'s weight through a local name bound to the module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = self.proj
        return self.out(x @ proj.weight.T)


class _Unpacked(_Pair):
    """Binds the modules by tuple unpacking."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj, out = self.proj, self.out
        return out(x @ proj.weight.T)


class _ByGetattr(_Pair):
    """Reaches ``proj`` through ``getattr`` with a constant name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x @ getattr(self, "proj").weight.T)  # noqa: B009 (the form under test)


class _Layers(nn.Module):
    """A list of linears and an output head (the forms below reach ``layers`` differently)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 6)])
        self.out = nn.Linear(6, 4)


class _Iterated(_Layers):
    """Iterates the list and reads each element's weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x @ layer.weight.T
        return self.out(x)


class _Indexed(_Layers):
    """Calls the first element, reads the second's weight through an index."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers[0](x) @ self.layers[1].weight.T)


class _Walked(_Pair):
    """Finds ``proj`` by walking its modules, and reads its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, module in self.named_modules():
            if name == "proj":
                x = x @ module.weight.T
        return self.out(x)


class _ByParameterName(_Pair):
    """Takes ``proj``'s weight by its parameter name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x @ self.get_parameter("proj.weight").T)


class _ByParameterTable(_Pair):
    """Takes ``proj``'s weight from its table of parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x @ self.proj._parameters["weight"].T)


class _PropertyRead(_Pair):
    """Reads ``proj``'s weight in a property."""

    @property
    def projection(self) -> torch.Tensor:
        return self.proj.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x @ self.projection)


def _project_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x @ module.proj.weight.T


class _StaticHelper(_Pair):
    """Hands itself to a static method that reads ``proj``'s weight."""

    @staticmethod
    def _project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x @ module.proj.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self._project(self, x))


class _ThroughItsClass(_Pair):
    """Hands itself to a static method reached through its class."""

    @staticmethod
    def _project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x @ module.proj.weight.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(type(self)._project(self, x))


def _forward_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.out(x @ module.proj.weight.T)


class _InstanceForward(_Pair):
    """Its forward is set on the instance: a ``functools.partial`` of a reading function."""

    def __init__(self) -> None:
        super().__init__()
        self.forward = functools.partial(_forward_of, self)


class _FunctionOfSelf(_Pair):
    """Hands itself to a module-level function that reads ``proj``'s weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(_project_of(self, x))


class _ReadBase(_Pair):
    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.weight.T


class _SuperHelper(_ReadBase):
    """Reaches its base class's reading method through ``super()``."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(super().project(x))


class _Partial(_Pair):
    """Binds itself to a reading function with ``functools.partial``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        project = functools.partial(_project_of, self)
        return self.out(project(x))


class _Kernel:
    """An object (not a module) that computes with the convolution it was handed."""

    def __init__(self, conv: nn.Conv1d) -> None:
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.conv.weight, self.conv.bias, padding=1)


class _HeldKernel(nn.Module):
    """Holds ``conv`` in a kernel object and calls the object (as hub-kernel wrappers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3)
        self.out = nn.Linear(8, 4)
        self.kernel = _Kernel(self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.kernel(x.transpose(1, 2)).transpose(1, 2))


class _Processor:
    """Computes with a projection of the module that calls it (as diffusers' attention
    processors, called with their attention module)."""

    def __call__(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x @ attn.proj.weight.T


class _WithProcessor(_Pair):
    """Hands itself to the processor object it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.processor = _Processor()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.processor(self, x))


class _HeldPartial(_HeldKernel):
    """Holds ``conv`` bound in a ``functools.partial`` of a reading function, and calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = functools.partial(_convolve, self.conv)


def _convolving(conv: nn.Conv1d) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, conv.weight, conv.bias, padding=1)

    return run


class _HeldClosure(_HeldKernel):
    """Holds a closure over ``conv`` that reads its weight, and calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = _convolving(self.conv)


def _project_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return (args[0] @ module.proj.weight.T,)


class _HookRead(_Pair):
    """A forward pre-hook of its own computes with ``proj``'s weight; ``forward`` never calls it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_pre_hook(_project_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


def _clamp_proj(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
    module.proj.weight.data.clamp_(-0.2, 0.2)


class _LambdaHook(_HookRead):
    """As :class:`_HookRead`, the hook a lambda."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)
        self.register_forward_pre_hook(lambda module, args: (args[0] @ module.proj.weight.T,))


class _HookOverSelf(_HookRead):
    """As :class:`_HookRead`, the hook a lambda that uses the ``self`` it closes over."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)
        self.register_forward_pre_hook(lambda _, args: (args[0] @ self.proj.weight.T,))


def _projecting_with(child: nn.Module) -> Callable[..., tuple[torch.Tensor, ...]]:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0] @ child.weight.T,)

    return hook


class _HookOverChild(_HookRead):
    """As :class:`_HookRead`, the hook a closure over ``proj`` itself."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)
        self.register_forward_pre_hook(_projecting_with(self.proj))


class _CalledAndRead(_Layers):
    """Calls each layer through the list, and reads the first one's weight besides."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.layers:
            h = layer(h)
        first = self.layers[0]
        return self.out(h) + (x @ first.weight.T).sum(-1, keepdim=True)


class _CallingProcessor:
    def __call__(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return attn.proj(x) + x @ attn.proj.weight.T


class _WithCallingProcessor(_WithProcessor):
    """Its processor calls ``proj`` and reads its weight besides."""

    def __init__(self) -> None:
        super().__init__()
        self.processor = _CallingProcessor()


class _HookClamp(_Pair):
    """Calls ``proj``; a forward pre-hook of its own clamps ``proj``'s weight before each call."""

    def __init__(self) -> None:
        super().__init__()
        self.register_forward_pre_hook(_clamp_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(x))


class _Matched(_Pair):
    """Reads ``proj``'s weight through the name a ``case`` pattern binds it to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        match self.proj:
            case nn.Module() as proj:
                return self.out(x @ proj.weight.T)
        return self.out(x)


class _MatchedElement(_Layers):
    """Reads the first layer's weight through a sequence pattern."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        match list(self.layers):
            case [first, *_]:
                return self.out(self.layers[1](x @ first.weight.T))
        return self.out(x)


class _MatchedKeyword(_Pair):
    """Reads ``proj``'s weight through a class pattern's keyword capture."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        match self.proj:
            case nn.Module(weight=w):
                return self.out(x @ w.T)
        return self.out(x)


class _MatchedMapping(_Pair):
    """Reads ``proj``'s weight through the name a mapping pattern binds it to."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        match {"p": self.proj, "o": self.out}:
            case {"p": proj}:
                return self.out(x @ proj.weight.T)
        return self.out(x)


class _SlottedKernel:
    """As :class:`_Kernel`, holding the convolution in a slot (no ``__dict__``)."""

    __slots__ = ("conv",)

    def __init__(self, conv: nn.Conv1d) -> None:
        self.conv = conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.conv.weight, self.conv.bias, padding=1)


class _HeldSlottedKernel(_HeldKernel):
    """As :class:`_HeldKernel`, its kernel object one with ``__slots__``."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = _SlottedKernel(self.conv)


def _class_in_a_function() -> type[nn.Module]:
    class _InAFunction(_Pair):
        """As :class:`_ReadHead`, defined in a function (its qualified name holds ``<locals>``)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(x @ self.proj.weight.T)

    return _InAFunction


def _shared_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.out(x @ self.proj.weight.T)


class _SetForward(_Pair):
    """As :class:`_ReadHead`, its forward a module-level function set in the class body."""

    forward = _shared_forward


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_x())


@pytest.mark.parametrize(
    ("build", "target", "where"),
    [
        (_ReadHead, "proj", r"_ReadHead\._project reads self\.proj\.weight"),
        (_ReadByAnotherName, "proj", r"_ReadByAnotherName\._project reads self\.proj\.weight"),
        (_Handed, "conv", r"_Handed\.forward"),
        (_LocalName, "proj", r"_LocalName\.forward reads self\.proj\.weight"),
        (_Unpacked, "proj", r"_Unpacked\.forward reads self\.proj\.weight"),
        (_ByGetattr, "proj", r"_ByGetattr\.forward reads self\.proj\.weight"),
        (_Iterated, "layers.0", r"_Iterated\.forward reads self\.layers\[\*\]\.weight"),
        (_Walked, "proj", r"_Walked\.forward reads self\.<any submodule>\.weight"),
        (_Indexed, "layers.1", r"_Indexed\.forward reads self\.layers\.1\.weight"),
        (_ByParameterName, "proj", r"_ByParameterName\.forward reads self\.proj\.weight"),
        (_ByParameterTable, "proj", r"_ByParameterTable\.forward reads self\.proj\.weight"),
        (_PropertyRead, "proj", r"_PropertyRead\.projection reads self\.proj\.weight"),
        (_StaticHelper, "proj", r"_StaticHelper\.forward \(through _StaticHelper\._project\) reads self\.proj\.weight"),
        (_ThroughItsClass, "proj", r"_ThroughItsClass\.forward \(through _ThroughItsClass\._project\) reads"),
        (_InstanceForward, "proj", r"_forward_of \(bound in a functools\.partial\) reads module\.proj\.weight, as"),
        (_FunctionOfSelf, "proj", r"_FunctionOfSelf\.forward \(through _project_of\) reads self\.proj\.weight"),
        (_SuperHelper, "proj", r"_ReadBase\.project reads self\.proj\.weight"),
        (_Partial, "proj", r"_Partial\.forward \(through _project_of\) reads self\.proj\.weight"),
        (
            _HeldKernel,
            "conv",
            r"_Kernel\.__call__ reads self\.conv\.weight, in the _Kernel _HeldKernel holds as self\.kernel",
        ),
        (_HookRead, "proj", r"the forward hook _project_input on _HookRead reads self\.proj\.weight"),
        (_LambdaHook, "proj", r"the forward hook _LambdaHook\.__init__\.<locals>\.<lambda> on _LambdaHook reads"),
        (_HookOverSelf, "proj", r"<lambda> reads self\.proj\.weight, a forward hook on _HookOverSelf,"),
        (
            _HookOverChild,
            "proj",
            r"_projecting_with\.<locals>\.hook reads child\.weight, a forward hook on _HookOverChild,",
        ),
        (
            _WithProcessor,
            "proj",
            r"_Processor\.__call__, called as self\.processor by _WithProcessor, reads self\.proj\.weight",
        ),
        (_HeldClosure, "conv", r"_convolving\.<locals>\.run reads conv\.weight, in the function _HeldClosure holds"),
        (_HeldPartial, "conv", r"_convolve \(bound in a functools\.partial\) reads conv\.weight, in the partial"),
        (_class_in_a_function(), "proj", r"_InAFunction\.forward reads self\.proj\.weight"),
        (_SetForward, "proj", r"_SetForward\.forward reads self\.proj\.weight"),
        (_Matched, "proj", r"_Matched\.forward reads self\.proj\.weight"),
        (_MatchedElement, "layers.0", r"_MatchedElement\.forward reads self\.layers\[\*\]\.weight"),
        (_MatchedKeyword, "proj", r"_MatchedKeyword\.forward reads self\.proj\.weight"),
        (_MatchedMapping, "proj", r"_MatchedMapping\.forward reads self\.proj\.weight"),
        (
            _HeldSlottedKernel,
            "conv",
            r"_SlottedKernel\.__call__ reads self\.conv\.weight, in the _SlottedKernel _HeldSlottedKernel holds as",
        ),
    ],
    ids=[
        "read",
        "another-name",
        "handed",
        "local-name",
        "unpacked",
        "getattr",
        "iterated",
        "walked",
        "indexed",
        "parameter-name",
        "parameter-table",
        "property",
        "static-method",
        "through-its-class",
        "instance-forward",
        "function-of-self",
        "super",
        "partial",
        "held-object",
        "hook",
        "hook-lambda",
        "hook-over-self",
        "hook-over-child",
        "processor",
        "held-closure",
        "held-partial",
        "class-in-a-function",
        "set-forward",
        "match-as",
        "match-sequence",
        "match-keyword",
        "match-mapping",
        "held-slots",
    ],
)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_module_whose_weight_is_read_and_never_called_is_refused(build, target: str, where: str, merged) -> None:
    """A LoRA there never applies unmerged (nor PEFT's), and merged it would: MobileBERT's
    all-linear adapter merged was 1.58 off PEFT's logits (rel. 3.1), WavLM's q/v/out_proj 0.15."""
    torch.manual_seed(0)
    model = build().eval()
    before = _run(model)
    with pytest.raises(lorahot.UsageError, match=where + r".* and nothing on its path calls it, so a LoRA there"):
        lorahot.inject(model, [target, "out"], max_rank=4, merged=merged)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())
    assert torch.equal(_run(model), before)


def test_all_linear_leaves_out_a_linear_whose_weight_is_read_and_never_called() -> None:
    torch.manual_seed(0)
    runtime = lorahot.inject(_ReadHead().eval(), "all-linear", max_rank=4)
    assert list(runtime.layers) == ["out"]


@pytest.mark.parametrize(
    ("build", "target", "where"),
    [
        (_OnePath, "proj", r"_OnePath\.forward reads self\.proj\.weight"),
        (_TiedHead, "block.proj", r"_TiedHead"),
        (_HookClamp, "proj", r"the forward hook _clamp_proj on _HookClamp reads self\.proj\.weight"),
        (_CalledAndRead, "layers.0", r"_CalledAndRead\.forward reads self\.layers\.0\.weight"),
        (_WithCallingProcessor, "proj", r"_CallingProcessor\.__call__, called as self\.processor by"),
    ],
    ids=["other-path", "ancestor", "hook", "list", "processor"],
)
def test_merged_mode_refuses_a_target_whose_weight_is_read_besides_its_calls(build, target: str, where: str) -> None:
    """Unmerged the LoRA applies where the module is called only (as PEFT's); merged it would
    reach the read too (Jamba's dt_proj: 0.16 off PEFT's logits). Merged inject refuses it,
    unmerged computes the float64 reference of a LoRA added at the call."""
    torch.manual_seed(0)
    base = build().eval()
    merged = copy.deepcopy(base)
    before = _run(merged)
    with pytest.raises(lorahot.UsageError, match=where + r".*merged mode would fold it in"):
        lorahot.inject(merged, [target], max_rank=4, merged=True)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in merged.modules())
    assert torch.equal(_run(merged), before)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, [target], max_rank=4)
    tensors, ab = make_adapter(model, {target: 2}, seed=3)
    runtime.load(tensors)
    lora = {target: (*ab[target], 1.0)}  # the reference adds it where the module is called
    torch.testing.assert_close(_run(model).double(), model_reference(base, _x(), lora), rtol=1e-5, atol=1e-6)
    if isinstance(base, _OnePath):  # the path that calls it
        model.quantized = base.quantized = True
        torch.testing.assert_close(_run(model).double(), model_reference(base, _x(), lora), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(_run(model), _run(base))


def test_reads_of_what_describes_a_weight_are_not_reads() -> None:
    """dtype, device, shape, isinstance and ``is None`` tests do not compute with the weight."""
    assert not class_uses(_Described).reads
    assert "proj" in class_uses(_Described).calls
    torch.manual_seed(0)
    base = _Described().eval()
    for merged in (False, True):
        model = copy.deepcopy(base)
        runtime = lorahot.inject(model, ["proj"], max_rank=4, merged=merged)
        tensors, ab = make_adapter(model, {"proj": 2}, seed=3)
        runtime.load(tensors)
        want = model_reference(base, _x(), {"proj": (*ab["proj"], 1.0)})
        torch.testing.assert_close(_run(model).double(), want, rtol=1e-5, atol=1e-6)


def test_a_method_is_parsed_from_its_own_lines_not_its_whole_file(monkeypatch) -> None:
    """A model's file may hold thousands of lines never on a target's path: parsing diffusers'
    attention_processor.py whole took 0.3-0.5 s of an SDXL UNet's first inject."""
    parsed: list[int] = []
    parse = ast.parse

    def counted(source: str, *args: Any, **kwargs: Any) -> ast.AST:
        parsed.append(len(source))
        return parse(source, *args, **kwargs)

    monkeypatch.setattr(weight_reads.ast, "parse", counted)
    uses = class_uses(_Decorated)
    assert dict(uses.reads) == {"proj": "_Decorated._project"}
    assert {"out", "_project"} <= uses.calls
    assert parsed and max(parsed) < len(inspect.getsource(sys.modules[__name__])) // 4


def _exec_module(name: str, source: str, tmp_path, monkeypatch) -> types.ModuleType:
    """Module ``name`` run from ``source`` in a file of its own under ``tmp_path``."""
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(source, str(path), "exec"), vars(module))
    return module


_DEEP = """
from torch import nn


class Deep(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        if x is None:
            return self.out{chain}
        return self.out(x @ self.proj.weight.T)
"""


def test_an_expression_of_any_depth_is_read_without_recursing_on_it(tmp_path, monkeypatch) -> None:
    """An attribute chain or a chain of conditionals thousands deep (which Python compiles
    without parentheses) was an UnexpectedError (RecursionError) of inject; the read beside it
    is still found."""
    for chain in (".a" * 2000, "".join(" if x else self.out" for _ in range(1500))):
        module = _exec_module("_lorahot_deep_source", _DEEP.format(chain=chain), tmp_path, monkeypatch)
        weight_reads._CACHE.pop(module.Deep, None)
        with pytest.raises(lorahot.UsageError, match=r"Deep\.forward reads self\.proj\.weight"):
            lorahot.inject(module.Deep(), ["proj", "out"], max_rank=4)


class _Guarded:
    """A held object with slots and a ``__getattr__`` that raises for any other name."""

    __slots__ = ("scale",)

    def __init__(self) -> None:
        self.scale = 2.0

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(f"no {name}")

    def __deepcopy__(self, memo: dict[int, object]) -> _Guarded:
        return _Guarded()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _WithGuarded(_Pair):
    def __init__(self) -> None:
        super().__init__()
        self.guard = _Guarded()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.guard(self.proj(x)))


class _StandIn:
    """What a library may put in ``sys.modules`` for its module: no ``__dict__``, and a
    ``__getattr__`` that raises."""

    __slots__ = ()

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(f"no {name}")


_STANDING_IN = """
from torch import nn


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x):
        return self.out(self.proj(x))
"""


def test_objects_that_raise_on_attribute_lookup_are_read_without_running_it(tmp_path, monkeypatch) -> None:
    """A held object whose ``__getattr__`` raises, and a class whose module stands in
    ``sys.modules`` as such an object, were an UnexpectedError (RuntimeError) of inject; both
    inject and compute at the float64 reference now."""
    module = _exec_module("_lorahot_stand_in", _STANDING_IN, tmp_path, monkeypatch)
    monkeypatch.setitem(sys.modules, "_lorahot_stand_in", _StandIn())
    for build in (_WithGuarded, module.Pair):
        torch.manual_seed(0)
        base = build().eval()
        model = copy.deepcopy(base)
        runtime = lorahot.inject(model, ["proj", "out"], max_rank=4)
        tensors, ab = make_adapter(model, {"proj": 2, "out": 3}, seed=3)
        runtime.load(tensors)
        want = model_reference(base, _x(), {name: (*ab[name], 1.0) for name in ab})
        torch.testing.assert_close(_run(model).double(), want, rtol=1e-5, atol=1e-6)
