"""LTX-2, Anima, Flux.3, Krea 2, ACE-Step and HiDream files in their original module names, against
diffusers' loaders.

LTX-2, Anima, Flux.3 and Krea 2 have namings of their own (``lorahot/formats/ltx2.py``,
``anima.py``, ``flux3.py``, ``krea2.py``): the original names of the modules diffusers renamed are
aliases of diffusers' names.
ACE-Step's adapters are PEFT files naming the original projections (``self_attn.q_proj``), aliases
of diffusers' ``to_q`` in PEFT naming. HiDream's original names are diffusers' own, so its files
(``diffusion_model.<module>``) load as ComfyUI naming.

Each layer's adapted weight is compared in float64 with the one diffusers' pipeline loader gives
(``lora_state_dict``, then ``load_lora_adapter``) and with a float64 reference, read by probing
the layer with the identity. Only files without ``.alpha`` keys go to diffusers, whose conversions
of the diffusion_model. families leave a ``.alpha`` unread; lorahot reads it as ``alpha / rank``
(as ComfyUI does), checked against the reference."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lorahot
from tests.diffusion_names import assert_same as _assert_same
from tests.diffusion_names import diffusers_weights as _diffusers
from tests.diffusion_names import linears as _linears
from tests.diffusion_names import lorahot_weights as _lorahot
from tests.diffusion_names import weights as _weights
from tests.helpers import assert_norm_deltas_fold

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(
    not all(
        hasattr(diffusers, n)
        for n in (
            "LTX2VideoTransformer3DModel",
            "LTX2Pipeline",
            "CosmosTransformer3DModel",
            "HiDreamImagePipeline",
            "Flux3Transformer2DModel",
            "AceStepTransformer1DModel",
            "Krea2Transformer2DModel",
        )
    )
    or not all(
        hasattr(diffusers.loaders.lora_pipeline, n)
        for n in ("AnimaLoraLoaderMixin", "Flux3LoraLoaderMixin", "AceStepLoraLoaderMixin", "Krea2LoraLoaderMixin")
    ),
    reason="needs a diffusers with LTX-2, Anima, Flux.3, Krea 2, ACE-Step and HiDream",
)


def _tiny_ltx2() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.LTX2VideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            audio_in_channels=8,
            audio_out_channels=8,
            audio_num_attention_heads=2,
            audio_attention_head_dim=8,
            audio_cross_attention_dim=16,
            num_layers=1,
            caption_channels=16,
        )
        .double()
        .eval()
    )


def _tiny_anima() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.CosmosTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=24,
            num_layers=2,
            text_embed_dim=16,
            adaln_lora_dim=8,
            max_size=(4, 16, 16),
            patch_size=(1, 2, 2),
            extra_pos_embed_type=None,
        )
        .double()
        .eval()
    )


def _tiny_hidream() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.HiDreamImageTransformer2DModel(
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            caption_channels=[16, 16],
            text_emb_dim=16,
            num_routed_experts=2,
            num_activated_experts=1,
            axes_dims_rope=(4, 4),
            max_resolution=(16, 16),
            llama_layers=[0, 1],
        )
        .double()
        .eval()
    )


def _tiny_flux3() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.Flux3Transformer2DModel(
            in_channels=8,
            cond_in_channels=8,
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            timestep_channels=16,
            axes_dims_rope=(2, 2, 2, 2),
        )
        .double()
        .eval()
    )


def tiny_ace_step() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.AceStepTransformer1DModel(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            in_channels=8,
            audio_acoustic_hidden_dim=8,
            encoder_hidden_size=32,
        )
        .double()
        .eval()
    )


def _tiny_krea2() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.Krea2Transformer2DModel(
            in_channels=8,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            timestep_embed_dim=16,
            text_hidden_dim=16,
            num_text_layers=2,
            text_num_attention_heads=2,
            text_num_key_value_heads=2,
            text_intermediate_size=32,
            num_layerwise_text_blocks=1,
            num_refiner_text_blocks=1,
            axes_dims_rope=(2, 2, 4),
        )
        .double()
        .eval()
    )


#: diffusers' LTX-2 name (its leading part) -> the original one
_LTX2_ORIGINAL = {
    "proj_in": "patchify_proj",
    "audio_proj_in": "audio_patchify_proj",
    "time_embed": "adaln_single",
    "audio_time_embed": "audio_adaln_single",
    "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
    "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
    "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
    "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single",
}


def _ltx2_original(name: str) -> str:
    head, _, rest = name.partition(".")
    return ".".join(p for p in (_LTX2_ORIGINAL.get(head, head), rest) if p)


#: diffusers' Anima name -> the original one (the inverse of diffusers' conversion)
_ANIMA_ORIGINAL = (
    (r"^transformer_blocks\.", "blocks."),
    (r"\.attn1\.to_q$", ".self_attn.q_proj"),
    (r"\.attn1\.to_k$", ".self_attn.k_proj"),
    (r"\.attn1\.to_v$", ".self_attn.v_proj"),
    (r"\.attn1\.to_out\.0$", ".self_attn.output_proj"),
    (r"\.attn2\.to_q$", ".cross_attn.q_proj"),
    (r"\.attn2\.to_k$", ".cross_attn.k_proj"),
    (r"\.attn2\.to_v$", ".cross_attn.v_proj"),
    (r"\.attn2\.to_out\.0$", ".cross_attn.output_proj"),
    (r"\.ff\.net\.0\.proj$", ".mlp.layer1"),
    (r"\.ff\.net\.2$", ".mlp.layer2"),
    (r"\.norm1\.linear_(\d)$", r".adaln_modulation_self_attn.\1"),
    (r"\.norm2\.linear_(\d)$", r".adaln_modulation_cross_attn.\1"),
    (r"\.norm3\.linear_(\d)$", r".adaln_modulation_mlp.\1"),
    (r"^patch_embed\.proj$", "x_embedder.proj.1"),
    (r"^time_embed\.t_embedder\.", "t_embedder.1."),
    (r"^proj_out$", "final_layer.linear"),
    (r"^norm_out\.linear_(\d)$", r"final_layer.adaln_modulation.\1"),
)


def _anima_original(name: str) -> str:
    for pattern, repl in _ANIMA_ORIGINAL:
        name = re.sub(pattern, repl, name)
    return name


def _flux3_original(name: str) -> str:
    """The inverse of diffusers' Flux.3 conversion."""
    name = re.sub(r"^mode_blocks\.", "content_mode_blocks.", name)
    name = re.sub(r"^single_transformer_blocks\.", "single_blocks.", name)
    for original, renamed in (
        ("q_proj", "attn.to_q"),
        ("k_proj", "attn.to_k"),
        ("v_proj", "attn.to_v"),
        ("attn_out", "attn.to_out.0"),
        ("mlp_in", "ff.linear_in"),
        ("mlp_out", "ff.linear_out"),
    ):
        name = re.sub(rf"\.{re.escape(renamed)}$", f".{original}", name)
    return name


#: diffusers' Krea 2 name -> the original (AI-Toolkit's short names outside the blocks)
_KREA2_ORIGINAL = (
    (r"^transformer_blocks\.", "blocks."),
    (r"^text_fusion\.(layerwise_blocks|refiner_blocks)\.", r"txtfusion.\1."),
    (r"\.attn\.to_q$", ".attn.wq"),
    (r"\.attn\.to_k$", ".attn.wk"),
    (r"\.attn\.to_v$", ".attn.wv"),
    (r"\.attn\.to_out\.0$", ".attn.wo"),
    (r"\.attn\.to_gate$", ".attn.gate"),
    (r"\.ff\.(gate|up|down)$", r".mlp.\1"),
    (r"^img_in$", "first"),
    (r"^final_layer\.linear$", "last.linear"),
    (r"^time_embed\.linear_1$", "tmlp.0"),
    (r"^time_embed\.linear_2$", "tmlp.2"),
    (r"^time_mod_proj$", "tproj.1"),
    (r"^txt_in\.linear_1$", "txtmlp.1"),
    (r"^txt_in\.linear_2$", "txtmlp.3"),
    (r"^text_fusion\.projector$", "txtfusion.projector"),
)


def _krea2_original(name: str) -> str:
    for pattern, repl in _KREA2_ORIGINAL:
        name = re.sub(pattern, repl, name)
    return name


def _ace_step_original(name: str) -> str:
    """The inverse of diffusers' ACE-Step conversion; PEFT's wrapper in front."""
    for original, renamed in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("o_proj", "to_out.0")):
        name = re.sub(rf"\.{re.escape(renamed)}$", f".{original}", name)
    return name


def _key(original: Callable[[str], str], name: str) -> str:
    """A module's key in the file: PEFT's wrapper for ACE-Step, ``diffusion_model.`` for the others."""
    return f"{'base_model.model' if original is _ace_step_original else 'diffusion_model'}.{original(name)}"


def _file(model: nn.Module, names: list[str], original: Callable[[str], str], alpha: bool) -> dict[str, torch.Tensor]:
    """``diffusion_model.<original name>.lora_{A,B}.weight`` for each layer, ranks 2-4, with
    ``.alpha`` (unequal to the rank) where asked."""
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i, name in enumerate(names):
        layer, r, key = model.get_submodule(name), 2 + i % 3, _key(original, name)
        sd[f"{key}.lora_A.weight"] = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, r, generator=g, dtype=torch.float64) * 0.3
        if alpha:
            sd[f"{key}.alpha"] = torch.tensor(r * (0.5 + i % 3), dtype=torch.float64)
    return sd


def _reference(make: Callable[[], nn.Module], sd: dict, names: list[str], original: Callable[[str], str]) -> dict:
    """Each layer's float64 weight plus ``alpha / r * B @ A`` (alpha = r where the file has none)."""
    model = make()
    out = _weights(model, names)
    for name in names:
        key = _key(original, name)
        a, b = sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"]
        scale = float(sd[f"{key}.alpha"]) / a.shape[0] if f"{key}.alpha" in sd else 1.0
        out[name] = out[name] + torch.cat([(scale * b @ a).T, torch.zeros(1, b.shape[0], dtype=torch.float64)])
    return out


_FAMILIES = {
    "ltx2": (_tiny_ltx2, _ltx2_original, lambda: diffusers.LTX2Pipeline),
    "anima": (_tiny_anima, _anima_original, lambda: diffusers.loaders.lora_pipeline.AnimaLoraLoaderMixin),
    "comfyui": (_tiny_hidream, str, lambda: diffusers.HiDreamImagePipeline),
    "flux3": (_tiny_flux3, _flux3_original, lambda: diffusers.loaders.lora_pipeline.Flux3LoraLoaderMixin),
    "peft": (tiny_ace_step, _ace_step_original, lambda: diffusers.loaders.lora_pipeline.AceStepLoraLoaderMixin),
    "krea2": (_tiny_krea2, _krea2_original, lambda: diffusers.loaders.lora_pipeline.Krea2LoraLoaderMixin),
}


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_every_linear_in_original_names_matches_diffusers(family: str) -> None:
    """Every Linear of the model adapted, in the original names: the naming detected, each
    layer equal to diffusers' loader and to the float64 reference."""
    make, original, loader = _FAMILIES[family]
    names = _linears(make())
    sd = _file(make(), names, original, alpha=False)
    assert family == "comfyui" or any(original(n) != n for n in names)  # some names are the original's
    ours, fmt = _lorahot(make, sd, names)
    assert fmt == family
    _assert_same(ours, _reference(make, sd, names, original))
    _assert_same(ours, _diffusers(make, loader(), sd, names))


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_alphas_are_read_as_alpha_over_rank(family: str) -> None:
    make, original, _ = _FAMILIES[family]
    names = _linears(make())
    sd = _file(make(), names, original, alpha=True)
    ours, _ = _lorahot(make, sd, names)
    _assert_same(ours, _reference(make, sd, names, original))
    unread = _reference(make, {k: v for k, v in sd.items() if not k.endswith(".alpha")}, names, original)
    assert not all(torch.allclose(ours[n], unread[n], rtol=1e-6, atol=1e-9) for n in names)  # the alphas matter


def test_ltx2_file_of_blocks_only_loads_as_comfyui() -> None:
    """Block names are the same in both namings: such a file needs no alias."""
    names = [n for n in _linears(_tiny_ltx2()) if n.startswith("transformer_blocks.")]
    sd = _file(_tiny_ltx2(), names, str, alpha=False)
    ours, fmt = _lorahot(_tiny_ltx2, sd, names)
    assert fmt == "comfyui"
    _assert_same(ours, _diffusers(_tiny_ltx2, diffusers.LTX2Pipeline, sd, names))


def _tiny_anima_conditioner() -> nn.Module:
    """diffusers' ``AnimaTextConditioner`` (an Anima pipeline's ``text_conditioner``), its model
    width unequal to its output's, so that ``in_proj`` is a Linear."""
    torch.manual_seed(0)
    return (
        diffusers.AnimaTextConditioner(
            source_dim=12,
            target_dim=16,
            model_dim=8,
            num_layers=2,
            num_attention_heads=2,
            target_vocab_size=32,
            min_sequence_length=4,
        )
        .double()
        .eval()
    )


def _conditioner_file(alpha: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``diffusion_model.llm_adapter.<module>`` keys (Anima's original names of its text
    conditioner's modules, diffusers' own) for every Linear of the conditioner, ranks 2-4, and
    those layers' names."""
    model = _tiny_anima_conditioner()
    names = _linears(model)
    g = torch.Generator().manual_seed(5)
    sd = {}
    for i, name in enumerate(names):
        layer, r, key = model.get_submodule(name), 2 + i % 3, f"diffusion_model.llm_adapter.{name}"
        sd[f"{key}.lora_A.weight"] = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, r, generator=g, dtype=torch.float64) * 0.3
        if alpha:
            sd[f"{key}.alpha"] = torch.tensor(r * (0.5 + i % 3), dtype=torch.float64)
    return sd, names


def _diffusers_anima(sd: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
    """The transformer and the text conditioner after diffusers' Anima loader: ``lora_state_dict``,
    then each component's part loaded as ``load_lora_weights`` loads it."""
    state = diffusers.loaders.lora_pipeline.AnimaLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in sd.items()})
    transformer, conditioner = _tiny_anima(), _tiny_anima_conditioner()
    for model, prefix in ((transformer, "transformer"), (conditioner, "text_conditioner")):
        part = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
        assert part
        model.load_lora_adapter(part, prefix=prefix, adapter_name="o")
    return transformer, conditioner


def _conditioner_output(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    source = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 32, (2, 4), generator=g)
    with torch.no_grad():
        return model(source, ids)


def _anima_spelled(sd: dict[str, torch.Tensor], spelling: str) -> dict[str, torch.Tensor]:
    """A ``diffusion_model.`` Anima file in another spelling: kohya's (``lora_unet_``,
    ``lora_transformer_``), another prefix of the original names, or diffusers' own names
    (``diffusers``: its converted state dict)."""
    if spelling == "diffusers":
        return diffusers.loaders.lora_pipeline.AnimaLoraLoaderMixin.lora_state_dict(
            {k: v.clone() for k, v in sd.items()}
        )
    return _spelled(sd, spelling) if spelling != "diffusion_model." else dict(sd)


_CONDITIONER_SPELLINGS = [
    "diffusion_model.",
    "model.diffusion_model.",
    "transformer.",
    "net.",
    "",
    "lora_unet_",
    "lora_transformer_",
    "diffusers",
]


@pytest.mark.parametrize("spelling", _CONDITIONER_SPELLINGS, ids=[s or "bare" for s in _CONDITIONER_SPELLINGS])
def test_anima_text_conditioner_lands_on_the_pipelines_text_conditioner_as_diffusers_loads_it(spelling: str) -> None:
    """An Anima file with ``diffusion_model.llm_adapter.<module>`` keys beside the transformer's, on
    a pipeline runtime with diffusers' ``text_conditioner``: those keys go to that component, the
    module paths unrenamed, as diffusers' Anima loader sends them; in every spelling lorahot reads
    Anima files in (another prefix of the original names, kohya's ``lora_unet_llm_adapter_``, and
    diffusers' own ``text_conditioner.``, its converted state dict). Every layer of both components
    equal in float64 to diffusers' loader on the ``diffusion_model.`` twin and to the reference, and
    the conditioner's output to that of diffusers' conditioner; with ``.alpha`` (diffusers' loader
    refuses such a file) to the reference at ``alpha / r``. These keys were refused by name."""
    names = _linears(_tiny_anima())
    conditioner_twin, layers = _conditioner_file()
    twin = {**_file(_tiny_anima(), names, _anima_original, alpha=False), **conditioner_twin}
    sd = _anima_spelled(twin, spelling)
    transformer, conditioner = _tiny_anima(), _tiny_anima_conditioner()
    runtime = lorahot.inject({"transformer": transformer, "text_conditioner": conditioner}, "all-linear", max_rank=8)
    info = runtime.load(dict(sd))
    assert info.components == {"transformer": len(names), "text_conditioner": len(layers)}

    theirs, oracle = _diffusers_anima(twin)
    _assert_same(_weights(transformer, names), _weights(theirs, names))
    _assert_same(_weights(conditioner, layers), _weights(oracle, layers))
    reference = _reference(_tiny_anima_conditioner, conditioner_twin, layers, lambda n: f"llm_adapter.{n}")
    _assert_same(_weights(conditioner, layers), reference)
    torch.testing.assert_close(_conditioner_output(conditioner), _conditioner_output(oracle), rtol=1e-9, atol=1e-12)
    assert not torch.allclose(_conditioner_output(conditioner), _conditioner_output(_tiny_anima_conditioner()))

    if spelling != "diffusers":
        with_alpha, _ = _conditioner_file(alpha=True)
        conditioner = _tiny_anima_conditioner()
        runtime = lorahot.inject(
            {"transformer": _tiny_anima(), "text_conditioner": conditioner}, "all-linear", max_rank=8
        )
        runtime.load(_anima_spelled(with_alpha, spelling))
        reference = _reference(_tiny_anima_conditioner, with_alpha, layers, lambda n: f"llm_adapter.{n}")
        _assert_same(_weights(conditioner, layers), reference)


@pytest.mark.parametrize("spelling", ["diffusion_model.", "lora_unet_"])
def test_anima_text_conditioner_without_the_component_is_refused_naming_it_or_skipped(spelling: str) -> None:
    """Anima's ``llm_adapter`` modules, whose names are the transformer's original ones (Anima's
    naming aliases ``blocks.0.self_attn.q_proj`` onto the transformer's ``attn1.to_q``), on a
    runtime over the transformer alone and on a pipeline runtime without ``text_conditioner``:
    refused naming that component, every parameter and buffer bitwise unchanged, never on the
    transformer's layers; with ``strict=False`` exactly those keys are skipped and the
    transformer's modules load as the reference gives them."""
    names = _linears(_tiny_anima())
    twin = _file(_tiny_anima(), names, _anima_original, alpha=False)
    conditioner, _ = _conditioner_file()
    sd = _anima_spelled({**twin, **conditioner}, spelling)
    inner = sorted(k for k in sd if "llm_adapter" in k)
    for make in (lambda m: m, lambda m: {"transformer": m}):
        model = _tiny_anima()
        runtime = lorahot.inject(make(model), "all-linear", max_rank=8)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(lorahot.AdapterMismatchError, match=r"llm_adapter(.|\n)*text_conditioner"):
            runtime.load(dict(sd))
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        info = runtime.load(dict(sd), strict=False)
        assert sorted(info.skipped) == inner
        _assert_same(_weights(model, names), _reference(_tiny_anima, twin, names, _anima_original))


def _kohya_spelling(sd: dict[str, torch.Tensor], prefix: str = "lora_unet_") -> dict[str, torch.Tensor]:
    """sd-scripts' spelling of a ``diffusion_model.`` file: ``lora_unet_`` (or ``prefix``) + the name
    with ``_`` for ``.``, ``lora_down``/``lora_up``."""
    roles = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "alpha": "alpha"}
    out = {}
    for key, tensor in sd.items():
        module, role = re.fullmatch(r"diffusion_model\.(.+)\.(lora_[AB]\.weight|alpha)", key).groups()
        out[prefix + module.replace(".", "_") + "." + roles[role]] = tensor
    return out


def _spelled(sd: dict[str, torch.Tensor], spelling: str) -> dict[str, torch.Tensor]:
    """A ``diffusion_model.`` file in another trainer's spelling: kohya's under ``spelling`` if it
    starts with ``lora_``, else the same keys under ``spelling`` in place of ``diffusion_model.``."""
    if spelling.startswith("lora_"):
        return _kohya_spelling(sd, spelling)
    return {spelling + k.removeprefix("diffusion_model."): v for k, v in sd.items()}


#: (family, spelling) pairs the trainers write and the naming they read as (Anima's kohya
#: spelling has its own test above)
_SPELLINGS = [
    *((f, s, f + "-kohya") for f in ("krea2", "ltx2", "flux3") for s in ("lora_unet_", "lora_transformer_")),
    *((f, s, f) for f in ("krea2", "ltx2", "flux3", "anima") for s in ("", "transformer.", "net.")),
]


@pytest.mark.parametrize(
    ("family", "spelling", "naming"), _SPELLINGS, ids=[f"{f}-{s or 'bare'}" for f, s, _ in _SPELLINGS]
)
@pytest.mark.parametrize("alpha", [False, True], ids=["no-alpha", "alpha"])
def test_trainers_spellings_of_the_original_names_match_diffusers_on_their_diffusion_model_twin(
    family: str, spelling: str, naming: str, alpha: bool
) -> None:
    """musubi-tuner and OneTrainer write the original names kohya's way (``lora_unet_`` or
    ``lora_transformer_`` + the name with ``_`` for ``.``), bare, or under ``transformer.``
    (musubi's ``--diffusers_prefix``) or ``net.`` (the Cosmos checkpoint's root, OneTrainer's Anima
    files). Every Linear of the model equal to the float64 reference of the ``diffusion_model.`` twin
    (``alpha / r``) and, without alphas, to diffusers' loader on that twin. These files were refused:
    their namings required ``diffusion_model.``, and the kohya spellings had no naming at all."""
    make, original, loader = _FAMILIES[family]
    names = _linears(make())
    twin = _file(make(), names, original, alpha=alpha)
    ours, fmt = _lorahot(make, _spelled(twin, spelling), names)
    assert fmt == naming
    _assert_same(ours, _reference(make, twin, names, original))
    if not alpha:
        _assert_same(ours, _diffusers(make, loader(), twin, names))


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_transformer_"])
@pytest.mark.parametrize("alpha", [False, True], ids=["no-alpha", "alpha"])
def test_anima_kohya_spelling_matches_diffusers_on_its_diffusion_model_twin(alpha: bool, prefix: str) -> None:
    """sd-scripts' Anima LoRAs (``networks/lora_anima.py``, and OneTrainer's kohya output) spell the
    original names kohya's way, ``lora_unet_blocks_0_self_attn_q_proj.lora_down.weight`` (OneTrainer
    also under ``lora_transformer_``, which was refused); its own conversion for ComfyUI writes the
    same modules under ``diffusion_model.``. Every layer equal to the float64 reference of that twin
    (``alpha / r``) and, without alphas, which diffusers leaves unread, to diffusers' Anima loader.
    These files were refused, read as wan-musubi naming ('matches no injected layer'). Its
    ``llm_adapter`` modules, the text conditioner's, are refused on the transformer alone naming
    that component, or skipped with strict=False."""
    names = _linears(_tiny_anima())
    twin = _file(_tiny_anima(), names, _anima_original, alpha=alpha)
    sd = _kohya_spelling(twin, prefix)
    assert f"{prefix}blocks_0_self_attn_q_proj.lora_down.weight" in sd
    ours, fmt = _lorahot(_tiny_anima, sd, names)
    assert fmt == "anima-kohya"
    _assert_same(ours, _reference(_tiny_anima, twin, names, _anima_original))
    if not alpha:
        loader = diffusers.loaders.lora_pipeline.AnimaLoraLoaderMixin
        _assert_same(ours, _diffusers(_tiny_anima, loader, twin, names))
    adapter = {
        f"{prefix}llm_adapter_blocks_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 16, dtype=torch.float64),
        f"{prefix}llm_adapter_blocks_0_self_attn_q_proj.lora_up.weight": torch.zeros(16, 2, dtype=torch.float64),
    }
    with pytest.raises(lorahot.AdapterMismatchError, match=r"llm_adapter(.|\n)*text_conditioner"):
        _lorahot(_tiny_anima, {**sd, **adapter}, names)
    ours, fmt = _lorahot(_tiny_anima, {**sd, **adapter}, names, strict=False)
    assert fmt == "anima-kohya"
    _assert_same(ours, _reference(_tiny_anima, twin, names, _anima_original))


def _tiny_ltx2_connectors(per_modality: bool) -> nn.Module:
    """diffusers' ``LTX2TextConnectors``: LTX-2.0's one ``text_proj_in``, or LTX-2.3's
    ``video_text_proj_in`` and ``audio_text_proj_in`` (``per_modality``)."""
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors

    torch.manual_seed(0)
    small = {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1, "num_learnable_registers": None}
    return (
        LTX2TextConnectors(
            caption_channels=16,
            text_proj_in_factor=2,
            **{f"{m}_connector_{k}": v for m in ("video", "audio") for k, v in small.items()},
            per_modality_projections=per_modality,
            video_hidden_dim=16,
            audio_hidden_dim=8,
        )
        .double()
        .eval()
    )


def _connector_file(per_modality: bool, alpha: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``text_embedding_projection.<aggregate_embed>`` keys (the original LTX-2 names of the
    connectors' input projections) for each ``*text_proj_in``, and those layers' names."""
    model = _tiny_ltx2_connectors(per_modality)
    names = _linears(model, lambda n: n.endswith("text_proj_in"))
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i, name in enumerate(names):
        layer, r = model.get_submodule(name), 2 + i
        key = "text_embedding_projection." + name.replace("text_proj_in", "aggregate_embed")
        sd[f"{key}.lora_A.weight"] = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, r, generator=g, dtype=torch.float64) * 0.3
        if alpha:
            sd[f"{key}.alpha"] = torch.tensor(r * 1.5, dtype=torch.float64)
    return sd, names


def _diffusers_connectors(sd: dict[str, torch.Tensor], names: list[str], per_modality: bool) -> dict:
    """The connectors' layers after diffusers' LTX-2 loader: ``lora_state_dict``, then the
    ``connectors.`` modules into the component, as ``load_lora_weights`` does."""
    state = diffusers.LTX2Pipeline.lora_state_dict({k: v.clone() for k, v in sd.items()})
    model = _tiny_ltx2_connectors(per_modality)
    part = {k: v for k, v in state.items() if k.startswith("connectors.")}
    model.load_lora_adapter(part, prefix="connectors", adapter_name="o")
    return _weights(model, names)


@pytest.mark.parametrize("per_modality", [False, True], ids=["ltx2.0", "ltx2.3"])
def test_ltx2_text_connectors_land_on_the_pipelines_connectors_as_diffusers_loads_them(per_modality: bool) -> None:
    """An LTX-2 file with ``text_embedding_projection.aggregate_embed`` (LTX-2.3:
    ``video_``/``audio_aggregate_embed``) beside the transformer's modules, on a pipeline runtime
    with diffusers' ``connectors`` component: those keys go to ``connectors.text_proj_in``
    (``video_text_proj_in``, ...), as diffusers' LTX-2 loader sends them, the rest to the transformer.
    Every layer of both equal to diffusers' loader and to the float64 reference; with ``.alpha``,
    which diffusers leaves unread, to the reference at ``alpha / r``. These keys were refused by
    name, or skipped with strict=False."""
    names = _linears(_tiny_ltx2())
    blocks = _file(_tiny_ltx2(), names, _ltx2_original, alpha=False)
    connectors, projections = _connector_file(per_modality)
    sd = {**blocks, **connectors}
    transformer, conn = _tiny_ltx2(), _tiny_ltx2_connectors(per_modality)
    info = lorahot.inject({"transformer": transformer, "connectors": conn}, "all-linear", max_rank=8).load(dict(sd))
    assert info.format == "ltx2"
    assert info.components == {"transformer": len(names), "connectors": len(projections)}

    _assert_same(_weights(transformer, names), _diffusers(_tiny_ltx2, diffusers.LTX2Pipeline, sd, names))
    _assert_same(_weights(conn, projections), _diffusers_connectors(sd, projections, per_modality))

    reference = _weights(_tiny_ltx2_connectors(per_modality), projections)
    for name in projections:
        key = "text_embedding_projection." + name.replace("text_proj_in", "aggregate_embed")
        delta = sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"]
        reference[name] = reference[name] + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
    _assert_same(_weights(conn, projections), reference)
    assert not torch.equal(
        reference[projections[0]], _weights(_tiny_ltx2_connectors(per_modality), projections)[projections[0]]
    )

    with_alpha, _ = _connector_file(per_modality, alpha=True)
    conn = _tiny_ltx2_connectors(per_modality)
    lorahot.inject({"transformer": _tiny_ltx2(), "connectors": conn}, "all-linear", max_rank=8).load(with_alpha)
    for name in projections:
        key = "text_embedding_projection." + name.replace("text_proj_in", "aggregate_embed")
        scale = float(with_alpha[f"{key}.alpha"]) / with_alpha[f"{key}.lora_A.weight"].shape[0]
        delta = scale * with_alpha[f"{key}.lora_B.weight"] @ with_alpha[f"{key}.lora_A.weight"]
        base = _weights(_tiny_ltx2_connectors(per_modality), [name])[name]
        expected = base + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
        torch.testing.assert_close(_weights(conn, [name])[name], expected, rtol=1e-9, atol=1e-12)


def test_ltx2_text_connectors_without_the_component_are_refused_naming_it_or_skipped() -> None:
    """A runtime without ``connectors`` refuses the ``text_embedding_projection.`` keys naming
    that component and the fix (a runtime over the transformer alone, and a pipeline runtime
    without it), every parameter and buffer bitwise unchanged; with ``strict=False`` the
    transformer's modules load, outside modules included. A runtime over the connectors alone
    takes them."""
    names = _linears(_tiny_ltx2())
    sd = {**_file(_tiny_ltx2(), names, _ltx2_original, alpha=False), **_connector_file(False)[0]}
    for make in (lambda m: m, lambda m: {"transformer": m}):
        model = _tiny_ltx2()
        runtime = lorahot.inject(make(model), "all-linear", max_rank=8)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(lorahot.AdapterMismatchError, match=r"text_embedding_projection\.(.|\n)*connectors"):
            runtime.load(dict(sd))
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        _assert_same(_weights(model, names), _weights(_tiny_ltx2(), names))  # nothing loaded
    ours, fmt = _lorahot(_tiny_ltx2, sd, names, strict=False)
    assert fmt == "ltx2"
    _assert_same(ours, _reference(_tiny_ltx2, sd, names, _ltx2_original))
    connectors, projections = _connector_file(False)
    alone, fmt = _lorahot(lambda: _tiny_ltx2_connectors(False), connectors, projections)
    assert fmt == "ltx2"
    _assert_same(alone, _diffusers_connectors(connectors, projections, False))


def _connector_transformers_file(per_modality: bool, head: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``<head>video_embeddings_connector.transformer_1d_blocks.N.<module>`` keys (and
    ``audio_``), the original LTX-2 names of the connectors' transformers, for each of their
    layers, and those layers' names in diffusers' ``LTX2TextConnectors``."""
    model = _tiny_ltx2_connectors(per_modality)
    names = _linears(model, lambda n: n.startswith(("video_connector.", "audio_connector.")))
    g = torch.Generator().manual_seed(4)
    sd = {}
    for i, name in enumerate(names):
        layer, r = model.get_submodule(name), 2 + i % 3
        key = head + re.sub(
            r"^(video|audio)_connector\.transformer_blocks\.", r"\1_embeddings_connector.transformer_1d_blocks.", name
        )
        sd[f"{key}.lora_A.weight"] = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, r, generator=g, dtype=torch.float64) * 0.3
    return sd, names


@pytest.mark.parametrize("head", ["diffusion_model.", "transformer.", ""], ids=["comfyui", "transformer", "bare"])
@pytest.mark.parametrize("per_modality", [False, True], ids=["ltx2.0", "ltx2.3"])
def test_ltx2_connector_transformers_land_on_the_pipelines_connectors(per_modality: bool, head: str) -> None:
    """The original LTX-2 checkpoint holds the text connectors' transformers in the transformer
    (``diffusion_model.video_embeddings_connector.transformer_1d_blocks.N``, ``audio_`` too), where
    ComfyUI adapts them; diffusers' checkpoint conversion moves them to the pipeline's
    ``connectors`` (``video_connector.transformer_blocks.N``), while its LoRA conversion sends such
    keys under ``transformer.``, which has no such module: its loader drops them with a warning.
    lorahot refused them as matching no layer (a ``diffusion_model.`` file of blocks besides), and
    on the transformer alone the aliased name could reach the transformer's own
    ``transformer_blocks.N``. Now they are routed to ``connectors`` and land as diffusers loads
    the same factors in its connectors' names; the transformer's modules as diffusers' LTX-2
    loader loads them. On the transformer alone they are refused naming the component, every
    parameter bitwise unchanged, and skipped with strict=False, as diffusers drops them."""
    names = _linears(_tiny_ltx2())
    blocks = _file(_tiny_ltx2(), names, _ltx2_original, alpha=False)
    blocks = {head + k.removeprefix("diffusion_model."): v for k, v in blocks.items()}
    inner, layers = _connector_transformers_file(per_modality, head)
    sd = {**blocks, **inner}
    transformer, conn = _tiny_ltx2(), _tiny_ltx2_connectors(per_modality)
    info = lorahot.inject({"transformer": transformer, "connectors": conn}, "all-linear", max_rank=8).load(dict(sd))
    assert info.format == "ltx2"
    assert info.components == {"transformer": len(names), "connectors": len(layers)}

    _assert_connectors_as_diffusers(conn, inner, layers, per_modality)
    if head == "diffusion_model.":  # diffusers converts only this head: the connectors' keys go under transformer.
        converted = diffusers.LTX2Pipeline.lora_state_dict({k: v.clone() for k, v in sd.items()})
        assert all(k.startswith("transformer.") for k in converted)
        _assert_same(_weights(transformer, names), _diffusers(_tiny_ltx2, diffusers.LTX2Pipeline, sd, names))
    _assert_same(
        _weights(transformer, names),
        _reference(
            _tiny_ltx2,
            {k.replace(head, "diffusion_model.", 1) if head else "diffusion_model." + k: v for k, v in blocks.items()},
            names,
            _ltx2_original,
        ),
    )

    _assert_refused_on_the_transformer_alone(
        sd, r"embeddings_connector\.transformer_1d_blocks\.0\.attn1\.to_q", sorted(inner), transformer, names
    )


def _assert_connectors_as_diffusers(
    conn: torch.nn.Module, inner: dict[str, torch.Tensor], layers: list[str], per_modality: bool
) -> None:
    """``conn``'s ``layers`` equal diffusers' ``load_lora_adapter`` of the connector transformers'
    factors ``inner`` in the connectors' own names, and differ from the base connectors."""
    twin = {
        "connectors." + n + k[k.index(".lora_") :]: v for n in layers for k, v in inner.items() if _original_of(n) in k
    }
    oracle = _tiny_ltx2_connectors(per_modality)
    oracle.load_lora_adapter(twin, prefix="connectors", adapter_name="o")
    _assert_same(_weights(conn, layers), _weights(oracle, layers))
    assert not torch.equal(
        _weights(conn, layers[:1])[layers[0]], _weights(_tiny_ltx2_connectors(per_modality), layers[:1])[layers[0]]
    )


def _assert_refused_on_the_transformer_alone(
    sd: dict[str, torch.Tensor], key: str, skipped: list[str], transformer: torch.nn.Module, names: list[str]
) -> None:
    """On a runtime over the LTX-2 transformer alone, ``sd`` is refused at ``key`` (a regex),
    naming the ``connectors`` component, with every parameter and buffer bitwise unchanged;
    ``strict=False`` skips exactly ``skipped`` and loads the rest as ``transformer`` holds it."""
    model = _tiny_ltx2()
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.AdapterMismatchError, match=key + r": matches no injected layer.*'connectors'"):
        runtime.load(dict(sd))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    info = runtime.load(dict(sd), strict=False)
    assert sorted(info.skipped) == skipped
    _assert_same(_weights(model, names), _weights(transformer, names))


def _original_of(name: str) -> str:
    """A connector layer's original LTX-2 module path, followed by a dot."""
    return (
        re.sub(
            r"^(video|audio)_connector\.transformer_blocks\.", r"\1_embeddings_connector.transformer_1d_blocks.", name
        )
        + "."
    )


@pytest.mark.parametrize("prefix", ["lora_unet_", "lora_transformer_"])
@pytest.mark.parametrize("per_modality", [False, True], ids=["ltx2.0", "ltx2.3"])
def test_ltx2_kohya_connector_transformers_land_on_the_pipelines_connectors(per_modality: bool, prefix: str) -> None:
    """The kohya spelling of the connectors' transformers (``lora_unet_video_embeddings_connector_
    transformer_1d_blocks_0_attn1_to_q``, OneTrainer's ``lora_transformer_`` too) was routed by its
    ``lora_unet_`` prefix to the transformer, which has no such module, and refused there, while
    the dotted names go to the pipeline's ``connectors``. Now routed there too, they land as
    diffusers loads the same factors in its connectors' names, the transformer's modules as the
    float64 reference; on the transformer alone they are refused naming the component (never on
    its own ``transformer_blocks.N``), every parameter bitwise unchanged, skipped with strict=False."""
    names = _linears(_tiny_ltx2())
    blocks = _file(_tiny_ltx2(), names, _ltx2_original, alpha=False)
    inner, layers = _connector_transformers_file(per_modality, "diffusion_model.")
    sd = _kohya_spelling({**blocks, **inner}, prefix)
    connector_keys = sorted(_kohya_spelling(inner, prefix))
    transformer, conn = _tiny_ltx2(), _tiny_ltx2_connectors(per_modality)
    info = lorahot.inject({"transformer": transformer, "connectors": conn}, "all-linear", max_rank=8).load(dict(sd))
    assert info.format == "ltx2-kohya"
    assert info.components == {"transformer": len(names), "connectors": len(layers)}

    _assert_connectors_as_diffusers(conn, inner, layers, per_modality)
    _assert_same(_weights(transformer, names), _reference(_tiny_ltx2, blocks, names, _ltx2_original))

    _assert_refused_on_the_transformer_alone(
        sd,
        rf"{prefix}(video|audio)_embeddings_connector_transformer_1d_blocks_0_attn1_to_q",
        connector_keys,
        transformer,
        names,
    )


@pytest.mark.parametrize("alpha", [False, True], ids=["no-alpha", "alpha"])
def test_krea2_under_peft_wrapper_matches_diffusers(alpha: bool) -> None:
    """AI-Toolkit's ``base_model.model.`` spelling of Krea 2 names is PEFT naming, whose Krea 2
    aliases (exact: a PEFT adapter of a model whose own modules are ``blocks.N.attn.wq`` keeps
    them) land every module as diffusers' Krea 2 loader does, which reads these files: each Linear
    equal to that loader (which refuses a file with ``.alpha``) and to the float64 reference
    (``alpha / r``). The file was refused before, its keys matching no injected layer."""
    names = _linears(_tiny_krea2())
    twin = _file(_tiny_krea2(), names, _krea2_original, alpha=alpha)
    sd = {k.replace("diffusion_model.", "base_model.model.", 1): v for k, v in twin.items()}
    ours, fmt = _lorahot(_tiny_krea2, sd, names)
    assert fmt == "peft"
    _assert_same(ours, _reference(_tiny_krea2, twin, names, _krea2_original))
    if not alpha:
        loader = diffusers.loaders.lora_pipeline.Krea2LoraLoaderMixin
        _assert_same(ours, _diffusers(_tiny_krea2, loader, sd, names))


def _tiny_ideogram4() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.Ideogram4Transformer2DModel(
            in_channels=8,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            intermediate_size=32,
            adaln_dim=16,
            llm_features_dim=24,
            mrope_section=(2, 1, 1),
        )
        .double()
        .eval()
    )


@pytest.mark.skipif(
    not hasattr(diffusers, "Ideogram4Transformer2DModel")
    or not hasattr(diffusers.loaders.lora_pipeline, "Ideogram4LoraLoaderMixin"),
    reason="needs a diffusers with Ideogram 4",
)
@pytest.mark.parametrize(
    ("prefix", "down", "up"),
    [("diffusion_model", "lora_A", "lora_B"), ("conditional_transformer", "lora_down", "lora_up")],
)
def test_ideogram4_fused_qkv_is_cut_into_thirds_as_diffusers_does(prefix: str, down: str, up: str) -> None:
    """Ideogram 4's original names are Lumina2's, with ``attention.o`` and a ``1 : 1 : 1``
    ``attention.qkv``: each part gets A and its third of B, the alpha's scale kept; Lumina2's own
    ``3 : 1 : 1`` cut of the same key does not apply to this model (its targets, ``attn.to_q``,
    are not there)."""
    model = _tiny_ideogram4()
    g = torch.Generator().manual_seed(3)
    sd: dict[str, torch.Tensor] = {}
    expected: dict[str, tuple[torch.Tensor, float]] = {}
    for i in range(2):
        layer = f"layers.{i}"
        fused = {"attention.qkv": ["attention.to_q", "attention.to_k", "attention.to_v"]}
        single = {m: [m] for m in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaln_modulation")}
        for original, parts in {**fused, "attention.o": ["attention.to_out.0"], **single}.items():
            first = model.get_submodule(f"{layer}.{parts[0]}")
            rank, key = 2 + len(sd) % 3, f"{prefix}.{layer}.{original}"
            a = torch.randn(rank, first.in_features, generator=g, dtype=torch.float64) * 0.3
            b = torch.randn(first.out_features * len(parts), rank, generator=g, dtype=torch.float64) * 0.3
            sd[f"{key}.{down}.weight"], sd[f"{key}.{up}.weight"] = a, b
            sd[f"{key}.alpha"] = torch.tensor(rank * 1.5, dtype=torch.float64)
            for j, part in enumerate(parts):
                rows = b[j * first.out_features : (j + 1) * first.out_features]
                expected[f"{layer}.{part}"] = (rows @ a, 1.5)
    names = sorted(expected)
    ours, fmt = _lorahot(_tiny_ideogram4, sd, names)
    assert fmt == "lumina2"
    reference = _weights(_tiny_ideogram4(), names)
    for name, (delta, scale) in expected.items():
        reference[name] = reference[name] + torch.cat(
            [(scale * delta).T, torch.zeros(1, delta.shape[0], dtype=torch.float64)]
        )
    _assert_same(ours, reference)
    _assert_same(ours, _diffusers(_tiny_ideogram4, diffusers.loaders.lora_pipeline.Ideogram4LoraLoaderMixin, sd, names))


def test_a_text_encoders_q_proj_never_reaches_a_transformers_to_q_through_the_alias() -> None:
    """PEFT naming's ``q_proj -> to_q`` alias lands on a layer of exactly the aliased name only:
    a text encoder's ``encoder.layers.0.self_attn.q_proj`` (shapes alike) reached ACE-Step's
    ``layers.0.self_attn.to_q`` once the lookup dropped ``encoder.``, changing the DiT by 0.16
    where diffusers' loader refuses. Refused, naming the key."""
    model = tiny_ace_step()
    sd = {}
    for i in range(2):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.encoder.layers.{i}.self_attn.{proj}"
            sd[f"{key}.lora_A.weight"] = torch.randn(2, 32, dtype=torch.float64)
            sd[f"{key}.lora_B.weight"] = torch.randn(32, 2, dtype=torch.float64)
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"encoder\.layers\.0\.self_attn\.q_proj: matches no"):
        runtime.load(sd)


def test_lycoris_in_the_new_namings_loads_in_merged_mode_as_in_comfyui_naming() -> None:
    """A LoHa on an LTX-2 block plus ``adaln_single`` (the ltx2 marker): it was refused as
    'LyCORIS ... in kohya or ComfyUI naming' where the same file without ``adaln_single`` (ComfyUI
    naming) loaded; the block's merged weight is the same either way."""
    g = torch.Generator().manual_seed(4)
    sd: dict[str, torch.Tensor] = {}
    for key, (out, inn) in {"transformer_blocks.0.attn1.to_q": (16, 16), "adaln_single.linear": (96, 16)}.items():
        for f, shape in {
            "hada_w1_a": (out, 2),
            "hada_w1_b": (2, inn),
            "hada_w2_a": (out, 2),
            "hada_w2_b": (2, inn),
        }.items():
            sd[f"diffusion_model.{key}.{f}"] = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3
        sd[f"diffusion_model.{key}.alpha"] = torch.tensor(2.0, dtype=torch.float64)
    assert _tiny_ltx2().get_submodule("time_embed.linear").out_features == 96
    weights = {}
    for name, file in {"ltx2": sd, "comfyui": {k: v for k, v in sd.items() if "adaln" not in k}}.items():
        model = _tiny_ltx2()
        info = lorahot.inject(model, "all-linear", max_rank=8, merged=True).load(dict(file))
        assert info.format == name
        weights[name] = model.get_submodule("transformer_blocks.0.attn1.to_q").weight.detach().clone()
    torch.testing.assert_close(weights["ltx2"], weights["comfyui"], rtol=0, atol=0)


def test_a_partly_injected_ideogram4_model_takes_its_own_cut() -> None:
    """Of the two cuts of ``attention.qkv``, the one whose layers the model has, injected or not:
    with ``to_v`` not injected, Lumina2's 3:1:1 onto ``attn.to_q`` was taken (refused, even with
    ``strict=False``); now q and k load and v is refused by name, or skipped with ``strict=False``."""
    model = _tiny_ideogram4()
    q = model.get_submodule("layers.0.attention.to_q")
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, q.in_features, generator=g, dtype=torch.float64)
    b = torch.randn(3 * q.out_features, 3, generator=g, dtype=torch.float64)
    sd = {
        "diffusion_model.layers.0.attention.qkv.lora_A.weight": a,
        "diffusion_model.layers.0.attention.qkv.lora_B.weight": b,
    }
    names = ["layers.0.attention.to_q", "layers.0.attention.to_k"]
    with pytest.raises(lorahot.AdapterMismatchError, match=r"attention\.to_v \(part of"):
        lorahot.inject(_tiny_ideogram4(), ["to_q", "to_k"], max_rank=8).load(dict(sd))
    runtime = lorahot.inject(model, ["to_q", "to_k"], max_rank=8)
    runtime.load(dict(sd), strict=False)
    reference = _weights(_tiny_ideogram4(), names)
    for j, name in enumerate(names):
        delta = b[j * q.out_features : (j + 1) * q.out_features] @ a
        reference[name] = reference[name] + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
    _assert_same(_weights(model, names), reference)


#: per family: the original norms with a weight -> (diffusers' norm, size), as diffusers'
#: conversion renames them, and an original LoRA module that lands on ``(diffusers' Linear, in, out)``
_NORMS: dict[str, tuple[dict[str, tuple[str, int]], tuple[str, str, int, int]]] = {
    "ltx2": (
        {
            "transformer_blocks.0.attn1.q_norm": ("transformer_blocks.0.attn1.norm_q", 16),
            "transformer_blocks.0.attn2.k_norm": ("transformer_blocks.0.attn2.norm_k", 16),
            "transformer_blocks.0.audio_attn1.k_norm": ("transformer_blocks.0.audio_attn1.norm_k", 16),
            "transformer_blocks.0.audio_to_video_attn.q_norm": ("transformer_blocks.0.audio_to_video_attn.norm_q", 16),
            "transformer_blocks.0.video_to_audio_attn.k_norm": ("transformer_blocks.0.video_to_audio_attn.norm_k", 16),
        },
        ("transformer_blocks.0.attn1.to_out.0", "transformer_blocks.0.attn1.to_out.0", 16, 16),
    ),
    "krea2": (
        {
            "blocks.0.prenorm": ("transformer_blocks.0.norm1", 16),
            "blocks.1.postnorm.scale": ("transformer_blocks.1.norm2", 16),
            "blocks.0.attn.qknorm.qnorm": ("transformer_blocks.0.attn.norm_q", 8),
            "blocks.1.attn.qknorm.knorm.scale": ("transformer_blocks.1.attn.norm_k", 8),
            "txtfusion.layerwise_blocks.0.prenorm": ("text_fusion.layerwise_blocks.0.norm1", 16),
            "txtfusion.refiner_blocks.0.attn.qknorm.knorm": ("text_fusion.refiner_blocks.0.attn.norm_k", 8),
            "txtmlp.0": ("txt_in.norm", 16),
            "last.norm.scale": ("final_layer.norm", 16),
        },
        ("blocks.0.attn.wo", "transformer_blocks.0.attn.to_out.0", 16, 16),
    ),
    "anima": (
        {
            "blocks.0.self_attn.q_norm": ("transformer_blocks.0.attn1.norm_q", 24),
            "blocks.0.self_attn.k_norm": ("transformer_blocks.0.attn1.norm_k", 24),
            "blocks.1.cross_attn.q_norm": ("transformer_blocks.1.attn2.norm_q", 24),
            "blocks.1.cross_attn.k_norm": ("transformer_blocks.1.attn2.norm_k", 24),
            "t_embedding_norm": ("time_embed.norm", 48),
        },
        ("blocks.0.self_attn.output_proj", "transformer_blocks.0.attn1.to_out.0", 48, 48),
    ),
    "flux3": (
        {
            "content_mode_blocks.image.0.norm.query_norm": ("mode_blocks.image.0.attn.norm_q", 8),
            "content_mode_blocks.image_cond.0.norm.key_norm.scale": ("mode_blocks.image_cond.0.attn.norm_k", 8),
            "txt_mode_blocks.0.norm.key_norm": ("txt_mode_blocks.0.attn.norm_k", 8),
            "single_blocks.0.norm.query_norm.scale": ("single_transformer_blocks.0.attn.norm_q", 8),
            "single_blocks.1.norm.key_norm": ("single_transformer_blocks.1.attn.norm_k", 8),
        },
        ("single_blocks.0.attn_out", "single_transformer_blocks.0.attn.to_out.0", 16, 16),
    ),
}
#: the refusal of a delta of a norm that has no weight in the model, naming it (any naming)
_BARE = "names {}, a normalization layer without a weight or bias in this model .* no weight to fold a delta into"
#: per family: deltas of norms without a weight -> the error and a part of its reason (Anima's
#: refused by the naming, by name; the others' by the model's norms, as diffusers names them)
_NORM_REFUSALS: dict[str, dict[str, tuple[type[Exception], str]]] = {
    "anima": {
        "blocks.0.layer_norm_mlp": (lorahot.UnknownFormatError, "no weight or bias in Anima"),
        "final_layer.layer_norm": (lorahot.UnknownFormatError, "no weight or bias in Anima"),
    },
    "ltx2": {
        "transformer_blocks.0.norm1": (lorahot.AdapterMismatchError, _BARE.format(r"transformer_blocks\.0\.norm1")),
        "transformer_blocks.0.audio_norm3": (
            lorahot.AdapterMismatchError,
            _BARE.format(r"transformer_blocks\.0\.audio_norm3"),
        ),
        "norm_out": (lorahot.AdapterMismatchError, _BARE.format("norm_out")),
        "audio_norm_out": (lorahot.AdapterMismatchError, _BARE.format("audio_norm_out")),
    },
    "flux3": {
        "content_mode_blocks.image.0.pre_norm": (
            lorahot.AdapterMismatchError,
            _BARE.format(r"mode_blocks\.image\.0\.norm"),
        ),
        "txt_mode_blocks.0.pre_norm": (lorahot.AdapterMismatchError, _BARE.format(r"txt_mode_blocks\.0\.norm")),
        "single_blocks.1.pre_norm": (
            lorahot.AdapterMismatchError,
            _BARE.format(r"single_transformer_blocks\.1\.norm"),
        ),
    },
}


def _norm_key(name: str, spelling: str) -> str:
    return "lora_unet_" + name.replace(".", "_") if spelling == "kohya" else f"diffusion_model.{name}"


@pytest.mark.parametrize("spelling", ["diffusion_model", "kohya"])
@pytest.mark.parametrize("family", sorted(_NORMS))
def test_norm_deltas_in_original_names_fold_into_diffusers_norms_in_merged_mode(family: str, spelling: str) -> None:
    """A ``.diff`` of a norm in the original names (LTX-2's ``attn1.q_norm``, ..., as ComfyUI's LoRA
    extraction writes one for every norm with a weight) matched no injected layer, with a hint to add
    the norm to targets that the key could never reach. Now they are aliased as diffusers' conversion
    renames them, ``plan_targets`` lists the norms and the file folds: float64 ``W + s alpha / r B A``
    and ``w + s diff`` at scales 1 and 0.5, in the naming and its kohya spelling. Deltas of norms
    that have no weight are refused, naming the key and the norm, nothing changed: LTX-2's and
    Flux.3's (``norm_out``, ``pre_norm``) were told to add the norm to targets, which cannot take
    them."""
    norms, (module, linear, fan_in, fan_out) = _NORMS[family]
    g = torch.Generator().manual_seed(72)
    with torch.no_grad():
        model = _FAMILIES[family][0]()
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        a = torch.randn(2, fan_in, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(fan_out, 2, generator=g, dtype=torch.float64) * 0.3
        stem = _norm_key(module, spelling)
        sd = {f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b, f"{stem}.alpha": torch.tensor(3.0)}
        expected = {f"{linear}.weight": 1.5 * b @ a}
        for name, (norm, size) in norms.items():
            assert model.get_submodule(norm).weight.shape == (size,)
            key = f"{_norm_key(name, spelling)}.diff"
            sd[key] = torch.randn(size, generator=g, dtype=torch.float64) * 0.1
            expected[f"{norm}.weight"] = sd[key]
        runtime = assert_norm_deltas_fold(
            model,
            sd,
            {norm for norm, _ in norms.values()},
            f"{family}-kohya" if spelling == "kohya" else family,
            pristine,
            expected,
        )

        before = {k: v.clone() for k, v in model.state_dict().items()}
        for name, (error, message) in _NORM_REFUSALS.get(family, {}).items():
            hostile = dict(sd) | {f"{_norm_key(name, spelling)}.diff": torch.zeros(16, dtype=torch.float64)}
            with pytest.raises(
                error, match=rf"{re.escape(_norm_key(name, spelling))}\b.*{message}.*strict=False"
            ) as refused:
                runtime.load(hostile)
            assert "Inject those modules" not in str(refused.value)  # no target can take it
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


#: per kohya spelling: a module key of the file that no module of the model has, where the
#: naming places it, and the injected layer nearest to that
_UNPLACED = {
    # anima-kohya turns a key's underscores back into Anima's dotted names first
    "anima": (
        "lora_unet_blocks_7_self_attn_q_proj",
        "transformer_blocks.7.attn1.to_q",
        "transformer_blocks.1.attn1.to_q",
    ),
    "flux3": ("lora_unet_single_blocks_7_q_proj", "single_transformer_blocks.7.attn.to_q", None),
}


@pytest.mark.parametrize("family", sorted(_UNPLACED))
def test_a_kohya_key_that_lands_nowhere_is_named_as_the_file_spells_it(family: str) -> None:
    """A kohya key of a module the model lacks (block 7 of a two-block model) was reported as the
    half-dotted name the naming's renames make of it (``lora_unet_blocks.7.self_attn.q_proj``),
    which neither the file nor the model has, with neighbours compared against that
    (``ff.net.0.proj``); an A without its B likewise. Now each message names the file's key, and
    the nearest injected layers are those nearest to where the naming places the module."""
    stem, placed, nearest = _UNPLACED[family]
    model = _FAMILIES[family][0]()
    layer = model.get_submodule(re.sub(r"\.7\.", ".1.", placed))
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    a = torch.zeros(2, layer.in_features, dtype=torch.float64)
    b = torch.zeros(layer.out_features, 2, dtype=torch.float64)
    closest = re.escape(nearest or re.sub(r"\.7\.", ".1.", placed))
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=rf"\n  - {stem}: matches no injected layer \(closest: {closest}\b.*places it at {re.escape(placed)},",
    ):
        runtime.load({f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b})
    real = stem.replace("_7_", "_0_")
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"\n  - {real}: has lora_down \({real}\.lora_down"):
        runtime.load({f"{real}.lora_down.weight": a})


@pytest.mark.parametrize("alpha", [False, True], ids=["no-alpha", "alpha"])
def test_a_hidream_kohya_file_of_its_final_layer_lands_on_its_own_final_layer(alpha: bool) -> None:
    """HiDream's ``final_layer.linear`` and ``final_layer.adaLN_modulation.1`` are diffusers' own
    names, which a kohya file of them alone spells as Flux.1's final layer; it reads as flux-kohya
    (no block key tells the two apart) and each module lands on the layer of its own name, its
    rows as they are (no swap: HiDream's adaLN is not re-ordered), as its ``diffusion_model.`` twin
    does, against the float64 reference and diffusers' loader."""
    names = [n for n in _linears(_tiny_hidream()) if n.startswith("final_layer.")]
    assert sorted(names) == ["final_layer.adaLN_modulation.1", "final_layer.linear"]
    twin = _file(_tiny_hidream(), names, str, alpha=alpha)
    ours, fmt = _lorahot(_tiny_hidream, _kohya_spelling(twin), names)
    assert fmt == "flux-kohya"
    _assert_same(ours, _reference(_tiny_hidream, twin, names, str))
    if not alpha:
        _assert_same(ours, _diffusers(_tiny_hidream, diffusers.HiDreamImagePipeline, twin, names))
