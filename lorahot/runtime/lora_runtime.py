"""``LoraRuntime``: load, swap, stack, activate, scale and unload adapters on an injected model.

Every operation writes in place into buffers allocated at inject time, so a compiled model
(CUDA graphs included) sees new weights without recompiling. A load is validated and packed
completely before the first byte is written; when it raises, every slot is as it was. A slot
holds one adapter or a stack of several, active together (:mod:`lorahot.runtime.stack`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import numbers
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, NamedTuple, NoReturn, SupportsIndex, cast

import numpy as np
import torch
from torch import nn

from lorahot.adapter import Adapter, LoraModule
from lorahot.errors import (
    AdapterMismatchError,
    LoraError,
    UsageError,
    WriteError,
    format_problems,
    lines,
    message,
    public_api,
    shown,
    unfinished_eject,
)
from lorahot.formats import ModelNames
from lorahot.io.loader import loading_into, read_adapter, reading_for
from lorahot.io.read_buffers import ReadBuffers
from lorahot.io.sources import Source
from lorahot.io.tensorfile import largest_tensor
from lorahot.kernels import stacked_shrinks
from lorahot.kernels.compile_mode import freezing_on
from lorahot.layers import LayerSpec, LoRALayer, RuntimeState
from lorahot.layers.norm import is_weightless_norm
from lorahot.layers.tensor_handles import FROZEN
from lorahot.resolve.components import non_denoisers
from lorahot.resolve.file_names import wrapper_levels
from lorahot.resolve.keys import head_sizes
from lorahot.runtime import assigned_loads, embedding_resize, fingerprint, fused_projections, peft_arguments, racy
from lorahot.runtime.activate_replay import ActivateReplay
from lorahot.runtime.agreement import Agreement
from lorahot.runtime.aliases import own_storages, unaliased
from lorahot.runtime.arguments import (
    check_read_options,
    denoisers_named,
    denoisers_of,
    integer,
    is_strict,
    parts_of,
    refuse_stack,
    routed,
    source_key,
    text,
)
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.cache import (
    AdapterCache,
    PreparedAdapter,
    check_prepared,
    preload_key,
    private,
    same_path,
    snapshot,
)
from lorahot.runtime.call_guard import CallGuard, on_prefetch_thread, one_call_at_a_time, reading
from lorahot.runtime.components import Pipeline
from lorahot.runtime.dora import DoraFactors
from lorahot.runtime.experts import find_experts
from lorahot.runtime.info import AdapterInfo, PartInfo, detached
from lorahot.runtime.layer_weights import (
    LayerWeights,
    Resolver,
    Weight,
    displayed,
    given_of,
    given_weights,
    per_layer,
)
from lorahot.runtime.load_replay import LoadReplay
from lorahot.runtime.merge import Merger, check_ejectable
from lorahot.runtime.placement import Placement
from lorahot.runtime.plan import (
    Checked,
    LoadPlan,
    check_fit,
    check_multiplier,
    check_saved_bases,
    check_unit_scale,
    dtype_max,
    dtype_tiny,
    forget_values,
    layer_refusal,
    pack_host,
    restage,
    unit_weight,
    validate,
)
from lorahot.runtime.prefetches import PendingKeys, failed_prefetch, keys_of, prefetch_pool, shielded
from lorahot.runtime.routing import (
    Routing,
    check_experts,
    check_routing,
    check_sequence_first,
    check_towers,
    one_slot,
    routed_slots,
)
from lorahot.runtime.scale_replay import ScaleReplay
from lorahot.runtime.sequence_first import find_sequence_first
from lorahot.runtime.settle import LiveFault, OtherRankFailed, Settlement, Unsettled, described, which_ranks
from lorahot.runtime.skeleton import Skeleton, Skeletons
from lorahot.runtime.stack import Stack, build
from lorahot.runtime.targets import beside_layers, unwrap_modules
from lorahot.runtime.towers import find_towers
from lorahot.runtime.updates import UpdateRange
from lorahot.runtime.wide import WideWeights, widen_layers

__all__ = ["AdapterInfo", "PartInfo", "LoraRuntime", "roots", "release_hooks"]

#: What ``load`` takes as one adapter.
One = Source | Adapter | PreparedAdapter
#: a ``scale``: a number, a dict (component -> weight, or a UNet's blocks), or a list of those, one per part
Scale = float | Mapping[str, Any] | Sequence[float | Mapping[str, Any]]


#: how many times the largest factor a layer could take a file's tensor may be (LoKr and full
#: diffs of layers of other components, which strict=False skips, are no larger in practice)
_LARGEST_MARGIN = 4


def _before_eject(runtime: weakref.ref[LoraRuntime], model: nn.Module, layers: dict[str, LoRALayer]) -> None:
    """What ``lorahot.eject(model)`` checks of a runtime before it changes anything: that no call
    of the runtime is under way on this thread
    (:meth:`~lorahot.runtime.call_guard.CallGuard.refuse_within_call`), and that its layers can
    be ejected."""
    alive = runtime()
    if alive is not None:
        alive._guard.refuse_within_call("eject")
    _check_ejectable(model, layers)


def _largest_factor(specs: Iterable[LayerSpec], max_rank: int) -> int:
    """The most elements a file's tensor may have for these layers (see
    :func:`lorahot.io.tensorfile.largest_tensor`): :data:`_LARGEST_MARGIN` times the largest of
    a full weight diff, a rank-``max_rank`` A plus B, and a Tucker core, over the whole layers."""
    most = 1
    for spec in specs:
        fin, fout = spec.full_dims()
        most = max(most, fin * fout, max_rank * (fin + fout), max_rank * max_rank * fin)
    return _LARGEST_MARGIN * most


class _Limits(NamedTuple):
    """One part's scale limits (:meth:`LoraRuntime._within_range`): ``(largest, top)`` pairs,
    where ``largest * |weight|`` must stay within ``top``, and ``(smallest, floor)`` pairs,
    where ``smallest * |weight|`` must not fall below ``floor`` (unless the weight is 0)."""

    tops: list[tuple[float, float]]
    floors: list[tuple[float, float]]


#: why a runtime is not copied or pickled (a copy would share the model's buffers, with slots
#: and an active adapter of its own)
_NOT_COPIED = (
    "a LoraRuntime cannot be copied or pickled: a copy would write the same model's LoRA buffers with its own idea "
    "of what each slot holds and which is active. Copy the model instead (copy.deepcopy(model), torch.save(model): "
    "the copy keeps the LoRA layers and the adapters loaded, and has no runtime) and call lorahot.inject on a fresh "
    "copy of the base model for a second runtime."
)


class LoraRuntime:
    """Owns the LoRA layers injected into one model and the buffers behind them.

    Create it with :func:`lorahot.inject`. Over several models (a pipeline's components), its
    layers are named ``<component>.<module path>`` and :attr:`model` is a
    :class:`~lorahot.runtime.components.Components` holding them. Slot ``i`` holds one
    adapter, or a stack of several active together (their updates summed, each at its own
    weight); the model computes with the active slot. All methods run on a compiled model
    without recompiling. Every method checks its arguments and the runtime's state before it
    changes anything; once the runtime is ejected (``runtime.eject()`` or ``lorahot.eject(model)``), every method raises
    :class:`~lorahot.UsageError`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LoRALayer],
        buffers: BufferManager,
        cache_bytes: int = 2 << 30,
        merged: bool = False,
        fused: bool = True,
        extras: bool = True,
        components: tuple[str, ...] = (),
        regional: bool = False,
        pipeline: Pipeline | None = None,
    ) -> None:
        self._agreement = Agreement.of(layers, model)  # a tensor-parallel model: its ranks agree before each write
        self._model = model
        self.components = components  # empty for a single model
        self._pipeline = pipeline  # the pipeline the components came from: it must still call them
        self._extras = extras
        self.layers = layers
        self.buffers = buffers
        #: agrees on each call's checks and settles its writes over the ranks (:mod:`lorahot.runtime.settle`)
        self._settle = Settlement(self._agreement, buffers)
        self._active = 0
        self._infos: list[AdapterInfo | None] = [None] * buffers.slots
        self._stacks: list[Stack | None] = [None] * buffers.slots  # what each slot holds: its parts' plans and rows
        self._weights: list[tuple[Weight, ...]] = [()] * buffers.slots  # each slot's user weights, one per part
        self._state = RuntimeState()  # shared with the layers: lorahot.eject(model) marks it
        self._bind(fused and not merged, extras, regional)  # merged: base kernels only
        if fused and not merged:
            widen_layers(layers, buffers, model)
        if not merged:  # compiled, layers sharing an input share one shrink GEMM
            stacked_shrinks.install()
        self._wide = WideWeights(layers, buffers)
        self._replay = ScaleReplay(buffers, self._wide)
        self._load_replay = LoadReplay(buffers, self._wide)
        self._activate_replay = ActivateReplay(buffers, self._wide)
        #: the last stack whose weights were range-checked, and per part its limits (:meth:`_within_range`)
        self._ranges: tuple[weakref.ref[Stack], list[_Limits]] | None = None
        self._routing = Routing(buffers)
        self._arena_names = _arena_names(buffers)  # for messages
        self._updates = UpdateRange(buffers, self._arena_names)  # each slot's update within its dtype's range
        self._placement = Placement(model, layers)  # checked before each call (_check_usable)
        #: the memory a write may change, which a loaded adapter's tensors must not share
        #: (:mod:`lorahot.runtime.aliases`)
        self._own = own_storages(
            model,
            [t for a in buffers.arenas for t in (a.A, a.B, a.S, a.E)]
            + [layer.wide_rows() for layer in layers.values() if layer.wide],
        )
        self._index_model(model)
        devices = {a.device for a in buffers.arenas}
        self._read_device = devices.pop() if len(devices) == 1 else None  # files land where the buffers are
        self._cache = AdapterCache(cache_bytes)
        self._skeletons = Skeletons()  # the plans' structures by the reader's recipe
        self._merger = Merger(layers, buffers) if merged else None
        #: merged: inductor's global freezing was seen on (at inject, or at a call that writes),
        #: so a model compiled meanwhile may hold the merged weights as constants (see _check_frozen)
        self._merged_frozen = merged and freezing_on()
        #: the host (and device) buffers files are read into, reused from load to load; not in
        #: merged mode, which recomputes the merged weights from the plans' tensors
        self._read_buffers = ReadBuffers(self._read_device) if self._read_device is not None and not merged else None
        # functions of the layers, not the runtime's methods: nothing the runtime holds refers back to it,
        # so once ejected it goes with its last reference, as the model does (not at the next gc cycle)
        self._dora = DoraFactors(
            layers, buffers, functools.partial(_base_weight, layers), functools.partial(_base_bias, layers)
        )
        for layer in layers.values():
            layer.merged = merged
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        #: the call lock load, activate, unload and set_scale hold, and the note of the call holding it
        #: (:mod:`lorahot.runtime.call_guard`)
        self._guard = CallGuard(
            tuple(a.handle.key for a in buffers.arenas), tuple(a.A.device.type for a in buffers.arenas)
        )
        self._pending_keys = PendingKeys(self.cache)  # keyed prefetches under way: a load of one waits
        self._install_hooks()

    def _bind(self, fused: bool, extras: bool, regional: bool) -> None:
        """Binds each layer to its live rows of the buffers and to the runtime's shared state;
        the layers a per-row routing cannot reach (experts, towers, sequence-first) are marked
        unrouted."""
        #: the layers whose rows are not the batch's: a mixture-of-experts block's experts (by
        #: name or structure), a multimodal model's vision tower and the layers that see their
        #: input sequence-first; a per-row routing reaches none (check_experts, check_towers,
        #: check_sequence_first), and under one they compute their base output
        self._experts = find_experts(self.model, self.layers)
        self._towers = find_towers(self.model, self.layers)
        self._sequence_first = find_sequence_first(self.model, self.layers)
        unrouted = self._experts | self._towers | self._sequence_first
        for name, layer in self.layers.items():
            a_rows, b_rows, scale, extras_view, handle = self.buffers.live_rows(name)
            a, b = layer.live_views(a_rows, b_rows)
            layer.bind(
                a,
                b,
                scale,
                extras_view,
                handle=handle,
                fused=fused,
                state=self._state,
                extras=extras,
                path=name,
                regional=regional,
                unrouted=name in unrouted,
            )

    def _index_model(self, model: nn.Module) -> None:
        """What a file's keys and tensors are checked against: the layers' specs, the most
        elements a file's tensor may have (:func:`_largest_factor`), the model's other modules
        (a key naming one of them is not placed on a neighbour; a norm without a weight is none:
        a naming's alias of that path lands on the norm it means), what ``denoiser=`` may not
        name, the norms without a weight (a key naming one is refused as such: there is no weight
        to fold its delta into), the modules the model reads without calling them (a key naming
        one is refused with why inject refuses them as targets), where a file's rows interleave
        attention heads, and every module path, which tells a file's keys that name the model's
        own modules from another naming's (:func:`lorahot.io.loader.reading_for`)."""
        self._specs = {name: layer.spec for name, layer in self.layers.items()}
        self._largest = _largest_factor(self._specs.values(), self.buffers.max_rank)
        modules = list(model.named_modules())
        self._names = ModelNames.of(name for name, _ in modules)
        paths = [name for name, module in modules if not is_weightless_norm(module)]
        self._non_denoisers = non_denoisers(self.components, paths)
        # as plan_targets resolves with a model: the other paths, the weightless norms, what inject refuses as unread
        self._others, self._weightless, self._unwrapped = beside_layers(modules, self.layers)
        self._levels = wrapper_levels(modules)  # the levels a layer's file name drops: real wrappers' only
        self._heads = head_sizes(model.named_modules())

    def _install_hooks(self) -> None:
        """Installs lorahot's hooks on the modules a user calls (PEFT's call arguments, assigned
        loads, embedding resizes, fused projections: undone by :func:`release_hooks`), and the
        shared state's calls back into the runtime (eject, a base weight loaded)."""
        for root in self._roots():
            peft_arguments.install(root)
            assigned_loads.install(root)
            embedding_resize.install(root)
            fused_projections.install(root)
        self._state.on_eject(self._detach)
        self._state.base_loaded = self._base_loaded
        self._state.base_moved = self._base_moved
        self._state.before_eject = functools.partial(_before_eject, weakref.ref(self), self.model, self.layers)

    def _roots(self) -> list[nn.Module]:
        """The modules a user calls: the model, or each component."""
        return roots(self.model, self.components)

    # -- properties -------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        """The injected model (over several models, a
        :class:`~lorahot.runtime.components.Components` holding them)."""
        return self._model

    @property
    def cache(self) -> AdapterCache:
        """The host cache of the adapters :meth:`preload` prepared (its ``budget_bytes`` may be
        set; the cache itself is the runtime's own)."""
        return self._cache

    @property
    def max_rank(self) -> int:
        return self.buffers.max_rank

    @property
    def slots(self) -> int:
        return self.buffers.slots

    @property
    def active_slot(self) -> int:
        """The slot the whole batch computes with (the last ``activate(k)``; while a per-row
        routing is in force, see :attr:`routing`)."""
        return self._active

    @property
    def routing(self) -> tuple[int, ...] | None:
        """The per-row routing in force (one slot per row, or per token with ``lengths``;
        -1 for the base model only), or None while the whole batch uses :attr:`active_slot`."""
        return self._routing.rows

    @property
    def nbytes(self) -> int:
        """Bytes of adapter storage this runtime allocated (padded, every slot, and the scaled B
        columns beside the wide layers' weights). Not counted: the buffers files are read into
        (:mod:`lorahot.io.read_buffers`), which hold the largest file loaded, once on the host
        (pinned on CUDA) and once on the device, per part of the largest stack.

        Raises:
            UsageError: the runtime was ejected, as every operation then does. Eject frees none
                of this storage: the runtime object holds it until it is dropped (``del runtime``).
        """
        self._check_usable(placement=False)
        return self._allocated()

    def _allocated(self) -> int:
        return self.buffers.nbytes + self._wide.nbytes

    @public_api
    def info(self, slot: int | None = None) -> AdapterInfo | None:
        """What ``slot`` (default: the active one) holds, or None if it is empty."""
        self._check_usable(placement=False)
        info = self._current_info(self._slot(self._active if slot is None else slot))
        return None if info is None else detached(info)

    def _current_info(self, s: int) -> AdapterInfo | None:
        """What slot ``s`` holds, with the weights of its last ``set_scale`` (which leaves
        rebuilding the record to the first call that asks: re-weighting stays cheap)."""
        info, weights = self._infos[s], tuple(displayed(w) for w in self._weights[s])
        if info is None or tuple(p.scale for p in info.parts) == weights:
            return info
        info = replace(
            info,
            scale=weights if isinstance(info.scale, tuple) else weights[0],
            parts=tuple(replace(p, scale=w) for p, w in zip(info.parts, weights)),
        )
        self._infos[s] = info
        return info

    # -- operations -------------------------------------------------------------------------

    @public_api
    def load(
        self,
        source: One | Sequence[One],
        *,
        slot: int = 0,
        scale: Scale = 1.0,
        denoiser: str | Sequence[str | None] | None = None,
        **read_kwargs: Any,
    ) -> AdapterInfo:
        """Copies an adapter, or a stack of several, into ``slot`` in place; the model uses it
        if ``slot`` is active.

        Args:
            source: anything :func:`lorahot.read_adapter` accepts, an :class:`Adapter`, a
                :class:`PreparedAdapter` from :meth:`preload`, or the ``key`` given to
                :meth:`preload`. A local path or Hub id preloaded with the same read options is
                taken from the host cache while its files are unchanged (same size and mtime;
                for a Hub id, while the local Hugging Face cache resolves its revision to the
                same commit: no network call is made, so a branch that moved on the Hub is
                seen once something downloads the new commit).
                Or a list (or tuple) of those: a *stack*, all active together (the model adds
                their updates). Each part keeps its own per-module ``alpha / r`` (PEFT
                patterns, rsLoRA, kohya alphas) and occupies its own rows of each layer's
                buffers, so in every layer the parts' ranks must add up to at most
                ``max_rank`` (:func:`lorahot.plan_targets` with ``stacked=True`` plans that).
            slot: which slot to fill.
            scale: a multiplier on every module's ``alpha / r``: a finite real number (a
                Python or NumPy scalar), or a list (or tuple) of one weight per part: for a
                stack, one per part; one adapter is a stack of one part, so ``[w]`` is ``w``.
                Arrays and tensors are refused (pass ``.tolist()``). On a runtime over a
                pipeline, a weight may be a dict component -> number (a UNet's: a dict of
                blocks, ``{"down": ..., "mid": ..., "up": ...}``), as diffusers'
                ``set_adapters`` takes it; components left out get 1; over a UNet alone, a
                dict of blocks (see :mod:`lorahot.runtime.layer_weights`). For a stack, a list
                of one per part.
            denoiser: on a runtime over several models, the component that takes the
                denoiser modules of the file (the keys that would go to its ``unet``, else its
                ``transformer``: diffusers' ``unet.``/``transformer.``, ``diffusion_model.``,
                ``lora_unet_``, keys without a prefix), such as ``"transformer_2"`` for the
                low-noise file of a Wan 2.2 pipeline (diffusers' ``load_into_transformer_2``);
                None: the runtime's own. For a stack, one name for every part, or a list of
                one name (or None) per part: a stack's parts may go to different components.
            read_kwargs: passed to :func:`lorahot.read_adapter` (for a stack, for every part):
                ``revision``, ``subfolder``, ``token``, ``weight_name`` (where to read),
                ``config`` (PEFT config fields), ``prefix``, ``key_map``, ``fuse`` and
                ``split`` (how module keys map onto the layers), and ``strict`` (``False``:
                keys that cannot be placed are skipped and listed in
                :attr:`AdapterInfo.skipped` instead of refusing the file).

        Returns:
            What the slot now holds (for a stack, :attr:`AdapterInfo.parts` describes each).

        Raises:
            lorahot.LoraError: the adapter cannot be read or does not fit (its values out of
                the buffers' range included); for a stack, any part, or the parts together
                (ranks over ``max_rank`` in a layer, DoRA on a layer another part touches,
                unmerged, two LoRA biases on one layer: :class:`AdapterMismatchError`); UsageError for
                a bad call (a ``scale`` sequence whose length is not the number of parts, a
                scale other than 1 for an adapter holding a LyCORIS or kohya LoRA trained with
                weight decomposition: ``dora_scale``), or
                for an adapter with weights on a mixture-of-experts block's experts loaded
                into a slot the per-row routing in force sends rows to
                (:func:`lorahot.runtime.routing.check_experts`).
                Every part is checked before anything is written: nothing changed.
            WriteError: a write failed after every check had passed (out of memory, a device
                fault), or emptying an interrupted write's slot failed: the slot is emptied, or
                the message says it may hold parts of two adapters and to unload it. On a
                tensor-parallel model, also where another rank's write failed or was
                interrupted (naming that rank): every rank empties the slot (the interrupted
                rank too, before its interrupt goes on).
        """
        # keys whose prefetch is under way: waited for before the call lock, which a done callback
        # of an earlier prefetch on the prefetch thread may be waiting for (lorahot.runtime.prefetches)
        self._pending_keys.settle(keys_of(source), on_prefetch_thread(self._executor))
        self._guard.refuse_within_call("load")
        with (
            self._guard.calls,
            self._guard.under_way("load"),
            self._guard.autocast_off(),
            _gc_paused(),
            reading(self._read_buffers),
        ):
            return self._load(source, slot, scale, denoiser, read_kwargs)

    def _load(
        self,
        source: One | Sequence[One],
        slot: int,
        scale: Scale,
        denoiser: object,
        read_kwargs: dict[str, Any],
    ) -> AdapterInfo:
        checked = self._settle.agreed(
            lambda: self._check_load(source, slot, scale, denoiser, read_kwargs),
            "load",
            lambda c: {
                "arguments": fingerprint.arguments(c[0], _encoded(c[3])),  # slot, weights
                **fingerprint.plans(c[2].parts, self.layers),
            },
        )
        slot, adapters, stack, weights, listed, write, hits = checked
        live = slot == self._active

        def write_all() -> AdapterInfo:
            refreshed = write(live)
            self._refresh_dora(slot, stack.dora, live, stack.decomposed)
            self._stacks[slot], self._weights[slot] = stack, weights
            self._watch_dora()
            info = self._info(slot, adapters, stack, weights, listed)
            self._infos[slot] = info
            if not refreshed:  # a replayed load (lorahot.runtime.load_replay) refreshed the wide rows itself
                self._remerge(slot)
            self.cache.touch(hits)  # the cache entries it took, most recently used now that they are served
            return detached(info)

        return self._settle.written("load", slot, write_all, self._empty_all, self._merger)

    def _empty(self, slot: int) -> None:
        """Empties ``slot``, as :meth:`unload` does."""
        self.buffers.clear(slot, live=slot == self._active)
        self._infos[slot] = None
        self._stacks[slot], self._weights[slot] = None, ()
        self._watch_dora()
        self._remerge(slot)

    def _check_load(
        self,
        source: One | Sequence[One],
        slot: int,
        scale: Scale,
        denoiser: object,
        read_kwargs: dict[str, Any],
    ) -> tuple[int, list[Adapter], Stack, tuple[Weight, ...], bool, Callable[[bool], bool], list[PreparedAdapter]]:
        """Every check of a load, nothing written (a prepared adapter's upload into the read
        buffers starts here, beside the checks: the model reads nothing there): the slot, the
        adapters, the stack, the weights, whether a list was given, the write (given whether
        the slot is live), and the host cache's entries it takes (marked used once it is)."""
        slot = self._slot(slot)
        sources, listed = parts_of(source)
        given = given_weights(scale, len(sources), "the stack has" if listed else "one adapter is a stack of")
        check_read_options(read_kwargs, self.components)
        denoisers = denoisers_of(denoiser, len(sources), self.components, others=self._non_denoisers)
        options = [routed(read_kwargs, d) for d in denoisers]
        found = self._cached_parts(sources, options, denoisers_named(denoiser, len(sources)), listed)
        hits = [h for s, h in zip(sources, found, strict=True) if h is not None and not isinstance(s, PreparedAdapter)]
        prepared = found[0] if len(found) == 1 else None
        if prepared is not None:  # from the host cache: one copy per arena
            stack, weights, write = self._check_prepared(slot, prepared, given)
            return slot, [prepared.adapter], stack, weights, listed, write, hits
        every_layer = any(p is None for p in found)
        # every layer: cheap next to reading a file; unmerged, a DoRA layer's base reparametrized is refused before
        # the read would refuse the adapter for its weight (identity checks)
        self._check_usable(every_layer=every_layer, base=self._merger is None)
        adapters, stack, weights, write = self._check_parts(slot, sources, found, options, given, listed)
        # the reads ran the caller's code (a mapping's methods, __fspath__, its tensors), which may have ejected the
        # runtime, moved its layers (from another thread too) or written a weight: checked again before anything is
        # written, merged mode's weights now (they run device work: once, after the caller's code)
        self._check_usable(every_layer=every_layer)
        return slot, adapters, stack, weights, listed, write, hits

    def _cached_parts(
        self, sources: list[One], options: list[dict[str, Any]], names: Sequence[bool], listed: bool
    ) -> list[PreparedAdapter | None]:
        """Each part's entry of the host cache (:meth:`_cached`), or None where it is read; an
        entry carrying a copy of the base weights is compared with the weights as they are now."""
        found: list[PreparedAdapter | None] = []
        for k, (s, o, n) in enumerate(zip(sources, options, names)):
            with _naming_part(k if listed else None):
                found.append(self._cached(s, o, n))
                if found[-1] is not None and found[-1].saved_bases:  # compared with the weights as they are now
                    check_saved_bases(found[-1].plan, found[-1].saved_bases, self._base_weight)
        return found

    def _check_prepared(
        self, slot: int, prepared: PreparedAdapter, given: tuple[float | dict[str, object], ...]
    ) -> tuple[Stack, tuple[Weight, ...], Callable[[bool], bool]]:
        """The checks of a load of one adapter from the host cache, and its write (one copy per
        arena; on CUDA through the read buffers, whose upload starts here, before the checks)."""
        buffers = self._read_buffers
        upload = buffers.upload if buffers is not None and buffers.device.type == "cuda" else None
        # from the host cache on CUDA: the upload first, into the read buffers (nothing the
        # model reads), so that the checks run while it is under way
        staged = self.buffers.stage(prepared.packs, upload) if upload is not None else None
        self._check_usable()
        packs = prepared.packs
        stack = Stack.of(prepared.plan, self.max_rank)
        weights = self._resolved(stack, given)
        self._check_scales(stack, weights)
        w = weights[0]

        def write_packs(live: bool) -> bool:  # on CUDA through the read buffers: no allocation
            merged = self._merger is not None
            self.buffers.touched = staged is not None  # a replay writes too
            if isinstance(w, LayerWeights):  # a weight per layer: the packs at 1, then every row's scale
                self.buffers.write(slot, packs, 1.0, live=live, staged=staged)
                self.buffers.set_scales(slot, stack.scales(weights), live=live)
                return False
            if staged is not None and self._load_replay(slot, live, packs, staged, w, stack, merged):
                return True  # the writes and the wide refresh as one graph replay
            self.buffers.write(slot, packs, w, live=live, staged=staged)
            return False

        self._check_routed(slot, stack)
        return stack, weights, write_packs

    def _check_parts(
        self,
        slot: int,
        sources: list[One],
        found: list[PreparedAdapter | None],
        options: list[dict[str, Any]],
        given: tuple[float | dict[str, object], ...],
        listed: bool,
    ) -> tuple[list[Adapter], Stack, tuple[Weight, ...], Callable[[bool], bool]]:
        """The checks of a load of a stack, or of one adapter to read: each part read (or from
        the host cache, ``found``) and validated, then the stack built and checked; the
        adapters, the stack, and its write (staged, with the LoRA bias sums)."""
        adapters, parts, fresh = [], [], []
        for k, (s, hit) in enumerate(zip(sources, found)):
            with _naming_part(k if listed else None):
                adapter, checked = self._part(s, hit, options[k], k)
            adapters.append(adapter)
            parts.append(checked)
            if hit is None:
                fresh.append(checked.plan)
        stack, placement = build(parts, self.buffers, merged=self._merger is not None)
        weights = self._resolved(stack, given)
        self._check_scales(stack, weights)
        self._check_routed(slot, stack)

        def write_staged(live: bool) -> bool:
            self.buffers.write_staged(
                slot,
                placement.entries,
                stack.scales(weights),
                live=live,
                extras=placement.extras,
                offsets=placement.offsets,
            )
            self._write_bias_sums(slot, stack, weights, live)
            if self._read_buffers is not None:  # the arena holds the values; the read buffers are reused
                for plan in fresh:
                    forget_values(plan)
            return False

        return adapters, stack, weights, write_staged

    def _check_routed(self, slot: int, stack: Stack) -> None:
        """Refuses a load into a slot the routing in force sends rows to where the adapter has
        weights on layers a per-row routing cannot follow: a mixture-of-experts block's experts,
        a vision or audio tower, layers that see their input sequence-first
        (:func:`lorahot.runtime.routing.check_experts`, ``check_towers``, ``check_sequence_first``)."""
        rows = self._routing.rows
        if rows is not None and not self._routing.whole and slot in rows:
            self._check_unroutable({slot: stack.ranks})

    def _check_unroutable(self, routed: Mapping[int, Mapping[str, int]]) -> None:
        """Refuses rows sent to a slot (``routed``: slot -> its layers' ranks) whose adapter has
        weights on layers a per-row routing cannot follow: experts, towers, sequence-first layers."""
        check_experts(routed, self._experts)
        check_towers(routed, self._towers)
        check_sequence_first(routed, self._sequence_first)

    def _read(
        self,
        source: Source | Adapter,
        device: torch.device | None,
        read_kwargs: dict[str, Any],
        part: int | None = None,
    ) -> tuple[Adapter, object | None]:
        """The adapter ``source`` holds, and the reader's recipe it was assembled from (or
        None); on a tensor-parallel model each rank reads the whole adapter, the factors it
        keeps a slice of included, which the ranks compare whole before any writes
        (:mod:`lorahot.runtime.sharding`). With ``part`` (a load's, off a tensor-parallel
        model), a file lands in the runtime's read buffers for that part
        (:mod:`lorahot.io.read_buffers`).
        ``read_kwargs`` may hold a ``denoiser`` (:func:`routed`): where modules go, not a read option."""
        read_kwargs = dict(read_kwargs)
        denoiser = read_kwargs.pop("denoiser", None)
        loads = functools.partial(self._fit, strict=False, denoiser=denoiser)  # what strict=False would load
        if self._agreement is None:
            recipe: list[object] = []
            lent = self._read_buffers.lend(part) if self._read_buffers is not None and part is not None else None
            strict = is_strict(read_kwargs)

            def fits(meta: Adapter) -> None:  # a file's first read: its fit from the header, before its data
                self._fit(meta, strict, denoiser)

            with (
                lent or contextlib.nullcontext(),
                largest_tensor(self._largest),
                reading_for(self._names),
                loading_into(loads),
            ):
                adapter = read_adapter(source, device=device, _recipe=recipe, _fits=fits, **read_kwargs)
            return adapter, recipe[0] if recipe else None

        with largest_tensor(self._largest), reading_for(self._names), loading_into(loads):
            return read_adapter(source, device=device, **read_kwargs), None

    def _fit(self, adapter: Adapter, strict: bool, denoiser: str | None) -> tuple[int, tuple[str, ...]]:
        """:func:`check_fit` of ``adapter`` on this runtime's layers: the layers it loads into and
        the keys it skips."""
        return check_fit(
            adapter,
            self.buffers,
            self._specs,
            strict,
            self._extras_refusal,
            self.components,
            self._others,
            self._heads,
            denoiser,
            self._weightless,
            self._unwrapped,
            self._levels,
        )

    def _validated(self, adapter: Adapter, recipe: object | None, stage: bool, read_kwargs: dict[str, Any]) -> Checked:
        """:func:`validate` of a read adapter (with the plan of its recipe's skeleton, if
        known: :mod:`lorahot.runtime.skeleton`), then :meth:`_check_kinds`."""
        strict, denoiser = is_strict(read_kwargs), read_kwargs.get("denoiser")
        routing = (strict, denoiser)  # what the plan of a recipe depends on besides the recipe
        known, skeleton = self._skeletons.lookup(recipe, routing) if recipe is not None else (True, None)
        checked = validate(
            adapter,
            self.buffers,
            self._specs,
            stage=stage,
            weight_of=self._base_weight,
            strict=strict,
            extras_refusal=self._extras_refusal,
            components=self.components,
            planned=None if skeleton is None else skeleton.plan(adapter),
            others=self._others,
            merged=self._merger is not None,
            heads=self._heads,
            denoiser=denoiser,
            weightless=self._weightless,
            unwrapped=self._unwrapped,
            levels=self._levels,
        )
        self._check_kinds(checked.plan)
        if not known:
            self._skeletons.put(recipe, routing, Skeleton.of(checked.plan, adapter))
        return checked

    def _part(
        self, source: One, prepared: PreparedAdapter | None, read_kwargs: dict[str, Any], part: int
    ) -> tuple[Adapter, Checked]:
        """Part ``part`` of a load, checked and on the arenas' devices: from the host cache, or
        read (into the read buffers of that part) and validated."""
        if prepared is not None:
            return prepared.adapter, restage(prepared.plan, self.buffers)
        adapter, recipe = self._read(source, self._read_device, read_kwargs, part)  # type: ignore[arg-type]
        adapter = unaliased(adapter, self._own)  # views of what the write changes: copied first
        return adapter, self._validated(adapter, recipe, True, read_kwargs)

    def _info(
        self, slot: int, adapters: list[Adapter], stack: Stack, weights: tuple[Weight, ...], listed: bool
    ) -> AdapterInfo:
        """What ``slot`` holds: each part's own description, and the slot's summary."""
        parts = tuple(
            PartInfo(a.source, a.format, displayed(w), dict(p.ranks), p.nbytes, p.skipped, self._counts(p.ranks))
            for a, p, w in zip(adapters, stack.parts, weights)
        )
        if not listed:
            one = parts[0]
            return AdapterInfo(
                one.source, one.format, slot, one.scale, one.ranks, one.nbytes, one.skipped, one.components, parts
            )
        return AdapterInfo(
            " + ".join(p.source for p in parts),
            "+".join(dict.fromkeys(p.format for p in parts)),
            slot,
            tuple(p.scale for p in parts),
            dict(stack.ranks),
            stack.nbytes,
            tuple(dict.fromkeys(k for p in parts for k in p.skipped)),
            self._counts(stack.ranks),
            parts,
        )

    @public_api
    def preload(
        self,
        source: Source | Adapter,
        *,
        key: str | None = None,
        denoiser: str | None = None,
        **read_kwargs: Any,
    ) -> PreparedAdapter:
        """Reads, checks and packs an adapter into the host cache without touching the model.

        The checks are :meth:`load`'s own (one validation path), so a preloaded adapter always
        loads while the model's weights are those it was checked against (a copy of the base
        weight the adapter carries is compared with the model's again at each load). A later
        ``load(key)`` (when ``key`` is given, while the cache holds the entry: once it is
        evicted, discarded or larger than the cache, ``load(key)`` raises :class:`UsageError`,
        since a key is not a source to read again), ``load(source)`` (a local path or Hub id
        with the same read options, its files unchanged since) or ``load(prepared)`` then only
        copies: one host-to-device copy per arena, then (on a GPU) one row copy per
        buffer and one write of the scales, none blocking the host. Safe to call from any thread.
        Takes one adapter (preload each part of a stack, then ``load([...])`` stacks them
        from the cache), and ``denoiser`` as :meth:`load` takes it for one adapter: the
        prepared adapter keeps that routing (each part of a stack of prepared adapters keeps
        its own). Raises what :meth:`load` raises.
        """
        prepared, cache, named = self._settle.agreed(
            lambda: self._preload(source, key, denoiser, read_kwargs),
            "preload",
            lambda p: {"arguments": fingerprint.arguments(key), **fingerprint.plans([p[0].plan], self.layers)},
        )
        if isinstance(source, (str, os.PathLike)):  # now a source preloaded by its own name
            try:
                text = os.fspath(source)
            except Exception:  # the caller's __fspath__, which answered the read a moment ago
                text = None
            if isinstance(text, str):
                self.cache.unname(text)
        if cache:
            self.cache.put(prepared)
        if named is not None:
            self.cache.name(named)
            self._pending_keys.forget(named)
        return prepared

    def _preload(
        self, source: Source | Adapter, key: str | None, denoiser: object, read_kwargs: dict[str, Any]
    ) -> tuple[PreparedAdapter, bool, str | None]:
        """Every check of :meth:`preload`: the prepared adapter, whether to cache it, and the key
        it is cached under if it is a name of its own (not its source's path)."""
        refuse_stack(source, "preload")
        source = text(source)
        check_read_options(read_kwargs, self.components)
        read_kwargs = routed(read_kwargs, denoisers_of(denoiser, 1, self.components, others=self._non_denoisers)[0])
        key = preload_key(key)
        self._check_usable(base=False)
        if key is not None and isinstance(source, (str, os.PathLike)) and same_path(key, source):
            key = None  # the source's own name: cached by its identity, so a rewritten file is read again
        identity = source_key(source, read_kwargs)
        with largest_tensor(self._largest):  # a tensor no layer could take is refused before it is copied
            source = private(source)  # the entry must not change with the caller's tensors
        # an entry kept by identity holds digests of its recently written files; a named one does not follow them
        with racy.digests_of_read(source if key is None else None, read_kwargs) as digests:
            adapter, recipe = self._read(source, None, read_kwargs)
        checked = self._validated(adapter, recipe, False, read_kwargs)
        if self._merger is None and any(checked.plan.dora):  # at its own scale, as load checks it
            self._dora.check(Stack.of(checked.plan, self.max_rank), (1.0,))
        cache_key = key or identity or f"<{type(source).__name__} #{next(_anonymous)}>"
        packs = pack_host(checked, self.buffers)
        prepared = PreparedAdapter(cache_key, adapter, checked.plan, packs, self.buffers, tuple(digests.items()))
        return prepared, key is not None or _kept_by_identity(source, identity, read_kwargs), key

    @public_api
    def prefetch(
        self, source: Source | Adapter, *, key: str | None = None, denoiser: str | None = None, **read_kwargs: Any
    ) -> Future[PreparedAdapter]:
        """:meth:`preload` on a background thread; the future raises what preload raises.

        The call itself checks the runtime and the options (and raises at once)."""
        refuse_stack(source, "prefetch")
        if self._agreement is not None:
            raise UsageError(
                "prefetch reads on a background thread, but on a tensor-parallel model every rank's checks agree "
                "through a collective, which must run on the thread that serves, in step with the other ranks; call "
                "runtime.preload(...) on every rank instead."
            )
        check_read_options(read_kwargs, self.components)
        denoisers_of(denoiser, 1, self.components, others=self._non_denoisers)
        key = preload_key(key)
        with largest_tensor(self._largest):  # one too large goes as it is, for preload to refuse
            source = snapshot(source)  # the caller's tensors as they are now, as preload takes them
        own_path = key is not None and isinstance(source, (str, os.PathLike)) and same_path(key, source)
        with self._executor_lock:
            self._check_usable(placement=False)  # under the lock: eject cannot slip in between
            if self._executor is None:
                self._executor = prefetch_pool()
            if key is not None and not own_path:
                # a name before the prefetch is queued: interrupted before the key is noted pending
                # below, a load of it is refused (no entry of that name) rather than read as a source
                self.cache.name(key)
            future = shielded(self._executor.submit(self.preload, source, key=key, denoiser=denoiser, **read_kwargs))
        if key is not None:  # a load of the key meanwhile waits for it (lorahot.runtime.prefetches)
            self._pending_keys.add(key, future, named=not own_path)
        return future

    def _counts(self, ranks: dict[str, int]) -> dict[str, int]:
        """Per component, how many of the layers in ``ranks`` it has (empty for a single model)."""
        counts = dict.fromkeys(self.components, 0)
        for name in ranks if self.components else ():
            counts[name.partition(".")[0]] += 1
        return counts

    def _base_weight(self, name: str) -> torch.Tensor:
        """The model's own weight of layer ``name`` (the pristine one in merged mode)."""
        return _base_weight(self.layers, name)

    def _extras_refusal(self, name: str, module: LoraModule) -> str | None:
        """Why ``module``'s DoRA magnitude or LoRA bias cannot run on layer ``name``, or None."""
        layer = self.layers[name]
        if not self._extras and self._merger is None:
            return (
                "this runtime was injected with extras=False (the default), which runs no DoRA or LoRA bias "
                "(lora_bias) unmerged; inject with extras=True (lorahot.plan_targets tells which adapters need it) "
                "or merged=True to load this adapter"
            )
        if self._merger is not None and module.bias is not None and layer.pristine_bias is None:
            return (
                "merged mode folds the LoRA bias (lora_bias) into the base layer's bias, and this layer has none; "
                "inject without merged=True to load this adapter"
            )
        return layer_refusal(layer, module)

    def _base_loaded(self, layer: object, unversioned: bool = False) -> None:
        """After ``load_state_dict`` wrote ``layer``'s base weight or bias (unmerged: merged mode
        notes it and refuses its next write), the DoRA factors ``f`` and ``g`` of every region
        where the layer holds a DoRA adapter are computed again from the new base, as PEFT's
        forward computes its norm from the weight it has then. Other runtime state does not
        depend on the base's values. ``unversioned``: written without moving the arena's
        version counter (a forward's recompute: :meth:`_base_moved`)."""
        if self._merger is not None:
            return
        name = getattr(layer, "_path", "")  # bound under its name in self.layers
        if self.layers.get(name) is not layer:
            return
        arena, index = self.buffers.where[name]
        for slot, stack in enumerate(self._stacks):
            if stack is not None and index in stack.dora[arena]:
                mine = [[index] if a == arena else [] for a in range(len(stack.dora))]
                # and the live copy of the active slot
                self._refresh_dora(slot, mine, slot == self._active, stack.decomposed, unversioned)

    def _base_moved(self, layer: object) -> None:
        """An eager forward of ``layer``, which holds a DoRA adapter, saw its base weight or bias
        moved since its factors were computed (:meth:`LoRALayer._check_dora_base`): computes them
        again as :meth:`_base_loaded` does, holding the call lock, so that no runtime call's
        writes run meanwhile. Nothing where a runtime call runs this forward on its own thread
        (that call checked the bases when it began), once ejected, in merged mode, or for a base
        that computes its weight at each call, which the next runtime call refuses
        (:meth:`DoraFactors.check_stored`). Not counted as a runtime call
        (:mod:`lorahot.layers.state_marks`): PEFT's forward computes its norm from the weight
        it reads, a checkpointed forward's recompute included. Autocast is off for it, as in a
        runtime call."""
        if self._guard.calls._is_owned():  # type: ignore[attr-defined]  # RLock's own test
            return
        name = getattr(layer, "_path", "")
        with self._guard.calls, contextlib.ExitStack() as autocast_off:
            if self._state.ejected is not None or self._merger is not None or self.layers.get(name) is not layer:
                return
            assert isinstance(layer, LoRALayer)
            if layer.computed_base() is not None:
                return
            for device_type in {"cpu", layer.base_weight.device.type}:
                if torch.amp.is_autocast_available(device_type):
                    autocast_off.enter_context(torch.autocast(device_type, enabled=False))
            if self._dora.moved_one(name):
                self._base_loaded(layer, unversioned=True)

    def _watch_dora(self) -> None:
        """After the slots' adapters changed: the layers no slot holds a DoRA adapter for any more
        stop comparing their base's versions at each forward (:meth:`DoraFactors.keep`)."""
        self._dora.keep([stack.dora for stack in self._stacks if stack is not None])

    def _refresh_dora(
        self, slot: int, dora: list[list[int]], live: bool, decomposed: frozenset[str], unversioned: bool = False
    ) -> None:
        """Computes the DoRA factors of the layers ``dora`` (per arena) in ``slot`` (and in the
        live region if it mirrors the slot) after its A, B, scales or magnitudes changed, the
        norms of the layers ``decomposed`` with LyCORIS' ``eps`` (see :mod:`lorahot.runtime.dora`)."""
        if not any(dora):
            return
        self._dora.refresh(slot, dora, decomposed, unversioned)
        if live and slot != self.buffers.live:
            self._dora.refresh(self.buffers.live, dora, decomposed, unversioned)

    def _write_bias_sums(self, slot: int, stack: Stack, weights: tuple[Weight, ...], live: bool) -> None:
        """Writes the LoRA biases that several parts of ``stack`` carry on one layer, summed at
        ``weights``, into ``slot`` (and the live region if it mirrors the slot): see
        :mod:`lorahot.runtime.bias_sums`."""
        if stack.bias_sums is not None:
            regions = [slot, self.buffers.live] if self.buffers.mirrors(slot, live) else [slot]
            stack.bias_sums.write(self.buffers, regions, weights)

    def _cached(
        self, source: Source | Adapter | PreparedAdapter, read_kwargs: dict[str, Any], denoiser_named: bool = False
    ) -> PreparedAdapter | None:
        """The prepared form of ``source`` if it is one or the cache holds it, else None.
        ``denoiser_named``: the caller passed ``denoiser=`` for this part, though naming the
        runtime's own denoiser leaves it out of ``read_kwargs``; a prepared adapter or a preload
        key refuses it as any read option (it keeps the routing it was prepared with)."""
        given = sorted({*read_kwargs, *(("denoiser",) if denoiser_named else ())})
        if isinstance(source, PreparedAdapter):
            if source.owner is not self.buffers:
                raise UsageError("this PreparedAdapter was made for another runtime; preload it on this one.")
            check_prepared(source)
            if given:
                raise UsageError(
                    f"read options ({', '.join(given)}) do not apply to a PreparedAdapter, which was "
                    "read already; pass them to preload instead."
                )
            return source
        name = source if isinstance(source, str) else None  # perhaps a key given to preload
        failure = self._pending_keys.failure(name, on_prefetch_thread(self._executor)) if name is not None else None
        options_for_key = name is not None and given and (self.cache.is_name(name) or name in self.cache)
        if name is not None and options_for_key and not os.path.exists(name):
            raise UsageError(
                f"read options ({', '.join(given)}) do not apply to {shown(name, 200)}, a key given to "
                "preload, whose adapter was read already; pass them to preload instead."
            )
        # peek, not get: a load that fails a later check leaves the cache's order as it was
        hit = self.cache.peek(name) if name is not None and not read_kwargs else None
        if hit is None:
            cache_key = source_key(source, read_kwargs)
            hit = self.cache.peek(cache_key) if cache_key is not None else None
            if hit is not None and hit.racy:  # None where rewritten within its timestamps' tick of the read
                hit = racy.checked(hit)
        if hit is None and name is not None and failure is not None:
            raise failed_prefetch(name, failure)
        if hit is None and name is not None and not read_kwargs and self.cache.is_name(name):
            raise UsageError(
                f"{shown(name, 200)} is a key given to preload, and the host cache does not hold it now (evicted, "
                f"discarded, larger than the cache's {self.cache.budget_bytes} bytes, or not yet: a prefetch of it "
                "interrupted before it noted the key as pending), so there is nothing to "
                "load under that name: a key is no path or Hub id to read again. Preload it again, or load what "
                "preload returned (runtime.load(prepared)), which does not need the cache; to read a path or Hub "
                "id of that name, preload it as the source (runtime.preload(name))."
            )
        if hit is not None and hit.owner is not self.buffers:
            raise UsageError(
                f"the cache entry {shown(hit.key, 200)} was prepared for another runtime (put into this "
                f"runtime's cache by "
                "hand); discard it and preload the adapter on this runtime."
            )
        return hit

    @public_api
    @one_call_at_a_time
    def activate(
        self,
        slot: int | Sequence[int] | torch.Tensor | np.ndarray,
        *,
        lengths: Sequence[int] | torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """Chooses the adapter the model computes with: one slot for the whole batch, or one
        slot per row of the batch (a *mixed batch*).

        Args:
            slot: an int: every row computes with that slot (an empty slot means no adapter).
                Or a sequence of ints, a 1-D integer tensor (any device) or array, one per row:
                row ``i`` computes with slot ``slot[i]``, ``-1`` with the base model only. A row
                is a sequence of the batch, the input's first dimension; for a linear or an
                embedding with the tokens flattened to one dimension (``[B * T, in]``), equal
                groups of them, rows outermost (:mod:`lorahot.layers.routing`).
            lengths: with a sequence of slots: the number of tokens of each entry's row in a
                packed input (rows concatenated along the tokens, ``[N, in]`` or ``[1, N]``
                ids); each entry is repeated for its row's tokens, and the routing then has
                one entry per token (a layer's leading dimensions hold that many tokens).
                Without ``lengths`` a routing is never read per token.

        The routing is device data of a fixed shape, written in place: on a compiled model
        (CUDA graphs included) a new routing of the same length never recompiles. The first
        switch between whole-batch and per-row mode compiles a graph for the other mode, kept
        beside the first (later switches recompile nothing); a routing of another length comes
        with a batch of another size, which recompiles unless compiled with dynamic shapes.
        Loads, ``set_scale`` and ``unload`` of any slot take effect on its rows at once.

        Raises:
            UsageError: a slot out of range (-1 .. slots - 1) or empty for a per-row routing;
                a routing that is not a non-empty sequence of ints, 1-D integer tensor or array;
                ``lengths`` not one count (int >= 0) per entry, or more than
                :data:`~lorahot.runtime.routing.MAX_TOKENS` in all; a per-row routing in merged
                mode (the adapter is folded into weights every row shares), unless every row
                names the same slot (the whole batch on it) or -1 (the whole batch on the base
                weights, whatever the active slot holds, until the next activate). On a
                tensor-parallel model also where another rank's check failed, or the ranks
                were given different slots or routings (naming ``arguments`` and the ranks):
                a rank computing with another adapter than the rest would add up the wrong
                partial products; a routing that sends rows to a slot whose adapter has
                weights on a mixture-of-experts block's experts, which run on the tokens their
                router gathered, not on the batch's rows
                (:func:`lorahot.runtime.routing.check_experts`), on a vision or audio tower, or on
                layers that see their input sequence-first (``check_sequence_first``). Nothing
                changed, on any rank.
                A batch that does not fit the routing raises when the model runs, compiled or
                not (:mod:`lorahot.layers.refusal`).
            WriteError: making the slot or routing live failed after every check had passed (out
                of memory, a device fault), or putting back what a refused or interrupted call
                changed failed: the message says what is live now (the slot and routing before,
                another slot whole, or possibly a mix) and how to recover. On a tensor-parallel
                model, also where making it live failed or was interrupted on another rank
                (naming that rank): every rank puts the slot and routing before back.
        """
        per_row = isinstance(slot, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(slot, (str, bytes))
        if per_row:
            self._activate_rows(slot, lengths)
        else:
            self._activate_whole(slot, lengths)

    def _activate_whole(self, whole: object, lengths: object) -> None:
        """``activate(whole)``: one slot for the whole batch, checked (on every rank), then live."""

        def whole_checked() -> int:  # every check inside the agreement: a rank failing alone
            if lengths is not None:  # fails every rank, none waits in a collective (tensor parallel)
                raise UsageError(
                    f"lengths={shown(lengths, 40)} applies to a per-row routing (a sequence of slots), not to "
                    f"activate({shown(whole, 40)})."
                )
            slot = self._slot(whole)
            self._check_usable()  # after the caller's __index__: see _check_usable
            return slot

        slot = self._settle.agreed(  # an int, or the error saying what it must be
            whole_checked, "activate", lambda s: {"arguments": fingerprint.arguments("activate", s)}
        )
        self._switch(slot, lambda: self._routing.clear(), again=True)

    def _activate_rows(self, rows: object, lengths: Sequence[int] | torch.Tensor | np.ndarray | None) -> None:
        """``activate(rows, lengths=...)``: a per-row (or per-token) routing, checked (on every
        rank), then published; one slot for every row runs as the whole batch on it."""
        filled = [info is not None for info in self._infos]

        def checked() -> tuple[torch.Tensor, int | None]:
            route = check_routing(rows, lengths, self.slots, filled, merged=self._merger is not None)
            self._check_usable()  # after the caller's sequence, tensor or array is read: see _check_usable
            one = one_slot(route)
            if one is None:  # one slot for every row runs as the whole batch: no row to misplace
                routed = {s: self._stacks[s] for s in routed_slots(route, self.slots)}
                self._check_unroutable({s: st.ranks for s, st in routed.items() if st is not None})  # all filled
            if one is None and self._merger is None:  # per row (not run as the whole batch: see below)
                self._check_traced()
            return route, one

        route, one = self._settle.agreed(
            checked,
            "activate",
            # per token (lengths) or per row: the same entries read by other rows' layers
            lambda r: {"arguments": fingerprint.arguments("activate rows", r[0], lengths is not None)},
        )
        if one is not None:  # every row on one slot: the whole batch on it, with the whole-batch kernels
            self._switch(one, lambda: self._routing.one_slot(route))
            return
        if self._merger is not None:  # every row at -1 (check_routing): the base weights for the whole batch
            self._switch(None, lambda: self._routing.one_slot(route))
            return
        self._switch(None, lambda: self._routing.set(route, tokens=lengths is not None))

    def _check_traced(self) -> None:
        """Refuses a per-row routing where ``torch.jit.trace`` or ``torch.export`` recorded the
        model since inject (with one slot for the whole batch: see
        :func:`lorahot.layers.recording._recorded`): the recorded graph replays that path, so it
        would go on computing the live slot for every row, silently."""
        how = self._state.traced
        if how is not None:
            raise UsageError(
                f"{how} recorded this model with one slot for the whole batch; its graph replays that path (it "
                "follows loads, set_scale and activate(k), written in place), so under a per-row routing it would "
                "compute the live slot for every row, silently. Nothing was changed. Activate one slot "
                "(runtime.activate(k)), or call runtime.eject() and inject again to route the rows of a model that "
                f"no {how} recorded."
            )

    def _switch(self, slot: int | None, publish: Callable[[], None], again: bool = False) -> None:
        """Makes ``slot`` live (None: the live slot stays; the slot live already is copied again
        only if ``again``), then publishes a routing; where either fails or is interrupted, the
        live slot and the routing (every arena's) before are put back, so the model never
        computes a routing that half its arenas hold (:meth:`_put_back`). In merged mode the
        weights follow the routing (-1 for every row: the base weights, :meth:`_remerge`), so it
        is published first, and the live slot is merged again wherever that changes."""
        active, routing = self._active, self._routing.state()
        merged, base = self._merger is not None, self._routing.base_only
        failure: BaseException | None = None
        try:
            if merged:
                publish()
                live = active if slot is None else slot
                if again or live != active or base != self._routing.base_only:
                    self._make_live(live)
            else:
                if slot is not None and (again or slot != self._active):
                    self._make_live(slot)
                publish()
        except BaseException as exc:  # put back below, outside the handler: a refusal goes on with its own context
            failure = exc
        # tensor parallel: a rank failing alone makes every rank put back what it had
        failure, _ = self._settle.settled(
            "making the routing live" if slot is None else f"making slot {slot} live", failure
        )
        if failure is not None:
            self._put_back(active, routing, merged, failure)

    def _put_back(
        self, active: int, routing: tuple[tuple[int, ...] | None, bool, bool], merged: bool, exc: BaseException
    ) -> NoReturn:
        """After ``activate`` failed with ``exc`` (a :class:`LiveFault` where making a slot live
        failed): the routing and live slot ``active`` before it are put back (merged: the weights
        as that routing had them). Then a lorahot error (a refusal) or an interrupt goes on as it
        is; a failure of the writes themselves (out of memory, a device fault) is a
        :class:`WriteError` saying so.

        Raises:
            WriteError: ``exc`` was a fault, or putting back failed (whatever ``exc`` was): the
                message says which slot is live whole now, or that the model may compute a mix
                of slots, and how to recover; its cause is ``exc`` (the fault inside a
                :class:`LiveFault`).
        """
        fault, live = (exc.fault, exc.live) if isinstance(exc, LiveFault) else (exc, self._active)
        now, again = self._restore_switch(active, routing, merged, live)
        marked = self._settle.settled_again(f"putting slot {active} back", [] if now == active else [active])
        me = self._settle.rank
        others = sorted(r for r in (marked or {}) if r != me)  # the ranks whose putting back failed
        every = "" if marked is None else " on every rank"
        if now == active and others:  # put back here, but the model these ranks compute together may mix slots
            raise WriteError(
                f"LoraRuntime.activate: {described(fault)}, and putting slot {active} back failed on "
                f"{which_ranks(others, -1)}: the model may compute a mix of slots there. "
                f"Call runtime.activate({active}) again{every}, or runtime.unload()."
            ) from fault
        if now == active and (isinstance(fault, LoraError) or not isinstance(fault, Exception)):
            raise fault
        what = f"LoraRuntime.activate: {described(fault)}"
        if now == active:
            during = "" if isinstance(fault, OtherRankFailed) else ", while making the new slot or routing live"
            raise WriteError(
                f"{what}{during} after every check had passed. Slot {active} and the routing before are live again; "
                "nothing else changed."
            ) from fault
        if now is None:
            state = (
                f"putting slot {active} and the routing before back failed too ({again}): the model may compute a mix "
                f"of slots. Call runtime.activate({active}) again{every}, or runtime.unload()."
            )
        else:
            state = (
                f"putting slot {active} back failed too ({again}): slot {now} is live, with the routing before. "
                f"Call runtime.activate({active}) again{every}."
            )
        raise WriteError(f"{what}, and {state}") from fault

    def _restore_switch(
        self, active: int, routing: tuple[tuple[int, ...] | None, bool, bool], merged: bool, live: int | None
    ) -> tuple[int | None, str]:
        """Puts back the ``routing`` and the live slot ``active`` of before a failed switch;
        ``live`` is the slot the live region holds whole now (None: it may hold a mix). Returns
        the slot live whole after it (``active`` where everything went back; None where the live
        region or the routing may hold a mix) and, where putting back failed, what failed."""
        try:
            self._routing.restore(routing)
        except Exception as exc:
            return None, described(exc)
        if live == active and not merged:  # merged: the weights as the routing before has them
            return active, ""
        try:
            self._make_live(active)
        except LiveFault as failed:
            return failed.live, described(failed.fault)
        return active, ""

    def _make_live(self, slot: int) -> None:
        """Copies ``slot`` into the live region (and refreshes the merged weights or the wide
        layers' rows), which the whole batch then computes with; ``slot`` becomes
        :attr:`active_slot`.

        Raises:
            LiveFault: the copy failed or was interrupted; the slot active before was copied
                back whole (by the ordinary path: a graph replay may be what failed), or where
                that failed too, the live region may hold a mix (its ``live``).
        """
        merged = self._merger is not None
        before = self._active
        try:
            if self._activate_replay(slot, self._stacks[slot], self._weights[slot], merged):
                self._active = slot  # the copy and the wide refresh as one graph replay
            else:
                self.buffers.activate(slot)
                self._active = slot
                self._remerge(slot)
        except BaseException as exc:  # a device fault, or interrupted mid-copy (KeyboardInterrupt)
            raise LiveFault(exc, self._copied_back(before)) from exc

    def _copied_back(self, slot: int) -> int | None:
        """Makes ``slot`` live again by the ordinary path, after a failed :meth:`_make_live`:
        ``slot``, or None where that failed too."""
        try:
            self.buffers.activate(slot)
            self._active = slot
            self._remerge(slot)
        except Exception:
            return None
        return slot

    @public_api
    @one_call_at_a_time
    def unload(self, slot: int | None = None) -> None:
        """Empties ``slot``, or every slot if None. An emptied active slot means no adapter.

        Raises:
            UsageError: ``slot`` out of range; on a tensor-parallel model also where another
                rank's check failed or the ranks were given different slots (naming
                ``arguments`` and the ranks). Nothing changed, on any rank.
            WriteError: emptying a slot failed (a device fault): it is emptied again, the
                other slots asked for are emptied all the same, and the message says whether
                that went through or which slots may hold part of their adapter (none of them
                names one any more). Interrupted, every slot asked for is emptied all the same
                and the interrupt goes on (a WriteError where a second try could not empty a
                slot). On a tensor-parallel model, also where emptying failed or was
                interrupted on another rank (naming that rank); every rank empties every slot
                asked for, and where a slot could not be emptied on some rank, every rank's
                message names it and that rank, and no rank names an adapter there.
        """

        def checked() -> list[int]:  # inside the agreement: a rank failing alone fails every rank
            emptied = list(range(self.slots)) if slot is None else [self._slot(slot)]
            # after the caller's __index__ (see _check_usable); unloading a DoRA slot is the way out of
            # check_stored's refusal
            self._check_usable(dora=False)
            return emptied

        emptied = self._settle.agreed(
            checked,
            "unload",
            lambda e: {"arguments": fingerprint.arguments("unload", e)},
        )
        first, stuck = self._empty_all(emptied)
        own = None if first is None else first[1]
        error, marked = self._settle.settled(f"emptying {_listed(emptied)}", own, stuck=stuck)
        if error is None:
            return
        if error is own and not marked and not isinstance(error, Exception):
            raise error  # interrupted, and every slot asked for is empty (on every rank): the interrupt goes on
        self._unload_failed(emptied, first, error, marked)

    def _empty_all(self, slots: list[int]) -> tuple[tuple[int, BaseException] | None, list[int]]:
        """Empties every one of ``slots``, whatever fails or is interrupted on the way (so that
        every rank of a tensor-parallel model empties the same slots): a slot whose emptying
        fails is emptied again once. Returns the first failure (its slot and error, or None)
        and the slots the second try could not empty either (each may hold part of its
        adapter). Every one of ``slots`` is unnamed after it: none holds its adapter whole."""
        first: tuple[int, BaseException] | None = None
        stuck: list[int] = []
        done: list[int] = []
        try:
            first = self._empty_each(slots, done, stuck)
        except BaseException as exc:  # interrupted between two slots, outside each one's own try: the rest too
            left = slots[len(done) :]
            first = (left[0] if left else slots[-1], exc)
            self._empty_each(left, done, stuck)
        for s in stuck:
            self._infos[s], self._stacks[s], self._weights[s] = None, None, ()
        self._watch_dora()
        return first, stuck

    def _empty_each(self, slots: list[int], done: list[int], stuck: list[int]) -> tuple[int, BaseException] | None:
        """:meth:`_empty_all`'s loop: each of ``slots`` emptied (again once where that fails),
        noted in ``done`` once tried, in ``stuck`` where the second try failed too. Returns the
        first failure (its slot and error), or None."""
        first: tuple[int, BaseException] | None = None
        for s in slots:
            for again in (False, True):
                try:
                    self._empty(s)
                    break
                except BaseException as exc:  # a device fault, or interrupted (KeyboardInterrupt): go on
                    first = first or (s, exc)
                    if again:
                        stuck.append(s)
            done.append(s)
        return first

    def _unload_failed(
        self,
        emptied: list[int],
        first: tuple[int, BaseException] | None,
        error: BaseException,
        stuck: dict[int, list[int]],
    ) -> NoReturn:
        """Raises the :class:`WriteError` of an unload of ``emptied`` that failed or was
        interrupted: ``first``, this rank's first failure (its slot and error), or ``error`` that
        of another rank (:class:`OtherRankFailed`); ``stuck``, by rank, the slots that a second
        try could not empty either. It says which slots are empty (on every rank) and which may
        hold part of their adapter (where), and how to recover."""
        ranks = self._agreement is not None
        every = " on this rank" if isinstance(error, Unsettled) else " on every rank" if ranks else ""
        if first is not None and error is first[1]:
            what = f"LoraRuntime.unload: {described(error)}, while emptying slot {first[0]}"
        else:
            what = f"LoraRuntime.unload: {described(error)}"
        left = sorted({s for slots in stuck.values() for s in slots})
        empty = [s for s in emptied if s not in left]
        if not left:
            again = "A second try emptied it: " if first is not None and error is first[1] else ""
            raise WriteError(f"{what}. {again}{_listed(empty)} {_are(empty)} empty{every}.") from error
        me = self._settle.rank
        where = " and ".join(
            _listed(slots) if me is None else f"{_listed(slots)} on {which_ranks([rank], me)}"
            for rank, slots in stuck.items()
        )
        where = where[0].upper() + where[1:]
        rest = f"; {_listed(empty)} {_are(empty)} empty{every}" if empty else ""
        raise WriteError(
            f"{what}. {where} could not be emptied (a second try failed too) and may hold part of "
            f"{'its' if len(left) == 1 else 'their'} adapter, though no adapter is named there{every}{rest}. Call "
            f"runtime.unload({left[0] if len(left) == 1 else ''}) again{' on every rank' if ranks else ''}."
        ) from error

    @public_api
    @one_call_at_a_time
    def set_scale(self, value: Scale, slot: int | None = None) -> None:
        """Sets the user multiplier of ``slot`` (default: the active slot). 0 turns its update
        off (a DoRA part keeps its magnitude rescale, as in PEFT).

        ``value`` is one number (for a stack: the weight of every part) or a list (or tuple)
        of one weight per part of the slot (a stack re-weighted; one adapter is a stack of one
        part), as :meth:`load` takes ``scale``: on a runtime over a pipeline, a weight may be a
        dict component -> number (a UNet's: a dict of blocks), as diffusers' ``set_adapters``
        takes it (:mod:`lorahot.runtime.layer_weights`). Only the slot's per-row scales are
        rewritten (one copy per arena), with what follows from them (the wide layers' scaled
        rows, merged weights, DoRA factors): no file is read, no A or B is copied, a compiled
        model does not recompile.

        Raises:
            UsageError: ``value`` is not a finite real number (or a sequence of them as long as
                the slot has parts; an array or a tensor is refused, naming ``.tolist()``), or
                times an adapter's ``alpha / r`` it leaves the scale buffers' range; it is not 1
                for a part holding a LyCORIS or kohya LoRA trained with weight decomposition
                (``dora_scale``); the slot is empty. Nothing changed.
            WriteError: as for :meth:`load`.
        """
        s, stack, _, weights = self._settle.agreed(
            lambda: self._check_set_scale(value, slot),
            "set_scale",
            lambda c: {"arguments": fingerprint.arguments(c[0], _encoded(c[3]))},
        )
        live = s == self._active

        def write_scales() -> None:
            # marked written first: a failure (an interrupt) from here on empties the slot, where one
            # between the two lines would leave info(s) naming weights no buffer holds, as "nothing changed"
            self.buffers.touched = True  # a replay writes too
            self._weights[s] = weights  # info(s) reports them from here
            if (
                self._merger is None
                and not per_layer(weights)
                and self._replay(s, live, stack, cast(tuple[float, ...], weights))
            ):
                return  # on CUDA: the scales, live copy and wide refresh in one graph replay
            scales = stack.scales(weights)
            self.buffers.set_scales(s, scales, live=live)
            self._write_bias_sums(s, stack, weights, live)
            self._refresh_dora(s, stack.dora, live, stack.decomposed)
            self._remerge(s)

        self._settle.written("set_scale", s, write_scales, self._empty_all, self._merger)

    def _check_set_scale(self, value: Scale, slot: int | None) -> tuple[int, Stack, AdapterInfo, tuple[Weight, ...]]:
        """Every check of :meth:`set_scale`: the slot, what it holds, and the new weights."""
        s = self._slot(self._active if slot is None else slot)
        value = given_of(value)
        self._check_usable()  # after the caller's __index__, __float__, __len__, __getitem__: see _check_usable
        stack, info = self._stacks[s], self._infos[s]
        if stack is None or info is None:
            raise UsageError(f"slot {s} is empty; load an adapter into it before set_scale.")
        weights = self._resolved(stack, given_weights(value, len(stack.parts), f"slot {s} holds"))
        self._check_scales(stack, weights, region=s)
        return s, stack, info, weights

    @public_api
    def eject(self) -> nn.Module:
        """Puts back the original modules this runtime wrapped; the runtime is done.

        Layers injected by another runtime on the same model stay in place. The prefetch
        thread, if one was started, finishes its current adapter and stops. A model edited
        since inject can still be ejected: layers no longer where inject put them are left.
        An eject that fails or is interrupted midway leaves the runtime refusing every call but
        another eject, which finishes it.
        """
        self._guard.refuse_within_call("eject")
        if not self._state.unfinished:  # else an eject that did not finish: this one finishes it
            self._check_usable(placement=False)
            _check_ejectable(self.model, self.layers)
        try:
            self._state.mark_ejected("runtime.eject()")
        except Exception as exc:
            raise unfinished_eject("runtime.eject()", exc) from exc
        return self.model

    def _detach(self) -> None:
        """Run once when the shared state is marked ejected, by either eject."""
        unwrap_modules(self.model, self.layers)
        # copies of a layer put in the model since (attn.q_proj = copy.deepcopy(attn.q_proj)),
        # which no runtime holds: left there, they would go on adding their adapter
        unwrap_modules(self.model, _copies(self.model))
        release_hooks(self._roots())
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            # eject from one of the pool's own threads (a prefetch future's done callback) cannot
            # wait for that thread: it would join itself. The read it is in has finished.
            executor.shutdown(wait=not on_prefetch_thread(executor), cancel_futures=True)

    def _check_kinds(self, plan: LoadPlan) -> None:
        """LoHa, LoKr, Tucker LoCon and diffs load only into a merged runtime.

        Raises:
            AdapterMismatchError: naming the modules and their kinds.
        """
        biasless = [n for n, w in plan.weights.items() if "diff_b" in w.factors and self.layers[n].base_bias is None]
        if biasless:
            raise AdapterMismatchError(
                lines(
                    format_problems(f"{plan.source}: a bias diff (diff_b) for layers without a bias:", biasless),
                    "Load an adapter made for this model (its layers have no bias).",
                )
            )
        unfoldable = [
            f"{n}: {why}"
            for n in plan.targets
            if self._merger is not None and (why := self.layers[n].merged_lora_refusal())
        ]
        if unfoldable:
            raise AdapterMismatchError(
                lines(
                    format_problems(f"{plan.source}: LoRA modules merged mode cannot fold:", unfoldable),
                    "Inject those layers without merged=True (the LoRA then runs beside the grouped conv), or leave "
                    "them out of the adapter.",
                )
            )
        if plan.weights and self._merger is None:
            raise AdapterMismatchError(
                lines(
                    format_problems(
                        f"{plan.source}: modules whose update is not B @ A, which lorahot loads only in merged mode:",
                        [f"{n} ({w.kind}: {', '.join(w.source_keys)})" for n, w in plan.weights.items()],
                    ),
                    "Inject with lorahot.inject(..., merged=True) to fold them into the weights, or convert the "
                    "adapter to plain LoRA.",
                )
            )

    def _resolved(self, stack: Stack, given: tuple[float | dict[str, object], ...]) -> tuple[Weight, ...]:
        """The weights ``given`` (numbers, or dicts) for ``stack``: each dict as every layer's
        weight (:class:`~lorahot.runtime.layer_weights.Resolver`), checked against the layers
        any part loads (diffusers looks each adapter's weight up on every LoRA layer).

        Raises:
            UsageError: a dict the runtime cannot read as diffusers does (see
                :mod:`lorahot.runtime.layer_weights`). Nothing changed.
        """
        if not any(isinstance(w, dict) for w in given):
            return given  # type: ignore[return-value]
        modules = {c: getattr(self.model, c) for c in self.components} if self.components else {"": self.model}
        resolver = Resolver(self._arena_names, self.components, modules)
        touched = sorted({n for plan in stack.parts for n in (*plan.targets, *plan.weights)})
        return tuple(
            resolver.resolve(w, touched, "scale" if stack.single else stack.named(p)) if isinstance(w, dict) else w
            for p, w in enumerate(given)
        )

    def _check_scales(self, stack: Stack, weights: tuple[Weight, ...], region: int | None = None) -> None:
        """The user's weights are 1 for every part holding a module that means something at
        scale 1 only (:func:`check_unit_scale`), keep every scale in its buffer's range (each
        part's rows at its own weight), every wide layer's scaled rows in their dtype's range, every DoRA factor
        finite (unmerged; ``region``: a set_scale's slot, whose rows hold the values), every
        layer's update (a stack's parts summed) in its buffers' dtype range (unmerged,
        :class:`~lorahot.runtime.updates.UpdateRange`), and (merged mode) every merged weight
        in the weights' range."""
        parts = [None if stack.single else stack.named(p) for p in range(len(stack.parts))]
        for plan, w, part in zip(stack.parts, weights, parts):
            check_unit_scale(plan, unit_weight(plan, w, self.buffers.where), part=part)
        if self._merger is None and any(stack.dora):  # a layer index per DoRA layer, per arena
            self._dora.check(stack, weights, region)
        if self._merger is None and self._within_range(stack, weights) and self._updates.fits(stack, weights):
            return  # the common case: every product below its limit, no message to build
        for plan, w, part in zip(stack.parts, weights, parts):
            check_multiplier(plan, w, self.buffers, part=part)
            if not self._wide.empty:
                self._wide.check(plan, w, self._arena_names, part)
        if self._merger is not None:
            self._merger.check(stack, weights)
        else:
            self._updates.check(stack, weights, region)

    def _within_range(self, stack: Stack, weights: tuple[Weight, ...]) -> bool:
        """Whether every part's weight passes the range checks of :meth:`_check_scales`
        (:func:`check_multiplier`, :meth:`WideWeights.check`): the same products against the
        same limits, read from ``(largest, limit)`` and ``(smallest, floor)`` pairs memoized for
        the last stack checked, so a re-weighting does not walk the plans. False sends the
        caller to the full checks, which raise with the message, as it does for a weight per
        layer (checked there layer by layer)."""
        if per_layer(weights):
            return False
        memo = self._ranges
        if memo is None or memo[0]() is not stack:
            limits = []
            for plan in stack.parts:
                arenas = self.buffers.arenas
                tops = [(largest, dtype_max(a.S.dtype)) for a, largest in zip(arenas, plan.largest)]
                if not self._wide.empty:
                    tops += self._wide.limits(plan)
                floors = [(smallest, dtype_tiny(a.S.dtype)) for a, smallest in zip(arenas, plan.smallest)]
                limits.append(_Limits(tops, floors))
            memo = self._ranges = (weakref.ref(stack), limits)
        return all(
            all(largest * abs(w) <= top for largest, top in mine.tops)
            and (w == 0 or all(smallest * abs(w) >= floor for smallest, floor in mine.floors))
            for mine, w in zip(memo[1], cast(tuple[float, ...], weights))
        )

    def _remerge(self, slot: int) -> None:
        """After ``slot`` changed, if it is live: rewrites the base weights in merged mode (the
        base weights alone while a routing of -1 for every row is in force), and the wide
        layers' ``s * A`` rows otherwise."""
        if slot != self._active or (self._merger is None and self._wide.empty):
            return
        stack, weights = self._stacks[slot], self._weights[slot]
        if self._merger is not None:
            if self._routing.base_only:
                stack = None
            try:
                scales, terms = (
                    (None, None)
                    if stack is None
                    else (stack.scales(weights), stack.weight_terms(weights, self.buffers.where))
                )
                bounds = stack.parts[0].factor_bound if stack is not None and stack.single else None
                self._merger.apply(scales, stack is None or stack.single, terms, bounds)
            except BaseException:  # the weights hold lorahot's own (partial) rewrite, checked before it: not an edit
                with contextlib.suppress(Exception):
                    self._merger.record_all()
                raise
        else:
            self._wide.apply(stack)

    # -- checks -----------------------------------------------------------------------------

    def _slot(self, slot: object) -> int:
        if isinstance(slot, bool) or not isinstance(slot, numbers.Integral):
            raise UsageError(
                f"slot={shown(slot, 60)} is a {type(slot).__name__}; a slot is an int in 0..{self.slots - 1}."
            )
        index = integer(slot, f"slot={shown(slot, 60)}")
        if not 0 <= index < self.slots:
            base = (
                " -1 (the base model alone) is an entry of a per-row routing: activate([-1] * rows) runs a "
                "batch of that many rows on the base model, unload() empties a slot."
                if index == -1
                else ""
            )
            raise UsageError(
                f"slot={shown(slot, 200)} is out of range; this runtime has slots 0..{self.slots - 1} "
                f"(inject(..., slots=N) for more).{base}"
            )
        return index

    def _check_usable(
        self, *, placement: bool = True, every_layer: bool = False, base: bool = True, dora: bool = True
    ) -> None:
        """Raises :class:`UsageError` unless the runtime serves: not ejected, and (``placement``)
        every layer still in the model where inject put it, on the buffers it was bound to
        (checked on the first layer of the runtime, or on ``every_layer``), in merged mode
        (``base``) no targeted weight replaced since lorahot wrote it, and unmerged (``base`` and
        ``dora``: all but ``unload``, the way out) no layer holding a DoRA adapter whose base
        computes its weight at each call since (:meth:`DoraFactors.check_stored`). ``preload``
        skips the ``base`` checks: it writes no weight, may run on any thread, and would read the
        weights while the serving thread rewrites them (the load that follows checks them).

        Each call runs this after it has read every argument of the caller's (an ``__index__``,
        ``__float__``, ``__len__``, ``__getitem__``, ``__fspath__``, a mapping's methods, a tensor
        subclass's ``__torch_function__``), and runs nothing of the caller's after it: such code
        may write or replace a weight, eject the runtime or move its layers, and a check run
        before it would pass a weight lorahot then takes for its own (merged mode rewrote the
        caller's tensor, and the next call overwrote it from the copy of inject, silently). The
        merged check's :func:`~lorahot.runtime.written_probes.signature` of the weights is the
        one the call's rewrite then uses (:meth:`Merger.check_base`)."""
        self._check_not_ejected()
        if not placement:
            return
        if self._state.broken is not None:
            raise UsageError(self._state.broken)
        self._placement.check_linked(self.model, self.layers)
        if self._pipeline is not None:
            self._pipeline.check()
        self._placement.check_layers(self.model, self.layers, self.layers if every_layer else (self._placement.first,))
        if base:
            self._check_frozen()
            self._check_base(dora)

    def _check_frozen(self) -> None:
        """Refuses a call that writes the LoRA buffers or, merged, the targeted weights, where
        inductor compiled the model with ``freezing`` (seen while it traced a layer:
        :data:`lorahot.layers.tensor_handles.FROZEN`; merged, whose forward is the base
        module's, while inductor's global ``freezing`` is on): its graph holds them as constants
        of its compile, so it would go on computing that adapter whatever the call writes,
        silently. Merged, once freezing was seen on (at inject or at such a call) the refusal
        stays after freezing is turned off again: a graph compiled meanwhile still holds the
        weights of its compile until ``torch._dynamo.reset()``, which lorahot cannot see, so the
        runtime is ejected and injected again, as the message says."""
        now = self._merger is not None and freezing_on()
        self._merged_frozen = self._merged_frozen or now
        merged = self._merged_frozen
        if not (merged or any(arena.handle.key in FROZEN for arena in self.buffers.arenas)):
            return
        if merged:  # merged, the forward is the base module's own: lorahot cannot see whether it was compiled
            what = (
                f"inductor's freezing {'is' if now else 'was'} on (torch._inductor.config.freezing = True"
                f"{'' if now else ' at inject or at an earlier call of this runtime'}), and a model compiled with "
                "it holds the merged weights as constants of its compiled code (a merged model's forward is its "
                "base modules' own, so lorahot cannot tell whether this one was compiled)"
            )
        else:
            what = (
                "inductor compiled this model with freezing=True (torch._inductor.config.freezing), which folds the "
                "LoRA buffers into the compiled code as constants"
            )
        raise UsageError(
            f"{what}: the compiled model would keep computing the adapter it was compiled with whatever this call "
            "writes. Nothing was changed. Set torch._inductor.config.freezing = False (and leave freezing out of "
            "torch.compile's options), call torch._dynamo.reset(), then runtime.eject() and inject again before "
            "compiling."
        )

    def _check_not_ejected(self) -> None:
        """Raises :class:`UsageError` once the runtime was ejected, or while an eject of it has
        not finished (running on another thread, or stopped midway)."""
        how = self._state.ejected
        if how is not None and self._state.unfinished:
            raise UsageError(
                f"an eject of this runtime ({how}) did not finish: it is running on another thread, or a fault or an "
                "interrupt stopped it midway, and some layers may still be in the model. Once no eject runs, call "
                "runtime.eject() or lorahot.eject(model) again to finish it."
            )
        if how is not None:
            raise UsageError(f"this runtime was ejected; call lorahot.inject again ({how} took its layers out).")

    def _check_base(self, dora: bool) -> None:
        """In merged mode, refuses a targeted weight replaced since lorahot wrote it; unmerged,
        (``dora``) a layer holding a DoRA adapter whose base computes its weight at each call,
        and computes the DoRA factors again from a base weight written in place since."""
        if self._merger is not None:  # after the moves: a move is no checkpoint load
            self._merger.check_base()
            return
        if dora:
            self._dora.check_stored()
        for name in self._dora.moved():
            self._base_loaded(self.layers[name])

    def __copy__(self) -> NoReturn:
        raise UsageError(_NOT_COPIED)

    def __deepcopy__(self, memo: dict[int, object]) -> NoReturn:
        raise UsageError(_NOT_COPIED)

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise UsageError(_NOT_COPIED)

    def __repr__(self) -> str:
        held = self._current_info(self._active)
        now = (
            "empty"
            if held is None
            else " + ".join(
                f"{_tail(p.source)} x{p.scale!r}" if isinstance(p.scale, dict) else f"{_tail(p.source)} x{p.scale:g}"
                for p in held.parts
            )
        )
        if self._routing.rows is not None:
            rows = self._routing.rows
            now = f"per row {list(rows[:8])}{'...' if len(rows) > 8 else ''}"
        if self._state.ejected is not None:
            now = f"ejected by {self._state.ejected}"
        return (
            f"LoraRuntime(layers={len(self.layers)}, max_rank={self.max_rank}, slots={self.slots}, "
            f"active={self._active}: {now}, nbytes={self._allocated()})"
        )


_anonymous = itertools.count()


def _kept_by_identity(source: Source | Adapter, identity: str | None, read_kwargs: dict[str, Any]) -> bool:
    """Whether an entry preloaded without a key is cached: an in-memory source's (it has no
    identity: kept under an anonymous key), or a path's or Hub id's under its identity, unless
    its files changed while it was read, or its identity could not be taken (a stat that failed
    for a moment): no load of it would look for an entry under another key."""
    if identity is None:
        return not isinstance(source, (str, os.PathLike))
    return source_key(source, read_kwargs) == identity


def _base_weight(layers: dict[str, LoRALayer], name: str) -> torch.Tensor:
    """The model's own weight of layer ``name`` (the pristine one in merged mode)."""
    layer = layers[name]
    weight = layer.pristine_weight if layer.pristine_weight is not None else layer.base_weight
    to_local = getattr(weight, "to_local", None)  # a tensor-parallel layer's: this rank's shard
    return to_local() if callable(to_local) else weight


def _base_bias(layers: dict[str, LoRALayer], name: str) -> torch.Tensor | None:
    """The model's own bias of layer ``name`` (the pristine one in merged mode), or None."""
    layer = layers[name]
    if layer.pristine_bias is not None:
        return layer.pristine_bias
    bias = getattr(layer.base_layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def _arena_names(buffers: BufferManager) -> list[list[str]]:
    """Each arena's layer names, by their index in it (for messages)."""
    names = [[""] * len(a.specs) for a in buffers.arenas]
    for name, (arena, index) in buffers.where.items():
        names[arena][index] = name
    return names


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector around a swap (if it was on).

    A load allocates a few thousand short-lived objects, enough to trigger collections whose
    cost scales with everything the process holds: 1-3 ms of a 15 ms load on the CPU box.
    Reference counting still frees every one of them at once.
    """
    enabled = gc.isenabled()
    try:  # before the collector goes off: an interrupt at the return of gc.disable() turns it on again
        if enabled:
            gc.disable()
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _naming_part(part: int | None) -> Iterator[None]:
    """A stack's part that fails its own checks: its error, of the same class, with
    ``part k of the stack:`` in front (its source follows, as the part's own refusal names it;
    the parts of a stack read from mappings are all ``<mapping>``)."""
    try:
        yield
    except LoraError as exc:
        if part is None:
            raise
        raise type(exc)(f"part {part} of the stack: " + message(exc)) from exc


def _encoded(weights: tuple[Weight, ...]) -> tuple[object, ...]:
    """The weights as :func:`fingerprint.arguments` encodes them: a weight per layer as its
    values, arena by arena."""
    return tuple(tuple(tuple(v.tolist()) for v in w.vectors) if isinstance(w, LayerWeights) else w for w in weights)


def _tail(text: str, width: int = 40) -> str:
    """``text`` cut to its last ``width`` characters, for the repr."""
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _listed(slots: list[int]) -> str:
    """``"slot 0"`` or ``"slots 0, 1"``."""
    return f"slot {slots[0]}" if len(slots) == 1 else "slots " + ", ".join(map(str, slots))


def _are(items: list[int]) -> str:
    return "is" if len(items) == 1 else "are"


def _check_ejectable(model: nn.Module, layers: dict[str, LoRALayer]) -> None:
    """Refuses an eject before it changes anything where one of ``layers``, or of the copies in
    ``model`` it would unwrap too, cannot be unwrapped (:func:`check_ejectable`)."""
    check_ejectable({**layers, **_copies(model)})


def _copies(model: nn.Module) -> dict[str, LoRALayer]:
    """The LoRA layers in ``model`` that no serving runtime holds (copies), by name."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, LoRALayer) and (m.state is None or not m.state.held())
    }


def roots(model: nn.Module, components: tuple[str, ...]) -> list[nn.Module]:
    """The modules a user calls: ``model``, or each of its ``components`` (a pipeline's)."""
    return [m for c in components if (m := model._modules[c]) is not None] if components else [model]


def release_hooks(modules: Iterable[nn.Module]) -> None:
    """Undoes what a runtime's hooks changed on ``modules`` (and on every module they changed
    that holds no LoRA layer any more): eject, and an inject that failed after installing them."""
    for module in modules:
        peft_arguments.release(module)
        assigned_loads.release(module)
        embedding_resize.release(module)
        fused_projections.release(module)
