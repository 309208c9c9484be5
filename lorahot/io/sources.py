"""Opening an adapter source: a directory, a ``.safetensors`` file or a mapping of tensors.

Only safetensors is ever read; nothing is unpickled. What comes out is the raw tensors, the
``adapter_config.json`` if there is one, and the safetensors header metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from lorahot.errors import AdapterReadError, SourceNotFoundError, UsageError
from lorahot.io.config import CONFIG_NAME
from lorahot.io.hub import check_relative, fetch
from lorahot.io.safety import check_safetensors, read_json_file
from lorahot.io.tensorfile import read_tensors

__all__ = ["RawAdapter", "Source", "open_source", "read_safetensors", "read_config"]

Source = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]

#: File endings of pickle-based checkpoints, which lorahot refuses to open.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
WEIGHT_NAMES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")


@dataclass
class RawAdapter:
    """Tensors and side information exactly as the source holds them."""

    tensors: dict[str, torch.Tensor]
    source: str
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def open_source(
    source: Source,
    *,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    device: torch.device | None = None,
) -> RawAdapter:
    """Reads ``source`` into a :class:`RawAdapter`.

    Args:
        source: a mapping of tensors, a directory holding an adapter, a ``.safetensors``
            file (an ``adapter_config.json`` beside it is read too), or a Hub repo id.
        weight_name: the file to read inside a directory or repo, if not a usual name.
        subfolder: a folder inside the directory or repo holding the adapter.
        revision: Hub branch, tag or commit (Hub sources only).
        token: Hub token (Hub sources only; default: huggingface_hub's own).
        device: where file tensors are read to (default: the CPU); a GPU gets them in one
            transfer from pinned memory.

    Raises:
        SourceNotFoundError: the path or repo does not exist, or holds no adapter.
        AdapterReadError: the file is a pickle checkpoint, or damaged.
        SourceNotFoundError: also for a malformed repo id, or ``subfolder``/``weight_name``
            leaving the source.
    """
    weight_name = check_relative(weight_name, "weight_name")
    subfolder = check_relative(subfolder, "subfolder")
    if isinstance(source, Mapping):
        return _from_mapping(source)
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"source={source!r} must be a path, a Hub repo id, a mapping of tensors or a lorahot.Adapter.")
    text = os.fspath(source)
    path = Path(text)
    if path.exists():
        return _from_path(path / subfolder if subfolder else path, weight_name, device)
    if _looks_local(text):
        raise SourceNotFoundError(
            f"{text}: no such file or directory. Pass an adapter directory, a .safetensors file, a Hub repo id or a "
            "mapping of tensors."
        )
    fetched = fetch(text, revision=revision, subfolder=subfolder, token=token, weight_name=weight_name)
    raw = _from_path(fetched, None, device)
    inside = "/".join(p for p in (subfolder, Path(raw.source).name) if p)
    raw.source = f"{text}{'@' + revision if revision else ''}/{inside}"
    return raw


def _looks_local(text: str) -> bool:
    """True for strings that can only mean a local path (not a repo id)."""
    return (
        text.startswith(("/", ".", "~"))
        or text.lower().endswith((".safetensors", *PICKLE_SUFFIXES))
        or os.sep + os.sep in text
    )


def _from_path(path: Path, weight_name: str | None, device: torch.device | None = None) -> RawAdapter:
    if path.is_dir():
        return _from_file(_weight_file(path, weight_name), device)
    if path.is_file():
        return _from_file(path, device)
    raise SourceNotFoundError(f"{path}: no such file or directory. Check subfolder= and the path.")


def _from_mapping(source: Mapping[str, Any]) -> RawAdapter:
    bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterReadError(
            f"<mapping>: entries {bad[:5]!r} are not str -> torch.Tensor. Pass a dict of tensors keyed by name."
        )
    return RawAdapter(dict(source), "<mapping>")


def _weight_file(directory: Path, weight_name: str | None) -> Path:
    if weight_name is not None:
        candidate = directory / weight_name
        if not candidate.is_file():
            raise SourceNotFoundError(f"{candidate}: weight_name={weight_name!r} does not exist in {directory}.")
        return candidate
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(found) == 1:
        return directory / found[0]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterReadError(
            f"{directory}: holds only pickle checkpoints ({', '.join(pickles)}); lorahot never unpickles. Convert "
            "them to .safetensors (safetensors.torch.save_file) and load that."
        )
    if found:
        raise SourceNotFoundError(
            f"{directory}: several .safetensors files ({', '.join(found)}); pass weight_name= to pick one."
        )
    raise SourceNotFoundError(
        f"{directory}: no adapter weights found (looked for {', '.join(WEIGHT_NAMES)} or a single *.safetensors)."
    )


def _from_file(path: Path, device: torch.device | None = None) -> RawAdapter:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterReadError(
            f"{path}: {path.suffix} files are pickles, and lorahot never unpickles. Convert it to .safetensors "
            "(safetensors.torch.save_file) and load that."
        )
    tensors, metadata = read_safetensors(path, device)
    config_path = path.parent / CONFIG_NAME
    config = read_config(config_path) if config_path.is_file() else None
    return RawAdapter(tensors, str(path), config, metadata)


def read_safetensors(path: Path, device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on ``device``, default the CPU) and the header metadata of a safetensors file.

    The header is checked first (:func:`lorahot.io.safety.check_safetensors`); then the data is
    read in one pass (:func:`lorahot.io.tensorfile.read_tensors`).
    """
    header = check_safetensors(path)  # refuses damaged or hostile headers before anything is allocated
    return read_tensors(path, header, device), header.metadata


def read_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict."""
    config = read_json_file(path)  # size-capped; malformed JSON raises AdapterReadError
    if not isinstance(config, dict):
        raise AdapterReadError(f"{path}: the adapter config must be a JSON object, got {type(config).__name__}.")
    return config
