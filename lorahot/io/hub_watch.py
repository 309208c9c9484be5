"""The bound on a Hub fetch as a whole (:func:`hub_timeout`), and the worker thread the caller
watches it on (:class:`_Watch`).

Online, a fetch is bounded as a whole by :func:`hub_timeout` (``LORAHOT_HUB_TIMEOUT``), not
only per request: ``hf_hub_download`` makes a file's metadata request again when it times out or
fails to connect and the file is not cached (60 s a try, up to 5 retries with backoff), and
waits out a rate limit's ``Retry-After``, so one stalled file held a load for minutes. The fetch
runs on a worker thread the caller watches (:class:`_Watch`); once it has waited that long
for the Hub with no step done and no download under way, the caller stops waiting and the cache
serves what it holds, as for a listing that timed out; with nothing cached the load fails naming
the limit. The abandoned worker lets the call of ``huggingface_hub`` under way finish or fail
(it writes only complete files to the cache), then stops: no further file, no record of the
files the repo lacks, and no branch's ref.
A caller interrupted while it waits (``KeyboardInterrupt``) abandons the worker the same way; a
ref the worker is writing then is written whole before the interrupt goes on.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorahot.errors import UsageError, shown

__all__ = ["HUB_TIMEOUT_ENV", "DEFAULT_HUB_TIMEOUT", "hub_timeout", "HubTimeout"]

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
    it stops at its next step, and writes no record and no branch's ref once the caller has
    stopped (:meth:`last`; ``huggingface_hub`` itself writes only complete files).
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
        """Called by the worker for its last writes into the cache (the records of the files the
        repo lacks, then a branch's ref): ``write()`` unless abandoned, under the lock the caller
        abandons it with, so that the writes end before the caller stops waiting, or never run.

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
