"""Diffusion suite: one compiled denoising step of a diffusion model (an SDXL-shaped UNet, or a
Flux.1-shaped transformer) with a rank-64 LoRA on its attention and feed-forward linears, for the
base model, lorahot, lorahot merged and diffusers/PEFT (``enable_lora_hotswap`` +
``load_lora_adapter(hotswap=True)``) in one process; swaps from file; recompiles after a swap;
compile time; error against float32.

    python -m benchmarks.run --suite diffusion [--model sdxl|flux] [--configs base,lorahot,lorahot_merged,diffusers]
        [--modes default,reduce-overhead] [--regional] [--tiny] [--deadline-s 540] [--parallel]

Workloads (:data:`FAMILIES`), random weights in bf16:

- ``sdxl`` (the default): ``UNet2DConditionModel`` from the SDXL base config (:data:`SDXL_UNET`,
  2.57 B parameters), one CFG step (batch 2) on 128x128 latents (1024 px),
  ``encoder_hidden_states [2, 77, 2048]``, ``text_embeds [2, 1280]``, ``time_ids [2, 6]``; LoRA
  on :data:`TARGETS` (700 layers).
- ``flux``: ``FluxTransformer2DModel`` from the FLUX.1-dev config (:data:`FLUX_DEV`, 11.9 B
  parameters), one step at 1024 px (4096 packed latent tokens of 64 channels, 512 T5 tokens,
  guidance 3.5); LoRA on :data:`FLUX_TARGETS`, the layers diffusers' Flux LoRA training script
  targets by default (494 layers). Its base weights stay on the host between configurations
  (each holds 24 GB on the device); compile it with ``--regional`` to fit a call.

On a CPU, or with ``--tiny``, a small model of the same structure (:data:`TINY_UNET`,
:data:`TINY_FLUX`) in float32.

Adapters: made by PEFT on the model (``LoraConfig(target_modules=...)``, random A and B),
rounded to the model's dtype and written with the pipeline's ``save_lora_weights`` (``unet.`` or
``transformer.`` prefix, PEFT names, ``lora_adapter_metadata``): ``A`` rank 64 (alpha 64), ``B``
rank 32 (alpha 64). Every configuration runs with ``A``; swaps go to ``B`` and back, from the file.

Reference: the same weights in float32 with PEFT's layers injected (the adapter as made),
eager; every timed configuration's output is compared with it (``||out - ref|| / ||ref||``),
next to how far the adapter moves the reference (``adapter_effect``).

Compiling: ``torch.compile(model)`` on the whole model (what a user writes), or with
``--regional`` each repeated block in place (what diffusers' ``compile_repeated_blocks`` does:
the model's ``_repeated_blocks``; lorahot injected with
``regional=True``, so that identical blocks share a graph). Each configuration is
compiled once (``compile_s``: its first call), timed for one round, swapped and checked, and
saved; then every configuration is timed in interleaved rounds. A call cut off by its time
limit keeps every configuration it finished; with a deadline, a compile that would leave no
time for the last rounds is abandoned. Before any compile, the swaps are also timed on
uncompiled models (the same code), so the comparison with diffusers does not depend on its
compile fitting in the call.

``--parallel`` (:func:`run_parallel`): every configuration is prepared in its own process, all
at once, then swapped and timed one process at a time (:mod:`benchmarks.parallel`), so four
whole-model compiles fit one call; its compile times include the other processes' contention.
"""

from __future__ import annotations

import gc
import hashlib
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import lorahot
from benchmarks.common import COMPILE_CONFIGS, kernel_profile, median_ms, rel_err, sync
from benchmarks.parallel import Workers
from lorahot.kernels import extern_inputs, stacked_shrinks

#: diffusers' UNet2DConditionModel config of stabilityai/stable-diffusion-xl-base-1.0.
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": (5, 10, 20),
    "block_out_channels": (320, 640, 1280),
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": (1, 2, 10),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "upcast_attention": None,
    "use_linear_projection": True,
}

#: The same structure, small: 3 levels, text_time embedding, linear projections, 11 blocks.
TINY_UNET: dict[str, Any] = {
    **SDXL_UNET,
    "addition_time_embed_dim": 8,
    "attention_head_dim": (2, 4, 4),
    "block_out_channels": (32, 64, 64),
    "cross_attention_dim": 32,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,  # text_embeds + 6 time ids x 8
    "sample_size": 16,
    "transformer_layers_per_block": (1, 1, 2),
}

#: "to_q/to_k/to_v/to_out.0/ff" of the issue: the attention projections of attn1 and attn2,
#: and the feed-forward's two linears (GEGLU's ``proj`` and the output linear).
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]

#: diffusers' FluxTransformer2DModel config of black-forest-labs/FLUX.1-dev.
FLUX_DEV: dict[str, Any] = {
    "attention_head_dim": 128,
    "axes_dims_rope": (16, 56, 56),
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "out_channels": None,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

#: The same structure, small: one double block, two single blocks, 2 heads of 16.
TINY_FLUX: dict[str, Any] = {
    **FLUX_DEV,
    "attention_head_dim": 16,
    "axes_dims_rope": (4, 6, 6),
    "in_channels": 16,
    "joint_attention_dim": 32,
    "num_attention_heads": 2,
    "num_layers": 1,
    "num_single_layers": 2,
    "pooled_projection_dim": 32,
}

#: what diffusers' Flux LoRA training script (``train_dreambooth_lora_flux.py``) targets by
#: default: every attention projection of the double and single blocks, and the double blocks'
#: feed-forwards (image and text streams)
FLUX_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
ADAPTERS = {"A": (64, 64), "B": (32, 64)}  # name -> (rank, lora_alpha)
MAX_RANK = 64
CONFIGS = ("base", "lorahot", "lorahot_merged", "diffusers")
#: configurations beside the issue's, in ``diffusion_step_other_ms``: ``lorahot_unstacked`` is
#: lorahot compiled without the stacked-shrink pass (:mod:`lorahot.kernels.stacked_shrinks`),
#: ``lorahot_noextern`` without the rewrite of :mod:`lorahot.kernels.extern_inputs` (on by
#: default); both are process-wide switches, so with ``--parallel``, or prepared last
OTHER_CONFIGS = ("lorahot_unstacked", "lorahot_noextern")
DIFFUSERS_ADAPTER = "default_0"
ROUNDS = 3
SWAPS = 6  # timed swaps per configuration (B, A, B, A, ...), each followed by a step
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Family:
    """One kind of diffusion model the suite builds: its diffusers class, configs, LoRA targets,
    inputs, and the pipeline whose ``save_lora_weights`` writes its adapters (under ``prefix``)."""

    key: str
    name: str  # the full-size workload's name
    model_class: str  # a diffusers model class
    config: dict[str, Any]
    tiny: dict[str, Any]
    targets: list[str]
    prefix: str  # the component's prefix in a pipeline's LoRA file
    pipeline: str  # a diffusers pipeline class, for its save_lora_weights
    inputs: Callable[[dict[str, Any], bool, torch.device, torch.dtype], dict[str, Any]]
    #: keep the base weights on the host between configurations (each holds its own copy on the device)
    host_weights: bool = False

    def model_type(self) -> Any:
        import diffusers

        return getattr(diffusers, self.model_class)

    def save(self, directory: Path, state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        import diffusers

        getattr(diffusers, self.pipeline).save_lora_weights(
            directory,
            **{f"{self.prefix}_lora_layers": state, f"{self.prefix}_lora_adapter_metadata": metadata},
            weight_name=WEIGHT_NAME,
        )


@dataclass
class DiffusionWorkload:
    name: str
    config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype
    base_state: dict[str, torch.Tensor]
    adapters: dict[str, Path]  # adapter name -> directory holding WEIGHT_NAME
    inputs: dict[str, Any]  # the UNet's keyword arguments, in ``dtype``
    reference: dict[str, torch.Tensor] = field(default_factory=dict)  # "base", "A", "B": float32
    layers: int = 0
    adapter_bytes: dict[str, int] = field(default_factory=dict)
    family: str = "sdxl"  # a key of FAMILIES
    tiny: bool = False

    def fresh_model(self) -> torch.nn.Module:
        """A new model holding copies of the base weights on the device (built on the meta
        device: no init)."""
        with torch.device("meta"):
            model = FAMILIES[self.family].model_type()(**self.config)
        model.load_state_dict({k: v.to(self.device, copy=True) for k, v in self.base_state.items()}, assign=True)
        return model.eval().requires_grad_(False)

    def file(self, adapter: str) -> Path:
        return self.adapters[adapter] / WEIGHT_NAME


@contextmanager
def _exact_float32() -> Iterator[None]:
    """No TF32 in the reference (cuDNN convolutions use it by default)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _unet_inputs(config: dict[str, Any], tiny: bool, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """One CFG step: batch 2 at the config's sample size, 77 text tokens, SDXL's time ids."""
    g = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    time_ids = torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * 2, dtype=torch.float32)
    return {
        "sample": torch.randn(2, config["in_channels"], size, size, generator=g).to(device, dtype),
        "timestep": torch.tensor(500.0, device=device),  # a tensor, as schedulers pass it
        "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"], generator=g).to(device, dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, text, generator=g).to(device, dtype),
            "time_ids": time_ids.to(device, dtype),
        },
    }


def _flux_inputs(config: dict[str, Any], tiny: bool, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """One step at 1024 px as ``FluxPipeline`` calls the transformer (tiny: 4x4 latent tokens,
    8 text tokens): packed latents ``[1, 4096, 64]``, T5 states ``[1, 512, 4096]``, CLIP's pooled
    ``[1, 768]``, the latent tokens' (row, column) ids, zero text ids, guidance 3.5."""
    g = torch.Generator().manual_seed(1)
    side, text = (4, 8) if tiny else (64, 512)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    return {
        "hidden_states": torch.randn(1, side * side, config["in_channels"], generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=g).to(device, dtype),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype),
        "timestep": torch.tensor([0.5], device=device),  # float32, as the pipeline's scheduler gives it
        "img_ids": ids.reshape(-1, 3).to(device, dtype),
        "txt_ids": torch.zeros(text, 3).to(device, dtype),
        "guidance": torch.tensor([3.5], device=device),
    }


FAMILIES: dict[str, Family] = {
    "sdxl": Family(
        "sdxl",
        "SDXL UNet (random weights)",
        "UNet2DConditionModel",
        SDXL_UNET,
        TINY_UNET,
        TARGETS,
        "unet",
        "StableDiffusionXLPipeline",
        _unet_inputs,
    ),
    "flux": Family(
        "flux",
        "Flux.1-dev transformer (random weights)",
        "FluxTransformer2DModel",
        FLUX_DEV,
        TINY_FLUX,
        FLUX_TARGETS,
        "transformer",
        "FluxPipeline",
        _flux_inputs,
        host_weights=True,
    ),
}

#: inputs kept in float32 whatever the model's dtype (as the pipelines pass them)
_FLOAT32_INPUTS = ("timestep", "guidance")


def _to(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in inputs.items():
        if isinstance(v, dict):
            out[k] = _to(v, dtype)
        else:
            out[k] = v if k in _FLOAT32_INPUTS else v.to(dtype)
    return out


def build(
    tiny: bool,
    device: torch.device,
    workdir: Path | None = None,
    dtype: torch.dtype | None = None,
    family: str = "sdxl",
) -> DiffusionWorkload:
    """Builds the model once in float32 (the reference model), rounds its weights to the
    benchmark dtype, and makes, saves and applies the adapters; keeps the float32 outputs."""
    from peft import LoraConfig, get_peft_model_state_dict

    fam = FAMILIES[family]
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = fam.tiny if tiny else fam.config
    name = f"tiny {fam.key}-structured {fam.model_class}" if tiny else fam.name
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = fam.model_type()(**config).eval().requires_grad_(False)  # float32, default init
    base_state = {k: v.to(dtype).clone() for k, v in model.state_dict().items()}
    model.load_state_dict(base_state)  # the reference holds exactly the benchmark's weights
    if fam.host_weights and not tiny:
        base_state = {k: v.cpu() for k, v in base_state.items()}
    inputs = fam.inputs(config, tiny, device, dtype)
    inputs32 = _to(inputs, torch.float32)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="lorahot-diffusion-"))
    w = DiffusionWorkload(name, config, device, dtype, base_state, {}, inputs, family=family, tiny=tiny)
    with torch.inference_mode(), _exact_float32():
        w.reference["base"] = model(**inputs32).sample.float()
    for i, (adapter, (rank, alpha)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + i)
        lora_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=fam.targets, init_lora_weights=False)
        model.add_adapter(lora_config, adapter_name=adapter)
        model.set_adapter(adapter)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f"lora_B.{adapter}." in pname:  # B as spread as A, so the adapter moves the output
                    p.normal_(0, 0.05)
                if f".{adapter}." in pname:
                    p.copy_(p.to(dtype))  # saved in the model's dtype: the reference uses those values
        state = {
            k: v.to("cpu", dtype).contiguous()
            for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()
        }
        w.layers = len(state) // 2
        metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in lora_config.to_dict().items()}
        w.adapters[adapter] = workdir / adapter
        fam.save(w.adapters[adapter], state, metadata)  # what the pipeline writes
        w.adapter_bytes[adapter] = w.file(adapter).stat().st_size
        with torch.inference_mode(), _exact_float32():
            w.reference[adapter] = model(**inputs32).sample.float()
        model.delete_adapters(adapter)
    del model
    _free(device)
    print(
        f"[diffusion] {name}: {sum(v.numel() for v in base_state.values()) / 1e9:.3f} B parameters, "
        f"{w.layers} LoRA layers ({', '.join(fam.targets)}), adapters {w.adapter_bytes} bytes, "
        f"built in {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    return w


def adapter_effect(w: DiffusionWorkload) -> dict[str, float]:
    """How far each adapter moves the float32 output: ``||ref_adapter - ref_base|| / ||ref_base||``."""
    return {a: rel_err(w.reference[a], w.reference["base"]) for a in ADAPTERS}


# --- configurations -------------------------------------------------------------------------


def _compile(model: torch.nn.Module, mode: str, regional: bool, backend: str) -> Callable[..., Any]:
    kwargs: dict[str, Any] = {"backend": backend}
    if mode != "default":
        kwargs["mode"] = mode
    if not regional:
        return torch.compile(model, **kwargs)
    blocks = getattr(model, "_repeated_blocks", None) or ["BasicTransformerBlock"]
    compiled = 0
    for module in model.modules():  # what ModelMixin.compile_repeated_blocks does
        if type(module).__name__ in blocks:
            module.compile(**kwargs)
            compiled += 1
    if not compiled:
        raise RuntimeError(f"no {blocks} in {type(model).__name__}")
    return model


@dataclass
class Config:
    """One prepared configuration: its compiled step and what a swap does on it."""

    step: Callable[[], torch.Tensor]
    swap: Callable[[str], None] | None  # adapter name -> loads it from its file
    keep: Any  # what must stay alive (the model, the runtime)
    info: dict[str, Any]


def _stepper(model: Callable[..., Any], inputs: dict[str, Any]) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.inference_mode():
            return model(**inputs).sample

    return step


def _prepare(name: str, w: DiffusionWorkload, mode: str, regional: bool, backend: str | None) -> Config:
    """Builds one configuration with adapter ``A`` loaded and compiles it (the first call;
    ``backend=None``: not compiled)."""
    model = w.fresh_model()
    fam = FAMILIES[w.family]
    info: dict[str, Any] = {}
    swap: Callable[[str], None] | None = None
    keep: Any = model
    if name in ("lorahot", "lorahot_merged", *OTHER_CONFIGS):
        runtime = lorahot.inject(
            model, fam.targets, max_rank=MAX_RANK, merged=name == "lorahot_merged", regional=regional
        )
        if name == "lorahot_unstacked":
            stacked_shrinks.uninstall()
        extern_inputs.ENABLED = name != "lorahot_noextern"
        info["layers"] = len(runtime.layers)
        runtime.load(w.file("A"))

        def swap(adapter: str) -> None:
            runtime.load(w.file(adapter))

        keep = (model, runtime)
    elif name == "diffusers":
        model.enable_lora_hotswap(target_rank=MAX_RANK)
        model.load_lora_adapter(
            str(w.adapters["A"]), prefix=fam.prefix, adapter_name=DIFFUSERS_ADAPTER, weight_name=WEIGHT_NAME
        )
        info["lora_dtype"] = str(next(p.dtype for n, p in model.named_parameters() if "lora_A" in n))

        def swap(adapter: str) -> None:
            model.load_lora_adapter(
                str(w.adapters[adapter]),
                prefix=fam.prefix,
                adapter_name=DIFFUSERS_ADAPTER,
                weight_name=WEIGHT_NAME,
                hotswap=True,
            )

    elif name != "base":
        raise ValueError(f"unknown diffusion configuration {name!r}; choose from {CONFIGS + OTHER_CONFIGS}")
    step = _stepper(model if backend is None else _compile(model, mode, regional, backend), w.inputs)
    graphs = _unique_graphs()
    sync(w.device)
    t = time.perf_counter()
    out = step()
    sync(w.device)
    info["compile_s"] = round(time.perf_counter() - t, 1)
    info["graphs"] = _unique_graphs() - graphs
    ref = "base" if name == "base" else "A"
    info["rel_err"] = {ref: rel_err(out.float(), w.reference[ref])}
    return Config(step, swap, keep, info)


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _swaps(cfg: Config, w: DiffusionWorkload, swaps: int) -> dict[str, Any]:
    """``swaps`` timed swaps from file (B, A, B, ...), each followed by a step; the step after
    the first swap to B is checked against B's reference. Ends with A loaded. Counts graphs
    compiled meanwhile (0 = no recompile)."""
    assert cfg.swap is not None
    graphs = _unique_graphs()
    times, errs, allocs = [], {}, []
    order = ["B" if i % 2 == 0 else "A" for i in range(max(2, swaps + swaps % 2))]
    for adapter in order:
        sync(w.device)
        before = _alloc_calls(w.device)
        t = time.perf_counter()
        cfg.swap(adapter)
        sync(w.device)
        times.append((time.perf_counter() - t) * 1e3)
        allocs.append({k: v - before.get(k, 0) for k, v in _alloc_calls(w.device).items()})
        out = cfg.step()
        if adapter not in errs:
            errs[adapter] = rel_err(out.float(), w.reference[adapter])
    return {
        "swap_ms": statistics.median(times),
        "swap_ms_all": times,
        "swap_alloc_calls": allocs,
        "recompiles": _unique_graphs() - graphs,
        "swap_rel_err": errs,
    }


def _alloc_calls(device: torch.device) -> dict[str, int]:
    """The CUDA caching allocators' calls to the driver so far: device allocations (``cudaMalloc``)
    and pinned host blocks (``cudaHostAlloc``). Their growth over a swap says whether it waited
    on fresh memory (under CUDA graphs the first swaps took 150-200 ms, the later ones 40-50:
    tenth session)."""
    if device.type != "cuda":
        return {}
    out = {"device": int(torch.cuda.memory_stats(device).get("num_device_alloc", 0))}
    host = getattr(torch.cuda, "host_memory_stats", None)
    if host is not None:
        out["host"] = int(host().get("num_host_alloc", 0))
    return out


# --- the suite ------------------------------------------------------------------------------


def mode_label(mode: str, regional: bool, backend: str) -> str:
    how = "regional (each repeated block)" if regional else "whole model"
    return f"{mode}, {how}" + ("" if backend == "inductor" else f", backend {backend}")


def uncompiled_swaps(w: DiffusionWorkload, names: list[str]) -> dict[str, Any]:
    """Swaps from file on the uncompiled UNet (the same code as under compile, without a
    compile to wait for): measured first, so the swap comparison survives a call whose
    compiles do not all fit."""
    out: dict[str, Any] = {}
    for name in names:
        if name == "base":
            continue
        cfg = _prepare(name, w, "default", False, None)
        out[name] = {k: v for k, v in _swaps(cfg, w, SWAPS).items() if k != "recompiles"}
        out[name]["rel_err"] = cfg.info["rel_err"]
        print(f"[diffusion uncompiled] {name} swap {out[name]['swap_ms']:.1f} ms", flush=True)
        del cfg
        _free(w.device)
    return out


class OutOfTime(BaseException):
    """Raised by the alarm in :func:`_alarm` (a BaseException, so no ``except Exception`` in the
    compiler swallows it)."""


@contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    """Raises :class:`OutOfTime` in the main thread after ``seconds`` (None: never)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum: int, frame: object) -> None:
        raise OutOfTime

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _dynamo_limits() -> None:
    # the whole-model compiles' graph breaks and shapes; a regional lorahot without regional=True
    # would compile one graph per block
    torch._dynamo.config.cache_size_limit = 256
    for limit in ("recompile_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 1024)


def _names(only: list[str] | None) -> list[str]:
    names = [c for c in (only or CONFIGS) if c != "base"]
    unknown = [c for c in names if c not in CONFIGS + OTHER_CONFIGS]
    if unknown:
        raise ValueError(f"unknown diffusion configurations {unknown}; choose from {CONFIGS + OTHER_CONFIGS}")
    return ["base", *names]  # base in every run, first: ratios only hold within one run


def _header(w: DiffusionWorkload) -> dict[str, Any]:
    return {
        "diffusion": {
            "model": w.name,
            "layers": w.layers,
            "family": w.family,
            "targets": FAMILIES[w.family].targets,
            "adapters": {a: {"rank": r, "alpha": al, "bytes": w.adapter_bytes[a]} for a, (r, al) in ADAPTERS.items()},
            "adapter_dtype": str(w.dtype),
            "inputs": _shapes(w.inputs),
            "adapter_effect": adapter_effect(w),
            "modes": {},
        }
    }


def run(
    w: DiffusionWorkload,
    repeat: int,
    modes: list[str],
    only: list[str] | None = None,
    regional: bool = False,
    backend: str = "inductor",
    deadline: float | None = None,
    save: Callable[[dict[str, Any]], None] = lambda r: None,
    uncompiled: bool = True,
) -> dict[str, Any]:
    """First (``uncompiled``) the swaps on uncompiled models (:func:`uncompiled_swaps`); then per mode: prepares each configuration in the order of ``only`` (base first; compile,
    first timing round, swaps), saving after each, then times all of them in interleaved
    rounds. ``deadline`` (a ``time.perf_counter()`` value): a compile still running when only
    the time for the remaining rounds is left is abandoned (the configuration is reported as
    not compiled in time), and rounds that would end after it are not started."""
    _dynamo_limits()
    names = _names(only)
    out = _header(w)
    if uncompiled:
        out["diffusion"]["uncompiled"] = uncompiled_swaps(w, [n for n in names if n in ("lorahot", "diffusers")])
        save(out)
    for mode in modes:
        torch._dynamo.reset()
        label = mode_label(mode, regional, backend)
        results: dict[str, Any] = out["diffusion"]["modes"].setdefault(label, {})
        prepared: dict[str, Config] = {}
        round_s: dict[str, float] = {}  # wall time of one timing round per configuration
        for order, name in enumerate(names):
            reserve = 20.0 + (ROUNDS - 1) * sum(round_s.values())
            left = None if deadline is None else deadline - time.perf_counter() - reserve
            if left is not None and left <= 0:
                results[name] = {"skipped": "no time left before the deadline"}
                print(f"[diffusion {label}] {name} skipped: deadline", flush=True)
                continue
            t = time.perf_counter()
            try:
                with _alarm(left):
                    cfg = _prepare(name, w, mode, regional, backend)
            except OutOfTime:
                waited = round(time.perf_counter() - t, 1)
                results[name] = {
                    "skipped": f"not compiled in time: abandoned after {waited} s (deadline)",
                    "prepare_s_at_least": waited,
                }
                print(f"[diffusion {label}] {name} abandoned after {waited} s: deadline", flush=True)
                save(out)
                break
            cfg.info["prepare_s"] = round(time.perf_counter() - t, 1)
            cfg.info["compile_order"] = order
            prepared[name] = cfg
            results[name] = cfg.info
            print(f"[diffusion {label}] {name} ready: {cfg.info}", flush=True)
            t = time.perf_counter()
            _time_round([name], prepared, results, w, repeat, label)
            round_s[name] = time.perf_counter() - t
            if cfg.swap is not None:
                cfg.info.update(_swaps(cfg, w, SWAPS))
                print(
                    f"[diffusion {label}] {name} swap {cfg.info['swap_ms']:.1f} ms, recompiles {cfg.info['recompiles']}, "
                    f"rel err B {cfg.info['swap_rel_err'].get('B', float('nan')):.3g}",
                    flush=True,
                )
            save(out)
        for _ in range(2, ROUNDS + 1):
            if deadline is not None and time.perf_counter() + sum(round_s.values()) > deadline:
                print(f"[diffusion {label}] no time for another round", flush=True)
                break
            _time_round(list(prepared), prepared, results, w, repeat, label)
            save(out)
        del prepared
        _free(w.device)
    return out


# --- the suite, one process per configuration ---------------------------------------------

WORKLOAD_FILE = "workload.pt"


def save_workload(w: DiffusionWorkload) -> Path:
    """Writes what a worker needs to rebuild ``w`` (base weights, inputs, float32 reference
    outputs) next to the adapter files; returns the file."""
    path = w.adapters["A"].parent / WORKLOAD_FILE
    state = {
        "name": w.name,
        "config": w.config,
        "dtype": w.dtype,
        "base_state": _move(w.base_state, torch.device("cpu")),
        "adapters": {a: str(d) for a, d in w.adapters.items()},
        "inputs": _move(w.inputs, torch.device("cpu")),
        "reference": _move(w.reference, torch.device("cpu")),
        "layers": w.layers,
        "adapter_bytes": w.adapter_bytes,
        "family": w.family,
        "tiny": w.tiny,
    }
    torch.save(state, path)
    return path


def load_workload(path: Path, device: torch.device) -> DiffusionWorkload:
    """The workload :func:`save_workload` wrote, on ``device``."""
    s = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    family, tiny = s.get("family", "sdxl"), bool(s.get("tiny", False))
    host = FAMILIES[family].host_weights and not tiny
    return DiffusionWorkload(
        s["name"],
        s["config"],
        device,
        s["dtype"],
        _move(s["base_state"], torch.device("cpu") if host else device),
        {a: Path(d) for a, d in s["adapters"].items()},
        _move(s["inputs"], device),
        _move(s["reference"], device),
        s["layers"],
        s["adapter_bytes"],
        family,
        tiny,
    )


def _move(tree: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: _move(v, device) if isinstance(v, dict) else v.to(device) for k, v in tree.items()}


def checksum(w: DiffusionWorkload) -> str:
    """sha256 of the first and last 8 base weights, the inputs, the reference outputs and
    the adapter files' bytes: equal in every process that sees the same workload."""
    h = hashlib.sha256()
    keys = list(w.base_state)
    tensors = [w.base_state[k] for k in keys[:8] + keys[-8:]]
    tensors += [v for _, v in sorted(_flat(w.inputs).items())] + [w.reference[k] for k in sorted(w.reference)]
    for t in tensors:
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    for adapter in sorted(w.adapters):
        h.update(w.file(adapter).read_bytes())
    return h.hexdigest()[:16]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _worker(
    path: str, name: str, mode: str, regional: bool, backend: str, repeat: int, note: Callable[..., None]
) -> tuple[dict[str, Any], dict[str, Callable[[], Any]]]:
    """One configuration (a :class:`benchmarks.parallel.Workers` worker): loads the workload,
    prepares and checks the configuration (:func:`_prepare`, as the serial suite); then on
    request ``"swaps"`` (:func:`_swaps`) and ``"time"`` (one step's median)."""
    _dynamo_limits()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    w = load_workload(Path(path), device)
    sums = checksum(w)
    load_s = round(time.perf_counter() - t, 1)
    note(stage="preparing", since=time.time())
    t = time.perf_counter()
    cfg = _prepare(name, w, mode, regional, backend)
    cfg.info["prepare_s"] = round(time.perf_counter() - t, 1)
    cfg.info["load_s"] = load_s
    w.base_state = {}  # the configuration holds its own copy
    _free(device)
    handlers: dict[str, Callable[[], Any]] = {
        "time": lambda: median_ms(cfg.step, w.device, repeat=repeat, warmup=3),
        "swaps": lambda: _swaps(cfg, w, SWAPS) if cfg.swap is not None else {},
        "profile": lambda: kernel_profile(cfg.step, calls=3),
    }
    return {"checksum": sums, "info": cfg.info}, handlers


def run_parallel(
    w: DiffusionWorkload,
    repeat: int,
    modes: list[str],
    only: list[str] | None = None,
    regional: bool = False,
    backend: str = "inductor",
    deadline: float | None = None,
    save: Callable[[dict[str, Any]], None] = lambda r: None,
    uncompiled: bool = True,
    reserve_s: float | None = None,
) -> dict[str, Any]:
    """:func:`run` with every configuration prepared in its own process, all at once.

    Here, before spawning: the uncompiled swaps (as :func:`run`), then the workload goes to a
    file next to the adapters (base weights, inputs and the float32 reference outputs: computed
    once, here) and ``w``'s base weights are dropped. Each worker loads it and sends its
    :func:`checksum` with its ready payload; a worker whose checksum differs from this
    process's is left out. Once the workers are ready (or, with a ``deadline``, ``reserve_s``
    before it: the late ones are killed and reported as not compiled in time), each one in
    turn does its swaps while the others wait, then all are timed in interleaved rounds, one
    at a time. The results have the serial suite's fields (no ``compile_order``: all compile
    at once, contending for the host) and ``"parallel": true``."""
    names = _names(only)
    out = _header(w)
    out["diffusion"]["parallel"] = True
    if uncompiled:
        out["diffusion"]["uncompiled"] = uncompiled_swaps(w, [n for n in names if n in ("lorahot", "diffusers")])
        save(out)
    path = save_workload(w)
    expected = checksum(w)
    w.base_state = {}
    _free(w.device)
    if reserve_s is None:  # the swaps and ROUNDS rounds of every configuration, one at a time, and exits
        reserve_s = 10.0 if w.tiny else 60.0
    try:
        for mode in modes:
            label = mode_label(mode, regional, backend)
            results: dict[str, Any] = out["diffusion"]["modes"].setdefault(label, {})
            specs = {name: (_worker, (str(path), name, mode, regional, backend, repeat)) for name in names}
            with Workers(f"diffusion {label}", specs, join_s=10) as pool:  # 10: inside a call's margin

                def ready(name: str, payload: dict[str, Any]) -> None:
                    if payload["checksum"] != expected:
                        pool.fail(name, "error", f"saw another workload: {payload['checksum']} != {expected}")
                        results[name] = {"failed": pool.failed[name].message}
                        return
                    results[name] = payload["info"]
                    print(f"[diffusion {label}] {name} ready: {payload['info']}", flush=True)
                    save(out)

                pool.wait_ready(None if deadline is None else deadline - reserve_s, ready)
                for name in names:
                    if name not in pool.failed or name in results:
                        continue
                    fail = pool.failed[name]
                    if fail.kind == "late":
                        since = pool.notes.get(name, {}).get("since")
                        waited = round(time.time() - since, 1) if since is not None else 0.0
                        results[name] = {
                            "skipped": f"not compiled in time: abandoned after {waited} s (deadline)",
                            "prepare_s_at_least": waited,
                        }
                    else:
                        results[name] = {"failed": fail.message.strip().splitlines()[-1], "traceback": fail.message}
                save(out)
                for name in pool.live(names):
                    if name == "base":
                        continue
                    swaps = pool.request(name, "swaps", deadline)
                    if swaps is None:
                        results[name]["failed"] = pool.failed[name].message.strip().splitlines()[-1]
                        continue
                    results[name].update(swaps)
                    print(
                        f"[diffusion {label}] {name} swap {swaps['swap_ms']:.1f} ms, recompiles {swaps['recompiles']}, "
                        f"rel err B {swaps['swap_rel_err'].get('B', float('nan')):.3g}",
                        flush=True,
                    )
                    save(out)

                def timed(name: str, ms: float) -> None:
                    rounds = results[name].setdefault("step_ms_rounds", [])
                    rounds.append(ms)
                    results[name]["step_ms"] = statistics.median(rounds)

                def round_done(i: int) -> None:
                    live = [n for n in names if len(results.get(n, {}).get("step_ms_rounds", ())) > i]
                    print(
                        f"[diffusion {label}] step ms: "
                        + "  ".join(f"{n} {results[n]['step_ms_rounds'][i]:.2f}" for n in live),
                        flush=True,
                    )
                    save(out)

                pool.rounds(names, ROUNDS, on_answer=timed, on_round=round_done, deadline=deadline)
                if w.device.type == "cuda":  # what each compiled step launches (after the timing)
                    for name in pool.live(names):
                        if deadline is not None and time.perf_counter() > deadline - 5:
                            break
                        profile = pool.request(name, "profile", deadline)
                        if profile is not None:
                            results[name]["profile"] = profile
                            print(
                                f"[diffusion {label}] {name} profile: {profile['kernels_per_call']:.0f} kernels, "
                                f"{profile['gpu_us_per_call'] / 1e3:.2f} ms GPU, top {list(profile['top_us'].items())[:3]}",
                                flush=True,
                            )
                    save(out)
    finally:
        path.unlink(missing_ok=True)
    return out


def _free(device: torch.device) -> None:
    """Returns the memory of dropped configurations (lorahot's runtime and layers form cycles)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _shapes(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: _shapes(v) if isinstance(v, dict) else list(v.shape) for k, v in inputs.items()}


def _time_round(
    names: list[str],
    prepared: dict[str, Config],
    results: dict[str, Any],
    w: DiffusionWorkload,
    repeat: int,
    label: str,
) -> None:
    for name in names:
        ms = median_ms(prepared[name].step, w.device, repeat=repeat, warmup=3)
        rounds = results[name].setdefault("step_ms_rounds", [])
        rounds.append(ms)
        results[name]["step_ms"] = statistics.median(rounds)
    print(
        f"[diffusion {label}] step ms: " + "  ".join(f"{n} {results[n]['step_ms_rounds'][-1]:.2f}" for n in names),
        flush=True,
    )


def summary(raw: dict[str, Any], run_file: str = "") -> dict[str, Any]:
    """The ``latest.json`` fields of a diffusion run: the first mode's figures, every config
    key present (null where not run), so figures from different runs never mix in one dict.
    The UNet's fields are the issue's (``diffusion_step_ms``, ``compile_s.unet``, ...); another
    family's are named after it (``diffusion_flux_step_ms``, ``diffusion_flux_compile_s``, ...),
    so that a run of one never overwrites the other's and the issue's ``compile_s`` keeps
    exactly its keys (``llm``, ``unet``)."""
    d = raw.get("diffusion")
    if not d or not d.get("modes"):
        return {}
    fields = _summary(d, run_file)
    family = d.get("family", "sdxl")
    if family == "sdxl":
        return fields
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key.startswith("compile_s"):
            out[f"diffusion_{family}_{key}"] = value["unet"]
        else:
            out[key.replace("diffusion_", f"diffusion_{family}_", 1)] = value
    return out


def _summary(d: dict[str, Any], run_file: str) -> dict[str, Any]:
    by_mode = {}
    for label, res in d["modes"].items():
        by_mode[label] = {"model": d["model"], "mode": label, **{c: res.get(c, {}).get("step_ms") for c in CONFIGS}}
    gpu = {  # the profiled steps' kernel time (ms per step): the ratios without the host's drift
        lab: {c: r[c]["profile"]["gpu_us_per_call"] / 1000 for c in CONFIGS if "profile" in r.get(c, {})}
        for lab, r in d["modes"].items()
    }
    label, res = next(iter(d["modes"].items()))
    uncompiled = {c: d.get("uncompiled", {}).get(c, {}).get("swap_ms") for c in ("lorahot", "diffusers")}
    errs = {c: res.get(c, {}).get("rel_err", {}).get("A" if c != "base" else "base") for c in CONFIGS}
    # the fields the performance issue names hold exactly its keys; how they were taken goes to
    # diffusion_run
    other = {
        lab: {c: r[c]["step_ms"] for c in OTHER_CONFIGS if r.get(c, {}).get("step_ms") is not None}
        for lab, r in d["modes"].items()
    }
    return {
        "diffusion_step_ms": by_mode[label],
        "diffusion_step_ms_by_mode": by_mode,
        **({"diffusion_step_other_ms": other} if any(other.values()) else {}),
        **({"diffusion_gpu_ms_by_mode": gpu} if any(gpu.values()) else {}),
        "diffusion_swap_ms": {c: res.get(c, {}).get("swap_ms") for c in ("lorahot", "diffusers")},
        "diffusion_swap_uncompiled_ms": uncompiled,
        "diffusion_recompiles": {c: res.get(c, {}).get("recompiles") for c in CONFIGS if c != "base"},
        "diffusion_rel_err": {
            "mode": label,
            "adapter_effect": d["adapter_effect"],
            **errs,
            **{f"{c}_after_swap": res.get(c, {}).get("swap_rel_err", {}).get("B") for c in CONFIGS if c != "base"},
        },
        "compile_s": {"unet": {c: res.get(c, {}).get("compile_s") for c in COMPILE_CONFIGS}},
        "compile_s_all": {"unet": {c: res.get(c, {}).get("compile_s") for c in CONFIGS}},
        "diffusion_run": {
            "mode": label,
            "run_file": run_file,
            "merged_swap_ms": res.get("lorahot_merged", {}).get("swap_ms"),
            # abandoned compiles: lower bounds
            "compile_s_at_least": {c: res.get(c, {}).get("prepare_s_at_least") for c in CONFIGS},
            "parallel": bool(d.get("parallel")),  # compiled side by side: times include contention
        },
    }
