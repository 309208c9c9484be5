"""The lorahot exception hierarchy.

Every error lorahot raises for bad input is a :class:`LoraError`. Messages name the file, key
or module path involved, the shapes where shapes matter, and what to do about it. A load that
raises never changes a byte of the model or of any adapter slot.
"""

from __future__ import annotations

__all__ = [
    "LoraError",
    "AdapterReadError",
    "UnknownFormatError",
    "AdapterMismatchError",
    "SourceNotFoundError",
    "UsageError",
]


class LoraError(Exception):
    """Base class of every error lorahot raises for bad input or bad use."""


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


class UsageError(LoraError, ValueError):
    """An argument to a lorahot call is out of range (slot index, scale, max_rank, targets)."""


def format_problems(title: str, problems: list[str], limit: int = 20) -> str:
    """Joins a list of problems into one message, keeping it readable when the list is long."""
    shown = problems[:limit]
    more = len(problems) - len(shown)
    lines = [title] + [f"  - {p}" for p in shown]
    if more > 0:
        lines.append(f"  ... and {more} more")
    return "\n".join(lines)
