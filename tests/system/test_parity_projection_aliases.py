"""PEFT naming's attention-projection aliases against PEFT and diffusers: ``q_proj``/``k_proj``/
``v_proj``/``o_proj`` land on ``to_q``/``to_k``/``to_v``/``to_out.0`` only in a file of ACE-Step's
decoder projections with a ``q_proj`` or ``k_proj`` key, as diffusers' ACE-Step loader alone renames
them; on a tiny SD3 transformer (``transformer_blocks.0.attn.to_q``) PEFT's injection raises and
diffusers' model loader places such a key nowhere. The old diffusers naming's ``to_q`` -> ``q_proj``
likewise only as diffusers' text-encoder loader reads it: a text encoder's processor keys
(``to_q_lora``, ``to_out_lora``). Layers are compared in float64 by probing them with
the identity (:mod:`tests.diffusion_names`)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import lorahot
from tests.diffusion_names import assert_same, diffusers_weights, lorahot_weights, weights

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from tests.system.test_parity_original_names import tiny_ace_step  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(diffusers, "AceStepTransformer1DModel")
    or not hasattr(diffusers.loaders.lora_pipeline, "AceStepLoraLoaderMixin"),
    reason="needs a diffusers with ACE-Step",
)

_RENAMED = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out.0"}


def _tiny_sd3() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            caption_projection_dim=16,
            pooled_projection_dim=8,
            out_channels=4,
        )
        .double()
        .eval()
    )


def _file(model: nn.Module, layers: dict[str, str], head: str, seed: int) -> dict[str, torch.Tensor]:
    """``<head><file module>.lora_{A,B}.weight`` for each ``file module -> model layer`` of ``layers``."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for module, name in layers.items():
        layer = model.get_submodule(name)
        sd[f"{head}{module}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        sd[f"{head}{module}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g, dtype=torch.float64) * 0.3
    return sd


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _assert_refused_unchanged(make, sd: dict[str, torch.Tensor], key: str) -> None:  # type: ignore[no-untyped-def]
    model = make()
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    before = _state(model)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"{re.escape(key)}: matches no injected layer"):
        runtime.load({k: v.clone() for k, v in sd.items()})
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())


@pytest.mark.parametrize("head", ["base_model.model.", ""], ids=["peft", "bare"])
def test_another_models_projection_names_are_refused_where_peft_and_diffusers_place_them_nowhere(head: str) -> None:
    """A file of ``transformer_blocks.0.attn.q_proj``/``o_proj`` (no such layer) on SD3's transformer,
    whose layers are ``to_q``/``to_out.0``: PEFT's injection raises (no module of that name), diffusers'
    model loader places it nowhere, and lorahot placed it on ``to_q``/``to_out.0``, silently. Refused,
    bitwise unchanged; with ``strict=False`` beside the model's own ``attn.to_k`` every layer equals what
    PEFT's injection of the same file gives (``to_k`` adapted, the others not)."""
    stray = {f"transformer_blocks.0.attn.{p}": f"transformer_blocks.0.attn.{_RENAMED[p]}" for p in ("q_proj", "o_proj")}
    sd = _file(_tiny_sd3(), stray, head, seed=1)
    with pytest.raises(ValueError, match=r"Target modules .* not found in the base model"):
        peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=list(stray)), _tiny_sd3())
    _assert_refused_unchanged(_tiny_sd3, sd, "transformer_blocks.0.attn.q_proj")

    own = _file(_tiny_sd3(), {"transformer_blocks.0.attn.to_k": "transformer_blocks.0.attn.to_k"}, head, seed=2)
    names = sorted({*stray.values(), "transformer_blocks.0.attn.to_k"})
    ours, _ = lorahot_weights(_tiny_sd3, sd | own, names, strict=False)
    oracle = _tiny_sd3()
    bare = {k.removeprefix("base_model.model."): v.clone() for k, v in (sd | own).items()}
    modules = sorted({k.rpartition(".lora_")[0] for k in bare})
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=modules), oracle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = peft.set_peft_model_state_dict(oracle, bare)
    assert {k.rpartition(".lora_")[0] for k in result.unexpected_keys} == set(stray)
    assert_same(ours, weights(oracle, names))
    assert not torch.equal(
        ours["transformer_blocks.0.attn.to_k"], weights(_tiny_sd3(), names)["transformer_blocks.0.attn.to_k"]
    )


def _ace_step_projections(projections: tuple[str, ...]) -> dict[str, str]:
    return {
        f"layers.{i}.{attn}.{p}": f"layers.{i}.{attn}.{_RENAMED[p]}"
        for i in range(2)
        for attn in ("self_attn", "cross_attn")
        for p in projections
    }


def test_ace_step_s_projections_match_diffusers_ace_step_loader() -> None:
    """ACE-Step's adapters (its trainer targets the decoder's four projections) under PEFT's wrapper:
    each layer equals diffusers' ACE-Step loader's output, float64."""
    layers = _ace_step_projections(tuple(_RENAMED))
    sd = _file(tiny_ace_step(), layers, "base_model.model.", seed=3)
    names = sorted(layers.values())
    ours, fmt = lorahot_weights(tiny_ace_step, sd, names)
    assert fmt == "peft"
    theirs = diffusers_weights(tiny_ace_step, diffusers.loaders.lora_pipeline.AceStepLoraLoaderMixin, sd, names)
    assert all(not torch.equal(theirs[n], weights(tiny_ace_step(), [n])[n]) for n in names)  # each one adapted
    assert_same(ours, theirs)


def test_ace_step_s_value_and_output_projections_alone_are_refused_as_diffusers_loads_them_nowhere() -> None:
    """diffusers' ACE-Step loader renames only a file with a ``q_proj`` or ``k_proj`` key; a file of
    ``v_proj``/``o_proj`` alone it loads nowhere (every layer as before). lorahot placed them on ``to_v``
    and ``to_out.0``; now refused, bitwise unchanged."""
    layers = _ace_step_projections(("v_proj", "o_proj"))
    sd = _file(tiny_ace_step(), layers, "base_model.model.", seed=4)
    names = sorted(layers.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers_weights(tiny_ace_step, diffusers.loaders.lora_pipeline.AceStepLoraLoaderMixin, sd, names)
    assert_same(theirs, weights(tiny_ace_step(), names))
    _assert_refused_unchanged(tiny_ace_step, sd, "layers.0.cross_attn.o_proj")


def test_ace_step_s_projections_under_transformer_are_refused_as_diffusers_loads_them_nowhere() -> None:
    """Under ``transformer.`` (diffusers naming) the projections are no alias: diffusers' ACE-Step loader
    puts its ``transformer.`` in front of the file's own, and its model loader raises on the modules it
    then names (``transformer.layers.0.self_attn.to_q``, none of the model's). Refused, bitwise unchanged."""
    layers = _ace_step_projections(("q_proj",))
    sd = _file(tiny_ace_step(), layers, "transformer.", seed=5)
    names = sorted(layers.values())
    with pytest.raises(ValueError, match=r"Target modules .* not found in the base model"):
        diffusers_weights(tiny_ace_step, diffusers.loaders.lora_pipeline.AceStepLoraLoaderMixin, sd, names)
    _assert_refused_unchanged(tiny_ace_step, sd, "transformer.layers.0.cross_attn.q_proj")


def _tiny_clip() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        max_position_embeddings=16,
    )
    return transformers.CLIPTextModel(config).double().eval()


def _clip_file(spellings: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    """The old diffusers naming of a text encoder: ``text_encoder.text_model.encoder.layers.0.self_attn.``
    + each spelling's ``.down``/``.up`` weights, shaped for the tiny CLIP."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for spelling in spellings:
        stem = f"text_encoder.text_model.encoder.layers.0.self_attn.{spelling}"
        sd[f"{stem}.down.weight"] = torch.randn(2, 8, generator=g, dtype=torch.float64) * 0.3
        sd[f"{stem}.up.weight"] = torch.randn(8, 2, generator=g, dtype=torch.float64) * 0.3
    return sd


def _diffusers_text_encoder(sd: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    loader = diffusers.loaders.lora_pipeline.StableDiffusionLoraLoaderMixin
    model = _tiny_clip()
    state, alphas = loader.lora_state_dict({k: v.clone() for k, v in sd.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=model, prefix="text_encoder")
    return weights(model, names)


def test_old_text_encoder_keys_land_on_clips_projections_only_as_diffusers_text_encoder_loader_renames_them() -> None:
    """diffusers' text-encoder loader places a text encoder's old processor keys (``to_q_lora``,
    ``to_out_lora``) on CLIP's ``q_proj`` / ``out_proj``: lorahot gives the same layers. A
    ``to_k.lora.down`` key beside them it leaves unloaded, where lorahot's old naming placed it on
    ``k_proj``, silently: now refused naming the key, bitwise unchanged, and with ``strict=False`` every
    layer equals diffusers' output."""
    names = [f"encoder.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    processor = _clip_file(("processor.to_q_lora", "processor.to_out_lora"), seed=6)
    ours, fmt = lorahot_weights(_tiny_clip, processor, names)
    assert fmt == "diffusers-old"
    theirs = _diffusers_text_encoder(processor, names)
    assert not torch.equal(theirs[names[0]], weights(_tiny_clip(), names)[names[0]])
    assert_same(ours, theirs)

    dotted = processor | _clip_file(("to_k.lora",), seed=7)
    theirs = _diffusers_text_encoder(dotted, names)
    assert_same(theirs, _diffusers_text_encoder(processor, names))  # to_k.lora loaded nowhere
    _assert_refused_unchanged(_tiny_clip, dotted, "text_encoder.text_model.encoder.layers.0.self_attn.to_k")
    ours, _ = lorahot_weights(_tiny_clip, dotted, names, strict=False)
    assert_same(ours, theirs)
