"""One lorahot runtime over a whole diffusers pipeline (UNet and both text encoders), compiled,
swapping a diffusers-named file, a kohya-named file and a unet-only file, then stacking two of
them in one slot and re-weighting them, without recompiling.

Builds a tiny SDXL pipeline from configs (no download; no VAE or tokenizers: the components are
called directly, with fixed token ids), writes a diffusers-named LoRA over the UNet and both text
encoders with diffusers' own ``save_lora_weights``, the same weights in kohya naming (diffusers'
``convert_state_dict_to_kohya``, alphas of half the rank) and a unet-only file. It sizes one
inject with :func:`lorahot.plan_targets` (headers only), injects into the pipeline itself
(duck-typed through ``pipe.components``: lorahot never imports diffusers), compiles the UNet and
the text encoders, and then runs one denoising step (DDIM) per phase: the diffusers file, the
kohya file, the kohya file at 0.5, the unet-only file (the text encoders are then bitwise their
base model), the diffusers file and the unet-only file stacked in one slot at 0.8 and 0.5 (the
UNet adds both, the text encoders take the diffusers file's part), the same stack re-weighted
to 0.3 and 1.2, and no adapter (``unload``: everything is base again). After the warm-up, all of
it runs under ``torch._dynamo.config.patch(error_on_recompile=True)``: 0 recompiles.

Run: ``python examples/pipeline_demo.py`` (CPU, a few seconds; ``--backend inductor`` to compile
with Inductor instead of the default ``aot_eager``, much slower to compile on the CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from safetensors.torch import save_file
from torch import nn

import lorahot

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TARGETS = {"unet": UNET_TARGETS, "text_encoder": TE_TARGETS, "text_encoder_2": TE_TARGETS}
COMPONENTS = list(TARGETS)
RANK = 4


def tiny_sdxl() -> diffusers.StableDiffusionXLPipeline:
    """A tiny SDXL pipeline from configs: the UNet cross-attends to both encoders' states, concatenated."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,  # text_encoder (32) + text_encoder_2 (32), as SDXL concatenates them
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
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
    te = transformers.CLIPTextModel(config).eval()
    te2 = transformers.CLIPTextModelWithProjection(config).eval()
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(4)
    return diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=None, tokenizer_2=None, unet=unet, scheduler=scheduler
    )


def lora_layers(model: nn.Module, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """Random rank-``RANK`` LoRA weights on every target Linear, PEFT-named without a prefix."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out[f"{name}.lora_A.weight"] = torch.randn(RANK, mod.in_features, generator=g) * 0.2
            out[f"{name}.lora_B.weight"] = torch.randn(mod.out_features, RANK, generator=g) * 0.2
    return out


def write_files(pipe: diffusers.StableDiffusionXLPipeline, tmp: Path) -> dict[str, Path]:
    """The diffusers-named file (diffusers' ``save_lora_weights``), its kohya twin, a unet-only file."""
    layers = {c: lora_layers(getattr(pipe, c), TARGETS[c], seed) for seed, c in enumerate(COMPONENTS, start=1)}
    pipe.save_lora_weights(
        tmp / "full",
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
    )
    full = {f"{c}.{k}": v for c, sd in layers.items() for k, v in sd.items()}
    kohya = convert_state_dict_to_kohya(full)
    kohya = {k: torch.tensor(RANK / 2) if k.endswith(".alpha") else v for k, v in kohya.items()}  # alpha = r/2
    save_file(kohya, tmp / "kohya.safetensors")
    pipe.save_lora_weights(tmp / "unet_only", unet_lora_layers=lora_layers(pipe.unet, UNET_TARGETS, seed=9))
    return {
        "diffusers": tmp / "full" / "pytorch_lora_weights.safetensors",
        "kohya": tmp / "kohya.safetensors",
        "unet-only": tmp / "unet_only" / "pytorch_lora_weights.safetensors",
    }


def graphs() -> int:
    """Graphs dynamo has compiled so far in this process (first compiles and recompiles)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def main(backend: str = "aot_eager", quiet: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Runs the demo; returns each phase's outputs (``text_encoder``, ``text_encoder_2`` and the
    denoised ``latents``) for the smoke test."""
    say = (lambda *a: None) if quiet else print
    torch._dynamo.reset()
    pipe = tiny_sdxl()
    ids = torch.tensor([[0, 5, 9, 3, 1]])  # a "prompt", already tokenized
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    t = pipe.scheduler.timesteps[0]
    models: dict[str, nn.Module] = {c: getattr(pipe, c) for c in COMPONENTS}

    def step() -> dict[str, torch.Tensor]:
        """Encodes the prompt with both text encoders, then one UNet call and one DDIM step."""
        with torch.no_grad():
            te = models["text_encoder"](ids).last_hidden_state
            te2 = models["text_encoder_2"](ids).last_hidden_state
            states = torch.cat([te, te2], dim=-1)
            noise = models["unet"](latents, t, encoder_hidden_states=states).sample
            out = pipe.scheduler.step(noise, t, latents).prev_sample
        return {"text_encoder": te, "text_encoder_2": te2, "latents": out}

    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(pipe, Path(tmp))
        base = step()  # eager, before inject: the reference for the unet-only file and unload

        # max_rank from the headers of the two files stacked later (their ranks summed per module:
        # it covers every file alone too); the targets are given per component (plan.targets,
        # from files alone, are component-relative module paths)
        plan = lorahot.plan_targets([files["diffusers"], files["unet-only"]], stacked=True)
        say(f"plan: {len(plan.targets)} modules over the files, max_rank={plan.max_rank}")
        runtime = lorahot.inject(pipe, TARGETS, max_rank=plan.max_rank)  # the pipeline itself

        # compiled in place of the pipeline's components: lorahot's buffers are read in place
        models = {c: torch.compile(getattr(pipe, c), backend=backend) for c in COMPONENTS}
        infos = {"diffusers": runtime.load(files["diffusers"])}
        start, before = time.perf_counter(), graphs()
        out = {"base": base, "diffusers": step()}  # warm-up: compiles each component once
        compiled = graphs() - before
        say(f"warm-up compiled {compiled} graph(s) in {time.perf_counter() - start:.1f}s")
        if compiled == 0:
            raise RuntimeError("nothing was compiled")

        after_warmup = graphs()
        with torch._dynamo.config.patch(error_on_recompile=True):
            infos["kohya"] = runtime.load(files["kohya"])
            out["kohya"] = step()
            runtime.set_scale(0.5)
            out["kohya x0.5"] = step()
            infos["unet-only"] = runtime.load(files["unet-only"])
            out["unet-only"] = step()
            infos["stack"] = runtime.load([files["diffusers"], files["unet-only"]], scale=[0.8, 0.5])
            out["stack 0.8/0.5"] = step()
            runtime.set_scale([0.3, 1.2])  # re-weights the stack: scales only
            out["stack 0.3/1.2"] = step()
            runtime.unload()
            out["unloaded"] = step()
        recompiles = graphs() - after_warmup

    say(f"{'phase':>13} | {'format':>9} | layers per component | max |diff| from base: unet step, te, te2")
    for phase, got in out.items():
        info = infos.get(phase.split(" ")[0])
        fmt = info.format if info and phase != "unloaded" else "-"
        layers = "/".join(str(info.components[c]) for c in COMPONENTS) if info else "-"
        diffs = ", ".join(f"{(got[k] - base[k]).abs().max().item():.2e}" for k in ("latents", *COMPONENTS[1:]))
        say(f"{phase:>13} | {fmt:>9} | {layers:>20} | {diffs}")
    say(f"recompiles: {recompiles}")

    if recompiles:
        raise RuntimeError(f"{recompiles} recompiles after warm-up")
    for c in ("text_encoder", "text_encoder_2"):
        if not torch.equal(out["unet-only"][c], base[c]):
            raise RuntimeError(f"after the unet-only file, {c} should give its base output bitwise")
    for k in base:
        if not torch.equal(out["unloaded"][k], base[k]):
            raise RuntimeError(f"after unload, {k} should be the base model's, bitwise")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend (aot_eager, inductor, ...)")
    main(parser.parse_args().backend)
