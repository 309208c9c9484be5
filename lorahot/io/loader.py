"""``read_adapter``: any supported source, in any supported naming, to an :class:`Adapter`.

The steps are: check the call, open the source (:mod:`lorahot.io.sources`, :mod:`lorahot.io.hub`),
parse its configs (refusing features lorahot does not load), detect the naming
(:mod:`lorahot.formats`), group tensors by module and role, take the LyCORIS and diff modules
out (:class:`~lorahot.adapter.WeightModule`, folded in merged mode, with a ``dora_scale`` where
they have one, and a LoRA/LoCon whose ``dora_scale`` is per input channel), check each other
LoRA/LoCon module's ``dora_scale`` (its DoRA magnitude, at scale 1 only), give each module its alpha (a
``.alpha`` tensor, else the config, else the rank), then apply the user's ``prefix``,
``key_map``, ``split`` and ``fuse``. With ``strict=False`` a module with a key lorahot refuses,
or one it cannot build, is skipped whole, every key of it listed in
:attr:`~lorahot.adapter.Adapter.skipped`. Matching module keys to the model's layers happens at
load time (:mod:`lorahot.resolve.keys`), where the model's names are known.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch

from lorahot.adapter import ROTATION_KINDS, Adapter, LoraModule, WeightModule, detached, storage_problem
from lorahot.errors import (
    AdapterMismatchError,
    AdapterReadError,
    LoraError,
    UnknownFormatError,
    UsageError,
    format_problems,
    lines,
    long_name,
    message,
    one_line,
    public_api,
    shown,
)
from lorahot.formats import FORMATS, KeyFormat, ModelNames, format_named, group_keys, read_as
from lorahot.formats.diffusers import METADATA_KEY
from lorahot.formats.kohya import KOHYA_OFT
from lorahot.formats.table import GLORA_FACTORS, Parts, skip_modules
from lorahot.io.config import CONFIG_NAME, PEFT_DEFAULT_R, AdapterConfig, finite
from lorahot.io.patterns import budget_problem
from lorahot.io.plain import plain
from lorahot.io.safety import MAX_METADATA_BYTES, cut, parse_json
from lorahot.io.scoped import scoped
from lorahot.io.selection import SELECTION_FIELDS
from lorahot.io.sources import RawAdapter, Source, open_source
from lorahot.io.tensorfile import refuse_oversized
from lorahot.memo import BoundedMemo
from lorahot.resolve.keys import COMPONENT_NAMES
from lorahot.resolve.split import SplitSpec, split_by_user
from lorahot.resolve.user_map import Fuse, apply_key_map, fuse_modules, keys_under, select_prefix

__all__ = ["read_adapter", "checked_adapter", "reading_for", "loading_into"]


@public_api
def read_adapter(
    source: Source | Adapter,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    weight_name: str | None = None,
    config: Mapping[str, Any] | None = None,
    prefix: str | None = None,
    key_map: Mapping[str, str] | None = None,
    fuse: Fuse | None = None,
    split: SplitSpec | None = None,
    device: str | torch.device | None = None,
    strict: bool = True,
    _recipe: list[object] | None = None,
    _fits: Callable[[Adapter], None] | None = None,
) -> Adapter:
    """Reads an adapter in any supported naming and normalizes it.

    Args:
        source: a directory, a ``.safetensors`` file, a Hub repo id (``"owner/name"``), a
            mapping of tensors, or an :class:`Adapter` (``prefix``/``key_map``/``fuse`` still
            apply). Pickle files (``.bin``, ``.pt``, ``.ckpt``) are refused.
        revision: Hub branch, tag or commit.
        subfolder: the folder inside the directory or repo that holds the adapter.
        token: Hub token (default: ``huggingface_hub``'s own login).
        weight_name: the weight file inside the directory or repo, if not a usual name.
        config: PEFT config fields (``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
            ``use_rslora``, ...) used when the source has none, or overriding it. With it, a Hub
            config that cannot be fetched is no error.
        prefix: keep only modules under this component (``"unet"``, ``"text_encoder"``,
            ``"lora_te1"``) and strip it; it matches whole name components only
            (``"text_encoder"`` does not select ``text_encoder_2``).
        key_map: ``{regex: replacement}`` renaming module keys to the model's module names.
        fuse: ``{fused: [part, ...]}`` merging part LoRAs into a fused projection, e.g.
            ``{"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``; a part the adapter lacks can be
            given as ``(name, out_features)`` and is filled with zeros.
        split: ``{fused: [(part, out_features), ...]}`` placing a LoRA trained on a fused
            projection onto the model's separate layers (the reverse of ``fuse``), e.g.
            ``{"qkv": [("to_q", 3072), ("to_k", 3072), ("to_v", 3072)]}``: A goes to every part,
            B's rows are cut by the sizes, in order (they must add up to B's rows); a
            block-sparse B (zero outside its diagonal blocks) gives each part its chunk of A.
            A weight delta (LoHa, LoKr, a diff; merged mode) gives each part its rows of ``ΔW``.
            The Flux namings split their fused modules without it.
        device: where tensors read from files land (default: the CPU). ``runtime.load``
            passes its buffers' device, so a GPU receives a file in one transfer. ``"meta"``
            reads only the safetensors header and the config: A and B are meta tensors of the
            file's shapes (ranks, dtypes, no values), and a ``.alpha`` tensor's value is not
            read (alpha comes from the config, else the rank). :func:`lorahot.plan_targets`
            reads this way.
        strict: refuse the whole file for one key that cannot be loaded (the default). With
            ``False``, keys of no known naming, refused features (LyCORIS, DoRA, ...) and a
            module's A without its B are left out and listed in :attr:`Adapter.skipped`.

    The tensors' values are not checked here (beyond an ``.alpha``'s): ``runtime.load`` and
    ``runtime.preload`` refuse NaN, Inf and non-float A and B, whatever ``strict``, in one
    batched pass on the buffers' device. To vet a file without a model, load it into a runtime
    injected for it (:func:`lorahot.plan_targets`).

    ``_recipe`` serves the runtime:
    a list that receives the recipe the adapter was assembled from (see :class:`_Recipe`), when
    it was and no renaming option changed it; the same recipe means the same structure.
    ``_fits`` too: it is given the adapter as read from the header alone (meta tensors,
    ``prefix`` and ``key_map`` applied; not with ``fuse`` or ``split``, which need the values)
    the first time lorahot reads a local file's header, and raises where the adapter cannot
    fit, so that such a file is refused before its data is read.

    Returns:
        The adapter: per module key, ``A [r, in...]``, ``B [out, r/g, ...]``, alpha and
        rsLoRA flag (so the scale), the base-weight copy if the file has one, the detected
        format and the source.

    Raises:
        lorahot.LoraError: a subclass saying what is wrong with the source and how to fix it.
    """
    config, key_map, fuse, split = (  # read once, as plain data: nothing of the caller's runs later
        None if value is None else plain(value, name)
        for name, value in (("config", config), ("key_map", key_map), ("fuse", fuse), ("split", split))
    )
    overrides = _check_overrides(config)
    if not isinstance(strict, bool):
        raise UsageError(f"strict={shown(strict, 40)} must be True or False.")
    if isinstance(source, Adapter):
        adapter = checked_adapter(source)
        return _user_mapping(adapter, prefix, key_map, fuse, split)
    loads = _LOADS.get()
    partial = None if loads is None else functools.partial(_mapped_loads, loads, (prefix, key_map, fuse, split))
    with scoped(_PARTIAL, partial):
        target = _device(device)
        if overrides is None and (target is None or target.type != "meta"):
            meta = _structure_first(source, weight_name, subfolder, revision, token, strict)
            if meta is not None and _fits is not None and fuse is None and split is None:  # those need values
                _fits(_user_mapping(meta, prefix, key_map, None, None))
        raw = open_source(
            source,
            weight_name=weight_name,
            subfolder=subfolder,
            revision=revision,
            token=token,
            device=target,
            need_config=overrides is None,
        )
        adapter, recipe = _normalize(raw, overrides, strict)
        if _recipe is not None and recipe is not None and (prefix, key_map, fuse, split) == (None, None, None, None):
            _recipe.append(recipe)
    return _user_mapping(adapter, prefix, key_map, fuse, split)


def _check_overrides(config: Any) -> dict[str, Any] | None:
    """``config=`` as a dict, after checking it on its own (its problems are the caller's)."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise UsageError(
            f"config= must be a mapping of PEFT config fields such as {{'r': 8, 'lora_alpha': 16}}, got "
            f"{type(config).__name__}."
        )
    _, problems = AdapterConfig.parse(config)
    if problems:
        raise UsageError("config=: " + "; ".join(problems) + ". Fix the config= argument.")
    return dict(config)


def checked_adapter(adapter: Adapter) -> Adapter:
    """An :class:`Adapter` built by the caller, after checking its structure.

    Raises:
        UsageError: ``modules`` is not a dict of str to :class:`LoraModule` whose A, B (and
            base weight, if any) are tensors and whose alpha is a real number, or ``config``
            is not a dict; every problem is listed.
    """
    modules: object = adapter.modules  # typed as a dict, but built by the caller
    config: object = adapter.config
    if not isinstance(modules, dict) or not isinstance(config, dict):
        problems = [f"Adapter.modules is a {type(modules).__name__}, Adapter.config a {type(config).__name__}"]
    else:
        problems = [f"{shown(key, 80)}: {what}" for key, m in modules.items() for what in _malformed(key, m)]
    problems += _malformed_fields(adapter)
    if problems:
        raise UsageError(
            lines(
                format_problems(f"{_named(adapter.source)}: not a usable lorahot.Adapter:", problems),
                "Adapter.modules must map module keys (str) to lorahot.LoraModule objects holding tensors and a float "
                "alpha, Adapter.weights module keys to lorahot.WeightModule objects, Adapter.config must be a dict, "
                "Adapter.format and Adapter.source strings, Adapter.skipped and Adapter.file_keys tuples of "
                "strings and Adapter.stored_dtypes a dict of str to torch.dtype; or read the adapter with "
                "lorahot.read_adapter.",
            )
        )
    refuse_oversized(_named(adapter.source), _shapes(adapter), "tensors were not copied")
    adapter = _plain_names(_plain_tensors(adapter))
    if type(adapter.format) is str and type(adapter.source) is str and adapter.source.isprintable():
        return adapter
    # a str of a subclass as a plain one: lorahot compares and hashes the format and source; the
    # source is named in messages, as one line
    source = one_line(str.__str__(adapter.source))
    return dataclasses.replace(adapter, format=str.__str__(adapter.format), source=source)


def _shapes(adapter: Adapter) -> Iterator[tuple[str, torch.Size]]:
    """``(name, shape)`` of every tensor of a checked adapter, named ``<module key> (<role>)``."""
    for k, m in adapter.modules.items():
        for role in ("A", "B", "base_weight", "magnitude", "bias"):
            t = getattr(m, role)
            if isinstance(t, torch.Tensor):
                yield f"{k} ({role})", t.shape
    for k, w in adapter.weights.items():
        yield from ((f"{k} ({name})", t.shape) for name, t in w.factors.items())


def _plain_names(adapter: Adapter) -> Adapter:
    """``adapter`` (checked) with every module name, kind and key of a ``str`` subclass as a plain
    ``str``: lorahot's memos keep the names they are given, and a kept subclass would run its
    ``__eq__`` in every later lookup of that name, another adapter's too. The same object where
    every name is plain."""

    def names(k: str, m: LoraModule | WeightModule) -> tuple[object, ...]:
        extra = (m.kind, *m.factors) if isinstance(m, WeightModule) else ()
        return (k, m.key, *_keys_of(m), *extra)

    both: list[tuple[str, LoraModule | WeightModule]] = [*adapter.modules.items(), *adapter.weights.items()]
    if all(type(n) is str for k, m in both for n in names(k, m)) and all(type(k) is str for k in adapter.skipped):
        return adapter
    p = _text_of
    modules = {
        p(k): dataclasses.replace(m, key=p(m.key), source_keys=tuple(map(p, _keys_of(m))))
        for k, m in adapter.modules.items()
    }
    weights = {
        p(k): dataclasses.replace(
            w,
            key=p(w.key),
            kind=p(w.kind),
            source_keys=tuple(map(p, _keys_of(w))),
            factors={p(n): t for n, t in w.factors.items()},
        )
        for k, w in adapter.weights.items()
    }
    return dataclasses.replace(adapter, modules=modules, weights=weights, skipped=tuple(map(p, adapter.skipped)))


def _keys_of(m: LoraModule | WeightModule) -> tuple[object, ...]:
    """A module's ``source_keys``, as a tuple (a hand-built one's may be anything)."""
    keys: object = m.source_keys
    return tuple(keys) if isinstance(keys, (tuple, list)) else ()


def _text_of(value: Any) -> Any:
    """``value`` where it is a ``str`` of a subclass as a plain ``str`` (its overrides not called)."""
    return str.__str__(value) if isinstance(value, str) and type(value) is not str else value


def _plain_tensors(adapter: Adapter) -> Adapter:
    """``adapter`` (checked) with every tensor of a subclass of the caller's as a plain tensor
    of the same memory (:func:`~lorahot.adapter.detached`), so that nothing of the caller's runs
    once it is read (a load reads it before it checks the model: see
    ``LoraRuntime._check_usable``); the same object where every tensor is plain."""

    def plain(t: Any) -> Any:
        return detached(t) if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor else t

    roles = ("A", "B", "base_weight", "magnitude", "bias")
    modules = {
        k: m
        if all(plain(getattr(m, r)) is getattr(m, r) for r in roles)
        else dataclasses.replace(m, **{r: plain(getattr(m, r)) for r in roles})
        for k, m in adapter.modules.items()
    }
    weights = {
        k: w
        if all(plain(t) is t for t in w.factors.values())
        else dataclasses.replace(w, factors={n: plain(t) for n, t in w.factors.items()})
        for k, w in adapter.weights.items()
    }
    same = all(modules[k] is m for k, m in adapter.modules.items()) and all(
        weights[k] is w for k, w in adapter.weights.items()
    )
    return adapter if same else dataclasses.replace(adapter, modules=modules, weights=weights)


def _named(source: object) -> str:
    """A hand-built adapter's source for its messages, whatever the caller put there."""
    return cut(source, 200) if isinstance(source, str) else shown(source, 200)


def _malformed_fields(adapter: Adapter) -> list[str]:
    """What is wrong with a hand-built adapter's fields other than its modules (each used after
    the checks: the source and format in the runtime's record of a load, written after the
    buffers)."""
    found = [
        f"Adapter.{name} is {shown(value, 60)}, not a str"
        for name, value in (("format", adapter.format), ("source", adapter.source))
        if not isinstance(value, str)
    ]
    names = [("Adapter.source", adapter.source), ("Adapter.format", adapter.format)]
    for field_name in ("modules", "weights", "skipped", "file_keys"):
        keys = getattr(adapter, field_name)
        names += [
            (f"a key of Adapter.{field_name}", k) for k in (keys if isinstance(keys, (dict, tuple, list)) else ())
        ]
    found += [f"{what} {shown(n)} {problem}" for what, n in names if isinstance(n, str) and (problem := long_name(n))]
    for field_name in ("skipped", "file_keys"):  # file_keys: what judges the file's naming (keys.file_naming)
        keys = getattr(adapter, field_name)
        if not isinstance(keys, (tuple, list)) or not all(isinstance(k, str) for k in keys):
            found.append(f"Adapter.{field_name} is {shown(keys, 60)}, not a tuple of str")
    stored: object = adapter.stored_dtypes
    if not isinstance(stored, dict) or not all(
        type(k) is str and isinstance(d, torch.dtype) for k, d in stored.items()
    ):
        found.append(f"Adapter.stored_dtypes is {shown(stored, 60)}, not a dict of str to torch.dtype")
    weights: object = adapter.weights
    if not isinstance(weights, dict):
        found.append(f"Adapter.weights is a {type(weights).__name__}, not a dict")
        return found
    for key, w in weights.items():
        if not isinstance(key, str) or not isinstance(w, WeightModule):
            found.append(
                f"Adapter.weights maps a {type(key).__name__} to a {type(w).__name__}, not a str to a WeightModule"
            )
            continue
        factors: object = w.factors
        if not isinstance(factors, dict) or not all(
            isinstance(n, str) and isinstance(t, torch.Tensor) for n, t in factors.items()
        ):
            found.append(f"{shown(key, 80)}: WeightModule.factors is not a dict of str to torch.Tensor")
        elif bad := [(n, problem) for n, t in factors.items() if (problem := _unusable_storage(t)) is not None]:
            found.append(f"{shown(key, 80)}: factor {bad[0][0]} is {bad[0][1]}")
        if w.alpha is not None and (isinstance(w.alpha, bool) or not isinstance(w.alpha, (int, float))):
            found.append(f"{shown(key, 80)}: WeightModule.alpha is {shown(w.alpha, 40)}, not None or a number")
        elif isinstance(factors, dict) and (problem := _weight_kind_problem(w)) is not None:
            found.append(f"{shown(key, 80)}: {problem}")
    return found


def _weight_kind_problem(w: WeightModule) -> str | None:
    """Why a hand-built :class:`WeightModule`'s kind, factor names or alpha cannot be built (as
    :func:`_weight_modules` checks a file's), or None."""
    if w.kind not in _KIND_NEEDS:
        return f"WeightModule.kind is {shown(w.kind, 40)}, not one of {', '.join(_KIND_NEEDS)}"
    need, may = _KIND_NEEDS[w.kind]
    names = [[_FACTOR.get(r, r) for r in alts if r != "alpha"] for alts in need]
    missing = [" or ".join(alts) for alts in names if alts and not any(a in w.factors for a in alts)]
    if ("alpha",) in need and w.alpha is None:
        missing.append("an alpha")
    allowed = {n for alts in names for n in alts} | {_FACTOR.get(r, r) for r in may}
    extra = sorted(set(w.factors) - allowed)
    if missing or extra:
        what = f"lacks {', '.join(missing)}" if missing else f"has factors its kind has not: {', '.join(extra)}"
        return f"a WeightModule of kind {w.kind} that {what}"
    rotates = w.kind in ROTATION_KINDS
    if w.alpha is not None and not (math.isfinite(w.alpha) and (w.alpha >= 0 if rotates else w.alpha != 0)):
        return f"WeightModule.alpha is {w.alpha:g}; it must be finite and {'>= 0' if rotates else 'other than 0'}"
    return None


def _unusable_storage(t: torch.Tensor) -> str | None:
    """Why a hand-built adapter's tensor cannot be read at all (nested, quantized, sparse), or
    None; the meta device passes (an adapter read with ``device="meta"`` plans targets)."""
    problem = storage_problem(t)
    return None if problem is None or (t.device.type == "meta" and t.layout == torch.strided) else problem


def _malformed(key: Any, m: Any) -> list[str]:
    """What makes one entry of a hand-built adapter unusable, before any shape is looked at."""
    if not isinstance(key, str) or not isinstance(m, LoraModule):
        return [f"maps a {type(key).__name__} to a {type(m).__name__}, not a str to a LoraModule"]
    tensors = (("A", m.A), ("B", m.B), ("base_weight", m.base_weight), ("magnitude", m.magnitude), ("bias", m.bias))
    found = [
        f"{role} is a {type(t).__name__}, not a torch.Tensor"
        for role, t in tensors
        if not isinstance(t, torch.Tensor) and (role in ("A", "B") or t is not None)
    ]
    found += [
        f"{role} is {problem}"
        for role, t in tensors
        if isinstance(t, torch.Tensor) and (problem := _unusable_storage(t)) is not None
    ]
    found += [
        f"{role} is a 0-d tensor (one number), not a matrix"
        for role, t in tensors[:2]
        if isinstance(t, torch.Tensor) and t.ndim == 0
    ]
    if isinstance(m.alpha, bool) or not isinstance(m.alpha, (int, float)):
        found.append(f"alpha is {shown(m.alpha, 40)}, not a number")
    elif not finite(m.alpha):
        found.append(f"alpha is {str(m.alpha)[:40]}, not a finite float")
    for flag in ("use_rslora", "unit_scale"):
        value: object = getattr(m, flag)  # typed as a bool, but built by the caller
        if not isinstance(value, bool):
            found.append(f"{flag} is {shown(value, 40)}, not True or False")
    return found


def _device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        out = torch.device(device)
        torch.empty(0, device=out)  # an unknown or absent device fails here, not mid-read
    except (RuntimeError, TypeError, ValueError, AssertionError) as exc:
        raise UsageError(f"device={shown(device)} is not a usable torch device ({cut(str(exc), 200)}).") from None
    return out


def _structure_first(
    source: Source,
    weight_name: str | None,
    subfolder: str | None,
    revision: str | None,
    token: str | bool | None,
    strict: bool,
) -> Adapter | None:
    """For a local file whose header has no recipe yet (first seen): works its structure out
    from the header alone (as ``device="meta"`` reads it), so that tensors which cannot form an
    adapter (an A without its B, no known naming) are refused before the data section is
    allocated and read. A sparse file of a few MB declaring hundreds of MB of junk tensors
    used to be read in full first (an independent audit: 343 MB for a 1.9 MB file). Later
    reads of the same header skip this (its recipe is memoized); Hub ids are not fetched twice.
    Returns the adapter so read (meta tensors) where it did, else None. ``revision`` and
    ``token`` go along so that a Hub option given with a local path is refused as the read
    refuses it, before the header is judged."""
    if not isinstance(source, (str, os.PathLike)) or not _is_local(source):
        return None
    shapes = open_source(
        source,
        weight_name=weight_name,
        subfolder=subfolder,
        revision=revision,
        token=token,
        device=torch.device("meta"),
    )
    key = _file_key(shapes, strict)
    if key is not None and key not in _RECIPES:
        return _normalize_fully(shapes, None, strict)
    return None


def _is_local(source: str | os.PathLike[str]) -> bool:
    try:
        return os.path.exists(os.fspath(source))
    except Exception:  # the caller's __fspath__ may raise anything: the read says what is wrong
        return False


def _normalize(
    raw: RawAdapter, overrides: dict[str, Any] | None, strict: bool = True
) -> tuple[Adapter, _Recipe | None]:
    """The adapter ``raw`` holds, and the recipe it was assembled from, if any. A file whose
    structure was worked out before (the same header and config, see :class:`_Recipe`) is
    assembled from its recipe: new tensors, the grouping, the alphas and the checks on them not
    repeated (they depend on nothing else)."""
    key = _recipe_key(raw, overrides, strict)
    if key is None:
        return _normalize_fully(raw, overrides, strict), None
    recipe = _RECIPES.get(key, _recipe_of, raw, strict)
    if recipe is None:
        return _normalize_fully(raw, None, strict), None
    return _cooked(recipe, raw), recipe


#: One module of a :class:`_Recipe`: its key; the tensor keys of its A, B, base-weight copy,
#: DoRA magnitude and LoRA bias (None where absent); its alpha, rsLoRA flag, source keys and
#: :attr:`~lorahot.LoraModule.unit_scale`.
_Dish = tuple[str, str, str, str | None, str | None, str | None, float, bool, tuple[str, ...], bool]


@dataclass(frozen=True)
class _Recipe:
    """The structure :func:`_normalize_fully` found in a file: its format, its modules (each a
    :data:`_Dish`) and the keys it skipped.

    All of it follows from the header (keys, dtypes, shapes, metadata), the config and
    ``strict`` alone, which key it in :data:`_RECIPES`; a file whose structure depends on its
    values (an ``.alpha`` tensor, LyCORIS factors) gets no recipe and is worked out on every
    read.
    """

    format: str
    modules: tuple[_Dish, ...]
    skipped: tuple[str, ...]

    @property
    def nbytes(self) -> int:
        """Bytes it keeps alive, about (the strings and a few hundred per module)."""
        text = sum(len(k) for dish in self.modules for k in (dish[0], *dish[8])) + sum(map(len, self.skipped))
        return text + 300 * len(self.modules)


#: What a recipe is keyed by: the header's identity, the config as canonical JSON, ``strict``, and
#: the digest of the model's names the file is read for (:func:`reading_for`; empty for none).
_RecipeKey = tuple[tuple[bytes, int], str, bool, bytes]
#: the recipe key of a file -> its recipe, or None for a file that has none
_RECIPES: BoundedMemo[_RecipeKey, _Recipe | None] = BoundedMemo(
    16 << 20, lambda key, recipe: 64 if recipe is None else recipe.nbytes
)

#: The module paths of the model the reads in this context are for (:func:`reading_for`).
_MODEL_NAMES: ContextVar[ModelNames | None] = ContextVar("lorahot_model_names", default=None)


@contextlib.contextmanager
def reading_for(names: ModelNames) -> Iterator[None]:
    """Within the block, a file is read for the model whose module paths are ``names`` (a
    runtime's load): a key that names a module of that model is its own name, never a stray of
    another naming that aliases it (:func:`lorahot.formats.read_as`)."""
    with scoped(_MODEL_NAMES, names):
        yield


def _recipe_key(raw: RawAdapter, overrides: dict[str, Any] | None, strict: bool) -> _RecipeKey | None:
    """What a file's recipe is keyed by; None where there is none (no file, shapes only, or
    ``config=`` given: the reader works the adapter out in full)."""
    if raw.shapes_only or overrides is not None:
        return None
    return _file_key(raw, strict)


def _file_key(raw: RawAdapter, strict: bool) -> _RecipeKey | None:
    """The recipe key of ``raw``'s file (its header, config and ``strict``, and the model it is
    read for), whether ``raw`` holds the file's data or its header alone; None for no file."""
    if raw.header is None:
        return None
    names = _MODEL_NAMES.get()
    return raw.header, json.dumps(raw.config, sort_keys=True), strict, b"" if names is None else names.key


def _recipe_of(raw: RawAdapter, strict: bool) -> _Recipe | None:
    """The recipe of ``raw``'s structure, or None where it depends on the values: worked out in
    full and written down by tensor key (raises what the full read raises)."""
    adapter = _normalize_fully(raw, None, strict)
    if adapter.weights:
        return None
    keys = {id(t): k for k, t in raw.tensors.items()}
    dishes = []
    for name, m in adapter.modules.items():
        tensors = (m.A, m.B, m.base_weight, m.magnitude, m.bias)
        found = [None if t is None else keys.get(id(t)) for t in tensors]
        a, b, base, magnitude, bias = found
        if a is None or b is None or set(m.source_keys) != {k for k in found if k is not None}:
            return None  # a tensor that is not the file's own, or a key read for its value (.alpha)
        dishes.append((name, a, b, base, magnitude, bias, m.alpha, m.use_rslora, m.source_keys, m.unit_scale))
    return _Recipe(adapter.format, tuple(dishes), adapter.skipped)


def _cooked(recipe: _Recipe, raw: RawAdapter) -> Adapter:
    """The adapter of ``recipe`` made of ``raw``'s tensors (its config, and the header's
    per-component configs, as :func:`_normalize_fully` gives them)."""
    t = raw.tensors
    modules = {
        name: LoraModule(
            name,
            t[a],
            t[b],
            alpha,
            rslora,
            keys,
            None if base is None else t[base],
            None if magnitude is None else t[magnitude],
            None if bias is None else t[bias],
            unit,
        )
        for name, a, b, base, magnitude, bias, alpha, rslora, keys, unit in recipe.modules
    }
    config = dict(raw.config or {})
    header_configs = _header_configs(raw)
    if header_configs:
        config[METADATA_KEY] = header_configs
    return Adapter(modules, recipe.format, raw.source, config, recipe.skipped, stored_dtypes=dict(raw.stored_dtypes))


def _normalize_fully(raw: RawAdapter, overrides: dict[str, Any] | None, strict: bool = True) -> Adapter:
    """Works out the adapter ``raw`` holds: its format, modules, alphas and configs, checked.

    Raises:
        UnknownFormatError: keys it cannot load.
        AdapterMismatchError: modules that disagree with themselves or the config (an A
            without its B, a stray ``.alpha`` whose factors the file lacks). For either, where
            ``strict=False`` would read the rest, the message also says how many modules that
            read keeps and which keys it skips.
    """
    try:
        return _normalize_once(raw, overrides, strict)
    except (UnknownFormatError, AdapterMismatchError) as exc:
        if not strict:
            raise
        tail = _partial_read(raw, overrides)
        if not tail:
            raise
        raise type(exc)(lines(message(exc), tail)) from None


def _partial_read(raw: RawAdapter, overrides: dict[str, Any] | None) -> str:
    """What ``strict=False`` makes of a file the strict read refused, as a sentence: the modules
    it keeps and the keys it skips, or, read for a load (:func:`loading_into`), the layers that
    load takes and the keys it skips (those of modules no injected layer takes too); empty where
    it refuses the file too."""
    try:
        adapter = _normalize_once(raw, overrides, strict=False)
    except LoraError:
        return ""
    loads = _PARTIAL.get()
    if loads is None:
        kept, skipped = len(adapter.modules) + len(adapter.weights), adapter.skipped
        does = f" (lorahot inspect --no-strict): it reads {kept} module{'s' if kept != 1 else ''} of the file"
    else:
        loaded = loads(adapter, raw.shapes_only)
        if loaded is None:
            return ""
        kept, skipped = loaded
        does = f": it loads into {kept} injected layer{'s' if kept != 1 else ''} of the model"
    return (
        f"Or load the rest with strict=False{does} and skips {len(skipped)} key{'s' if len(skipped) != 1 else ''} "
        f"({', '.join(shown(k, 200) for k in skipped[:5])}{', ...' if len(skipped) > 5 else ''})."
    )


#: What a ``strict=False`` load into a model makes of an adapter: the injected layers it loads
#: and the keys it skips (:func:`loading_into`); None where no load is reading.
_LOADS: ContextVar[Callable[[Adapter], tuple[int, tuple[str, ...]]] | None] = ContextVar("lorahot_loads", default=None)
#: :data:`_LOADS` for an adapter as the reader assembles it (before ``prefix``, ``key_map``,
#: ``fuse`` and ``split``; the flag: read from the header alone), None where it cannot say:
#: set by :func:`read_adapter`
_PARTIAL: ContextVar[Callable[[Adapter, bool], tuple[int, tuple[str, ...]] | None] | None] = ContextVar(
    "lorahot_partial", default=None
)


@contextlib.contextmanager
def loading_into(loads: Callable[[Adapter], tuple[int, tuple[str, ...]]]) -> Iterator[None]:
    """Within the block, reads are for a load into a model: ``loads(adapter)`` gives the number of
    injected layers a ``strict=False`` load of ``adapter`` takes and the tensor keys it skips (or
    raises the :class:`~lorahot.errors.LoraError` that load raises), which a strict refusal's last
    sentence states (:func:`_partial_read`)."""
    with scoped(_LOADS, loads):
        yield


def _mapped_loads(
    loads: Callable[[Adapter], tuple[int, tuple[str, ...]]],
    mapping: tuple[Any, Any, Any, Any],
    adapter: Adapter,
    shapes_only: bool,
) -> tuple[int, tuple[str, ...]] | None:
    """``loads`` of ``adapter`` renamed by ``mapping`` (``prefix``, ``key_map``, ``fuse``,
    ``split``) as :func:`read_adapter` renames it; None where the renames or the load refuse it,
    or where ``fuse`` or ``split``, which need the values, meet an adapter read from its header
    alone (``shapes_only``)."""
    if shapes_only and (mapping[2] is not None or mapping[3] is not None):
        return None
    try:
        return loads(_user_mapping(adapter, *mapping))
    except LoraError:
        return None


def _normalize_once(raw: RawAdapter, overrides: dict[str, Any] | None, strict: bool) -> Adapter:
    """:func:`_normalize_fully`, without the strict read's word on what ``strict=False`` keeps."""
    keys = list(raw.tensors)
    if not keys:
        raise UnknownFormatError(f"{raw.source}: holds no tensors. Point lorahot at a LoRA adapter.")
    header_configs = _header_configs(raw)
    found, strays = read_as(keys, _MODEL_NAMES.get())
    fmt = found or _closest_format(keys)
    _check_config_applies(raw, fmt)
    defaults = _header_alpha(raw, fmt)
    configs = _component_configs(raw, header_configs, overrides, fmt.name in _PEFT_NAMED, defaults)
    skipped: list[str] | None = None if strict else []
    tensors = _without_strays(raw, fmt, strays, skipped)
    parts = group_keys(fmt, tensors, raw.source, skipped)  # raises, naming the keys, if fmt was a guess
    weights = _weight_modules(parts, raw.source, skipped, fmt, raw.shapes_only)  # LyCORIS kinds and diffs: out of parts
    _check_metadata_reaches(list(parts), list(weights), configs, header_configs, overrides, raw, fmt.name)
    only_header_alpha = bool(defaults) and not _states_alpha(raw, fmt, overrides, header_configs)
    _check_configs_reach(weights, fmt, configs, raw.source, only_header_alpha)
    _check_header_alpha_reaches(weights, raw, fmt, defaults)
    _check_dora_scales(parts, raw.source, skipped, fmt)
    if skipped is not None:
        skip_modules(parts, [m for m, r in parts.items() if "A" not in r or "B" not in r], skipped)
    _check_zero_ranks(parts, raw.source, skipped, fmt)
    if not parts and not weights:
        raise UnknownFormatError(
            f"{raw.source}: none of its {len(keys)} tensors is a loadable LoRA weight (strict=False skipped them all, "
            f"e.g. {', '.join(keys[:3])}). Point lorahot at a LoRA adapter."
        )
    modules = _assemble(parts, fmt, configs, raw.source, not raw.dense, raw.shapes_only)
    cfg_dict = {**(raw.config or {}), **(overrides or {})}
    if len(configs) > 1:
        cfg_dict[METADATA_KEY] = header_configs
    stored = dict(raw.stored_dtypes)
    return Adapter(modules, fmt.name, raw.source, cfg_dict, tuple(skipped or ()), weights, stored_dtypes=stored)


#: the namings PEFT's adapter_config.json describes (lora_A / lora_B under PEFT's module names)
_PEFT_NAMED = ("peft", "diffusers")


def _check_config_applies(raw: RawAdapter, fmt: KeyFormat) -> None:
    """An adapter_config.json found beside weights of another naming (kohya, BFL, ...) whose
    loaders ignore it: refused where it would decide a rank or scale, rather than applied
    (a wrong scale) or ignored (a file the user may have meant)."""
    if raw.config is None or raw.config_path is None or fmt.name in _PEFT_NAMED:
        return
    deciding = [k for k in _DECIDING if k in raw.config]
    if deciding:
        raise AdapterMismatchError(
            f"{raw.source}: its weights are in the {fmt.name} naming, whose loaders ignore the {CONFIG_NAME} beside "
            f"them ({raw.config_path}), but that file sets {', '.join(deciding)}. Move it away (kohya-style files "
            "carry their alphas as .alpha tensors), or pass config= to apply its values on purpose."
        )


def _check_configs_reach(
    weights: Mapping[str, WeightModule],
    fmt: KeyFormat,
    configs: dict[str, AdapterConfig],
    source: str,
    header_alpha: bool,
) -> None:
    """Refuses a config that states a rank or scale for LyCORIS or diff modules: they take their
    scale from their own ``.alpha`` (LyCORIS' ``alpha / r``, scale 1 without one) and their rank
    from their factors, as lycoris-lora and ComfyUI compute them, and no loader defines what a
    LoRA config's ``lora_alpha`` or ``r`` would mean for them (diffusers cannot build its LoKr
    config from LoRA metadata), so the field would be ignored. ``header_alpha``: the only
    ``lora_alpha`` is a naming's header alpha (:func:`_header_alpha`, for LoRA modules without
    ``.alpha``), which no one stated for these modules.

    Raises:
        UsageError: ``config=`` sets such a field.
        AdapterMismatchError: the adapter_config.json or the safetensors header's metadata does.
    """
    problems: list[str] = []
    by_caller = False
    for module in weights:
        config, name, origin = _config_for(module, fmt, configs)
        fields = [f"lora_alpha={shown(config.lora_alpha)}"] if config.alpha_stated and not header_alpha else []
        for field, patterns in (("alpha_pattern", config._alpha_set), ("rank_pattern", config._rank_set)):
            key = patterns.first(name) if patterns is not None else None
            fields += [f"{field}[{shown(key)}]"] if key is not None else []
        fields += [f"r={config.r}"] if config.r is not None else []
        fields += ["use_rslora=true"] if config.use_rslora else []
        if fields:
            problems.append(f"{module}: {', '.join(fields)} (from {origin})")
            by_caller = by_caller or "config=" in origin
    if problems:
        raise (UsageError if by_caller else AdapterMismatchError)(
            lines(
                format_problems(
                    f"{source}: the adapter config sets a rank or scale for LyCORIS or diff modules, which take their "
                    "scale from their own .alpha tensors (LyCORIS' alpha / r; scale 1 without one) and their rank from "
                    "their factors, so it would be ignored for them:",
                    problems,
                ),
                "Drop those fields (state a LoRA module's alpha with an alpha_pattern entry that names LoRA modules "
                "only), or write each module's alpha as its .alpha tensor.",
            )
            + (
                " In a stack, config= applies to every part: read the part it is meant for with "
                "lorahot.read_adapter(source, config=...) and pass that Adapter in the list instead."
                if by_caller
                else ""
            )
        )


def _check_metadata_reaches(
    modules: list[str],
    weight_modules: list[str],
    configs: dict[str, AdapterConfig],
    header_configs: dict[str, dict[str, Any]],
    overrides: Mapping[str, Any] | None,
    raw: RawAdapter,
    naming: str,
) -> None:
    """Refuses a file whose header metadata states a rank or scale for pipeline components
    (``"transformer.lora_alpha"``, ``"unet.alpha_pattern"``) while some of its modules carry
    none of those prefixes: taking the metadata's values or ignoring them would each be a guess.
    In PEFT's naming (the model's bare names) no loader applies that config to them: diffusers'
    pipeline loaders keep only the keys under their component's prefix (a file of bare keys
    loads nothing), and ``load_lora_adapter(prefix=None)`` passes the prefixed fields to
    ``LoraConfig`` (a TypeError). In another naming (kohya's ``lora_unet_...``) the loaders
    disagree: the naming's own ignore it, diffusers' converters put the keys under their
    component and apply it (or refuse it beside ``.alpha`` tensors). A field that ``config=``
    or the PEFT-named file's adapter_config.json states (which agrees with the metadata where
    both state it, :func:`_agreed`) is settled. ``modules``: the LoRA modules;
    ``weight_modules``: the LyCORIS modules and diffs, which take no LoRA config
    (:func:`_check_configs_reach`), so the fix for them is dropping the fields. ``naming``: the
    file's format.

    Raises:
        AdapterMismatchError: such a field is left unsettled, naming the components, their
            fields, some of the bare modules and the ``config=`` that would load them.
    """
    stated = {**((raw.config or {}) if naming in _PEFT_NAMED else {}), **(overrides or {})}
    unsettled = {
        c[:-1]: {k: v for k, v in fields.items() if k in _DECIDING and k not in stated}
        for c, fields in header_configs.items()
        if c
    }
    unsettled = {c: fields for c, fields in unsettled.items() if fields}
    if not unsettled:
        return

    def is_bare(m: str) -> bool:
        return not any(c and m.startswith(c) for c in configs)

    bare = sorted(filter(is_bare, modules))
    bare_weights = sorted(filter(is_bare, weight_modules))
    if not bare and not bare_weights:
        return
    listed = "; ".join(f"{c} ({', '.join(f'{k}={shown(v, 60)}' for k, v in f.items())})" for c, f in unsettled.items())
    if not bare:  # LyCORIS modules and diffs alone
        fix = (
            "LyCORIS modules and diffs take their scale from their own .alpha tensors and their rank from their "
            "factors: drop those fields from the metadata (re-save the adapter without them)."
        )
    elif len(unsettled) == 1:
        fix = (
            f"If that config is the one these modules were trained with, pass config="
            f"{shown(next(iter(unsettled.values())), 200)} to load them with it; else pass config= with the values "
            "they were trained with (a field config= states is settled)."
        )
    else:
        fix = (
            "Pass config= with the fields of the component this model is (a field config= states is settled), or "
            "re-save the adapter with its keys under their component's prefix."
        )
    every = bare + bare_weights
    if naming in _PEFT_NAMED:
        elsewhere = _under_other_components(every)
        if elsewhere:
            raise AdapterMismatchError(
                _other_components_message(raw, listed, len(unsettled) > 1, elsewhere, len(every))
            )
        every = [m for m in every if not _under_other_components([m])]  # the bare ones, for the examples
        why = (
            "so no loader applies that config to them: diffusers' pipeline loaders keep only the keys under their "
            "component's prefix, and its load_lora_adapter(prefix=None) cannot build a LoraConfig from prefixed fields."
        )
    else:
        why = (
            f"and loaders disagree about them: the {naming} naming's own ignore that metadata, while diffusers' "
            "converters put them under a component and apply it (or refuse it beside .alpha tensors)."
        )
    raise AdapterMismatchError(
        f"{raw.source}: the {METADATA_KEY} in its safetensors header states a rank or scale for the component"
        f"{'s' if len(unsettled) > 1 else ''} {listed}, but {len(every)} of its modules "
        f"carry no component prefix (e.g. {', '.join(every[:3])}), {why} {fix}"
    )


def _under_other_components(modules: list[str]) -> dict[str, list[str]]:
    """The ``modules`` that sit under a pipeline component's prefix (``text_encoder_2.``), by
    component; empty where any of them has no such prefix (the model's bare names)."""
    found: dict[str, list[str]] = {}
    for module in modules:
        head, dot, _ = module.partition(".")
        if not dot or head not in COMPONENT_NAMES:
            return {}
        found.setdefault(head, []).append(module)
    return found


def _other_components_message(
    raw: RawAdapter, listed: str, plural: bool, elsewhere: dict[str, list[str]], count: int
) -> str:
    """Why a file whose metadata states a config for some of its components (``listed``, several
    where ``plural``) and none for the others (``elsewhere``: their modules by component, ``count``
    in all) is refused, and the fixes."""
    others = "; ".join(f"{c} ({len(ms)}, e.g. {', '.join(ms[:2])})" for c, ms in elsewhere.items())
    saved = ", ".join(f"{c}_lora_adapter_metadata=" for c in elsewhere)
    return (
        f"{raw.source}: the {METADATA_KEY} in its safetensors header states a rank or scale for the component"
        f"{'s' if plural else ''} {listed}, but none for {', '.join(elsewhere)}, which hold"
        f"{'' if len(elsewhere) > 1 else 's'} {count} of its "
        f"modules ({others}). No loader reads those modules one way: diffusers' pipeline loaders build each "
        "component's LoraConfig from its part of that metadata and fail on a component it leaves out, while "
        "ComfyUI ignores the metadata (alpha = rank for every module). Re-save the adapter with a config for "
        f"every component it holds (diffusers' save_lora_weights({saved}...)), or pass config= with the values "
        "the adapter was trained with (it then governs every module of the file, those components' too)."
    )


def _states_alpha(
    raw: RawAdapter,
    fmt: KeyFormat,
    overrides: Mapping[str, Any] | None,
    header_configs: dict[str, dict[str, Any]],
) -> bool:
    """Whether ``lora_alpha`` is stated by ``config=``, the adapter_config.json a naming reads, or
    the safetensors header's metadata (``header_configs``, as :func:`_header_configs` read it;
    not only by a naming's header alpha)."""
    file_config = raw.config if fmt.name in _PEFT_NAMED else None
    stated = [overrides or {}, file_config or {}, *header_configs.values()]
    return any("lora_alpha" in fields for fields in stated)


def _closest_format(keys: list[str]) -> KeyFormat:
    """The format that accounts for most keys; its grouping then names the keys it cannot."""
    return max(FORMATS, key=lambda f: f.score(keys))


def _component_configs(
    raw: RawAdapter,
    header_configs: dict[str, dict[str, Any]],
    overrides: dict[str, Any] | None,
    peft_named: bool,
    defaults: dict[str, Any] | None = None,
) -> dict[str, AdapterConfig]:
    """Config per component prefix (``""``: every module). diffusers' header metadata holds
    one PEFT config per component (``"unet.r"``, ``"text_encoder.lora_alpha"``); ``config=``
    overrides every one of them. The adapter_config.json beside the weights counts only for
    PEFT's naming (``peft_named``), as for the other namings' own loaders. ``defaults`` (a
    naming's header alpha, :func:`_header_alpha`) go under both.

    Raises:
        AdapterReadError: a config value is invalid.
        UnknownFormatError: a config turns on a feature lorahot does not load (DoRA,
            ``modules_to_save``, ``target_parameters``, trainable tokens, ...).
    """
    file_config = raw.config if peft_named else None
    configs = {"": {**(defaults or {}), **(file_config or {}), **(overrides or {})}}
    for component, fields in header_configs.items():
        if file_config is not None:  # each component's config must agree with the file's too
            agreed = _agreed(raw, fields, component)
            fields = fields if component else agreed
        configs[component] = {**fields, **(overrides or {})}
    too_many = budget_problem(list(configs.values()))
    if too_many is not None:
        raise AdapterReadError(f"{raw.source}: {too_many}. Write fewer, plainer pattern keys.")
    root = _root_origin(file_config is not None, "" in header_configs, overrides is not None)
    parsed = {c: _parse_config(raw, c, d, root) for c, d in configs.items()}
    # PeftModel.from_pretrained builds the modules adapter_config.json selects; diffusers' loaders,
    # which read the header's configs, build those of the file's keys
    chooses = file_config is not None or any(k in (overrides or {}) for k in SELECTION_FIELDS)
    parsed = {c: cfg if not c and chooses else replace(cfg, selection=None) for c, cfg in parsed.items()}
    peft_read = [c for c in configs if c or file_config is not None or "" in header_configs]
    parsed |= {c: replace(parsed[c], r_omitted=True) for c in peft_read if "r" not in configs[c] and parsed[c].present}
    if overrides:  # what a message blames: the caller's values too
        parsed = {c: replace(cfg, origin=_overridden(cfg.origin)) for c, cfg in parsed.items()}
    refused = [f"{cfg.origin}: {'; '.join(cfg.unsupported)}." for cfg in parsed.values() if cfg.unsupported]
    if refused:
        raise UnknownFormatError(
            lines(
                format_problems(f"{raw.source}: the adapter config turns on features lorahot does not load:", refused),
                "lorahot loads plain LoRA (lora_A/lora_B per module). Load this adapter with PEFT, or re-train it "
                "without these options.",
            )
        )
    return parsed


def _header_alpha(raw: RawAdapter, fmt: KeyFormat) -> dict[str, Any]:
    """``{"lora_alpha": a}`` where ``fmt`` reads one alpha for every module from a safetensors
    header entry (:attr:`~lorahot.formats.table.KeyFormat.header_alpha`), the file records it and
    has no ``.alpha`` tensor; else empty.

    Raises:
        AdapterReadError: the entry is not a finite number > 0.
    """
    text = raw.metadata.get(fmt.header_alpha) if fmt.header_alpha else None
    if text is None or any((fmt.parse(k) or ("", ""))[1] == "alpha" for k in raw.tensors):
        return {}
    try:
        alpha = float(text)
    except ValueError:
        alpha = math.nan
    if not math.isfinite(alpha) or alpha <= 0:
        raise AdapterReadError(
            f"{raw.source}: the {shown(fmt.header_alpha)} entry of its safetensors header, the alpha every module of "
            f"a {fmt.name} file without .alpha tensors was trained at, is {shown(text, 60)}, not a number > 0. Fix "
            "the entry, or pass config={'lora_alpha': <the alpha>} (alpha = rank: scale 1)."
        )
    return {"lora_alpha": alpha}


def _check_header_alpha_reaches(
    weights: Mapping[str, WeightModule], raw: RawAdapter, fmt: KeyFormat, defaults: Mapping[str, Any]
) -> None:
    """Refuses a naming's header alpha (:func:`_header_alpha`, read: the file has no ``.alpha``
    tensor) beside LyCORIS modules. The header states the alpha every module was trained at, and
    only diffusers' loader reads it, for LoRA modules; it loads no LyCORIS module of the naming,
    and ComfyUI and musubi-tuner, which do, ignore the entry (every module, LoRA ones too, at
    scale 1). No loader defines the file, so no scale is guessed. Diff modules have no alpha.

    Raises:
        AdapterMismatchError: the header alpha is read and LyCORIS modules are present.
    """
    lycoris = [f"{key} ({w.kind})" for key, w in weights.items() if w.kind != "diff"]
    if not defaults or not lycoris:
        return
    raise AdapterMismatchError(
        lines(
            format_problems(
                f"{raw.source}: the {shown(fmt.header_alpha)} entry of its safetensors header records alpha "
                f"{shown(raw.metadata.get(fmt.header_alpha), 60)}, the alpha every module of a {fmt.name} file without "
                ".alpha tensors was trained at, and the file holds LyCORIS modules without .alpha:",
                lycoris,
            ),
            "No loader defines that entry for them: diffusers reads it for LoRA modules but loads no LyCORIS module "
            "of this naming, and ComfyUI and musubi-tuner ignore it (every module at scale 1, LoRA ones too). Write "
            "each module's alpha as its .alpha tensor (alpha = rank: scale 1; the entry is then ignored, as by "
            "diffusers), or remove the entry to load every module at scale 1. config= cannot settle it: a lora_alpha "
            "there is refused for LyCORIS modules.",
        )
    )


#: the config fields that decide a module's rank or scale
_DECIDING = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias")


def _agreed(raw: RawAdapter, header: dict[str, Any], component: str = "") -> dict[str, Any]:
    """The file's config and the header's config for ``component``'s modules (``""``: every
    module) as one, or an :class:`AdapterMismatchError` where they disagree on a field that
    decides a rank or scale (PEFT reads the file, diffusers the header: no answer is both's)."""
    config = raw.config or {}
    clash = [k for k in _DECIDING if k in config and k in header and config[k] != header[k]]
    if clash:
        fields = "; ".join(
            f"{k} {shown(config[k])} against {f'{component}{k} ' if component else ''}{shown(header[k])}" for k in clash
        )
        raise AdapterMismatchError(
            f"{raw.source}: {CONFIG_NAME} and the {METADATA_KEY} in its safetensors header disagree: "
            + fields
            + ". PEFT reads the first, diffusers the second; delete the wrong one, or pass config= with the right "
            "values."
        )
    return {**config, **header}


#: the origin of a config that no file, header or ``config=`` stated (every module's alpha its rank,
#: or its ``.alpha``): a message about it names no config to fix
NO_CONFIG = "no adapter config (the defaults)"


def _root_origin(file_config: bool, header_config: bool, given: bool) -> str:
    """Where the config of every module (component ``""``) came from, for messages: with no
    config in the file, its header or ``config=`` (``given``), the defaults (alpha = rank)."""
    if header_config:
        return (
            f"{CONFIG_NAME} and the {METADATA_KEY}" if file_config else f"the {METADATA_KEY} in the safetensors header"
        )
    if file_config:
        return CONFIG_NAME
    return "config=" if given else NO_CONFIG


def _parse_config(raw: RawAdapter, component: str, fields: dict[str, Any], root: str) -> AdapterConfig:
    """``fields`` parsed, with :attr:`~lorahot.io.config.AdapterConfig.origin` set; an invalid
    value names where it came from and how to fix it there."""
    if component or root != CONFIG_NAME:
        origin = _origin(component) if component else root
        fix = "Fix it, or pass config= with the right values." if origin == "config=" else "Re-save the adapter."
        config = AdapterConfig.from_dict(fields, f"{raw.source}: {origin}", fix)
    else:
        origin = CONFIG_NAME
        config = AdapterConfig.from_dict(fields, raw.config_path or raw.source)
    return replace(config, origin=origin)


def _overridden(origin: str) -> str:
    """``origin`` (where a config came from) with the caller's ``config=`` over it."""
    return origin if origin == "config=" else f"{origin} with config= over it"


def _origin(component: str) -> str:
    """Where the config of ``component`` came from, for messages."""
    return f"{METADATA_KEY} ({component[:-1]})" if component else CONFIG_NAME


def _header_configs(raw: RawAdapter) -> dict[str, dict[str, Any]]:
    """diffusers' per-component PEFT configs from the safetensors header, split by component."""
    text = raw.metadata.get(METADATA_KEY)
    if not text:
        return {}
    fix = "Re-save the adapter."
    meta = parse_json(text, raw.source, f"{METADATA_KEY} entry of the safetensors header", fix, MAX_METADATA_BYTES)
    if not isinstance(meta, dict):
        raise AdapterReadError(
            f"{raw.source}: malformed {METADATA_KEY} in the safetensors header (expected a JSON object, got "
            f"{type(meta).__name__}). {fix}"
        )
    split: dict[str, dict[str, Any]] = {}
    for key, value in meta.items():
        component, _, field = key.rpartition(".")
        split.setdefault(component + "." if component else "", {})[field] = value
    return split


def _config_for(module: str, fmt: KeyFormat, configs: dict[str, AdapterConfig]) -> tuple[AdapterConfig, str, str]:
    """The config governing ``module``, the name PEFT's patterns are matched against, and
    where that config came from (for messages)."""
    component = next((c for c in configs if c and module.startswith(c)), "")
    config = configs[component]
    return config, fmt.strip_prefix(module), config.origin or _origin(component)


def _assemble(
    parts: Parts,
    fmt: KeyFormat,
    configs: dict[str, AdapterConfig],
    source: str,
    check_storage: bool = True,
    shapes_only: bool = False,
) -> dict[str, LoraModule]:
    modules: dict[str, LoraModule] = {}
    problems: list[str] = []
    unreadable: list[str] = []
    for module, roles in parts.items():
        named = _spelled(module, roles, fmt)
        if "A" not in roles or "B" not in roles:
            problems.append(_incomplete(named, roles, fmt))
            continue
        (ka, a), (_, b) = roles["A"], roles["B"]
        keys = tuple(k for k, _ in roles.values())
        if check_storage and _unreadable(named, keys, roles, unreadable):
            continue
        flat = [(k, t) for k, t in (roles["A"], roles["B"]) if t.ndim < 2]
        if flat:
            k, t = flat[0]
            problems.append(
                f"{named}: {k} has shape {tuple(t.shape)}, but a LoRA A and B have at least two dimensions "
                "(A [r, in, ...], B [out, r, ...])"
            )
            continue
        if a.ndim > 2 and b.ndim == 2:  # a conv's B saved flat (LyCORIS' DyLoRA): [out, r] is the 1x1 [out, r, 1, ...]
            b = b.reshape(*b.shape, *(1,) * (a.ndim - 2))
        rank = int(a.shape[0])
        cfg, pattern_name, origin = _config_for(module, fmt, configs)
        left_out = _left_out_by_peft(ka, pattern_name, cfg, origin) if fmt.name == "peft" else None
        if left_out is not None:
            problems.append(f"{named}: {left_out}")
            continue
        declared = cfg.rank_for(pattern_name)
        if declared is None and cfg.r_null:
            problems.append(
                f"{named}: {origin} says r=null and no rank_pattern key matches it, so PEFT cannot build its layer "
                f"(it compares r with 0); set r to the adapter's rank ({rank})"
            )
            continue
        if declared is None and cfg.r_omitted and rank != PEFT_DEFAULT_R:
            problems.append(
                f"{named}: {origin} states no r and no rank_pattern key matches it, so PEFT builds its layer at its "
                f"default r={PEFT_DEFAULT_R} and fails to load {ka} of shape {tuple(a.shape)} (rank {rank}) into it; "
                f"set r to the adapter's rank ({rank}), or give the module a rank_pattern key"
            )
            continue
        if declared is not None and rank != declared:
            problems.append(f"{named}: {origin} says r={declared}, but {ka} has shape {tuple(a.shape)} (rank {rank})")
            continue
        alpha = _alpha(roles.get("alpha"), unreadable, shapes_only=shapes_only)
        if alpha is not None and cfg.states_alpha(pattern_name):
            stated = cfg.alpha_for(pattern_name)
            if stated is not None and not math.isclose(alpha, stated, rel_tol=1e-6):
                problems.append(
                    f"{named}: its {roles['alpha'][0]} is {alpha:g}, but {origin} says alpha {stated:g} (kohya's "
                    "loaders read the first, PEFT and diffusers the second)"
                )
                continue
        if alpha is None:
            alpha = cfg.alpha_for(pattern_name)
        base = roles["base"][1] if "base" in roles else None
        alpha = float(rank) if alpha is None else alpha
        if "magnitude" in roles and "dora_scale" in roles:
            problems.append(
                f"{named}: both {roles['magnitude'][0]} and {roles['dora_scale'][0]} give it a DoRA magnitude"
            )
            continue
        magnitude = next((roles[r][1] for r in ("magnitude", "dora_scale") if r in roles), None)
        if cfg.use_dora and magnitude is None:
            problems.append(
                f"{named}: {origin} says use_dora, but the file has no lora_magnitude_vector for it (PEFT would run "
                "it as DoRA with the base weight's own norms, which lorahot does not)"
            )
            continue
        ignored = _ignored_by_peft(roles, cfg, origin) if fmt.name in _PEFT_NAMED else None
        if ignored is not None:
            problems.append(f"{named}: {ignored}")
            continue
        bias = roles["bias"][1] if "bias" in roles else None
        if "diff_bias" in roles:  # a bias applied at the adapter's weight alone (wan's .diff_b)
            if bias is not None:
                problems.append(f"{named}: both {roles['bias'][0]} and {roles['diff_bias'][0]} give it a LoRA bias")
                continue
            scale = alpha / (math.sqrt(rank) if cfg.use_rslora else rank) if rank else 1.0
            # the runtime applies a LoRA bias at alpha / r, as PEFT does; divided in at least float32, so
            # that a half-precision .diff_b comes back as it was (not rounded, nor past float16's range)
            given = roles["diff_bias"][1]
            bias = given.to(torch.promote_types(given.dtype, torch.float32)) / scale
        unit = "dora_scale" in roles  # LyCORIS' weight decomposition: DoRA at scale 1 only
        modules[module] = LoraModule(module, a, b, alpha, cfg.use_rslora, keys, base, magnitude, bias, unit)
    if unreadable:
        raise AdapterReadError(
            lines(
                format_problems(f"{source}: values that cannot be LoRA weights:", unreadable),
                "Re-save the adapter as dense float16/bfloat16/float32 tensors; fix or delete bad .alpha entries "
                "(without one, alpha equals the rank).",
            )
        )
    if problems:
        origins = [cfg.origin or "" for cfg in configs.values()]
        if any("config=" in origin for origin in origins):
            fix = "Fix config= (or re-save the adapter) so tensors and config agree."
        elif all(origin == NO_CONFIG for origin in origins):
            fix = "Re-save the adapter with both factors of every module."
        else:
            fix = "Re-save the adapter so tensors and config agree."
        raise AdapterMismatchError(lines(format_problems(f"{source}: inconsistent adapter:", problems), fix))
    return modules


#: PEFT's wrapper of the model's module names in the keys it saves
_PEFT_WRAPPER = "base_model.model."


def _left_out_by_peft(key: str, name: str, cfg: AdapterConfig, origin: str) -> str | None:
    """Why PEFT drops the weights of module ``name`` (its A's ``key``), or None. PEFT's
    ``from_pretrained`` builds a layer on each module its config selects
    (:class:`~lorahot.io.selection.ModuleSelection`) and loads the file's weights into those
    alone: a module left out keeps the base model's output, with a warning at most. Keys without
    PEFT's ``base_model.model.``, which ``from_pretrained`` loads nowhere, are read as diffusers'
    loaders read them, by the file's keys."""
    why = cfg.selection.leaves_out(name) if cfg.selection is not None and key.startswith(_PEFT_WRAPPER) else None
    if why is None:
        return None
    return (
        f"{origin}'s {why}, so PEFT builds no LoRA layer on it and drops its weights; fix target_modules, "
        "exclude_modules or layers_to_transform there, or delete the weights (config= with those fields null "
        "loads them)"
    )


def _ignored_by_peft(roles: dict[str, tuple[str, torch.Tensor]], cfg: AdapterConfig, origin: str) -> str | None:
    """Why a module's DoRA magnitude or LoRA bias contradicts its config, or None. A config
    (where there is one) decides how PEFT builds the module: with ``use_dora`` or ``lora_bias``
    false, its default, PEFT loads it as plain LoRA and drops such a tensor without a word. (A
    module without the bias ``lora_bias`` promises gets a zero one from PEFT's default
    initialization, as here.)"""
    if not cfg.present:
        return None
    for role, flag, what in (("magnitude", "use_dora", "DoRA magnitude"), ("bias", "lora_bias", "LoRA bias")):
        if role in roles and not getattr(cfg, flag):
            return (
                f"the file has its {what} ({roles[role][0]}), but {origin} does not set {flag} to true, so PEFT "
                f"loads it as plain LoRA and drops the {what}; set {flag} to true there (or pass config= with it) if "
                "the tensor is right, or delete it"
            )
    return None


#: What each weight kind must hold (one of each tuple's alternatives), and may hold.
_KIND_NEEDS: dict[str, tuple[tuple[tuple[str, ...], ...], tuple[str, ...]]] = {
    "loha": (
        (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
        ("hada_t1", "hada_t2", "alpha", "dora_scale"),
    ),
    "lokr": (
        (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
        ("lokr_w1_b", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"),
    ),
    "locon-tucker": ((("A",), ("B",), ("lora_mid",)), ("alpha", "dora_scale")),
    "locon": ((("A",), ("B",), ("dora_scale",)), ("alpha",)),
    "diff": ((("diff", "diff_b"),), ("diff", "diff_b", "alpha", "A", "B")),
    "oft": ((("oft_blocks",),), ("rescale", "alpha")),
    "boft": ((("oft_blocks",),), ("rescale", "alpha")),
    # sd-scripts reads the constraint from the file's .alpha and has no rescale
    "kohya-oft": ((("oft_blocks",), ("alpha",)), ()),
    "ia3": ((("weight",), ("on_input",)), ()),
    # a Tucker GLoRA's bm: ComfyUI does not read it, so the two references disagree on its weight
    "glora": ((("a1",), ("a2",), ("b1",), ("b2",)), ("alpha",)),
}


#: The factors a weight module's rank is read from (:attr:`lorahot.adapter.WeightModule.rank`),
#: by their role here (a Tucker LoCon's ``lora_down`` is its ``A``): matrices or conv kernels.
_RANK_FACTORS = frozenset({"hada_w1_b", "lokr_w1_b", "lokr_w2_b", "A", "a2"})


#: Factors that come in pairs (a diff's LoRA: ``A`` and ``B``).
_PAIRS = (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b"), ("hada_t1", "hada_t2"), ("A", "B"))

#: A (Tucker) LoCon's A and B under the names LyCORIS gives them.
_FACTOR = {"A": "lora_down", "B": "lora_up"}


def _kind(module: str, roles: dict[str, tuple[str, torch.Tensor]]) -> str | None:
    """The weight kind a module's roles make, or None for plain LoRA. ``oft_blocks`` are
    sd-scripts' OFT under its ``oft_unet_`` prefix, else LyCORIS' (BOFT where they are 4-D, one
    set of blocks per butterfly stage)."""
    if "oft_blocks" in roles:
        if module.startswith(KOHYA_OFT):
            return "kohya-oft"
        return "boft" if roles["oft_blocks"][1].ndim == 4 else "oft"
    if "on_input" in roles or "weight" in roles:
        return "ia3"
    if any(r in roles for r in GLORA_FACTORS):
        return "glora"
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if "lora_mid" in roles:
        return "locon-tucker"
    if "diff" in roles or "diff_b" in roles:
        return "diff"
    if "dora_scale" in roles and "A" in roles and "B" in roles and _per_input(roles):
        return "locon"  # weight decomposition over the input channels: folded in merged mode
    return None


def _per_input(roles: dict[str, tuple[str, torch.Tensor]]) -> bool:
    """Whether a LoRA/LoCon module's ``dora_scale`` holds one value per input channel
    (``[1, in, *ones]`` for ``A`` ``[r, in, *k]``: LyCORIS' ``wd_on_out=False``), and not one
    per output channel (``[out, 1, *ones]``, DoRA; both where out and in are 1)."""
    a, b, d = roles["A"][1], roles["B"][1], roles["dora_scale"][1]
    if a.ndim < 2 or b.ndim < 2:
        return False  # _assemble names the factor
    ones = (1,) * (a.ndim - 2)
    return tuple(d.shape) == (1, int(a.shape[1]), *ones) != (int(b.shape[0]), 1, *ones)


def _weight_modules(
    parts: Parts, source: str, skipped: list[str] | None, fmt: KeyFormat, shapes_only: bool = False
) -> dict[str, WeightModule]:
    """Takes the LyCORIS and diff modules out of ``parts`` as :class:`WeightModule` objects.
    With ``skipped`` given (``strict=False``) a module it cannot build is taken out of ``parts``
    and every one of its keys appended there.

    Raises:
        UnknownFormatError: a module that mixes kinds or lacks a factor its kind needs.
        AdapterReadError: its ``.alpha`` is not one finite number other than 0 (>= 0 for an OFT's).
    """
    out: dict[str, WeightModule] = {}
    problems: list[str] = []
    unreadable: list[str] = []
    for roles in parts.values():  # a LoRA bias (wan's .diff_b) beside a diff or without LoRA weights: a diff's bias
        if "diff_bias" in roles and ("diff" in roles or ("A" not in roles and "B" not in roles)):
            roles["diff_b"] = roles.pop("diff_bias")
    for module in [m for m, roles in parts.items() if _kind(m, roles)]:
        roles = parts[module]
        named = _spelled(module, roles, fmt)
        kind = _kind(module, roles) or ""
        need, may = _KIND_NEEDS[kind]
        missing = [" or ".join(alts) for alts in need if not any(a in roles for a in alts)]
        allowed = {a for alts in need for a in alts} | set(may)
        unpaired = [b if a in roles else a for a, b in _PAIRS if (a in roles) != (b in roles) and {a, b} <= allowed]
        missing += [_FACTOR.get(r, r) for r in unpaired if r not in missing]
        extra = sorted(set(roles) - allowed)
        if missing or extra:
            if skipped is None:
                keys = ", ".join(k for k, _ in roles.values())
                why = f"lacks {', '.join(missing)}" if missing else f"mixes {kind} weights with {', '.join(extra)}"
                problems.append(f"{named} ({keys}): {why}")
            else:
                skip_modules(parts, [module], skipped)
            continue
        roles = parts.pop(module)
        factors = {_FACTOR.get(r, r): t for r, (_, t) in roles.items() if r != "alpha"}
        flat = [(k, t) for r, (k, t) in roles.items() if r in _RANK_FACTORS and t.ndim < 2]
        if flat:  # the rank is read from it; other factors' shapes are checked against the layer's
            k, t = flat[0]
            problems.append(f"{named} ({k}): shape {tuple(t.shape)}, where this {kind} factor is a matrix")
            continue
        clash = _diff_lora_clash(roles) if kind == "diff" else None
        if clash is not None:
            problems.append(f"{named} ({', '.join(k for k, _ in roles.values())}): {clash}")
            continue
        rotates = kind in ROTATION_KINDS  # its .alpha is a norm constraint: 0 means none
        alpha = _alpha(roles.get("alpha"), unreadable, constraint=rotates, shapes_only=shapes_only, zero=_LYCORIS_ZERO)
        out[module] = WeightModule(module, kind, factors, alpha, tuple(k for k, _ in roles.values()))
    if unreadable:
        raise AdapterReadError(
            lines(
                format_problems(f"{source}: values that cannot be LoRA weights:", unreadable),
                "Fix or delete the bad .alpha entries (without one, alpha equals the rank; an OFT's has no "
                "constraint).",
            )
        )
    if problems:
        raise UnknownFormatError(
            lines(
                format_problems(f"{source}: LyCORIS or diff modules lorahot cannot build:", problems),
                "Re-save the adapter with every factor of each module (LoHa: hada_w1_a/b and hada_w2_a/b; LoKr: "
                "lokr_w1 or lokr_w1_a/b, and lokr_w2 or lokr_w2_a/b; a diff's LoRA: lora_down and lora_up of one "
                "rank, whose product has the diff's shape; an OFT/BOFT: oft_blocks, with rescale for LyCORIS' only; "
                "sd-scripts' OFT: oft_blocks and its .alpha; (IA)^3: weight and on_input; GLoRA: a1, a2, b1 and b2, "
                "no bm).",
            )
        )
    return out


def _check_dora_scales(parts: Parts, source: str, skipped: list[str] | None, fmt: KeyFormat) -> None:
    """Checks the ``dora_scale`` of each LoRA/LoCon module left in ``parts`` (LyCORIS' and
    kohya's weight decomposition): lorahot computes it as DoRA, which normalizes each output
    channel, so it must hold one value per output channel (``[out, 1, *ones]``: LyCORIS'
    ``wd_on_out=True``; one per input channel, ``wd_on_out=False``, made the module a ``locon``
    weight module, see :func:`_kind`). With ``skipped`` given (``strict=False``) a module whose
    ``dora_scale`` has another shape is taken out of ``parts`` and its keys appended there.

    Raises:
        UnknownFormatError: a ``dora_scale`` of another shape, naming the key, the shapes and
            the fix; a ``.diff_b`` beside it (:func:`_dora_bias_problem`).
    """
    problems = []
    for module, roles in list(parts.items()):
        why = _dora_scale_problem(roles) if "dora_scale" in roles and "A" in roles and "B" in roles else None
        if why is None and "dora_scale" in roles and "diff_bias" in roles:
            why = _dora_bias_problem(roles)
        if why is not None and skipped is not None:
            skip_modules(parts, [module], skipped)
        elif why is not None:
            problems.append(f"{_spelled(module, roles, fmt)}: {why}")
    if problems:
        raise UnknownFormatError(
            lines(
                format_problems(f"{source}: weight-decomposed (DoRA) modules lorahot cannot load:", problems),
                "Re-save each dora_scale with one value per output or per input channel, or merge the adapter into "
                "the model with the tool that reads it (LyCORIS, ComfyUI).",
            )
        )


def _dora_bias_problem(roles: dict[str, tuple[str, torch.Tensor]]) -> str:
    """Why a ``.diff_b`` beside a LoRA with a ``dora_scale`` cannot be loaded: ComfyUI, the tool
    that reads both, adds the ``.diff_b`` to the layer's bias on its own, outside the weight
    decomposition, where a LoRA bias under DoRA is scaled by the DoRA factor per output channel."""
    return (
        f"{roles['diff_bias'][0]} beside a LoRA with weight decomposition ({roles['dora_scale'][0]}): ComfyUI adds "
        "the .diff_b to the layer's bias on its own, outside the weight decomposition, where lorahot runs it as the "
        "LoRA's bias, which DoRA scales by its factor m / ||W0 + s B A|| per output channel: the bias would be off by "
        "(factor - 1) * diff_b. Drop the .diff_b keys (and add them to the model's bias yourself), or merge the "
        "adapter into the model with ComfyUI"
    )


def _dora_scale_problem(roles: dict[str, tuple[str, torch.Tensor]]) -> str | None:
    """Why a LoRA/LoCon module's ``dora_scale`` (``[out, 1, *ones]``, for ``A`` ``[r, in, *k]``
    and ``B`` ``[out, r, *ones]``) cannot be its DoRA magnitude, or None."""
    (_, a), (_, b), (kd, d) = roles["A"], roles["B"], roles["dora_scale"]
    if a.ndim < 2 or b.ndim < 2:
        return None  # _assemble names the factor
    ones = (1,) * (a.ndim - 2)
    per_out, per_in = (int(b.shape[0]), 1, *ones), (1, int(a.shape[1]), *ones)
    if tuple(d.shape) in (per_out, per_in):  # per_in: a locon weight module, not left in parts
        return None
    return (
        f"{kd} has shape {tuple(d.shape)}, expected {per_out} (one magnitude per output channel, as LyCORIS' "
        f"wd_on_out=True saves it) or {per_in} (per input channel, wd_on_out=False) for lora_down {tuple(a.shape)} "
        f"and lora_up {tuple(b.shape)}"
    )


def _diff_lora_clash(roles: dict[str, tuple[str, torch.Tensor]]) -> str | None:
    """Why a diff module's LoRA (``A`` ``[r, in, *k]``, ``B`` ``[out, r, *1]``) cannot add to its
    ``diff`` (``[out, in, *k]``, one delta of the same weight), or None."""
    if "A" not in roles:
        return None
    (ka, a), (kb, b) = roles["A"], roles["B"]
    if b.ndim < 2 or int(b.shape[1]) != int(a.shape[0]) or math.prod(b.shape[2:]) != 1:
        return f"{ka} has shape {tuple(a.shape)} and {kb} {tuple(b.shape)}: not the two factors of one rank"
    if "diff" not in roles:
        return None
    kd, d = roles["diff"]
    out, fan_in = int(b.shape[0]), math.prod(a.shape[1:])
    if d.ndim == 0 or int(d.shape[0]) != out or d.numel() != out * fan_in:
        return (
            f"its LoRA makes a [{out}, {fan_in}] update where {kd} has shape {tuple(d.shape)}; both must be deltas "
            "of one weight"
        )
    return None


def _without_strays(
    raw: RawAdapter, fmt: KeyFormat, strays: tuple[str, ...], skipped: list[str] | None
) -> dict[str, torch.Tensor]:
    """``raw``'s tensors without ``strays``, the keys of other namings in a file read as ``fmt``
    (:func:`lorahot.formats.read_as`), which ``skipped`` (``strict=False``) lists.

    Raises:
        UnknownFormatError: there are strays and ``skipped`` is None, naming how many, some of
            them and the namings they are of, and what the rest of the file was read as.
    """
    if not strays:
        return raw.tensors
    if skipped is None:
        namings = list(
            dict.fromkeys(f.name for f in FORMATS if f.name != fmt.name and any(f.claims(k) for k in strays[:64]))
        )
        sample = ", ".join(shown(k, 200) for k in strays[:5]) + (", ..." if len(strays) > 5 else "")
        raise UnknownFormatError(
            f"{raw.source}: {len(strays)} of its {len(raw.tensors)} keys are of another naming "
            f"({', '.join(namings) or 'another'}) than the rest, read as {fmt.name} naming (its keys look like "
            f"{fmt.example}): {sample}. A file holds one naming, and these keys would be read by the rules of "
            f"{fmt.name}: rename them to its names (key_map=) or delete them."
        )
    skipped += strays
    dropped = set(strays)
    return {k: t for k, t in raw.tensors.items() if k not in dropped}


def _check_zero_ranks(parts: Parts, source: str, skipped: list[str] | None, fmt: KeyFormat) -> None:
    """Refuses the LoRA modules of rank 0 (A ``[0, in, ...]``, B ``[out, 0, ...]``, as pruned or
    resized kohya files from the wild hold): their ``B @ A`` is empty, and the loaders disagree on
    what such a module is: kohya's sd-scripts scales it by ``alpha / 0`` (NaN outputs with an
    ``.alpha``; ZeroDivisionError without one), ComfyUI adds zero without an ``.alpha`` and raises
    ZeroDivisionError with one, and diffusers refuses it (PEFT takes no ``r=0``). With ``skipped``
    given (``strict=False``) they are skipped, every key listed there.

    Raises:
        AdapterMismatchError: such modules, named with their keys and shapes, and the fix.
    """
    empty = [
        m for m, roles in parts.items() if "A" in roles and "B" in roles and _zero_rank(roles["A"][1], roles["B"][1])
    ]
    if not empty:
        return
    if skipped is not None:
        skip_modules(parts, empty, skipped)
        return
    rows = [
        f"{_spelled(m, parts[m], fmt)}: "
        + ", ".join(f"{k} {list(t.shape)}" for r in ("A", "B") for k, t in [parts[m][r]])
        + (f", {parts[m]['alpha'][0]}" if "alpha" in parts[m] else "")
        for m in empty
    ]
    raise AdapterMismatchError(
        lines(
            format_problems(f"{source}: {len(empty)} LoRA module(s) of rank 0:", rows),
            "Such a module's update B @ A is empty, and loaders disagree on it: kohya's sd-scripts scales it by "
            "alpha / 0 (NaN outputs with an .alpha, ZeroDivisionError without one), ComfyUI adds zero without an "
            ".alpha and raises ZeroDivisionError with one, and diffusers refuses it (PEFT takes no r=0). Delete "
            "its keys from the file (where a loader loads it at all, it changes no output).",
        )
    )


def _zero_rank(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are a LoRA A and B of rank 0 (a nested tensor, whose shape cannot be
    read, is left to the storage checks)."""
    if a.is_nested or b.is_nested or min(a.ndim, b.ndim) < 2:
        return False
    return a.shape[0] == 0 and b.shape[1] == 0


def _spelled(module: str, roles: Mapping[str, tuple[str, torch.Tensor]], fmt: KeyFormat) -> str:
    """``module`` as the file spells it (:meth:`~lorahot.formats.table.KeyFormat.in_file`), for
    messages: a kohya key, not the half-dotted name the naming's renames make of it."""
    first = next(iter(roles.values()), None)
    return module if first is None else fmt.in_file(module, first[0])


def _incomplete(module: str, roles: dict[str, tuple[str, torch.Tensor]], fmt: KeyFormat) -> str:
    """The problem of a module that lacks its A or its B."""
    name = dict(zip("AB", fmt.roles))
    have = next((r for r in "AB" if r in roles), None)
    if have is None:
        stray = " (an alpha without its factors changes no output: delete it)" if set(roles) == {"alpha"} else ""
        return (
            f"{module}: has only {', '.join(k for k, _ in roles.values())}, no {name['A']}/{name['B']} weights{stray}"
        )
    miss = "B" if have == "A" else "A"
    return f"{module}: has {name[have]} ({roles[have][0]}) but no {name[miss]}"


def _unreadable(
    module: str, keys: tuple[str, ...], roles: dict[str, tuple[str, torch.Tensor]], problems: list[str]
) -> bool:
    """Appends a problem for each weight of ``module`` that is no tensor with data (sparse, meta)."""
    bad = [
        (role, why)
        for role in ("A", "B", "base", "magnitude", "bias")
        if role in roles and (why := storage_problem(roles[role][1]))
    ]
    for role, why in bad:
        which = "the base-layer copy" if role == "base" else role
        problems.append(f"{module} ({', '.join(keys)}): {which} is {why}; LoRA weights must be dense tensors with data")
    return bool(bad)


#: How the loaders of a LoRA module read its ``.alpha`` of 0, which they disagree on.
_LORA_ZERO = (
    "sd-scripts, which trains and loads kohya files, reads an alpha of 0 as alpha = rank, a scale of 1; ComfyUI and "
    "diffusers read it as a scale of 0"
)
#: How LyCORIS and ComfyUI read a LyCORIS module's ``.alpha`` of 0 (LoHa, LoKr, LoCon, GLoRA).
_LYCORIS_ZERO = (
    "LyCORIS, which trains and loads these modules, reads an alpha of 0 as alpha = rank, a scale of 1; ComfyUI reads "
    "it as a scale of 0"
)


def _alpha(
    entry: tuple[str, torch.Tensor] | None,
    problems: list[str],
    constraint: bool = False,
    shapes_only: bool = False,
    zero: str = _LORA_ZERO,
) -> float | None:
    """The value of a ``.alpha`` tensor: one finite real number other than 0 (else a problem,
    and None). A negative alpha scales by ``alpha / r`` as given, in every loader lorahot follows:
    sd-scripts, ComfyUI and diffusers for a LoRA; LyCORIS and ComfyUI for a LyCORIS module (LoHa,
    LoKr, Tucker LoCon, GLoRA, a diff's LoRA; a whole LoKr, a diff alone ignore it, as both do).
    An alpha of 0 is refused with ``zero``, the readings that disagree on it (a LoRA's,
    :data:`_LORA_ZERO`, or a LyCORIS module's, :data:`_LYCORIS_ZERO`). With ``constraint`` (an
    OFT's norm constraint, where 0 means none) one >= 0. With ``shapes_only`` (a header read, no
    values) only what the header decides is checked, its dtype and its shape, and None is
    returned: its value is checked at load."""
    if entry is None:
        return None
    key, t = entry
    why = None if shapes_only else storage_problem(t)
    if why is None and (t.dtype.is_complex or t.dtype == torch.bool):
        why = f"dtype {t.dtype}"
    if shapes_only and why is None and t.numel() == 1:
        return None
    value = float(t.reshape(-1)[0]) if why is None and t.numel() == 1 and not shapes_only else math.nan
    if constraint and why is None and math.isfinite(value) and value >= 0:
        return value
    if constraint:
        got = why or _alpha_shown(t, shapes_only)
        problems.append(
            f"{key}: an OFT's alpha (the norm constraint on its blocks, 0 for none) must be one finite number >= 0, "
            f"got {got}"
        )
        return None
    if why is not None or not (math.isfinite(value) and value != 0):
        got = why or _alpha_shown(t, shapes_only)
        readings = (
            f" ({zero}: drop the .alpha tensors, or set them to the rank or to the alpha the adapter was trained with)"
            if why is None and value == 0
            else ""
        )
        problems.append(f"{key}: alpha must be one finite number other than 0, got {got}{readings}")
        return None
    return value


def _alpha_shown(t: torch.Tensor, shapes_only: bool) -> str:
    """A ``.alpha`` tensor of another shape than one number, as a message shows it: its shape,
    and its first values where they were read."""
    return f"shape {tuple(t.shape)}" + ("" if shapes_only else f" value {t.reshape(-1)[:3].tolist()}")


def _user_mapping(
    adapter: Adapter,
    prefix: str | None,
    key_map: Mapping[str, str] | None,
    fuse: Fuse | None,
    split: SplitSpec | None = None,
) -> Adapter:
    if prefix is None and key_map is None and fuse is None and split is None:
        return adapter
    fmt = format_named(adapter.format)
    both: dict[str, LoraModule | WeightModule] = {**adapter.modules, **adapter.weights}  # renamed alike
    file_keys = adapter.file_keys  # as the file names them, where a read renamed them since
    if prefix is not None:
        both = select_prefix(both, prefix, adapter.source, fmt)
        # the file's own keys of that component, as a read with prefix= keeps them (those of the whole
        # file where key_map= moved every module under the prefix from elsewhere)
        file_keys = keys_under(file_keys, prefix, fmt) or file_keys
    file_keys = file_keys or tuple(both)  # as the file names them, before the renames below
    if key_map is not None:
        both = apply_key_map(both, key_map, adapter.source)
    modules = {k: m for k, m in both.items() if isinstance(m, LoraModule)}
    weights = {k: m for k, m in both.items() if isinstance(m, WeightModule)}
    if split is not None:
        modules, weights = split_by_user(modules, split, adapter.source, fmt.separator, weights)
    if fuse is not None:
        modules, weights = fuse_modules(modules, fuse, adapter.source, fmt, weights)
    stored = adapter.stored_dtypes
    return Adapter(modules, adapter.format, adapter.source, adapter.config, adapter.skipped, weights, file_keys, stored)
