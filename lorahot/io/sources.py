"""Opening an adapter source: a directory, a ``.safetensors`` file or a mapping of tensors.

Only safetensors is ever read; nothing is unpickled. What comes out is the raw tensors, the
``adapter_config.json`` if there is one, and the safetensors header metadata. Only regular files
are opened (:func:`lorahot.io.safety.regular_file`): a FIFO, device or directory where the
weights or the config should be is refused, never waited on, and a config that is there but
unreadable is an error, never silently skipped. A path the system cannot even look up (too
long, no permission) is a :class:`~lorahot.errors.SourceNotFoundError` naming it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Union

import torch

from lorahot.adapter import detached
from lorahot.errors import AdapterReadError, LoraError, SourceNotFoundError, UsageError, long_name, one_line, shown
from lorahot.io.config import CONFIG_NAME
from lorahot.io.digests import note_config
from lorahot.io.dtypes import widened_all
from lorahot.io.hub import check_relative, fetch
from lorahot.io.plain import plain
from lorahot.io.safety import (
    PICKLE_SUFFIXES,
    SafetensorsHeader,
    check_safetensors,
    cut,
    file_kind,
    path_error,
    read_json_file,
    regular_file,
)
from lorahot.io.tensorfile import file_stamp, read_tensors, refuse_oversized
from lorahot.io.weight_names import WEIGHT_NAMES, check_diffusers, diffusers_guess, pick_weight

__all__ = ["RawAdapter", "Source", "open_source", "read_safetensors", "read_config"]

Source = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]


@dataclass
class RawAdapter:
    """Tensors and side information exactly as the source holds them."""

    tensors: dict[str, torch.Tensor]
    source: str
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    config_path: str | None = None  # the config file, for messages
    dense: bool = False  # every tensor is a dense view of data read from a file (no check needed)
    shapes_only: bool = False  # read onto the meta device: shapes and dtypes from the header, no values
    header: tuple[bytes, int] | None = None  # a file's SafetensorsHeader.identity: its keys, shapes, dtypes
    stored_dtypes: dict[str, torch.dtype] = field(default_factory=dict)  # of the tensors widened (float8), by key


def open_source(
    source: Source,
    *,
    weight_name: str | None = None,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    device: torch.device | None = None,
    need_config: bool = True,
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
        need_config: False when the caller supplies the config, so a Hub config that cannot be
            fetched is no error.

    Raises:
        UsageError: ``source`` is not a path, repo id or mapping, or is empty; a Hub argument
            of the wrong type.
        SourceNotFoundError: the path or repo does not exist, cannot be looked up, or holds no
            adapter; a malformed repo id, or ``subfolder``/``weight_name`` leaving the source.
        AdapterReadError: the file is a pickle checkpoint, not a regular file, or damaged.
    """
    weight_name = check_relative(weight_name, "weight_name")
    subfolder = check_relative(subfolder, "subfolder", folder=True)
    if isinstance(source, Mapping):
        return _from_mapping(source)
    text = _source_text(source)
    path = Path(text)
    if _mode(path) is not None:
        _check_local_args(text, path, revision, token, weight_name)
        return _from_path(path / subfolder if subfolder else path, weight_name, device, (path, subfolder))
    if _looks_local(text) or not isinstance(source, str):  # a path object never names a repo
        raise SourceNotFoundError(f"{cut(text)}: no such file or directory. {_missing_fix(text)}")
    _check_hub_args(revision, token, weight_name)
    fetched = fetch(
        text, revision=revision, subfolder=subfolder, token=token, weight_name=weight_name, need_config=need_config
    )
    where = f"{text}{'@' + revision if revision else ''}"
    try:
        raw = _from_path(fetched, None, device)
    except LoraError as exc:  # a file of the cache's copy: the message names the repo it came from
        raise type(exc)(f"{where}: {exc}") from None
    inside = PurePosixPath(*(p for p in (subfolder, weight_name or Path(raw.source).name) if p))
    raw.source = one_line(f"{where}/{inside}")
    if raw.config_path is not None:  # named as the repo's file, as the weights are
        raw.config_path = f"{where}/{inside.parent / CONFIG_NAME}".replace("/./", "/")
    return raw


def _missing_fix(text: str) -> str:
    """What to do about a local path that does not exist: a leading ``~`` is not expanded (as
    ``open()``, PEFT's and diffusers' loaders leave it), so that is named with its expansion."""
    expanded = os.path.expanduser(text) if text.startswith("~") else text
    if expanded != text:
        return (
            f"'~' is not expanded (as open() does not): pass os.path.expanduser({shown(text, 200)}), which is "
            f"{cut(expanded, 200)}."
        )
    return "Pass an adapter directory, a .safetensors file, a Hub repo id or a mapping of tensors."


def _source_text(source: Any) -> str:
    """``source`` as a path string, refusing what cannot name an adapter."""
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError(
            f"source={shown(source)} must be a path, a Hub repo id, a mapping of tensors or a lorahot.Adapter."
        )
    try:
        text = os.fspath(source)
    except Exception as exc:  # the caller's __fspath__: returning neither str nor bytes, or raising
        raise UsageError(f"source={shown(source)} is not a usable path: {type(exc).__name__}: {exc}") from None
    if not isinstance(text, str):
        raise UsageError(f"source={shown(source)} must be a str path, not {type(text).__name__}.")
    if not text.strip():
        raise UsageError(
            f"source={shown(text, 200)} is empty. Pass an adapter directory ('.' for the current one), a "
            ".safetensors file, a Hub repo id or a mapping of tensors."
        )
    return text


def _check_local_args(text: str, path: Path, revision: Any, token: Any, weight_name: str | None) -> None:
    """A local path takes no Hub option, and a file no ``weight_name``: given one, the caller
    may have meant something else (a repo id spelled like a local folder), so it is refused
    rather than dropped."""
    given = [name for name, value in (("revision", revision), ("token", token)) if value is not None]
    if given:
        raise UsageError(
            f"{cut(text)} is a local path, so {' and '.join(f'{n}=' for n in given)} (Hub options) cannot apply. To "
            f"read the Hub repo of that name, move or rename the local {cut(str(path), 100)}; to read the local "
            f"one, drop {'them' if len(given) > 1 else 'it'}."
        )
    if weight_name is not None and not path.is_dir():
        raise UsageError(
            f"{cut(text)} is a file, so weight_name={shown(weight_name, 200)} (a file inside a directory or repo) "
            "cannot apply. Pass the directory with weight_name=, or the file alone."
        )


def _check_hub_args(revision: Any, token: Any, weight_name: str | None) -> None:
    """The Hub arguments before any request: ``revision`` a branch, tag or commit name that
    cannot leave the cache (``huggingface_hub`` joins it onto paths in its cache: ``..`` there
    read and wrote files outside it, found by an independent audit), and no pickle asked for
    by ``weight_name`` (refused before it is downloaded, not after)."""
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise UsageError(f"revision={shown(revision)} must be a branch, tag or commit name.")
    if revision is not None and (
        revision.startswith("/")
        or "\\" in revision
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in revision)
        or any(part in ("", ".", "..") for part in revision.split("/"))
    ):
        raise UsageError(
            f"revision={shown(revision)} must be a branch, tag or commit name (like 'main', 'v1.0', 'refs/pr/1' or a "
            "commit hash): no '..' or '.' parts, no leading '/', no backslashes or control characters."
        )
    if token is not None and not isinstance(token, (str, bool)):
        raise UsageError(f"token must be a string, True, False or None, not {type(token).__name__}.")
    if weight_name is not None and PurePosixPath(weight_name).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterReadError(
            f"weight_name={shown(weight_name)}: {PurePosixPath(weight_name).suffix} files are pickles, and lorahot "
            "never unpickles (nor downloads them). Load a .safetensors file of the repo, or convert it "
            "(safetensors.torch.save_file)."
        )
    if weight_name is not None and not weight_name.lower().endswith(".safetensors"):
        raise UsageError(
            f"weight_name={shown(weight_name)} is not a .safetensors file; lorahot reads (and downloads) only "
            "safetensors adapters. Pick the repo's .safetensors file."
        )


def _mode(path: Path) -> int | None:
    """``st_mode`` of ``path`` (symlinks followed), or None if it does not exist.

    Raises:
        SourceNotFoundError: the path cannot be looked up (name too long, no permission, ...).
    """
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise path_error(path, "adapter path", exc) from None


def _looks_local(text: str) -> bool:
    """True for strings that can only mean a local path (not a repo id)."""
    return (
        text.startswith(("/", ".", "~"))
        or text.lower().endswith((".safetensors", *PICKLE_SUFFIXES))
        or os.sep + os.sep in text
    )


def _from_path(
    path: Path,
    weight_name: str | None,
    device: torch.device | None = None,
    local: tuple[Path, str | None] | None = None,
) -> RawAdapter:
    """The adapter at ``path``; ``local``: the directory the caller named and its ``subfolder``
    (None for a Hub repo's snapshot, whose pick was made from the Hub's listing)."""
    mode = _mode(path)
    if mode is None:
        raise SourceNotFoundError(f"{cut(str(path))}: no such file or directory. Check subfolder= and the path.")
    if stat.S_ISDIR(mode):
        chosen = _weight_file(path, weight_name)
        if local is not None:
            _check_diffusers_local(chosen, *local, weight_name)
        return _from_file(chosen, device)
    if stat.S_ISREG(mode):
        return _from_file(path, device)
    raise SourceNotFoundError(
        f"{cut(str(path))}: is {file_kind(mode)}, not an adapter file or directory. Pass a .safetensors file or a "
        "directory."
    )


def _from_mapping(source: Mapping[str, Any]) -> RawAdapter:
    """The mapping's tensors, detached (a tensor that requires grad is read as its value), as
    plain tensors (:func:`~lorahot.adapter.detached`: nothing of a subclass runs once read),
    keyed by plain strings (:func:`~lorahot.io.plain.plain`: a key of a ``str`` subclass kept in
    lorahot's memos would run its ``__eq__`` in every later read of that name)."""
    source = plain(source, "source", "a dict of tensors keyed by name")
    bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise AdapterReadError(
            f"<mapping>: entries {shown(bad[:5], 200)} are not str -> torch.Tensor. Pass a dict of tensors keyed by "
            "name."
        )
    for key in source:
        if (problem := long_name(key)) is not None:
            raise AdapterReadError(f"<mapping>: key {shown(key)} {problem}. Pass the adapter's module keys.")
    refuse_oversized("<mapping>", ((k, v.shape) for k, v in source.items()), "tensors were not copied")
    tensors, stored = widened_all({k: detached(v) for k, v in source.items()})
    return RawAdapter(tensors, "<mapping>", stored_dtypes=stored)


def _weight_file(directory: Path, weight_name: str | None) -> Path:
    if weight_name is not None:
        candidate = directory / weight_name
        if _mode(candidate) is None:
            raise SourceNotFoundError(
                f"{cut(str(candidate))}: weight_name={shown(weight_name, 200)} does not exist in {cut(str(directory))}."
            )
        return candidate  # opening it refuses anything but a regular file
    names = _listdir(directory)
    chosen = pick_weight(names, cut(str(directory)))
    if chosen is not None:
        return directory / chosen
    pickles = sorted(n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterReadError(
            f"{cut(str(directory))}: holds only pickle checkpoints ({cut(', '.join(pickles))}); lorahot never "
            "unpickles. Convert them to .safetensors (safetensors.torch.save_file) and load that."
        )
    raise SourceNotFoundError(
        f"{cut(str(directory))}: no adapter weights found (looked for {', '.join(WEIGHT_NAMES)} or a single "
        "*.safetensors)."
    )


def _check_diffusers_local(chosen: Path, root: Path, subfolder: str | None, weight_name: str | None) -> None:
    """Refuses the pick ``chosen`` where diffusers' ``load_lora_weights`` reads another file of
    the directory ``root`` (:func:`~lorahot.io.weight_names.check_diffusers`). It asks for
    ``weight_name``, else its guess from ``root``'s own entries (not ``subfolder``'s), and reads it
    in ``root`` where ``os.path.isfile`` finds it there, else in ``subfolder``: a file of that name
    above ``subfolder=`` is what it reads."""
    guess = weight_name or diffusers_guess(_listdir(root))
    places = (guess, f"{subfolder}/{guess}") if subfolder else (guess,)
    theirs = next((p for p in places if os.path.isfile(root / p)), None)
    mine = chosen.relative_to(root).as_posix()
    if subfolder and theirs == guess:  # above the subfolder: naming the file does not help
        why = "it opens a file of that name in the directory before subfolder="
        fix = f"pass the folder itself, {cut(str(root / subfolder), 200)}, as the source"
        check_diffusers(mine, theirs, cut(str(root)), why, fix)
    elif weight_name is None:
        check_diffusers(mine, theirs, cut(str(root)))


def _present(path: Path) -> bool:
    """Whether a directory entry of that name exists (of any kind, even a dangling symlink)."""
    try:
        os.lstat(path)
        return True
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        raise path_error(path, "adapter file", exc) from None


def _listdir(directory: Path) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError as exc:
        raise path_error(directory, "adapter directory", exc) from None


def _from_file(path: Path, device: torch.device | None = None) -> RawAdapter:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterReadError(
            f"{path}: {path.suffix} files are pickles, and lorahot never unpickles. Convert it to .safetensors "
            "(safetensors.torch.save_file) and load that."
        )
    tensors, header = read_safetensors(path, device)
    tensors, stored = widened_all(tensors)  # float8 files: each value as float32, exactly
    config_path = path.parent / CONFIG_NAME
    config = read_config(config_path)
    note_config(config_path, config)  # for the host cache's recent files (lorahot.io.digests)
    config_file = str(config_path) if config is not None else None
    shapes_only = device is not None and device.type == "meta"
    label = one_line(str(path))  # a source is named in messages
    return RawAdapter(tensors, label, config, header.metadata, config_file, True, shapes_only, header.identity, stored)


def read_safetensors(
    path: Path, device: torch.device | None = None
) -> tuple[dict[str, torch.Tensor], SafetensorsHeader]:
    """All tensors (on ``device``, default the CPU) and the checked header (its metadata and
    identity) of a safetensors file.

    The file is opened once (a regular file, else :class:`AdapterReadError`); its header is
    checked first (:func:`lorahot.io.safety.check_safetensors`), then the data is read from the
    same descriptor in one pass (:func:`lorahot.io.tensorfile.read_tensors`).
    """
    with regular_file(path, "safetensors file") as fd:
        stamp = file_stamp(fd, path)  # a write from here to the end of the data read is refused
        header = check_safetensors(path, fd)  # refuses damaged or hostile headers before anything is allocated
        return read_tensors(path, header, device, fd, stamp=stamp), header


def read_config(path: Path) -> dict[str, Any] | None:
    """``adapter_config.json`` as a dict, or None when there is none.

    Raises:
        AdapterReadError: the entry exists but is not a readable regular file with a JSON object
            (a FIFO, a directory, a dangling symlink, malformed JSON, ...).
    """
    if not _present(path):
        return None
    if _mode(path) is None:
        raise AdapterReadError(f"{cut(str(path))}: is a dangling symlink. Fix or delete it.")
    config = read_json_file(path)  # regular files only; size-capped; malformed JSON raises AdapterReadError
    if not isinstance(config, dict):
        raise AdapterReadError(f"{path}: the adapter config must be a JSON object, got {type(config).__name__}.")
    return config
