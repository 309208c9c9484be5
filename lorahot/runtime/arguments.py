"""The arguments of the runtime's calls, checked before anything else runs: read options,
a load's sources (one adapter or a stack), its weights and scales, and the host-cache key of a
source. Each raises :class:`~lorahot.errors.UsageError` with what was passed and what to pass.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from lorahot.errors import UsageError, shown
from lorahot.io.identity import source_identity
from lorahot.io.plain import plain
from lorahot.resolve.components import DENOISER

__all__ = [
    "READ_OPTIONS",
    "check_read_options",
    "is_strict",
    "source_key",
    "parts_of",
    "refuse_stack",
    "is_sequence",
    "weights_of",
    "multiplier",
    "numbers_of",
    "denoisers_of",
    "denoisers_named",
    "routed",
    "integer",
    "whole",
    "entries",
    "text",
    "shown",
]

_T = TypeVar("_T")

#: Options :func:`lorahot.read_adapter` takes through ``load``/``preload``/``prefetch``
#: (``device`` is the runtime's choice).
READ_OPTIONS = (
    "revision",
    "subfolder",
    "token",
    "weight_name",
    "config",
    "prefix",
    "key_map",
    "fuse",
    "strict",
    "split",
)


def check_read_options(read_kwargs: dict[str, Any], components: tuple[str, ...] = ()) -> None:
    """The read options' names and types; their values are the reader's to check. A runtime
    over several models routes component prefixes itself, so it takes no ``prefix``."""
    unknown = sorted(set(read_kwargs) - set(READ_OPTIONS))
    if unknown:
        raise UsageError(
            f"unknown read option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; the read options "
            f"are {', '.join(READ_OPTIONS)}"
            + (" (device is where the runtime's buffers are; it is not an option)." if "device" in unknown else ".")
        )
    if components and read_kwargs.get("prefix") is not None:
        raise UsageError(
            f"prefix={shown(read_kwargs['prefix'], 200)}: this runtime serves components "
            f"{', '.join(components)} and sends each "
            "module of a file to its component by its prefix itself; load without prefix= (strict=False skips the "
            "modules of components it lacks)."
        )
    for name, value in read_kwargs.items():
        kinds = _OPTION_TYPES[name]
        if value is not None and not isinstance(value, kinds):
            wanted = " or ".join("a mapping" if k is Mapping else k.__name__ for k in kinds)
            raise UsageError(f"{name}={shown(value, 80)} must be {wanted} (or None), not {type(value).__name__}.")
        read_kwargs[name] = plain(value, name)  # read once: nothing of the caller's runs later


_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "revision": (str,),
    "subfolder": (str,),
    "token": (str, bool),
    "weight_name": (str,),
    "config": (Mapping,),
    "prefix": (str,),
    "key_map": (Mapping,),
    "fuse": (Mapping,),
    "strict": (bool,),
    "split": (Mapping,),
}


def is_strict(read_kwargs: dict[str, Any]) -> bool:
    return read_kwargs.get("strict") is not False


#: the options that change what a read source loads as (``denoiser``: where its modules go)
_SHAPING = ("config", "prefix", "key_map", "fuse", "strict", "split", "denoiser")


def source_key(source: Any, read_kwargs: dict[str, Any]) -> str | None:
    """Cache key of a local path or Hub id: its identity (which files, their size and mtime;
    :func:`lorahot.io.identity.source_identity`) and the options that shape what is read.
    None for in-memory sources and sources that cannot be found."""
    identity = source_identity(source, **read_kwargs)
    if identity is None:
        return None
    shaping = {k: v for k, v in read_kwargs.items() if k in _SHAPING}
    try:
        return identity + "".join(f"|{k}={shaping[k]!r}" for k in sorted(shaping))  # whole: a key, not a message
    except Exception:  # a user object whose repr fails: not cached
        return None


def parts_of(source: object) -> tuple[list[Any], bool]:
    """The adapters of a load, and whether they were given as a list (a stack).

    Raises:
        UsageError: an empty list, or a list inside the list.
    """
    if not isinstance(source, (list, tuple)):
        return [text(source)], False
    parts = entries(source, "source", "a list of sources")
    if not parts:
        raise UsageError(
            "load([]) has no adapter to load; pass a source or a list of sources (runtime.unload(slot) empties a slot)."
        )
    nested = [i for i, s in enumerate(parts) if isinstance(s, (list, tuple))]
    if nested:
        raise UsageError(
            f"source[{nested[0]}] is a {type(parts[nested[0]]).__name__}; a stack's parts are single adapters "
            "(paths, Hub ids, mappings, Adapters, PreparedAdapters or preload keys), listed once."
        )
    return [text(s) for s in parts], True


def refuse_stack(source: object, verb: str) -> None:
    if isinstance(source, (list, tuple)):
        raise UsageError(
            f"{verb} takes one adapter, got a {type(source).__name__}; {verb} each one, then load([...]) stacks them "
            "from the host cache."
        )


def is_sequence(value: object) -> bool:
    """Whether ``value`` is a sequence of entries: not text, and not bytes, whose entries are
    byte values (``bytearray(b"\\x02")`` is no list of weights ``[2]``)."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray, memoryview))


def entries(value: Sequence[Any], name: str, wanted: str, most: int = 1 << 20) -> tuple[Any, ...]:
    """The entries of a caller's sequence, read once (at most ``most``: the count of a lazy
    ``range(10**20)`` is refused, not iterated).

    Raises:
        UsageError: its ``len`` or its iteration raised, or it holds more than ``most``
            entries, or fewer or more than its ``len`` said.
    """
    try:
        n = len(value)
        read = tuple(itertools.islice(iter(value), min(n, most) + 1))
    except Exception as exc:  # a sequence type of the caller's whose __len__ or __iter__ raises anything
        raise UsageError(
            f"{name}={shown(value, 60)} cannot be read ({type(value).__name__} raised {type(exc).__name__} when "
            f"its length or entries were read); pass {wanted}."
        ) from None
    if n > most or len(read) != n:
        why = f"holds {n:,} entries, more than {most:,}" if n > most else f"has len {n} but yields another count"
        raise UsageError(f"{name}={shown(value, 60)} {why}; pass {wanted}.")
    return read


def text(value: object) -> Any:
    """``value``, where it is a ``str`` of a subclass (``numpy.str_``, a caller's own), as a plain
    ``str`` of the same characters: lorahot hashes and compares the names it is given, which
    must not run a caller's ``__hash__`` or ``__eq__``."""
    return str.__str__(value) if isinstance(value, str) and type(value) is not str else value


def weights_of(value: object, n: int, holder: str = "the stack has") -> tuple[float, ...]:
    """One finite weight per part: ``value`` is one number (every part's) or a list or tuple
    of ``n`` numbers. One adapter is a stack of one part: ``[w]`` is its weight, as ``w`` is.

    Raises:
        UsageError: not a number nor a sequence of numbers (an array or a tensor is named as
            such, with ``.tolist()`` as the fix), or a sequence of another length.
    """
    return _per_part(
        value,
        n,
        "scale",
        multiplier,
        "a list of floats, one weight per part",
        ("weight", "weights"),
        holder,
        "pass one weight per part (in the order loaded), or one number for all.",
    )


def numbers_of(value: object, name: str = "scale") -> float | tuple[float, ...]:
    """``value`` read once, as :func:`weights_of` reads it for any number of parts: one float,
    or a tuple of one float per entry of a list or tuple. A runtime call reads its caller's
    numbers with this before it checks the model (the caller's ``__float__``, ``__len__`` or
    ``__getitem__`` may change a weight), then counts them against the slot's parts with
    :func:`weights_of`, which runs nothing of the caller's on what this returns.

    Raises:
        UsageError: as :func:`weights_of`, but for the count of the entries.
    """
    if not is_sequence(value):
        return multiplier(value, name)
    assert isinstance(value, Sequence)  # for mypy: checked just above
    items = entries(value, name, "a list of floats, one weight per part")
    return tuple(multiplier(v, f"{name}[{i}]") for i, v in enumerate(items))


def _per_part(
    value: object,
    n: int,
    name: str,
    read: Callable[[object, str], _T],
    wanted: str,
    counted: tuple[str, str],
    holder: str,
    fix: str,
) -> tuple[_T, ...]:
    """One argument given once for every one of ``n`` parts or once per part: ``read(value,
    name)`` repeated ``n`` times, or ``read(entry, f"{name}[i]")`` for each entry of a list or
    tuple of ``n`` (``wanted`` describes such a list, ``counted`` names one entry and several,
    ``fix`` says what to pass instead of a list of another length)."""
    if not is_sequence(value):
        return (read(value, name),) * n
    assert isinstance(value, Sequence)  # for mypy: checked just above
    items = entries(value, name, wanted)
    if len(items) != n:
        raise UsageError(
            f"{name} has {len(items)} {counted[len(items) != 1]} but {holder} {n} part{'s' if n != 1 else ''}; {fix}"
        )
    return tuple(read(v, f"{name}[{i}]") for i, v in enumerate(items))


def multiplier(value: object, name: str = "scale") -> float:
    """The user's scale as a float: a finite real number (a Python or NumPy scalar, not a bool,
    a str, an array or a tensor)."""
    if type(value) is float and math.isfinite(value):  # the common case, checked in one step
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UsageError(f"{name}={shown(value, 40)} {_not_a_number(value, name)}")
    try:
        v = float(value)
    except OverflowError:
        raise UsageError(f"{name}={shown(value, 40)} is too large for a float; pass a finite number.") from None
    except Exception as exc:  # a number type of the caller's whose __float__ raises anything
        raise UsageError(
            f"{name}={shown(value, 40)} cannot be read as a float ({type(value).__name__}.__float__ raised "
            f"{type(exc).__name__}); pass a float."
        ) from None
    if not math.isfinite(v):
        raise UsageError(f"{name}={shown(value, 40)} must be finite.")
    return v


def _not_a_number(value: object, name: str) -> str:
    """What is wrong with a scale that is no real number, and the fix. An array or a tensor
    (anything with a ``dtype``, ``ndim`` and ``tolist``: not a ``memoryview``) is named as one:
    lorahot takes plain numbers, read on the host, never a device value it would wait for."""
    kind = type(value).__name__
    try:
        array = callable(getattr(value, "tolist", None)) and hasattr(value, "dtype")
        ndim = value.ndim if array else None  # type: ignore[attr-defined]
    except Exception:  # a property of the caller's object that raises: not an array lorahot can describe
        ndim = None
    if isinstance(ndim, int) and ndim == 0:
        return f"is a 0-d {kind}, not a number: pass a Python float ({name}=float(value))."
    if isinstance(ndim, int) and not name.startswith("scale["):
        return (
            f"is a {ndim}-d {kind}, not a list: pass one float, or a list (or tuple) of floats with one weight per "
            f"part ({name}=value.tolist())."
        )
    if isinstance(ndim, int):
        return f"is a {ndim}-d {kind}, not a number: each weight is one float."
    if name.startswith("scale["):
        return f"is not a number: pass a finite real number (a float), not {kind}."
    return f"is not a number: pass a finite real number (a float), or a list of them, one per part; not {kind}."


def denoisers_of(
    value: object,
    n: int,
    components: tuple[str, ...],
    holder: str = "the load has",
    others: Mapping[str, str] | None = None,
) -> tuple[str | None, ...]:
    """The component each of ``n`` parts sends its denoiser modules to
    (:func:`lorahot.resolve.components.route`), None for the runtime's own denoiser (its
    ``unet``, else its ``transformer``): ``value`` is None, one component name (every part's),
    or a list or tuple of ``n`` names or Nones, as ``scale`` is one weight or one per part.

    Raises:
        UsageError: a runtime over one model (nothing to choose); a name that is no component
            of the runtime (naming its components); a component that is no denoiser (``others``:
            each such component and what it is, see
            :func:`lorahot.resolve.components.non_denoisers`); anything else than a str or None; a
            list of another length.
    """
    return _per_part(
        value,
        n,
        "denoiser",
        lambda v, name: _denoiser(v, name, components, others or {}),
        "a list of component names, one per part",
        ("entry", "entries"),
        holder,
        "pass one component name (or None) per part, in the order loaded, or one name for all.",
    )


def denoisers_named(value: object, n: int) -> tuple[bool, ...]:
    """Whether the caller named a component for each of ``n`` parts (``value`` as
    :func:`denoisers_of` checked it): a name of the runtime's own denoiser is one too, though
    :func:`denoisers_of` reads it as None (the same routing, the same host cache entry)."""
    if not is_sequence(value):
        return (value is not None,) * n
    assert isinstance(value, Sequence)  # for mypy: checked just above
    return tuple(v is not None for v in value)


def routed(read_kwargs: dict[str, Any], denoiser: str | None) -> dict[str, Any]:
    """One part's options: the read options, and its ``denoiser`` where it is not the
    runtime's own. It shapes what the part loads as, as a read option does: it keys the host
    cache (:func:`source_key`), and a prepared adapter or a preload key refuses it."""
    return read_kwargs if denoiser is None else {**read_kwargs, "denoiser": denoiser}


def _denoiser(value: object, name: str, components: tuple[str, ...], others: Mapping[str, str]) -> str | None:
    """One part's denoiser component (None: the runtime's own), checked against ``components``."""
    if value is None:
        return None
    if not components:
        raise UsageError(
            f"{name}={shown(value, 80)}: this runtime serves one model, which takes every module of a file; "
            "denoiser= picks a component of a runtime over several models (a pipeline). Load without it."
        )
    if not isinstance(value, str):
        raise UsageError(
            f"{name}={shown(value, 80)} must be a component name (a str) or None, not {type(value).__name__}; "
            f"the components are {', '.join(components)}."
        )
    value = text(value)
    if value not in components:
        raise UsageError(
            f"{name}={shown(value, 80)} is no component of this runtime, whose components are "
            f"{', '.join(components)}. Name the one that takes the file's denoiser modules (diffusers' unet. or "
            "transformer., diffusion_model., lora_unet_, keys without a prefix), e.g. denoiser='transformer_2' for "
            "the low-noise file of a Wan 2.2 pipeline."
        )
    if value in others:
        denoisers = [c for c in components if c not in others]
        raise UsageError(
            f"{name}={shown(value, 80)} is {others[value]}, not a denoiser; denoiser= names the component that takes "
            f"the file's denoiser modules (diffusers' unet. or transformer., diffusion_model., lora_unet_, keys "
            f"without a prefix). This runtime's denoisers: {', '.join(denoisers) or 'none'}. Pass one of those."
        )
    default = next((c for c in DENOISER if c in components), None)
    return None if value == default else value


def whole(value: object, label: str) -> int | None:
    """``value`` as an int where it is an integer (a ``numbers.Integral``, NumPy's included, not
    a bool), else None; a :class:`UsageError` where its conversion raises (see :func:`integer`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return integer(value, label)


def integer(value: Any, label: str) -> int:
    """``int(value)`` for a ``numbers.Integral`` of the caller's type, or a :class:`UsageError`
    (``label``: the argument as the message names it) where its conversion raises."""
    try:
        return int(value)
    except Exception as exc:  # an integer type of the caller's whose __int__ raises anything
        raise UsageError(
            f"{label} cannot be read as an int ({type(value).__name__}.__int__ raised {type(exc).__name__}); pass an "
            "int."
        ) from None
