"""lorahot's operators registered with PyTorch's dispatcher, at the host cost of one call.

``torch.library.custom_op`` wraps an implementation in several Python layers on every call:
an autograd dispatch that checks for gradients, a frame guard that keeps dynamo out of the
implementation, a check that no output aliases an input. In default mode (no CUDA graphs) a
compiled model calls a LoRA op once per layer per step, so those layers are paid hundreds of
times a step: on the CPU box a LoRA op cost 16.6 us per layer that way against 12.4 us
registered here (100 compiled layers, ``benchmarks/experiments/op_host_probe.py``; the base
linear costs 1.7). Where the formula is plain GEMMs, lorahot does not wrap it in an operator
at all (:mod:`lorahot.kernels.wide_linear`).

:func:`define` registers the implementation for every backend (``CompositeExplicitAutograd``)
and the fake the compiler traces with. The autograd key falls through to the implementation,
which starts with :func:`refuse_grad`: lorahot's ops have no backward, and a call that would
need one is refused instead of returning a result with no gradient. The layers never call them
so (they take the library formula where gradients flow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["define", "define_composite", "refuse_grad"]

_F = TypeVar("_F", bound=Callable[..., Any])

_LIB = torch.library.Library("lorahot", "FRAGMENT")


def define(schema: str, fake: Callable[..., Any], tags: tuple[torch.Tag, ...] = ()) -> Callable[[_F], _F]:
    """Decorator: defines ``lorahot::<schema>`` (``"name(Tensor x, ...) -> Tensor"``), with the
    decorated function as its implementation on every backend and ``fake`` for the compiler,
    and ``tags`` on the op. The function is returned unchanged; call the op as
    ``torch.ops.lorahot.<name>``."""
    name = schema.split("(", 1)[0]

    def register(impl: _F) -> _F:
        _LIB.define(schema, tags=tags)
        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
        torch.library.register_fake(f"lorahot::{name}", fake, lib=_LIB)
        return impl

    return register


def define_composite(schema: str) -> Callable[[_F], _F]:
    """Decorator: defines ``lorahot::<schema>`` with the decorated function as its
    ``CompositeImplicitAutograd`` implementation: plain torch that every backend, autograd and
    the compiler's fake tensors go through as written. The compiler's trace (dynamo) records one
    node for the call, and AOTAutograd then writes the function's own aten operations into the
    graph, as if the function had been traced inline: the same graph for the passes that
    follow, at the trace cost of one operation. The function is returned unchanged."""
    name = schema.split("(", 1)[0]

    def register(impl: _F) -> _F:
        _LIB.define(schema)
        _LIB.impl(name, impl, "CompositeImplicitAutograd")
        return impl

    return register


def refuse_grad(name: str, *tensors: torch.Tensor | None) -> None:
    """Raises where a gradient would have to flow through ``lorahot::<name>`` (grad mode on and
    an input that requires one): the op has no backward.

    Raises:
        RuntimeError: naming the op.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"lorahot::{name} has no backward; call it under torch.no_grad() or torch.inference_mode(), or on "
            "inputs that do not require grad (lorahot's layers take the library formula where gradients flow)."
        )
