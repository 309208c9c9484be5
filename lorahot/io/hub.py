"""Fetching an adapter from the Hugging Face Hub, through ``huggingface_hub`` and its cache.

``huggingface_hub`` decides where files live (``HF_HUB_CACHE``) and whether the network may
be used (``HF_HUB_OFFLINE=1`` reads the cache only). lorahot asks only for safetensors files
and ``adapter_config.json``; it never downloads a pickle.

The config decides the scale (without one, alpha equals the rank), so failing to get it is not
the same as it not existing. For a single file (``weight_name=``) the config is asked for
separately, and only the Hub's answer "no such file" lets the load go on without it: now
(``EntryNotFoundError``) or as recorded in the cache's ``.no_exist`` folder when offline.
Anything else (offline with nothing cached, network errors, a gated repo) is a
:class:`~lorahot.errors.SourceNotFoundError`, unless the caller passed ``config=``. For a whole
repo the Hub's listing says whether there is one, and a listing without it is recorded in the
cache's ``.no_exist`` as ``huggingface_hub`` records the Hub's "no such file"; a snapshot the
cache serves alone (offline, the Hub not reached) needs the config in it or such a record (or
the file listing ``huggingface_hub`` cached, without it), else the same error: weights fetched
alone (``hf_hub_download``, diffusers' ``load_lora_weights`` with ``weight_name=``) say nothing
of the config.

A whole repo (no ``weight_name=``) is listed by one request to the Hub bounded by
``huggingface_hub``'s ``HF_HUB_ETAG_TIMEOUT``, read when the request is made (its
``snapshot_download`` sends its listing requests with no timeout, so an endpoint that accepts the
connection and never answers held the load until the connection dropped). The files a read needs
(the ``.safetensors`` files at the top of ``subfolder``, and its ``adapter_config.json``) are
then fetched one by one at the listed commit, the config first, and the branch's ref in the cache
is written last, so an interrupted fetch never leaves the ref naming a snapshot without its
weights. Where the Hub is not reached (offline, no connection, no answer in time) or answers with
an error other than "no such revision", the cache serves the snapshot it holds, as
``snapshot_download`` does. The read picks the same file from it as from the listing
(:mod:`lorahot.io.weight_names`): one of another name than PEFT's or diffusers' only where the
cache records that the repo has neither (``.no_exist``, written by a read through the Hub).

Online, a fetch is bounded as a whole by :func:`hub_timeout` (``LORAHOT_HUB_TIMEOUT``), not
only per request: ``hf_hub_download`` makes a file's metadata request again when it times out or
fails to connect and the file is not cached (60 s a try, up to 5 retries with backoff), and
waits out a rate limit's ``Retry-After``, so one stalled file held a load for minutes. The fetch
runs on a worker thread the caller watches (:class:`_Watch`); once it has waited that long
for the Hub with no step done and no download under way, the caller stops waiting and the cache
serves what it holds, as for a listing that timed out; with nothing cached the load fails naming
the limit. The abandoned worker lets the call of ``huggingface_hub`` under way finish or fail
(it writes only complete files to the cache), then stops: no further file, and no branch's ref.
A caller interrupted while it waits (``KeyboardInterrupt``) abandons the worker the same way; a
ref the worker is writing then is written whole before the interrupt goes on.

Every failure of ``huggingface_hub`` is one typed error naming the repo, the revision and the
file, with the fix for its cause (:func:`_fix`: log in for a gated or private repo, go online
once for a file not cached, retry for a rate limit or a server error, ...). A repo with no
``.safetensors`` file where the read looks is refused saying what it holds there (pickles, or
safetensors files in other folders), from the Hub's listing, or offline from the one
``huggingface_hub`` cached.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from lorahot.errors import AdapterReadError, LoraError, SourceNotFoundError, UsageError, shown
from lorahot.io.config import CONFIG_NAME
from lorahot.io.safety import PICKLE_SUFFIXES, cut
from lorahot.io.weight_names import WEIGHT_NAMES, check_diffusers, diffusers_guess, pick_weight

__all__ = ["is_repo_id", "check_relative", "fetch", "cache_folder", "hub_timeout", "HubTimeout"]

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
            has an empty part.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(f"{what}={shown(value)} must be a string: a relative path with '/' separators.")
    if not value or "\\" in value or "\x00" in value:
        raise SourceNotFoundError(f"{what}={shown(value)} must be a non-empty relative path with '/' separators.")
    if folder and value.strip("/") and not value.startswith("/"):
        value = value.rstrip("/")
    path = PurePosixPath(value)
    if path.is_absolute() or ".." in value.split("/") or re.match(r"^[A-Za-z]:", value):
        raise SourceNotFoundError(
            f"{what}={shown(value)} must stay inside the adapter directory or repo (no absolute paths, no '..')."
        )
    if "" in value.split("/"):
        raise SourceNotFoundError(
            f"{what}={shown(value)} has an empty part ('//' or a trailing '/'): write it as 'a/b'."
        )
    clean = str(path)
    return None if folder and clean == "." else clean


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
        # have a folder part of its own)
        folder = "/".join(p for p in (subfolder, str(PurePosixPath(weight_name).parent)) if p and p != ".")
        _fetch_config(repo_id, folder or None, revision, token, need_config, stalled)
    return path


#: environment variable: the longest a Hub fetch waits for the Hub, in seconds
HUB_TIMEOUT_ENV = "LORAHOT_HUB_TIMEOUT"
#: :data:`HUB_TIMEOUT_ENV` unless set: above huggingface_hub's 10 s per request, so a request it
#: times out itself still falls back to the cache first, with room for a retry of a brief failure
DEFAULT_HUB_TIMEOUT = 30.0


def hub_timeout() -> float:
    """The longest a Hub fetch waits for the Hub, in seconds: ``LORAHOT_HUB_TIMEOUT`` (read now),
    else :data:`DEFAULT_HUB_TIMEOUT`.

    It bounds each wait for an answer: the listing of a repo, each file's metadata request
    (with every retry ``huggingface_hub`` makes of it), a wait for another download of the same
    file. The transfer of a file's bytes is not counted (a slow link is not cut off): once its
    download has begun, ``huggingface_hub``'s ``HF_HUB_DOWNLOAD_TIMEOUT`` bounds each read.

    The value is at most ``threading.TIMEOUT_MAX`` (about 292 years on 64-bit platforms), so any
    wait of a thread may be bounded by it; a larger one, like ``inf``, is refused.

    Raises:
        UsageError: the variable is set to something other than a number of seconds > 0 and at
            most ``threading.TIMEOUT_MAX``.
    """
    text = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_HUB_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= threading.TIMEOUT_MAX:  # nan and inf fail it too
        raise UsageError(
            f"{HUB_TIMEOUT_ENV}={shown(text, 60)} must be a number of seconds > 0 and at most "
            f"{threading.TIMEOUT_MAX:.0f} (threading.TIMEOUT_MAX): the longest a Hub fetch waits for the Hub "
            f"({DEFAULT_HUB_TIMEOUT:g} unless set). Set it to one, or unset it."
        )
    return value


class HubTimeout(TimeoutError):
    """The Hub did not answer a fetch within :func:`hub_timeout`."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"nothing from the Hub within {limit:g} s ({HUB_TIMEOUT_ENV})")
        self.limit = limit


class _Abandoned(Exception):
    """Raised in a fetch's worker thread once the caller has stopped waiting for it."""


#: how often a waiting fetch looks at its worker and at the cache's downloads, in seconds
_POLL_S = 0.05


class _Watch:
    """A Hub fetch on a worker thread, and when it last made progress.

    Progress is a step the worker reports (:meth:`step`: the listing answered, a file fetched)
    and, seen from here, a download under way in the repo's ``blobs`` folder of the cache:
    ``huggingface_hub`` writes a file's bytes to a ``*.incomplete`` file there and renames it
    when done. Such a file that is new or has changed since the fetch began holds the clock
    (one left by a dead process before the fetch began does not). When the clock reaches the
    limit, or the caller is interrupted, the caller stops waiting and the worker is abandoned:
    it stops at its next step, and writes no branch's ref once the caller has stopped
    (:meth:`last`; ``huggingface_hub`` itself writes only complete files).
    """

    def __init__(self, blobs: Path, limit: float) -> None:
        self.limit = limit
        self._blobs = blobs
        self._before = self._downloads()
        self._last = time.monotonic()
        self._abandoned = threading.Event()
        self._lock = threading.Lock()  # the caller's abandonment against the worker's last write

    def run(self, work: Callable[[], Path]) -> Path:
        """``work()`` on a daemon thread: its result or its exception.

        Raises:
            HubTimeout: ``limit`` seconds passed without progress.
        """
        done = threading.Event()
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = work()
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc
            finally:
                done.set()

        try:  # started inside: an interrupt right after the start abandons the worker too
            threading.Thread(target=target, name="lorahot-hub-fetch", daemon=True).start()
            while not done.wait(_POLL_S):
                if any(self._before.get(name) != stamp for name, stamp in self._downloads().items()):
                    self._last = time.monotonic()  # a download under way: its reads are bounded per read
                if time.monotonic() - self._last >= self.limit and not done.is_set():
                    raise HubTimeout(self.limit)
        finally:
            if not done.is_set():
                with self._lock:  # a last write under way ends first (see last)
                    self._abandoned.set()
        if "error" in box:
            raise box["error"]
        value: Path = box["value"]
        return value

    def step(self) -> None:
        """Called by the worker between requests: progress made, and stops it if abandoned.

        Raises:
            _Abandoned: the caller stopped waiting.
        """
        if self._abandoned.is_set():
            raise _Abandoned()
        self._last = time.monotonic()

    def last(self, write: Callable[[], None]) -> None:
        """Called by the worker for its last write into the cache (a branch's ref): ``write()``
        unless abandoned, under the lock the caller abandons it with, so that the write ends
        before the caller stops waiting, or never runs.

        Raises:
            _Abandoned: the caller stopped waiting.
        """
        with self._lock:
            self.step()
            write()

    def _downloads(self) -> dict[str, tuple[int, int]]:
        """The ``*.incomplete`` files of ``blobs``: name -> (size, mtime in ns)."""
        found = {}
        try:
            with os.scandir(self._blobs) as entries:
                for entry in entries:
                    if entry.name.endswith(".incomplete"):
                        stat = entry.stat(follow_symlinks=False)
                        found[entry.name] = (stat.st_size, stat.st_mtime_ns)
        except OSError:  # no such folder yet, or one going away: no download seen
            pass
        return found


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
            f"{_where(repo_id, revision)}: cannot get {what} from the Hub ({type(exc).__name__}: {_first_line(exc)}). "
            f"{_fix(exc)}"
        ) from None
    folder = root / subfolder if subfolder else root
    if not _holds_safetensors(folder):
        raise _nothing_to_read(repo_id, revision, subfolder, root, listing)
    return folder


def cache_folder(repo_id: str) -> Path:
    """The local Hugging Face cache's folder of model ``repo_id`` (``HF_HUB_CACHE``, read now)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser() / ("models--" + repo_id.replace("/", "--"))


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
    step is reported to ``watch``, which stops the fetch once abandoned (before the ref).

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
        inner = f"{subfolder}/" if subfolder else ""
        for name in (CONFIG_NAME, *WEIGHT_NAMES):  # so that a read from the cache alone knows they are not there
            if inner + name not in files:
                _record_missing(repo_id, commit, inner + name)
        for name in sorted(needed, key=lambda n: n.endswith(".safetensors")):  # the config first
            if watch is not None:
                watch.step()
            path = Path(hf_hub_download(repo_id, name, revision=commit, token=token))
            root = path.parents[len(PurePosixPath(name).parts) - 1]  # where huggingface_hub put the snapshot
        if watch is None:
            _record_ref(repo_id, branch, commit)
        else:
            watch.last(lambda: _record_ref(repo_id, branch, commit))
    return root, files


#: a full Hub commit hash
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _needed(files: list[str], subfolder: str | None, where: str) -> list[str]:
    """The paths of ``files`` a read of ``subfolder`` opens: the top-level ``*.safetensors``
    file it picks (:func:`~lorahot.io.weight_names.pick_weight`, no other: a repo may hold many
    large ones) and its config (never a checkpoint folder below it, nor a pickle).

    Raises:
        SourceNotFoundError: the level holds several files to pick from, or diffusers'
            ``load_lora_weights`` reads another file of the repo (nothing downloaded).
    """
    inner = f"{subfolder}/" if subfolder else ""
    here = [name[len(inner) :] for name in files if name.startswith(inner) and "/" not in name[len(inner) :]]
    level = f"folder {shown(subfolder, 200)} of the repo" if subfolder else "the repo's top level"
    chosen = pick_weight(here, f"{where}: {level}")
    if chosen is not None:  # diffusers guesses from every file of the repo, and fetches it under subfolder
        theirs = inner + diffusers_guess(files)
        check_diffusers(inner + chosen, theirs if theirs in files else None, where)
    return [inner + name for name in here if name in (chosen, CONFIG_NAME)]


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

    inner = f"{subfolder}/" if subfolder else ""
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
        if type(exc) is LocalEntryNotFoundError:  # nothing cached: the listing's failure says why
            raise cause from None
        raise  # a cached snapshot missing files (IncompleteSnapshotError) says so itself
    _check_cached_pick(repo_id, revision, subfolder, root, cause)
    if need_config and _holds_safetensors(root / subfolder if subfolder else root):
        _check_cached_config(repo_id, revision, root, f"{inner}{CONFIG_NAME}", cause)
    return root


def _check_cached_pick(repo_id: str, revision: str | None, subfolder: str | None, root: Path, cause: Exception) -> None:
    """The file a read of the cache's snapshot ``root`` picks is the one a read through the Hub
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
    inner = f"{subfolder}/" if subfolder else ""
    level = f"folder {shown(subfolder, 200)} of the repo" if subfolder else "the repo's top level"
    try:
        names = os.listdir(root / subfolder if subfolder else root)
    except (OSError, ValueError):  # nothing there: the read says so
        return
    chosen = pick_weight(names, f"{_where(repo_id, revision)}: {level}")
    if chosen is None or chosen in WEIGHT_NAMES:
        return
    unknown = [name for name in WEIGHT_NAMES if not _known_absent(repo_id, root, inner + name)]
    if unknown:
        raise SourceNotFoundError(
            f"{_where(repo_id, revision)}: the local Hugging Face cache holds {shown(chosen, 200)} at {level}, and "
            f"cannot tell whether the repo has {' or '.join(unknown)} there, which a read picks first (the Hub was not "
            f"asked: {type(cause).__name__}: {_first_line(cause)}). Pass weight_name={shown(chosen, 200)} to read "
            "that file, or fetch the repo once while online."
        )


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
        f"{_where(repo_id, revision)}: cannot fetch {cut(name, 200)} from the Hub ({type(cause).__name__}: "
        f"{_first_line(cause)}), and without it the adapter's scale is unknown: the local Hugging Face cache holds "
        f"the weights, but neither the config nor a record that the repo has none. {_fix(cause)} Once fetched, the "
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
        if type(exc) is LocalEntryNotFoundError:  # not cached: why the Hub was not asked says more
            raise cause from None
        raise


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


#: failures of the HTTP client that mean the Hub was not reached (a proxy refusing is no such failure)
_NOT_REACHED = {
    f"{client}.{name}" for client in ("httpx", "httpx2") for name in ("ConnectError", "TimeoutException")
} | {"requests.ConnectionError", "requests.Timeout", "builtins.TimeoutError", "builtins.ConnectionError"}
_PROXY = {"httpx.ProxyError", "httpx2.ProxyError", "requests.ProxyError"}
_TIMEOUTS = {"httpx.TimeoutException", "httpx2.TimeoutException", "requests.Timeout", "builtins.TimeoutError"}


def _kinds(exc: Exception) -> set[str]:
    """``exc``'s classes as ``package.Name`` (``requests.exceptions.Timeout`` is ``requests.Timeout``)."""
    return {f"{c.__module__.partition('.')[0]}.{c.__name__}" for c in type(exc).__mro__}


def _unreached(exc: Exception) -> bool:
    """Whether ``exc`` says the Hub was not reached: offline, no connection, no answer in time."""
    kinds = _kinds(exc)
    return bool(kinds & _NOT_REACHED) and not kinds & _PROXY


def _where(repo_id: str, revision: str | None) -> str:
    """``repo_id@revision`` (``repo_id`` without a revision), cut for a message."""
    return cut(repo_id + (f"@{revision}" if revision else ""), 200)


def _fix(exc: Exception) -> str:
    """What to do about a failure of ``huggingface_hub``, by its cause (the first that applies)."""
    from huggingface_hub import constants, utils

    def caused_by(*names: str) -> bool:  # classes absent from an older huggingface_hub match nothing
        return isinstance(exc, tuple(c for c in (getattr(utils, n, None) for n in names) if isinstance(c, type)))

    if isinstance(exc, HubTimeout):
        return (
            "The Hub did not serve the request in time (a stalled connection, or a failure huggingface_hub kept "
            "retrying: no connection, a server error, a rate limit), and the local cache holds no copy: check the "
            f"network (a proxy, HF_ENDPOINT) and retry later, or raise {HUB_TIMEOUT_ENV} ({DEFAULT_HUB_TIMEOUT:g} s "
            "unless set) for a slow Hub; a copy in the local cache loads with HF_HUB_OFFLINE=1."
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    client = type(exc).__module__.partition(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
    if caused_by("GatedRepoError", "LocalTokenNotFoundError") or status in (401, 403):
        return (
            "The repo is gated or private, or the token was refused: log in (hf auth login) or pass token=, and "
            "accept the repo's conditions on its Hub page."
        )
    if caused_by("RepositoryNotFoundError", "DisabledRepoError"):
        return "No such repo on the Hub (or it is private or disabled): check the repo id, or pass token=."
    if caused_by("RevisionNotFoundError"):
        return "No such revision in the repo: check revision= (a branch, a tag or a full commit hash)."
    if caused_by("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        return (
            "It is not in the local Hugging Face cache, and the Hub was not asked (HF_HUB_OFFLINE=1) or not reached: "
            "fetch it once while online; the cache then serves it offline."
        )
    if caused_by("EntryNotFoundError"):
        return "The repo has no such file: check weight_name= and subfolder= against the repo's files."
    if status == 429:
        return "The Hub is limiting the rate of requests: wait and retry, or log in (hf auth login)."
    if isinstance(status, int) and status >= 500:
        return "The Hub failed to answer (a server error): retry later; a copy in the local cache loads offline."
    if _kinds(exc) & _TIMEOUTS:
        return (
            f"The Hub could not be reached: no answer within {constants.HF_HUB_ETAG_TIMEOUT} s to a request "
            f"(HF_HUB_ETAG_TIMEOUT) or {constants.HF_HUB_DOWNLOAD_TIMEOUT} s to a read of a download "
            "(HF_HUB_DOWNLOAD_TIMEOUT): check the network (a proxy, HF_ENDPOINT) and retry, or raise those timeouts "
            "for a slow link; a copy in the local cache loads with HF_HUB_OFFLINE=1."
        )
    if client or isinstance(exc, (TimeoutError, ConnectionError)):
        return (
            "The Hub could not be reached: check the network (a proxy, HF_ENDPOINT) and retry; a copy in the "
            "local cache loads with HF_HUB_OFFLINE=1."
        )
    if isinstance(exc, OSError):
        return "The local Hugging Face cache (HF_HUB_CACHE) cannot be read or written: check its free space and access."
    return "Check the repo id, revision and file names."


def _holds_safetensors(folder: Path) -> bool:
    """Whether ``folder`` has a ``*.safetensors`` entry at its top level (what a read picks from)."""
    try:
        return any(name.endswith(".safetensors") for name in os.listdir(folder))
    except (OSError, ValueError):  # not there: the snapshot brought nothing to it
        return False


def _nothing_to_read(
    repo_id: str, revision: str | None, subfolder: str | None, root: Path, listing: list[str] | None
) -> LoraError:
    """The error for a snapshot without a ``.safetensors`` file where the read looks, saying
    what the repo holds there: from ``listing`` (the Hub's), else the file listing
    ``huggingface_hub`` cached for the commit, else (offline) from what the local cache holds."""
    where, inner = _where(repo_id, revision), f"{subfolder}/" if subfolder else ""
    level = f"folder {shown(subfolder, 200)} of the repo" if subfolder else "the repo's top level"
    if listing is None:
        listing = _cached_listing(repo_id, root.name)
    if listing is not None:
        here = [p[len(inner) :] for p in listing if p.startswith(inner) and "/" not in p[len(inner) :]]
    else:
        try:
            here = os.listdir(root / subfolder if subfolder else root)
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


def _cached_listing(repo_id: str, commit: str) -> list[str] | None:
    """The repo's file paths at ``commit`` as ``huggingface_hub`` cached them, or None."""
    try:
        from huggingface_hub import get_cached_repo_tree

        return [f.path for f in get_cached_repo_tree(repo_id, revision=commit)]
    except Exception:  # an older huggingface_hub, or no listing cached (offline): nothing known
        return None


def _fetch_config(
    repo_id: str,
    subfolder: str | None,
    revision: str | None,
    token: str | bool | None,
    required: bool,
    stalled: HubTimeout | None = None,
) -> None:
    """Puts the config beside the weight file in the cache, if the repo has one; after
    ``stalled``, only looks in the cache.

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
            revision=revision,
            token=token,
            local_files_only=stalled is not None,
        )
    except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
        if not required or _known_missing(exc, repo_id, subfolder, revision):
            return  # an adapter without a config is fine (kohya, diffusers files)
        if stalled is not None and type(exc) is LocalEntryNotFoundError:  # not cached: the Hub did not answer
            exc = stalled
        name = cut(f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME, 200)
        raise SourceNotFoundError(
            f"{_where(repo_id, revision)}: cannot fetch {name} from the Hub ({type(exc).__name__}: "
            f"{_first_line(exc)}), and without it the adapter's scale is unknown. {_fix(exc)} Once fetched, the "
            "cache also records a config that does not exist. Or pass config={'r': ..., 'lora_alpha': ...}."
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
