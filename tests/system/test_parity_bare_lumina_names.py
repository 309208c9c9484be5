"""Lumina2's original block names without a prefix (``layers.0.attention.qkv.lora_A.weight``), as
Z-Image and Ideogram 4 files write them, against diffusers' loaders.

The ``lumina2`` naming takes these names under ``diffusion_model.`` / ``conditional_transformer.``
only, as Z-Image's own diffusers names are its original ones; a file without a prefix is read in
PEFT naming (``lora_A`` / ``lora_down``) or the old diffusers naming (ComfyUI's dotted
``lora.down``). diffusers' Ideogram 4 loader reads such a file (it converts any key with
``.attention.qkv.``: the fused projection cut into thirds, ``attention.o`` onto
``attention.to_out.0``), and its Z-Image loader does where the file carries ``.alpha`` keys
(``attention.out`` onto ``attention.to_out.0``; the dotted ``attention.qkv`` cut into thirds).
Those namings now place the block modules as ``lumina2`` does, where the file's name is no layer
of the model: the fused ``attention.qkv`` cut by the rows each model has, and the output projection
aliased. They were refused (``qkv``, ``out`` and ``o`` matching no injected layer)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.diffusion_names import diffusers_weights, lorahot_weights, weights

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

#: Z-Image's and Ideogram 4's block modules in the original names -> their layers, in row order
_PARTS = {
    "attention.qkv": ("attention.to_q", "attention.to_k", "attention.to_v"),
    "feed_forward.w1": ("feed_forward.w1",),
    "feed_forward.w2": ("feed_forward.w2",),
    "feed_forward.w3": ("feed_forward.w3",),
}


def _zimage() -> nn.Module:
    from tests.system.test_parity_ltx_zimage import _tiny_zimage

    return _tiny_zimage()


def _ideogram4() -> nn.Module:
    from tests.system.test_parity_original_names import _tiny_ideogram4

    return _tiny_ideogram4()


def _file(
    make: Callable[[], nn.Module], blocks: list[str], out: str, roles: tuple[str, str], alpha: bool, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """Every block's ``attention.qkv`` (fused), output projection (named ``out``) and feed-forward
    modules in the original names after ``prefix``, ranks 2-4, ``.alpha`` unequal to the rank where
    asked; and each layer's ``(A, its rows of B, alpha / r)``."""
    model, g = make(), torch.Generator().manual_seed(8)
    sd: dict[str, torch.Tensor] = {}
    placed: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for block in blocks:
        for original, parts in {**_PARTS, f"attention.{out}": ("attention.to_out.0",)}.items():
            first, r = model.get_submodule(f"{block}.{parts[0]}"), 2 + len(placed) % 3
            a = torch.randn(r, first.in_features, generator=g, dtype=torch.float64) * 0.3
            b = torch.randn(first.out_features * len(parts), r, generator=g, dtype=torch.float64) * 0.3
            scale = 0.5 + len(placed) % 3 if alpha else 1.0
            key = f"{prefix}{block}.{original}"
            sd |= {f"{key}.{roles[0]}.weight": a, f"{key}.{roles[1]}.weight": b}
            if alpha:
                sd[f"{key}.alpha"] = torch.tensor(r * scale, dtype=torch.float64)
            for part, rows in zip(parts, b.chunk(len(parts)), strict=True):
                placed[f"{block}.{part}"] = (a, rows, scale)
    return sd, placed


def _reference(make: Callable[[], nn.Module], placed: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """Each layer's float64 weight and bias plus ``alpha / r * B @ A``."""
    out = weights(make(), sorted(placed))
    for name, (a, b, scale) in placed.items():
        out[name] = out[name] + torch.cat([(scale * b @ a).T, torch.zeros(1, b.shape[0], dtype=b.dtype)])
    return out


def _assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-12, msg=name)


_ROLES = {"lora_A": ("lora_A", "lora_B"), "lora_down": ("lora_down", "lora_up"), "lora.down": ("lora.down", "lora.up")}


@pytest.mark.skipif(
    not hasattr(diffusers, "Ideogram4Transformer2DModel")
    or not hasattr(diffusers.loaders.lora_pipeline, "Ideogram4LoraLoaderMixin"),
    reason="needs a diffusers with Ideogram 4",
)
@pytest.mark.parametrize("alpha", [False, True], ids=["no-alpha", "alpha"])
@pytest.mark.parametrize(("roles", "naming"), [("lora_A", "peft"), ("lora_down", "peft")])
def test_bare_ideogram4_original_names_match_diffusers(roles: str, naming: str, alpha: bool) -> None:
    """Ideogram 4's ``layers.N.attention.qkv`` (cut 1 : 1 : 1) and ``attention.o`` without a prefix:
    every block Linear equal to diffusers' Ideogram 4 loader and to the float64 reference."""
    sd, placed = _file(_ideogram4, ["layers.0", "layers.1"], "o", _ROLES[roles], alpha)
    ours, fmt = lorahot_weights(_ideogram4, sd, sorted(placed))
    assert fmt == naming
    _assert_same(ours, _reference(_ideogram4, placed))
    loader = diffusers.loaders.lora_pipeline.Ideogram4LoraLoaderMixin
    _assert_same(ours, diffusers_weights(_ideogram4, loader, sd, sorted(placed)))


_ZIMAGE_BLOCKS = ["noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"]


@pytest.mark.parametrize(("roles", "naming"), [("lora_down", "peft"), ("lora.down", "diffusers-old")])
def test_bare_z_image_original_names_with_alphas_match_diffusers(roles: str, naming: str) -> None:
    """Z-Image's ``attention.out`` without a prefix, with ``.alpha`` (which makes diffusers' Z-Image
    loader convert the file), and in the dotted roles its fused ``attention.qkv`` too (which that
    conversion cuts only in those roles: a ``lora_down`` ``qkv`` it leaves unloaded). Every block
    Linear equal to diffusers' loader and to the float64 reference."""
    sd, placed = _file(_zimage, _ZIMAGE_BLOCKS, "out", _ROLES[roles], alpha=True)
    if roles == "lora_down":  # q, k and v as their own modules: diffusers drops a fused one here
        sd, placed = _split_qkv(sd, placed, roles)
    ours, fmt = lorahot_weights(_zimage, sd, sorted(placed))
    assert fmt == naming
    _assert_same(ours, _reference(_zimage, placed))
    _assert_same(ours, diffusers_weights(_zimage, diffusers.ZImagePipeline, sd, sorted(placed)))


def _split_qkv(sd: dict, placed: dict, roles: str) -> tuple[dict, dict]:
    """The file with each ``attention.qkv`` as ``attention.to_q`` / ``to_k`` / ``to_v`` modules of
    their own (each with A and its rows of B, the alpha kept)."""
    down, up = _ROLES[roles]
    out = {k: v for k, v in sd.items() if ".attention.qkv." not in k}
    for name, (a, b, scale) in placed.items():
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            out |= {f"{name}.{down}.weight": a, f"{name}.{up}.weight": b}
            out[f"{name}.alpha"] = torch.tensor(a.shape[0] * scale, dtype=torch.float64)
    return out, placed


@pytest.mark.parametrize("roles", ["lora_A", "lora_down", "lora.down"])
@pytest.mark.parametrize("model", ["z-image", "ideogram4"])
def test_bare_original_names_load_as_their_diffusion_model_twin(model: str, roles: str) -> None:
    """Without alphas (diffusers' Z-Image loader then converts nothing and loads none of these keys;
    its Ideogram 4 loader reads no dotted roles) and with the fused ``qkv``: bitwise what the same
    file under ``diffusion_model.`` gives in ``lumina2`` naming, and the float64 reference."""
    make, blocks, out = (_zimage, _ZIMAGE_BLOCKS, "out") if model == "z-image" else (_ideogram4, ["layers.0"], "o")
    sd, placed = _file(make, blocks, out, _ROLES[roles], alpha=False)
    twin, _ = _file(make, blocks, out, _ROLES[roles], alpha=False, prefix="diffusion_model.")
    ours, _ = lorahot_weights(make, sd, sorted(placed))
    theirs, fmt = lorahot_weights(make, twin, sorted(placed))
    assert fmt == "lumina2"
    for name in placed:
        assert torch.equal(ours[name], theirs[name]), name
    _assert_same(ours, _reference(make, placed))
