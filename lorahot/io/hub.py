"""Fetching an adapter from the Hugging Face Hub, through ``huggingface_hub`` and its cache.

``huggingface_hub`` decides where files live (``HF_HUB_CACHE``) and whether the network may
be used (``HF_HUB_OFFLINE=1`` reads the cache only). lorahot asks only for safetensors files
and ``adapter_config.json``; it never downloads a pickle.

The config decides the scale (without one, alpha equals the rank), so failing to get it is not
the same as it not existing. For a single file (``weight_name=``) the config is asked for
separately, and only the Hub's answer "no such file" lets the load go on without it: now
(``EntryNotFoundError``) or as recorded in the cache's ``.no_exist`` folder when offline.
Anything else (offline with nothing cached, network errors, a gated repo) is a
:class:`~lorahot.errors.SourceNotFoundError`, unless the caller passed ``config=``.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from lorahot.errors import SourceNotFoundError, UsageError, shown
from lorahot.io.config import CONFIG_NAME
from lorahot.io.safety import cut

__all__ = ["is_repo_id", "check_relative", "fetch"]

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def is_repo_id(text: str) -> bool:
    """True if ``text`` has the shape of a Hub repo id (``name`` or ``owner/name``)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith((".", "-"))


def check_relative(value: str | None, what: str) -> str | None:
    """``value`` as a clean relative POSIX path, or None.

    Raises:
        UsageError: ``value`` is not a string.
        SourceNotFoundError: ``value`` is absolute, climbs out with ``..``, or uses backslashes.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{what}={shown(value)} must be a string: a relative path with '/' separators.")
    if not value or "\\" in value or "\x00" in value:
        raise SourceNotFoundError(f"{what}={shown(value)} must be a non-empty relative path with '/' separators.")
    path = PurePosixPath(value)
    if path.is_absolute() or any(part in ("..", "") for part in value.split("/")) or re.match(r"^[A-Za-z]:", value):
        raise SourceNotFoundError(
            f"{what}={shown(value)} must stay inside the adapter directory or repo (no absolute paths, no '..')."
        )
    return str(path)


def fetch(
    repo_id: str,
    *,
    revision: str | None,
    subfolder: str | None,
    token: str | bool | None,
    weight_name: str | None,
    need_config: bool = True,
) -> Path:
    """Downloads (or finds in the cache) what the adapter needs; returns a file or directory.

    Args:
        need_config: False when the caller supplies the config (``config=``): then a config
            that cannot be fetched is no error.

    Raises:
        SourceNotFoundError: a malformed repo id; the repo, revision or file does not exist, or is not cached
            while offline; the config of a single file cannot be fetched (see the module docstring).
    """
    if not is_repo_id(repo_id):
        raise SourceNotFoundError(
            f"{shown(repo_id, 200)} is neither an existing path nor a valid Hub repo id ('owner/name'). Check the "
            "spelling."
        )
    path = _download(repo_id, revision, subfolder, token, weight_name)
    if weight_name is not None:  # a snapshot brings the config along; a single file does not
        # the config the read consults is the one beside the weight file (a weight_name may
        # have a folder part of its own)
        folder = "/".join(p for p in (subfolder, str(PurePosixPath(weight_name).parent)) if p and p != ".")
        _fetch_config(repo_id, folder or None, revision, token, need_config)
    return path


def _download(
    repo_id: str, revision: str | None, subfolder: str | None, token: str | bool | None, weight_name: str | None
) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if weight_name is not None:
            return Path(hf_hub_download(repo_id, weight_name, subfolder=subfolder, revision=revision, token=token))
        inner = f"{subfolder}/" if subfolder else ""
        root = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                token=token,
                allow_patterns=[f"{inner}*.safetensors", f"{inner}{CONFIG_NAME}"],
                # a pattern's '*' also matches '/': without this, every checkpoint folder
                # below (step-*/, ema/) would come down too, though only the top level is read
                ignore_patterns=[f"{inner}*/*"],
            )
        )
        return root / subfolder if subfolder else root
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
        what = cut(
            f"{subfolder}/{weight_name}" if subfolder and weight_name else (weight_name or subfolder or "the adapter"),
            200,
        )
        where = cut(repo_id + (f"@{revision}" if revision else ""), 200)
        raise SourceNotFoundError(
            f"{where}: cannot get {what} from the Hub ({type(exc).__name__}: {_first_line(exc)}). "
            "Check the repo id, revision and file names; when offline (HF_HUB_OFFLINE=1), download it once first."
        ) from None


def _fetch_config(
    repo_id: str, subfolder: str | None, revision: str | None, token: str | bool | None, required: bool
) -> None:
    """Puts the config beside the weight file in the cache, if the repo has one.

    Raises:
        SourceNotFoundError: it could not be fetched and the Hub has not said it does not exist.
    """
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, revision=revision, token=token)
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
        if not required or _known_missing(exc, repo_id, subfolder, revision):
            return  # an adapter without a config is fine (kohya, diffusers files)
        name = cut(f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME, 200)
        where = cut(repo_id + (f"@{revision}" if revision else ""), 200)
        raise SourceNotFoundError(
            f"{where}: cannot fetch {name} from the Hub ({type(exc).__name__}: {_first_line(exc)}), and without it "
            "the adapter's scale is unknown. Fetch it once while online (the cache then also records a config that "
            "does not exist), or pass config={'r': ..., 'lora_alpha': ...}."
        ) from None


def _known_missing(exc: Exception, repo_id: str, subfolder: str | None, revision: str | None) -> bool:
    """True when ``exc`` is the Hub saying the file does not exist, now or as cached (``.no_exist``).

    ``LocalEntryNotFoundError`` (offline, not cached) subclasses ``EntryNotFoundError`` but says
    nothing about the Hub, so it counts only if the cache recorded the file as missing.
    """
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    if not isinstance(exc, LocalEntryNotFoundError):
        return isinstance(exc, EntryNotFoundError)
    name = f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME
    try:
        return try_to_load_from_cache(repo_id, name, revision=revision) is _CACHED_NO_EXIST
    except Exception:  # a cache it cannot read records nothing
        return False


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return cut(text[0], 300) if text else ""
