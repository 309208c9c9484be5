"""diffusers' ``lora_adapter_metadata`` keyed by component (``"transformer.lora_alpha"``,
``"unet.alpha_pattern"``) over a file whose keys carry no component prefix (the model's own
module names, PEFT roles, as some trainers write them), against diffusers 0.42's loaders.

No diffusers loader applies that config to those keys: each pipeline's ``lora_state_dict`` plus
``load_lora_into_transformer``/``load_lora_into_unet`` keeps only the keys under its prefix (it
loads nothing), and the model's ``load_lora_adapter(prefix=None)`` hands the prefixed fields to
``LoraConfig`` (a TypeError). lorahot took alpha = rank for them (the metadata silently dropped);
it now refuses, naming the file, the component and its fields, and the ``config=`` that loads
them; with that ``config=`` the modules load as diffusers loads the same file with prefixed keys.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from tests.helpers import tiny_unet

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from tests.system.test_parity_flux import tiny_flux, tiny_flux2  # noqa: E402 - after the importorskip
from tests.system.test_parity_qwen_image import tiny_qwen  # noqa: E402
from tests.system.test_parity_sd3 import tiny_sd3  # noqa: E402
from tests.system.test_parity_wan import tiny_wan  # noqa: E402

_ATTN = "transformer_blocks.0.attn"
_UNET_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
#: model name -> (tiny model, its pipeline's loader mixin, the component, the LoRA'd modules)
MODELS: dict[str, tuple[Callable[[], torch.nn.Module], type, str, tuple[str, ...]]] = {
    "flux": (tiny_flux, diffusers.FluxPipeline, "transformer", (f"{_ATTN}.to_q", f"{_ATTN}.to_k", "proj_out")),
    "flux2": (tiny_flux2, diffusers.Flux2Pipeline, "transformer", (f"{_ATTN}.to_q", f"{_ATTN}.to_k")),
    "sdxl": (tiny_unet, diffusers.StableDiffusionXLPipeline, "unet", (f"{_UNET_ATTN}.to_q", f"{_UNET_ATTN}.to_k")),
    "sd3": (tiny_sd3, diffusers.StableDiffusion3Pipeline, "transformer", (f"{_ATTN}.to_q", f"{_ATTN}.to_k")),
    "qwen-image": (tiny_qwen, diffusers.QwenImagePipeline, "transformer", (f"{_ATTN}.to_q", f"{_ATTN}.to_k")),
    "wan": (tiny_wan, diffusers.WanPipeline, "transformer", ("blocks.0.attn1.to_q", "blocks.0.attn1.to_k")),
}
RANK, ALPHA, PATTERN_ALPHA = 4, 8.0, 2.0


def _file(model: torch.nn.Module, modules: tuple[str, ...], roles: tuple[str, str], prefix: str = ""):
    g = torch.Generator().manual_seed(7)
    sd = {}
    for name in modules:
        out_features, in_features = model.get_submodule(name).weight.shape
        sd[f"{prefix}{name}.{roles[0]}.weight"] = torch.randn(RANK, in_features, generator=g) * 0.3
        sd[f"{prefix}{name}.{roles[1]}.weight"] = torch.randn(out_features, RANK, generator=g) * 0.3
    return sd


def _fields(modules: tuple[str, ...]) -> dict:
    """The metadata's config: lora_alpha != r, and an alpha_pattern for the second module."""
    return {
        "r": RANK,
        "lora_alpha": ALPHA,
        "alpha_pattern": {modules[1]: PATTERN_ALPHA},
        "target_modules": list(modules),
    }


def _diffusers_pipeline_load(mixin: type, component: str, path: Path, model: torch.nn.Module) -> None:
    """What each pipeline's ``load_lora_weights`` does with a file, on the model alone."""
    load = mixin.load_lora_into_unet if component == "unet" else mixin.load_lora_into_transformer
    takes_alphas = "network_alphas" in inspect.signature(load).parameters
    extra = {"return_alphas": True} if "Flux" in mixin.__name__ else {}  # the others return them uncalled
    out = mixin.lora_state_dict(str(path), return_lora_metadata=True, **extra)
    state, metadata = out[0], out[-1]
    alphas = {"network_alphas": out[1] if len(out) == 3 else None} if takes_alphas else {}
    load(state, **alphas, **{component: model}, metadata=metadata, adapter_name="oracle")


@torch.no_grad()
def _probe(model: torch.nn.Module, modules: tuple[str, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for name in modules:
        layer = model.get_submodule(name)
        in_features = (layer.base_layer if hasattr(layer, "base_layer") else layer).in_features
        out[name] = layer(torch.randn(5, in_features, generator=g))
    return out


@torch.no_grad()
def _reference(model: torch.nn.Module, modules: tuple[str, ...], sd: dict, roles: tuple[str, str]) -> dict:
    """Each layer's output on the probe, its update built in float64 at the metadata's scales."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for i, name in enumerate(modules):
        layer = model.get_submodule(name)
        w, b = layer.weight.double(), layer.bias
        x = torch.randn(5, layer.in_features, generator=g).double()
        a, up = sd[f"{name}.{roles[0]}.weight"].double(), sd[f"{name}.{roles[1]}.weight"].double()
        scale = (PATTERN_ALPHA if i == 1 else ALPHA) / RANK
        out[name] = x @ (w + scale * up @ a).T + (0.0 if b is None else b.double())
    return out


@pytest.mark.parametrize("roles", [("lora_A", "lora_B"), ("lora_down", "lora_up")], ids=["lora_A", "lora_down"])
@pytest.mark.parametrize("name", list(MODELS))
def test_component_metadata_over_bare_keys_is_refused_and_config_loads_it_as_diffusers(
    name: str, roles: tuple[str, str], tmp_path: Path
) -> None:
    make, mixin, component, modules = MODELS[name]
    sd = _file(make(), modules, roles)
    header = {"lora_adapter_metadata": json.dumps({f"{component}.{k}": v for k, v in _fields(modules).items()})}
    path = tmp_path / "bare.safetensors"
    save_file(sd, str(path), header)

    # diffusers: the pipeline loaders load nothing, the model's own loader refuses the prefixed metadata
    logging.disable(logging.WARNING)
    try:
        oracle = make()
        before = _probe(oracle, modules)
        _diffusers_pipeline_load(mixin, component, path, oracle)
        assert not any(hasattr(m, "lora_A") for m in oracle.modules())
        assert all(torch.equal(before[k], v) for k, v in _probe(oracle, modules).items())
        with pytest.raises(TypeError, match="LoraConfig"):
            make().load_lora_adapter(str(path), prefix=None, use_safetensors=True)
    finally:
        logging.disable(logging.NOTSET)

    # lorahot: refused by every reader, twice (the cached recipe path), the runtime bitwise unchanged
    model = make()
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    outputs = _probe(model, modules)
    pattern = re.escape(f"{{'{modules[1]}': 2.0}}")
    refusal = (
        rf"bare\.safetensors: the lora_adapter_metadata[\s\S]*component {component} \(r=4, lora_alpha=8\.0, "
        rf"alpha_pattern=\{{'[\s\S]*\), but {len(modules)} of its modules carry no component prefix [\s\S]*pass "
        rf"config=\{{'alpha_pattern': {pattern}, 'lora_alpha': 8\.0, 'r': 4\}} to load"
    )
    for read in (
        lambda: runtime.load(path),
        lambda: runtime.load(path),
        lambda: runtime.preload(path),
        lambda: lorahot.read_adapter(path),
        lambda: lorahot.plan_targets(path, model),
    ):
        with pytest.raises(lorahot.AdapterMismatchError, match=refusal):
            read()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(outputs[k], v) for k, v in _probe(model, modules).items())
    components = lorahot.inject({component: make()}, "all-linear", max_rank=8)
    with pytest.raises(lorahot.AdapterMismatchError, match=refusal):
        components.load(path)

    # with the metadata's config passed: each module at its alpha / r, as diffusers loads the prefixed twin
    fields = {k: v for k, v in _fields(modules).items() if k != "target_modules"}
    runtime.load(path, config=fields)
    ours = _probe(model, modules)
    reference = _reference(make(), modules, sd, roles)
    twin = tmp_path / "prefixed.safetensors"
    save_file(_file(make(), modules, ("lora_A", "lora_B"), f"{component}."), str(twin), header)
    oracle = make()
    _diffusers_pipeline_load(mixin, component, twin, oracle)
    expected = _probe(oracle, modules)
    for module in modules:
        torch.testing.assert_close(ours[module].double(), reference[module], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[module], expected[module], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [False, True], ids=["no-alpha", "alpha"])
def test_component_metadata_over_kohya_keys_is_refused_where_loaders_disagree(alpha: bool, tmp_path: Path) -> None:
    """kohya's names carry no component prefix either; sd-scripts and ComfyUI ignore the header
    metadata, diffusers' SDXL loader converts the keys under ``unet.`` and applies it (scale
    ``lora_alpha / r`` = 2), or refuses it beside ``.alpha`` tensors. lorahot took alpha = rank
    (scale 1); it now refuses, naming the disagreement."""
    name = f"{_UNET_ATTN}.to_q"
    key = "lora_unet_" + name.replace(".", "_")
    out_features, in_features = tiny_unet().get_submodule(name).weight.shape
    sd = {
        f"{key}.lora_down.weight": torch.randn(RANK, in_features),
        f"{key}.lora_up.weight": torch.randn(out_features, RANK),
    }
    sd |= {f"{key}.alpha": torch.tensor(float(RANK))} if alpha else {}
    fields = {"unet.r": RANK, "unet.lora_alpha": ALPHA, "unet.target_modules": [name]}
    path = tmp_path / "kohya.safetensors"
    save_file(sd, str(path), {"lora_adapter_metadata": json.dumps(fields)})
    oracle = tiny_unet()
    logging.disable(logging.WARNING)
    try:
        if alpha:
            with pytest.raises(ValueError, match="network_alphas` and `metadata"):
                _diffusers_pipeline_load(diffusers.StableDiffusionXLPipeline, "unet", path, oracle)
        else:
            _diffusers_pipeline_load(diffusers.StableDiffusionXLPipeline, "unet", path, oracle)
            assert oracle.get_submodule(name).scaling == {"oracle": ALPHA / RANK}
    finally:
        logging.disable(logging.NOTSET)
    model = tiny_unet()
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"component unet \(r=4, lora_alpha=8\.0\), but 1 of its modules carry no component prefix[\s\S]*the "
        r"kohya naming's own ignore that metadata, while diffusers' converters put them under a component",
    ):
        runtime.load(path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


_CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
_SDXL_TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0"],
    "text_encoder": _CLIP_TARGETS,
    "text_encoder_2": _CLIP_TARGETS,
}


def _sdxl_parts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """A rank-4 LoRA on every target of each SDXL component, keyed by the component's module names."""
    g = torch.Generator().manual_seed(5)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for component, targets in _SDXL_TARGETS.items():
        part = parts.setdefault(component, {})
        for name, module in getattr(pipe, component).named_modules():
            if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in targets):
                part[f"{name}.lora_A.weight"] = torch.randn(RANK, module.in_features, generator=g) * 0.3
                part[f"{name}.lora_B.weight"] = torch.randn(module.out_features, RANK, generator=g) * 0.3
    return parts


@pytest.mark.parametrize(
    "stated",
    [("unet",), ("unet", "text_encoder"), ("text_encoder", "text_encoder_2")],
    ids=["unet", "unet+text_encoder", "text_encoders"],
)
def test_metadata_for_some_components_of_a_pipeline_file_is_refused_naming_the_others(
    stated: tuple[str, ...], tmp_path: Path
) -> None:
    """A diffusers pipeline file (``save_lora_weights``) whose ``lora_adapter_metadata`` states a
    config for some of its components and none for the others: diffusers' SDXL loader fails on it
    (it builds the others' LoraConfig from an empty part), so lorahot refuses it naming the
    components without a config and their modules, with every parameter and buffer of every
    component bitwise unchanged; it had said those modules, under their own component's prefix,
    carried none. With config= the file loads, every module at that config's alpha / r."""
    from tests.helpers import tiny_clip

    unet = tiny_unet(cross_attention_dim=32)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=tiny_clip(), text_encoder_2=tiny_clip(with_projection=True), tokenizer=None,
        tokenizer_2=None, unet=unet, scheduler=None,
    )  # fmt: skip
    parts = _sdxl_parts(pipe)
    meta = {c: {"r": RANK, "lora_alpha": ALPHA, "target_modules": _SDXL_TARGETS[c]} for c in stated}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=parts["unet"], text_encoder_lora_layers=parts["text_encoder"],
        text_encoder_2_lora_layers=parts["text_encoder_2"], unet_lora_adapter_metadata=meta.get("unet"),
        text_encoder_lora_adapter_metadata=meta.get("text_encoder"),
        text_encoder_2_lora_adapter_metadata=meta.get("text_encoder_2"),
    )  # fmt: skip
    path = tmp_path / "pytorch_lora_weights.safetensors"
    logging.disable(logging.WARNING)
    try:
        with pytest.raises((ValueError, KeyError)):  # "specify `target_modules`", or 'model_type'
            copy.deepcopy(pipe).load_lora_weights(str(path))
    finally:
        logging.disable(logging.NOTSET)

    others = [c for c in _SDXL_TARGETS if c not in stated]
    count = sum(len(parts[c]) // 2 for c in others)
    q_proj = "text_model.encoder.layers.0.self_attn.q_proj"
    plain = copy.deepcopy(pipe.text_encoder_2.get_submodule(q_proj)).double()
    runtime = lorahot.inject(pipe, _SDXL_TARGETS, max_rank=8)
    before = {
        f"{c}.{k}": t.clone()
        for c in _SDXL_TARGETS
        for k, t in [*getattr(pipe, c).named_parameters(), *getattr(pipe, c).named_buffers()]
    }
    first = others[0]
    refusal = (
        rf"but none for {', '.join(others)}, which holds? {count} of its modules \({first} \({len(parts[first]) // 2}, "
        rf"e\.g\. {re.escape(first)}\.[\s\S]*diffusers' pipeline loaders build each component's LoraConfig[\s\S]*"
        rf"save_lora_weights\({first}_lora_adapter_metadata=[\s\S]*pass config="
    )
    for read in (lambda: runtime.load(path), lambda: lorahot.read_adapter(path), lambda: runtime.preload(path)):
        with pytest.raises(lorahot.AdapterMismatchError, match=refusal) as refused:
            read()
        assert "carry no component prefix" not in str(refused.value)
    after = {
        f"{c}.{k}": t
        for c in _SDXL_TARGETS
        for k, t in [*getattr(pipe, c).named_parameters(), *getattr(pipe, c).named_buffers()]
    }
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    # config= settles it: every module of every component at lora_alpha / r
    info = runtime.load(path, config={"r": RANK, "lora_alpha": ALPHA})
    assert info.components == {"unet": 32, "text_encoder": 12, "text_encoder_2": 12}
    a = parts["text_encoder_2"][f"{q_proj}.lora_A.weight"].double()
    b = parts["text_encoder_2"][f"{q_proj}.lora_B.weight"].double()
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    want = x.double() @ (plain.weight + ALPHA / RANK * b @ a).T + plain.bias
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder_2.get_submodule(q_proj)(x).double(), want, rtol=1e-5, atol=1e-5)
