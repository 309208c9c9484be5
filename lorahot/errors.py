"""The lorahot exception hierarchy.

Every error lorahot raises for bad input is a :class:`LoraError`. Messages name the file, key
or module path involved, the shapes where shapes matter, and what to do about it. A load that
raises never changes a byte of the model or of any adapter slot.
"""

from __future__ import annotations

import contextlib
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
    "one_line",
    "lines",
    "message",
    "cut",
    "MAX_KEY_CHARS",
    "name_problem",
    "long_name",
]

#: the longest key or name lorahot takes from a file or a caller (tensor keys, module names,
#: ``fuse=``/``split=``/``prefix=`` names, ``key_map=`` results); the longest real keys (LDM
#: kohya names) are about 100 characters, so a longer one is refused where it comes in and no
#: message has to hold it
MAX_KEY_CHARS = 1024


class LoraError(Exception):
    """Base class of every error lorahot raises for bad input or bad use.

    Its message is printable: characters a file, a caller or a model put in a key, a path or a
    module name that a terminal or a UTF-8 log cannot take (control characters, lone surrogates)
    appear as their Python escapes, so that ``print(error)`` in an ``except`` block never raises
    itself. It is one line (:func:`one_line`) unless lorahot built its lines (:func:`lines`,
    :func:`format_problems`), each of them one line: no name in it can add a line, wherever the
    message puts it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(_one_message(a) if isinstance(a, str) else a for a in args))


class AdapterReadError(LoraError):
    """The adapter file or its config cannot be read or parsed (damaged, pickled, malformed),
    or its values can never be LoRA weights (non-float dtypes, NaN/Inf, a .alpha tensor of 0)."""


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
    check is missing. Memory running out there (``MemoryError``, ``torch.OutOfMemoryError``)
    is one too, whose message says so and how to free memory instead of asking for a report."""


class WriteError(LoraError):
    """A write failed after every check had passed (out of device memory, a device fault). The
    slot it was writing is emptied, as by ``unload``, so that no mix of two adapters serves; the
    message says so (or that emptying failed too, which makes an interrupted write one too; the
    slot then names no adapter, since it may hold parts of two). Where ``unload`` failed so, the
    slot is emptied again, the other slots asked for are emptied all the same, and the message
    says whether that went through or which slots may still hold part of their adapter (named by
    none). Where ``activate`` failed so, or putting back what
    a refused or interrupted ``activate`` changed failed, the slot and routing live before are
    live again, or the message says which slot is live instead, or that the model may compute a
    mix, and how to recover. Where a load failed while staging its data on the device, before
    its first write (out of device memory), nothing was changed, and the message says so. On a
    tensor-parallel model, a rank whose own call went through raises it too where another
    rank's write, ``activate`` or ``unload`` failed or was interrupted, naming that rank: every
    rank then holds what that rank holds (the slot emptied, or the slot before live again), and
    where a slot could not be emptied on a rank, every rank's message names that slot and rank
    and no rank names an adapter there. The original is its ``__cause__``."""


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
    It runs with the CPU as torch's default device (:func:`_cpu_default_device`).
    """
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            with _cpu_default_device():
                return fn(*args, **kwargs)
        except LoraError:
            raise
        except Exception as exc:
            try:  # only on failure: a call that binds costs nothing more
                signature.bind(*args, **kwargs)
            except TypeError as wrong:
                raise UsageError(f"{fn.__qualname__}: {wrong}. See help({fn.__qualname__}).") from None
            if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):  # no missed check: memory ran out
                raise UnexpectedError(
                    f"{fn.__qualname__}: out of memory ({type(exc).__name__}: {_first_line(exc)}). "
                    "Nothing was changed. Free memory on the device the model or the adapter is on (or load a smaller "
                    "adapter, or inject with a smaller max_rank) and call it again."
                ) from exc
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


def _cpu_default_device() -> contextlib.AbstractContextManager[object]:
    """The CPU as torch's default device for a call made under ``torch.set_default_device``
    (gpt-fast sets ``"cuda"``): lorahot makes its host tensors without a device, and under another
    default the buffer a load reads a file into was made there (every load failed on its
    ``numpy()``). Where no torch function mode is on (no default device set) it enters nothing."""
    if torch._C._len_torch_function_stack() and torch.get_default_device().type != "cpu":
        return torch.device("cpu")
    return contextlib.nullcontext()


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
    """``text`` with every unprintable character but those in ``keep`` as its Python escape: safe
    to print or write to a UTF-8 log whatever a file put in it. Unprintable are the control
    characters (``\\r``, ``\\x0b``, ``\\x1c``, ``\\x85``, ...), the line and paragraph separators
    (``\\u2028``, ``\\u2029``), format characters (the bidi overrides and isolates ``\\u202a`` to
    ``\\u202e``, ``\\u2066`` to ``\\u2069``, zero-width ones) and lone surrogates."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in text)


def one_line(text: str) -> str:
    """``text`` as part of one line of a message: :func:`printable` with ``\\n`` and ``\\t``
    escaped too. Every key, path or name a file or a caller gave passes through it on its way
    into a message (:func:`shown`, :func:`cut`, :func:`format_problems`), so that no such string
    can break a message's lines or add lines of its own."""
    return printable(text, keep="")


class _Lines(str):
    """Text of several lines that lorahot put together (:func:`lines`), each line already one
    line: the only text whose line breaks a :class:`LoraError` keeps. Text added before or
    after it joins its first or its last line, as one line."""

    __slots__ = ()

    def __add__(self, other: str) -> _Lines:
        return _Lines(str.__add__(self, other if isinstance(other, _Lines) else one_line(other)))

    def __radd__(self, other: str) -> _Lines:
        return _Lines(str.__add__(one_line(other), self))


def lines(*parts: str) -> str:
    """The lines of one message: ``parts`` joined by line breaks, each part one line
    (:func:`one_line`) unless it is lines lorahot built (this function's, :func:`format_problems`'
    or :func:`message`'s result). A :class:`LoraError` keeps the line breaks of such text only, so
    a message of several lines is built with it: ``lines(format_problems(title, problems), fix)``."""
    return _Lines("\n".join(p if isinstance(p, _Lines) else one_line(p) for p in parts))


def message(error: LoraError) -> str:
    """``error``'s message, its lines kept, as :func:`lines` takes it: to put a refusal inside
    another (``lines(f"part 2: " + message(exc))``)."""
    text = error.args[0] if len(error.args) == 1 else str(error)
    return text if isinstance(text, _Lines) else one_line(str(text))


def _one_message(text: str) -> str:
    """A :class:`LoraError`'s message made of ``text``: printable, and one line unless lorahot
    built its lines (:func:`lines`)."""
    return _Lines(printable(text, keep="\n")) if isinstance(text, _Lines) else one_line(text)


def cut(text: str, limit: int = 300) -> str:
    """``text`` as one line (:func:`one_line`) cut to ``limit`` characters: a path or a name in
    a message."""
    text = one_line(text[: limit * 10])  # an escape is at most 10 characters
    return text if len(text) <= limit else text[: max(limit - 3, 0)] + "..."


def long_name(name: str) -> str | None:
    """Why ``name`` (a key or name a file or a caller gave) is too long for lorahot to take, or
    None: it is longer than :data:`MAX_KEY_CHARS`."""
    return f"is {len(name)} characters long, more than {MAX_KEY_CHARS}" if len(name) > MAX_KEY_CHARS else None


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a module name a caller gives lorahot (a ``fuse=``/``split=``/
    ``prefix=`` name, a ``key_map=`` result, a component name), or None: a module path is one
    line of printable characters, at most :data:`MAX_KEY_CHARS` long, so a longer name, or one
    holding a line break, a control or a format (bidi) character, is refused at the argument
    check. (A file's keys are read whatever characters they hold, as ``lorahot inspect`` shows
    them, and only their length is refused: messages escape them.)"""
    if (problem := long_name(name)) is not None:
        return problem
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        return f"holds {shown(bad)}: no module path holds a line break, a control or a format character"
    return None


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
    and renders only the first entries of a long list, tuple, dict or set. The text is one line
    (:func:`one_line`): an object's ``repr`` with line breaks in it (a tensor's) has them escaped."""
    try:
        if type(value) in (list, tuple, dict, set, frozenset):
            text = _CONTAINERS.repr(value)
        else:
            text = repr(value)
            if not isinstance(text, str):
                raise TypeError("__repr__ returned a non-string")
    except Exception:
        text = f"<{type(value).__name__} object>"
    return cut(text, limit)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else "(no message)"


def format_problems(title: str, problems: list[str], limit: int = 20) -> str:
    """Joins a list of problems into one message, keeping it readable when the list is long.

    The title and each problem are one line each (:func:`one_line`): a key or a name in them
    cannot add lines to the list, whatever line breaks a file, a caller or a model put in it.
    The result is :func:`lines`: a fix goes after it as ``lines(format_problems(...), fix)``."""
    listed = problems[:limit]
    more = len(problems) - len(listed)
    rows = [title] + [f"  - {one_line(p)}" for p in listed] + ([f"  ... and {more} more"] if more > 0 else [])
    return lines(*rows)
