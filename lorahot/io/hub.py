"""Fetching an adapter from the Hugging Face Hub, through ``huggingface_hub`` and its cache.

``huggingface_hub`` decides where files live (``HF_HUB_CACHE``) and whether the network may
be used (``HF_HUB_OFFLINE=1`` reads the cache only). lorahot asks only for safetensors files
and ``adapter_config.json``; it never downloads a pickle.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from lorahot.errors import SourceNotFoundError
from lorahot.io.config import CONFIG_NAME

__all__ = ["is_repo_id", "check_relative", "fetch"]

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def is_repo_id(text: str) -> bool:
    """True if ``text`` has the shape of a Hub repo id (``name`` or ``owner/name``)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith((".", "-"))


def check_relative(value: str | None, what: str) -> str | None:
    """``value`` as a clean relative POSIX path, or None.

    Raises:
        SourceNotFoundError: ``value`` is absolute, climbs out with ``..``, or uses backslashes.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\\" in value or "\x00" in value:
        raise SourceNotFoundError(f"{what}={value!r} must be a non-empty relative path with '/' separators.")
    path = PurePosixPath(value)
    if path.is_absolute() or any(part in ("..", "") for part in value.split("/")) or re.match(r"^[A-Za-z]:", value):
        raise SourceNotFoundError(
            f"{what}={value!r} must stay inside the adapter directory or repo (no absolute paths, no '..')."
        )
    return str(path)


def fetch(
    repo_id: str, *, revision: str | None, subfolder: str | None, token: str | bool | None, weight_name: str | None
) -> Path:
    """Downloads (or finds in the cache) what the adapter needs; returns a file or directory.

    Raises:
        SourceNotFoundError: a malformed repo id; the repo, revision or file does not exist, or is not cached
            while offline.
    """
    if not is_repo_id(repo_id):
        raise SourceNotFoundError(
            f"{repo_id!r} is neither an existing path nor a valid Hub repo id ('owner/name'). Check the spelling."
        )
    from huggingface_hub import hf_hub_download, snapshot_download

    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    try:
        if weight_name is not None:
            path = Path(hf_hub_download(repo_id, weight_name, subfolder=subfolder, revision=revision, token=token))
            _fetch_config(repo_id, subfolder, revision, token)
            return path
        inner = f"{subfolder}/" if subfolder else ""
        root = snapshot_download(
            repo_id, revision=revision, token=token, allow_patterns=[f"{inner}*.safetensors", f"{inner}{CONFIG_NAME}"]
        )
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
        what = (
            f"{subfolder}/{weight_name}" if subfolder and weight_name else (weight_name or subfolder or "the adapter")
        )
        raise SourceNotFoundError(
            f"{where}: cannot get {what} from the Hub ({type(exc).__name__}: {_first_line(exc)}). "
            "Check the repo id, revision and file names; when offline (HF_HUB_OFFLINE=1), download it once first."
        ) from None
    return Path(root) / subfolder if subfolder else Path(root)


def _fetch_config(repo_id: str, subfolder: str | None, revision: str | None, token: str | bool | None) -> None:
    from huggingface_hub import hf_hub_download

    try:  # noqa: SIM105
        hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, revision=revision, token=token)
    except Exception:  # an adapter without a config is fine (kohya, diffusers files)
        pass


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""
