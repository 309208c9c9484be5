"""Fetching an adapter from the Hugging Face Hub, through ``huggingface_hub`` and its cache.

``huggingface_hub`` decides where files live (``HF_HUB_CACHE``) and whether the network may
be used (``HF_HUB_OFFLINE=1`` reads the cache only). lorahot asks only for safetensors files
and ``adapter_config.json``; it never downloads a pickle.

The config decides the scale (without one, alpha equals the rank), so failing to get it is not
the same as it not existing. For a single file (``weight_name=``) the config is asked for
separately, at the commit the weight file is of (``hf_hub_download`` serves a file whose request
failed from the snapshot its branch named when last fetched, which may be older than the branch
now), and only the Hub's answer "no such file" lets the load go on without it: now
(``EntryNotFoundError``) or as recorded in the cache's ``.no_exist`` folder when offline.
Anything else (offline with nothing cached, network errors, a gated repo) is a
:class:`~lorahot.errors.SourceNotFoundError`, unless the caller passed ``config=``. For a whole
repo the Hub's listing says whether there is one, and a listing without it is recorded in the
cache's ``.no_exist`` as ``huggingface_hub`` records the Hub's "no such file", once the files the
read needs are fetched (a failed fetch records nothing); a snapshot the cache serves alone
(offline, the Hub not reached) needs the config in it or such a record (or the file listing
``huggingface_hub`` cached, without it), else the same error: weights fetched alone
(``hf_hub_download``, diffusers' ``load_lora_weights`` with ``weight_name=``) say nothing of the
config.

A whole repo (no ``weight_name=``) is listed by one request to the Hub bounded by
``huggingface_hub``'s ``HF_HUB_ETAG_TIMEOUT``, read when the request is made (its
``snapshot_download`` sends its listing requests with no timeout, so an endpoint that accepts the
connection and never answers held the load until the connection dropped). The files a read needs
(the ``.safetensors`` files at the top of ``subfolder``, and its ``adapter_config.json``) are
then fetched one by one at the listed commit, the config first; the records of the files the
listing lacks and the branch's ref in the cache are written last, so an interrupted or failed
fetch never leaves the ref naming a snapshot without its weights, nor a record behind. Where
the Hub is not reached (offline, no connection, no answer in time) or answers with an error
other than "no such revision", the cache serves the snapshot it holds, as
``snapshot_download`` does. The read picks the same file from it as from the listing
(:mod:`lorahot.io.weight_names`): one of another name than PEFT's or diffusers' only where the
cache records that the repo has neither (``.no_exist``, written by a read through the Hub).

Online, a fetch is bounded as a whole by :func:`~lorahot.io.hub_watch.hub_timeout`
(``LORAHOT_HUB_TIMEOUT``), not only per request, on a worker thread the caller watches
(:mod:`lorahot.io.hub_watch`). Every failure of ``huggingface_hub`` is one typed error naming the
repo, the revision and the file, with the fix for its cause (:mod:`lorahot.io.hub_errors`). A repo
with no ``.safetensors`` file where the read looks is refused saying what it holds there (pickles,
or safetensors files in other folders), from the Hub's listing, or offline from the one
``huggingface_hub`` cached.

The parts, one concept a file:

- this file: the entry points (:func:`fetch`, :func:`is_repo_id`, :func:`check_relative`) and the
  fetch through the Hub (the listing, then the files a read needs, then the branch's ref);
- :mod:`~lorahot.io.hub_watch`: the bound on a whole fetch, and the worker thread it runs on;
- :mod:`~lorahot.io.hub_listing`: which files of a repo's listing a read opens;
- :mod:`~lorahot.io.hub_cache`: the local cache: what it serves alone, and the records written to it;
- :mod:`~lorahot.io.hub_errors`: what a failure of ``huggingface_hub`` means, and its fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from lorahot.errors import AdapterReadError, LoraError, SourceNotFoundError, UsageError, shown
from lorahot.io.config import CONFIG_NAME
from lorahot.io.hub_cache import (
    _cached_file,
    _cached_listing,
    _cached_snapshot,
    _holds_safetensors,
    _record_missing,
    _record_ref,
    cache_folder,
)
from lorahot.io.hub_errors import _failure, _fix, _known_missing, _unreached, _where
from lorahot.io.hub_listing import _Level, _needed
from lorahot.io.hub_watch import DEFAULT_HUB_TIMEOUT, HUB_TIMEOUT_ENV, HubTimeout, _Abandoned, _Watch, hub_timeout
from lorahot.io.safety import PICKLE_SUFFIXES, cut
from lorahot.io.weight_names import WEIGHT_NAMES

__all__ = [
    "is_repo_id",
    "check_relative",
    "fetch",
    "cache_folder",
    "hub_timeout",
    "HubTimeout",
    "HUB_TIMEOUT_ENV",
    "DEFAULT_HUB_TIMEOUT",
]

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def is_repo_id(text: str) -> bool:
    """True if ``text`` has the shape of a Hub repo id (``name`` or ``owner/name``)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith((".", "-"))


def check_relative(value: str | None, what: str, *, folder: bool = False) -> str | None:
    """``value`` as a clean relative POSIX path (``.`` parts dropped), or None.

    Args:
        folder: ``value`` names a folder (``subfolder=``): a trailing ``/`` is dropped, as
            ``os.path.join`` and PEFT's ``subfolder=`` read it, and ``.`` (the level itself) is None.

    Raises:
        UsageError: ``value`` is not a string.
        SourceNotFoundError: ``value`` is absolute, climbs out with ``..``, uses backslashes, or
            has an empty part (``//``, or a file's trailing ``/``).
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{what}={shown(value)} must be a string: a relative path with '/' separators.")
    if not value or "\\" in value or "\x00" in value:
        raise SourceNotFoundError(f"{what}={shown(value)} must be a non-empty relative path with '/' separators.")
    given = value
    if folder and value.strip("/") and not value.startswith("/"):
        value = value.rstrip("/")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in value.split("/") or re.match(r"^[A-Za-z]:", value):
        raise SourceNotFoundError(
            f"{what}={shown(value)} must stay inside the adapter directory or repo (no absolute paths, no '..')."
        )
    if "" in value.split("/"):  # '//', or a file's trailing '/' (a folder's is dropped above)
        raise SourceNotFoundError(f"{what}={shown(given)} {_empty_part(value)}")
    clean = str(path)
    return None if folder and clean == "." else clean


def _empty_part(value: str) -> str:
    """What is wrong with the relative path ``value`` that has an empty part, and the fix."""
    joined = re.sub("/+", "/", value)
    if joined.endswith("/"):
        return (
            "ends with '/', naming a folder where a file belongs: name the file in it, as "
            f"{shown(joined + '<name>.safetensors')}, or pass the folder as subfolder=."
        )
    return f"has an empty part ('//'): write it as {shown(joined)}."


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

    Online, the fetch runs on a worker thread watched against :func:`hub_timeout` (see the
    module docstring); once it has waited that long for the Hub, the cache serves what it holds.

    Args:
        need_config: False when the caller supplies the config (``config=``): then a config
            that cannot be fetched is no error.

    Raises:
        UsageError: ``LORAHOT_HUB_TIMEOUT`` is set to something other than a number of seconds > 0 and
            at most ``threading.TIMEOUT_MAX`` (:func:`hub_timeout`).
        SourceNotFoundError: a malformed repo id; the repo, revision or file does not exist, or is not cached
            while offline; the Hub did not answer within :func:`hub_timeout` and the cache holds nothing; the
            config of a single file cannot be fetched (see the module docstring).
    """
    if not is_repo_id(repo_id):
        raise SourceNotFoundError(
            f"{shown(repo_id, 200)} is neither an existing path nor a valid Hub repo id ('owner/name'). Check the "
            "spelling."
        )
    from huggingface_hub import constants

    limit = hub_timeout()
    args = (repo_id, revision, subfolder, token, weight_name, need_config)
    if constants.HF_HUB_OFFLINE:  # no request is made: nothing to wait for
        return _fetch(*args)
    watch = _Watch(cache_folder(repo_id) / "blobs", limit)
    try:
        return watch.run(lambda: _fetch(*args, watch=watch))
    except HubTimeout as stalled:  # the Hub not reached in time: the cache serves what it holds
        return _fetch(*args, stalled=stalled)


def _fetch(
    repo_id: str,
    revision: str | None,
    subfolder: str | None,
    token: str | bool | None,
    weight_name: str | None,
    need_config: bool,
    *,
    watch: _Watch | None = None,
    stalled: HubTimeout | None = None,
) -> Path:
    """:func:`fetch`'s work: through the Hub (reporting its steps to ``watch``), or from the
    cache alone after ``stalled`` (then a file not cached fails with ``stalled`` as its cause)."""
    path = _download(repo_id, revision, subfolder, token, weight_name, watch, stalled, need_config)
    if weight_name is not None:  # a snapshot brings the config along; a single file does not
        if watch is not None:
            watch.step()
        # the config the read consults is the one beside the weight file (a weight_name may
        # have a folder part of its own), of the commit the weight file is of
        inside = PurePosixPath(*(p for p in (subfolder, weight_name) if p))
        folder = str(inside.parent) if inside.parent.parts else None
        _fetch_config(repo_id, folder, revision, token, need_config, stalled, at=_commit_of(path, inside))
    return path


def _commit_of(path: Path, inside: PurePosixPath) -> str | None:
    """The commit whose snapshot of the cache holds ``path``, the repo's file ``inside``, or None.

    ``hf_hub_download`` serves a file whose request failed (a server error, a rate limit, a
    refusal, no answer) from the snapshot the branch named when last fetched, and a later
    request at the branch may get a newer commit: the config is asked for at this commit, so
    that the one read beside the weights is theirs."""
    snapshot = path.parents[len(inside.parts) - 1]
    if snapshot.parent.name == "snapshots" and _COMMIT.fullmatch(snapshot.name):
        return snapshot.name
    return None


def _download(
    repo_id: str,
    revision: str | None,
    subfolder: str | None,
    token: str | bool | None,
    weight_name: str | None,
    watch: _Watch | None,
    stalled: HubTimeout | None,
    need_config: bool = True,
) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        if weight_name is not None:
            if stalled is not None:
                return _cached_file(repo_id, weight_name, subfolder, revision, token, stalled)
            return Path(hf_hub_download(repo_id, weight_name, subfolder=subfolder, revision=revision, token=token))
        if stalled is not None:
            root, listing = _cached_snapshot(repo_id, revision, subfolder, token, stalled, need_config), None
        else:
            root, listing = _snapshot(repo_id, revision, subfolder, token, watch, need_config)
    except (_Abandoned, LoraError):
        raise
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
        what = cut(
            f"{subfolder}/{weight_name}" if subfolder and weight_name else (weight_name or subfolder or "the adapter"),
            200,
        )
        raise SourceNotFoundError(
            f"{_where(repo_id, revision)}: cannot get {what} from the Hub ({_failure(exc)}). {_fix(exc)}"
        ) from None
    folder = _Level(subfolder).folder(root)
    if not _holds_safetensors(folder):
        raise _nothing_to_read(repo_id, revision, subfolder, root, listing)
    return folder


def _snapshot(
    repo_id: str,
    revision: str | None,
    subfolder: str | None,
    token: str | bool | None,
    watch: _Watch | None,
    need_config: bool = True,
) -> tuple[Path, list[str] | None]:
    """The cache's snapshot folder of ``revision``, holding what a read of ``subfolder`` needs,
    and the repo's file paths (None where the cache served the folder without the Hub).

    The listing is one request bounded by ``HF_HUB_ETAG_TIMEOUT`` (see the module docstring).
    Nothing is downloaded when it has no ``.safetensors`` file where the read looks. Each
    step is reported to ``watch``, which stops the fetch once abandoned (before the records and
    the ref, written once the downloads succeeded: :func:`_record`).

    Raises:
        Exception: what ``huggingface_hub`` raises; the listing's own failure where the cache
            holds nothing for ``revision`` either.
        _Abandoned: ``watch`` stopped waiting.
    """
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError, RevisionNotFoundError

    branch = revision or constants.DEFAULT_REVISION
    try:
        info = HfApi().repo_info(repo_id, revision=branch, token=token, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:  # not reached, or refused: the cache may still hold the snapshot
        if isinstance(exc, RevisionNotFoundError) or not (_unreached(exc) or isinstance(exc, HfHubHTTPError)):
            raise
        return _cached_snapshot(repo_id, revision, subfolder, token, exc, need_config), None
    commit = getattr(info, "sha", None)
    if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):  # it names a folder of the cache
        raise ValueError(f"the Hub's answer names no commit of the repo (sha={shown(commit, 60)})")
    files = [s.rfilename for s in getattr(info, "siblings", None) or () if isinstance(s.rfilename, str)]
    root = cache_folder(repo_id).resolve() / "snapshots" / commit
    needed = _needed(files, subfolder, _where(repo_id, revision))
    if any(name.endswith(".safetensors") for name in needed):
        inner = _Level(subfolder).inner
        # so that a read from the cache alone knows they are not there
        missing = [inner + name for name in (CONFIG_NAME, *WEIGHT_NAMES) if inner + name not in files]
        for name in sorted(needed, key=lambda n: n.endswith(".safetensors")):  # the config first
            if watch is not None:
                watch.step()
            path = Path(hf_hub_download(repo_id, name, revision=commit, token=token))
            root = path.parents[len(PurePosixPath(name).parts) - 1]  # where huggingface_hub put the snapshot
        if watch is None:
            _record(repo_id, branch, commit, missing)
        else:
            watch.last(lambda: _record(repo_id, branch, commit, missing))
    return root, files


def _record(repo_id: str, branch: str, commit: str, missing: list[str]) -> None:
    """Writes what a read from the cache alone needs, once a fetch's downloads succeeded (a
    failed fetch leaves nothing behind): that the repo has none of the files ``missing`` at
    ``commit`` (``.no_exist``), then ``commit`` as what ``branch`` names."""
    for name in missing:
        _record_missing(repo_id, commit, name)
    _record_ref(repo_id, branch, commit)


#: a full Hub commit hash
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _fetch_config(
    repo_id: str,
    subfolder: str | None,
    revision: str | None,
    token: str | bool | None,
    required: bool,
    stalled: HubTimeout | None = None,
    *,
    at: str | None = None,
) -> None:
    """Puts the config beside the weight file in the cache, if the repo has one; after
    ``stalled``, only looks in the cache.

    Args:
        at: the commit of the weight file, asked for in place of ``revision`` (which names the
            repo in messages).

    Raises:
        SourceNotFoundError: it could not be fetched and the Hub has not said it does not exist.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        hf_hub_download(
            repo_id,
            CONFIG_NAME,
            subfolder=subfolder,
            revision=at or revision,
            token=token,
            local_files_only=stalled is not None,
        )
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
        if not required or _known_missing(exc, repo_id, subfolder, at or revision):
            return  # an adapter without a config is fine (kohya, diffusers files)
        if stalled is not None and type(exc) is LocalEntryNotFoundError:  # not cached: the Hub did not answer
            exc = stalled
        name = cut(_Level(subfolder).inner + CONFIG_NAME, 200)
        raise SourceNotFoundError(
            f"{_where(repo_id, revision)}: cannot fetch {name} from the Hub ({_failure(exc)}), "
            f"and without it the adapter's scale is unknown. {_fix(exc)} Once fetched, the "
            "cache also records a config that does not exist. Or pass config={'r': ..., 'lora_alpha': ...}."
        ) from None


def _nothing_to_read(
    repo_id: str, revision: str | None, subfolder: str | None, root: Path, listing: list[str] | None
) -> LoraError:
    """The error for a snapshot without a ``.safetensors`` file where the read looks, saying
    what the repo holds there: from ``listing`` (the Hub's), else the file listing
    ``huggingface_hub`` cached for the commit, else (offline) from what the local cache holds."""
    where, at = _where(repo_id, revision), _Level(subfolder)
    level = at.name
    if listing is None:
        listing = _cached_listing(repo_id, root.name)
    if listing is not None:
        here = at.entries(listing)
    else:
        try:
            here = os.listdir(at.folder(root))
        except (OSError, ValueError):
            here = []
    pickles = sorted(n for n in here if PurePosixPath(n).suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        return AdapterReadError(
            f"{where}: {level} holds only pickle checkpoints ({cut(', '.join(pickles), 200)}), no .safetensors "
            "file; lorahot never unpickles (nor downloads) them. Load a safetensors adapter, or convert the "
            "checkpoint (safetensors.torch.save_file) and load that file."
        )
    if listing is None:
        return SourceNotFoundError(
            f"{where}: the local Hugging Face cache holds no .safetensors file at {level}, and lists no files of the "
            "repo. Check subfolder=, or fetch it once while online."
        )
    elsewhere = sorted(p for p in listing if p.endswith(".safetensors"))
    if elsewhere:
        return SourceNotFoundError(
            f"{where}: no .safetensors file at {level}; the repo has {cut(', '.join(elsewhere), 300)}. Pass "
            "subfolder= or weight_name= (the CLI's --subfolder, --weight-name) to pick one."
        )
    return SourceNotFoundError(
        f"{where}: the repo holds no .safetensors file (lorahot reads only safetensors adapters). Check the repo id."
    )
