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
        holds = _Holders()
        for module in [*candidates, *self._modules]:
            if not holds(module):
                undo(module)
                self._modules.discard(module)


class _Holders:
    """Whether a module holds a LoRA layer (is one, or has one anywhere under it), each module
    looked at once over every question asked: a release asks it of every module of a model,
    which a walk under each would answer in a time growing with the modules times their depth
    (an SDXL UNet's eject walked its modules some ten times over)."""

    def __init__(self) -> None:
        self._known: dict[int, bool] = {}
        self._seen: list[nn.Module] = []  # keeps each id above the module's own
        self._cyclic = False  # a module under itself: each question is a walk, as torch's modules() makes it

    def __call__(self, module: nn.Module) -> bool:
        if id(module) not in self._known and not self._cyclic:
            self._visit(module)
        if self._cyclic:
            return any(isinstance(m, LoRALayer) for m in module.modules())
        return self._known[id(module)]

    def _visit(self, root: nn.Module) -> None:
        """The answer for ``root`` and each module under it not known yet, children first."""
        known, pending = self._known, {id(root)}
        stack = [(root, iter(root._modules.values()), [isinstance(root, LoRALayer)])]
        self._seen.append(root)
        while stack:
            module, children, holds = stack[-1]
            for child in children:
                if child is None:
                    continue
                if id(child) in pending:
                    self._cyclic = True
                    return
                if id(child) in known:
                    holds[0] = holds[0] or known[id(child)]
                    continue
                pending.add(id(child))
                self._seen.append(child)
                stack.append((child, iter(child._modules.values()), [isinstance(child, LoRALayer)]))
                break
            else:
                stack.pop()
                pending.discard(id(module))
                known[id(module)] = holds[0]
                if stack:
                    stack[-1][2][0] = stack[-1][2][0] or holds[0]
