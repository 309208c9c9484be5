"""lorahot against PEFT across the transformers zoo: tiny random models of architectures with
unusual layers (shared layers, fused QKV, Conv1D, convolutions grouped, depthwise and weight-
normed, scaled or multiplied embeddings, relative position biases, MoE blocks, recurrent mixers,
vision and audio towers), a PEFT LoRA with nonzero B saved by ``save_pretrained``, loaded by
lorahot: unmerged and merged outputs equal PEFT's to float32 rounding (or merged inject refuses
with a ``UsageError`` where it documents it cannot), ``eject`` gives the base bitwise, and per-row
routings equal PEFT's ``adapter_names`` forward."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import lorahot

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RTOL = 1e-4
V = 64


def _ids(rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, V, (rows, length), generator=torch.Generator().manual_seed(seed))


def _text(rows: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(rows, 10, seed)}


def _seq2seq(rows: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(rows, 10, seed), "decoder_input_ids": _ids(rows, 6, seed + 1)}


def _pixels(rows: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(rows, 3, 32, 32, generator=torch.Generator().manual_seed(seed))}


def _audio(rows: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(rows, 800, generator=torch.Generator().manual_seed(seed))}


def _mel(rows: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(rows, 16, 64, generator=g), "decoder_input_ids": _ids(rows, 6, seed + 1)}


def _text_and_pixels(rows: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    return {**_text(rows, seed), **_pixels(rows, seed)}


DECODER = {
    "vocab_size": V,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
ENCODER = {k: v for k, v in DECODER.items() if k != "num_key_value_heads"}
SEQ2SEQ = {
    "vocab_size": V,
    "d_model": 32,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 48,
    "decoder_ffn_dim": 48,
    "max_position_embeddings": 64,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "decoder_start_token_id": 2,
}
T5 = {
    "vocab_size": V,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 48,
    "num_layers": 2,
    "num_heads": 4,
    "decoder_start_token_id": 0,
}
VIT = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
WAV2VEC2 = {
    **ENCODER,
    "conv_dim": (16, 16),
    "conv_kernel": (10, 3),
    "conv_stride": (5, 2),
    "num_conv_pos_embeddings": 8,
    "num_conv_pos_embedding_groups": 4,
}


def _clip() -> torch.nn.Module:
    text = {**ENCODER, "max_position_embeddings": 32}
    vision = {**VIT, "image_size": 32, "patch_size": 8}
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


#: name -> (model class, config class, config, inputs, LoraConfig fields, whether merged mode
#: refuses it (a weight tied to another module, a grouped or weight-normed conv, a weight the
#: model's code also reads).
ZOO: dict[str, tuple[str, str, dict[str, Any], Callable[..., dict[str, torch.Tensor]], dict[str, Any], bool]] = {
    "albert-shared-layers": (
        "AlbertModel",
        "AlbertConfig",
        {**ENCODER, "embedding_size": 16, "num_hidden_layers": 3},
        _text,
        {"target_modules": ["query", "value", "ffn", "embedding_hidden_mapping_in", "word_embeddings"]},
        False,
    ),
    "deberta-v2": (
        "DebertaV2Model",
        "DebertaV2Config",
        {**ENCODER, "relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 8},
        _text,
        {"target_modules": "all-linear", "use_rslora": True},
        False,
    ),
    "electra-tied": (
        "ElectraForMaskedLM",
        "ElectraConfig",
        {**ENCODER, "embedding_size": 16},
        _text,
        {"target_modules": ["query", "value", "embeddings_project", "word_embeddings"]},
        True,
    ),
    "t5": ("T5ForConditionalGeneration", "T5Config", T5, _seq2seq, {"target_modules": ["q", "v", "wi", "wo"]}, False),
    "bart": ("BartForConditionalGeneration", "BartConfig", SEQ2SEQ, _seq2seq, {"target_modules": "all-linear"}, False),
    "mbart-scaled-embeddings": (
        "MBartForConditionalGeneration",
        "MBartConfig",
        {**SEQ2SEQ, "scale_embedding": True},
        _seq2seq,
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
        True,
    ),
    "whisper": (
        "WhisperForConditionalGeneration",
        "WhisperConfig",
        {**SEQ2SEQ, "num_mel_bins": 16, "max_source_positions": 32, "max_target_positions": 32},
        _mel,
        {"target_modules": "all-linear"},
        False,
    ),
    "wav2vec2-convs": (
        "Wav2Vec2Model",
        "Wav2Vec2Config",
        WAV2VEC2,
        _audio,
        {"target_modules": ["q_proj", "v_proj", "conv"]},  # feature encoder and grouped weight-normed conv
        True,
    ),
    "hubert-ctc-head": (
        "HubertForCTC",
        "HubertConfig",
        WAV2VEC2,
        _audio,
        {"target_modules": "all-linear"},  # the CTC lm_head too, as PEFT: no get_output_embeddings()
        False,
    ),
    "vit": (
        "ViTModel",
        "ViTConfig",
        {**VIT, "image_size": 32, "patch_size": 8},
        _pixels,
        {"target_modules": ["query", "value", "projection"]},
        False,
    ),
    "swin": (
        "SwinModel",
        "SwinConfig",
        {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 2], "num_heads": [2, 4], "window_size": 4},
        _pixels,
        {"target_modules": "all-linear"},
        False,
    ),
    "convnext-depthwise": (
        "ConvNextModel",
        "ConvNextConfig",
        {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2},
        _pixels,
        {"target_modules": ["pwconv1", "pwconv2", "patch_embeddings"]},
        False,
    ),
    "resnet": (
        "ResNetModel",
        "ResNetConfig",
        {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "layer_type": "bottleneck"},
        _pixels,
        {"target_modules": ["convolution"]},
        False,
    ),
    "gpt-neo": (
        "GPTNeoForCausalLM",
        "GPTNeoConfig",
        {
            "vocab_size": V,
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 4,
            "attention_types": [[["global", "local"], 1]],
            "window_size": 4,
        },
        _text,
        {"target_modules": "all-linear"},
        False,
    ),
    "gpt-neox-fused-qkv": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        ENCODER,
        _text,
        {"target_modules": ["query_key_value", "dense_4h_to_h", "embed_in", "embed_out"]},
        False,
    ),
    "bloom": (
        "BloomForCausalLM",
        "BloomConfig",
        {"vocab_size": V, "hidden_size": 32, "n_layer": 2, "n_head": 4},
        _text,
        {"target_modules": "all-linear"},
        True,  # BloomAttention reads dense.weight on its pretraining_tp > 1 path
    ),
    "falcon": (
        "FalconForCausalLM",
        "FalconConfig",
        {
            "vocab_size": V,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "new_decoder_architecture": True,
            "num_kv_heads": 2,
        },
        _text,
        {"target_modules": "all-linear"},
        False,
    ),
    "opt-projections": (
        "OPTForCausalLM",
        "OPTConfig",
        {
            "vocab_size": V,
            "hidden_size": 32,
            "ffn_dim": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 16,
        },
        _text,
        {"target_modules": "all-linear"},
        False,
    ),
    "qwen2-moe": (
        "Qwen2MoeForCausalLM",
        "Qwen2MoeConfig",
        {
            **DECODER,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
        },
        _text,
        # attention and the shared expert's gate. PEFT 0.22 maps a target named down_proj, up_proj or
        # gate_proj on this model (the shared expert's too, and "all-linear") onto the experts'
        # fused weights (target_parameters), which lorahot refuses (test_formats)
        {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "shared_expert_gate"]},
        False,
    ),
    "gemma2-scaled-embeddings": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        {**DECODER, "head_dim": 8, "sliding_window": 4, "tie_word_embeddings": False},
        _text,
        {"target_modules": ["q_proj", "v_proj", "embed_tokens"]},
        False,
    ),
    "granite-multipliers": (
        "GraniteForCausalLM",
        "GraniteConfig",
        {
            **DECODER,
            "embedding_multiplier": 3.0,
            "logits_scaling": 2.0,
            "residual_multiplier": 0.5,
            "tie_word_embeddings": False,
        },
        _text,
        {"target_modules": ["q_proj", "embed_tokens", "lm_head"]},
        False,
    ),
    "cohere": (
        "CohereForCausalLM",
        "CohereConfig",
        {**DECODER, "logit_scale": 0.5},
        _text,
        {"target_modules": "all-linear"},
        False,
    ),
    "phi": ("PhiForCausalLM", "PhiConfig", DECODER, _text, {"target_modules": "all-linear"}, False),
    "rwkv": (
        "RwkvForCausalLM",
        "RwkvConfig",
        {
            "vocab_size": V,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "attention_hidden_size": 32,
            "intermediate_size": 48,
            "rescale_every": 1,  # an eval forward divides block i's value and output weights by 2**i in place
        },
        _text,
        {"target_modules": ["key", "value", "receptance", "embeddings"]},
        True,
    ),
    "jamba-read-dt-proj": (
        "JambaForCausalLM",
        "JambaConfig",
        {
            **DECODER,
            "num_experts": 2,
            "num_experts_per_tok": 1,
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "attn_layer_period": 2,
            "attn_layer_offset": 1,
            "mamba_d_state": 8,
            "mamba_d_conv": 4,
            "mamba_expand": 2,
            "mamba_dt_rank": 4,
        },
        _text,
        {"target_modules": "all-linear"},
        True,  # the mixer computes with dt_proj.weight
    ),
}

#: Models whose code computes with a module's weight and never calls the module: name ->
#: (model class, config class, config, inputs, that module).
READ_NOT_CALLED = {
    "mobilebert-prediction-head": (
        "MobileBertForMaskedLM",
        "MobileBertConfig",
        {**ENCODER, "embedding_size": 16, "intra_bottleneck_size": 16, "true_hidden_size": 16},
        _text,
        "cls.predictions.dense",
    ),
    "wavlm-attention": ("WavLMModel", "WavLMConfig", {**WAV2VEC2, "num_buckets": 16}, _audio, "q_proj"),
}

ZOO["clip-towers"] = (
    "CLIPModel",
    "",
    {},
    _text_and_pixels,
    {"target_modules": ["q_proj", "v_proj", "token_embedding", "patch_embedding", "position_embedding"]},
    True,  # interpolate_pos_encoding computes with position_embedding.weight
)


def _build(name: str) -> torch.nn.Module:
    model_cls, config_cls, config, *_ = ZOO[name] if name in ZOO else READ_NOT_CALLED[name]
    torch.manual_seed(0)
    if model_cls == "CLIPModel":
        return _clip().eval()
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()


def _outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The model's floating-point outputs (logits, hidden states, pooled outputs)."""
    with torch.no_grad():
        out = model(**inputs)
    found, todo = [], [out]
    while todo:
        item = todo.pop(0)
        if isinstance(item, torch.Tensor):
            found += [item] if item.is_floating_point() else []
        elif hasattr(item, "to_tuple"):
            todo += list(item.to_tuple())
        elif isinstance(item, (list, tuple)):
            todo += list(item)
    return found


def _rel(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    assert len(got) == len(want)
    return max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(got, want))


def _save(base: torch.nn.Module, path: Path, seed: int, **config: Any) -> torch.nn.Module:
    """A PEFT LoRA of random A and B (B large enough to matter), saved to ``path``."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path, save_embedding_layers=False)
    return model.eval()


@pytest.mark.parametrize("name", list(ZOO))
def test_a_peft_adapter_on_a_tiny_transformers_model_matches_peft(tmp_path: Path, name: str) -> None:
    """Unmerged, and merged where merged mode takes the targets, lorahot's outputs are PEFT's;
    where merged mode cannot fold an adapter the same (a weight tied to another module, a
    grouped conv, a weight the model's code also reads), merged inject refuses it and leaves the
    model as it was. Eject gives the base model's outputs bitwise."""
    *_, inputs, config, merged_refused = ZOO[name]
    base = _build(name)
    config = {"r": 4, "lora_alpha": 6, **config}
    oracle = _save(base, tmp_path, seed=3, **config)
    x = inputs()
    want, plain = _outputs(oracle, x), _outputs(base, x)
    assert _rel(want, plain) > 1e-3  # the adapter matters
    model = copy.deepcopy(base)
    targets = config["target_modules"]
    lorahot.inject(model, targets, max_rank=8).load(tmp_path)
    assert _rel(_outputs(model, x), want) < RTOL
    lorahot.eject(model)
    assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), plain, strict=True))
    merged = copy.deepcopy(base)
    if merged_refused:
        with pytest.raises(lorahot.UsageError, match="merged"):
            lorahot.inject(merged, targets, max_rank=8, merged=True)
        assert not any(isinstance(m, lorahot.LoRALayer) for m in merged.modules())
        return
    lorahot.inject(merged, targets, max_rank=8, merged=True).load(tmp_path)
    assert _rel(_outputs(merged, x), want) < RTOL


@pytest.mark.parametrize("name", ["t5", "bart", "whisper", "bloom", "gpt-neox-fused-qkv", "gemma2-scaled-embeddings"])
def test_a_routing_over_two_adapters_matches_peft_adapter_names(tmp_path: Path, name: str) -> None:
    """Two adapters of different ranks, alphas (one rsLoRA) and targets in two slots, and a
    base row: each row of the routed forward is PEFT's ``adapter_names`` forward's."""
    *_, inputs, config, _ = ZOO[name]
    base = _build(name)
    configs = {"a": {"r": 4, "lora_alpha": 6, **config}, "b": {"r": 8, "lora_alpha": 5, "use_rslora": True, **config}}
    for seed, (adapter, fields) in enumerate(configs.items()):
        _save(base, tmp_path / adapter, seed=seed, **fields)
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a").eval()
    oracle.load_adapter(tmp_path / "b", adapter_name="b")
    rows = ["a", "__base__", "b", "a"]
    x = inputs(rows=len(rows), seed=5)
    with torch.no_grad():
        want = _outputs(oracle, {**x, "adapter_names": rows})
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, config["target_modules"], max_rank=8, slots=2)
    runtime.load(tmp_path / "a", slot=0)
    runtime.load(tmp_path / "b", slot=1)
    runtime.activate([{"a": 0, "b": 1}.get(r, -1) for r in rows])
    got = _outputs(model, x)
    batched = [(a, b) for a, b in zip(got, want, strict=True) if b.shape[:1] == (len(rows),)]
    assert batched
    for a, b in batched:
        for i in range(len(rows)):
            assert float((a[i] - b[i]).norm() / b[i].norm()) < RTOL, (i, rows[i])


@pytest.mark.parametrize("name", list(READ_NOT_CALLED))
def test_a_module_the_model_reads_instead_of_calling_is_refused_where_peft_drops_its_lora(
    tmp_path: Path, name: str
) -> None:
    """MobileBERT's prediction head multiplies by ``dense.weight`` and WavLM's attention hands
    ``q_proj.weight`` to ``F.multi_head_attention_forward``: PEFT's LoRA there changes nothing
    (its outputs are the base model's to rounding), and merged lorahot applied it (MobileBERT's
    all-linear adapter 1.58 off PEFT's logits, WavLM's q/v/out_proj 0.15). lorahot refuses the
    target, unmerged and merged, naming the read, and leaves the model as it was."""
    *_, inputs, target = READ_NOT_CALLED[name]
    base = _build(name)
    x = inputs()
    oracle = _save(base, tmp_path, seed=3, r=4, lora_alpha=6, target_modules=[target])
    plain = _outputs(base, x)
    assert _rel(_outputs(oracle, x), plain) < 1e-6  # PEFT freezes the base weights: another attention kernel
    for merged in (False, True):
        model = copy.deepcopy(base)
        with pytest.raises(lorahot.UsageError, match=r"reads self\.\w+\.weight and nothing on its path calls it"):
            lorahot.inject(model, [target], max_rank=8, merged=merged)
        assert all(torch.equal(a, b) for a, b in zip(_outputs(model, x), plain, strict=True))


def test_an_encoder_decoder_generate_with_beams_routes_its_encoder_first(tmp_path: Path) -> None:
    """``generate(num_beams=k)`` runs T5's encoder on ``B`` rows and its decoder on ``B * k``: a
    routing fits one or the other and is refused by the layers of the other (UsageError). Encoded
    first under the prompts' routing, then generating from ``encoder_outputs`` under the routing
    repeated ``k`` times in place, gives PEFT's ``generate(adapter_names=...)`` tokens."""
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
    base = _build("t5")
    base.generation_config.pad_token_id = 0
    _save(base, tmp_path / "a", seed=1, r=4, lora_alpha=6, target_modules=["q", "v", "wi"])
    _save(base, tmp_path / "b", seed=2, r=2, lora_alpha=3, target_modules=["q", "k", "o"])
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a").eval()
    oracle.load_adapter(tmp_path / "b", adapter_name="b")
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["q", "k", "v", "o", "wi"], max_rank=4, slots=2)
    runtime.load(tmp_path / "a", slot=0)
    runtime.load(tmp_path / "b", slot=1)
    ids, slots, k = _ids(3, 8, 0), [0, -1, 1], 2
    options = {"max_new_tokens": 5, "do_sample": False, "num_beams": k}
    expanded = [s for s in slots for _ in range(k)]
    with torch.no_grad():
        want = oracle.generate(input_ids=ids, adapter_names=["a", "__base__", "b"], **options)
        for routing in (slots, expanded):
            runtime.activate(routing)
            with pytest.raises(lorahot.UsageError, match="does not fit a routing"):
                model.generate(input_ids=ids, **options)
        runtime.activate(slots)
        encoded = model.get_encoder()(input_ids=ids).last_hidden_state
        runtime.activate(expanded)
        got = model.generate(encoder_outputs=modeling_outputs.BaseModelOutput(last_hidden_state=encoded), **options)
    assert torch.equal(got, want)
