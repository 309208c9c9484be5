"""``LoraRuntime``: load, swap, activate, scale and unload adapters on an injected model.

Every operation writes in place into buffers allocated at inject time, so a compiled model
(CUDA graphs included) sees new weights without recompiling. A load is validated and packed
completely before the first byte is written; when it raises, every slot is as it was.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorahot.adapter import Adapter
from lorahot.errors import UsageError, public_api
from lorahot.io.loader import read_adapter
from lorahot.io.sources import Source
from lorahot.layers import LoRALayer
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.cache import AdapterCache, PreparedAdapter
from lorahot.runtime.merge import Merger
from lorahot.runtime.plan import pack_host, plan_load, stage
from lorahot.runtime.targets import unwrap_modules

__all__ = ["AdapterInfo", "LoraRuntime"]


@dataclass(frozen=True)
class AdapterInfo:
    """What a slot holds after :meth:`LoraRuntime.load`.

    Attributes:
        source: where the adapter came from.
        format: its detected naming.
        slot: the slot it was loaded into.
        scale: the user multiplier on top of each module's ``alpha / r``.
        ranks: injected layer name -> rank, for the layers the adapter touches.
        nbytes: bytes of adapter weights copied in (before padding).
    """

    source: str
    format: str
    slot: int
    scale: float
    ranks: dict[str, int]
    nbytes: int


class LoraRuntime:
    """Owns the LoRA layers injected into one model and the buffers behind them.

    Create it with :func:`lorahot.inject`. Slot ``i`` holds one adapter; the model computes with the
    active slot. All methods run on a compiled model without recompiling.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LoRALayer],
        buffers: BufferManager,
        cache_bytes: int = 2 << 30,
        merged: bool = False,
        fused: bool = True,
    ) -> None:
        self.model = model
        self.layers = layers
        self.buffers = buffers
        self._active = 0
        self._infos: list[AdapterInfo | None] = [None] * buffers.slots
        self._base_scales: list[list[torch.Tensor] | None] = [None] * buffers.slots  # per arena
        self._ejected = False
        for name, layer in layers.items():
            a_rows, b_rows, scale, handle = buffers.live_rows(name)
            a, b = layer.live_views(a_rows, b_rows)
            layer.bind(a, b, scale, handle=handle, fused=fused and not merged)  # merged: base kernels only
        self._addresses = {name: layer.bound_address() for name, layer in layers.items()}
        self._specs = {name: layer.spec for name, layer in layers.items()}
        devices = {a.device for a in buffers.arenas}
        self._read_device = devices.pop() if len(devices) == 1 else None  # files land where the buffers are
        self.cache = AdapterCache(cache_bytes)
        self._merger = Merger(layers, buffers) if merged else None
        for layer in layers.values():
            layer.merged = merged
        self._executor: ThreadPoolExecutor | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def max_rank(self) -> int:
        return self.buffers.max_rank

    @property
    def slots(self) -> int:
        return self.buffers.slots

    @property
    def active_slot(self) -> int:
        return self._active

    @property
    def nbytes(self) -> int:
        """Bytes of adapter storage this runtime allocated (padded, every slot)."""
        return self.buffers.nbytes

    @public_api
    def info(self, slot: int | None = None) -> AdapterInfo | None:
        """What ``slot`` (default: the active one) holds, or None if it is empty."""
        return self._infos[self._slot(self._active if slot is None else slot)]

    # -- operations -------------------------------------------------------------------------

    @public_api
    def load(
        self, source: Source | Adapter | PreparedAdapter, *, slot: int = 0, scale: float = 1.0, **read_kwargs: Any
    ) -> AdapterInfo:
        """Copies an adapter into ``slot`` in place; the model uses it if ``slot`` is active.

        Args:
            source: anything :func:`lorahot.read_adapter` accepts, an :class:`Adapter`, or a
                :class:`PreparedAdapter` from :meth:`preload`. A path that was preloaded
                (with the same read options) is taken from the host cache.
            slot: which slot to fill.
            scale: a multiplier on every module's ``alpha / r``.
            read_kwargs: passed to :func:`lorahot.read_adapter`: ``revision``, ``subfolder``,
                ``token``, ``weight_name`` (where to read), ``config`` (PEFT config fields),
                ``prefix``, ``key_map`` and ``fuse`` (how module keys map onto the layers).

        Returns:
            What the slot now holds.

        Raises:
            lorahot.LoraError: the adapter cannot be read or does not fit; nothing changed.
        """
        with _gc_paused():
            return self._load(source, slot, scale, read_kwargs)

    def _load(
        self, source: Source | Adapter | PreparedAdapter, slot: int, scale: float, read_kwargs: dict[str, Any]
    ) -> AdapterInfo:
        slot, scale = self._slot(slot), _finite(scale, "scale")
        live = slot == self._active
        prepared = self._cached(source, read_kwargs)
        self._check_usable(every_layer=prepared is None)  # every layer: cheap next to reading a file
        if prepared is not None:
            adapter, plan = prepared.adapter, prepared.plan
            self.buffers.write(slot, prepared.packs, scale, live=live)
        else:
            adapter = read_adapter(source, device=self._read_device, **read_kwargs)  # type: ignore[arg-type]
            plan = plan_load(adapter, self.buffers, self._specs)
            self.buffers.write_staged(slot, stage(plan, self.buffers), plan.scales, scale, live=live)
        self._base_scales[slot] = plan.scales
        info = AdapterInfo(adapter.source, adapter.format, slot, scale, plan.ranks, plan.nbytes)
        self._infos[slot] = info
        self._remerge(slot)
        return info

    @public_api
    def preload(self, source: Source | Adapter, *, key: str | None = None, **read_kwargs: Any) -> PreparedAdapter:
        """Reads, checks and packs an adapter into the host cache without touching the model.

        A later ``load(source)`` (same path and read options, or ``key``) or
        ``load(prepared)`` then only copies: one host-to-device copy per buffer. Safe to call
        from any thread. Raises what :meth:`load` raises.
        """
        self._check_usable()
        cache_key = key if key is not None else _cache_key(source, read_kwargs) or f"<object {id(source)}>"
        adapter = read_adapter(source, **read_kwargs)
        plan = plan_load(adapter, self.buffers, self._specs)
        prepared = PreparedAdapter(cache_key, adapter, plan, pack_host(plan, self.buffers), self.buffers)
        self.cache.put(prepared)
        return prepared

    @public_api
    def prefetch(
        self, source: Source | Adapter, *, key: str | None = None, **read_kwargs: Any
    ) -> Future[PreparedAdapter]:
        """:meth:`preload` on a background thread; the future raises what preload raises."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorahot-prefetch")
        return self._executor.submit(self.preload, source, key=key, **read_kwargs)

    def _cached(
        self, source: Source | Adapter | PreparedAdapter, read_kwargs: dict[str, Any]
    ) -> PreparedAdapter | None:
        """The prepared form of ``source`` if it is one or the cache holds it, else None."""
        if isinstance(source, PreparedAdapter):
            if source.owner is not self.buffers:
                raise UsageError("this PreparedAdapter was made for another runtime; preload it on this one.")
            return source
        cache_key = _cache_key(source, read_kwargs)
        return self.cache.get(cache_key) if cache_key is not None else None

    @public_api
    def activate(self, slot: int) -> None:
        """Makes the model compute with ``slot`` (an empty slot means no adapter)."""
        self._check_usable()
        self.buffers.activate(self._slot(slot))
        self._active = slot
        self._remerge(slot)

    @public_api
    def unload(self, slot: int | None = None) -> None:
        """Empties ``slot``, or every slot if None. An emptied active slot means no adapter."""
        self._check_usable()
        for s in range(self.slots) if slot is None else [self._slot(slot)]:
            self.buffers.clear(s, live=s == self._active)
            self._infos[s] = None
            self._base_scales[s] = None
            self._remerge(s)

    @public_api
    def set_scale(self, value: float, slot: int | None = None) -> None:
        """Sets the user multiplier of ``slot`` (default: the active slot). 0 disables it."""
        self._check_usable()
        s = self._slot(self._active if slot is None else slot)
        value = _finite(value, "scale")
        base, info = self._base_scales[s], self._infos[s]
        if base is None or info is None:
            raise UsageError(f"slot {s} is empty; load an adapter into it before set_scale.")
        self.buffers.set_scales(s, [b * value for b in base], live=s == self._active)
        self._infos[s] = AdapterInfo(info.source, info.format, s, value, info.ranks, info.nbytes)
        self._remerge(s)

    @public_api
    def eject(self) -> nn.Module:
        """Puts back the original modules this runtime wrapped; the runtime is done.

        Layers injected by another runtime on the same model stay in place. The prefetch
        thread, if one was started, finishes its current adapter and stops.
        """
        self._check_usable()
        unwrap_modules(self.model, self.layers)
        self._ejected = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        return self.model

    def _remerge(self, slot: int) -> None:
        """In merged mode, rewrites the base weights after ``slot`` changed, if it is live."""
        if self._merger is None or slot != self._active:
            return
        base, info = self._base_scales[slot], self._infos[slot]
        self._merger.apply(None if base is None else [b * (info.scale if info else 1.0) for b in base])

    # -- checks -----------------------------------------------------------------------------

    def _slot(self, slot: int) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise UsageError(
                f"slot={slot!r} is out of range; this runtime has slots 0..{self.slots - 1} (inject(..., slots=N) "
                "for more)."
            )
        return slot

    def _check_usable(self, every_layer: bool = False) -> None:
        if self._ejected:
            raise UsageError("this runtime was ejected; call lorahot.inject again.")
        names = list(self.layers) if every_layer else list(self.layers)[:1]
        moved = [n for n in names if self.layers[n].bound_address() != self._addresses[n]]
        if moved:
            raise UsageError(
                f"{moved[0]}: its LoRA buffers were replaced (model.to()/load_state_dict(assign=True) after "
                "inject?). Move the model first, then inject."
            )

    def __repr__(self) -> str:
        return (
            f"LoraRuntime(layers={len(self.layers)}, max_rank={self.max_rank}, slots={self.slots}, "
            f"active={self._active}, nbytes={self.nbytes})"
        )


def _cache_key(source: Any, read_kwargs: dict[str, Any]) -> str | None:
    """Cache key of a path-like source (with its read options); None for in-memory sources."""
    if isinstance(source, (str, os.PathLike)):
        extra = ",".join(f"{k}={read_kwargs[k]!r}" for k in sorted(read_kwargs))
        return f"{os.fspath(source)}|{extra}"
    return None


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector around a swap (if it was on).

    A load allocates a few thousand short-lived objects, enough to trigger collections whose
    cost scales with everything the process holds: 1-3 ms of a 15 ms load on the CPU box.
    Reference counting still frees every one of them at once.
    """
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _finite(value: float, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name}={value!r} is not a number.") from None
    if not math.isfinite(v):
        raise UsageError(f"{name}={value!r} must be finite.")
    return v
