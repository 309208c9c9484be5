"""``RuntimeState``: the one record of whether a runtime and its layers are still in service.

A runtime and every layer it bound share one :class:`RuntimeState`. Whichever way the layers
leave the model (``runtime.eject()``, or ``lorahot.eject(model)``, which finds only the
layers), the state is marked ejected once, its shutdown callbacks run (the runtime's: unwrap
its remaining layers, stop the prefetch pool), and every later runtime operation reads the
mark and refuses. The forward never reads it (it sets :attr:`RuntimeState.traced` while
``torch.jit.trace`` or ``torch.export`` records it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["RuntimeState"]


class RuntimeState:
    """Shared by a runtime and its layers: ``ejected`` is None while they serve, else how they left."""

    def __init__(self) -> None:
        self.ejected: str | None = None
        self._on_eject: list[Callable[[], None]] = []
        #: The shutdown callbacks of an eject that did not finish (a fault or Ctrl-C midway),
        #: the interrupted one first: the next eject runs them again (they are idempotent).
        self.unfinished: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        #: Called with a layer after ``load_state_dict`` wrote its base weight or bias (the
        #: runtime recomputes what it derived from them: DoRA factors); None where nothing is.
        self.base_loaded: Callable[[object], None] | None = None
        #: Called by an eager forward of a layer holding a DoRA adapter whose base weight or bias
        #: moved since its factors were computed (:meth:`lorahot.layers.LoRALayer._check_dora_base`):
        #: the runtime computes them again, under its call lock; None where nothing is.
        self.base_moved: Callable[[object], None] | None = None
        #: Called by ``lorahot.eject(model)`` before it changes anything, for every runtime whose
        #: layers it found: raises to refuse the eject (the runtime's: a merged layer's base
        #: weight reparametrized since inject); None where nothing is.
        self.before_eject: Callable[[], None] | None = None
        #: Why the model can no longer be served as injected (a layer's base weight resized in
        #: place), or None: the runtime's calls refuse with it.
        self.broken: str | None = None
        #: What recorded a graph of a layer's forward since inject (``"torch.jit.trace"``,
        #: ``"torch.export"``), always with one slot for the whole batch (a per-row routing is
        #: refused there), or None. That graph replays the one-slot path, so the runtime refuses
        #: a per-row routing from then on.
        self.traced: str | None = None

    def on_eject(self, callback: Callable[[], None]) -> None:
        """Runs ``callback`` once when the state is marked ejected."""
        self._on_eject.append(callback)

    def held(self) -> bool:
        """Whether a runtime serves the layers bound to this state, not yet ejected: a copied
        layer (``copy.deepcopy``, ``torch.save``) gets a fresh state that none holds."""
        return bool(self._on_eject)

    def mark_ejected(self, how: str) -> bool:
        """Marks the state ejected by ``how`` and runs the callbacks; False if it already was
        and they all ran. Where one raises (a fault, an interrupt), it and those after it stay
        :attr:`unfinished`, and the next call runs them again."""
        with self._lock:
            if self.ejected is None:  # one statement: an interrupt lands before it or after it, never within
                # (marked ejected with no callbacks left to run, the model kept every layer and no eject took them)
                # base_loaded, base_moved and before_eject are the runtime's: held no longer, it goes with its last
                # reference
                self.unfinished, self._on_eject, self.base_loaded, self.base_moved, self.before_eject, self.ejected = (
                    self._on_eject,
                    [],
                    None,
                    None,
                    None,
                    how,
                )
            elif not self.unfinished:
                return False
            callbacks = self.unfinished
        while callbacks:
            callbacks[0]()
            callbacks.pop(0)
        return True

    def __deepcopy__(self, memo: dict[int, object]) -> RuntimeState:
        """A copied model's layers belong to no runtime: they get a fresh state, so ejecting
        the copy never touches the original's runtime."""
        return RuntimeState()

    def __reduce__(self) -> tuple[type[RuntimeState], tuple[()]]:
        """Pickled (``torch.save(model)``) as a fresh state, for the same reason."""
        return (RuntimeState, ())
