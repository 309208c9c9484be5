"""Which files of a cache entry's key the host cache cannot trust: those written too recently.

The host cache keys an entry by its files' stat (:func:`lorahot.io.identity.source_identity`)
and reads a file again once its key changed. A file's timestamps move in ticks, though: about
4 ms on Linux before 6.13 on many filesystems (the jiffy), 1 s on some network filesystems,
2 s on FAT. A rewrite of the same size within the tick of the stat that made the key keeps
the key, and the old adapter would be served. As git does for its index ("racy git"), a file
whose mtime or ctime lies within :data:`MARGIN_NS` of the moment its entry is recorded (or
after it) is *racy*: the entry keeps a digest of what the read saw (taken from the bytes the
read already had: :mod:`lorahot.io.digests`), and a load from the entry hashes the file again
and reads it anew unless the digest is the same. Files older than that keep the stat check
alone: a later write lands in a later tick, so it changes the key.

The margin is 2 s, the coarsest of those ticks (FAT's). It is taken against the clock just
before the read, which is earlier than the moment the entry is recorded, so every file that
is racy then is racy here too. A filesystem whose clock runs ahead of this machine's by more
than that (a network server) is beyond it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from lorahot.io import identity as identities
from lorahot.io.config import CONFIG_NAME
from lorahot.io.digests import UNKNOWN, digest_of, recording

if TYPE_CHECKING:
    from lorahot.runtime.cache import PreparedAdapter

__all__ = ["MARGIN_NS", "checked", "digests_of_read", "unchanged"]

#: how recent a file's mtime or ctime may be for its stat to stand for its content (see above)
MARGIN_NS = 2_000_000_000


def now_ns() -> int:
    """The clock racy files are judged by (``time.time_ns``, the clock file times follow)."""
    return time.time_ns()


@contextmanager
def digests_of_read(source: Any, read_kwargs: dict[str, Any]) -> Iterator[dict[str, bytes]]:
    """Around the read of ``source`` for a cache entry: yields ``{real path: digest}``, filled
    (once the block ends) for the racy files the read opened; files it did not open (an unread
    ``.safetensors`` beside the read one) are left out after the block, and a racy file no read
    of it opens (a Hub ref) is hashed now, before the read (a rewrite after that is a miss)."""
    files = identities.source_files(source, **read_kwargs)
    racy: list[str] = []
    now = now_ns()
    for path in files[1] if files is not None else ():
        try:
            real = os.path.realpath(path)
            st = identities.file_stat(real)
        except (OSError, ValueError):  # absent (its absence is in the key), or no path (a NUL): the read refuses it
            continue
        if max(st.st_mtime_ns, st.st_ctime_ns) > now - MARGIN_NS:
            racy.append(real)
    with recording(racy) as found:
        for real in racy:
            if not real.lower().endswith(".safetensors") and os.path.basename(real) != CONFIG_NAME:
                found[real] = _digest(real) or UNKNOWN  # a Hub ref: a few bytes the read does not hand over
        result: dict[str, bytes] = {}
        yield result
    result.update((path, digest) for path, digest in found.items() if digest is not None)


def checked(entry: PreparedAdapter) -> PreparedAdapter | None:
    """``entry`` if its racy files still hold what it was read from, else None (a miss). Once
    their timestamps are older than the margin by the clock read before they are hashed, a
    match settles the entry: it drops its digests and later loads take the stat check alone,
    since a write from then on lands in a later tick and changes the key (as git's index
    stops being racy once rewritten). Without that, an adapter preloaded right after it was
    written would have its files hashed at every load for as long as it stays cached."""
    now = now_ns()
    settled = all(_older(path, now) for path, _ in entry.racy)
    if not unchanged(entry.racy):
        return None
    if settled:
        object.__setattr__(entry, "racy", ())  # (a frozen dataclass: the one field that may settle)
    return entry


def _older(path: str, now: int) -> bool:
    """Whether ``path``'s mtime and ctime lie before the margin by the clock ``now``."""
    try:
        st = identities.file_stat(path)
    except (OSError, ValueError):
        return False
    return max(st.st_mtime_ns, st.st_ctime_ns) <= now - MARGIN_NS


def unchanged(digests: tuple[tuple[str, bytes], ...]) -> bool:
    """Whether every file of ``digests`` still holds what its entry was read from."""
    return all(_digest(path) == digest for path, digest in digests)


def _digest(path: str) -> bytes | None:
    try:
        return digest_of(path)
    except Exception:  # unreadable now, or not what a read takes: changed (a read says what is wrong)
        return None
