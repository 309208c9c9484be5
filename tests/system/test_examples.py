"""Smoke tests of the examples: each runs as ``make test`` runs it, quickly, on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_demo_swaps_without_recompiling() -> None:
    """main() raises on a recompile after warm-up, on no compile at all, and if unload does not
    give the base tokens back; here the tokens also show each swap took effect."""
    tokens = _example("generate_demo").main(quiet=True)
    assert tokens["A"] != tokens["base"] and tokens["B"] != tokens["A"] and tokens["B x0.5"] != tokens["B"]
    assert tokens["A (reloaded)"] == tokens["A"]
    assert tokens["A+B x0.5"] not in (tokens["A"], tokens["B x0.5"]) and tokens["A x0.25+B"] != tokens["A+B x0.5"]
    assert tokens["unloaded"] == tokens["base"]


def test_pipeline_demo_swaps_without_recompiling() -> None:
    """main() raises on a recompile after warm-up, on no compile at all, if the text encoders are
    not bitwise base after the unet-only file, and if unload does not give everything back;
    here the outputs also show each swap took effect."""
    pytest.importorskip("diffusers")
    out = _example("pipeline_demo").main(quiet=True)
    for phase in ("diffusers", "kohya", "kohya x0.5"):
        for key in ("latents", "text_encoder", "text_encoder_2"):
            assert not torch.equal(out[phase][key], out["base"][key]), (phase, key)
    assert not torch.allclose(out["kohya x0.5"]["latents"], out["kohya"]["latents"])
    assert not torch.allclose(out["unet-only"]["latents"], out["base"]["latents"])
    for key in ("latents", "text_encoder", "text_encoder_2"):  # the re-weighting took effect everywhere
        assert not torch.allclose(out["stack 0.8/0.5"][key], out["stack 0.3/1.2"][key]), key
