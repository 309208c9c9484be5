"""The identity of an adapter source: which bytes a read of it would see, from ``stat`` alone.

The host cache keys prepared adapters by it, so that one file reached by two spellings (a
relative and an absolute path, a symlink) is one entry, and a file rewritten since it was
preloaded is read again instead of served stale. Nothing here opens a file or reads data.

- a local file: its real path, size, mtime_ns, ctime_ns and inode, and the same for the
  ``adapter_config.json`` beside it (or its absence);
- a local directory (after ``subfolder``): every ``*.safetensors`` in it (or only
  ``weight_name``) and each ``adapter_config.json`` a read would consult, as above;
- a Hub repo id (a ``str``; a path object always names a local path): the id with
  ``revision``, ``subfolder`` and ``weight_name``, and (unless the
  revision is a commit hash) the stat of the local Hugging Face cache's ref for that revision,
  which a download of a newer commit rewrites. No network call: a branch that moved on the Hub
  is seen once something downloads it (a read with ``revision=`` of the new commit, or
  ``huggingface_hub``);
- a mapping, an :class:`~lorahot.Adapter`, or a source that cannot be found: None.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lorahot.io.config import CONFIG_NAME
from lorahot.io.hub import cache_folder, check_relative, is_repo_id

__all__ = ["source_identity", "source_files", "file_stat"]


def source_identity(
    source: Any,
    *,
    revision: Any = None,
    subfolder: Any = None,
    weight_name: Any = None,
    **read_kwargs: Any,
) -> str | None:
    """A string equal for two sources exactly when a read of them would see the same files.

    Args:
        source: what :func:`lorahot.read_adapter` takes.
        revision, subfolder, weight_name: as for :func:`lorahot.read_adapter`.
        read_kwargs: the other read options; they do not change which files are read and are
            ignored here (the cache adds the ones that change the result).

    Returns:
        The identity, or None where there is none (in-memory sources, a path that does not
        exist and is no repo id, options a read would refuse). Never raises.
    """
    found = source_files(source, revision=revision, subfolder=subfolder, weight_name=weight_name)
    if found is None:
        return None
    head, files = found
    try:  # a path a stat refuses (a NUL byte in a Hub revision) names no file here either
        return head + ";".join(_stat(f) for f in files)
    except Exception:
        return None


def source_files(
    source: Any, *, revision: Any = None, subfolder: Any = None, weight_name: Any = None, **read_kwargs: Any
) -> tuple[str, list[Path]] | None:
    """The files whose stat :func:`source_identity` takes (weights, configs, a Hub ref), after
    the part of the identity that names the source; None where it has no identity. Never raises."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        text = os.fspath(source)
        if not isinstance(text, str) or not text or "\x00" in text:
            return None
        # as the read takes them ('x/' is folder x); one it refuses raises here: no identity
        subfolder = check_relative(subfolder, "subfolder", folder=True)
        weight_name = check_relative(weight_name, "weight_name")
        path = Path(text)
        if path.exists():
            found = _local(path / subfolder if subfolder else path, weight_name)
            if found is not None and subfolder and path.is_dir():
                # the read checks its pick against diffusers', which opens weight_name, or its guess from
                # path's own entries, in path first
                above = [path / weight_name] if weight_name else sorted(path.glob("*.safetensors"))
                found = found[0], [*found[1], *above]
            return found
    except Exception:  # OSError, a bad path, or the caller's __fspath__ raising: no identity
        return None
    if (
        isinstance(source, str)
        and is_repo_id(text)
        and all(v is None or isinstance(v, str) for v in (revision, subfolder, weight_name))
    ):
        # JSON, not a join: a '|' or '=' inside a name cannot make two sources one key
        key = "hub:" + json.dumps([text, revision or "", subfolder or "", weight_name or ""])
        if _COMMIT.fullmatch(revision or ""):
            return key, []
        try:
            return f"{key}|", [_hub_ref(text, revision or "main")]
        except Exception:
            return None
    return None


#: a Hub commit hash: what it names never changes
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _hub_ref(repo_id: str, revision: str) -> Path:
    """The local Hugging Face cache's file naming the commit ``revision`` of model ``repo_id``
    was last resolved to (a fetch of a newer one rewrites it)."""
    return cache_folder(repo_id) / "refs" / revision


def _local(path: Path, weight_name: str | None) -> tuple[str, list[Path]] | None:
    """``file:<real path>``, and every file a read of ``path`` could open."""
    if path.is_dir():
        weights = [path / weight_name] if weight_name else sorted(path.glob("*.safetensors"))
    elif path.is_file():
        weights = [path]
    else:
        return None
    configs = sorted({w.parent / CONFIG_NAME for w in weights} or {path / CONFIG_NAME})
    return f"file:{os.path.realpath(path)}|weight_name={weight_name or ''}|", [*weights, *configs]


def _stat(path: Path) -> str:
    """``<real path>:<size>:<mtime_ns>:<ctime_ns>:<inode>``, or ``<real path>:-`` if absent."""
    real = os.path.realpath(path)
    try:
        st = file_stat(real)
    except OSError:
        return f"{real}:-"
    return f"{real}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def file_stat(path: str) -> os.stat_result:
    """``os.stat(path)``: the one stat the host cache's keys, and its check of which of them to
    trust (:mod:`lorahot.runtime.racy`), take."""
    return os.stat(path)
