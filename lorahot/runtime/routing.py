"""Per-row routing: which slot each row of a batch computes with (``runtime.activate([...])``).

A routing is one slot index per row (``-1``: the base model only). :func:`check_routing` turns
what the user passed into a host int64 tensor ``[L]``, or raises before anything changes;
:class:`Routing` publishes it to the layers: per arena, an int64 device tensor of exactly ``L``
entries, allocated the first time a routing of that length is set and written in place ever
after, under the arena's key in :data:`~lorahot.layers.tensor_handles.ROUTES`, and whether it
has one entry per token of packed input (``lengths``) under the same key of
:data:`~lorahot.layers.tensor_handles.TOKENS`. The layers read them there
(:mod:`lorahot.layers.routing`). :func:`check_experts` refuses a routing that would send rows
to an adapter on a mixture-of-experts block's experts, whose rows are not the batch's.

The tensors of the :data:`KEPT_LENGTHS` lengths set most recently are kept (packed input makes
each new total of tokens a new length); a length set again after that gets new ones.

What a compiled model sees:

- a new routing of the same length is new data in the same tensor: no recompile, and a
  captured CUDA graph reads it (the routing is a graph input, copied in at each replay);
- one entry per row and one per token read the input differently: the compiler guards on
  which, and the first switch each way compiles a graph, kept beside the first;
- switching between whole-batch (``activate(k)``: the entry is None) and per-row mode changes
  what the forward computes: the first switch each way compiles a second graph, kept beside the
  first, so later switches recompile nothing;
- a routing of another length goes with a batch of another size: a new input shape, which
  recompiles unless the model was compiled with dynamic shapes (or the compiler made the batch
  size dynamic after seeing two); the routing's length is a dynamic size like the batch's, so
  the graph is not specialized to it.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lorahot.adapter import detached, storage_problem
from lorahot.errors import UsageError, format_problems, lines, shown
from lorahot.kernels.routed_linear import workspace
from lorahot.kernels.routed_lora import segments
from lorahot.layers.routing import EXPERTS, is_expert
from lorahot.layers.tensor_handles import ROUTES, SEGMENTS, TOKENS, WORKSPACES, publish_workspace
from lorahot.runtime.arguments import integer
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.staging import Staging

__all__ = [
    "Routing",
    "check_routing",
    "check_experts",
    "check_towers",
    "check_sequence_first",
    "one_slot",
    "routed_slots",
    "expert_layers",
    "EXPERTS",
    "KEPT_LENGTHS",
    "MAX_TOKENS",
]

#: the most tokens a packed routing (``activate(slots, lengths=...)``) spans: one forward's
#: input, far above any batch a model runs at once
MAX_TOKENS = 1 << 24
_INT64 = (torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max)


def check_routing(
    slots: object, lengths: object, count: int, filled: Sequence[bool], merged: bool = False
) -> torch.Tensor:
    """The routing as a host int64 tensor ``[L]``: ``slots`` one entry per row, or, with
    ``lengths``, each entry repeated for its row's tokens (packed input).

    Args:
        slots: a sequence of ints or a 1-D integer tensor (any device: read back once).
        lengths: None, or one token count (int >= 0) per entry of ``slots``.
        count: the runtime's number of slots.
        filled: per slot, whether it holds an adapter.
        merged: whether the runtime runs merged (which cannot route: only one slot for every
            row, which runs as the whole batch, is taken, and -1 for every row, the base
            weights for the whole batch).

    Raises:
        UsageError: merged mode, unless every entry is the same; not a sequence or 1-D
            integer tensor, or empty; an entry not an int in ``-1 .. count - 1``; an entry
            naming an empty slot; ``lengths`` of the wrong length or with a negative or non-int
            entry, or with no token at all.
    """
    route = _as_tensor(slots)
    out = ((route < -1) | (route >= count)).nonzero().flatten()  # on tensors: a packed routing has 2**24 entries
    if out.numel():
        problems = [f"row {i}: {int(route[i])}" for i in out[:20].tolist()]
        more = [f"  ... and {out.numel() - 20} more"] if out.numel() > 20 else []
        title = f"routing entries out of range (slots 0..{count - 1}, or -1 for the base model only):"
        raise UsageError(lines(format_problems(title, problems), *more))
    empty = [v for v in routed_slots(route, count) if not filled[v]]
    if empty:
        raise UsageError(
            f"the routing sends rows to empty slot{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))}; load "
            "an adapter there first, or route those rows to -1 (the base model only)."
        )
    if merged and not bool((route == route[0]).all()):  # one slot (or -1) for every row runs as the whole batch
        raise UsageError(
            "activate([...]) routes each row of a batch to its own slot, but this runtime was injected with "
            "merged=True: the active adapter is folded into the base weights, which every row shares. Inject without "
            "merged=True to serve mixed batches, or run one batch per adapter with activate(k) (and the rows for the "
            "base model alone with activate([-1] * rows))."
        )
    if lengths is None:
        return route
    return route.repeat_interleave(_lengths(lengths, route.shape[0]))


def routed_slots(route: torch.Tensor, count: int) -> list[int]:
    """The slots (not -1) ``route`` sends rows to, ascending; ``route`` is checked (host int64,
    entries in ``-1 .. count - 1``): counted in one pass, where sorting 2**25 entries took 1 s."""
    return (torch.bincount(route + 1, minlength=count + 1)[1:].nonzero().flatten()).tolist()


def one_slot(route: torch.Tensor) -> int | None:
    """The slot every entry of ``route`` (checked, host int64) names, where there is one and it
    is not -1; else None. Such a routing computes what ``activate(slot)`` does for any batch, so
    the runtime runs it as that (the whole-batch kernels: on an H200 a decode of 64 rows on one
    adapter took 1.19x the base model routed, 1.08x whole, ``benchmarks/README.md``)."""
    first = int(route[0])
    return first if first >= 0 and bool((route == first).all()) else None


def expert_layers(names: Sequence[str] | Mapping[str, int]) -> list[str]:
    """The layers among ``names`` (injected layer names, dotted module paths) that belong to
    a mixture-of-experts block's experts (:func:`lorahot.layers.routing.is_expert`)."""
    return [n for n in names if is_expert(n)]


def check_experts(routed: Mapping[int, Mapping[str, int]], experts: Collection[str]) -> None:
    """Refuses a per-row routing that sends rows to a slot whose adapter has weights on an
    expert layer (``experts``: the runtime's, found by name or by structure,
    :func:`lorahot.runtime.experts.find_experts`).

    An expert runs on the tokens its router picked, gathered in the router's order: its rows
    are a data-dependent selection of the batch's tokens, not the batch's rows. A layer sees
    only their count, and a count can match the routing's by chance (every token picked, or a
    subset of exactly ``L``), so the rows would take other rows' slots without any shape
    telling: wrong numbers. Rows sent to -1 or to slots without weights on the experts need
    nothing from them: under a per-row routing an expert layer computes its base output alone.

    Args:
        routed: each slot the routing sends rows to -> injected layer name -> rank, for the
            layers its adapter (or stack) touches.
        experts: the injected layers that are experts.

    Raises:
        UsageError: naming the slot, up to five of its expert layers, and what to do instead.
    """
    touching = _touching(routed, experts)
    if touching is not None:
        slot, shown = touching
        raise UsageError(
            f"the routing sends rows to slot {slot}, whose adapter has weights on the experts of a "
            f"mixture-of-experts block ({shown}). An expert runs on the tokens its router picked, gathered in "
            "the router's order, not on the batch's rows, so a per-row routing cannot give them their rows' "
            "slots (the numbers would be wrong). Run that adapter on a batch of its own with "
            f"runtime.activate({slot}), or route to slots whose adapters leave the expert layers out. (A layer "
            "is taken for an expert where its path has an 'experts' component, or where it sits in a list of "
            "modules beside a router: a weight with one row per entry of the list.)"
        )


def check_towers(routed: Mapping[int, Mapping[str, int]], towers: Collection[str]) -> None:
    """Refuses a per-row routing that sends rows to a slot whose adapter has weights on a
    multimodal model's vision or audio tower (``towers``: :func:`lorahot.runtime.towers.find_towers`).

    A tower runs on the batch's images, or their patches concatenated, or on its audio clips,
    not on its rows: a batch of images or clips can have the routing's length by chance, and
    they would then take other rows' slots (wrong numbers). Rows sent to -1 or to slots without weights on the tower
    need nothing from it: under a per-row routing a tower's layers compute their base output.

    Args:
        routed: each slot the routing sends rows to -> injected layer name -> rank.
        towers: the injected layers that belong to a vision or audio tower.

    Raises:
        UsageError: naming the slot, up to five of its tower layers, and what to do instead.
    """
    touching = _touching(routed, towers)
    if touching is not None:
        slot, shown = touching
        raise UsageError(
            f"the routing sends rows to slot {slot}, whose adapter has weights on a vision tower or audio tower "
            f"({shown}). A tower runs on the batch's images (or their patches) or audio clips, not on its rows, so a "
            "per-row routing cannot give them their rows' slots (the numbers would be wrong). Run that adapter on a "
            f"batch of its own with runtime.activate({slot}), or route to slots whose adapters leave the tower out."
        )


def check_sequence_first(routed: Mapping[int, Mapping[str, int]], layers: Collection[str]) -> None:
    """Refuses a per-row routing that sends rows to a slot whose adapter has weights on a layer
    that sees its input sequence-first (``layers``:
    :func:`lorahot.runtime.sequence_first.find_sequence_first`).

    Such a layer's first dimension is the time steps (``[T, B, in]``): where ``T`` equals the
    routing's length the shapes agree and each time step would take a row's slot (wrong
    numbers). Rows sent to -1 or to slots without weights on those layers need nothing from
    them: under a per-row routing they compute their base output.

    Args:
        routed: each slot the routing sends rows to -> injected layer name -> rank.
        layers: the injected layers that see their input sequence-first.

    Raises:
        UsageError: naming the slot, up to five of its sequence-first layers, and what to do instead.
    """
    touching = _touching(routed, layers)
    if touching is not None:
        slot, shown = touching
        raise UsageError(
            f"the routing sends rows to slot {slot}, whose adapter has weights on layers that see their input "
            f"sequence-first ({shown}): under a module that declares batch_first=False (nn.Transformer, "
            "nn.TransformerDecoderLayer, nn.MultiheadAttention) or in a model that runs its blocks sequence-first "
            "(FSMT, XLNet, Longformer, LED, Mask2Former). Their input is [T, B, ...], time steps first, and where "
            "T equals the routing's length its rows would take the slots of time steps (the numbers would be "
            f"wrong). Run that adapter on a batch of its own with runtime.activate({slot}), build the model with "
            "batch_first=True, or route to slots whose adapters leave those layers out."
        )


def _touching(routed: Mapping[int, Mapping[str, int]], layers: Collection[str]) -> tuple[int, str] | None:
    """The first slot of ``routed`` whose adapter has weights on any of ``layers``, and up to
    five of those layers, quoted, for a message; None where no slot has."""
    for slot, ranks in sorted(routed.items()):
        found = [repr(n) for n, r in ranks.items() if r > 0 and n in layers]
        if found:
            return slot, ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return None


def _as_tensor(slots: object) -> torch.Tensor:
    """``slots`` as a host int64 ``[L]`` (L >= 1), or a :class:`UsageError` saying what it is."""
    if isinstance(slots, np.ndarray):
        if slots.ndim != 1 or slots.dtype.kind not in "iu":
            hint = _one_slot_hint(slots.ndim == 0 and slots.dtype.kind in "iu")
            raise UsageError(
                f"a routing array must be 1-D with an integer dtype (one slot per row), got {slots.dtype} of shape "
                f"{slots.shape}; pass e.g. np.array([0, 2, -1]) or a list of ints{hint}."
            )
        route = _array(slots)
    elif isinstance(slots, torch.Tensor):
        if slots.is_meta:
            raise UsageError("the routing tensor is on the meta device, so it has no values; pass real slot indices.")
        if storage_problem(slots) is not None:
            raise UsageError(
                f"a routing tensor must be a plain dense tensor, got a {_kind(slots)} one; pass e.g. "
                "torch.tensor([0, 2, -1]) (or .to_dense() / .dequantize() it first)."
            )
        if slots.dim() != 1 or slots.dtype not in _INTEGERS:
            hint = _one_slot_hint(slots.dim() == 0 and slots.dtype in _INTEGERS)
            raise UsageError(
                f"a routing tensor must be 1-D with an integer dtype (one slot per row), got {slots.dtype} of shape "
                f"{tuple(slots.shape)}; pass e.g. torch.tensor([0, 2, -1]) or a list of ints{hint}."
            )
        slots = detached(slots)  # a subclass of the caller's runs nothing once read (see LoraRuntime._check_usable)
        wide = slots.dtype not in _FITS_INT64
        route = _exact(slots.cpu().tolist()) if wide else slots.to("cpu", torch.int64)
    elif isinstance(slots, Sequence) and not isinstance(slots, _BYTES):
        values = _entries(slots)
        plain = _plain_ints(values)
        if plain is not None:
            return plain
        # something else than plain ints within int64: read entry by entry, to name the first wrong one
        wrong = [i for i, v in enumerate(values) if type(v) is not int and not _integral(v)]
        if wrong:
            raise UsageError(
                f"routing entry {wrong[0]} is {shown(values[wrong[0]], 40)} ({type(values[wrong[0]]).__name__}); "
                f"each entry "
                "is a slot index (an int), or -1 for the base model only."
            )
        route = _exact(
            [v if type(v) is int else integer(v, f"routing entry {i} ({shown(v, 40)})") for i, v in enumerate(values)]
        )
    else:
        raise UsageError(
            "activate takes a slot (an int) for the whole batch, or a sequence, 1-D integer tensor or array of slots, "
            f"one per row; got {type(slots).__name__}."
        )
    if route.numel() == 0:
        raise UsageError("the routing is empty; pass one slot per row of the batch (or activate(k) for all rows).")
    return route


def _one_slot_hint(one_integer: bool) -> str:
    """Where a routing was given as a 0-D integer tensor or array (``one_integer``): how to say
    one slot for the whole batch (an int) or a batch of one row."""
    if not one_integer:
        return ""
    return (
        " (a 0-D one holds one slot: activate(int(slot)) runs the whole batch on it, activate([int(slot)]) a "
        "batch of one row)"
    )


def _plain_ints(values: list[object]) -> torch.Tensor | None:
    """``values`` as a host int64 ``[L]`` (L >= 1) where every entry is a plain int within
    int64, in one conversion (the types gathered and the ints read without a Python step per
    entry: 2**25 entries checked one by one took 15-25 s); else None, for the entry-by-entry
    reading that names what is wrong."""
    if not values or set(map(type, values)) != {int}:
        return None
    return _int64(values)  # type: ignore[arg-type]  # every entry an int: the set says so


def _array(slots: np.ndarray) -> torch.Tensor:
    """A 1-D integer array as a host int64 tensor, or a :class:`UsageError` naming the first
    entry no slot index can be (a uint64 beyond int64, which a cast would wrap)."""
    if slots.dtype == np.uint64 and slots.size and bool((slots > _INT64[1]).any()):
        huge = int(np.argmax(slots > _INT64[1]))
        raise UsageError(
            f"routing entry {huge} is {int(slots[huge])}, out of range; each entry is a slot index, or -1 for the "
            "base model only."
        )
    return torch.from_numpy(slots.astype(np.int64))


def _integral(value: object) -> bool:
    """Whether ``value`` is an integer (an int at once, else a ``numbers.Integral``), not a bool."""
    return type(value) is int or (not isinstance(value, bool) and isinstance(value, numbers.Integral))


def _entries(slots: Sequence[object]) -> list[object]:
    """The entries of a routing given as a sequence, or a :class:`UsageError` where reading
    them raises (a sequence type of the caller's)."""
    try:
        return list(slots)
    except Exception as exc:
        raise UsageError(
            f"the routing (a {type(slots).__name__}) cannot be read: iterating it raised {type(exc).__name__}; pass "
            "a list of ints."
        ) from None


#: text and raw bytes: sequences, but not of slot indices
_BYTES = (str, bytes, bytearray, memoryview)


def _kind(t: torch.Tensor) -> str:
    return "nested" if t.is_nested else "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")


#: the integer dtypes whose every value an int64 holds
_FITS_INT64 = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
#: the dtypes a routing or ``lengths`` tensor may have: integers (not ``bool``, and not the
#: ``bits`` dtypes, which hold raw bits no operator reads as numbers)
_INTEGERS = frozenset((*_FITS_INT64, torch.uint16, torch.uint32, torch.uint64))


def _exact(values: list[int]) -> torch.Tensor:
    """Python ints as an int64 tensor, or a :class:`UsageError` naming the first that no slot
    index can be (beyond int64: it would wrap)."""
    route = _int64(values)
    if route is None:
        huge = next(i for i, v in enumerate(values) if not _INT64[0] <= v <= _INT64[1])
        raise UsageError(
            f"routing entry {huge} is {values[huge]}, out of range; each entry is a slot index, or -1 for the "
            "base model only."
        )
    return route


def _int64(values: list[int]) -> torch.Tensor | None:
    """Python ints as an int64 tensor, in one conversion; None where one lies beyond int64 (it
    would wrap)."""
    try:
        return torch.tensor(values, dtype=torch.int64)
    except (OverflowError, ValueError, RuntimeError):  # torch's "Overflow when unpacking long long"
        return None


def _lengths(lengths: object, rows: int) -> torch.Tensor:
    """``lengths`` as a host int64 ``[rows]`` of token counts (>= 0, at least one token, at
    most :data:`MAX_TOKENS` in all)."""
    counts: torch.Tensor | None = None
    if isinstance(lengths, np.ndarray):
        if lengths.ndim == 1 and lengths.dtype.kind in "iu":
            counts = (
                _int64(lengths.tolist()) if lengths.dtype == np.uint64 else torch.from_numpy(lengths.astype(np.int64))
            )
    elif isinstance(lengths, torch.Tensor):
        if storage_problem(lengths) is None and lengths.dim() == 1 and lengths.dtype in _INTEGERS:
            lengths = detached(lengths)  # as the routing: nothing of a subclass runs once read
            wide = lengths.dtype not in _FITS_INT64
            counts = _int64(lengths.cpu().tolist()) if wide else lengths.to("cpu", torch.int64)
    elif isinstance(lengths, Sequence) and not isinstance(lengths, _BYTES):
        counts = _counts(lengths)
    # each count bounded before the sum: int64 counts near 2**63 add up past it and wrap
    if (
        counts is None
        or counts.shape[0] != rows
        or bool(((counts < 0) | (counts > MAX_TOKENS)).any())
        or not 0 < int(counts.sum()) <= MAX_TOKENS
    ):
        raise UsageError(
            f"lengths={shown(lengths, 80)} must hold one token count (an int >= 0) per entry of the routing ({rows}), "
            f"with at least one token and at most {MAX_TOKENS} in all: the packed input's tokens, row after row."
        )
    return counts


def _counts(lengths: Sequence[Any]) -> torch.Tensor | None:
    """``lengths`` given as a sequence of ints, as int64; None where an entry is no int or lies
    beyond int64, or where reading the sequence or an entry raises (a type of the caller's)."""
    try:
        values = list(lengths)
        plain = _plain_ints(values)
        if plain is not None:
            return plain
        if not all(_integral(v) for v in values):
            return None
        return _int64([int(v) for v in values])
    except Exception:  # the caller's __iter__ or __int__ raised: not one token count per entry
        return None


#: how many routing lengths a runtime keeps tensors for (the most recently set): packed input
#: routes one entry per token, so each new total of tokens is a new length
KEPT_LENGTHS = 16


class Routing:
    """The published routing of one runtime's arenas (see the module docstring)."""

    def __init__(self, buffers: BufferManager) -> None:
        self._arenas = buffers.arenas
        self._slots = buffers.slots
        #: length -> per arena, its routing tensor, that routing grouped by slot, and the host
        #: buffer both travel through; the most recently set length last, at most
        #: :data:`KEPT_LENGTHS` of them
        self._tensors: dict[int, list[tuple[torch.Tensor, torch.Tensor, Staging]]] = {}
        #: The routing in force (one slot per row, or per token with ``lengths``), or None.
        self.rows: tuple[int, ...] | None = None
        #: Whether :attr:`rows` sends every row to one slot, which runs as the whole batch on
        #: it (:meth:`one_slot`): nothing is published to the layers.
        self.whole = False
        #: Whether :attr:`rows` has one entry per token of packed input (``lengths``).
        self.tokens = False

    def state(self) -> tuple[tuple[int, ...] | None, bool, bool]:
        """What :meth:`restore` puts back: the routing in force, whole or per row, per token or not."""
        return self.rows, self.whole, self.tokens

    def restore(self, state: tuple[tuple[int, ...] | None, bool, bool]) -> None:
        """Puts back a :meth:`state`, after a :meth:`set` or :meth:`one_slot` that did not
        finish: an arena may have taken the new routing while another kept the old one."""
        rows, whole, tokens = state
        if rows is None or whole:
            self.clear()
            self.rows, self.whole = rows, whole
        else:
            self.set(torch.tensor(rows, dtype=torch.int64), tokens=tokens)

    def set(self, route: torch.Tensor, tokens: bool = False) -> None:
        """Publishes ``route`` (host int64 ``[L]``, checked; ``tokens``: one entry per token of
        packed input, from ``lengths``, not one per row) and its segments (the entries
        grouped by slot, sorted here once on the host): written in place into each arena's
        tensors of that length (allocated on first use), uploaded without waiting for the
        device (:class:`~lorahot.runtime.staging.Staging`). A CUDA arena also gets, once, the
        routed decode's zeroed workspace (:func:`lorahot.kernels.routed_linear.workspace`)."""
        length = route.shape[0]
        grouped = segments(route, self._slots)
        kept = self._kept(length, grouped.shape[0])
        for arena, (target, segs, staging) in zip(self._arenas, kept):
            host = staging.acquire().numpy()
            host[:length], host[length:] = route.numpy(), grouped.numpy()
            staging.send([(target, staging.buffer[:length]), (segs, staging.buffer[length:])])
            ROUTES[arena.handle.key], SEGMENTS[arena.handle.key] = target, segs
            TOKENS[arena.handle.key] = tokens
            if WORKSPACES[arena.handle.key] is None and arena.device.type == "cuda":
                with torch.inference_mode(False):
                    publish_workspace(arena.handle.key, workspace(arena.rank, arena.device))
        self.rows = tuple(route.tolist())
        self.whole = False
        self.tokens = tokens

    def one_slot(self, route: torch.Tensor) -> None:
        """Records ``route``, every entry one slot (:func:`one_slot`), which the runtime runs as
        the whole batch on that slot, made live: the layers read the live region, as after
        ``activate(k)``, so no row can take another's slot whatever the batch's layout. In
        merged mode also a route of -1 for every row, run as the base weights for the whole
        batch (:attr:`base_only`)."""
        self.clear()
        self.rows = tuple(route.tolist())
        self.whole = True

    @property
    def base_only(self) -> bool:
        """Whether the routing in force runs the whole batch on the base model alone (every
        entry -1, recorded by :meth:`one_slot`): in merged mode, the base weights as they were
        at inject, whatever the active slot holds."""
        return self.whole and self.rows is not None and self.rows[0] == -1

    def _kept(self, length: int, grouped: int) -> list[tuple[torch.Tensor, torch.Tensor, Staging]]:
        """Each arena's tensors for routings of ``length`` entries (``grouped`` entries grouped
        by slot), made on first use; the least recently set length is dropped past
        :data:`KEPT_LENGTHS`. Dropping is safe: the layers reach the routing in force through
        :data:`~lorahot.layers.tensor_handles.ROUTES`, a compiled graph takes it as an input
        (copied into a CUDA graph at each replay), and the allocators keep a buffer an upload
        still reads until it is done."""
        found = self._tensors.pop(length, None)
        if found is None:
            with torch.inference_mode(False):
                found = [
                    (
                        torch.empty(length, dtype=torch.int64, device=arena.device),
                        torch.empty(grouped, dtype=torch.int64, device=arena.device),
                        Staging(length + grouped, torch.int64, arena.device),
                    )
                    for arena in self._arenas
                ]
            for target, segs, _ in found:
                _any_length(target)
                _any_length(segs)
            while len(self._tensors) >= KEPT_LENGTHS:
                del self._tensors[next(iter(self._tensors))]
        self._tensors[length] = found  # the most recent last
        return found

    def clear(self) -> None:
        """Back to whole-batch mode: every layer reads the live region."""
        for arena in self._arenas:
            ROUTES[arena.handle.key] = SEGMENTS[arena.handle.key] = None
            TOKENS[arena.handle.key] = False
        self.rows = None
        self.whole = False
        self.tokens = False


def _any_length(t: torch.Tensor) -> None:
    """Lets the compiler keep ``t``'s length a symbol: a routing's length is the batch's, which a
    model compiled with the batch marked dynamic (``torch._dynamo.mark_dynamic(x, 0)``) keeps
    symbolic; a constant length would specialize that batch, which torch refuses."""
    torch._dynamo.maybe_mark_dynamic(t, 0)
