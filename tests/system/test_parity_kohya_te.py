"""Kohya text-encoder LoRAs on transformers-5 CLIP, against diffusers' own loader.

transformers 5's ``CLIPTextModel`` has no ``text_model.`` level (its layers are
``encoder.layers.0.self_attn.q_proj``), while kohya files name them
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``. lorahot resolves them through the
model's own names (step 5 of :mod:`lorahot.resolve.keys`); the oracle is diffusers'
``_convert_non_diffusers_lora_to_diffusers`` + ``load_lora_into_text_encoder``, which strips
``text_model.`` when the encoder lacks it.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import lorahot
from tests.helpers import tiny_clip, tiny_llama

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers  # noqa: E402
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin  # noqa: E402

from tests.system.test_parity_flux import tiny_flux  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _clip(with_projection: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return tiny_clip(with_projection)


def _kohya_file(model: nn.Module, component: str, rank: int = 4) -> dict[str, torch.Tensor]:
    """A kohya LoRA for every target of ``model``, named with kohya's ``text_model_`` level."""
    g = torch.Generator().manual_seed(1)
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in TARGETS:
            stem = f"{component}_text_model_{name.removeprefix('text_model.').replace('.', '_')}"
            out[f"{stem}.lora_down.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.1
            out[f"{stem}.lora_up.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.1
            out[f"{stem}.alpha"] = torch.tensor(float(rank) / 2)
    return out


def _oracle(model: nn.Module, kohya: dict[str, torch.Tensor], te_name: str) -> nn.Module:
    sd, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    oracle = copy.deepcopy(model)
    StableDiffusionXLLoraLoaderMixin.load_lora_into_text_encoder(sd, alphas, oracle, prefix=te_name, adapter_name="k")
    return oracle


@pytest.mark.parametrize(
    ("component", "te_name", "proj"), [("lora_te", "text_encoder", False), ("lora_te2", "text_encoder_2", True)]
)
def test_kohya_te_on_transformers5_clip_matches_diffusers(component: str, te_name: str, proj: bool) -> None:
    model = _clip(proj)
    assert hasattr(model, "text_model") == proj  # CLIPTextModel lost the level kohya names carry; WithProjection not
    kohya = _kohya_file(model, component)
    oracle = _oracle(model, kohya, te_name)
    runtime = lorahot.inject(model, TARGETS, max_rank=8)
    info = runtime.load(kohya)
    assert len(info.ranks) == 2 * len(TARGETS)
    ids = torch.tensor([[0, 5, 9, 3, 1]])
    with torch.no_grad():
        got, want, base = model(ids)[0], oracle(ids)[0], _clip(proj)(ids)[0]
    assert not torch.allclose(got, base, atol=1e-4)  # the adapter does change the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_negative_kohya_alpha_matches_diffusers() -> None:
    """A kohya file whose ``.alpha`` is negative: diffusers passes it as a network alpha into
    PEFT's lora_alpha (scale ``alpha / r``, as sd-scripts and ComfyUI compute it too); lorahot
    loads it to diffusers' output. Was: refused as not > 0."""
    model = _clip()
    kohya = {k: torch.tensor(-3.0) if k.endswith(".alpha") else v for k, v in _kohya_file(model, "lora_te").items()}
    oracle = _oracle(model, kohya, "text_encoder")
    runtime = lorahot.inject(model, TARGETS, max_rank=8)
    info = runtime.load(kohya)
    assert {m.scale for m in lorahot.read_adapter(kohya).modules.values()} == {-0.75}
    ids = torch.tensor([[0, 5, 9, 3, 1]])
    with torch.no_grad():
        got, want, base = model(ids)[0], oracle(ids)[0], _clip()(ids)[0]
    assert len(info.ranks) == 2 * len(TARGETS) and not torch.allclose(got, base, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wrapper_levels_never_drop_a_block_index() -> None:
    model = _clip()
    runtime = lorahot.inject(model, TARGETS, max_rank=8)
    # "layers_7_" carries a number: not a wrapper, so the key must not land on layers.0
    bad = {
        "lora_te_layers_7_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32),
        "lora_te_layers_7_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2),
    }
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"lora_te_layers_7_encoder_layers_0_self_attn_q_proj: matches no"
    ):
        runtime.load(bad)


def test_wrapper_match_that_is_ambiguous_lists_candidates() -> None:
    model = nn.ModuleDict({"x": nn.ModuleDict({"q": nn.Linear(8, 8)}), "x_q": nn.Linear(8, 8)})
    runtime = lorahot.inject(model, ["q", "x_q"], max_rank=4)
    key = "lora_unet_wrap_x_q"
    tensors = {f"{key}.lora_down.weight": torch.randn(2, 8), f"{key}.lora_up.weight": torch.randn(8, 2)}
    with pytest.raises(lorahot.AdapterMismatchError, match=r"lora_unet_wrap_x_q: ambiguous, matches x\.q, x_q"):
        runtime.load(tensors)


def test_wrapper_levels_are_dropped_from_the_key_only() -> None:
    """The suffix left after the key's wrapper levels names a layer whole: levels skipped on
    both sides would let any two names that end alike match (``wrap_x_q`` and ``a.x.q``)."""
    model = nn.ModuleDict({"a": nn.ModuleDict({"x": nn.ModuleDict({"q": nn.Linear(8, 8)})})})
    runtime = lorahot.inject(model, ["q"], max_rank=4)
    key = "lora_unet_wrap_x_q"
    tensors = {f"{key}.lora_down.weight": torch.randn(2, 8), f"{key}.lora_up.weight": torch.randn(8, 2)}
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"{key}: matches no injected layer"):
        runtime.load(tensors)


@pytest.mark.parametrize("key", ["lora_unet_head_layer_adaLN_modulation_1", "lora_unet_final_layer_adaLN_modulation_1"])
def test_wrapper_levels_never_leave_only_an_index(key: str) -> None:
    # dropping "head_layer_adaLN_modulation" would leave "1", a suffix of every "..._1" layer; Flux's
    # final adaLN (flux-kohya) is named as the part its swap makes of it, norm_out.linear
    model = nn.ModuleDict({"embed": nn.ModuleDict({"linear_1": nn.Linear(8, 8)}), "proj_1": nn.Linear(8, 8)})
    runtime = lorahot.inject(model, ["linear_1", "proj_1"], max_rank=4)
    tensors = {f"{key}.lora_down.weight": torch.randn(2, 8), f"{key}.lora_up.weight": torch.randn(8, 2)}
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"{key}\)?: matches no injected layer"):
        runtime.load(tensors)


def test_kohya_te_alphas_are_each_modules_own_where_diffusers_takes_the_most_common() -> None:
    """Per-module ``.alpha`` on a transformers-5 CLIP: diffusers' alpha pattern keys keep
    ``text_model.``, which the encoder no longer has, so every layer gets the most common alpha;
    lorahot applies each module's ``alpha / r``, as sd-scripts does. The reference: the model with
    each update added in float64."""
    model = _clip().double()
    kohya = {k: v.double() for k, v in _kohya_file(model, "lora_te").items()}
    for i, key in enumerate(k for k in kohya if k.endswith(".alpha")):
        kohya[key] = torch.tensor(8.0 if i % 3 == 0 else 1.0 + i % 2, dtype=torch.float64)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in reference.named_modules():
            stem = f"lora_te_text_model_{name.replace('.', '_')}"
            if f"{stem}.alpha" in kohya:
                down, up = kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"]
                mod.weight += float(kohya[f"{stem}.alpha"]) / down.shape[0] * up @ down
    oracle = _oracle(model, kohya, "text_encoder")
    lorahot.inject(model, TARGETS, max_rank=8).load(kohya)
    ids = torch.tensor([[0, 5, 9, 3, 1]])
    with torch.no_grad():
        got, want, theirs = model(ids)[0], reference(ids)[0], oracle(ids)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (theirs - want).abs().max() > 1e-2  # diffusers' most common alpha


def test_comfyui_text_encoder_keys_of_a_flux_file_match_diffusers() -> None:
    """ComfyUI saves a Flux LoRA's CLIP-L modules as ``text_encoders.clip_l.transformer.`` + the
    encoder's module names, beside ``diffusion_model.`` transformer keys; diffusers' Flux loader
    reads them as ``lora_te_`` (alphas folded) and drops ``text_encoders.t5xxl.``. On a pipeline
    runtime they were routed to the transformer and matched no layer; they now go to
    ``text_encoder`` (``clip_g`` to ``text_encoder_2``, ``t5xxl`` to ``text_encoder_3``), every CLIP
    layer's update equal to diffusers' converted one, and a T5 module, whose component this Flux
    runtime lacks (its T5 is ``text_encoder_2``, not injected here), is refused, or skipped with
    strict=False."""
    clip = _clip()
    comfyui = r"text_encoders.clip_l.transformer.text_model.encoder.layers.\1.\2."
    sd = {
        re.sub(r"^lora_te_text_model_encoder_layers_(\d+)_(self_attn|mlp)_", comfyui, k): v
        for k, v in _kohya_file(clip, "lora_te").items()
    }
    g = torch.Generator().manual_seed(5)
    flux_key = "diffusion_model.double_blocks.0.img_attn.proj"
    sd[f"{flux_key}.lora_down.weight"] = torch.randn(2, 32, generator=g)
    sd[f"{flux_key}.lora_up.weight"] = torch.randn(32, 2, generator=g)
    t5 = {"text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_down.weight": torch.ones(2, 8)}
    t5["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight"] = torch.ones(8, 2)
    converted = FluxLoraLoaderMixin.lora_state_dict({k: v.clone() for k, v in (sd | t5).items()})  # it scales in place
    converted = converted[0] if isinstance(converted, tuple) else converted
    te = {_old_diffusers_te(k): v for k, v in converted.items() if k.startswith("text_encoder.")}
    assert te and not any("t5" in k for k in converted)
    base = {n: m.weight.detach().clone() for n, m in clip.named_modules() if isinstance(m, nn.Linear)}
    runtime = lorahot.inject({"transformer": tiny_flux(), "text_encoder": clip}, "all-linear", max_rank=8, merged=True)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"T5 text-encoder module\(s\) with prefix 'text_encoders\.t5xxl\.transformer\.'.*: they go to "
        r"text_encoder_3 \(SD3's T5\), which was not injected, or to a text_encoder_2 that holds their modules "
        r"\(Flux\.1's T5\), which was not injected\n.*Inject the pipeline's T5 encoder too",
    ):
        runtime.load(sd | t5)
    info = runtime.load(sd | t5, strict=False)
    assert info.format == "flux-bfl" and set(info.skipped) == set(t5)
    checked = 0
    for name, layer in clip.named_modules():
        if f"{name}.down" not in te:  # the injected layers (not their wrapped base layers)
            continue
        delta = te[f"{name}.up"] @ te[f"{name}.down"]
        torch.testing.assert_close(layer.weight, base[name] + delta, msg=name)
        checked += 1
    assert checked == len([k for k in te if k.endswith(".down")]) > 0


def _old_diffusers_te(key: str) -> str:
    """``<module path>.down``/``.up`` of a text-encoder key diffusers' Flux conversion gives in
    its old names (``text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight``,
    ``...mlp.fc1.lora_linear_layer.up.weight``), on transformers 5's CLIP paths."""
    key = key.removeprefix("text_encoder.text_model.").removesuffix(".weight")
    for old, new in (("to_out_lora", "out_proj"), ("to_q_lora", "q_proj"), ("to_k_lora", "k_proj")):
        key = key.replace(f".{old}.", f".{new}.")
    return key.replace(".to_v_lora.", ".v_proj.").replace(".lora_linear_layer.", ".")


def _t5_file(t5: nn.Module, prefix: str, dotted: bool) -> dict[str, torch.Tensor]:
    """A LoRA (rank 2, alpha 1) on every linear of a T5 encoder, named as sd-scripts
    (``lora_te3_`` + underscores) or ComfyUI (``text_encoders.t5xxl.transformer.`` + dots) name it."""
    g = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {}
    for name, mod in t5.named_modules():
        if isinstance(mod, nn.Linear):
            stem = prefix + (name if dotted else name.replace(".", "_"))
            out[f"{stem}.lora_down.weight"] = torch.randn(2, mod.in_features, generator=g, dtype=torch.float64)
            out[f"{stem}.lora_up.weight"] = torch.randn(mod.out_features, 2, generator=g, dtype=torch.float64)
            out[f"{stem}.alpha"] = torch.tensor(1.0, dtype=torch.float64)
    return out


@pytest.mark.parametrize(
    ("prefix", "dotted"),
    [("lora_te3_", False), ("text_encoders.t5xxl.transformer.", True)],
    ids=["sd-scripts", "comfyui"],
)
def test_t5_modules_of_a_flux_file_load_into_the_pipelines_t5_text_encoder_2(prefix: str, dotted: bool) -> None:
    """sd-scripts' Flux.1 LoRA networks name the T5 ``lora_te3_`` (as its SD3 ones do), which a
    Flux.1 pipeline holds as ``text_encoder_2`` (diffusers' Flux loader drops these modules). On a
    runtime without ``text_encoder_3`` whose ``text_encoder_2`` holds their modules they load
    there: the encoder's output equals PEFT's with the same factors (float64); where no such
    encoder was injected the refusal says they are T5 modules and where each pipeline holds one."""
    from tests.system.test_readme import _tiny_flux

    pipe = _tiny_flux()
    t5 = pipe.text_encoder_2.double()
    sd = _t5_file(t5, prefix, dotted)
    names = sorted({n.rpartition(".")[2] for n, m in t5.named_modules() if isinstance(m, nn.Linear)})
    oracle = peft_model(copy.deepcopy(t5), names)
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        path = key[len(prefix) : -len(".lora_down.weight")]
        path = path if dotted else _t5_path(t5, path)
        layer = oracle.base_model.model.get_submodule(path)
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(sd[key])
            layer.lora_B["default"].weight.copy_(sd[key.replace("lora_down", "lora_up")])
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = t5(ids)[0]
    runtime = lorahot.inject(pipe, {"text_encoder_2": "all-linear"}, max_rank=4)
    info = runtime.load(sd)
    assert info.components == {"text_encoder_2": len(sd) // 3}
    with torch.no_grad():
        got, want = t5(ids)[0], oracle(input_ids=ids)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (want - base).abs().max() > 1e-2
    lone = lorahot.inject({"transformer": tiny_flux(), "text_encoder": _clip()}, "all-linear", max_rank=4)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=rf"{re.escape(repr(prefix))} .*: they go to text_encoder_3 \(SD3's T5\), which was not injected, or to a "
        r"text_encoder_2 that holds their modules \(Flux\.1's T5\), which was not injected\n"
        r"This runtime has components transformer, text_encoder\. Inject the pipeline's T5 encoder too "
        r"\(\{\.\.\., 'text_encoder_3': pipe\.text_encoder_3\} for SD3, \{\.\.\., 'text_encoder_2': "
        r"pipe\.text_encoder_2\} for Flux\.1\), or load with strict=False",
    ):
        lone.load(sd)
    clip_g = lorahot.inject({"text_encoder": _clip(), "text_encoder_2": _clip(True)}, "all-linear", max_rank=4)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"\(Flux\.1's T5\), which holds none of them\n"):
        clip_g.load(sd)  # SDXL's text_encoder_2 is a CLIP


def _t5_path(t5: nn.Module, underscored: str) -> str:
    return next(n for n, _ in t5.named_modules() if n.replace(".", "_") == underscored)


def peft_model(model: nn.Module, targets: list[str]) -> nn.Module:
    """``model`` under PEFT LoRA (rank 2, alpha 1: sd-scripts' scale alpha / rank) on ``targets``."""
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=1, target_modules=targets)).eval()


@pytest.mark.parametrize("naming", ["lora_te1_", "lora_te_", "comfyui", "no-alpha"])
def test_kohya_te_of_a_flux_file_matches_sd_scripts_and_diffusers_flux_loader(naming: str) -> None:
    """A Flux.1 file's CLIP-L modules with per-module ranks and alphas (sd-scripts' ``lora_te1_``,
    ``lora_te_``, ComfyUI's ``clip_l``, or without ``.alpha``): diffusers' Flux loader folds each
    module's ``alpha / r`` into its factors, so on a Flux pipeline it agrees with the float64
    sd-scripts reference, as lorahot does (unlike SDXL's loader, above)."""
    from tests.system.test_readme import _tiny_flux

    pipe = _tiny_flux()
    clip = pipe.text_encoder
    file = _kohya_file(clip, "lora_te1")
    for i, key in enumerate(k for k in file if k.endswith(".lora_down.weight")):
        stem = key.removesuffix(".lora_down.weight")
        rank = 2 if i % 2 else 4
        file[key], file[f"{stem}.lora_up.weight"] = file[key][:rank], file[f"{stem}.lora_up.weight"][:, :rank]
        file[f"{stem}.alpha"] = torch.tensor(8.0 if i % 3 == 0 else rank / 2)
    reference = copy.deepcopy(clip).double()
    with torch.no_grad():
        for name, mod in reference.named_modules():
            stem = f"lora_te1_text_model_{name.replace('.', '_')}"
            if f"{stem}.alpha" in file:
                down, up = file[f"{stem}.lora_down.weight"].double(), file[f"{stem}.lora_up.weight"].double()
                alpha = float(file[f"{stem}.alpha"]) if naming != "no-alpha" else down.shape[0]
                mod.weight += alpha / down.shape[0] * up @ down
    comfyui = r"text_encoders.clip_l.transformer.text_model.encoder.layers.\1.\2."
    respell = {
        "lora_te1_": lambda k: k,
        "lora_te_": lambda k: k.replace("lora_te1_", "lora_te_"),
        "comfyui": lambda k: re.sub(r"^lora_te1_text_model_encoder_layers_(\d+)_(self_attn|mlp)_", comfyui, k),
        "no-alpha": lambda k: k,
    }[naming]
    sd = {respell(k): v for k, v in file.items() if not (naming == "no-alpha" and k.endswith(".alpha"))}
    g = torch.Generator().manual_seed(5)
    proj = (
        "diffusion_model.double_blocks.0.img_attn.proj"
        if naming == "comfyui"
        else "lora_unet_double_blocks_0_img_attn_proj"
    )
    sd[f"{proj}.lora_down.weight"] = torch.randn(2, 32, generator=g)
    sd[f"{proj}.lora_up.weight"] = torch.randn(32, 2, generator=g)
    theirs = copy.deepcopy(pipe)
    theirs.load_lora_weights({k: v.clone() for k, v in sd.items()})
    clip.double()
    lorahot.inject(pipe, "all-linear", max_rank=8).load({k: v.double() for k, v in sd.items()})
    ids = torch.tensor([[0, 5, 9, 3, 1]])
    with torch.no_grad():
        want = reference(ids)[0]
        got, oracle = clip(ids)[0], theirs.text_encoder.double()(ids)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(oracle, want, rtol=1e-12, atol=1e-12)  # its scales are powers of two here


def _comfyui_te_file(model: nn.Module, encoder: str, wrapper: str, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA (rank 2, alpha 1) on every linear of a text encoder, as ComfyUI names it:
    ``text_encoders.<encoder>.transformer.`` + ``wrapper`` + the module's path."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            stem = f"text_encoders.{encoder}.transformer.{wrapper}{name}"
            out[f"{stem}.lora_down.weight"] = torch.randn(2, mod.in_features, generator=g, dtype=torch.float64)
            out[f"{stem}.lora_up.weight"] = torch.randn(mod.out_features, 2, generator=g, dtype=torch.float64)
            out[f"{stem}.alpha"] = torch.tensor(1.0, dtype=torch.float64)
    return out


def _linear_responses(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each Linear's response to the identity and to zero: its adapted weight and bias, float64."""
    out = {}
    for name, mod in model.named_modules():
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, nn.Linear) and not name.endswith("base_layer"):
            with torch.no_grad():
                out[name] = mod(torch.eye(base.in_features + 1, dtype=torch.float64)[:, : base.in_features])
    return out


def _plus(model: nn.Module, sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The float64 reference: every Linear's response with ``alpha / r * B @ A`` of its module in ``sd``."""
    out = _linear_responses(model)
    for name in out:
        down = sd[f"{prefix}{name}.lora_down.weight"]
        delta = 0.5 * sd[f"{prefix}{name}.lora_up.weight"] @ down  # alpha 1, rank 2
        out[name] = out[name] + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
    return out


def test_comfyui_text_encoders_go_to_the_component_of_their_architecture() -> None:
    """ComfyUI names a text encoder by what it is (``clip_l``, ``llama``, ``qwen25_7b``, ``t5xxl``),
    not by where a pipeline holds it. On a HunyuanVideo pipeline (``text_encoder`` a Llama,
    ``text_encoder_2`` the CLIP) the ``clip_l`` modules went to ``text_encoder`` by SD3's order and
    landed on the Llama's layers of the same name and shape, silently, and ``llama`` ones went to
    the denoiser and were refused. Each now goes to the component of its architecture: every
    Linear of both encoders at its float64 reference. Where no component or several fit, or the
    name is no architecture lorahot knows, the refusal says so and nothing changes."""
    llama, clip = tiny_llama().model.double(), _clip().double()
    sd = _comfyui_te_file(clip, "clip_l", "text_model.", seed=11) | _comfyui_te_file(llama, "llama", "model.", seed=12)
    expected = {
        "text_encoder": _plus(llama, sd, "text_encoders.llama.transformer.model."),
        "text_encoder_2": _plus(clip, sd, "text_encoders.clip_l.transformer.text_model."),
    }
    pipe = {"text_encoder": copy.deepcopy(llama), "text_encoder_2": copy.deepcopy(clip)}
    info = lorahot.inject(pipe, "all-linear", max_rank=4).load(dict(sd))
    assert info.components == {
        "text_encoder": len(expected["text_encoder"]),
        "text_encoder_2": len(expected["text_encoder_2"]),
    }
    for component, reference in expected.items():
        got = _linear_responses(pipe[component])
        for name, want in reference.items():
            torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12, msg=f"{component}.{name}")
    unknown = {k.replace(".llama.", ".nonesuch_1b."): v for k, v in sd.items()}
    refusals = {
        "no CLIP": (
            {"text_encoder": llama},
            sd,
            r"'text_encoders\.clip_l\.transformer\.'.*: no component of [^\n]* a CLIP",
        ),
        "two LMs": (
            {"text_encoder": llama, "text_encoder_2": tiny_llama(1).model.double()},
            sd,
            r"'text_encoders\.llama\.transformer\.'.*: several components are a decoder language model: text_encoder, "
            r"text_encoder_2",
        ),
        "unknown": (
            {"text_encoder": llama, "text_encoder_2": clip},
            unknown,
            r"ComfyUI's text encoder 'nonesuch_1b' is none lorahot knows the architecture of",
        ),
    }
    for label, (models, file, match) in refusals.items():
        models = {c: copy.deepcopy(m) for c, m in models.items()}
        before = {c: _linear_responses(m) for c, m in models.items()}
        with pytest.raises(lorahot.AdapterMismatchError, match=match):
            lorahot.inject(models, "all-linear", max_rank=4).load(dict(file))
        for c, m in models.items():
            assert all(torch.equal(v, before[c][k]) for k, v in _linear_responses(m).items()), label


def test_comfyui_t5_modules_go_to_the_t5_whatever_the_pipeline_calls_it() -> None:
    """Chroma and PixArt hold their T5 as ``text_encoder``: ComfyUI's ``t5xxl`` modules were
    refused there (routed to ``text_encoder_3``, SD3's place); they now load into it, every Linear
    at its float64 reference."""
    from tests.system.test_readme import _tiny_flux

    t5 = _tiny_flux().text_encoder_2.double()
    sd = _t5_file(t5, "text_encoders.t5xxl.transformer.", dotted=True)
    expected = _plus(t5, sd, "text_encoders.t5xxl.transformer.")
    ours = copy.deepcopy(t5)
    info = lorahot.inject(
        {"transformer": tiny_flux(), "text_encoder": ours}, {"text_encoder": "all-linear"}, max_rank=4
    ).load(dict(sd))
    assert info.components == {"text_encoder": len(expected)}
    got = _linear_responses(ours)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12, msg=name)


def _deep_clip(layers: int) -> nn.Module:
    """:func:`tiny_clip` (width 32) with ``layers`` encoder layers, float64."""
    import transformers

    torch.manual_seed(3)
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return transformers.CLIPTextModel(config).eval().double()


def _state(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c, m in models.items() for k, v in m.state_dict(keep_vars=False).items()}


def test_comfyui_clip_names_land_only_on_an_encoder_that_holds_them_as_comfyui_maps_them() -> None:
    """ComfyUI maps ``text_encoders.<name>.`` only onto a model that holds an encoder of that
    name: SD1.x's lone CLIP is ``clip_l``, SDXL's and SD3's two are ``clip_l`` and ``clip_g``, the
    SDXL refiner's lone OpenCLIP-G (32 layers) ``clip_g``, SD2.x's OpenCLIP-H (23/24) ``clip_h``;
    it ignores the others. lorahot sent every CLIP name to the lone CLIP of an SD1.5-shaped
    runtime: a ``clip_g`` or ``clip_h`` file of the same width loaded silently onto CLIP-L. They
    are now refused naming the encoder, the runtime's CLIPs and where ComfyUI maps the name, with
    every parameter and buffer bitwise unchanged; ``strict=False`` skips exactly them; the
    names a runtime holds still land at their float64 references. kohya's ``lora_te2_`` and
    diffusers' ``text_encoder_2.`` never land on a lone ``text_encoder``."""
    clip = _clip().double()
    from tests.helpers import tiny_unet

    unet = tiny_unet(cross_attention_dim=32).double()
    cases = {  # runtime, ComfyUI name: refused on it
        "sd15": ({"unet": unet, "text_encoder": clip}, ("clip_g", "clip_h")),
        "refiner": ({"unet": unet, "text_encoder_2": _deep_clip(32)}, ("clip_l", "clip_h")),
        "sd2": ({"unet": unet, "text_encoder": _deep_clip(23)}, ("clip_l", "clip_g")),
    }
    held = {"sd15": "clip_l", "refiner": "clip_g", "sd2": "clip_h"}
    for label, (base, refused) in cases.items():
        (te,) = (c for c in base if c != "unet")
        for name in refused:
            models = {c: copy.deepcopy(m) for c, m in base.items()}
            sd = _comfyui_te_file(models[te], name, "text_model.", seed=5)
            sd = {k: v for k, v in sd.items() if ".q_proj." in k or ".fc1." in k}  # the injected layers' modules
            own = {k: v for k, v in _comfyui_te_file(models[te], held[label], "text_model.", 6).items() if ".fc1." in k}
            runtime = lorahot.inject(models, {"unet": ["to_q"], te: ["q_proj", "fc1"]}, max_rank=4)
            before = _state(models)
            with pytest.raises(lorahot.AdapterMismatchError) as caught:
                runtime.load(dict(sd))
            text = str(caught.value)
            assert f"text_encoders.{name}.transformer." in text, (label, name, text)
            assert f"ComfyUI's {name!r} encoder" in text and f"{te} (ComfyUI's {held[label]})" in text, text
            assert "strict=False" in text, text
            after = _state(models)
            assert all(torch.equal(v, after[k]) for k, v in before.items()), (label, name)
            # strict=False skips exactly them, as ComfyUI ignores them beside the encoder it holds
            info = runtime.load(sd | own, strict=False)
            assert sorted(info.skipped) == sorted(sd), (label, name)
            assert info.components == {"unet": 0, te: len(own) // 3}, (label, name, info.components)
        # the name the runtime holds lands at its float64 reference
        models = {c: copy.deepcopy(m) for c, m in base.items()}
        sd = _comfyui_te_file(models[te], held[label], "text_model.", seed=6)
        expected = _plus(models[te], sd, f"text_encoders.{held[label]}.transformer.text_model.")
        lorahot.inject({te: models[te]}, "all-linear", max_rank=4).load(dict(sd))
        got = _linear_responses(models[te])
        for module, want in expected.items():
            torch.testing.assert_close(got[module], want, rtol=1e-12, atol=1e-12, msg=f"{label}.{module}")

    # SDXL / SD3: two CLIPs, clip_l on text_encoder and clip_g on text_encoder_2
    pipe = {"text_encoder": copy.deepcopy(clip), "text_encoder_2": _clip(with_projection=True).double()}
    sd = _comfyui_te_file(pipe["text_encoder"], "clip_l", "", seed=7)
    sd |= _comfyui_te_file(pipe["text_encoder_2"], "clip_g", "", seed=8)
    expected = {
        "text_encoder": _plus(pipe["text_encoder"], sd, "text_encoders.clip_l.transformer."),
        "text_encoder_2": _plus(pipe["text_encoder_2"], sd, "text_encoders.clip_g.transformer."),
    }
    lorahot.inject(pipe, "all-linear", max_rank=4).load(dict(sd))
    for component, reference in expected.items():
        got = _linear_responses(pipe[component])
        for module, want in reference.items():
            torch.testing.assert_close(got[module], want, rtol=1e-12, atol=1e-12, msg=f"{component}.{module}")
    fresh = {"text_encoder": copy.deepcopy(clip), "text_encoder_2": _clip(with_projection=True).double()}
    sd = _comfyui_te_file(fresh["text_encoder"], "clip_h", "", seed=9)
    runtime = lorahot.inject(fresh, "all-linear", max_rank=4)
    before = _state(fresh)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"'clip_h' encoder.*text_encoder \(ComfyUI's clip_l\)"):
        runtime.load(sd)
    after = _state(fresh)
    assert all(torch.equal(v, after[k]) for k, v in before.items())

    # kohya's lora_te2_ and diffusers' text_encoder_2. name the second encoder: never the lone one
    for prefix in (
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
    ):
        models = {"text_encoder": copy.deepcopy(clip)}
        before = _state(models)
        sd = {f"{prefix}.lora_down.weight": torch.randn(2, 32), f"{prefix}.lora_up.weight": torch.randn(32, 2)}
        with pytest.raises(lorahot.AdapterMismatchError, match=r"go to text_encoder_2, which was not injected"):
            lorahot.inject(models, "all-linear", max_rank=4).load(sd)
        after = _state(models)
        assert all(torch.equal(v, after[k]) for k, v in before.items()), prefix


def _first_clip_file(prefix: str, clip: nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA (rank 2, alpha 1) on every q_proj and fc1 of ``clip``'s layers, with ``prefix``
    (kohya's ``lora_te_``/``lora_te1_``, spelled with underscores, or diffusers' ``text_encoder.``)."""
    g = torch.Generator().manual_seed(4)
    sd = {}
    for name, mod in clip.named_modules():
        if isinstance(mod, nn.Linear) and name.rpartition(".")[2] in ("q_proj", "fc1"):
            path = "text_model." + name.removeprefix("text_model.")
            stem = prefix + (path if prefix.endswith(".") else path.replace(".", "_"))
            sd[f"{stem}.lora_down.weight"] = torch.randn(2, mod.in_features, generator=g, dtype=torch.float64)
            sd[f"{stem}.lora_up.weight"] = torch.randn(mod.out_features, 2, generator=g, dtype=torch.float64)
            sd[f"{stem}.alpha"] = torch.tensor(1.0, dtype=torch.float64)
    return sd


@pytest.mark.parametrize("prefix", ["lora_te_", "lora_te1_", "text_encoder."])
def test_first_clip_modules_land_on_the_clip_comfyui_maps_them_to_never_on_a_language_model(prefix: str) -> None:
    """A HunyuanVideo pipeline holds a Llama as ``text_encoder`` and its CLIP-L as
    ``text_encoder_2``. A CLIP file in kohya's ``lora_te_``/``lora_te1_`` or diffusers'
    ``text_encoder.`` naming goes by its prefix to the Llama, whose ``layers.0.self_attn.q_proj``
    would take the CLIP's ``text_model.encoder.layers.0.self_attn.q_proj`` with the CLIP's levels
    dropped as wrappers; these modules were refused there. ComfyUI maps all three onto the model's
    ``clip_l`` (``model_lora_keys_clip``; HunyuanVideo's text encoder is its ``clip_l`` and
    ``llama``), and diffusers' HunyuanVideo loader loads no text encoder (it drops them): they now
    land on the CLIP-L, every Linear at its float64 reference, the Llama untouched. Where the
    runtime's lone CLIP is none ComfyUI maps the prefix onto (kohya's ``lora_te1_`` on a lone
    32-layer OpenCLIP-G, its ``clip_g``) or it has no CLIP, they are refused naming the component,
    what it is and the runtime's CLIP, every parameter and buffer bitwise unchanged; ``strict=False``
    skips them."""
    llama, clip = tiny_llama().model.double(), _clip().double()
    sd = _first_clip_file(prefix, clip)
    expected = _linear_responses(clip)
    for name in expected:
        stem = prefix + ("text_model." + name if prefix.endswith(".") else "text_model_" + name.replace(".", "_"))
        if f"{stem}.lora_down.weight" in sd:
            delta = 0.5 * sd[f"{stem}.lora_up.weight"] @ sd[f"{stem}.lora_down.weight"]  # alpha 1, rank 2
            expected[name] = expected[name] + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
    models = {"text_encoder": llama, "text_encoder_2": clip}
    before_llama = _linear_responses(llama)
    runtime = lorahot.inject(
        models, {"text_encoder": ["q_proj", "k_proj", "v_proj"], "text_encoder_2": "all-linear"}, max_rank=4
    )
    info = runtime.load(dict(sd))
    assert info.components == {"text_encoder": 0, "text_encoder_2": len(sd) // 3}, info.components
    got = _linear_responses(clip)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12, msg=name)
    assert all(torch.equal(v, before_llama[k]) for k, v in _linear_responses(llama).items())

    refused = {"no CLIP": {"text_encoder": tiny_llama().model.double()}}
    if prefix == "lora_te1_":  # ComfyUI maps lora_te1_ onto a clip_l or clip_h only
        refused["a lone OpenCLIP-G"] = {"text_encoder": tiny_llama().model.double(), "text_encoder_2": _deep_clip(32)}
    for label, others in refused.items():
        stray = {k: v for k, v in sd.items() if "layers_0_" in k or "layers.0." in k}
        runtime = lorahot.inject(others, {c: ["q_proj", "fc1"] for c in others}, max_rank=4)
        before = _state(others)
        with pytest.raises(
            lorahot.AdapterMismatchError,
            match=r"(?s)go by their prefix to text_encoder, which is a language model.*"
            + ("has no CLIP" if label == "no CLIP" else "CLIP is text_encoder_2"),
        ):
            runtime.load(dict(stray))
        after = _state(others)
        assert all(torch.equal(v, after[k]) for k, v in before.items()), label
        own = prefix + ("layers.0.self_attn.q_proj" if prefix.endswith(".") else "layers_0_self_attn_q_proj")
        mine = {f"{own}.lora_down.weight": torch.randn(2, 32), f"{own}.lora_up.weight": torch.randn(32, 2)}
        info = runtime.load(stray | mine, strict=False)  # the Llama's own module loads beside them
        assert sorted(info.skipped) == sorted(stray) and info.components["text_encoder"] == 1, label


def test_kohya_second_clip_modules_land_only_on_a_second_clip() -> None:
    """kohya's ``lora_te2_`` names a pipeline's second CLIP (SDXL's and SD3's CLIP-G, diffusers'
    ``text_encoder_2``). A HunyuanVideo pipeline holds a Llama as ``text_encoder`` and its lone
    CLIP-L as ``text_encoder_2``: ``lora_te2_`` modules went by their prefix to that CLIP-L, refused
    by shape only where the widths differ (1280 against 768) and loaded silently where they agree.
    They are now refused naming the keys, the runtime's text encoders and the fix, every parameter
    and buffer bitwise unchanged; ``strict=False`` skips exactly them and loads the rest at its
    float64 reference. Where ``text_encoder_2`` is a second CLIP (two CLIPs, or the SDXL refiner's
    lone OpenCLIP-G, 32 layers deep) they land on it at their float64 reference."""
    llama, clip = tiny_llama().model.double(), _clip().double()
    second = {k: v.double() for k, v in _kohya_file(clip, "lora_te2").items() if "_q_proj." in k or "_fc1." in k}
    own = {k: v for k, v in _comfyui_te_file(clip, "clip_l", "text_model.", 5).items() if ".fc1." in k}
    expected = _linear_responses(clip)
    for stem in (k.removesuffix(".lora_down.weight") for k in own if k.endswith(".lora_down.weight")):
        name = stem.removeprefix("text_encoders.clip_l.transformer.text_model.")
        delta = 0.5 * own[f"{stem}.lora_up.weight"] @ own[f"{stem}.lora_down.weight"]
        expected[name] = expected[name] + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
    models = {"text_encoder": llama, "text_encoder_2": clip}
    runtime = lorahot.inject(models, {"text_encoder": ["q_proj"], "text_encoder_2": "all-linear"}, max_rank=4)
    before = _state(models)
    with pytest.raises(lorahot.AdapterMismatchError) as caught:
        runtime.load(dict(second))
    text = str(caught.value)
    assert "4 module(s) with prefix lora_te2_ ('lora_te2_text_model_encoder_layers_0_self_attn_q_proj'" in text, text
    assert "text_encoder, a language model (a text encoder); text_encoder_2, a CLIP encoder (ComfyUI's clip_l)" in text
    assert "no second CLIP" in text, text
    assert "'text_encoder_2': pipe.text_encoder_2" in text and "strict=False" in text, text
    after = _state(models)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    info = runtime.load(second | own, strict=False)
    assert sorted(info.skipped) == sorted(second) and info.components == {"text_encoder": 0, "text_encoder_2": 2}
    got = _linear_responses(clip)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12, msg=name)

    # a second CLIP takes them: two CLIPs (SDXL, SD3) or the refiner's lone 32-layer OpenCLIP-G
    for models in (
        {"text_encoder": _clip().double(), "text_encoder_2": _clip(with_projection=True).double()},
        {"text_encoder_2": _deep_clip(32)},
    ):
        te2 = models["text_encoder_2"]
        sd = {k: v.double() for k, v in _kohya_file(te2, "lora_te2").items()}
        want = _linear_responses(te2)
        for name in want:
            stem = f"lora_te2_text_model_{name.removeprefix('text_model.').replace('.', '_')}"
            if f"{stem}.lora_down.weight" in sd:
                delta = 0.5 * sd[f"{stem}.lora_up.weight"] @ sd[f"{stem}.lora_down.weight"]  # alpha r / 2
                want[name] = want[name] + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
        info = lorahot.inject(models, dict.fromkeys(models, TARGETS), max_rank=4).load(sd)
        assert info.components["text_encoder_2"] == len(sd) // 3, info.components
        got = _linear_responses(te2)
        for name, reference in want.items():
            torch.testing.assert_close(got[name], reference, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("prefix", ["lora_te_", "lora_te1_", "text_encoder."])
def test_first_clip_modules_on_an_sdxl_refiner_runtime_are_refused_never_put_on_its_second_clip(prefix: str) -> None:
    """An SDXL refiner pipeline holds only the second CLIP (``text_encoder_2``, OpenCLIP
    ViT-bigG, 32 layers) beside its UNet. A file with the first CLIP's modules (kohya's
    ``lora_te_``/``lora_te1_``, diffusers' ``text_encoder.``) was refused as going to
    ``text_encoder``, "which was not injected", with the fix to inject ``pipe.text_encoder``,
    which a refiner pipeline does not have (None). The references part ways: diffusers' SDXL loader
    fails on them there (it loads them into the pipeline's None ``text_encoder``), and ComfyUI
    maps ``lora_te_`` and ``text_encoder.`` onto the refiner's ``clip_g``, the first encoder's
    weights on the second encoder's layers of the same names. lorahot refuses them naming the
    keys, the runtime's text encoders and the fixes (strict=False, the base pipeline, key_map= to
    ``lora_te2_``), every parameter and buffer bitwise unchanged; ``strict=False`` skips exactly
    them, and the refiner's own ``lora_te2_`` modules land at their float64 reference, as diffusers'
    loader puts them on its ``text_encoder_2``."""
    from tests.helpers import tiny_unet

    te2 = _deep_clip(32)
    models = {"unet": tiny_unet(cross_attention_dim=32).double(), "text_encoder_2": te2}
    second = "text_encoder_2." if prefix.endswith(".") else "lora_te2_"  # the second CLIP in the same naming
    own = _first_clip_file(second, te2)
    # the same module names and widths as the second CLIP's, other numbers
    first = {k: -3 * v if "lora_up" in k else v for k, v in _first_clip_file(prefix, te2).items()}
    expected = _linear_responses(te2)
    for name in expected:
        stem = second + ("text_model." + name if second.endswith(".") else "text_model_" + name.replace(".", "_"))
        if f"{stem}.lora_down.weight" in own:
            delta = 0.5 * own[f"{stem}.lora_up.weight"] @ own[f"{stem}.lora_down.weight"]  # alpha 1, rank 2
            expected[name] = expected[name] + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])

    # diffusers' loader: the first CLIP's modules go to the pipeline's text_encoder, None on a refiner
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(_first_clip_file("lora_te_", te2))
    with pytest.raises(AttributeError):
        StableDiffusionXLLoraLoaderMixin.load_lora_into_text_encoder(converted, alphas, None, prefix="text_encoder")

    runtime = lorahot.inject(models, {"unet": ["to_q"], "text_encoder_2": ["q_proj", "fc1"]}, max_rank=4)
    before = _state(models)
    with pytest.raises(lorahot.AdapterMismatchError) as caught:
        runtime.load(own | first)
    text = str(caught.value)
    assert f"{len(first) // 3} module(s) with prefix {prefix} ('{next(iter(first)).rsplit('.', 2)[0]}" in text, text
    assert "this runtime has no first CLIP" in text and "text_encoder_2, a CLIP encoder (ComfyUI's clip_g)" in text
    assert "diffusers' SDXL loader fails on these keys" in text and "ComfyUI maps lora_te_" in text, text
    assert "strict=False" in text and "'text_encoder': pipe.text_encoder" in text, text
    assert "rename their prefix to lora_te2_ (key_map=)" in text, text
    after = _state(models)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    info = runtime.load(own | first, strict=False)
    assert sorted(info.skipped) == sorted(first)
    assert info.components == {"unet": 0, "text_encoder_2": len(own) // 3}, info.components
    got = _linear_responses(te2)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, rtol=1e-12, atol=1e-12, msg=name)
