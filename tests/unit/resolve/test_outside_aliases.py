"""The original names outside the blocks of one model (SD3's, Lumina2's, Flux's) in the namings that
read any model's names (PEFT's, diffusers', ComfyUI's): placed only in a file that is that model's,
as diffusers' loaders rename none of them in another model's file."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lorahot
from tests.helpers import linear_at

#: the file's component prefix and its roles, per naming
_NAMINGS = {
    "peft": ("base_model.model.", "lora_A", "lora_B"),
    "bare": ("", "lora_A", "lora_B"),
    "diffusers": ("transformer.", "lora_A", "lora_B"),
    "comfyui": ("diffusion_model.", "lora_A", "lora_B"),
}


class _OutsideShaped(nn.Module):
    """The diffusers layers SD3's, Lumina2's and Flux's original names outside the blocks alias to, and
    no layer of those names: SD3's ``pos_embed.proj`` and ``time_text_embed.*`` (Flux's and
    HunyuanVideo's timestep embedder too), Lumina2's ``time_caption_embed.*`` and ``norm_out.linear_1``
    / ``linear_2`` (Cosmos's final adaLN too), Flux's ``x_embedder`` (Lumina2's own name) and the final
    adaLN ``norm_out.linear`` of Flux and SD3 (Qwen-Image's, CogView4's, HunyuanVideo's too)."""

    LAYERS = (
        "pos_embed.proj",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.text_embedder.linear_1",
        "time_caption_embed.timestep_embedder.linear_1",
        "time_caption_embed.caption_embedder.1",
        "norm_out.linear_1",
        "norm_out.linear_2",
        "norm_out.linear",
        "time_text_embed.timestep_embedder.linear_2",
        "x_embedder",
        "mlp",
    )

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        for path in self.LAYERS:
            linear_at(self, path)


def _file(naming: str, module: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    head, a, b = _NAMINGS[naming]
    return {
        f"{head}{module}.{a}.weight": torch.randn(2, 4, generator=g),
        f"{head}{module}.{b}.weight": torch.randn(4, 2, generator=g),
    }


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _assert_at_reference(model: nn.Module, tensors: dict, naming: str, placed: dict[str, str], g) -> None:
    """Each module of ``placed`` (file module -> layer) at ``W + B @ A``, the float64 reference."""
    head, ra, rb = _NAMINGS[naming]
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for module, name in placed.items():
        a, b = (tensors[f"{head}{module}.{r}.weight"].double() for r in (ra, rb))
        base = model.get_submodule(name).base_layer
        want = x @ (base.weight.double() + b @ a).T + base.bias.double()
        with torch.no_grad():
            got = model.get_submodule(name)(x.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


#: (module key in the original names, the layer its model's naming places it on, a key that marks a
#: file as that model's, the layer that key lands on)
_CASES = {
    "flux-img_in": ("img_in", "x_embedder", "time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    "sd3-t_embedder": (
        "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_1",
        "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_1",
    ),
    "sd3-x_embedder": (
        "x_embedder.proj",
        "pos_embed.proj",
        "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_1",
    ),
    "lumina2-t_embedder": (
        "t_embedder.mlp.0",
        "time_caption_embed.timestep_embedder.linear_1",
        "cap_embedder.1",
        "time_caption_embed.caption_embedder.1",
    ),
    "lumina2-final_layer": (
        "final_layer.linear",
        "norm_out.linear_2",
        "cap_embedder.1",
        "time_caption_embed.caption_embedder.1",
    ),
    "lumina2-final_adaln": (
        "final_layer.adaLN_modulation.1",
        "norm_out.linear_1",
        "cap_embedder.1",
        "time_caption_embed.caption_embedder.1",
    ),
}


@pytest.mark.parametrize("naming", list(_NAMINGS))
@pytest.mark.parametrize("case", list(_CASES))
def test_original_names_outside_the_blocks_are_taken_only_in_a_file_of_their_model(case: str, naming: str) -> None:
    """PEFT's, diffusers' and ComfyUI's namings took SD3's and Lumina2's original names outside the
    blocks in every file, so a file of another model whose module is ``t_embedder.mlp.0`` (DiT's,
    PixArt's, Hunyuan-DiT's), ``x_embedder.proj`` or ``final_layer.linear`` (Cosmos's) loaded onto
    ``time_text_embed.timestep_embedder.linear_1`` (Flux's too), ``pos_embed.proj`` or
    ``norm_out.linear_2`` of a model without a layer of that name, silently, where diffusers' loaders
    load no such key (its SD3 loader converts nothing, its Lumina2 loader refuses them). Such a file
    is refused naming the key, every parameter and buffer bitwise unchanged, and skipped with
    ``strict=False``; beside a key only that model has (SD3's ``y_embedder.mlp.0``, Lumina2's
    ``cap_embedder.1``) it lands on that model's layer, at the float64 reference."""
    key, layer, marker, marked = _CASES[case]
    model, g = _OutsideShaped(), torch.Generator().manual_seed(7)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    lone = _file(naming, key, g)
    before = _state(model)
    shown = ("transformer." if naming == "diffusers" else "diffusion_model." if naming == "comfyui" else "") + key
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"  - {re.escape(shown)}: matches no injected layer") as e:
        runtime.load(lone)
    assert not re.search(rf"places it at [^\n]*\b{re.escape(layer)}\b", str(e.value))  # no alias of it taken
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())
    info = runtime.load(lone | _file(naming, "mlp", g), strict=False)  # the model's own name loads, the key skipped
    assert set(info.skipped) == set(lone) and len(info.ranks) == 1
    tensors = lone | _file(naming, marker, g)
    runtime.load(tensors)
    _assert_at_reference(model, tensors, naming, {key: layer, marker: marked}, g)


@pytest.mark.parametrize("naming", list(_NAMINGS))
def test_the_final_adaln_swap_is_taken_only_in_a_file_of_flux_or_sd3(naming: str) -> None:
    """The final adaLN of Flux's and SD3's original names, ``final_layer.adaLN_modulation.1``, was placed
    on ``norm_out.linear`` with its ``(shift, scale)`` halves swapped in every PEFT, diffusers and ComfyUI
    file, so another model's (Lumina2's or Cosmos's adaLN, which is ``norm_out.linear_1`` and swaps
    nothing) landed there, silently. In a file of neither it is refused, bitwise unchanged; beside a key
    only Flux (``time_in.out_layer``) or SD3 (``y_embedder.mlp.0``) has, it lands swapped, at the float64
    reference."""
    key = "final_layer.adaLN_modulation.1"
    model, g = _OutsideShaped(), torch.Generator().manual_seed(8)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    lone = _file(naming, key, g)
    before = _state(model)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"{re.escape(key)}: matches no injected layer"):
        runtime.load(lone)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())
    head, ra, rb = _NAMINGS[naming]
    marks = {"time_in.out_layer": "time_text_embed.timestep_embedder.linear_2"}
    marks["y_embedder.mlp.0"] = "time_text_embed.text_embedder.linear_1"
    for marker, marked in marks.items():
        tensors = lone | _file(naming, marker, g)
        runtime.load(tensors)
        _assert_at_reference(model, tensors, naming, {marker: marked}, g)
        a, b = (tensors[f"{head}{key}.{r}.weight"].double() for r in (ra, rb))
        b = torch.cat(b.chunk(2)[::-1])  # (shift, scale) -> diffusers' (scale, shift)
        base = model.norm_out.linear.base_layer
        x = torch.randn(3, 4, generator=g, dtype=torch.float64)
        want = x @ (base.weight.double() + b @ a).T + base.bias.double()
        with torch.no_grad():
            got = model.norm_out.linear(x.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _kohya(module: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    stem = "lora_unet_" + module.replace(".", "_")
    return {
        f"{stem}.lora_down.weight": torch.randn(2, 4, generator=g),
        f"{stem}.lora_up.weight": torch.randn(4, 2, generator=g),
    }


@pytest.mark.parametrize(
    "case", ["flux-img_in", "sd3-t_embedder", "sd3-x_embedder", "lumina2-t_embedder", "lumina2-final_layer"]
)
def test_kohya_outside_names_are_taken_only_in_a_file_of_their_model(case: str) -> None:
    """sd-scripts' spelling of a file of modules outside the blocks alone reads as ``sd3-kohya``
    (``lora_unet_t_embedder_mlp_0``, ``lora_unet_x_embedder_proj``) or ``flux-kohya``
    (``lora_unet_img_in``, ``lora_unet_final_layer_linear``), which took their outside names and
    Lumina2's in every such file: Lumina2's or DiT's ``t_embedder`` landed on
    ``time_text_embed.timestep_embedder.linear_1`` (Flux's too, where diffusers' Flux loader refuses the
    file), Qwen-Image's ``img_in`` on Lumina2's ``x_embedder``, and SD3's or Flux's ``final_layer.linear``
    on Lumina2's ``norm_out.linear_2``. Such a file is refused naming the key, bitwise unchanged; beside
    ``time_in_in_layer`` (Flux's), ``y_embedder_mlp_0`` (SD3's) or ``cap_embedder_1`` (which makes it
    ``lumina2-kohya``) it lands, at the float64 reference."""
    key, layer, marker, marked = _CASES[case]
    model, g = _OutsideShaped(), torch.Generator().manual_seed(9)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    lone = _kohya(key, g)
    before = _state(model)
    shown = "lora_unet_" + key.replace(".", "_")
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"  - {re.escape(shown)}: matches no injected layer"):
        runtime.load(lone)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())
    tensors = lone | _kohya(marker, g)
    info = runtime.load(tensors)
    assert info.format == {"flux": "flux-kohya", "sd3": "sd3-kohya", "lumina2": "lumina2-kohya"}[case.split("-")[0]]
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for module, name in ((key, layer), (marker, marked)):
        stem = "lora_unet_" + module.replace(".", "_")
        a, b = (tensors[f"{stem}.lora_{r}.weight"].double() for r in ("down", "up"))
        base = model.get_submodule(name).base_layer
        want = x @ (base.weight.double() + b @ a).T + base.bias.double()
        with torch.no_grad():
            got = model.get_submodule(name)(x.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _OwnShaped(_OutsideShaped):
    """:class:`_OutsideShaped` with the layers of Flux.2 (``x_embedder``, there) or of Krea 2
    (``img_in``), and where ``marked`` a layer only that model has: Flux.2's
    ``double_stream_modulation_img.linear``, Krea 2's ``time_mod_proj``."""

    def __init__(self, model: str, marked: bool) -> None:
        super().__init__()
        own = {"flux2": ("double_stream_modulation_img.linear",), "krea2": ("img_in", "time_mod_proj")}[model]
        for path in own if marked else own[:-1]:
            linear_at(self, path)


#: (the model marked, the naming, the module alone in the file, the layer it lands on)
_OWN_MODEL = {
    **{f"flux2-{n}": ("flux2", n, "img_in", "x_embedder") for n in ("peft", "bare", "comfyui", "kohya")},
    "krea2-peft": ("krea2", "peft", "first", "img_in"),
    "krea2-comfyui": ("krea2", "comfyui", "first", "img_in"),
}


def _spelled(naming: str, module: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    return _kohya(module, g) if naming == "kohya" else _file(naming, module, g)


@pytest.mark.parametrize("case", list(_OWN_MODEL))
def test_a_file_of_outside_names_alone_takes_its_models_aliases_on_that_model_only(case: str) -> None:
    """A file of Flux.2's ``img_in`` or Krea 2's ``first`` alone has no key that tells its model, so it
    was refused on that model too, where diffusers' Flux.2 and Krea 2 loaders place it on ``x_embedder``
    / ``img_in``. On a model with a layer only Flux.2 (``double_stream_modulation_img.linear``) or
    Krea 2 (``time_mod_proj``) has it lands there, at the float64 reference; on the same model without
    that layer, or with it in another pipeline component, it stays refused, bitwise unchanged."""
    marked, naming, key, layer = _OWN_MODEL[case]
    g = torch.Generator().manual_seed(10)
    lone = _spelled(naming, key, g)
    shown = next(iter(lone)).rsplit(".", 2)[0].removeprefix("base_model.model.")  # as messages name it
    for model, beside in ((_OwnShaped(marked, False), None), (_OwnShaped(marked, False), _OwnShaped(marked, True))):
        # alone, and as a pipeline's transformer whose text encoder has the layer: its keys go to the transformer
        runtime = lorahot.inject(
            model if beside is None else {"transformer": model, "text_encoder": beside}, "all-linear", max_rank=2
        )
        before = _state(model)
        with pytest.raises(lorahot.AdapterMismatchError, match=rf"  - {re.escape(shown)}: matches no injected layer"):
            runtime.load(lone)
        after = _state(model)
        assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a, b = (lone[k].double() for k in sorted(lone))  # lora_A < lora_B, lora_down < lora_up
    for model, beside in ((_OwnShaped(marked, True), None), (_OwnShaped(marked, True), _OwnShaped(marked, False))):
        runtime = lorahot.inject(
            model if beside is None else {"transformer": model, "text_encoder": beside}, "all-linear", max_rank=2
        )
        info = runtime.load(lone)
        assert set(info.ranks) == {layer if beside is None else f"transformer.{layer}"}
        base = model.get_submodule(layer).base_layer
        want = x @ (base.weight.double() + b @ a).T + base.bias.double()
        with torch.no_grad():
            got = model.get_submodule(layer)(x.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
