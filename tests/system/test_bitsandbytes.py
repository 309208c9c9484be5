"""LoRA over bitsandbytes' 4-bit and 8-bit Linears (QLoRA serving), against PEFT's LoRA over the
same quantized layers (PEFT dispatches them to its ``lora.bnb`` layers).

Unmerged, the layers add the LoRA to the quantized module's own output: PEFT saves the adapters
and computes the oracle, through loads, ``set_scale``, per-row routing, stacks, ``unload`` and
eject (the quantized modules back, bitwise), eagerly and compiled. On a CPU, ``Linear4bit``
repacks its weight and ``quant_state`` at its first call in eval mode: inject's probe forward
leaves them as they were. Merged mode and DoRA, which need the weight's values, are refused
naming the layer, nothing changed. Skipped where bitsandbytes is not installed (it is not a test
dependency: its wheel carries every CUDA build, and its import looks for Hub kernels).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorahot

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

TARGETS = ["q4", "q8"]


class _Model(nn.Module):
    """``q4`` a 4-bit NF4 Linear (64 -> 64), ``q8`` an 8-bit one (64 -> 32), ``head`` plain; in
    eval mode, as a served model is (sizes a multiple of bitsandbytes' CPU blocks)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        dense = nn.ModuleDict({"q4": nn.Linear(64, 64), "q8": nn.Linear(64, 32)})
        self.q4 = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        self.q8 = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=0.0)
        self.q4.load_state_dict(dense["q4"].state_dict())  # quantized by .to() below
        self.q8.load_state_dict(dense["q8"].state_dict())
        self.head = nn.Linear(32, 8)
        self.to("cpu").eval()
        self.is_loaded_in_4bit = self.is_loaded_in_8bit = True  # what PEFT dispatches on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.q8(F.gelu(self.q4(x)))))


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    """bitsandbytes warns on each 8-bit call that it casts its input to float16."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        yield
        logging.disable(logging.NOTSET)


def _bits(modules: list[nn.Module]) -> list[Any]:
    """Every parameter's data of ``modules`` and the attributes it carries (``quant_state``'s
    tensors and fields, ``CB``/``SCB``), copied, for a bitwise comparison."""
    out: list[Any] = []
    for module in modules:
        for p in module.parameters(recurse=False):
            out += [p.detach().clone(), *_fields(vars(p), depth=0)]
    return out


def _fields(namespace: dict[str, Any], depth: int) -> list[Any]:
    out: list[Any] = []
    for k, v in sorted(namespace.items()):
        if isinstance(v, torch.Tensor):
            out.append((k, v.detach().clone()))
        elif hasattr(v, "__dict__") and not callable(v) and depth < 2:
            out += [k, *_fields(vars(v), depth + 1)]
        else:
            out.append((k, v))
    return out


def _same(a: list[Any], b: list[Any]) -> bool:
    def equal(x: Any, y: Any) -> bool:
        if isinstance(x, tuple) and isinstance(y, tuple):
            return len(x) == len(y) and all(equal(i, j) for i, j in zip(x, y))
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        return type(x) is type(y) and not isinstance(x, torch.Tensor) and x == y

    return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))


def _peft(path: Path, seed: int, **config: Any) -> nn.Module:
    """A PEFT LoRA over a fresh quantized model (``lora.bnb`` layers), saved to ``path``."""
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, **config)
    model = peft.get_peft_model(_Model(), cfg)
    assert type(model.base_model.model.q4).__module__ == "peft.tuners.lora.bnb"
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_lora_over_bitsandbytes_layers_matches_peft(tmp_path: Path, compiled: bool) -> None:
    first = _peft(tmp_path / "first", 1, r=4, lora_alpha=8)
    second = _peft(tmp_path / "second", 2, r=2, lora_alpha=3, use_rslora=True)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        want1, want2 = first(x), second(x)
        with first.disable_adapter():
            base = first(x)
    model = _Model()
    modules = [model.q4, model.q8, model.head]
    before = _bits(modules)
    runtime = lorahot.inject(model, TARGETS, max_rank=8, slots=2, dtype=torch.float32)
    assert _same(_bits(modules), before)  # the probe's repacking of q4 undone
    run = torch.compile(model, backend="aot_eager") if compiled else model
    tol = {"rtol": 1e-5, "atol": 1e-5}
    with torch.no_grad():
        assert torch.equal(run(x), base)
        runtime.load(tmp_path / "first")
        runtime.load(tmp_path / "second", slot=1)
        torch.testing.assert_close(run(x), want1, **tol)
        runtime.activate([1, -1, 0])
        torch.testing.assert_close(run(x), torch.stack([want2[0], base[1], want1[2]]), **tol)
        runtime.activate(0)
        runtime.set_scale(0.5)
        for name in TARGETS:
            first.base_model.model.get_submodule(name).set_scale("default", 0.5)
        torch.testing.assert_close(run(x), first(x), **tol)
        runtime.load([tmp_path / "first", tmp_path / "second"], scale=[1.0, 1.0])
        first.load_adapter(tmp_path / "second", adapter_name="second")
        first.base_model.set_adapter(["default", "second"])
        for name in TARGETS:
            first.base_model.model.get_submodule(name).set_scale("default", 1.0)
        torch.testing.assert_close(run(x), first(x), **tol)
        runtime.unload()
        assert torch.equal(run(x), base)
        runtime.load(tmp_path / "first")
        warm = _bits(modules)  # after bitsandbytes' own calls (which repack q4 on some CPUs)
        runtime.eject()
        assert [model.q4, model.q8, model.head] == modules
        assert _same(_bits(modules), warm)
        assert torch.equal(model(x), base)


def test_merged_mode_and_dora_over_bitsandbytes_are_refused_naming_the_layer(tmp_path: Path) -> None:
    """A refused merged inject left ``q4`` repacked (its probe forward's change) before the
    probe put parameters back."""
    model = _Model()
    modules = [model.q4, model.q8, model.head]
    before = _bits(modules)
    for name, dtype in (("q4", "uint8"), ("q8", "int8")):
        with pytest.raises(lorahot.UsageError, match=rf"^{name}: its weight is torch.{dtype}, so merged mode cannot"):
            lorahot.inject(model, [name], max_rank=8, merged=True, dtype=torch.float32)
        assert [model.q4, model.q8, model.head] == modules and _same(_bits(modules), before)
    _peft(tmp_path, 3, r=4, lora_alpha=8, use_dora=True)  # PEFT dequantizes for its norm
    runtime = lorahot.inject(model, TARGETS, max_rank=8, dtype=torch.float32, extras=True)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"q4 \(.*\): DoRA's factor .* Linear4bit .* torch.uint8"):
        runtime.load(tmp_path)
    runtime.eject()
    assert [model.q4, model.q8, model.head] == modules and _same(_bits(modules), before)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(model(x), _Model()(x))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_transformers_model_loaded_in_4_or_8_bits_serves_a_qlora_adapter_as_peft(tmp_path: Path, bits: int) -> None:
    """The serving path end to end: a Llama saved and loaded again by transformers with
    ``BitsAndBytesConfig`` (its Linears quantized on load), PEFT's ``all-linear`` adapter over it
    (QLoRA), lorahot's ``all-linear`` inject (which leaves them bitwise as they were) and load,
    the same logits; eject gives the quantized modules back, bitwise."""
    transformers = pytest.importorskip("transformers")
    from tests.helpers import TINY_DECODER

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_DECODER, "hidden_size": 64, "intermediate_size": 128})
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=bits == 4, load_in_8bit=bits == 8, bnb_4bit_compute_dtype=torch.float32
    )

    def load() -> nn.Module:
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization, device_map="cpu", dtype=torch.float32
        ).eval()

    torch.manual_seed(1)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    oracle = peft.get_peft_model(load(), cfg)
    oracle.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, TINY_DECODER["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = oracle(input_ids=ids).logits
    model = load()
    kind = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    modules = [m for m in model.modules() if isinstance(m, kind)]
    assert len(modules) == 14  # q, k, v, o, gate, up, down in each of 2 layers
    before = _bits(modules)
    runtime = lorahot.inject(model, "all-linear", max_rank=4, dtype=torch.float32)
    assert _same(_bits(modules), before)
    runtime.load(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    warm = _bits(modules)  # bitsandbytes' first calls move CB/SCB and repack 4 bits on some CPUs
    runtime.eject()
    assert [m for m in model.modules() if isinstance(m, kind)] == modules and _same(_bits(modules), warm)
