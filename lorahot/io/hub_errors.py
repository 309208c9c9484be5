"""What a failure of ``huggingface_hub`` in a Hub fetch means, and what to do about it.

Every failure of ``huggingface_hub`` is one typed error naming the repo, the revision and the
file, with the fix for its cause (:func:`_fix`: log in for a gated or private repo, go online
once for a file not cached, retry for a rate limit or a server error, ...). The cause is the
failure the error was raised over where ``huggingface_hub`` only relays it (:func:`_cause`):
``hf_hub_download`` reports a file's metadata request refused (403), failed (a server error, a
rate limit, no connection) or answered without the file's metadata as "not in the local cache"
(``LocalEntryNotFoundError``), the real failure its ``__cause__``.
Whether a failure means the Hub was not reached (then the cache serves what it holds) is
:func:`_unreached`; whether it is the Hub's "no such file" for a config, :func:`_known_missing`.
"""

from __future__ import annotations

from lorahot.io.config import CONFIG_NAME
from lorahot.io.hub_listing import _Level
from lorahot.io.hub_watch import DEFAULT_HUB_TIMEOUT, HUB_TIMEOUT_ENV, HubTimeout
from lorahot.io.safety import cut

__all__: list[str] = []  # helpers of lorahot.io.hub and its parts

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
    kinds = _kinds(_cause(exc))
    return bool(kinds & _NOT_REACHED) and not kinds & _PROXY


def _where(repo_id: str, revision: str | None) -> str:
    """``repo_id@revision`` (``repo_id`` without a revision), cut for a message."""
    return cut(repo_id + (f"@{revision}" if revision else ""), 200)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the failures it was raised over (``__cause__``, else ``__context__`` unless
    suppressed), outermost first, each once."""
    links: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and all(link is not seen for seen in links):
        links.append(link)
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    return links


def _cause(exc: Exception) -> Exception:
    """The failure ``exc`` stands for: the first link of its chain (:func:`_chain`) that has a fix
    of its own (:func:`_fix_of`) and is not ``huggingface_hub``'s "cannot find the file, and it is
    not in the local cache" relaying such a link beneath it (``hf_hub_download`` raises that over
    a 403, a server error, a rate limit, a connection error, an answer without the file's
    metadata); ``exc`` itself where no link has one."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    links = [link for link in _chain(exc) if isinstance(link, Exception)]
    for at, link in enumerate(links):
        relay = type(link) is LocalEntryNotFoundError and any(_fix_of(below) for below in links[at + 1 :])
        if not relay and _fix_of(link) is not None:
            return link
    return exc


def _failure(exc: Exception) -> str:
    """``Type: first line`` of the failure ``exc`` stands for (:func:`_cause`), for a message."""
    cause = _cause(exc)
    return f"{type(cause).__name__}: {_first_line(cause)}"


def _fix(exc: Exception) -> str:
    """What to do about a failure of ``huggingface_hub``, by its cause (:func:`_cause`)."""
    return _fix_of(_cause(exc)) or "Check the repo id, revision and file names."


def _fix_of(exc: Exception) -> str | None:
    """What to do about the failure ``exc`` itself (the first rule that applies), or None where
    no rule does."""
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
    if caused_by("FileMetadataError"):
        return (
            "The Hub's answer lacked the file's metadata (its ETag or commit): a proxy or mirror (HF_ENDPOINT) in "
            "the way changes the Hub's answers: check it, or fetch the file without it."
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
    if isinstance(status, int) and caused_by("HfHubHTTPError"):  # another answer of the Hub (it is an OSError)
        return (
            f"The Hub refused the request (HTTP {status}): check the repo id, revision and file names, and "
            "HF_ENDPOINT where it is set."
        )
    if isinstance(exc, OSError):
        return "The local Hugging Face cache (HF_HUB_CACHE) cannot be read or written: check its free space and access."
    return None


def _known_missing(exc: Exception, repo_id: str, subfolder: str | None, revision: str | None) -> bool:
    """True when ``exc`` is the Hub saying the file does not exist, now or as cached (``.no_exist``).

    ``LocalEntryNotFoundError`` (offline, not cached) subclasses ``EntryNotFoundError`` but says
    nothing about the Hub, so it counts only if the cache recorded the file as missing.
    """
    from huggingface_hub import _CACHED_NO_EXIST, try_to_load_from_cache
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    if not isinstance(exc, LocalEntryNotFoundError):
        return isinstance(exc, EntryNotFoundError)
    name = _Level(subfolder).inner + CONFIG_NAME
    try:
        return try_to_load_from_cache(repo_id, name, revision=revision) is _CACHED_NO_EXIST
    except Exception:  # a cache it cannot read records nothing
        return False


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return cut(text[0], 300) if text else ""
