"""ComfyUI's dotted spelling of a LoRA's roles, ``<module>.lora.down.weight`` /
``<module>.lora.up.weight`` (with ``<module>.alpha``), in the namings of original model names.

ComfyUI's LoRA loader reads these roles for any model as it reads ``lora_down`` / ``lora_up`` and
``lora_A`` / ``lora_B``, and diffusers' Z-Image conversion reads them in Z-Image's original names:
``attention.qkv`` cut into thirds onto ``attention.to_q`` / ``to_k`` / ``to_v`` (A copied, B's rows
cut), ``attention.out`` onto ``attention.to_out.0``, each module's ``alpha / r`` folded in. The
namings of original names read the other two spellings only, so such a file was refused
(``qkv`` and ``out`` matching no injected layer, or its alphas taken for strays of another naming).

Z-Image is checked against diffusers' Z-Image loader and a float64 reference; in every other naming
of original names (where diffusers' conversions read no dotted roles), a file in the dotted spelling
loads bitwise as its ``lora_down`` / ``lora_A`` twin, which each naming's own parity test checks
against diffusers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.diffusion_names import diffusers_weights, linears, lora_factors, lorahot_weights, weights

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")


def _dotted(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with each module's roles spelled ``lora.down`` / ``lora.up``."""
    out = {}
    for key, tensor in sd.items():
        for down, up in (("lora_down", "lora_up"), ("lora_A", "lora_B")):
            key = key.replace(f".{down}.weight", ".lora.down.weight").replace(f".{up}.weight", ".lora.up.weight")
        out[key] = tensor
    return out


# -- Z-Image, against diffusers' loader -------------------------------------------------------


def _zimage() -> nn.Module:
    from tests.system.test_parity_ltx_zimage import _tiny_zimage

    return _tiny_zimage()


def _zimage_file(fused: bool, out: bool, alpha: bool) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """A Z-Image file in the dotted roles under ``diffusion_model.``, every block's Linear adapted:
    q, k and v as one fused ``attention.qkv`` module or three, the output projection named
    ``attention.out`` or ``attention.to_out.0``, with ``.alpha`` (unequal to the rank) or without.
    Also each layer's ``(A, B, scale)``, the reference's update ``scale * B @ A``."""
    model, g = _zimage(), torch.Generator().manual_seed(5)
    names = linears(model, lambda n: "layers" in n or "refiner" in n)
    sd: dict[str, torch.Tensor] = {}
    placed: dict[str, tuple] = {}
    for i, name in enumerate(names):
        layer, r = model.get_submodule(name), 2 + i % 3
        block, leaf = name.rsplit(".attention.", 1) if ".attention." in name else (name, "")
        if fused and leaf in ("to_k", "to_v"):
            continue  # written with to_q, as attention.qkv
        rows = 3 * layer.out_features if fused and leaf == "to_q" else layer.out_features
        a = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(rows, r, generator=g, dtype=torch.float64) * 0.3
        scale = (0.5 + i % 3) if alpha else 1.0
        key = f"diffusion_model.{name}"
        if fused and leaf == "to_q":
            key = f"diffusion_model.{block}.attention.qkv"
            for part, rows_of in zip(("to_q", "to_k", "to_v"), b.chunk(3), strict=True):
                placed[f"{block}.attention.{part}"] = (a, rows_of, scale)
        else:
            placed[name] = (a, b, scale)
            if out and leaf == "to_out.0":
                key = f"diffusion_model.{block}.attention.out"
        sd |= {f"{key}.lora.down.weight": a, f"{key}.lora.up.weight": b}
        if alpha:
            sd[f"{key}.alpha"] = torch.tensor(r * scale, dtype=torch.float64)
    return sd, placed


@pytest.mark.parametrize(
    ("fused", "out", "alpha"),
    [(False, False, False), (False, True, True), (True, False, True), (True, True, False)],
    ids=["split-to_out-no-alpha", "split-out-alpha", "fused-to_out-alpha", "fused-out-no-alpha"],
)
def test_z_image_dotted_roles_match_diffusers(fused: bool, out: bool, alpha: bool) -> None:
    """Every block Linear equal to diffusers' Z-Image loader and to the float64 reference
    (``W + alpha / r * B @ A``, a fused ``qkv``'s B cut into thirds). Refused before: ``qkv`` and
    ``out`` matched no injected layer in ComfyUI naming, and with alphas the file was refused as
    mixing namings."""
    sd, placed = _zimage_file(fused, out, alpha)
    names = sorted(placed)
    ours, fmt = lorahot_weights(_zimage, sd, names)
    assert fmt == "lumina2"
    reference = weights(_zimage(), names)
    for name, (a, b, scale) in placed.items():
        reference[name] = reference[name] + torch.cat([(scale * b @ a).T, torch.zeros(1, b.shape[0], dtype=b.dtype)])
    theirs = diffusers_weights(_zimage, diffusers.ZImagePipeline, sd, names)
    for name in names:
        assert not torch.allclose(theirs[name], weights(_zimage(), [name])[name])  # diffusers loaded it
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-12, msg=name)
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-9, atol=1e-12, msg=name)


# -- every other naming of original names, against its lora_down / lora_A twin ----------------


def _with_alphas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` (``lora_A`` / ``lora_B``) with an ``.alpha`` of 2.5 for each module."""
    return sd | {k.replace(".lora_A.weight", ".alpha"): torch.tensor(2.5) for k in sd if k.endswith(".lora_A.weight")}


def _wan() -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], str]:
    from tests.system.test_parity_wan import tiny_wan, wan_file

    return (lambda: tiny_wan().double()), wan_file(("lora_down", "lora_up"), seed=2), "wan"


def _flux() -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], str]:
    from tests.system.test_parity_flux import MLP, OUTSIDE, D, bfl_file, original_modules, random_weights, tiny_flux

    sd = bfl_file(random_weights({**original_modules(D, MLP), **OUTSIDE}, seed=4))  # linear1 split 1:1:1:4
    return (lambda: tiny_flux().double()), sd, "flux-bfl"


def _hunyuan_video() -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], str]:
    from tests.system.test_parity_hunyuan_video import hunyuan_file, original_modules, tiny_hunyuan

    sd = hunyuan_file(original_modules(linear1=True), "diffusion_model.", seed=3)
    return (lambda: tiny_hunyuan().double()), _with_alphas(sd), "hunyuan-video"


def _small_lumina2() -> nn.Module:
    """A Lumina2 of 3 query heads and 1 key-value head of 16: ``attention.qkv``'s rows 3 : 1 : 1, as
    at full size."""
    torch.manual_seed(0)
    return diffusers.Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        hidden_size=48,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=3,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(64, 32, 32),
        cap_feat_dim=16,
    ).double()


#: diffusers' Lumina2 block module -> the original one (q, k and v fused: see ``_lumina2``)
_LUMINA2_ORIGINAL = {
    "attn.to_out.0": "attention.out",
    "feed_forward.linear_1": "feed_forward.w1",
    "feed_forward.linear_2": "feed_forward.w2",
    "feed_forward.linear_3": "feed_forward.w3",
    "norm1.linear": "adaLN_modulation.1",
}


def _lumina2() -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], str]:
    model, g, sd = _small_lumina2(), torch.Generator().manual_seed(4), {}
    for name in linears(model, lambda n: n.startswith(("layers.", "noise_refiner.", "context_refiner."))):
        blocks, n, leaf = name.split(".", 2)
        if leaf in ("attn.to_k", "attn.to_v"):
            continue
        layer = model.get_submodule(name)
        rows = layer.out_features * 5 // 3 if leaf == "attn.to_q" else layer.out_features
        key = f"diffusion_model.{blocks}.{n}.{'attention.qkv' if leaf == 'attn.to_q' else _LUMINA2_ORIGINAL[leaf]}"
        sd[f"{key}.lora_A.weight"] = torch.randn(3, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.lora_B.weight"] = torch.randn(rows, 3, generator=g, dtype=torch.float64) * 0.3
    return _small_lumina2, _with_alphas(sd), "lumina2"


def _sd3() -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], str]:
    from tests.system.test_parity_sd3 import lora_file, original_base, original_parts, tiny_sd3_from

    parts = {k: v for k, v in original_parts(dual=True).items() if k != "x_embedder.proj"}  # Linears only
    factors = lora_factors(original_base(tiny_sd3_from(True).double(), parts, dual=True), parts, seed=6)
    return (lambda: tiny_sd3_from(True).double()), lora_file(factors, "sd3"), "sd3"


def _hunyuan_dit() -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], str]:
    from tests.system.test_parity_hunyuan_dit import PARTS, lora_file, original_weights, tiny_hunyuan_dit

    parts = {k: v for k, v in PARTS.items() if k != "x_embedder.proj"}  # Linears only
    base = {k: v for k, v in original_weights(tiny_hunyuan_dit()).items() if k.removesuffix(".weight") in parts}
    factors = lora_factors(base, parts, seed=7)
    return (lambda: tiny_hunyuan_dit().double()), lora_file(factors, "hunyuan-dit", "diffusion_model."), "hunyuan-dit"


def _minimax_h3() -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], str]:
    from tests.system.test_parity_minimax_h3 import _factors, _spelled, tiny_minimax_h3

    return tiny_minimax_h3, _spelled(_factors(alpha=True), "diffusion_model"), "minimax-h3"


def _of_original_names(family: str) -> Callable[[], tuple[Callable[[], nn.Module], dict[str, torch.Tensor], str]]:
    def build() -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor], str]:
        from tests.system.test_parity_original_names import _FAMILIES, _file

        make, original, _ = _FAMILIES[family]
        return make, _file(make(), linears(make()), original, alpha=True), family

    return build


_TWINS = {
    "wan": _wan,
    "flux-bfl": _flux,
    "hunyuan-video": _hunyuan_video,
    "lumina2": _lumina2,
    "sd3": _sd3,
    "hunyuan-dit": _hunyuan_dit,
    "minimax-h3": _minimax_h3,
    **{f: _of_original_names(f) for f in ("ltx2", "anima", "flux3", "krea2")},
}


@pytest.mark.parametrize("naming", sorted(_TWINS))
def test_dotted_roles_load_as_their_twin_in_every_naming_of_original_names(naming: str) -> None:
    """Every Linear of the model the same, bitwise, as after loading the same factors spelled
    ``lora_down`` / ``lora_up`` (``lora_A`` / ``lora_B``), with the same ``.alpha`` keys, read in
    the same naming: ComfyUI reads the three spellings alike. Refused before in every one of these
    namings."""
    make, twin, fmt = _TWINS[naming]()
    names = linears(make())
    theirs, twin_fmt = lorahot_weights(make, twin, names)
    ours, dotted_fmt = lorahot_weights(make, _dotted(twin), names)
    assert twin_fmt == dotted_fmt == fmt
    assert any(".lora.down.weight" in k for k in _dotted(twin)) and any(k.endswith(".alpha") for k in twin)
    base = weights(make(), names)
    assert any(not torch.equal(theirs[n], base[n]) for n in names)
    for name in names:
        assert torch.equal(ours[name], theirs[name]), name
