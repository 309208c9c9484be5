"""One runtime over a tiny Flux transformer and a text encoder: sd-scripts (``lora_unet_``) and
BFL (``diffusion_model.``) files go to the transformer, ``lora_te1_`` modules to the text
encoder, and the transformer matches diffusers' own Flux loader (helpers of
``test_parity_flux``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorahot

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from tests.system.test_parity_flux import (
    MODEL_MODULES,
    bfl_file,
    diffusers_output,
    flux_inputs,
    kohya_file,
    random_weights,
    tiny_flux,
)

CLIP = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def _text_encoder() -> nn.Module:
    q = nn.ModuleDict({"q_proj": nn.Linear(8, 8)})
    layers = nn.ModuleList([nn.ModuleDict({"self_attn": q})])
    return nn.ModuleDict({"text_model": nn.ModuleDict({"encoder": nn.ModuleDict({"layers": layers})})})


@pytest.mark.parametrize("naming", ["flux-kohya", "flux-bfl"])
def test_flux_file_routes_to_the_transformer_and_text_encoder(naming: str) -> None:
    sd = (kohya_file if naming == "flux-kohya" else bfl_file)(random_weights(MODEL_MODULES, seed=2))
    g = torch.Generator().manual_seed(4)
    te_part = {f"{CLIP}.lora_down.weight": torch.randn(2, 8, generator=g), f"{CLIP}.lora_up.weight": torch.randn(8, 2)}
    transformer, te = tiny_flux(), _text_encoder()
    x = torch.randn(3, 8, generator=g)
    with torch.no_grad():
        te_base = te["text_model"]["encoder"]["layers"][0]["self_attn"]["q_proj"](x)
    runtime = lorahot.inject(
        {"transformer": transformer, "text_encoder": te},
        {"transformer": "all-linear", "text_encoder": ["q_proj"]},
        max_rank=8,
    )
    info = runtime.load(sd | te_part)
    assert info.format == naming
    assert info.components["text_encoder"] == 1 and info.components["transformer"] > 0
    with torch.no_grad():
        out = transformer(**flux_inputs(), return_dict=False)[0]
        te_out = te["text_model"]["encoder"]["layers"][0]["self_attn"]["q_proj"](x)
    torch.testing.assert_close(out, diffusers_output(sd), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(te_out, te_base)
    runtime.load(sd)  # no text-encoder modules: the text encoder is back at its base
    with torch.no_grad():
        assert torch.equal(te["text_model"]["encoder"]["layers"][0]["self_attn"]["q_proj"](x), te_base)
