"""The lorahot exception hierarchy.

Every error lorahot raises for bad input is a :class:`LoraError`. Messages name the file, key
or module path involved, the shapes where shapes matter, and what to do about it. A load that
raises never changes a byte of the model or of any adapter slot.
"""

from __future__ import annotations

import functools
import inspect
import reprlib
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

__all__ = [
    "LoraError",
    "AdapterReadError",
    "UnknownFormatError",
    "AdapterMismatchError",
    "SourceNotFoundError",
    "UsageError",
    "UnexpectedError",
    "WriteError",
    "public_api",
    "printable",
    "shown",
]


class LoraError(Exception):
    """Base class of every error lorahot raises for bad input or bad use.

    Its message is printable: characters a file or a caller put in a key or a path that a
    terminal or a UTF-8 log cannot take (control characters, lone surrogates) appear as their
    Python escapes, so that ``print(error)`` in an ``except`` block never raises itself."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(printable(a) if isinstance(a, str) else a for a in args))


class AdapterReadError(LoraError):
    """The adapter file or its config cannot be read or parsed (damaged, pickled, malformed),
    or its values can never be LoRA weights (non-float dtypes, NaN/Inf, alpha <= 0)."""


class UnknownFormatError(LoraError):
    """The tensors are readable but their key naming matches no known adapter format."""


class AdapterMismatchError(LoraError):
    """The adapter does not fit the injected model, or disagrees with itself: unknown or
    ambiguous modules, wrong shapes or ranks, an A without its B, a config contradicting it."""


class SourceNotFoundError(LoraError):
    """The source (path, Hub repo id, file inside it) cannot be resolved."""


class UsageError(LoraError, ValueError, TypeError):
    """A call to lorahot is wrong: an argument out of range or of the wrong type (slot index,
    scale, max_rank, targets), or an operation the current state does not allow (a runtime
    already ejected, modules already injected). Also a ``ValueError`` and a ``TypeError``, so
    existing ``except`` clauses keep working."""


class UnexpectedError(LoraError):
    """An exception lorahot did not foresee reached a public entry point. It is wrapped, so that
    catching :class:`LoraError` still survives it; the original is its ``__cause__``. Every
    check runs before the first write, so nothing was changed. Please report it: it means a
    check is missing."""


class WriteError(LoraError):
    """A write failed after every check had passed (out of device memory, a device fault). The
    slot it was writing is emptied, as by ``unload``, so that no mix of two adapters serves; the
    message says so (or that emptying failed too). The original is its ``__cause__``."""


_P = ParamSpec("_P")
_R = TypeVar("_R")


#: torch.compiler.disable takes a reason its refusals show (torch 2.8 and later)
_DISABLE_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters


def public_api(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Marks a public entry point: whatever it raises is a :class:`LoraError`.

    lorahot's own errors pass through; arguments the call's signature does not take (missing,
    unknown, too many) are a :class:`UsageError`; any other ``Exception`` (a missed check, a
    library error) becomes an :class:`UnexpectedError` naming the call. ``KeyboardInterrupt``
    and ``SystemExit`` pass through untouched.

    An entry point called inside a function ``torch.compile`` traces (a serving step that calls
    ``runtime.activate(slots)`` and then the model) runs eagerly, behind a graph break, as it
    does outside: its checks and in-place writes are host work, which dynamo cannot always trace
    (a routing of a new length, whose tensor is allocated then, raised from inside torch).
    Under ``fullgraph=True`` torch refuses the break, naming the call and, as its reason, the fix.
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except LoraError:
            raise
        except Exception as exc:
            try:  # only on failure: a call that binds costs nothing more
                signature.bind(*args, **kwargs)
            except TypeError as wrong:
                raise UsageError(f"{fn.__qualname__}: {wrong}. See help({fn.__qualname__}).") from None
            raise UnexpectedError(
                f"{fn.__qualname__}: unexpected {type(exc).__name__}: {_first_line(exc)}. Nothing was changed. "
                "This is a gap in lorahot's checks: please report it with the adapter or call that caused it."
            ) from exc

    reason = (
        f"lorahot's {fn.__qualname__} runs eagerly (host-side checks and in-place writes); under fullgraph=True call "
        "it outside the compiled function and compile the model, or compile the function without fullgraph=True"
    )
    # traced: a graph break, no frame of it compiled
    eager: Callable[_P, _R] = torch.compiler.disable(wrapper, **({"reason": reason} if _DISABLE_REASON else {}))
    return eager


def unfinished_eject(call: str, exc: Exception) -> UnexpectedError:
    """The error of an eject that failed midway (a device fault while putting a base weight
    back): unlike every other call's, it changed something, and calling it again finishes it."""
    error = UnexpectedError(
        f"{call}: unexpected {type(exc).__name__}: {_first_line(exc)}. The eject did not finish: some LoRA layers "
        f"may still be in the model, and the runtime refuses every call but eject. Call {call} again to finish it."
    )
    error.__cause__ = exc
    return error


def printable(text: str, keep: str = "\n\t") -> str:
    """``text`` with every unprintable character (control, lone surrogate) but those in ``keep``
    as its Python escape: safe to print or write to a UTF-8 log whatever a file put in it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in text)


#: how :func:`shown` renders a builtin container: its first entries, each cut short, so a list
#: of millions costs a message no more than one of forty
_CONTAINERS = reprlib.Repr()
_CONTAINERS.maxlevel = 3
_CONTAINERS.maxlist = _CONTAINERS.maxtuple = _CONTAINERS.maxdict = 40
_CONTAINERS.maxset = _CONTAINERS.maxfrozenset = 40
_CONTAINERS.maxstring = _CONTAINERS.maxother = 200


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for a message about a value a caller or a
    file gave. It never raises (an object whose ``repr`` raises shows as ``<TypeName object>``)
    and renders only the first entries of a long list, tuple, dict or set."""
    try:
        if type(value) in (list, tuple, dict, set, frozenset):
            text = _CONTAINERS.repr(value)
        else:
            text = repr(value)
            if not isinstance(text, str):
                raise TypeError("__repr__ returned a non-string")
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else "(no message)"


def format_problems(title: str, problems: list[str], limit: int = 20) -> str:
    """Joins a list of problems into one message, keeping it readable when the list is long."""
    shown = problems[:limit]
    more = len(problems) - len(shown)
    lines = [title] + [f"  - {p}" for p in shown]
    if more > 0:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)
