"""The local Hugging Face cache of a Hub fetch: its folder, the snapshot it serves without the
Hub, and the records a fetch through the Hub writes into it.

Where the Hub is not reached (offline, no connection, no answer in time) or answers with an
error other than "no such revision", the cache serves the snapshot it holds, as
``snapshot_download`` does (:func:`_cached_snapshot`). The read picks the same file from it as
from the Hub's listing (:mod:`lorahot.io.weight_names`): one of another name than PEFT's or
diffusers' only where the cache records that the repo has neither (``.no_exist``, written by a
read through the Hub), and where ``huggingface_hub`` cached the repo's file listing for the
commit, the pick is checked against it as against the Hub's (:mod:`lorahot.io.hub_listing`). A
snapshot read without the Hub needs the config in it or a record that the repo has none: weights
fetched alone (``hf_hub_download``, diffusers' ``load_lora_weights`` with ``weight_name=``) say
nothing of the config. A file the read opens that the cache links to a blob it no longer holds
is not cached, as ``hf_hub_download`` finds it when asked for it alone (:func:`_check_cached_blobs`).

A fetch through the Hub records in the cache what a later read from it alone needs: the files
the listing lacks (:func:`_record_missing`, as ``huggingface_hub`` records the Hub's "no such
file") and the commit a branch names (:func:`_record_ref`).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from lorahot.errors import SourceNotFoundError, shown
from lorahot.io.config import CONFIG_NAME
from lorahot.io.hub_errors import _failure, _fix, _where
from lorahot.io.hub_listing import _Level, _needed
from lorahot.io.safety import cut
from lorahot.io.weight_names import WEIGHT_NAMES, pick_weight

__all__ = ["cache_folder"]


def cache_folder(repo_id: str) -> Path:
    """The local Hugging Face cache's folder of model ``repo_id`` (``HF_HUB_CACHE``, read now)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser() / ("models--" + repo_id.replace("/", "--"))


def _cached_snapshot(
    repo_id: str,
    revision: str | None,
    subfolder: str | None,
    token: str | bool | None,
    cause: Exception,
    need_config: bool = True,
) -> Path:
    """The snapshot the cache holds for ``revision`` (no request); ``cause`` where it holds none.

    Raises:
        SourceNotFoundError: ``need_config`` and the snapshot holds weights where the read looks
            but neither the config beside them nor a record that the repo has none there.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    level = _Level(subfolder)
    inner = level.inner
    root: Path | None
    try:
        root = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                token=token,
                local_files_only=True,
                # what the cached listing, where there is one, must show present (a partial snapshot is refused)
                allow_patterns=[f"{inner}*.safetensors", f"{inner}{CONFIG_NAME}"],
                ignore_patterns=[f"{inner}*/*"],
            )
        )
    except LocalEntryNotFoundError as exc:
        if type(exc) is not LocalEntryNotFoundError:
            raise  # a cached snapshot missing files (IncompleteSnapshotError) says so itself
        root = None
    if root is None:  # nothing cached: the listing's failure says why (raised as it is, with what it relays)
        raise cause
    _check_own_snapshot(repo_id, revision, root)
    chosen = _check_cached_pick(repo_id, revision, subfolder, root, cause)
    _check_cached_blobs(repo_id, revision, root, [inner + name for name in (chosen, CONFIG_NAME) if name])
    if need_config and _holds_safetensors(level.folder(root)):
        _check_cached_config(repo_id, revision, root, f"{inner}{CONFIG_NAME}", cause)
    return root


def _check_own_snapshot(repo_id: str, revision: str | None, root: Path) -> None:
    """``root``, the snapshot the cache serves for ``revision``, is one of the repo's own: a
    folder named by a commit in its ``snapshots``. A ref file of a damaged cache holding a path
    (``../../models--other--repo/snapshots/<commit>``) had the read serve another repo's files;
    ``huggingface_hub`` refuses such a ref for one file, not for a whole snapshot.

    Raises:
        SourceNotFoundError: it is not, naming the ref, where it leads, and the fix.
    """
    own = os.path.normpath(cache_folder(repo_id) / "snapshots")
    at = os.path.normpath(root)
    if os.path.dirname(at) == own and _COMMIT_NAME.fullmatch(os.path.basename(at)):
        return
    raise SourceNotFoundError(
        f"{repo_id}: the local Hugging Face cache's refs/{revision or 'main'} leads to {shown(str(root), 200)}, "
        f"which is not a snapshot of this repo (a commit's folder in {own}): the cache is damaged. Delete "
        f"{cache_folder(repo_id)} and fetch the repo again while online."
    )


#: a snapshot folder's name: a full commit hash
_COMMIT_NAME = re.compile(r"[0-9a-f]{40}")


def _check_cached_blobs(repo_id: str, revision: str | None, root: Path, names: list[str]) -> None:
    """The files ``names`` a read of the cache's snapshot ``root`` opens are not links to blobs
    the cache no longer holds (a cleaned cache, an interrupted copy): such a file is not cached,
    as ``hf_hub_download`` finds it when asked for it alone.

    Raises:
        SourceNotFoundError: one is, naming it, where it links, and the fix.
    """
    for name in names:
        path = root / name
        if os.path.islink(path) and not os.path.exists(path):
            raise SourceNotFoundError(
                f"{_where(repo_id, revision)}: the local Hugging Face cache links {cut(name, 200)} to a blob it no "
                f"longer holds ({cut(os.readlink(path), 200)}). Fetch the repo again while online: huggingface_hub "
                "then downloads it again."
            )


def _check_cached_pick(
    repo_id: str, revision: str | None, subfolder: str | None, root: Path, cause: Exception
) -> str | None:
    """The file a read of the cache's snapshot ``root`` picks (returned: its name at the level,
    or None where there is none) is the one a read through the Hub
    picks: a file of another name than PEFT's or diffusers' only where the cache knows the repo
    has neither there (:func:`_known_absent`). A file fetched alone (``weight_name=``) is
    otherwise all the snapshot shows of a repo that may hold ``adapter_model.safetensors``.

    Where ``huggingface_hub`` cached the repo's file listing for the commit, the pick is checked
    against it as against the Hub's (:func:`_needed`: several files, or diffusers' pick another).

    Raises:
        SourceNotFoundError: the level holds several files to pick from, or one of another name
            and no record that the repo lacks PEFT's and diffusers' names there; the cached
            listing refuses the pick.
    """
    listing = _cached_listing(repo_id, root.name)
    if listing is not None:
        _needed(listing, subfolder, _where(repo_id, revision))
    level = _Level(subfolder)
    try:
        names = os.listdir(level.folder(root))
    except (OSError, ValueError):  # nothing there: the read says so
        return None
    chosen = pick_weight(names, f"{_where(repo_id, revision)}: {level.name}")
    if chosen is None or chosen in WEIGHT_NAMES:
        return chosen
    unknown = [name for name in WEIGHT_NAMES if not _known_absent(repo_id, root, level.inner + name)]
    if unknown:
        raise SourceNotFoundError(
            f"{_where(repo_id, revision)}: the local Hugging Face cache holds {shown(chosen, 200)} at {level.name}, "
            f"and cannot tell whether the repo has {' or '.join(unknown)} there, which a read picks first (the Hub was "
            f"not asked: {_failure(cause)}). Pass weight_name={shown(chosen, 200)} to read "
            "that file, or fetch the repo once while online."
        )
    return chosen


def _known_absent(repo_id: str, root: Path, name: str) -> bool:
    """Whether the cache records that the repo has no file ``name`` at the commit of its snapshot
    ``root``: ``huggingface_hub``'s ``.no_exist`` record, or its cached file listing without it."""
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache

    try:
        if try_to_load_from_cache(repo_id, name, revision=root.name) is _CACHED_NO_EXIST:
            return True
    except Exception:  # a cache it cannot read records nothing
        pass
    listing = _cached_listing(repo_id, root.name)
    return listing is not None and name not in listing


def _check_cached_config(repo_id: str, revision: str | None, root: Path, name: str, cause: Exception) -> None:
    """Whether the repo has config ``name`` is known from the cache's snapshot ``root`` alone:
    the file is there, or the cache records it as missing (:func:`_known_absent`). A snapshot
    whose config was never asked for (its weights fetched alone: ``hf_hub_download``, or
    diffusers' ``load_lora_weights`` with ``weight_name=``) says nothing, and read without its
    config the adapter would compute at alpha = rank.

    Raises:
        SourceNotFoundError: neither, naming the repo, the file and the fix for ``cause``.
    """
    if os.path.lexists(root / name) or _known_absent(repo_id, root, name):  # there: the read judges it
        return
    raise SourceNotFoundError(
        f"{_where(repo_id, revision)}: cannot fetch {cut(name, 200)} from the Hub ({_failure(cause)}), and without "
        "it the adapter's scale is unknown: the local Hugging Face cache holds the weights, but neither the config "
        f"nor a record that the repo has none. {_fix(cause)} Once fetched, the "
        "cache also records a config that does not exist. Or pass config={'r': ..., 'lora_alpha': ...}."
    )


def _record_missing(repo_id: str, commit: str, name: str) -> None:
    """Records in the cache that the repo has no file ``name`` at ``commit`` (``.no_exist``, as
    ``huggingface_hub`` records the Hub's "no such file"), for a read from the cache alone."""
    try:
        marker = cache_folder(repo_id) / ".no_exist" / commit / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:  # a read-only cache: a read from it alone then refuses, asking for the config
        pass


def _cached_file(
    repo_id: str, filename: str, subfolder: str | None, revision: str | None, token: str | bool | None, cause: Exception
) -> Path:
    """The file the cache holds for ``revision`` (no request); ``cause`` where it holds none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(
                repo_id, filename, subfolder=subfolder, revision=revision, token=token, local_files_only=True
            )
        )
    except LocalEntryNotFoundError as exc:
        if type(exc) is not LocalEntryNotFoundError:
            raise
    raise cause  # not cached: why the Hub was not asked says more (raised as it is, with what it relays)


def _record_ref(repo_id: str, branch: str, commit: str) -> None:
    """Writes ``commit`` as what ``branch`` names in the cache (as ``huggingface_hub`` does:
    only if it changed, atomically), so an offline read of the branch finds the snapshot."""
    if branch == commit:
        return
    ref = cache_folder(repo_id) / "refs" / branch
    try:
        if ref.is_file() and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        partial = ref.with_name(f"{ref.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_text(commit)
        os.replace(partial, ref)
    except OSError:  # a read-only cache: the files were read; an offline read of the branch will not find them
        pass


def _cached_listing(repo_id: str, commit: str) -> list[str] | None:
    """The repo's file paths at ``commit`` as ``huggingface_hub`` cached them, or None."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return [f.path for f in get_cached_repo_tree(repo_id, revision=commit)]
    except Exception:  # an older huggingface_hub, or no listing cached (offline): nothing known
        return None


def _holds_safetensors(folder: Path) -> bool:
    """Whether ``folder`` has a ``*.safetensors`` entry at its top level (what a read picks from)."""
    try:
        return any(name.endswith(".safetensors") for name in os.listdir(folder))
    except (OSError, ValueError):  # not there: the snapshot brought nothing to it
        return False
