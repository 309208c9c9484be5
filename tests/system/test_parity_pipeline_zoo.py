"""One lorahot runtime over whole tiny diffusers pipelines of every shape: SD1.5 (UNet + CLIP),
SD3 (transformer + two CLIPs + T5) and Flux.1 (transformer + CLIP + T5), each called end to
end (two steps, ``output_type="latent"``, a fixed generator, classifier-free guidance where the
pipeline has it), in float64, against diffusers' own ``load_lora_weights``, ``set_adapters``,
``delete_adapters``, ``fuse_lora`` and ``unload_lora_weights`` as the oracle; swaps between files
of different component sets, loads that fail in a text encoder, and a compiled denoiser; and a
Wan 2.2 pipeline's two transformers compiled across the high- and low-noise files.

The pipelines are built offline from configs, with a word-level tokenizer built in memory and
no VAE (the latents are the output).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import pytest
import torch
from torch import nn

import lorahot
from tests.helpers import tiny_clip, tiny_unet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("peft")
from tests.system.test_parity_wan import _wan22, wan_file, wan_inputs  # noqa: E402

WORDS = ["a", "cat", "dog", "photo", "of", "red", "blue", "the"]
IDS = torch.tensor([[0, 5, 9, 3, 1]])


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=8, pad_token="<eos>", eos_token="<eos>", unk_token="<unk>"
    )


def _clip(projection: bool = False, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return tiny_clip(with_projection=projection)


def _t5(width: int) -> nn.Module:
    torch.manual_seed(5)
    config = transformers.T5Config(vocab_size=64, d_model=width, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    model: nn.Module = transformers.T5EncoderModel(config).eval()
    return model


def _sd15() -> diffusers.StableDiffusionPipeline:
    return diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=_clip(), tokenizer=_tokenizer(), unet=tiny_unet(cross_attention_dim=32),
        scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    ).to(torch.float64)  # fmt: skip


def _sd3() -> diffusers.StableDiffusion3Pipeline:
    """Two projected CLIPs (32 + 32 wide, pooled 16 + 16) and a T5 as wide as their joined states."""
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=8,
    ).eval()  # fmt: skip
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=_clip(True), tokenizer=_tokenizer(), text_encoder_2=_clip(True, seed=2),
        tokenizer_2=_tokenizer(), text_encoder_3=_t5(64), tokenizer_3=_tokenizer(),
    ).to(torch.float64)  # fmt: skip


def _flux() -> diffusers.FluxPipeline:
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=_clip(),
        tokenizer=_tokenizer(), text_encoder_2=_t5(16), tokenizer_2=_tokenizer(), transformer=transformer,
    ).to(torch.float64)  # fmt: skip


def _attention(name: str) -> bool:
    return ".attn" in name or ".ff" in name


def _clip_layer(name: str) -> bool:
    return name.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))


def _t5_layer(name: str) -> bool:
    return name.endswith((".q", ".k", ".v", ".o", ".wi", ".wo"))


#: pipeline -> (builder, component -> which of its Linears a file and the runtime target, call options);
#: the first component is the denoiser
PIPELINES: dict[str, tuple[Callable[[], object], dict[str, Callable[[str], bool]], dict]] = {
    "sd15": (_sd15, {"unet": _attention, "text_encoder": _clip_layer}, {"height": 64, "width": 64}),
    "sd3": (
        _sd3,
        {
            "transformer": lambda n: n.startswith("transformer_blocks.") and _attention(n),
            "text_encoder": _clip_layer,
            "text_encoder_2": _clip_layer,
            "text_encoder_3": _t5_layer,
        },
        {"height": 64, "width": 64, "max_sequence_length": 8},
    ),
    "flux": (
        _flux,
        {"transformer": lambda n: "blocks." in n, "text_encoder": _clip_layer, "text_encoder_2": _t5_layer},
        {"height": 32, "width": 32, "max_sequence_length": 8},
    ),
}
#: the components diffusers' loader of each pipeline loads (its T5 never)
DIFFUSERS_LOADS = {
    "sd15": ["unet", "text_encoder"],
    "sd3": ["transformer", "text_encoder", "text_encoder_2"],
    "flux": ["transformer", "text_encoder"],
}


def _targets(kind: str) -> dict[str, Callable[[str, nn.Module], bool]]:
    def matcher(keep: Callable[[str], bool]) -> Callable[[str, nn.Module], bool]:
        return lambda name, module: isinstance(module, nn.Linear) and keep(name)

    return {c: matcher(keep) for c, keep in PIPELINES[kind][1].items()}


def _file(pipe, kind: str, components: list[str], seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A diffusers-named LoRA (``<component>.<module>.lora_A.weight``) on every target of ``components``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in components:
        keep = PIPELINES[kind][1][c]
        for name, mod in getattr(pipe, c).named_modules():
            if isinstance(mod, nn.Linear) and keep(name):
                a = torch.randn(rank, mod.in_features, generator=g, dtype=torch.float64) * 0.2
                out[f"{c}.{name}.lora_A.weight"] = a
                out[f"{c}.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g, dtype=torch.float64)
                out[f"{c}.{name}.lora_B.weight"] *= 0.2
    return out


def _copy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sd.items()}  # diffusers' loaders pop from and rewrite what they are given


def _encodings(kind: str, pipe) -> dict[str, torch.Tensor]:
    """Every text encoder's last hidden states."""
    with torch.no_grad():
        return {c: getattr(pipe, c)(IDS)[0] for c in PIPELINES[kind][1] if c.startswith("text_encoder")}


def _outputs(kind: str, pipe) -> dict[str, torch.Tensor]:
    """The pipeline's latents after two steps, and every text encoder's last hidden states."""
    pipe.set_progress_bar_config(disable=True)
    negative = None if kind == "flux" else "blue dog"  # Flux.1 [dev] is guidance-distilled
    with torch.no_grad():
        latents = pipe(
            "a photo of a red cat", negative_prompt=negative, num_inference_steps=2,
            generator=torch.Generator().manual_seed(0), output_type="latent", **PIPELINES[kind][2],
        ).images  # fmt: skip
    return {"latents": latents, **_encodings(kind, pipe)}


def _tensors(pipe, components: Iterable[str]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (the LoRA buffers too) of ``components``, copied."""
    return {
        f"{c}.{name}": t.detach().clone()
        for c in components
        for name, t in [*getattr(pipe, c).named_parameters(), *getattr(pipe, c).named_buffers()]
    }


def _state(kind: str, pipe) -> dict[str, torch.Tensor]:
    """Every component's state dict (the same keys after inject), copied."""
    return {f"{c}.{k}": v.clone() for c in PIPELINES[kind][1] for k, v in getattr(pipe, c).state_dict().items()}


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-10, msg=f"{what}: {key}")


def _assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    changed = [key for key in want if not torch.equal(got[key], want[key])]
    assert not changed, f"{what}: {changed[:5]}"


@pytest.mark.parametrize("kind", PIPELINES)
def test_whole_pipeline_matches_load_set_adapters_delete_and_unload(kind: str) -> None:
    """A file of the denoiser and the text encoders stacked with a denoiser-only file, at two
    pairs of weights, as ``set_adapters``; then the denoiser-only file alone at its weight, as
    ``delete_adapters`` of the other leaves the pipeline (its text encoders bitwise their base);
    ``unload`` gives the base pipeline's latents and ``eject`` every parameter and buffer of every
    component back, bitwise."""
    build, components, _ = PIPELINES[kind]
    base = build()
    denoiser = next(iter(components))
    full = _file(base, kind, DIFFUSERS_LOADS[kind], seed=1)
    denoiser_only = _file(base, kind, [denoiser], seed=2, rank=3)
    oracle = copy.deepcopy(base)
    oracle.load_lora_weights(_copy(full), adapter_name="full")
    oracle.load_lora_weights(_copy(denoiser_only), adapter_name="denoiser")
    ours = copy.deepcopy(base)
    before, base_out = _tensors(ours, PIPELINES[kind][1]), _outputs(kind, ours)
    runtime = lorahot.inject(ours, _targets(kind), max_rank=8)
    info = runtime.load([full, denoiser_only], scale=[0.6, 1.4])
    assert [p.components[denoiser] for p in info.parts] == [info.components[denoiser]] * 2
    assert all(info.parts[1].components[c] == 0 for c in components if c != denoiser)
    for weights in ([0.6, 1.4], [-0.5, 0.8]):
        runtime.set_scale(weights)
        oracle.set_adapters(["full", "denoiser"], adapter_weights=weights)
        got, want = _outputs(kind, ours), _outputs(kind, oracle)
        assert not torch.allclose(got["latents"], base_out["latents"]), weights
        _assert_close(got, want, f"{kind} {weights}")
    oracle.delete_adapters("full")  # the other keeps its weight
    runtime.load(denoiser_only, scale=0.8)
    got = _outputs(kind, ours)
    _assert_close(got, _outputs(kind, oracle), f"{kind} after delete_adapters")
    _assert_bitwise({c: got[c] for c in got if c != "latents"}, {c: base_out[c] for c in got if c != "latents"}, kind)
    runtime.unload()
    _assert_bitwise(_outputs(kind, ours), base_out, f"{kind} unload")
    lorahot.eject(ours)
    _assert_bitwise(_tensors(ours, PIPELINES[kind][1]), before, f"{kind} eject")


@pytest.mark.parametrize("kind", PIPELINES)
def test_merged_pipeline_matches_fuse_lora_and_unloads_to_the_base_bitwise(kind: str) -> None:
    """Merged mode at a load's scale folds what ``fuse_lora(components=..., lora_scale=...)``
    folds into every component it loads; ``unload`` writes every component's weights back bitwise."""
    build, _, _ = PIPELINES[kind]
    base = build()
    full = _file(base, kind, DIFFUSERS_LOADS[kind], seed=3)
    oracle = copy.deepcopy(base)
    oracle.load_lora_weights(_copy(full))
    oracle.fuse_lora(components=DIFFUSERS_LOADS[kind], lora_scale=0.7)
    ours = copy.deepcopy(base)
    before, base_out = _state(kind, ours), _outputs(kind, ours)
    runtime = lorahot.inject(ours, _targets(kind), max_rank=8, merged=True)
    runtime.load(full, scale=0.7)
    _assert_close(_outputs(kind, ours), _outputs(kind, oracle), f"{kind} merged")
    runtime.unload()
    _assert_bitwise(_state(kind, ours), before, f"{kind} merged unload")
    _assert_bitwise(_outputs(kind, ours), base_out, f"{kind} merged unload")


def _swap_case(kind: str, merged: bool) -> tuple[object, lorahot.LoraRuntime, dict, dict]:
    """A pipeline, a runtime over it with nothing loaded, a file of every component, a denoiser-only file."""
    build, components, _ = PIPELINES[kind]
    pipe = build()
    denoiser = next(iter(components))
    full = _file(pipe, kind, list(components), seed=4)  # the T5 too, where the pipeline has one
    denoiser_only = _file(pipe, kind, [denoiser], seed=5, rank=2)
    runtime = lorahot.inject(pipe, _targets(kind), max_rank=8, merged=merged, slots=1 if merged else 2)
    return pipe, runtime, full, denoiser_only


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("kind", PIPELINES)
def test_swapping_to_a_file_without_text_encoder_modules_returns_every_text_encoder_to_base_bitwise(
    kind: str, merged: bool
) -> None:
    """A file of every component (T5 included), then one of the denoiser alone: every text encoder
    computes its base output bitwise; back and forth, and (unmerged) between two slots by
    ``activate``, the full file's embeddings are the same each time."""
    pipe, runtime, full, denoiser_only = _swap_case(kind, merged)
    base_out = _encodings(kind, pipe)
    info = runtime.load(full)
    assert all(info.components[c] > 0 for c in base_out)
    with_full = _encodings(kind, pipe)
    assert all(not torch.allclose(with_full[c], base_out[c]) for c in base_out)
    switches: list[Callable[[], object]] = [lambda: runtime.load(denoiser_only), lambda: runtime.load(full)] * 2
    if not merged:
        runtime.load(denoiser_only, slot=1)
        switches += [lambda: runtime.activate(1), lambda: runtime.activate(0)]
    for i, switch in enumerate(switches):
        switch()
        _assert_bitwise(_encodings(kind, pipe), with_full if i % 2 else base_out, f"{kind} switch {i}")


def _mismatched_text_encoder_parts(pipe, kind: str, full: dict[str, torch.Tensor]) -> dict[str, tuple[dict, str]]:
    """Files whose last text encoder's part does not fit -> (file, what the refusal names)."""
    encoder = [c for c in PIPELINES[kind][1] if c.startswith("text_encoder")][-1]
    a_key = next(k for k in full if k.startswith(encoder + ".") and k.endswith(".lora_A.weight"))
    module, b_key = a_key.removesuffix(".lora_A.weight"), a_key.replace(".lora_A.", ".lora_B.")
    cases = {
        "A's width": {**full, a_key: torch.randn(4, 7, dtype=torch.float64)},
        "B's rank": {**full, b_key: full[b_key][:, :2].clone()},
        "rank over max_rank": {
            **full,
            a_key: torch.randn(9, full[a_key].shape[1], dtype=torch.float64),
            b_key: torch.randn(full[b_key].shape[0], 9, dtype=torch.float64),
        },
        "no such module": {**full, a_key.replace(".lora_A.", "_x.lora_A."): full[a_key]},
    }
    return {name: (sd, module + "_x" if name == "no such module" else module) for name, sd in cases.items()}


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("kind", PIPELINES)
def test_a_file_whose_text_encoder_part_does_not_fit_changes_no_component(kind: str, merged: bool) -> None:
    """A load (alone into the active slot, or as the second part of a stack into the other) whose
    last text encoder's part does not fit is refused naming that component's module, and every
    parameter and buffer of every component, and the pipeline's latents, stay bitwise as they were."""
    pipe, runtime, full, denoiser_only = _swap_case(kind, merged)
    runtime.load(full)
    if not merged:
        runtime.load(denoiser_only, slot=1)
    before, out = _tensors(pipe, PIPELINES[kind][1]), _outputs(kind, pipe)
    for name, (bad, names) in _mismatched_text_encoder_parts(pipe, kind, full).items():
        for source, slot in ((bad, 0), ([denoiser_only, bad], 0 if merged else 1)):
            with pytest.raises(lorahot.AdapterMismatchError) as raised:
                runtime.load(source, slot=slot)
            assert names in str(raised.value), (name, str(raised.value))
            _assert_bitwise(_tensors(pipe, PIPELINES[kind][1]), before, f"{kind} {name} slot {slot}")
    _assert_bitwise(_outputs(kind, pipe), out, f"{kind} after the refusals")


def test_compiled_denoiser_swaps_between_component_sets_without_recompiling() -> None:
    """Flux.1's transformer compiled (``aot_eager``) once; loads of a file of every component and of a
    denoiser-only file, ``set_scale``, ``activate`` and ``unload`` then compute the eager latents
    and recompile nothing under ``error_on_recompile``; a new latent size does (negative control)."""
    kind = "flux"
    pipe, runtime, full, denoiser_only = _swap_case(kind, merged=False)
    base_out = _outputs(kind, pipe)
    denoiser = next(iter(PIPELINES[kind][1]))
    steps: list[tuple[str, Callable[[], object]]] = [
        ("full", lambda: runtime.load(full)),
        ("denoiser", lambda: runtime.load(denoiser_only)),
        ("half", lambda: runtime.set_scale(0.5)),
        ("slot 1", lambda: (runtime.load(full, slot=1), runtime.activate(1))),
        ("base", lambda: runtime.unload()),
    ]
    eager = {}
    for name, step in steps:
        step()
        eager[name] = _outputs(kind, pipe)
    assert torch.equal(eager["base"]["latents"], base_out["latents"])
    setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser), backend="aot_eager"))
    runtime.activate(0)
    runtime.load(denoiser_only)
    _outputs(kind, pipe)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name, step in steps:
            step()
            _assert_close(_outputs(kind, pipe), eager[name], f"{kind} compiled {name}")
        size = {k: 2 * v for k, v in PIPELINES[kind][2].items() if k in ("height", "width")}
        with pytest.raises(torch._dynamo.exc.RecompileError), torch.no_grad():  # negative control
            pipe("a cat", num_inference_steps=1, output_type="latent", **{**PIPELINES[kind][2], **size})


def _latents(kind: str, pipe, latents: torch.Tensor, prompt: list[str] | None, **options) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            prompt, num_inference_steps=2, latents=latents, output_type="latent", **PIPELINES[kind][2], **options
        ).images


def _encode_prompts(kind: str, pipe, prompts: list[str], k: int) -> dict[str, torch.Tensor]:
    """The README's recipe for a routed pipeline: the prompts' embeddings (``k`` images each,
    with negative ones where the pipeline guides), as the pipeline's call takes them."""
    if kind == "flux":
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompts, max_sequence_length=8, num_images_per_prompt=k)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    negative = ["the"] * len(prompts)
    if kind == "sd3":
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        encoded = pipe.encode_prompt(
            prompts, prompts, prompts, negative_prompt=negative, negative_prompt_2=negative,
            negative_prompt_3=negative, max_sequence_length=8, num_images_per_prompt=k,
        )  # fmt: skip
        return dict(zip(names, encoded, strict=True))
    embeds, negative_embeds = pipe.encode_prompt(prompts, "cpu", k, True, negative_prompt=negative)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}


@pytest.mark.parametrize("kind", PIPELINES)
def test_a_mixed_batch_over_a_whole_pipeline_gives_each_prompt_its_slot(kind: str) -> None:
    """Two prompts, two images each, each prompt on its own slot (one slot of every component,
    the other of the denoiser and the first text encoder only): encoded under ``activate(slots)``,
    then denoised under ``activate(r + r)`` (``r`` each prompt's slot repeated per image; ``r``
    alone for Flux.1, which does not guide), every image equals its prompt run alone with its
    slot active, from the same latents (float64)."""
    build, components, _ = PIPELINES[kind]
    pipe = build()
    files = [_file(pipe, kind, list(components), seed=6), _file(pipe, kind, list(components)[:2], seed=7, rank=3)]
    runtime = lorahot.inject(pipe, _targets(kind), max_rank=8, slots=2)
    for slot, sd in enumerate(files):
        runtime.load(sd, slot=slot)
    shape = (4, 4, 16) if kind == "flux" else (4, 4, 8, 8)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    prompts, k = ["a red cat", "a blue dog"], 2
    guided = {} if kind == "flux" else {"negative_prompt": ["the"]}
    alone = []
    for slot in (0, 1):
        runtime.activate(slot)
        alone.append(
            _latents(kind, pipe, latents[2 * slot : 2 * slot + 2], [prompts[slot]], num_images_per_prompt=k, **guided)
        )
    assert not torch.allclose(alone[0], alone[1])
    runtime.activate([0, 1])
    embeddings = _encode_prompts(kind, pipe, prompts, k)
    routing = [slot for slot in (0, 1) for _ in range(k)]
    runtime.activate(routing if kind == "flux" else routing + routing)
    got = _latents(kind, pipe, latents, None, **embeddings)
    torch.testing.assert_close(got, torch.cat(alone), rtol=1e-9, atol=1e-10)


WAN_COMPONENTS = ("transformer", "transformer_2", "text_encoder")


def _wan_inputs(size: int = 4) -> dict[str, torch.Tensor]:
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in wan_inputs().items()}
    inputs["hidden_states"] = torch.randn(1, 4, 2, size, size, generator=torch.Generator().manual_seed(1)).double()
    return inputs


def _wan_outputs(pipe) -> dict[str, torch.Tensor]:
    inputs = _wan_inputs()
    with torch.no_grad():
        return {
            "transformer": pipe.transformer(**inputs).sample,
            "transformer_2": pipe.transformer_2(**inputs).sample,
            "text_encoder": pipe.text_encoder(torch.tensor([[1, 5, 7, 2]])).last_hidden_state,
        }


def test_wan22_compiled_transformers_swap_high_and_low_noise_files_and_a_failed_stack_changes_neither() -> None:
    """A Wan 2.2 pipeline's two transformers compiled (``aot_eager``): the high- and low-noise
    files stacked in one slot (``denoiser=[None, "transformer_2"]``), each alone (the other
    transformer bitwise its base), re-weighted and unloaded compute the eager outputs without a
    recompile; a stack whose low-noise part does not fit ``transformer_2`` is refused naming its
    layer, every parameter and buffer of the three components bitwise as they were."""
    high = {k: v.double() for k, v in wan_file(("lora_A", "lora_B"), seed=7).items()}
    low = {k: v.double() for k, v in wan_file(("lora_down", "lora_up"), seed=8).items()}
    pipe = _wan22()
    base = _wan_outputs(pipe)
    runtime = lorahot.inject(pipe, "all-linear", max_rank=8)
    steps: list[tuple[str, Callable[[], object]]] = [
        ("both", lambda: runtime.load([high, low], denoiser=[None, "transformer_2"])),
        ("low", lambda: runtime.load(low, denoiser="transformer_2")),
        ("high", lambda: runtime.load(high)),
        ("high at 0.5", lambda: runtime.set_scale(0.5)),
        ("base", lambda: runtime.unload()),
    ]
    eager = {}
    for name, step in steps:
        step()
        eager[name] = _wan_outputs(pipe)
    assert torch.equal(eager["low"]["transformer"], base["transformer"])
    assert torch.equal(eager["high"]["transformer_2"], base["transformer_2"])
    _assert_bitwise(eager["base"], base, "unload")
    for c in ("transformer", "transformer_2"):
        setattr(pipe, c, torch.compile(getattr(pipe, c), backend="aot_eager"))
    runtime.load(high)
    _wan_outputs(pipe)  # compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name, step in steps:
            step()
            _assert_close(_wan_outputs(pipe), eager[name], f"compiled {name}")
        runtime.load([high, low], denoiser=[None, "transformer_2"])
        bad = dict(low)
        down = "diffusion_model.blocks.0.self_attn.q.lora_down.weight"
        bad[down] = bad[down][:, :3].clone()
        before = _tensors(pipe, WAN_COMPONENTS)
        out = _wan_outputs(pipe)
        with pytest.raises(lorahot.AdapterMismatchError, match=r"transformer_2\.blocks\.0\.attn1\.to_q"):
            runtime.load([high, bad], denoiser=[None, "transformer_2"])
        _assert_bitwise(_tensors(pipe, WAN_COMPONENTS), before, "after the refused stack")
        _assert_bitwise(_wan_outputs(pipe), out, "after the refused stack")
        with pytest.raises(torch._dynamo.exc.RecompileError), torch.no_grad():  # negative control
            pipe.transformer(**_wan_inputs(size=8))
