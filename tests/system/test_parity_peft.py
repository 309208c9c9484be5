"""lorahot against PEFT as the oracle: adapters saved by ``save_pretrained`` on tiny
transformers models load into lorahot and give PEFT's eager outputs (fp32, rel. err < 1e-5)."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

import lorahot
from lorahot.io.config import INERT, READ, UNSUPPORTED
from tests.helpers import TINY_DECODER, ConvEmbed, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _peft_adapter(base: torch.nn.Module, path: Path, seed: int, **config) -> torch.nn.Module:
    """Trains nothing: a PEFT LoRA with random A and B, saved to ``path``; returns PEFT's model."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # PEFT zero-inits nothing with init_lora_weights=False; make B large enough to matter
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return model.eval()


def _fresh_peft(base: torch.nn.Module, path: Path) -> torch.nn.Module:
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


def _gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _conv_embed() -> torch.nn.Module:
    torch.manual_seed(0)
    return ConvEmbed().eval()


def _tokens(seed: int = 1) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))}


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_tokens()).logits


def _conv_embed_out(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        return model(
            input_ids=torch.randint(0, 64, (2, 10), generator=g), pixel_values=torch.randn(2, 3, 16, 16, generator=g)
        )


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "llama_patterns": (
        tiny_llama,
        _logits,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": LLAMA_TARGETS,
            "rank_pattern": {"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2},
            "alpha_pattern": {"v_proj": 3.0, "up_proj": 20},
        },
    ),
    "llama_rslora": (
        tiny_llama,
        _logits,
        {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_TARGETS, "use_rslora": True, "rank_pattern": {"o_proj": 6}},
    ),
    "gpt2_conv1d": (
        _gpt2,
        _logits,
        {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
    ),
    "conv2d_embedding": (
        _conv_embed,
        _conv_embed_out,
        {
            "r": 4,
            "lora_alpha": 6,
            "target_modules": ["embed", "conv", "head"],
            "rank_pattern": {"conv": 2},
            "alpha_pattern": {"embed": 2.5},
        },
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_adapter_matches_peft(tmp_path: Path, case: str) -> None:
    build, run, config = CASES[case]
    base = build()
    oracle = _peft_adapter(base, tmp_path, seed=3, **config)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, config["target_modules"], max_rank=8)
    info = runtime.load(tmp_path)
    assert info.format == "peft"
    assert len(info.ranks) == len(runtime.layers)
    assert _rel(run(model), run(oracle)) < RTOL
    assert _rel(run(model), run(base)) > 1e-3  # the adapter does change the outputs


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("rslora", [False, True], ids=["r", "rslora"])
@pytest.mark.parametrize("alpha", [0, -8, -0.5])
def test_zero_and_negative_alpha_match_peft(
    tmp_path: Path, alpha: float, rslora: bool, dora: bool, merged: bool
) -> None:
    """PEFT takes any finite lora_alpha and alpha_pattern value and scales by alpha / r (or
    / sqrt(r)): 0 turns the low-rank update off (DoRA still rescales the base weight by
    magnitude / norm), a negative alpha flips its sign, inside DoRA's norm too. Float64 model,
    PeftModel.from_pretrained as the oracle."""
    base = tiny_llama().double()
    patterns = {"v_proj": 0, "o_proj": -3, r"layers\.1\.mlp\.up_proj": 12, "gate_proj": -0.0}
    config = {"r": 4, "lora_alpha": alpha, "alpha_pattern": patterns, "use_rslora": rslora, "use_dora": dora}
    _peft_adapter(base, tmp_path, seed=3, target_modules=LLAMA_TARGETS, **config)
    oracle = _fresh_peft(base, tmp_path)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, LLAMA_TARGETS, max_rank=8, merged=merged, extras=dora and not merged)
    runtime.load(tmp_path)
    assert _rel(run := _logits(model), _logits(oracle)) < 1e-10
    assert _rel(run, _logits(base)) > 1e-3  # the adapter does change the outputs
    alphas = {k.split("layers.")[-1]: m.alpha for k, m in lorahot.read_adapter(tmp_path).modules.items()}
    assert (alphas["0.self_attn.v_proj"], alphas["1.self_attn.o_proj"], alphas["0.self_attn.q_proj"]) == (0, -3, alpha)


def test_rank_pattern_adapter_after_another_matches_fresh_peft(tmp_path: Path) -> None:
    base = tiny_llama()
    _peft_adapter(base, tmp_path / "uniform", seed=4, r=8, lora_alpha=32, target_modules=LLAMA_TARGETS)
    _peft_adapter(base, tmp_path / "pattern", seed=5, **CASES["llama_patterns"][2])
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, LLAMA_TARGETS, max_rank=8)
    runtime.load(tmp_path / "uniform")
    runtime.load(tmp_path / "pattern")
    assert _rel(_logits(model), _logits(_fresh_peft(base, tmp_path / "pattern"))) < RTOL


def test_fused_qkv_matches_separate_projections(tmp_path: Path) -> None:
    """A q/k/v (and gate/up) adapter loads into a model whose projections are fused."""
    base = tiny_llama()
    config = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": LLAMA_TARGETS,
        "rank_pattern": {"k_proj": 2},
        "alpha_pattern": {"v_proj": 3.0},
    }
    oracle = _peft_adapter(base, tmp_path, seed=6, **config)
    fused = _fuse_llama(copy.deepcopy(base))
    with torch.no_grad():
        assert _rel(fused(**_tokens()).logits, _logits(base)) < 1e-6
    runtime = lorahot.inject(fused, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], max_rank=16)
    info = runtime.load(
        tmp_path, fuse={"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    )
    assert info.ranks["model.layers.0.self_attn.qkv_proj"] == 4 + 2 + 4
    with torch.no_grad():
        assert _rel(fused(**_tokens()).logits, _logits(oracle)) < RTOL


def test_fused_part_missing_needs_its_size(tmp_path: Path) -> None:
    base = tiny_llama()
    oracle = _peft_adapter(base, tmp_path, seed=7, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    fused = _fuse_llama(copy.deepcopy(base))
    runtime = lorahot.inject(fused, ["qkv_proj"], max_rank=8)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"qkv_proj: no LoRA for part 'k_proj' and no size for it; pass \('k_proj', out_features\)",
    ):
        runtime.load(tmp_path, fuse={"qkv_proj": ["q_proj", "k_proj", "v_proj"]})
    runtime.load(tmp_path, fuse={"qkv_proj": ["q_proj", ("k_proj", 16), "v_proj"]})
    with torch.no_grad():
        assert _rel(fused(**_tokens()).logits, _logits(oracle)) < RTOL


class _Fused(torch.nn.Module):
    """One Linear computing several projections; the model sees the parts as views."""

    def __init__(self, parts: list[torch.nn.Linear]) -> None:
        super().__init__()
        self.sizes = [p.out_features for p in parts]
        self.proj = torch.nn.Linear(parts[0].in_features, sum(self.sizes), bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.cat([p.weight for p in parts]))


class _Slice(torch.nn.Module):
    def __init__(self, owner: torch.nn.Module, attr: str, index: int) -> None:
        super().__init__()
        self.__dict__["_owner"], self._attr, self._index = owner, attr, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner = self.__dict__["_owner"]
        fused = getattr(owner, self._attr)
        return fused(x).split(owner.__dict__["_sizes_" + self._attr], dim=-1)[self._index]


def _fuse_llama(model: torch.nn.Module) -> torch.nn.Module:
    """Replaces q/k/v by ``qkv_proj`` and gate/up by ``gate_up_proj`` (computed once per part)."""
    for layer in model.model.layers:
        for owner, fused, parts in (
            (layer.self_attn, "qkv_proj", ["q_proj", "k_proj", "v_proj"]),
            (layer.mlp, "gate_up_proj", ["gate_proj", "up_proj"]),
        ):
            mods = [getattr(owner, p) for p in parts]
            f = _Fused(mods)
            setattr(owner, fused, f.proj)
            owner.__dict__["_sizes_" + fused] = f.sizes
            for i, p in enumerate(parts):
                setattr(owner, p, _Slice(owner, fused, i))
    return model


# -- scaled embeddings (Gemma) -----------------------------------------------------------------------

GEMMAS = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def _gemma(kind: str, tie: bool = True) -> torch.nn.Module:
    config_cls, model_cls = (getattr(transformers, n) for n in GEMMAS[kind])
    torch.manual_seed(0)
    return model_cls(config_cls(**TINY_DECODER, head_dim=8, tie_word_embeddings=tie)).eval()


@pytest.mark.parametrize("kind", list(GEMMAS))
def test_gemma_scaled_embedding_matches_peft(tmp_path: Path, kind: str) -> None:
    """Gemma's embeddings multiply their output by sqrt(hidden); PEFT scales the embedding
    LoRA by the same factor, and so must lorahot (before: rel. error 0.05-0.43)."""
    base = _gemma(kind)
    assert type(base.model.embed_tokens).__name__.endswith("ScaledWordEmbedding")
    targets = ["embed_tokens", "q_proj", "v_proj"]
    torch.manual_seed(3)
    oracle = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    oracle.save_pretrained(tmp_path, save_embedding_layers=False)
    model = copy.deepcopy(base)
    lorahot.inject(model, targets, max_rank=8).load(tmp_path)
    assert _rel(_logits(model), _logits(oracle.eval())) < RTOL
    assert _rel(_logits(model), _logits(base)) > 1e-3


def test_gemma_merged_equals_unmerged(tmp_path: Path) -> None:
    base = _gemma("gemma3", tie=False)  # tied embeddings cannot be merged (refused at inject)
    plain, merged = copy.deepcopy(base), copy.deepcopy(base)
    rt_plain = lorahot.inject(plain, ["embed_tokens", "o_proj"], max_rank=4)
    rt_merged = lorahot.inject(merged, ["embed_tokens", "o_proj"], max_rank=4, merged=True)
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for name, layer in rt_plain.layers.items():
        a_shape = layer.spec.a_shape(4)
        kind = "lora_embedding_" if layer.spec.kind == "embedding" else "lora_"
        suffix = "" if layer.spec.kind == "embedding" else ".weight"
        tensors[f"base_model.model.{name}.{kind}A{suffix}"] = torch.randn(a_shape, generator=gen)
        tensors[f"base_model.model.{name}.{kind}B{suffix}"] = torch.randn(layer.spec.b_shape(4), generator=gen)
    for runtime in (rt_plain, rt_merged):
        runtime.load(tensors, scale=0.3)
    assert _rel(_logits(merged), _logits(plain)) < RTOL
    assert _rel(_logits(plain), _logits(base)) > 1e-3


def test_saved_copy_of_the_embedding_weight_loads_when_it_is_the_models(tmp_path: Path) -> None:
    """PEFT saves ``embed_tokens.base_layer.weight`` beside a LoRA on embed_tokens (its default
    ``save_embedding_layers="auto"``); when it equals the model's weight, the adapter loads and
    gives PEFT's outputs, in plain and merged mode."""
    from safetensors.torch import load_file

    base = tiny_llama()
    oracle = _peft_adapter(base, tmp_path, seed=4, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved  # what PEFT writes by default
    for merged in (False, True):
        model = copy.deepcopy(base)
        lorahot.inject(model, ["embed_tokens", "q_proj"], max_rank=4, merged=merged).load(tmp_path)
        assert _rel(_logits(model), _logits(oracle)) < RTOL


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda w: torch.cat([w, torch.randn(3, w.shape[1])]),
            r"model\.embed_tokens \(.*\): carries a copy of the base weight of shape \(67, 32\), but the model's is "
            r"\(64, 32\): it was trained with a resized vocabulary \(67 rows vs the model's 64\)",
        ),
        (
            lambda w: w + 1e-3,
            r"model\.embed_tokens \(.*\): carries a copy of the base weight that differs from the model's",
        ),
    ],
    ids=["resized", "retrained"],
)
def test_saved_copy_of_another_embedding_weight_is_refused(tmp_path: Path, edit, message: str) -> None:
    from safetensors.torch import load_file, save_file

    base = tiny_llama()
    _peft_adapter(base, tmp_path, seed=4, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = edit(tensors[key]).contiguous()
    save_file(tensors, path)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["embed_tokens", "q_proj"], max_rank=4)
    before = _logits(model)
    with pytest.raises(lorahot.AdapterMismatchError, match=message):
        runtime.load(tmp_path)
    assert torch.equal(_logits(model), before)


def test_every_lora_config_field_is_accounted_for() -> None:
    """Each field of the installed PEFT's LoraConfig is read, known not to change what a saved
    adapter computes, or refused when set; a field lorahot does not know is refused when set,
    so a new one is classified here before its adapters load."""
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - set(READ) - set(INERT) - set(UNSUPPORTED) == set()


def test_fields_that_only_choose_the_adapted_modules_match_peft(tmp_path: Path) -> None:
    """layers_to_transform, layers_pattern and exclude_modules choose modules, which the file
    then holds; rank and alpha patterns that are suffixes of module paths; ensure_weight_tying,
    with which PEFT adds the tied lm_head to a LoRA on the embedding."""
    base = tiny_llama()
    config = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": LLAMA_TARGETS,
        "layers_to_transform": [1],
        "layers_pattern": "layers",
        "exclude_modules": ["o_proj"],
        "rank_pattern": {"self_attn.q_proj": 2},
        "alpha_pattern": {"mlp.down_proj": 3.0},
    }
    oracle = _peft_adapter(base, tmp_path / "layers", seed=9, **config)
    model = copy.deepcopy(base)
    info = lorahot.inject(model, LLAMA_TARGETS, max_rank=4).load(tmp_path / "layers")
    assert info.ranks["model.layers.1.self_attn.q_proj"] == 2 and "model.layers.0.self_attn.q_proj" not in info.ranks
    assert _rel(_logits(model), _logits(oracle)) < RTOL
    tied = tiny_llama(tie_word_embeddings=True)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"], "ensure_weight_tying": True}
    oracle = _peft_adapter(tied, tmp_path / "tied", seed=10, **config)
    model = copy.deepcopy(tied)
    info = lorahot.inject(model, ["embed_tokens", "lm_head", "q_proj"], max_rank=4).load(tmp_path / "tied")
    assert "lm_head" in info.ranks
    assert _rel(_logits(model), _logits(_fresh_peft(tied, tmp_path / "tied"))) < RTOL
    assert _rel(_logits(model), _logits(oracle)) < RTOL


OTHER_METHODS = {
    "ADALORA": lambda t: peft.AdaLoraConfig(total_step=10, init_r=4, target_r=2, target_modules=t),  # lora_A/B/E
    "VERA": lambda t: peft.VeraConfig(r=4, target_modules=t),
    "LOHA": lambda t: peft.LoHaConfig(r=4, target_modules=t),
}


@pytest.mark.parametrize("kind", list(OTHER_METHODS))
def test_adapters_of_other_peft_methods_are_refused_naming_their_type(tmp_path: Path, kind: str) -> None:
    """A PEFT adapter of another method is refused by its peft_type before its keys are read
    (an AdaLoRA module's lora_A and lora_B were refused only for their spelling)."""
    base = tiny_llama()
    peft.get_peft_model(copy.deepcopy(base), OTHER_METHODS[kind](["q_proj", "v_proj"])).save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.UnknownFormatError, match=rf'adapter_config\.json: peft_type="{kind}"; this is not a'):
        runtime.load(tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("flag", "key"), [("use_dora", "lora_magnitude_vector"), ("lora_bias", "lora_B.bias")])
def test_a_dora_magnitude_or_lora_bias_its_config_does_not_turn_on_is_refused(
    tmp_path: Path, flag: str, key: str
) -> None:
    """PEFT builds each module from the config: with use_dora or lora_bias false it loads the
    module as plain LoRA and drops the file's magnitude or bias without a word, where lorahot
    applied them (relative error 0.94 and 0.65 on the logits)."""
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "down_proj"]
    saved = _peft_adapter(base, tmp_path, seed=8, r=4, lora_alpha=8, target_modules=targets, **{flag: True})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, flag: False}))
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, targets, max_rank=4, extras=True)
    before = _logits(model)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=rf"\(base_model\.model\.model\.layers\.0\.mlp\.down_proj\.{re.escape(key)}\), but adapter_config\.json "
        rf"does not set {flag} to true, so PEFT loads it as plain LoRA",
    ):
        runtime.load(tmp_path)
    assert torch.equal(_logits(model), before)
    assert _rel(_logits(_fresh_peft(base, tmp_path)), _logits(saved)) > 1e-2  # PEFT: another output
    runtime.load(tmp_path, config={flag: True})  # the fix the message names
    assert _rel(_logits(model), _logits(saved)) < RTOL


@pytest.mark.parametrize("field", ["velora_config", "monteclora_config"])
def test_velora_and_monteclora_training_state_is_named_and_the_rest_is_plain_lora(tmp_path: Path, field: str) -> None:
    """VeLoRA and MonteCLoRA change only training: PEFT's eval forward is plain LoRA, but it
    saves their state beside A and B. Those keys are refused naming the method (they read as
    foreign keys); without them the adapter gives PEFT's outputs."""
    from safetensors.torch import load_file, save_file

    base = tiny_llama()
    sub = peft.VeloraConfig() if field == "velora_config" else peft.MontecloraConfig()
    targets = ["q_proj", "v_proj"]
    _peft_adapter(base, tmp_path, seed=11, r=4, lora_alpha=8, target_modules=targets, **{field: sub})
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, targets, max_rank=4)
    with pytest.raises(lorahot.UnknownFormatError, match=r"training state of PEFT's VeLoRA .* delete these keys"):
        runtime.load(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if ".lora_A." in k or ".lora_B." in k}, path)
    runtime.load(tmp_path)
    assert _rel(_logits(model), _logits(_fresh_peft(base, tmp_path))) < RTOL
    assert _rel(_logits(model), _logits(base)) > 1e-3


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_a_float8_adapter_matches_peft_loading_it(tmp_path: Path, dtype: torch.dtype, merged: bool) -> None:
    """PEFT loads an adapter saved in float8 into its float32 LoRA parameters (each value
    widened); lorahot refused it. Now it computes what PEFT does, within float32 rounding."""
    from safetensors.torch import load_file, save_file

    base = tiny_llama()
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    _peft_adapter(base, tmp_path, seed=5, **config)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: (v * 4).to(dtype) for k, v in load_file(weights).items()}, weights)
    oracle = _fresh_peft(base, tmp_path)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, config["target_modules"], max_rank=8, merged=merged)
    runtime.load(tmp_path)
    assert _rel(_logits(model), _logits(oracle)) < RTOL
    assert _rel(_logits(model), _logits(base)) > 1e-3  # the adapter does change the outputs
