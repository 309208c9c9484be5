"""``read_adapter`` sources: directories, files, mappings, adapters; and the config fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot


def _peft(rank: int = 2) -> dict[str, torch.Tensor]:
    return {
        "base_model.model.proj.lora_A.weight": torch.randn(rank, 8),
        "base_model.model.proj.lora_B.weight": torch.randn(6, rank),
    }


def test_directory_file_and_mapping_agree(tmp_path: Path) -> None:
    save_file(_peft(), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 3, "target_modules": ["proj"]}))
    by_dir, by_file = lorahot.read_adapter(tmp_path), lorahot.read_adapter(tmp_path / "adapter_model.safetensors")
    for adapter in (by_dir, by_file):
        assert adapter.format == "peft" and adapter.modules["proj"].scale == 1.5
        assert adapter.config["target_modules"] == ["proj"]
    mapping = lorahot.read_adapter(dict(_peft()), config={"lora_alpha": 4, "use_rslora": True})
    assert mapping.source == "<mapping>" and mapping.modules["proj"].scale == pytest.approx(4 / 2**0.5)


def test_weight_name_and_subfolder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    save_file(_peft(), tmp_path / "sub" / "a.safetensors")
    save_file(_peft(4), tmp_path / "sub" / "b.safetensors")
    with pytest.raises(
        lorahot.SourceNotFoundError,
        match=r"several \.safetensors files \(a\.safetensors, b\.safetensors\); pass weight_name=",
    ):
        lorahot.read_adapter(tmp_path, subfolder="sub")
    assert lorahot.read_adapter(tmp_path, subfolder="sub", weight_name="b.safetensors").ranks == {"proj": 4}
    with pytest.raises(lorahot.SourceNotFoundError, match=r"weight_name='c\.safetensors' does not exist"):
        lorahot.read_adapter(tmp_path / "sub", weight_name="c.safetensors")


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(lorahot.SourceNotFoundError, match=r"nope\.safetensors: no such file or directory"):
        lorahot.read_adapter(tmp_path / "nope.safetensors")


def test_adapter_objects_pass_through_and_take_key_options() -> None:
    adapter = lorahot.read_adapter(_peft())
    assert lorahot.read_adapter(adapter) is adapter
    renamed = lorahot.read_adapter(adapter, key_map={"proj": "head"})
    assert list(renamed.modules) == ["head"] and renamed.format == "peft"


def test_config_contradicting_tensors_is_named() -> None:
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"proj: adapter_config\.json says r=8, but base_model\.model\.proj\.lora_A\.weight has shape \(2, 8\) \(rank 2\)",  # noqa: E501
    ):
        lorahot.read_adapter(_peft(), config={"r": 8})


def test_fuse_argument_errors() -> None:
    with pytest.raises(lorahot.UsageError, match=r"fuse\['qkv'\] must list at least two parts"):
        lorahot.read_adapter(_peft(), fuse={"qkv": ["q"]})
    with pytest.raises(lorahot.UsageError, match=r"each part must be a name or \(name, out_features\)"):
        lorahot.read_adapter(_peft(), fuse={"qkv": ["q", 3]})
