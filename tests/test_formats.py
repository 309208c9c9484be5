"""Format detection, key mapping and the errors for keys that do not map, on tiny modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
from lorahot.formats import FORMATS, detect


def _pair(stem: str, a_role: str, b_role: str, rank: int = 2, fin: int = 8, fout: int = 8) -> dict[str, torch.Tensor]:
    return {f"{stem}.{a_role}.weight": torch.randn(rank, fin), f"{stem}.{b_role}.weight": torch.randn(fout, rank)}


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_each_format_detects_its_own_example(fmt) -> None:
    example = fmt.example
    a_role = {"kohya": "lora_down", "diffusers-old": "processor.to_q_lora.down"}.get(fmt.name)
    keys = [example, example.replace("lora_A", "lora_B").replace("lora_down", "lora_up").replace(".down.", ".up.")]
    assert a_role is None or a_role in example
    assert detect(keys) is fmt


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text_model = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "k_proj": nn.Linear(8, 8)})
        self.attn = nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_out": nn.ModuleList([nn.Linear(8, 8)])})


def _runtime() -> tuple[nn.Module, lorahot.LoraRuntime]:
    model = _Blocks()
    return model, lorahot.inject(model, ["q_proj", "k_proj", "to_q", "to_out.0"], max_rank=4)


def test_kohya_text_encoder_and_aliases_map_through_model_names() -> None:
    _, runtime = _runtime()
    tensors = _pair("lora_te1_text_model_q_proj", "lora_down", "lora_up") | _pair(
        "lora_unet_attn_to_out_0", "lora_down", "lora_up"
    )
    assert set(runtime.load(tensors).ranks) == {"text_model.q_proj", "attn.to_out.0"}
    old = _pair("text_encoder.text_model.to_k_lora", "down", "up") | _pair(
        "unet.attn.processor.to_out_lora", "down", "up"
    )
    info = runtime.load(old)
    assert info.format == "diffusers-old" and set(info.ranks) == {"text_model.k_proj", "attn.to_out.0"}


def test_unmappable_keys_are_listed_with_closest_names() -> None:
    _, runtime = _runtime()
    tensors = _pair("lora_unet_attn_to_qq", "lora_down", "lora_up") | _pair(
        "lora_unet_nowhere_at_all", "lora_down", "lora_up"
    )
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"\(kohya naming\) that do not map onto the injected layers:\n"
        r"  - lora_unet_attn_to_qq: matches no injected layer \(closest: attn\.to_q[,)][\s\S]*"
        r"  - lora_unet_nowhere_at_all: matches no injected layer[\s\S]*Inject those modules \(targets=\.\.\.\)",
    ):
        runtime.load(tensors)


def test_ambiguous_underscore_name_lists_candidates() -> None:
    model = nn.ModuleDict({"a_b": nn.ModuleDict({"c": nn.Linear(8, 8)}), "a": nn.ModuleDict({"b_c": nn.Linear(8, 8)})})
    runtime = lorahot.inject(model, ["a_b.c", "a.b_c"], max_rank=4)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"lora_unet_a_b_c: ambiguous, matches a\.b_c, a_b\.c; pass key_map="
    ):
        runtime.load(_pair("lora_unet_a_b_c", "lora_down", "lora_up"))
    assert set(
        runtime.load(_pair("lora_unet_a_b_c", "lora_down", "lora_up"), key_map={r"lora_unet_a_b_c": "a_b.c"}).ranks
    ) == {"a_b.c"}


def test_prefix_selects_one_component() -> None:
    _, runtime = _runtime()
    tensors = _pair("unet.attn.to_q", "lora_A", "lora_B") | _pair(
        "text_encoder.text_model.q_proj", "lora_A", "lora_B", fin=4
    )
    assert set(runtime.load(tensors, prefix="unet").ranks) == {"attn.to_q"}
    with pytest.raises(
        lorahot.UsageError, match=r"prefix='vae' matches no module key; keys start with text_encoder, unet"
    ):
        runtime.load(tensors, prefix="vae")


def test_key_map_renames_with_groups() -> None:
    _, runtime = _runtime()
    tensors = _pair("net.blocks.attn_q", "lora_A", "lora_B")
    assert set(runtime.load(tensors, key_map={r"net\.blocks\.attn_(\w)": r"attn.to_\1"}).ranks) == {"attn.to_q"}
    with pytest.raises(lorahot.UsageError, match=r"key_map entry '\(' is not a valid regex"):
        runtime.load(tensors, key_map={"(": "x"})


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
        lorahot.read_adapter(_pair("lora_unet_attn_to_q", "lora_down", "lora_up") | extra)


def test_dora_config_is_refused() -> None:
    with pytest.raises(lorahot.UnknownFormatError, match=r"use_dora=true; DoRA adapters are not supported"):
        lorahot.read_adapter(_pair("base_model.model.x", "lora_A", "lora_B"), config={"use_dora": True})


def test_unknown_naming_names_the_keys() -> None:
    with pytest.raises(lorahot.UnknownFormatError, match=r"model\.weird\.tensor: not a LoRA key of the peft naming"):
        lorahot.read_adapter(_pair("base_model.model.x", "lora_A", "lora_B") | {"model.weird.tensor": torch.ones(2)})


def test_pickles_are_refused(tmp_path: Path) -> None:
    for name in ("adapter.bin", "adapter.pt", "adapter.ckpt"):
        (tmp_path / name).write_bytes(b"\x80\x04")
        with pytest.raises(lorahot.AdapterReadError, match=r"lorahot never unpickles\. Convert it to \.safetensors"):
            lorahot.read_adapter(tmp_path / name)
    with pytest.raises(
        lorahot.AdapterReadError, match=r"holds only pickle checkpoints \(adapter\.bin, adapter\.ckpt, adapter\.pt\)"
    ):
        lorahot.read_adapter(tmp_path)


def test_diffusers_metadata_rank_pattern(tmp_path: Path) -> None:
    tensors = _pair("unet.attn.to_q", "lora_A", "lora_B", rank=4) | _pair(
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
