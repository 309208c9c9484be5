"""PixArt-alpha/Sigma files in diffusers naming (``transformer.<module>``) on a diffusers
``PixArtTransformer2DModel``, against PEFT, which diffusers' PixArt pipelines leave LoRA to
(they have no LoRA loader of their own): each layer's adapted weight in float64, read by
probing it with the identity.

PixArt's blocks and its ``adaln_single`` carry LTX-2's names too (``adaln_single`` is LTX-2's
original name, which the ``ltx2`` naming aliases to ``time_embed``), so a stray LTX-2 key
(``transformer.patchify_proj``) must not make the file LTX-2's."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lorahot
from tests.diffusion_names import assert_same, linears, weights

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

#: the stray LTX-2 module: its patch embedding, which diffusers renames proj_in (PixArt's is pos_embed.proj)
STRAY = ("transformer.patchify_proj.lora_A.weight", "transformer.patchify_proj.lora_B.weight")


def tiny_pixart() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            cross_attention_dim=16,
            caption_channels=16,
            sample_size=8,
            patch_size=2,
            use_additional_conditions=False,
        )
        .double()
        .eval()
    )


def _file(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """A rank-2 LoRA of each of ``names`` in diffusers naming, and the stray LTX-2 module."""
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name in names:
        layer = model.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g, dtype=torch.float64)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g, dtype=torch.float64)
    sd[STRAY[0]] = torch.randn(2, 16, generator=g, dtype=torch.float64)
    sd[STRAY[1]] = torch.randn(32, 2, generator=g, dtype=torch.float64)
    return sd


def _peft(sd: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The layers' weights after PEFT loads ``sd`` without the stray (r 2, lora_alpha 2: scale 1)."""
    model = tiny_pixart()
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=names)
    peft.inject_adapter_in_model(config, model)
    own = {k.removeprefix("transformer."): v for k, v in sd.items() if k not in STRAY}
    result = peft.set_peft_model_state_dict(model, own)
    assert not result.unexpected_keys
    return weights(model, names)


@pytest.mark.parametrize(
    "which",
    [
        # the Linears diffusers' PixArt LoRA script targets: blocks, adaln_single, caption_projection, proj_out
        "all",
        # a file of the modules whose names LTX-2 has too (its blocks, named as in diffusers; adaln_single)
        "blocks-and-adaln_single",
    ],
)
def test_a_pixart_file_with_an_ltx2_key_reads_as_diffusers_and_lands_as_peft(which: str) -> None:
    """A PixArt file with one LTX-2 ``transformer.patchify_proj`` was read as ``ltx2``: PixArt's own
    ``adaln_single`` modules, which that naming aliases onto LTX-2's ``time_embed``, counted as
    LTX-2's keys; with fewer of them the file read as diffusers with PixArt's ``adaln_single`` among
    the strays, which strict=False skipped. Now only LTX-2's marked names count for it: the file is
    diffusers' with the LTX-2 keys its strays, refused naming them, ``ltx2`` and the naming the rest
    was read as, every parameter and buffer bitwise unchanged; strict=False lands every PixArt
    module where PEFT does, float64. A file of PixArt's blocks and ``adaln_single`` alone, all of
    them LTX-2's names too, reads as ``ltx2``, which places each on PixArt's layer of its name: the
    LTX-2 key lands on no layer and is refused so, and strict=False lands the rest as PEFT does."""
    model = tiny_pixart()
    names = linears(model, lambda n: which == "all" or n.startswith(("transformer_blocks.", "adaln_single.")))
    assert any(n.startswith("adaln_single.") for n in names)
    sd = _file(model, names)
    runtime = lorahot.inject(model, "all-linear", max_rank=4)
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    if which == "all":
        with pytest.raises(
            lorahot.UnknownFormatError,
            match=rf"(?s)2 of its {len(sd)} keys are of another naming \(ltx2\).*read as diffusers naming.*"
            + re.escape(STRAY[0]),
        ):
            runtime.load(dict(sd))
    else:
        with pytest.raises(
            lorahot.AdapterMismatchError, match=r"transformer\.patchify_proj: matches no injected layer.*proj_in"
        ):
            runtime.load(dict(sd))
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    info = runtime.load(dict(sd), strict=False)
    assert info.format == ("diffusers" if which == "all" else "ltx2")
    assert sorted(info.skipped) == sorted(STRAY)
    reference = _peft(sd, names)
    pristine = weights(tiny_pixart(), names)
    assert all(not torch.allclose(reference[n], pristine[n]) for n in names)  # every module adapts its layer
    assert_same(weights(model, names), reference)
