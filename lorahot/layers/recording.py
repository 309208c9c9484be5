"""What a LoRA layer tells its runtime when ``torch.export`` or ``torch.jit.trace`` records it.

A recorder replays the path the forward took while it recorded: the one-slot path follows every
later write into the buffers in place (loads, ``set_scale``, ``activate(k)``), a per-row
routing's path does not. So a layer's forward marks its runtime as recorded
(:attr:`~lorahot.layers.state.RuntimeState.traced`), after which the runtime refuses per-row
routings, and refuses a recording made under one. The checks are constants of a compiled graph:
no guard, nothing traced.

Inductor's ``freezing`` records too, in its way: it folds every tensor the graph reads from a
module or a global into the compiled code as a constant, the LoRA buffers included, so the
compiled model keeps the adapter of its compile whatever is loaded later. A layer traced for
such a graph marks its arena (:data:`~lorahot.layers.tensor_handles.FROZEN`), and the runtime
then refuses every call that writes the buffers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lorahot.errors import UsageError
from lorahot.kernels.compile_mode import freezes
from lorahot.layers.tensor_handles import FROZEN, ROUTES

if TYPE_CHECKING:
    from lorahot.layers.base import LoRALayer
    from lorahot.layers.state import RuntimeState


def _exporting() -> bool:
    """Whether ``torch.export`` records this call, strict or not. Non-strict (the default)
    runs the forward as Python under its own tracer: ``is_exporting()`` then, and no dynamo.
    Never under ``torch.compile``, where the first test is a constant True in some torch
    versions (2.11: every compiled per-row routing was refused as an export) and the second a
    constant False. ``torch.export(strict=True)`` traces through dynamo, whose translator says
    so (:func:`_strict_export`)."""
    return (torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()) or _strict_export()


@torch._dynamo.assume_constant_result
def _strict_export() -> bool:
    """Whether dynamo traces this call for ``torch.export(strict=True)`` (or
    ``torch._dynamo.export``). Dynamo runs a function marked as a constant result as plain
    Python while it traces, so this reads its translator's ``export`` flag; the answer is a
    constant of the graph, no guard. False eagerly, under non-strict export and under
    ``torch.compile``, and where the compiler's internals moved."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()  # unset (AttributeError) or None outside dynamo's trace
    except Exception:
        return False
    return bool(getattr(tx, "export", False))


def _recorded(layer: LoRALayer, how: str) -> None:
    """Tells the runtime that ``how`` (``torch.jit.trace``, ``torch.export``) records a graph of
    the model (:attr:`~lorahot.layers.state.RuntimeState.traced`): it replays the one-slot path taken now, following
    the buffers written in place, not a per-row routing, which the runtime then refuses. Under
    a per-row routing the recording is refused: its graph would keep that routing's path after
    ``activate(k)`` (and ``torch.jit.trace`` records the routed path's sizes as tensors)."""
    _record(layer.state, layer._plan[4], layer._describe(), how)


@torch._dynamo.assume_constant_result
def _record(state: RuntimeState | None, key: int, what: str, how: str) -> bool:
    """:func:`_recorded` for the layer ``what`` on the arena ``key``, bound to ``state``. Plain
    Python in every recorder: under ``torch.export(strict=True)`` dynamo runs it while it traces
    (a function marked as a constant result), where a side effect traced in the forward itself
    (the mark, the raise) would be kept out of the program and never happen."""
    if ROUTES.get(key) is not None:
        raise UsageError(
            f"{what}: {how} of the model under a per-row routing, which lorahot does not record. "
            f"Activate one slot for the whole batch (runtime.activate(k)) before {how}: the recorded model then "
            "follows loads, set_scale and activate(k), and a per-row routing is refused while it may run."
        )
    if state is not None:
        state.traced = how
    return True


def _compiled(layer: LoRALayer) -> None:
    """While ``torch.compile`` or ``torch.export`` traces ``layer``'s forward: tells the runtime
    that an export records it (:func:`_exporting`, :func:`_recorded`), and whether inductor
    compiles the graph with ``freezing`` (:func:`lorahot.kernels.compile_mode.freezes`): it then
    folds the LoRA buffers into the compiled code as they are now, and the runtime refuses
    every later call that writes them (:data:`~lorahot.layers.tensor_handles.FROZEN`). One
    function, :func:`_exporting` written out: dynamo inlines each call it traces, in every layer."""
    if (torch.compiler.is_exporting() and not torch.compiler.is_dynamo_compiling()) or _strict_export():
        _recorded(layer, "torch.export")  # a constant when compiling: no guard, nothing traced
    _freeze(layer._plan[4])


@torch._dynamo.assume_constant_result
def _freeze(key: int) -> bool:
    """:func:`_compiled` for the arena ``key`` (a constant the graph is guarded on already: a
    function marked as a constant result is guarded on its arguments); plain Python while
    dynamo traces: no guard of its own, nothing traced."""
    if freezes():
        FROZEN.add(key)
    return True
