"""LTX-Video and Z-Image files in the models' own module names, against diffusers' loaders.

Neither family has a naming of its own in lorahot: their files that spell the model's module
names (``diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight`` for LTX-Video,
``diffusion_model.layers.0.attention.to_q.lora_down.weight`` for Z-Image) load through the
ComfyUI and Lumina2 namings. Each layer's adapted weight is compared in float64 with the one
diffusers' pipeline loader gives (``lora_state_dict``, then ``load_lora_adapter``), read by
probing the layer with the identity.

One known difference: lorahot reads a ``.alpha`` as ``alpha / rank`` (as ComfyUI does) where
diffusers' LTX conversion leaves it unread. Z-Image's original ``attention.out`` is renamed to
``attention.to_out.0`` by both."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.diffusion_names import assert_same as _assert_same
from tests.diffusion_names import diffusers_weights as _diffusers
from tests.diffusion_names import linears as _linears
from tests.diffusion_names import lorahot_weights as _lorahot
from tests.diffusion_names import weights as _weights

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(
    not all(
        hasattr(diffusers, n) for n in ("LTXVideoTransformer3DModel", "ZImageTransformer2DModel", "ZImagePipeline")
    ),
    reason="needs a diffusers with LTX-Video and Z-Image",
)


def _tiny_ltx() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=16,
        )
        .double()
        .eval()
    )


def _tiny_zimage() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.ZImageTransformer2DModel(
            in_channels=4,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=16,
            axes_dims=[4, 6, 6],
            axes_lens=[64, 32, 32],
        )
        .double()
        .eval()
    )


def _file(
    model: nn.Module, names: list[str], down: str, up: str, alpha: bool, rename: Callable[[str], str] = str
) -> dict[str, torch.Tensor]:
    """``diffusion_model.<name>.<down|up>.weight`` for each layer, ranks 2-4, with ``.alpha``
    (unequal to the rank) where asked."""
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i, name in enumerate(names):
        layer, r, key = model.get_submodule(name), 2 + i % 3, f"diffusion_model.{rename(name)}"
        sd[f"{key}.{down}.weight"] = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.{up}.weight"] = torch.randn(layer.out_features, r, generator=g, dtype=torch.float64) * 0.3
        if alpha:
            sd[f"{key}.alpha"] = torch.tensor(r * (0.5 + i % 3), dtype=torch.float64)
    return sd


def _reference(make: Callable[[], nn.Module], sd: dict[str, torch.Tensor], names: list[str], down: str, up: str):
    """Each layer's float64 weight plus ``alpha / r * B @ A`` (alpha = r where the file has none)."""
    model = make()
    out = _weights(model, names)
    for name in names:
        key = f"diffusion_model.{name}"
        a, b = sd[f"{key}.{down}.weight"], sd[f"{key}.{up}.weight"]
        scale = float(sd[f"{key}.alpha"]) / a.shape[0] if f"{key}.alpha" in sd else 1.0
        out[name] = out[name] + torch.cat([(scale * b @ a).T, torch.zeros(1, b.shape[0], dtype=torch.float64)])
    return out


@pytest.mark.parametrize(("down", "up"), [("lora_A", "lora_B"), ("lora_down", "lora_up")])
def test_ltx_video_in_its_own_names_matches_diffusers(down: str, up: str) -> None:
    """``lora_A``/``lora_B``: diffusers' loader and the float64 reference. ``lora_down``/``lora_up``:
    the reference only (diffusers 0.42's LTX loader raises an IndexError on that spelling)."""
    names = _linears(_tiny_ltx(), lambda n: n.startswith("transformer_blocks."))
    sd = _file(_tiny_ltx(), names, down, up, alpha=False)
    ours, fmt = _lorahot(_tiny_ltx, sd, names)
    assert fmt == "comfyui"
    _assert_same(ours, _reference(_tiny_ltx, sd, names, down, up))
    if down == "lora_A":
        _assert_same(ours, _diffusers(_tiny_ltx, diffusers.LTXPipeline, sd, names))


def test_ltx_video_alphas_are_read_where_diffusers_leaves_them() -> None:
    """With ``.alpha`` keys lorahot follows the float64 reference at ``alpha / r``. diffusers'
    LTX conversion (0.42) keeps scale 1: its weights equal the file read without the alphas
    (a later diffusers that reads them would equal lorahot's; either passes)."""
    names = _linears(_tiny_ltx(), lambda n: n.startswith("transformer_blocks."))
    sd = _file(_tiny_ltx(), names, "lora_A", "lora_B", alpha=True)
    ours, _ = _lorahot(_tiny_ltx, sd, names)
    _assert_same(ours, _reference(_tiny_ltx, sd, names, "lora_A", "lora_B"))
    theirs = _diffusers(_tiny_ltx, diffusers.LTXPipeline, sd, names)
    unread = _reference(_tiny_ltx, {k: v for k, v in sd.items() if not k.endswith(".alpha")}, names, "lora_A", "lora_B")
    assert any(all(torch.allclose(theirs[n], w[n], rtol=1e-9, atol=1e-12) for n in names) for w in (unread, ours))
    assert not all(torch.allclose(ours[n], unread[n], rtol=1e-6, atol=1e-9) for n in names)  # the alphas matter


def test_z_image_in_its_own_names_matches_diffusers() -> None:
    names = _linears(_tiny_zimage(), lambda n: "layers" in n or "refiner" in n)
    sd = _file(_tiny_zimage(), names, "lora_down", "lora_up", alpha=True)
    ours, fmt = _lorahot(_tiny_zimage, sd, names)
    assert fmt == "lumina2"
    _assert_same(ours, _diffusers(_tiny_zimage, diffusers.ZImagePipeline, sd, names))
    _assert_same(ours, _reference(_tiny_zimage, sd, names, "lora_down", "lora_up"))


def test_z_image_original_attention_out_spelling_matches_diffusers() -> None:
    """``attention.out`` (Z-Image's original name of ``attention.to_out.0``, which diffusers'
    conversion renames in ``lora_down``/``lora_up`` files) lands on the output projection."""
    names = _linears(_tiny_zimage(), lambda n: "layers" in n or "refiner" in n)
    sd = _file(_tiny_zimage(), names, "lora_down", "lora_up", alpha=True, rename=lambda n: n.replace("to_out.0", "out"))
    assert any(".attention.out." in k for k in sd)
    ours, fmt = _lorahot(_tiny_zimage, sd, names)
    assert fmt == "lumina2"
    _assert_same(ours, _diffusers(_tiny_zimage, diffusers.ZImagePipeline, sd, names))
    renamed = {k.replace(".attention.out.", ".attention.to_out.0."): v for k, v in sd.items()}
    _assert_same(ours, _reference(_tiny_zimage, renamed, names, "lora_down", "lora_up"))
