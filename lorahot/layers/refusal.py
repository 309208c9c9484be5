"""Refusing a forward, eagerly or inside a compiled model, without breaking the compiled model.

A layer refuses an input it cannot compute right (a batch that does not fit the routing in
force) with :class:`~lorahot.errors.UsageError`. Eagerly that is a plain ``raise``. While
``torch.compile`` traces the forward, a ``raise`` is an exception the compiler meets in the
middle of a frame it is compiling: it gives up on that frame and runs it eagerly from then on,
so every later call of the compiled model, with any input, recompiles the functions inside it
one by one (as many as dynamo's recompile limit allows) instead of running the graphs it had.

So under compilation :func:`refuse` traces the operator ``lorahot::refuse`` instead: the frame
compiles, as a graph of its own guarded on the shapes that do not fit, and that graph raises
the ``UsageError`` each time it runs, before it returns anything. The message names the shapes
the graph runs on: the operator fills them in when it raises (under dynamic shapes they are
symbols while the graph is traced, and formatting them there would break the graph). The graphs compiled for
the inputs that do fit stay as they were. The operator is tagged so that CUDA graphs (mode
``reduce-overhead``) do not capture the graph it is in, and marked as having a side effect, so
that the compiler keeps it where nothing uses its result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.fx

from lorahot.errors import UsageError
from lorahot.kernels.op_registry import define

__all__ = ["refuse", "literal"]


def _fake(like: torch.Tensor, shaped: list[torch.Tensor], template: str) -> torch.Tensor:
    return torch.empty_like(like)


_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


def _message(template: str, shaped: Sequence[torch.Tensor]) -> str:
    return template.format(*(tuple(t.shape) for t in shaped))


@define("refuse(Tensor like, Tensor[] shaped, str template) -> Tensor", _fake, tags=_TAGS)
def _refuse(like: torch.Tensor, shaped: list[torch.Tensor], template: str) -> torch.Tensor:
    raise UsageError(_message(template, shaped))


# its result may go unused (a layer whose output only lends its shape): kept, not removed as dead code
torch.fx.node.has_side_effect(torch.ops.lorahot.refuse.default)


def literal(text: str) -> str:
    """``text`` as a :func:`refuse` template that names no shapes (its braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


def refuse(template: str, like: Callable[[], torch.Tensor], *shaped: torch.Tensor) -> torch.Tensor:
    """Raises :class:`~lorahot.errors.UsageError`: at once eagerly; under ``torch.compile``,
    from the compiled graph each time it runs (see the module docstring).

    Args:
        template: the message, with ``{0}``, ``{1}``, ... standing for the shapes of
            ``shaped`` (as tuples: ``{1[0]}`` is the first size of the second), filled in
            when it is raised: under dynamic shapes a size is known only then. Other braces
            doubled (:func:`literal`).
        like: makes a tensor of the shape the refusing layer would have returned (its base
            output), called only under compilation: what the graph carries on with while it
            is traced.
        shaped: the tensors whose shapes the message names.

    Raises:
        UsageError: the message.
    """
    if torch.compiler.is_compiling():
        out: torch.Tensor = torch.ops.lorahot.refuse(like(), list(shaped), template)
        return out
    raise UsageError(_message(template, shaped))
