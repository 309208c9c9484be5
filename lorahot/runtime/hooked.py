"""The modules a hook of lorahot's changed, and their release once they hold no LoRA layer.

:mod:`~lorahot.runtime.peft_arguments`, :mod:`~lorahot.runtime.assigned_loads` and
:mod:`~lorahot.runtime.embedding_resize` each change a model's modules at inject and undo it at
eject. Undoing only on the ejected model is not enough: with one runtime injected into a
submodule and another into the whole model, whichever is ejected first leaves the other's
layers under a changed module, and the second's eject does not know that module (an
independent audit found a hook left behind that way). So each keeps the modules it changed
here, and a release undoes the change on every one of them that no longer holds a LoRA layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

from torch import nn

from lorahot.layers import LoRALayer

__all__ = ["Hooked"]


class Hooked:
    """The modules one hook changed (weakly held: a dropped model leaves)."""

    def __init__(self) -> None:
        self._modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def add(self, module: nn.Module) -> None:
        self._modules.add(module)

    def release(self, candidates: Iterable[nn.Module], undo: Callable[[nn.Module], None]) -> None:
        """``undo`` on each of ``candidates`` (a copy of an injected model keeps the changes)
        and of the modules changed so far that holds no LoRA layer (another runtime's may
        remain), which are then forgotten."""
        for module in [*candidates, *self._modules]:
            if not any(isinstance(m, LoRALayer) for m in module.modules()):
                undo(module)
                self._modules.discard(module)
