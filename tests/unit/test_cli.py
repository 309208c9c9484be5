"""``lorahot inspect`` as ``python -m lorahot`` and as the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = Path(sys.executable).parent / "lorahot"


@pytest.fixture
def kohya_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    tensors = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(2.0),
        "lora_unet_mid_block_resnets_0_conv1.lora_down.weight": torch.randn(8, 32, 3, 3, dtype=torch.float16),
        "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": torch.randn(32, 8, 1, 1, dtype=torch.float16),
    }
    save_file(tensors, tmp_path / "style.safetensors")
    return tmp_path / "style.safetensors"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120)


def test_module_inspect_prints_a_table(kohya_file: Path) -> None:
    out = _run(sys.executable, "-m", "lorahot", "inspect", str(kohya_file))
    assert out.returncode == 0, out.stderr
    assert "format:  kohya" in out.stdout and "modules: 2" in out.stdout
    assert "ranks:   4 (x1), 8 (x1)" in out.stdout
    assert "dtypes:  float16 (x1), float32 (x1)" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("lora_unet_mid_block_resnets_0_conv1"))
    assert row.split() == ["lora_unet_mid_block_resnets_0_conv1", "8", "8", "1", "8x32x3x3", "32x8x1x1"]


@pytest.mark.skipif(not SCRIPT.exists(), reason="lorahot is not installed as a console script here")
def test_console_script_json(kohya_file: Path) -> None:
    out = _run(str(SCRIPT), "inspect", str(kohya_file), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["format"] == "kohya" and data["modules"] == 2
    assert data["bytes"] == (4 * 32 * 2) * 4 + (8 * 32 * 9 + 32 * 8) * 2
    assert data["alphas"] == {"2": 1, "8": 1}
    assert data["table"][0] == {
        "module": "lora_unet_mid_block_attentions_0_proj_in",
        "rank": 4,
        "alpha": 2.0,
        "scale": 0.5,
        "A": [4, 32],
        "B": [32, 4],
        "dtype": "float32",
    }


def test_errors_go_to_stderr_with_status_2(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"not really a pickle")
    out = _run(sys.executable, "-m", "lorahot", "inspect", str(tmp_path / "model.ckpt"))
    assert out.returncode == 2 and out.stdout == ""
    assert "lorahot never unpickles. Convert it to .safetensors" in out.stderr
