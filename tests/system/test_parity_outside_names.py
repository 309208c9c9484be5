"""lorahot against diffusers' own loaders as the oracle for files of another model's original names
outside the blocks (SD3's and Lumina2's ``t_embedder.mlp.0``, the final adaLN
``final_layer.adaLN_modulation.1``, Flux's ``img_in``) in PEFT's, diffusers' and ComfyUI's namings: no
diffusers loader renames them in such a file, so they load nowhere (a warning of unexpected keys
beside keys that load; an error alone, or in a ``diffusion_model.`` file of its Lumina2 loader).
lorahot refuses each, the model bitwise unchanged, and with ``strict=False`` matches diffusers."""

from __future__ import annotations

import copy

import pytest
import torch

import lorahot
from tests.system.test_parity_flux import flux_inputs, tiny_flux, tiny_flux2
from tests.system.test_parity_lumina2 import lumina2_inputs, small_lumina2

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")


def _pair(model: torch.nn.Module, key: str, layer: str, seed: int) -> dict[str, torch.Tensor]:
    """LoRA factors under ``key`` of the shapes of ``model``'s ``layer`` (rank 2, alpha = rank)."""
    m, g = model.get_submodule(layer), torch.Generator().manual_seed(seed)
    return {
        f"{key}.lora_A.weight": torch.randn(2, m.in_features, generator=g) * 0.3,
        f"{key}.lora_B.weight": torch.randn(m.out_features, 2, generator=g) * 0.3,
    }


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


#: (model, pipeline, inputs, the stray key in the file, the layer whose shapes it has, a key of the
#: model's own name beside it)
_CASES = {
    # SD3's (and Lumina2's, DiT's) t_embedder: SD3's alias is Flux's timestep embedder
    "flux-t_embedder": (
        tiny_flux,
        "FluxPipeline",
        flux_inputs,
        "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_1",
        "proj_out",
    ),
    # another model's final adaLN (HiDream's own name, Lumina2's, Cosmos's): Flux's swap onto norm_out.linear
    "flux-final_adaln": (
        tiny_flux,
        "FluxPipeline",
        flux_inputs,
        "final_layer.adaLN_modulation.1",
        "norm_out.linear",
        "proj_out",
    ),
    # SD3's (DiT's) t_embedder: Lumina2's alias is its timestep embedder
    "lumina2-t_embedder": (
        small_lumina2,
        "Lumina2Pipeline",
        lumina2_inputs,
        "t_embedder.mlp.0",
        "time_caption_embed.timestep_embedder.linear_1",
        "x_embedder",
    ),
    # SD3's, Flux's or Cosmos's final_layer.linear: Lumina2's alias is its norm_out.linear_2
    "lumina2-final_layer": (
        small_lumina2,
        "Lumina2Pipeline",
        lumina2_inputs,
        "final_layer.linear",
        "norm_out.linear_2",
        "x_embedder",
    ),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_original_names_outside_the_blocks_of_another_model_are_refused(case: str) -> None:
    """A diffusers-named file (``transformer.``) holding another model's original name outside the
    blocks beside a key of the model's own: diffusers' loader of this model loads the own key and
    none of the other (unexpected keys), where lorahot placed it on the layer SD3's, Lumina2's or
    Flux's alias names, silently. It is refused naming the key, every parameter and buffer bitwise
    unchanged; with ``strict=False`` the output is diffusers'."""
    build, pipeline, inputs, key, shaped, own = _CASES[case]
    model = build()
    sd = _pair(model, f"transformer.{key}", shaped, seed=1) | _pair(model, f"transformer.{own}", own, seed=2)
    with torch.no_grad():
        oracle = copy.deepcopy(model)
        state = getattr(diffusers, pipeline).lora_state_dict(dict(sd))
        oracle.load_lora_adapter(state[0] if isinstance(state, tuple) else state, prefix="transformer")
        adapted = [n for n, m in oracle.named_modules() if getattr(m, "lora_A", None)]
        assert adapted == [own]  # diffusers places the own key alone
        expected = oracle(**inputs(), return_dict=False)[0]
        runtime = lorahot.inject(model, "all-linear", max_rank=4)
        before = _state(model)
        with pytest.raises(lorahot.AdapterMismatchError, match=rf"transformer\.{key}: matches no injected layer"):
            runtime.load(sd)
        after = _state(model)
        assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())
        info = runtime.load(sd, strict=False)
        assert set(info.ranks) == {own}
        torch.testing.assert_close(model(**inputs(), return_dict=False)[0], expected, rtol=1e-4, atol=1e-5)


def test_a_comfyui_file_of_flux_img_in_alone_is_refused_on_lumina2() -> None:
    """ComfyUI naming took Flux's original names in every file, so ``diffusion_model.img_in`` (Qwen-Image's
    and HunyuanVideo's name too) landed on Lumina2's ``x_embedder``, silently, where diffusers' Lumina2
    loader refuses such a file (its conversion raises on a key it does not convert). lorahot refuses it
    naming the key, the model bitwise unchanged."""
    model = small_lumina2()
    sd = _pair(model, "diffusion_model.img_in", "x_embedder", seed=3)
    with pytest.raises(ValueError, match="img_in"):
        diffusers.Lumina2Pipeline.lora_state_dict(dict(sd))
    runtime = lorahot.inject(model, "all-linear", max_rank=4)
    before = _state(model)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"diffusion_model\.img_in: matches no injected layer"):
        runtime.load(sd)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())


def test_a_kohya_file_of_t_embedder_alone_is_refused_on_flux() -> None:
    """sd-scripts' ``lora_unet_t_embedder_mlp_0`` (Lumina2's, SD3's or DiT's) alone reads as ``sd3-kohya``,
    which took SD3's alias onto Flux's ``time_text_embed.timestep_embedder.linear_1`` (the same shape),
    silently, where diffusers' Flux loader refuses the file (its kohya conversion knows no such key).
    lorahot refuses it naming the key, the model bitwise unchanged."""
    model = tiny_flux()
    shaped = _pair(model, "lora_unet_t_embedder_mlp_0", "time_text_embed.timestep_embedder.linear_1", seed=4)
    sd = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in shaped.items()}
    with pytest.raises(ValueError, match="t_embedder"):
        diffusers.FluxPipeline.lora_state_dict(dict(sd))
    runtime = lorahot.inject(model, "all-linear", max_rank=4)
    before = _state(model)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"lora_unet_t_embedder_mlp_0: matches no injected layer"):
        runtime.load(sd)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())


def _spelled(naming: str, module: str, pair: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``pair`` (``<module>.lora_A/B.weight``) as ``naming`` spells ``module``: ComfyUI's
    ``diffusion_model.``, PEFT's ``base_model.model.``, diffusers' ``transformer.``, sd-scripts'
    ``lora_unet_`` with ``lora_down``/``lora_up``."""
    if naming == "kohya":
        stem = "lora_unet_" + module.replace(".", "_")
        return {
            k.replace(module, stem).replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v
            for k, v in pair.items()
        }
    head = {"comfyui": "diffusion_model.", "peft": "base_model.model.", "diffusers": "transformer."}[naming]
    return {head + k: v for k, v in pair.items()}


def _krea2() -> torch.nn.Module:
    from tests.system.test_parity_original_names import _tiny_krea2

    return _tiny_krea2().float()


#: (model, its pipeline's loader, the original name alone in the file, the layer diffusers' loader places it on)
_OWN_MODEL = {
    "flux2-img_in": (tiny_flux2, "Flux2Pipeline", "img_in", "x_embedder"),
    "flux2-txt_in": (tiny_flux2, "Flux2Pipeline", "txt_in", "context_embedder"),
    "flux2-final_layer": (tiny_flux2, "Flux2Pipeline", "final_layer.linear", "proj_out"),
    "krea2-first": (_krea2, "Krea2Pipeline", "first", "img_in"),
    "krea2-last": (_krea2, "Krea2Pipeline", "last.linear", "final_layer.linear"),
}
_OWN_NAMINGS = {"flux2": ("comfyui", "peft", "kohya"), "krea2": ("comfyui", "peft")}


@pytest.mark.parametrize(("case", "naming"), [(c, n) for c in _OWN_MODEL for n in _OWN_NAMINGS[c.partition("-")[0]]])
def test_a_file_of_a_models_own_outside_names_alone_lands_on_that_model_as_its_loader_places_it(
    case: str, naming: str
) -> None:
    """A file of Flux.2's ``img_in``, ``txt_in`` or ``final_layer.linear`` alone (ComfyUI's, PEFT's or
    sd-scripts' spelling), or Krea 2's ``first`` or ``last.linear`` alone, has no key that tells its
    model, so lorahot refused it as matching no layer; diffusers' Flux.2 and Krea 2 loaders place it,
    on ``x_embedder``, ``context_embedder``, ``proj_out``, ``img_in``, ``final_layer.linear``. On that
    model (judged by layers only it has: Flux.2's modulations, Krea 2's ``text_fusion.projector``)
    lorahot now places it as they do: the layer's output equals diffusers'."""
    build, pipeline, module, layer = _OWN_MODEL[case]
    model = build()
    sd = _spelled(naming, module, _pair(model, module, layer, seed=5))
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        state = getattr(diffusers, pipeline).lora_state_dict(dict(sd))
        oracle.load_lora_adapter(state[0] if isinstance(state, tuple) else state, prefix="transformer")
        assert [n for n, m in oracle.named_modules() if getattr(m, "lora_A", None)] == [layer]
        runtime = lorahot.inject(model, "all-linear", max_rank=4)
        info = runtime.load(sd)
        assert set(info.ranks) == {layer}
        x = torch.randn(
            3, model.get_submodule(layer).base_layer.in_features, generator=torch.Generator().manual_seed(6)
        )
        torch.testing.assert_close(model.get_submodule(layer)(x), oracle.get_submodule(layer)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("naming", ["comfyui", "peft", "kohya", "diffusers"])
def test_a_flux2_file_of_the_final_adaln_alone_or_under_transformer_stays_refused(naming: str) -> None:
    """On Flux.2, diffusers' loader places a ComfyUI or PEFT file of the final adaLN alone on
    ``norm_out.linear`` with its halves unswapped, where its checkpoint conversion swaps them (and its
    kohya conversion leaves it unloaded), and raises on ``transformer.img_in``: lorahot, which cannot
    match both, refuses each file, the model bitwise unchanged."""
    model = tiny_flux2()
    module = "img_in" if naming == "diffusers" else "final_layer.adaLN_modulation.1"
    sd = _spelled(naming, module, _pair(model, module, "x_embedder" if naming == "diffusers" else "norm_out.linear", 7))
    runtime = lorahot.inject(model, "all-linear", max_rank=4)
    before = _state(model)
    with pytest.raises(lorahot.AdapterMismatchError, match="matches no injected layer"):
        runtime.load(sd)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())
