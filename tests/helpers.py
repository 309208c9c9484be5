"""Shared test helpers: dense float64 references, random PEFT adapters, tiny models.

The references here never call lorahot: they build the dense update ``dW`` from A and B and
run the base operation (or torch's own module for that operation) on it, in float64.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import gc
import json
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo.testing
import torch._inductor.compile_fx
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import lorahot

PREFIX = "base_model.model."


class Conv1D(nn.Module):
    """A transformers-style ``Conv1D``: ``x @ weight + bias`` with ``weight [in, out]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / math.sqrt(nx))
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class ScaledProj(nn.Module):
    """A custom linear-like module that only declares ``in_features`` / ``out_features``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(x) @ self.weight.t()


# -- geometry -----------------------------------------------------------------------------


def count_calls(f: Any) -> int:
    """How many Python and C functions ``f()`` calls on this thread (the garbage collector
    paused: no finalizer of an earlier test's objects runs inside). Work that must not grow
    faster than a model is counted at two sizes this way, never timed."""
    count = 0

    def counted(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        count += event in ("call", "c_call")

    gc.collect()
    gc.disable()
    sys.setprofile(counted)
    try:
        f()
    finally:
        sys.setprofile(None)
        gc.enable()
    return count


def features(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of a linear-like module, read independently of lorahot."""
    if isinstance(module, Conv1D) or type(module).__name__ == "Conv1D":
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def lora_shapes(module: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """PEFT file shapes of A and B for ``module`` at ``rank``."""
    if isinstance(module, nn.Embedding):
        return (rank, module.num_embeddings), (module.embedding_dim, rank)
    if isinstance(module, nn.modules.conv._ConvNd):
        k = tuple(module.kernel_size)
        return (rank, module.in_channels, *k), (module.out_channels, rank // module.groups, *(1,) * len(k))
    fin, fout = features(module)
    return (rank, fin), (fout, rank)


def random_lora(
    module: nn.Module, rank: int, gen: torch.Generator, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random A and B (both non-zero) in PEFT's layout for ``module``."""
    a_shape, b_shape = lora_shapes(module, rank)
    a = torch.randn(a_shape, generator=gen, dtype=torch.float64) / math.sqrt(math.prod(a_shape[1:]))
    b = torch.randn(b_shape, generator=gen, dtype=torch.float64) / math.sqrt(rank)
    return a.to(dtype), b.to(dtype)


# -- dense references ---------------------------------------------------------------------


def dense_delta_weight(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``dW`` in the base weight's orientation, float64.

    Linear ``[out, in]``; Conv1D ``[in, out]``; Embedding ``[num, dim]``; conv
    ``[out, in, *k]`` with all input channels (``dW[o] = B[o] @ A[rank slice of o's group]``),
    to be applied with ``groups=1``.
    """
    a, b = a.double(), b.double()
    if isinstance(module, nn.Embedding):
        return (b @ a).t()
    if isinstance(module, nn.modules.conv._ConvNd):
        g, rank = module.groups, a.shape[0]
        out, per = module.out_channels, rank // g
        a2 = a.reshape(rank, -1)
        b2 = b.reshape(out, per)
        rows = []
        for o in range(out):
            j = o // (out // g)
            rows.append(b2[o] @ a2[j * per : (j + 1) * per])
        return torch.stack(rows).view(out, *a.shape[1:])
    dw = b @ a  # [out, in]
    return dw.t() if type(module).__name__ == "Conv1D" else dw


def dense_delta(module: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``dW`` applied to ``x`` by the base operation, float64 (no bias)."""
    dw = dense_delta_weight(module, a, b)
    if isinstance(module, nn.Embedding):
        return F.embedding(x, dw)
    x = x.double()
    if isinstance(module, nn.modules.conv._ConvNd):
        conv = type(module)(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=1,
            bias=False,
            padding_mode=module.padding_mode,
            dtype=torch.float64,
            device=x.device,
        )
        with torch.no_grad():
            conv.weight.copy_(dw)
        return conv(x)
    if type(module).__name__ == "Conv1D":
        return x @ dw
    if isinstance(module, nn.Linear):
        return F.linear(x, dw)
    return x @ dw.t()  # custom linear-like: the LoRA path acts on the raw input


def merged_linear(module: nn.Linear, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """A Linear's output with the merged weight ``W + scale * B @ A``, float64."""
    w = module.weight.double() + scale * dense_delta_weight(module, a, b)
    bias = None if module.bias is None else module.bias.double()
    return F.linear(x.double(), w, bias)


def reference(
    module: nn.Module, x: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``base(x) + scale * dW(x)`` in float64, ``module`` left untouched."""
    base = copy.deepcopy(module).double()
    xin = x if isinstance(module, nn.Embedding) else x.double()
    with torch.no_grad():
        y = base(xin)
        if a is not None:
            y = y + scale * dense_delta(base, x, a, b)
    return y


def model_reference(
    model: nn.Module, x: torch.Tensor, loras: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]
) -> torch.Tensor:
    """A (non-injected) model's output in float64 with ``name -> (A, B, scale)`` added densely."""
    return stack_reference(model, x, [loras])


def stack_reference(
    model: nn.Module, x: torch.Tensor, parts: list[Mapping[str, tuple[torch.Tensor, torch.Tensor, float]]]
) -> torch.Tensor:
    """A (non-injected) model's output in float64 with every part's ``name -> (A, B, scale)``
    added densely: the parts' deltas summed (several adapters active together)."""
    ref = copy.deepcopy(model).double()
    hooks = []
    for loras in parts:
        for name, (a, b, scale) in loras.items():
            mod = ref.get_submodule(name)

            def hook(m, args, out, a=a, b=b, scale=scale):
                return out + scale * dense_delta(m, args[0], a, b)

            hooks.append(mod.register_forward_hook(hook))  # hooks chain: each adds its own delta
    xin = x if not x.is_floating_point() else x.double()
    with torch.no_grad():
        y = ref(xin)
    for h in hooks:
        h.remove()
    return y


# -- the compile contract -----------------------------------------------------------------


#: a compiled model's device and inductor mode: the CPU in the default mode, and CUDA under
#: CUDA graphs (``gpu``: skipped without a CUDA device)
COMPILED_DEVICES = [
    pytest.param("cpu", "default", id="cpu-default"),
    pytest.param("cuda", "reduce-overhead", marks=pytest.mark.gpu, id="cuda-reduce-overhead"),
]


def assert_swaps_without_recompile(
    runtime: Any,
    model: nn.Module,
    x: torch.Tensor,
    swaps: list[tuple[dict[str, torch.Tensor], torch.Tensor]],
    tol: float,
    mode: str = "default",
) -> None:
    """The compile contract of a runtime over ``model``: compiled once (inductor in ``mode``)
    and run on ``x`` three times (under ``reduce-overhead`` on CUDA: a warm-up, the CUDA graph's
    capture, a replay), then each of ``swaps`` (an adapter's tensors, the output it must give)
    loaded in turn under ``error_on_recompile=True``, every output within ``tol`` of its own
    (each a replay of the graph under CUDA graphs) and one frame compiled."""
    options = torch._inductor.list_mode_options(mode)
    counter = torch._dynamo.testing.CompileCounterWithBackend(
        functools.partial(torch._inductor.compile_fx.compile_fx, config_patches=options)  # type: ignore[arg-type]
    )
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for tensors, want in swaps:
                runtime.load(tensors)
                torch.testing.assert_close(compiled(x), want, rtol=tol, atol=tol)
    assert counter.frame_count == 1


#: a merged model in each half-precision dtype, on the CPU and on CUDA (``gpu``: skipped
#: without a CUDA device)
HALF_PRECISION = [
    pytest.param("cpu", torch.float16, id="cpu-float16"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param("cuda", torch.float16, marks=pytest.mark.gpu, id="cuda-float16"),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu, id="cuda-bfloat16"),
]


def assert_rounded_once(got: torch.Tensor, want: torch.Tensor) -> float:
    """A half-precision merged weight ``got`` is the float64 ``want`` computed in float32 and
    rounded once to its dtype: ``|got - want| <= u |want| + 64 u32 max|want| + tiny / 2``, ``u``
    the dtype's unit roundoff (half an ulp: 2^-11 for float16, 2^-8 for bfloat16) for the final
    rounding, ``64 u32`` (``u32`` = 2^-24) for float32's error over the few dozen products and
    sums of a merge, ``tiny / 2`` half the dtype's subnormal spacing (float16's entries near 0).
    Returns the bound at the largest ``|want|``, for the caller to check that the update it
    compares is far above it."""
    u = torch.finfo(got.dtype).eps / 2
    top = float(want.abs().max())
    atol = 64 * 2.0**-24 * top + torch.finfo(got.dtype).smallest_normal * u
    torch.testing.assert_close(got.detach().cpu().double(), want, rtol=u, atol=atol)
    return u * top + atol


def assert_merged_state(
    model: nn.Module, pristine: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor], scale: float
) -> None:
    """Every entry of a float64 ``model``'s state dict is ``pristine + scale * delta`` where
    ``deltas`` has one (a merged weight ``W + s B A``, a norm's ``w + s diff``), else ``pristine``."""
    for name, value in model.state_dict().items():
        want = pristine[name] + scale * deltas[name] if name in deltas else pristine[name]
        torch.testing.assert_close(value, want, rtol=1e-13, atol=1e-13, msg=name)


def assert_norm_deltas_fold(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    norms: Iterable[str],
    naming: str,
    pristine: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
) -> lorahot.LoraRuntime:
    """The file ``sd`` of norm deltas (and LoRAs) planned on ``model``: its ``norms`` are among
    the targets and merged mode is asked for; injected as planned, it loads in ``naming``, and
    at scales 1 and 0.5 the state is :func:`assert_merged_state`'s. Returns the runtime."""
    plan = lorahot.plan_targets(dict(sd), model)
    assert set(norms) <= set(plan.targets)
    assert plan.inject_options()["merged"] is True
    runtime = lorahot.inject(model, plan.targets, **plan.inject_options())
    assert runtime.load(dict(sd)).format == naming
    for s in (1.0, 0.5):
        runtime.set_scale(s)
        assert_merged_state(model, pristine, expected, s)
    return runtime


# -- PEFT adapters ------------------------------------------------------------------------


def peft_keys(module: nn.Module, name: str) -> tuple[str, str]:
    """The PEFT file keys of A and B for module ``name``."""
    if isinstance(module, nn.Embedding):
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def make_adapter(
    model: nn.Module, ranks: Mapping[str, int], seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Random PEFT-named tensors for the modules in ``ranks`` (names as in the base model).

    Returns:
        The tensors keyed as a PEFT file, and ``name -> (A, B)``.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors, ab = {}, {}
    for name, rank in ranks.items():
        module = _base(model.get_submodule(name))
        a, b = random_lora(module, rank, gen, dtype)
        ka, kb = peft_keys(module, name)
        tensors[ka], tensors[kb] = a, b
        ab[name] = (a, b)
    return tensors, ab


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def save_peft(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    r: int | None = None,
    lora_alpha: float | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
) -> Path:
    """Writes ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory``.

    The config states ``r`` as PEFT's always does (PEFT builds a module no ``rank_pattern``
    key matches at ``r``, 8 where the config has none): without ``r=``, the rank most modules
    have, and a ``rank_pattern`` entry (after the given ones) for each module of another rank
    that no given key covers. ``lora_alpha=None`` leaves it out (PEFT's default, 8).
    """
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    rank_pattern = dict(rank_pattern or {})
    if r is None:
        r, rank_pattern = _peft_ranks(tensors, rank_pattern)
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(alpha_pattern or {}),
        "use_rslora": use_rslora,
    }
    (directory / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return directory


def _peft_ranks(tensors: Mapping[str, torch.Tensor], given: dict[str, int]) -> tuple[int | None, dict[str, int]]:
    """The ``r`` and ``rank_pattern`` PEFT saves for the LoRA modules of ``tensors``: the most
    common rank, and each module of another rank that no ``given`` key covers by name (None
    and ``given`` without LoRA modules: a config's ``r`` is refused for LyCORIS ones)."""
    ranks = {
        key.removeprefix(PREFIX).removesuffix(end): int(t.shape[0])
        for key, t in tensors.items()
        for end in (".lora_A.weight", ".lora_embedding_A")
        if key.endswith(end)
    }
    if not ranks:
        return None, given
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    pattern = given | {name: rank for name, rank in ranks.items() if rank != r and _pattern_key(given, name) is None}
    for name, rank in ranks.items():  # a module's name must not catch another module (a suffix of its name)
        key = _pattern_key(pattern, name)
        if key not in given and (r if key is None else pattern[key]) != rank:
            raise ValueError(f"save_peft: {name} (rank {rank}) would get rank {pattern[key]} from key {key!r}")
    return r, pattern


def _pattern_key(pattern: Mapping[str, int], name: str) -> str | None:
    """The first key of ``pattern`` that matches module ``name`` by PEFT's rule, or None."""
    return next((key for key in pattern if re.match(rf"(.*\.)?({key})$", name)), None)


# -- tiny models --------------------------------------------------------------------------


class PropertyWeight(nn.Linear):
    """A dequantizing linear whose ``weight`` is a class property (int8 values times a scale):
    ``nn.Linear.__init__`` still stores a parameter under ``weight``, which torch's forward,
    reading the property, never sees."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        w = torch.randn(out_features, in_features)
        scale = w.abs().amax() / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, T, T)
        return self.o_proj(att @ v)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.self_attn = Attention(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm(x))
        return x + self.mlp(x)


class TinyLM(nn.Module):
    """``embed_tokens -> layers.{i}.(self_attn.{q,k,v,o}_proj, mlp.{up,down}_proj) -> lm_head``."""

    def __init__(self, vocab: int = 32, dim: int = 16, layers: int = 2, hidden: int = 24) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, hidden) for _ in range(layers))
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        x = self.embed_tokens(ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


def tiny_lm(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs: int) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kwargs).to(dtype)


class TinyConvNet(nn.Module):
    """``embed`` (ids -> channels) -> ``conv`` (grouped Conv2d) -> ``proj`` (Linear)."""

    def __init__(self, vocab: int = 16, ch: int = 8, out: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, ch)
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, groups=2)
        self.proj = nn.Linear(ch, out)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, H, W) -> (B, H, W, out)
        h = self.embed(ids).permute(0, 3, 1, 2)  # (B, C, H, W)
        h = F.silu(self.conv(h)).permute(0, 2, 3, 1)  # (B, H, W, C)
        return self.proj(h)


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet()


def token_ids(shape: tuple[int, ...], vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def lora_pair(
    stem: str, a_role: str, b_role: str, rank: int = 2, fin: int = 8, fout: int = 8
) -> dict[str, torch.Tensor]:
    """Random ``A [rank, fin]`` and ``B [fout, rank]`` under ``<stem>.<role>.weight`` keys."""
    return {f"{stem}.{a_role}.weight": torch.randn(rank, fin), f"{stem}.{b_role}.weight": torch.randn(fout, rank)}


class ScaledEmbedding(nn.Embedding):
    """transformers' ``GemmaTextScaledWordEmbedding``, rebuilt: the output times ``embed_scale``."""

    def __init__(self, num: int, dim: int, embed_scale: float | torch.Tensor) -> None:
        super().__init__(num, dim)
        if isinstance(embed_scale, torch.Tensor):
            self.register_buffer("embed_scale", embed_scale, persistent=False)
        else:
            self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale = self.embed_scale
        return super().forward(ids) * (scale.to(self.weight.dtype) if isinstance(scale, torch.Tensor) else scale)


#: The tiny decoder shape the transformers parity tests build (Llama, and others of its kind).
TINY_DECODER = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}


def tiny_llama(seed: int = 0, **config: Any) -> nn.Module:
    """transformers' ``LlamaForCausalLM`` of the :data:`TINY_DECODER` shape (with ``config``'s
    entries over it), seeded, in eval mode. Imports transformers."""
    import transformers

    torch.manual_seed(seed)
    llama_config = transformers.LlamaConfig(**{**TINY_DECODER, **config})
    model: nn.Module = transformers.LlamaForCausalLM(llama_config).eval()
    return model


def tiny_clip(with_projection: bool = False) -> nn.Module:
    """A two-layer transformers CLIP text encoder (width 32, vocabulary 64; with a 16-wide
    projection when ``with_projection``, as SDXL's second encoder), in eval mode, not seeded.
    Imports transformers."""
    import transformers

    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=16,
    )
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    model: nn.Module = cls(config).eval()
    return model


def tiny_unet(seed: int = 0, cross_attention_dim: int = 16, layers_per_block: int = 1, **layout: Any) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` small enough for the CPU (one cross-attention down
    block and one up block, 16/32 channels), seeded, in eval mode; ``layout`` overrides its
    configuration (``block_out_channels``, the block types, ...). Imports diffusers."""
    import diffusers

    config: dict[str, Any] = {
        "block_out_channels": (16, 32),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        **layout,
    }
    torch.manual_seed(seed)
    unet: nn.Module = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        **config,
    ).eval()
    return unet


class ConvEmbed(nn.Module):
    """An Embedding, a Conv2d (with a bias) and a Linear, one output per image: a model whose
    every LoRA layer kind but Conv1D is exercised by two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 12)
        self.conv = nn.Conv2d(3, 12, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(12, 10)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.conv(pixel_values).mean(dim=(-2, -1))  # (B, 12)
        return self.head(self.embed(input_ids).mean(dim=1) + image)  # (B, 10)


#: LyCORIS' ``LycorisNetwork`` class-level preset, which ``apply_preset`` sets for every later network
_LYCORIS_PRESET_ATTRS = (
    "ENABLE_CONV",
    "TARGET_REPLACE_MODULE",
    "TARGET_REPLACE_NAME",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "LORA_PREFIX",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)


@contextlib.contextmanager
def lycoris_targets(module_classes: list[str]) -> Iterator[Any]:
    """lycoris-lora's ``LycorisNetwork`` with a preset that targets ``module_classes`` (by class
    name), no names and no per-module algorithm; the class-level preset is put back after."""
    from lycoris import LycorisNetwork

    saved = {a: getattr(LycorisNetwork, a) for a in _LYCORIS_PRESET_ATTRS}
    try:
        LycorisNetwork.apply_preset({"target_module": module_classes, "target_name": [], "module_algo_map": {}})
        yield LycorisNetwork
    finally:
        for a, v in saved.items():
            setattr(LycorisNetwork, a, v)


def linear_at(root: nn.Module, path: str) -> None:
    """Adds an ``nn.Linear(4, 4)`` to ``root`` at the dotted ``path``, with plain modules for the
    levels it lacks."""
    *parents, leaf = path.split(".")
    for name in parents:
        if not hasattr(root, name):
            root.add_module(name, nn.Module())
        root = getattr(root, name)
    root.add_module(leaf, nn.Linear(4, 4))


def freeze_the_heap() -> None:
    """Collects the garbage, then moves every live object out of the collector's generations
    (``gc.freeze``): a later collection walks only what was made since. torch, transformers,
    diffusers and the test modules hold a few hundred thousand objects that every full
    collection (``gc.collect()`` in a test, or the collector's own) would otherwise walk again,
    up to a second each on a loaded machine. Objects made later are collected as before."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
