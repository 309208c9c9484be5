"""Hub sources through a local ``huggingface_hub`` cache, offline: never the network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot

hub_constants = pytest.importorskip("huggingface_hub.constants")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "lorahot-test/tiny-adapter"


def _peft_tensors(rank: int) -> dict[str, torch.Tensor]:
    return {
        "base_model.model.proj.lora_A.weight": torch.randn(rank, 8),
        "base_model.model.proj.lora_B.weight": torch.randn(6, rank),
    }


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hub cache holding ``REPO`` at ``main``: a PEFT adapter at the root, a kohya file in
    ``kohya/``; the process is offline."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    (snap / "kohya").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file(_peft_tensors(4), snap / "adapter_model.safetensors")
    (snap / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 2}')
    save_file(
        {
            "lora_unet_proj.lora_down.weight": torch.randn(2, 8),
            "lora_unet_proj.lora_up.weight": torch.randn(6, 2),
            "lora_unet_proj.alpha": torch.tensor(1.0),
        },
        snap / "kohya" / "style.safetensors",
    )
    for name, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_repo_id_reads_the_snapshot(hub_cache: Path) -> None:
    adapter = lorahot.read_adapter(REPO)
    assert adapter.format == "peft"
    assert adapter.modules["proj"].scale == 2 / 4
    assert adapter.source == f"{REPO}/adapter_model.safetensors"


def test_subfolder_and_weight_name(hub_cache: Path) -> None:
    by_folder = lorahot.read_adapter(REPO, subfolder="kohya")
    by_name = lorahot.read_adapter(REPO, subfolder="kohya", weight_name="style.safetensors", revision="main")
    for adapter in (by_folder, by_name):
        assert adapter.format == "kohya" and adapter.modules["lora_unet_proj"].scale == 0.5


def test_runtime_loads_a_repo_id(hub_cache: Path) -> None:
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 6))
    runtime = lorahot.inject(model, ["proj"], max_rank=4)
    assert runtime.load(REPO, subfolder="kohya").ranks == {"proj": 2}


def test_missing_file_offline_names_the_repo(hub_cache: Path) -> None:
    with pytest.raises(
        lorahot.SourceNotFoundError, match=rf"{REPO}: cannot get missing\.safetensors from the Hub .*HF_HUB_OFFLINE=1"
    ):
        lorahot.read_adapter(REPO, weight_name="missing.safetensors")
    with pytest.raises(lorahot.SourceNotFoundError, match=r"lorahot-test/absent: cannot get the adapter from the Hub"):
        lorahot.read_adapter("lorahot-test/absent")


@pytest.mark.parametrize("repo", ["a/b/c", "org/na me", "-bad/name", "org/..", "org/name."])
def test_malformed_repo_ids_are_refused(hub_cache: Path, repo: str) -> None:
    with pytest.raises(lorahot.SourceNotFoundError, match=r"neither an existing path nor a valid Hub repo id"):
        lorahot.read_adapter(repo)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subfolder": "../x"},
        {"subfolder": "/etc"},
        {"weight_name": "a/../../b.safetensors"},
        {"weight_name": "a\\b.safetensors"},
    ],
)
def test_path_traversal_is_refused(hub_cache: Path, kwargs: dict[str, str]) -> None:
    with pytest.raises(
        lorahot.SourceNotFoundError, match=r"(must stay inside the adapter directory or repo|relative path with '/')"
    ):
        lorahot.read_adapter(REPO, **kwargs)
