"""Format detection from key names, features each naming refuses, and config metadata per component."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
from lorahot.formats import FORMATS, detect
from tests.helpers import lora_pair


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_each_format_detects_its_own_example(fmt) -> None:
    example = fmt.example
    a_role = {"kohya": "lora_down", "diffusers-old": "processor.to_q_lora.down"}.get(fmt.name)
    keys = [example, example.replace("lora_A", "lora_B").replace("lora_down", "lora_up").replace(".down.", ".up.")]
    assert a_role is None or a_role in example
    assert detect(keys) is fmt


def test_locon_conv_kernel_in_down_and_1x1_up() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1))
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    down, up = torch.randn(4, 3, 3, 3), torch.randn(6, 4, 1, 1)
    x = torch.randn(1, 3, 5, 5)
    base = model(x)
    runtime.load(
        {"lora_unet_0.lora_down.weight": down, "lora_unet_0.lora_up.weight": up, "lora_unet_0.alpha": torch.tensor(2.0)}
    )
    delta = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up) * 0.5
    torch.testing.assert_close(model(x), base + delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (
            {"lora_unet_attn_to_q.dora_scale": torch.ones(8, 1)},
            lorahot.UnknownFormatError,
            r"lora_unet_attn_to_q\.dora_scale: DoRA magnitude vector: DoRA adapters are not supported",
        ),
        (
            {"lora_unet_attn_to_q.lora_up.bias": torch.ones(8)},
            lorahot.UnknownFormatError,
            r"lora_up\.bias: LoRA bias \(PEFT lora_bias=True\): not supported",
        ),
        ({"lora_unet_attn_to_q.hada_w1_a": torch.ones(8, 2)}, lorahot.UnknownFormatError, r"hada_w1_a: LyCORIS"),
        (
            {"lora_unet_attn_to_q.alpha": torch.tensor(-1.0)},
            lorahot.AdapterReadError,
            r"lora_unet_attn_to_q\.alpha: alpha must be one finite number > 0",
        ),
    ],
)
def test_refused_features_are_named(extra, error, message) -> None:
    with pytest.raises(error, match=message):
        lorahot.read_adapter(lora_pair("lora_unet_attn_to_q", "lora_down", "lora_up") | extra)


def test_dora_config_is_refused() -> None:
    with pytest.raises(lorahot.UnknownFormatError, match=r"use_dora=true; DoRA adapters are not supported"):
        lorahot.read_adapter(lora_pair("base_model.model.x", "lora_A", "lora_B"), config={"use_dora": True})


def test_unknown_naming_names_the_keys() -> None:
    with pytest.raises(lorahot.UnknownFormatError, match=r"model\.weird\.tensor: not a LoRA key of the peft naming"):
        lorahot.read_adapter(
            lora_pair("base_model.model.x", "lora_A", "lora_B") | {"model.weird.tensor": torch.ones(2)}
        )


def test_diffusers_metadata_rank_pattern(tmp_path: Path) -> None:
    tensors = lora_pair("unet.attn.to_q", "lora_A", "lora_B", rank=4) | lora_pair(
        "unet.attn.to_out.0", "lora_A", "lora_B", rank=2
    )
    meta = '{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"to_out.0": 2}, "unet.alpha_pattern": {"to_out.0": 1}}'  # noqa: E501
    save_file(tensors, tmp_path / "pytorch_lora_weights.safetensors", metadata={"lora_adapter_metadata": meta})
    adapter = lorahot.read_adapter(tmp_path)
    assert {k: m.scale for k, m in adapter.modules.items()} == {"unet.attn.to_q": 2.0, "unet.attn.to_out.0": 0.5}
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"lora_adapter_metadata": '{"unet.r": 3}'})
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"unet\.attn\.to_q: lora_adapter_metadata \(unet\) says r=3, but unet\.attn\.to_q\.lora_A\.weight has shape \(4, 8\)",  # noqa: E501
    ):
        lorahot.read_adapter(tmp_path / "bad.safetensors")
