"""What every LoRA layer shares: the wrapped base module, its geometry, and the live buffers.

A LoRA layer computes ``base(x) + B(s * A(x))``, with ``s [R]`` a scale per row of the rank:
``alpha / r`` times the user's scale on every row for one adapter, each part's own on its rows
for several adapters stacked in one slot (:mod:`lorahot.runtime.stack`), so one layer computes
their sum ``B diag(s) A``. The scale multiplies the rank-wide intermediate, which is cheaper
than scaling the output-wide delta. In general (DoRA, LoRA bias)
``f * (base(x) + B(s * A(x)) + s[0] * lora_bias) + g`` per output channel, with ``f`` the DoRA
factor ``m / ||W0 + B diag(s) A||`` (1 for plain LoRA) and ``g = (1 - f) * bias`` (0 for
plain LoRA), which is PEFT's ``f * (W0 x + scale * (B A x + lora_bias)) + bias`` (a LoRA bias
belongs to the part in the first rows; a DoRA layer holds one part; where several parts of a
stack carry a LoRA bias, ``f = 1``, the bias row is 0 and ``g`` is their sum
``sum_p s_p * lora_bias_p``, :mod:`lorahot.runtime.bias_sums`). ``f``, the
LoRA bias, ``g`` and the magnitude ``m`` are the four rows of the layer's *extras*
``[4, out]``, device data like A and B: the forward computes the same graph whatever the
adapter, so swaps between DoRA and plain LoRA never recompile. Its ``lora_A``, ``lora_B``,
``lora_scale`` and ``lora_extras`` are views into the :class:`~lorahot.runtime.buffers.Arena`
that the runtime allocated once at ``max_rank``; the layer never allocates, reallocates or
rebinds them, so a compiled graph (or a captured CUDA graph) keeps reading the same addresses
after every swap. The layer reaches the arena tensors through one global handle
(:mod:`lorahot.layers.tensor_handles`), and a compiled graph rebuilds the views from them.

Per-row routing (``runtime.activate([slot, ...])``, :mod:`lorahot.layers.routing`): while the
arena's entry in :data:`~lorahot.layers.tensor_handles.ROUTES` holds a routing, the forward
reads every slot's region (the *slot views*, ``[slots, ...]``, rebuilt like the live views) and
gives each row of the batch its own slot's update and extras; the fused and wide paths are
skipped (a wide layer's weight is a view of its base columns, so its base output is unchanged).

State dicts: the wrapper keeps the original module as ``base_layer`` but saves and loads its
state under the original keys, so a model with LoRA layers injected still round-trips its base
checkpoint unchanged. The LoRA buffers are not persistent.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lorahot.errors import UsageError
from lorahot.layers import routing
from lorahot.layers.refusal import refuse
from lorahot.layers.state import RuntimeState
from lorahot.layers.tensor_handles import ROUTES, TENSORS, TOKENS, TensorHandle, mark_static

__all__ = [
    "Shard",
    "LayerSpec",
    "LoRALayer",
    "input_name",
    "overrides_forward",
    "own_code",
    "forward_mismatch",
    "mismatch",
    "probe_forward",
    "dora_needs",
    "unusual_values",
    "FLOAT_DTYPES",
    "library_operands",
    "refuse_assigned_load_under",
    "is_dtensor",
    "kept_parametrizations",
    "WIDE_BUFFER",
    "EXTRA_F",
    "EXTRA_BIAS",
    "EXTRA_G",
    "EXTRA_M",
    "EXTRA_ROWS",
    "EXTRA_DEFAULTS",
]

#: Buffer names under which a layer registers the arena tensors its live views belong to.
_ARENA_BUFFERS = ("_lora_arena_A", "_lora_arena_B", "_lora_arena_S", "_lora_arena_E")
#: The rows of a layer's extras ``[4, out]``: the DoRA factor ``f``, the LoRA bias, ``g =
#: (1 - f) * base bias``, the DoRA magnitude ``m``; and the values with no adapter.
EXTRA_F, EXTRA_BIAS, EXTRA_G, EXTRA_M = range(4)
EXTRA_ROWS = 4
EXTRA_DEFAULTS = (1.0, 0.0, 0.0, 0.0)
#: Buffer under which a widened layer keeps its base weight with the live A beneath it.
WIDE_BUFFER = "_lora_wide"


@dataclass(frozen=True)
class Shard:
    """The slice of a tensor-parallel layer's weight that this rank holds (see
    :mod:`lorahot.layers.sharded`).

    Attributes:
        dim: ``"out"`` for a column-parallel layer (weight ``Shard(0)``: this rank computes
            output channels ``[start, stop)``, and holds those rows of B); ``"in"`` for a
            row-parallel one (weight ``Shard(1)``: it reads input features ``[start, stop)``,
            and holds those columns of A).
        start, stop: the slice of the full dimension, as ``torch.chunk`` cuts it.
        size: the full dimension (what adapter files hold).
        rank, ranks: this rank's coordinate in the 1-D device mesh, and the mesh's size.
    """

    dim: str
    start: int
    stop: int
    size: int
    rank: int
    ranks: int


@dataclass(frozen=True)
class LayerSpec:
    """The geometry of one LoRA layer, as the arena and the loader see it.

    Attributes:
        kind: ``"linear"``, ``"conv"`` or ``"embedding"``.
        in_dim: length of one row of A: ``in_features``, ``in_channels * prod(kernel)`` or
            ``num_embeddings``.
        out_dim: ``out_features``, ``out_channels`` or ``embedding_dim``.
        a_row_shape: the trailing shape of A as adapter files store it, A being
            ``[r, *a_row_shape]``: ``(in,)``, ``(in, *kernel)`` or ``(num_embeddings,)``.
        b_trailing: trailing singleton dims of B in files (``(1,) * nd`` for convs).
        groups: groups of the base conv (1 otherwise). The rank is split into ``groups``
            equal slices, slice ``j`` feeding output group ``j``.
        shard: for a tensor-parallel layer, the slice of its weight this rank holds; then
            ``in_dim``, ``out_dim`` and ``a_row_shape`` are this rank's (what its buffers hold),
            and :meth:`full_dims` gives the layer's whole ``(in, out)`` (what files hold).
        weight_shard: for a layer whose LoRA is whole though its weight is sharded (a
            transformers style with a replicated input and output, see
            :mod:`lorahot.layers.styled`), the slice of the weight this rank holds: a copy of
            the base weight an adapter carries is cut to it before it is compared.
    """

    kind: str
    in_dim: int
    out_dim: int
    a_row_shape: tuple[int, ...]
    b_trailing: tuple[int, ...] = ()
    groups: int = 1
    shard: Shard | None = None
    weight_shard: Shard | None = None

    def full_dims(self) -> tuple[int, int]:
        """``(in, out)`` of the whole layer: this rank's unless the layer is sharded."""
        s = self.shard
        if s is None:
            return self.in_dim, self.out_dim
        return (s.size, self.out_dim) if s.dim == "in" else (self.in_dim, s.size)

    def a_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of A in an adapter file for ``rank``: ``[r, *a_row_shape]``."""
        return (rank, *self.a_row_shape)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of B in an adapter file for ``rank``: ``[out, r / groups, *ones]``."""
        return (self.out_dim, rank // self.groups, *self.b_trailing)

    def weight_shape(self) -> tuple[int, ...]:
        """The base weight's torch layout, ``[out, in / groups, *kernel]`` (``[out, in]`` for a
        linear): the shape a weight-kind ``ΔW`` (LoHa, LoKr, a diff, a rotation) takes, as
        LyCORIS builds it from the weight itself."""
        if self.groups == 1:
            return (self.out_dim, *self.a_row_shape)
        first, *rest = self.a_row_shape
        return (self.out_dim, first // self.groups, *rest)


#: The attributes :attr:`LoRALayer._plan` gathers for the forward.
_PLANNED = frozenset(
    {"merged", "fused", "wide", "extras", "regional", "_key", "_geometry", "_slot_geometry", "_wide_at", "_input_name"}
)


class LoRALayer(nn.Module):
    """Base class of the LoRA layers: wraps ``base_layer`` and owns no storage of its own.

    The contract with the runtime: everything the runtime and the merger call on a layer is
    declared here, and nothing else is reached from outside (no private attributes).

    - at inject: :attr:`spec`, :meth:`live_views`, :meth:`bind`, :meth:`merge_refusal`;
    - while serving: :meth:`bound_address` (is the layer still on its buffers?), :attr:`state`
      (shared with the runtime: has either eject taken the layers out?);
    - for the one-GEMM path: :meth:`widenable`, :meth:`widen`, :meth:`wide_rows`, :meth:`unwiden`;
    - in merged mode: :meth:`merge_operands`, :attr:`merged`, :attr:`pristine_weight`.

    Subclasses set :attr:`spec` from the base module and implement :meth:`live_views`,
    :meth:`lora_delta` and :meth:`merge_operands`; a subclass with a fused kernel overrides
    :meth:`fusable`, :meth:`can_fuse` and :meth:`fused_forward`.
    """

    spec: LayerSpec

    #: Set once at inject time in merged mode (the adapter lives in the base weights then);
    #: never changed afterwards, so the compiler sees a constant.
    merged: bool = False
    #: Set at bind time where the layer type has a fused kernel that applies; constant after.
    fused: bool = False
    #: Set by :meth:`widen` where the layer runs base and shrink as one GEMM; constant after.
    wide: bool = False
    #: Set at bind time: whether the forward applies the extras (DoRA factor, LoRA bias);
    #: constant after. Without them (``inject(..., extras=False)``) the forward is
    #: ``base(x) + B(s * A(x))`` with no elementwise work past the kernel's.
    extras: bool = True
    #: Set at bind time for models compiled block by block (``inject(..., regional=True)``):
    #: under the compiler the layer hands its own views to the graph as inputs, instead of
    #: rebuilding them from the arena at offsets the graph holds as constants, so that identical
    #: blocks share one compiled graph; constant after.
    regional: bool = False
    #: In merged mode, the base weight as it was at inject time (what eject puts back).
    pristine_weight: torch.Tensor | None = None
    #: In merged mode, the base bias as it was at inject time, if the layer has one (diffs
    #: with ``diff_b`` rewrite it; eject puts it back).
    pristine_bias: torch.Tensor | None = None
    #: In merged mode, ``(positions, values, numel, bias, version, digest)``: a few elements of
    #: the weight, the whole bias, the weight's version counter and its row and column sums as
    #: lorahot last wrote them, to notice a weight or bias changed since
    #: (:func:`lorahot.runtime.merge.replaced`); version and digest None after a move.
    written_probe: (
        tuple[
            torch.Tensor, torch.Tensor, int, torch.Tensor | None, int | None, tuple[torch.Tensor, torch.Tensor] | None
        ]
        | None
    ) = None
    #: In merged mode, whether ``load_state_dict`` brought a base weight or bias that differs
    #: from the one lorahot last wrote (compared in full when it loads: :func:`_add_base_prefix`).
    checkpoint_loaded: bool = False
    #: In merged mode, whether a weight or bias parameter was put back in the base layer after a
    #: parametrization, ``weight_norm``, ``spectral_norm`` or pruning applied since inject took it
    #: out (its removal registers one): it holds the merged weight reparametrized, so the runtime
    #: refuses to write it, and eject puts the base weight and bias of inject back
    #: (:func:`lorahot.runtime.merge.restores`).
    base_put_back: bool = False
    #: Shared with the runtime that bound the layer (see :mod:`lorahot.layers.state`).
    state: RuntimeState | None = None
    #: ``(A, B, scale, extras)`` views, set by :meth:`bind`.
    _live: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    #: The same views over every slot (``[slots, ...]``), set by :meth:`bind`.
    _slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    #: The layer's module path in the model, set by :meth:`bind` (for messages).
    _path: str = ""
    #: The name the base module's ``forward`` gives its input (:func:`input_name`), set at
    #: construction; a call that passes the input by keyword reads it (from :attr:`_plan`).
    _input_name: str | None = None

    #: What the forward branches on, as one tuple: ``(merged, fused, wide, extras, arena key,
    #: view geometry, slot views' geometry, wide group, unrouted, input name)``, kept equal to those attributes by
    #: :meth:`__setattr__`. A compiled model re-checks every attribute its forward reads on each
    #: call, per layer (one guard or more each): read as one constant tuple they cost one check
    #: instead of a dozen. Both geometries and the wide group (see :attr:`_wide_at`) are None
    #: for a :attr:`regional` layer: the graph then reads the layer's own views, and the plan
    #: holds nothing that differs between the layers of identical blocks. ``unrouted``: the
    #: layer's rows are not the batch's, and no per-row routing reaches it: a mixture-of-experts
    #: block's expert (:func:`lorahot.layers.routing.is_expert`, or by structure:
    #: :mod:`lorahot.runtime.experts`) or a vision tower's layer (:mod:`lorahot.runtime.towers`).
    #: ``input name``: :attr:`_input_name`, for a call that passes the input by keyword (None in
    #: merged mode, whose forward passes every argument on to the base module as it came).
    _plan: tuple[Any, ...] = (False, False, False, True, -1, (), (), None, False, None)
    #: For a wide layer whose buffer is one of a group's, back to back in one allocation
    #: (:mod:`lorahot.kernels.wide_groups`): ``(handle key, (size, stride, offset), outs)``, the
    #: geometry of its buffer in the allocation, as the compiled graph reads it, and every
    #: member's output width (the fused kernel is taken where it pays for all of them); else
    #: None. Set by :meth:`widen`.
    _wide_at: tuple[int, tuple[Any, ...], tuple[int, ...]] | None = None

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        complex_ = next((t for t in (*base_layer.parameters(), *base_layer.buffers()) if t.is_complex()), None)
        if complex_ is not None:  # inject(dtype=...) would give it real buffers, and cast its input to them
            raise UsageError(
                f"{type(base_layer).__name__} has {complex_.dtype} weights; LoRA buffers are real, and the update of a "
                "complex input would drop its imaginary part. Exclude this module from targets."
            )
        super().__init__()
        self.base_layer = base_layer
        # The same module as a plain attribute: the forward reaches it without going through
        # nn.Module.__getattr__ (and this class's), which the compiler would guard per call.
        object.__setattr__(self, "_base", base_layer)
        # the name the base's forward gives its input, for a call that passes it by keyword
        self._input_name = input_name(base_layer)
        self.spec = spec
        self.register_state_dict_post_hook(_drop_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)
        self.register_load_state_dict_post_hook(_report_base_keys)

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from ``base_layer`` (``weight``, ``in_features``,
        ...), so code that inspects a layer keeps working after inject."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        base = self.__dict__.get("_base")
        if name == "base_layer" and base is not None and value is not base:
            raise UsageError(
                f"{self._path or type(self).__name__}: its base_layer cannot be replaced after inject: the layer "
                "computes with the module it wrapped (and its LoRA buffers are shaped for it). Call runtime.eject(), "
                "put the new module in the model, then inject again."
            )
        if name in _BASE_PARAMETERS and base is not None and name in base._parameters:
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                _put_plain_tensor(self, name, value)
                return
            # the base layer's parameter, as reading it gives (transformers' tie_weights assigns
            # the output embedding's weight): set there, and refused there where the layer
            # could not follow (:func:`_refuse_replaced_weight`)
            setattr(base, name, value)
            return
        if name == "_is_fsdp_managed_module" and value and base is not None:
            _refuse_fsdp1(self)  # FSDP1 marks every module it will wrap, before it changes any parameter
        if name in _ACCELERATE_HOOK and base is not None:
            _refuse_accelerate_hook(self)  # accelerate's add_hook_to_module, before its hook moves anything here
        super().__setattr__(name, value)
        if name in _PLANNED:
            seen = self.__dict__
            geometry, slots = seen.get("_geometry", ()), seen.get("_slot_geometry", ())
            if self.regional:  # the graph reads the layer's own views (see regional)
                geometry = slots = None
            wide_at = None if self.regional else seen.get("_wide_at")
            unrouted = seen.get("_unrouted", False)
            plan = (
                self.merged,
                self.fused,
                self.wide,
                self.extras,
                seen.get("_key", -1),
                geometry,
                slots,
                wide_at,
                unrouted,
                seen.get("_input_name"),
            )
            if self.merged:  # the forward reads nothing else: the smallest constant to compare
                plan = (True, False, False, False, -1, (), (), None, False, None)
            object.__setattr__(self, "_plan", plan)

    def live_views(self, a_rows: torch.Tensor, b_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's ``(lora_A, lora_B)`` views of its arena rows ``[R, in_dim]`` (A) and
        ``[R, out_dim]`` (B transposed); see the subclass for the layout."""
        raise NotImplementedError

    def bind(
        self,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        lora_scale: torch.Tensor,
        lora_extras: torch.Tensor | None = None,
        *,
        handle: TensorHandle | None = None,
        fused: bool = True,
        state: RuntimeState | None = None,
        extras: bool = True,
        path: str = "",
        regional: bool = False,
        unrouted: bool = False,
    ) -> None:
        """Attaches the live views; called once by the runtime at inject time, never again.

        ``handle`` holds the arena tensors the views live in (made here if not given). Under
        ``torch.compile`` the layer rebuilds its views from those global tensors (see
        :mod:`lorahot.layers.tensor_handles`); eagerly it uses the views. The arena tensors are also
        registered as non-persistent buffers, so ``model.to()`` after inject can be detected.
        ``fused`` allows a fused kernel where the layer has one that applies (:meth:`fusable`;
        see :mod:`lorahot.kernels.lora_linear`). ``state`` is the runtime's
        :class:`~lorahot.layers.state.RuntimeState`, which ``lorahot.eject`` marks.
        ``lora_scale`` is the ``[R]`` view of the layer's per-row scales.
        ``lora_extras`` is the ``[4, out]`` view of the layer's extras (see the module
        docstring); without one the layer gets its own, holding the no-adapter values.
        ``extras`` False makes the forward skip them (the runtime then refuses DoRA and LoRA
        biases). ``path`` is the layer's module path, which its errors name. ``regional``: see
        :attr:`regional`; the views are then marked as static addresses, so that CUDA graphs
        read them in place rather than copying them into each replay. ``unrouted``: the layer's
        rows are not the batch's, so no per-row routing reaches it: a mixture-of-experts
        block's expert (by name or structure: :mod:`lorahot.runtime.experts`), or a layer of a
        vision tower (:mod:`lorahot.runtime.towers`).
        """
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_unrouted", unrouted)
        self.extras = extras
        if lora_extras is None:
            lora_extras = torch.tensor(EXTRA_DEFAULTS, dtype=lora_scale.dtype, device=lora_scale.device)
            lora_extras = lora_extras[:, None].repeat(1, self.spec.out_dim)
        lora_extras = self.live_extras(lora_extras)
        self._live = (lora_A, lora_B, lora_scale, lora_extras)
        roots = tuple(view if view._base is None else view._base for view in self._live)
        if handle is None or any(r is not t for r, t in zip(roots, TENSORS.get(handle.key, ()))):
            handle = TensorHandle(roots)
        self._handle = handle  # keeps the TENSORS entry alive as long as the layer
        self._key = handle.key
        # plain ints: the graph rebuilds each view from its arena tensor without touching it
        self._geometry = tuple((tuple(v.shape), v.stride(), v.storage_offset()) for v in self._live)
        self._slot_geometry = tuple(routing.slot_geometry(v, r) for v, r in zip(self._live, roots))
        routing_views = tuple(r.as_strided(*g) for r, g in zip(roots, self._slot_geometry))
        self._slots = routing_views  # type: ignore[assignment]
        for name, root in zip(_ARENA_BUFFERS, roots):
            self.register_buffer(name, root, persistent=False)
        self.fused = fused and self.fusable(lora_A)
        self.state = state
        self.regional = regional
        if regional:  # graph inputs of fixed shapes, at fixed addresses, whose values loads rewrite in place
            for view in (*self._live, *routing_views):
                # static shapes: under dynamic=True a view's size that equals the batch (or another
                # view's offset) would otherwise become a guard, which the next block or batch breaks
                mark_static(view)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copied layer (``deepcopy``, unpickled) reads its own copied handle's key, not the
        original's (:meth:`lorahot.layers.tensor_handles.TensorHandle.__reduce__`)."""
        super().__setstate__(state)
        handle = self.__dict__.get("_handle")
        if handle is not None and self.__dict__.get("_key") != handle.key:
            self._key = handle.key
        group, at = self.__dict__.get("_wide_handle"), self.__dict__.get("_wide_at")
        if group is not None and at is not None and at[0] != group.key:  # the copy's own allocation
            self._wide_at = (group.key, *at[1:])
        base = self._modules.get("base_layer")
        if base is not None and "_base_load_hooks" in self.__dict__:  # a copy of an attached layer
            _WRAPPERS[base] = weakref.ref(self)  # its weights are checked as the original's

    def attach(self) -> None:
        """Called once when the layer takes its base module's place in the model (after every
        wrapper of an inject was built). Hooks the base module's ``load_state_dict``, so that a
        load of its weight or bias, through the model, this layer or the base module itself,
        tells the runtime (:attr:`RuntimeState.base_loaded`: DoRA factors depend on them).
        Subclasses that override it call it too."""
        if "_base_load_hooks" in self.__dict__:
            return
        base = self.base_layer
        hooks = (
            base.register_load_state_dict_pre_hook(_BaseLoadHook(self, post=False)),
            base.register_load_state_dict_post_hook(_BaseLoadHook(self, post=True)),
        )
        object.__setattr__(self, "_base_load_hooks", hooks)
        # the shapes the LoRA buffers were made for: a new weight is checked against them
        shapes = {n: tuple(p.shape) for n in _BASE_PARAMETERS if (p := base._parameters.get(n)) is not None}
        object.__setattr__(self, "_base_shapes", shapes)
        _WRAPPERS[base] = weakref.ref(self)  # a new weight for it is checked: _refuse_replaced_weight

    def detach(self) -> None:
        """Called when the base module goes back in its place (eject, or an inject that
        failed): undoes :meth:`attach`."""
        for hook in self.__dict__.pop("_base_load_hooks", ()):
            hook.remove()
        ref = _WRAPPERS.get(self.base_layer)
        if ref is not None and ref() is self:
            del _WRAPPERS[self.base_layer]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LoRALayer:
        """A move of the model (``model.half()``, ``.to(device)``) after inject, as ``nn.Module``
        applies it, with two differences:

        - the arena tensors every layer of a runtime registers are converted once per move and
          shared (:func:`_moved_arena`), not copied whole into each layer: the layers keep
          computing with the views they were bound to, and the new buffers only tell the runtime
          that it was moved (:meth:`bound_address`), so a copy per layer was memory for nothing
          (an independent audit: 48 layers, 54 MB after ``model.half()`` for a 3 MB model);
        - in merged mode, the pristine weight and bias eject puts back and the elements read back
          to notice a base checkpoint are converted as the weights are: after ``model.half()``
          then ``model.float()`` eject restores the base as those moves left it. Before, the round
          trip's rounding read as a checkpoint loaded since, and eject kept the adapter merged.
        """
        arenas = {n: self._buffers[n] for n in _ARENA_BUFFERS if self._buffers.get(n) is not None}
        self._buffers.update(dict.fromkeys(arenas))  # None: nn.Module._apply skips them
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(arenas)
        self._buffers.update({n: _moved_arena(fn, root) for n, root in arenas.items()})  # type: ignore[arg-type]
        if self.pristine_weight is not None:
            self.pristine_weight = fn(self.pristine_weight)
        if self.pristine_bias is not None:
            self.pristine_bias = fn(self.pristine_bias)
        if self.written_probe is not None:
            positions, written, numel, bias, version, digest = self.written_probe
            moved = fn(written)
            if moved.dtype != written.dtype or digest is None or (written.is_meta and not moved.is_meta):
                # a conversion changes the bytes: the samples are compared after the same
                # conversion (lorahot.runtime.merge._differs), the version and sums no longer apply;
                # off the meta device (model.to_empty) the sums hold no bytes to carry over
                version, digest = None, None
            else:  # the same bytes (another device, or no move at all): the sums still apply
                digest = (digest[0].to(moved.device), digest[1].to(moved.device))
            self.written_probe = (positions, moved, numel, None if bias is None else fn(bias), version, digest)
        return self

    def bound_address(self) -> tuple[int, ...]:
        """Addresses of the tensors the layer computes with that something outside lorahot could
        replace: the arena tensor of its A buffer (and, widened, its wide buffer and the base
        weight living in it). They change only when something replaced them (``model.to()`` or
        ``load_state_dict(assign=True)`` after inject), which the runtime refuses to serve."""
        buffer = self._buffers[_ARENA_BUFFERS[0]]
        return (0 if buffer is None else buffer.data_ptr(),)

    @property
    def base_weight(self) -> torch.Tensor:
        """The wrapped module's ``weight`` (merged mode rewrites it in place).

        Raises:
            UsageError: it has none, or not a tensor (a quantized layer holding packed data, or
                ``weight()`` as a method).
        """
        weight = getattr(self.base_layer, "weight", None)  # (an AttributeError here would read as the property's)
        if not isinstance(weight, torch.Tensor):
            raise UsageError(
                f"{self._path or type(self.base_layer).__name__}: its {type(self.base_layer).__name__} has no weight "
                f"tensor (weight is {type(weight).__name__}: packed quantized data?), which this call reads. Exclude "
                "this module from targets."
            )
        return weight

    @property
    def base_bias(self) -> torch.Tensor | None:
        """The wrapped module's ``bias`` tensor, or None."""
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def weight_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` in the torch layout ``[out, in, *kernel]`` as the base weight lays it out
        (Conv1D transposes; Linear and conv reshape)."""
        return delta.reshape(self.base_weight.shape)

    def holds_dora(self) -> bool:
        """Whether any slot (or the live region) holds a DoRA adapter for this layer: a nonzero
        magnitude row in its extras. Reads the device (for a load hook, not a forward)."""
        live = self._live is not None and bool(self._live[3][EXTRA_M].any())  # [4, out, ...]
        return live or (self._slots is not None and bool(self._slots[3][:, EXTRA_M].any()))  # [slots, 4, out, ...]

    def _views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, B, scale, extras)``: the live views eagerly; rebuilt from the global arena
        tensors under ``torch.compile`` (free in the graph). The forward takes all at once."""
        if not torch.compiler.is_compiling():
            live = self._live
            if live is None:
                raise UsageError(
                    f"this {type(self).__name__} has no buffers: layers are made and bound by lorahot.inject, not "
                    "constructed by hand."
                )
            if torch._C._get_tracing_state() is not None:  # torch.jit.trace records this call
                return self._traced_views()
            return live
        if _exporting():  # a constant when compiling: no guard, nothing traced
            _recorded(self, "torch.export")
        key, geometry = self._plan[4:6]
        if geometry is None:  # regional: the layer's own views, inputs of the graph
            assert self._live is not None
            return self._live
        a, b, s, e = TENSORS[key]
        ga, gb, gs, ge = geometry
        return a.as_strided(*ga), b.as_strided(*gb), s.as_strided(*gs), e.as_strided(*ge)

    def _traced_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live views as ``torch.jit.trace`` must see them: rebuilt from the arena tensors
        the layer registers as buffers, which the trace reads as the module's own. The views
        themselves it would record as constants, pooled by value (an empty slot's zero A and B
        became one tensor, and equal scales of two layers one), so a later load reached the
        traced graph only in part; from the buffers, it follows every write in place (loads,
        ``unload``, ``set_scale``, ``activate(k)``). See :func:`_recorded`."""
        _recorded(self, "torch.jit.trace")
        roots = [self._buffers[name] for name in _ARENA_BUFFERS]
        a, b, s, e = (root.as_strided(*g) for root, g in zip(roots, self._geometry))  # type: ignore[union-attr]
        return a, b, s, e

    def _slot_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, B, scale, extras)`` over every slot, ``[slots, ...]`` each (see :meth:`_views`)."""
        if not torch.compiler.is_compiling():
            assert self._slots is not None  # bound: _views ran first
            return self._slots
        if self._plan[6] is None:  # regional: the layer's own views, inputs of the graph
            assert self._slots is not None
            return self._slots
        a, b, s, e = TENSORS[self._plan[4]]
        ga, gb, gs, ge = self._plan[6]
        return a.as_strided(*ga), b.as_strided(*gb), s.as_strided(*gs), e.as_strided(*ge)

    @property
    def lora_A(self) -> torch.Tensor:
        """Live A, ``[R, ...]`` (a view into the arena; see the subclass for its layout)."""
        return self._views()[0]

    @property
    def lora_B(self) -> torch.Tensor:
        """Live B (transposed for linear layers), a view into the arena."""
        return self._views()[1]

    @property
    def lora_scale(self) -> torch.Tensor:
        """Live per-row scales ``[R]``, a view into the arena's scale tensor: row ``k`` of A is
        scaled by ``lora_scale[k]`` (one value on every row for a single adapter)."""
        return self._views()[2]

    @property
    def lora_extras(self) -> torch.Tensor:
        """Live extras ``[4, out, *ones]`` (DoRA factor, LoRA bias, ``g``, magnitude), a view
        into the arena; shaped to broadcast over the output's channel dimension."""
        return self._views()[3]

    def live_extras(self, rows: torch.Tensor) -> torch.Tensor:
        """The ``[4, out]`` extras as the forward broadcasts them (``[4, out]`` where channels are
        the last dimension; convs override)."""
        return rows.view(EXTRA_ROWS, self.spec.out_dim)

    def channel_dim(self) -> int:
        """Which dimension of the base weight flattened to 2-D (the layout of
        :meth:`merge_operands`) runs over the output channels: 0 (rows) unless the subclass
        says otherwise."""
        return 0

    def dora_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """``[out]``: the L2 norm of each output channel of ``weight`` (2-D, see :meth:`channel_dim`)."""
        norm: torch.Tensor = torch.linalg.vector_norm(weight, dim=1 - self.channel_dim())
        return norm

    def dora_refusal(self) -> str | None:
        """Why DoRA cannot run on this layer, or None. DoRA's factor ``m / ||W0 + scale * B @ A||``
        reads the base weight ``W0``. Here: it is not a dense floating-point tensor (a quantized
        layer's packed or integer data, torchao's tensor subclasses: not the values the layer
        computes with), or the base module has forward pre-hooks, which run before its forward and
        may rewrite the weight (a clamp, pruning's mask); lorahot computes the factor at a load,
        ``set_scale`` and the runtime call after a write it sees, not at each call as PEFT does, so
        the forward would go on with a factor of the weight before the hook. Subclasses add their
        own reasons."""
        base = self.base_layer
        computed = self.computed_base()  # first: reading a parametrized weight runs its parametrization
        if computed is not None:
            return (
                f"{computed} the weight DoRA's factor m / ||W0 + scale * B @ A|| is computed from (lorahot computes it "
                "when the adapter or its scale changes, not at each call as PEFT does); remove them "
                "(torch.nn.utils.parametrize.remove_parametrizations, torch.nn.utils.prune.remove for a pruned weight, "
                "remove_weight_norm, remove_spectral_norm), or load a plain LoRA here"
            )
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return dora_needs(base, f"it has no weight tensor (weight is {type(weight).__name__})")
        form = unusual_values(weight)
        if form is not None:
            return dora_needs(base, f"its weight is {form}, not the values it computes with")
        return None

    def computed_base(self) -> str | None:
        """What makes the base module compute its weight or bias anew at each call rather than
        read it as stored, as the start of a sentence ending in "the weight", or None: a
        parametrization (``torch.nn.utils.parametrizations.weight_norm`` or ``spectral_norm``,
        ``register_parametrization``) or forward pre-hooks (the older ``weight_norm`` and
        ``spectral_norm``, pruning; any other may rewrite the weight). Reads no tensor: reading a
        parametrized weight runs the parametrization, and a ``spectral_norm`` steps its power
        iteration at each read in training mode."""
        base = self.base_layer
        kinds = [k for k in _BASE_PARAMETERS if parametrize.is_parametrized(base, k)]
        if kinds:
            return (
                f"{type(base).__name__}'s {' and '.join(kinds)} {'is' if len(kinds) == 1 else 'are'} computed by a "
                "parametrization at each call, which may change"
            )
        if base._forward_pre_hooks:
            return f"{type(base).__name__} has forward pre-hooks, which run before each call and may rewrite"
        return None

    def lora_bias_refusal(self) -> str | None:
        """Why a LoRA bias (PEFT ``lora_bias``) cannot run on this layer, or None."""
        return None

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base module's output plus the live adapter's update, called as the base module is
        called: its input positionally, or by the name its own ``forward`` gives it
        (``input=`` for torch's Linear, conv and Embedding; see :func:`input_name`), with
        whatever other arguments it takes."""
        # Every attribute read here is re-checked by a compiled model's guards on each call, per
        # layer: keep them few (see lorahot.layers.tensor_handles).
        merged, fused, wide, extras, key, geometry, slot_geometry, _, unrouted, name = self._plan
        if merged:
            out: torch.Tensor = self._base(*args, **kwargs)
            return out
        if args:
            x, args = args[0], args[1:]
        else:  # the input by keyword (``self.proj(input=h)``), under the name the base's forward gives it
            if name not in kwargs:
                self.refuse_keyword_call(kwargs)
            x = kwargs.pop(name)  # (a dict of this call's own)
        route = ROUTES.get(key)  # an unbound layer has no entry: _views() below says so
        if route is not None and unrouted:  # an MoE expert or a vision tower: no routed slot has weights here
            routed_out: torch.Tensor = self._base(x, *args, **kwargs)  # (the runtime refuses that routing)
            return routed_out
        if not extras and not args and not kwargs and torch.compiler.is_compiling():
            if _exporting():  # a constant when compiling: no guard, nothing traced
                _recorded(self, "torch.export")
            if route is not None:  # one slot per row (a graph of its own: the compiler guards on None)
                z = self.compiled_routed(x, route, fused, wide, key, slot_geometry)
            elif wide:
                z = self.compiled_forward(x, fused, key, geometry)  # the common compiled cases in one call
            else:
                z = None
            if z is not None:
                return z
        a, b, scale, e = self._views()
        if x.device != a.device:  # a constant of a compiled graph: no guard, no cost there
            raise UsageError(
                f"this {type(self).__name__}'s input is on {x.device} and its LoRA buffers on {a.device}: the model "
                "was moved to another device after inject, or its input does not reach the layer's device. Move the "
                "model first, then inject (or eject, move, and inject again)."
            )
        if route is not None:  # one slot per row (a graph of its own: the compiler guards on None)
            return self._routed_forward(x, route, *args, **kwargs)
        if not args and not kwargs:
            if fused and wide and self.dynamic_rows(x):  # compiled, rows symbolic: one op decides per call
                return self._finish(self.dynamic_forward(x, a, b, scale), e, scale)
            if fused and self.can_fuse(x, a):
                return self._finish(self.fused_forward(x, a, b, scale), e, scale)  # base(x) + B(s * A(x))
            if wide and self.can_widen(x) and self.wide_bound():
                return self._finish(self.wide_forward(x, a), e, scale)
        y: torch.Tensor = self._base(x, *args, **kwargs)
        # The LoRA bias and the DoRA factor apply next to the add, where the compiler fuses
        # them into one elementwise pass (usually into the consumer of y as well): no extra
        # kernel per layer. With plain LoRA (f = 1, bias = g = 0) the extras give ``y + delta``
        # bitwise in float32.
        a, b = library_operands(a, b)
        if not extras:
            return y + self.lora_delta(x, a, b, scale).to(y.dtype)
        d = self.lora_delta(x, a, b, scale) + e[EXTRA_BIAS] * scale[0]
        return self._bias_gradient(torch.addcmul(e[EXTRA_G], e[EXTRA_F], y + d), e[EXTRA_F], e[EXTRA_G].shape).to(
            y.dtype
        )

    def refuse_keyword_call(self, kwargs: dict[str, Any]) -> None:
        """Raises for a call that passes no input positionally and does not name it as the base
        module's ``forward`` does (its first parameter, :func:`input_name`).

        Raises:
            UsageError: always.
        """
        name, kind = self._input_name, type(self._base).__name__
        given = ", ".join(f"{k}=" for k in kwargs) or "no arguments"
        how = (
            f"{kind}.forward names it {name!r}. Pass it positionally or as {name}=x"
            if name is not None
            else f"{kind}.forward gives it no name a keyword call can use. Pass it positionally"
        )
        raise UsageError(
            f"{self._describe()}: called with {given} and no positional input; the LoRA update applies to the input "
            f"the base module takes first, and {how}."
        )

    def _finish(self, z: torch.Tensor, e: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``f * (z + s[0] * lora_bias) + g`` for ``z = base(x) + B(s * A(x))`` from a kernel
        path (one elementwise pass after it); ``z`` itself without extras."""
        if not self._plan[3]:  # extras
            return z
        out = torch.addcmul(e[EXTRA_G], e[EXTRA_F], z + e[EXTRA_BIAS] * scale[0])
        return self._bias_gradient(out, e[EXTRA_F], e[EXTRA_G].shape).to(z.dtype)

    def _bias_gradient(self, out: torch.Tensor, f: torch.Tensor, channels: torch.Size) -> torch.Tensor:
        """``out`` (``f * (base(x) + ...) + g``, ``g = (1 - f) * b0`` a constant of the DoRA load)
        plus ``(1 - f) * (b - b.detach())``, zero in value, where autograd records the base bias
        ``b``: its gradient is then ``f + (1 - f) = 1`` per channel, as in PEFT's forward, which
        adds the bias outside the factor, instead of ``f``. ``f`` broadcasts against ``out``, and
        ``channels`` is the shape one value per output channel takes to broadcast alike
        (``[out]``, a conv's ``[out, *ones]``). Nothing is added outside autograd or for a layer
        without a bias: the outputs of inference are untouched."""
        bias = getattr(self._base, "bias", None)
        if not (isinstance(bias, torch.Tensor) and bias.requires_grad and torch.is_grad_enabled()):
            return out
        return out + (1 - f) * (bias - bias.detach()).reshape(channels)

    def _routed_forward(self, x: torch.Tensor, route: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output plus each row's own slot's update (and extras), ``route [L]`` giving
        each row's slot (see :mod:`lorahot.layers.routing`)."""
        refused = self._misfit(x, route, lambda: self._base(x, *args, **kwargs))
        if refused is not None:
            return refused
        a, b, s, e = self._slot_views()
        z = self.routed_fused(x, a, b, s, route) if not args and not kwargs else None
        if z is None:
            y: torch.Tensor = self._base(x, *args, **kwargs)
            z = self.routed_sum(x, y, a, b, s, route)
        if not self._plan[3]:  # extras
            return z
        return self._routed_extras(z, e, s, route)

    def _misfit(self, x: torch.Tensor, route: torch.Tensor, like: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """None where ``x`` fits ``route`` (:func:`lorahot.layers.routing.row_misfit`); else the
        refusal (:func:`lorahot.layers.refusal.refuse`, ``like`` the layer's base output), which
        raises when it runs."""
        tokens = TOKENS.get(self._plan[4], False)
        if not routing.row_misfit(x, route.shape[0], self.spec.kind, self.row_dims(x), tokens):
            return None
        return refuse(routing.misfit_message(self._describe(), self.spec.kind, tokens), like, x, route)

    def _routed_extras(self, z: torch.Tensor, e: torch.Tensor, s: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """``f * (z + s[0] * lora_bias) + g`` with each row's own extras from the slot views
        ``e [slots, 4, out, *ones]`` and ``s [slots, R]``; ``-1`` rows take the no-adapter
        values (``f = 1``, the rest 0), so they keep ``z`` as it is."""
        length = route.shape[0]
        on, index, s0 = routing.row_scales(s[:, :1], route)  # s0 [L, 1]: zero for no slot
        rows = e[index]  # [L, 4, out, *ones]
        flag = on.view(length, *(1,) * (rows.dim() - 2))  # [L, 1, *ones]
        f = torch.where(flag, rows[:, EXTRA_F], torch.ones_like(rows[:, EXTRA_F]))
        g = rows[:, EXTRA_G] * flag.to(rows.dtype)
        bias = rows[:, EXTRA_BIAS] * s0.view(flag.shape)
        shape = self.row_shape(length)
        f = f.reshape(shape)
        out = torch.addcmul(g.reshape(shape), f, self.row_view(z, length) + bias.reshape(shape))
        return self._bias_gradient(out, f, rows.shape[2:]).reshape(z.shape).to(z.dtype)

    def routed_fused(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, route: torch.Tensor
    ) -> torch.Tensor | None:
        """The base output and each row's update in one kernel, where a subclass has one that
        applies to ``x``; None (the default) for the base layer then :meth:`routed_sum`."""
        return None

    def routed_sum(
        self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, route: torch.Tensor
    ) -> torch.Tensor:
        """``y`` (the base output) plus each row's update ``B_k(s_k * A_k(x_row))``, ``k`` its
        slot in ``route [L]`` (none for -1), from the slot views ``a``, ``b``, ``s [slots, R]``.
        The library formula; a subclass with a kernel overrides it."""
        on, index, scales = routing.row_scales(s, route)
        z = y + self.routed_delta(x, *library_operands(a, b), scales, index).to(y.dtype)
        # rows of no slot keep y itself: their zero scales do not zero an update that
        # overflowed (inf * 0 is NaN), whatever adapter slot 0 holds. Selected in y's own
        # shape, so the output is no view: a view's base would be guarded on by a block
        # compiled on its own that takes it as input (regional=True)
        return torch.where(self.row_mask(on, y), z, y)

    def row_mask(self, on: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``on [L]`` (one flag per routing entry) as a mask that broadcasts against the output
        ``y``: each entry covers its ``T`` consecutive rows of :meth:`row_view`."""
        length = on.shape[0]
        rows = math.prod(y.shape[:-1]) // length
        # expanded, not repeat_interleave: under a batch marked dynamic, torch 2.11's
        # repeat_interleave specialized the symbolic entry count
        return on[:, None].expand(length, rows).reshape(*y.shape[:-1], 1)

    def routed_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Each row's update, shaped like ``base(x)``: row ``i`` computes with the slot views
        ``a[index[i]]``, ``b[index[i]]`` and its scales ``scales [L, R]`` (zero for no slot)."""
        raise NotImplementedError

    def row_dims(self, x: torch.Tensor) -> int:
        """Trailing dimensions of the input that are not rows (1: a linear's ``in``)."""
        return 1

    def row_view(self, t: torch.Tensor, length: int) -> torch.Tensor:
        """An output ``t`` with its ``length`` rows first and its channels last: ``[L, T, out]``."""
        return t.reshape(length, math.prod(t.shape[:-1]) // length, t.shape[-1])  # no -1: out may be 0 (a shard)

    def row_shape(self, length: int) -> tuple[int, ...]:
        """How one value per row and output channel broadcasts against :meth:`row_view`."""
        return (length, 1, self.spec.out_dim)

    def _describe(self) -> str:
        s = self.spec
        local = " on this rank" if s.shard is not None else ""  # a tensor-parallel layer's spec is its shard's
        kind = f"{type(self).__name__} over {type(self.base_layer).__name__} ({s.in_dim} -> {s.out_dim}{local})"
        return f"{self._path} ({kind})" if self._path else kind

    def lora_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``B(scale * A(x))``, the per-row ``scale [R]`` applied to the rank-wide intermediate,
        with the shape of ``base_layer(x)``, for live views ``a``, ``b`` and ``scale``."""
        raise NotImplementedError

    def fusable(self, lora_A: torch.Tensor) -> bool:
        """Whether this layer, bound to ``lora_A``, has a fused kernel that applies."""
        return False

    def can_fuse(self, x: torch.Tensor, a: torch.Tensor) -> bool:
        """Whether :meth:`fused_forward` applies to ``x`` (only called when :attr:`fused`)."""
        return False

    def fused_forward(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The whole layer in a fused kernel, where the subclass has one."""
        raise NotImplementedError

    def widenable(self, max_rank: int, dtype: torch.dtype) -> bool:
        """Whether :meth:`widen` applies (the subclass says; none by default)."""
        return False

    def widen(self, max_rank: int, block: torch.Tensor | None = None, at: tuple[Any, ...] | None = None) -> None:
        """Moves the base weight into a buffer with ``max_rank`` columns of scaled B beside it and
        ``max_rank`` rows of A beneath it (see :mod:`lorahot.layers.linear`); only where
        :meth:`widenable`. ``block``: that buffer, zero, as one of a group's in one allocation;
        ``at``: the group's handle, the block's place in the allocation and the members' output
        widths (:attr:`_wide_at`, :func:`lorahot.runtime.wide.widen_layers`)."""
        raise NotImplementedError

    def wide_rows(self) -> torch.Tensor:
        """The ``[max_rank, out_dim]`` view (transposed: rows 1 apart, columns ``in_dim + max_rank``)
        of the wide buffer's columns that hold ``s[:, None] * Bt`` (each rank row of B times its
        scale)."""
        raise NotImplementedError

    def wide_a_rows(self) -> torch.Tensor:
        """The ``[max_rank, in_dim]`` rows of the wide buffer that hold the live A (rows
        ``in_dim + max_rank`` apart)."""
        raise NotImplementedError

    def unwiden(self) -> None:
        """Gives the base weight its own storage back (eject); a no-op unless widened."""

    def can_widen(self, x: torch.Tensor) -> bool:
        """Whether :meth:`wide_forward` applies to ``x`` (only called when :attr:`wide`)."""
        return False

    def wide_bound(self) -> bool:
        """Whether the base weight is still the block of the wide buffer that :meth:`wide_forward`
        reads (see the subclass)."""
        return True

    def is_wide_block(self, weight: Any) -> bool:
        """Whether ``weight`` is the wide buffer's block that a widened layer computes from (same
        storage, shape, strides and dtype); False where the layer is not widened."""
        return False

    def wide_forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The whole layer from the wide buffer, where the subclass has one (``a`` the live A
        view, which the compiled shrink reads)."""
        raise NotImplementedError

    def compiled_forward(
        self, x: torch.Tensor, fused: bool, key: int, geometry: tuple[Any, ...] | None
    ) -> torch.Tensor | None:
        """Under ``torch.compile``, for a wide layer without extras: its fused or wide path in one
        call, or None where another path applies (the general forward then decides)."""
        return None

    def compiled_routed(
        self,
        x: torch.Tensor,
        route: torch.Tensor,
        fused: bool,
        wide: bool,
        key: int,
        slot_geometry: tuple[Any, ...] | None,
    ) -> torch.Tensor | None:
        """Under ``torch.compile``, for a routed layer without extras: its routed kernel path in
        one call, or None where another path applies (the general routed forward then decides,
        or refuses). Every method the general path calls on the layer is one more guard per layer
        that a compiled call checks (:meth:`compiled_forward` does the same for one adapter)."""
        return None

    def dynamic_rows(self, x: torch.Tensor) -> bool:
        """Whether :meth:`dynamic_forward` applies to ``x`` (only asked of a layer both fused and
        wide): compiled with a row count the kernel choice cannot be decided on without a guard."""
        return False

    def dynamic_forward(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The whole layer, the fused kernel or the wide GEMMs chosen per call inside one operator."""
        raise NotImplementedError

    def merge_refusal(self) -> str | None:
        """Why this layer cannot run in merged mode, or None if it can."""
        return "merged mode has no weight layout for this layer type"

    def merged_lora_refusal(self) -> str | None:
        """Why merged mode, which this layer runs in, cannot fold a LoRA (``B @ A``) into its
        weight, though it folds other kinds (a grouped conv), or None."""
        return None

    def merge_operands(self, a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m1, m2)`` with ``m1 @ m2`` equal to the LoRA delta in the layout of the base
        weight flattened to 2-D, for arena rows ``a [rows, in_dim]`` and ``bt [rows, out_dim]``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        s = self.spec
        return f"kind={s.kind}, in_dim={s.in_dim}, out_dim={s.out_dim}, groups={s.groups}"


#: the dtypes the layers compute their LoRA in, and merged mode rewrites weights in
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def library_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The live ``a`` and ``b`` as the library formula computes the update with them: float16
    buffers as float32 copies, on every device, so that the rank-wide intermediate ``x @ A.T``,
    its scaled copy ``s * (x @ A.T)`` and the update stay in float32, as with PEFT's float32
    adapter weights, the update rounded to the output's dtype where it is added. Kept in float16
    (largest value 65504) either overflows to inf where the output itself is well in range
    (``x @ A.T`` of 1e5 with a small B, or ``s = alpha / r = 32`` on ``x @ A.T`` of 3e3). On CUDA
    that costs a float16 layer's update its tensor cores (float32 GEMMs over the rank, and a
    float32 copy of ``x``); the fused kernels keep the intermediate in float32 with tensor-core
    dots (:mod:`lorahot.kernels.triton_lora_linear`), and float16 layers are not widened
    (:data:`lorahot.runtime.wide.UNWIDENED_DTYPES`). Other dtypes keep their buffers as they are:
    bfloat16 has float32's range."""
    if a.dtype != torch.float16:
        return a, b
    return a.float(), b.float()


def unusual_values(t: torch.Tensor) -> str | None:
    """How ``t`` holds something other than the values it stands for, as a dense tensor of a
    floating dtype lorahot computes in: a tensor subclass that holds them in another form
    (torchao's quantized and float8 weights), a quantized or sparse tensor, a float8 or integer
    dtype (a quantized layer's data, which its forward scales); None where it is such a tensor."""
    wrapped: bool = is_traceable_wrapper_subclass(t)  # (a bool: mypy would narrow t by the guard)
    if wrapped or t.is_quantized or t.layout != torch.strided:
        return f"of type {type(t).__name__}" + (" (quantized)" if t.is_quantized else "")
    if t.dtype not in FLOAT_DTYPES:
        return f"{t.dtype}"
    return None


def dora_needs(base: nn.Module, why: str) -> str:
    """A refusal of DoRA on ``base``: its factor needs the weight ``base`` computes with, and ``why``."""
    return (
        f"DoRA's factor m / ||W0 + scale * B @ A|| needs the weight W0 that {type(base).__name__} computes with, "
        f"and {why}; load a plain LoRA here, or exclude this module from targets"
    )


def input_name(module: nn.Module) -> str | None:
    """The name of the first parameter of ``module``'s ``forward`` (an instance's own included),
    where a call can pass it by keyword or by position alike; None where it cannot (a
    positional-only or keyword-only parameter, ``*args``, none, or no signature to read)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a callable without a signature Python can read
        return None
    first = parameters[0] if parameters else None
    return first.name if first is not None and first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD else None


def overrides_forward(module: nn.Module, torch_cls: type[nn.Module]) -> bool:
    """Whether ``module``'s class replaces ``torch_cls.forward`` (what lorahot's math assumes)."""
    return type(module).forward is not torch_cls.forward


def own_code(module: nn.Module) -> list[str]:
    """What of its own ``module`` runs around its class's ``forward`` when called: forward
    pre-hooks, forward hooks, a ``forward`` set on the instance (accelerate's offloading sets
    one); empty where none."""
    found = [("forward pre-hooks", module._forward_pre_hooks), ("forward hooks", module._forward_hooks)]
    return [what for what, hooks in found if hooks] + (
        ["a forward of the instance's own"] if "forward" in module.__dict__ else []
    )


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
    the model (:attr:`RuntimeState.traced`): it replays the one-slot path taken now, following
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


def forward_mismatch(
    module: nn.Module,
    probe: torch.Tensor,
    expected: Callable[[torch.Tensor], torch.Tensor],
    written: Sequence[torch.Tensor] = (),
) -> str | None:
    """Runs ``module(probe)`` and ``expected(probe)``; describes how they differ, or None.

    They agree when the largest difference is within ``sqrt(eps)`` of the output's dtype times
    the largest expected value: rounding and summation order pass, any real transform fails.
    With ``written`` (the tensors merged mode rewrites in place: the weight, the bias) both run
    again after a probe change is written into those tensors in place, as merged mode writes,
    and must agree then too: a forward that computes from a copy of its weight made earlier (a
    transposed or converted cache, filled at construction or at its first call) agrees with the
    weight as it is, and would ignore every rewrite. The change is put back afterwards, bit for
    bit (:func:`_rewritten`). Runs under ``torch.no_grad()``. The module is left as it was: what
    a forward may change in it (an observer's or fake-quantizer's buffers, a parametrization's
    power-iteration vectors, a counter attribute) is put back afterwards (:func:`_kept_state`),
    whatever the outcome.
    """
    outcomes = []
    try:
        with torch.no_grad(), _kept_state(module):
            outcomes.append((module(probe), expected(probe), ""))
            if written:  # its first call's cache, if any, is kept for the second
                with _rewritten(written):
                    outcomes.append((module(probe), expected(probe), _REWRITTEN))
    except Exception as exc:  # the module's own forward: anything can happen
        return f"calling it on a probe input raised {type(exc).__name__}: {exc}"
    for got, want, when in outcomes:
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return f"on a probe input{when} it returned {shape}, expected a tensor of shape {tuple(want.shape)}"
        off = mismatch(got, want)
        if off is not None:
            diff, size = off
            return (
                f"on a probe input{when} its output differs from the expected one by up to {diff:.3g} (largest value "
                f"{size:.3g})"
            )
    return None


#: how :func:`forward_mismatch` names its second comparison
_REWRITTEN = (
    ", after a probe change was written into its weights in place as merged mode writes them (its forward computes "
    "from something else, such as a copy of the weight made earlier),"
)


@contextlib.contextmanager
def _rewritten(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """Adds a probe change to the first slice of each of ``tensors`` along its first dimension
    (a weight's first output row or channel, an embedding's first row, a bias's first element:
    what a probe reads, and only that much copied), random values of about its largest
    magnitude, in place; puts every one back bit for bit on exit."""
    parts = [t.detach()[:1] if t.dim() else t.detach() for t in tensors]  # views: writes reach the tensors
    kept = [p.clone() for p in parts]
    gen = torch.Generator().manual_seed(1)
    inference = any(t.is_inference() for t in tensors)  # written only inside inference mode
    try:
        with torch.inference_mode() if inference else torch.no_grad():
            for p in parts:
                size = float(p.abs().max()) if p.numel() else 0.0
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (size if size > 0 else 1.0)
                p.add_(noise.to(p.device, p.dtype))
        yield
    finally:
        with torch.inference_mode() if inference else torch.no_grad():
            for p, k in zip(parts, kept):
                p.copy_(k)


def mismatch(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float] | None:
    """``(largest difference, largest expected value)`` where ``got`` is not ``want`` within
    ``sqrt(eps)`` of ``want``'s dtype times its largest value (rounding and summation order pass,
    any real transform fails; NaN fails too); None where they agree."""
    diff = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    size = float(want.double().abs().max()) if want.numel() else 0.0
    eps = torch.finfo(want.dtype).eps if want.is_floating_point() else 0.0
    return None if diff <= math.sqrt(eps) * size else (diff, size)


def probe_forward(module: nn.Module, probe: torch.Tensor) -> Any:
    """``module.forward(probe)`` (its forward alone: the instance's own where it has one, no
    forward hooks), leaving the module and the process as they were: under ``torch.no_grad()``,
    with what a forward may change in the module put back (:func:`_kept_state`) and the CPU's
    random generator, and ``probe``'s CUDA device's, restored (a dropout in training mode draws
    from them). Whatever the forward raises passes through."""
    devices = []
    if probe.device.type == "cuda":
        devices = [probe.device.index if probe.device.index is not None else torch.cuda.current_device()]
    with torch.no_grad(), torch.random.fork_rng(devices=devices), _kept_state(module):
        return module.forward(probe)


@contextlib.contextmanager
def kept_parametrizations(models: Sequence[nn.Module]) -> Iterator[None]:
    """Restores, on exit, the state of every parametrization in ``models`` (see
    :func:`_kept_state`): in training mode each read of a parametrized weight runs its
    parametrization's forward, and spectral norm's advances its power-iteration vectors, so
    inject's reads of the weights it wraps (their shapes, dtypes, whether they are sharded)
    would change the model."""
    with contextlib.ExitStack() as stack:
        for model in models:
            for module in model.modules():
                if parametrize.is_parametrized(module):
                    stack.enter_context(_kept_state(module.parametrizations))  # type: ignore[arg-type]
        yield


@contextlib.contextmanager
def _kept_state(module: nn.Module) -> Iterator[None]:
    """Restores, on exit, what a probe forward may change in ``module`` and its submodules: each
    buffer (the tensor object and its values) and each other plain attribute (the object, and
    a list's, dict's or set's items, in place: hook dicts keep their identity, which their
    handles rely on). Parameters are not copied (a forward that writes its own weights is
    refused by its output, or not at all)."""
    modules = list(module.modules())
    buffers = [dict(m._buffers) for m in modules]
    values = [{k: b.detach().clone() for k, b in bufs.items() if b is not None} for bufs in buffers]
    skip = {"_parameters", "_buffers", "_modules"}
    attrs = [{k: (v, _items(v)) for k, v in m.__dict__.items() if k not in skip} for m in modules]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs, vals, kept in zip(modules, buffers, values, attrs):
                if any(m._buffers.get(k) is not b for k, b in bufs.items()) or len(m._buffers) != len(bufs):
                    m._buffers.clear()
                    m._buffers.update(bufs)
                for k, v in vals.items():
                    b = bufs[k]
                    assert b is not None  # values hold only the buffers that were tensors
                    if b.dtype != v.dtype or b.device != v.device:  # converted in place (``buffer.data = ...``)
                        b.data = v
                    elif b.shape != v.shape:  # resized in place (an observer's first call): onto the saved copy
                        b.set_(v.untyped_storage(), v.storage_offset(), v.shape, v.stride())
                    else:  # an inference tensor is written only inside inference mode
                        with torch.inference_mode() if b.is_inference() else contextlib.nullcontext():
                            b.copy_(v)
                for k in [k for k in m.__dict__ if k not in skip and k not in kept]:
                    del m.__dict__[k]
                for k, (obj, items) in kept.items():
                    if m.__dict__.get(k) is not obj:
                        m.__dict__[k] = obj
                    if items is not None and not _same_items(obj, items):
                        _put_items(obj, items)


def _items(value: object) -> list[Any] | None:
    """A list's or set's items, a dict's ``(key, value)`` pairs (held, to be put back); None for
    anything else."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, set)):
        return list(value)
    return None


def _same_items(obj: Any, items: list[Any]) -> bool:
    """Whether ``obj`` still holds exactly ``items`` (:func:`_items`), compared by identity."""
    now = _items(obj)
    if now is None or len(now) != len(items):
        return False
    if isinstance(obj, dict):
        return all(k1 == k2 and v1 is v2 for (k1, v1), (k2, v2) in zip(now, items))
    if isinstance(obj, set):
        return {id(v) for v in now} == {id(v) for v in items}
    return all(a is b for a, b in zip(now, items))


def _put_items(obj: Any, items: list[Any]) -> None:
    """Puts ``items`` (:func:`_items`) back into ``obj``, in place."""
    obj.clear()
    if isinstance(obj, dict):
        obj.update(items)
    elif isinstance(obj, list):
        obj.extend(items)
    else:
        obj.update(items)


def _drop_base_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict post hook: ``<prefix>base_layer.k`` is saved as ``<prefix>k``."""
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_base_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre hook: ``<prefix>k`` is loaded into ``<prefix>base_layer.k``. In merged mode it
    also notes whether the weight or bias about to be loaded differs from what lorahot wrote
    there (:attr:`LoRALayer.checkpoint_loaded`): the next rewrite would start from the copies
    taken at inject and throw it away, so the runtime refuses instead, and eject keeps it."""
    inner = prefix + "base_layer."
    own = {prefix + n for n in (*_ARENA_BUFFERS, WIDE_BUFFER)}
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner) and k not in own]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)
    module.__dict__["_loading_prefix"] = prefix  # for _report_base_keys
    # for _report_base_keys: whether the load writes the base weight or bias, which the base
    # module's own hook (_BaseLoadHook) reports, unless this is a copy's layer (whose base
    # module's hooks were copied inert)
    module.__dict__["_loading_base"] = inner + "weight" in state_dict or inner + "bias" in state_dict
    if isinstance(module, LoRALayer):
        module.base_layer.__dict__.pop("_lorahot_reported", None)
        if args and args[0].get("assign_to_params_buffers"):  # local_metadata
            # before anything below is noted; called on the layer itself, nothing was loaded
            _refuse_assigned_load(module, state_dict, inner, _load_outcome(prefix))
    if isinstance(module, LoRALayer) and module.pristine_weight is not None:
        base = module.base_layer
        for name in _BASE_PARAMETERS:
            new, now = state_dict.get(inner + name), getattr(base, name, None)
            if isinstance(new, torch.Tensor) and isinstance(now, torch.Tensor) and not _same_values(new, now):
                module.checkpoint_loaded = True


def _dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` if the user's code imported it, else None (lorahot
    never imports it: a DTensor can only exist once the user's code has)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None) if module is not None else None


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor (a tensor-parallel weight, input or output)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


#: the base layer's parameters the wrapper's attribute assignment sets on the base layer
_BASE_PARAMETERS = ("weight", "bias")
#: base layer -> its wrapper (weakly: the entry goes with either), for :func:`_refuse_replaced_weight`
_WRAPPERS: weakref.WeakKeyDictionary[nn.Module, weakref.ReferenceType[LoRALayer]] = weakref.WeakKeyDictionary()


def _refuse_replaced_weight(module: nn.Module, name: str, param: Any) -> None:
    """Refuses, before it takes effect, a new parameter for the weight of a base layer wrapped in
    a model whose layer computes from its own copy of it (a wide layer) or holds the adapter
    merged in (merged mode; its bias too): the layer would keep computing with the old weight,
    silently, or eject would write the old weight back over the new one. Other layers call
    their base layer and take the new parameter as it is. Runs for every parameter registered
    in the process (``nn.Module.register_parameter``, which attribute assignment calls): one
    dictionary lookup."""
    try:
        ref = _WRAPPERS.get(module)
    except TypeError:  # a module class that defines __eq__ without __hash__: never one lorahot wraps
        return
    layer = ref() if ref is not None else None
    if layer is None or layer.base_layer is not module:
        return
    refusal = _placement_refusal(layer, name, param) or _shape_refusal(layer, name, param)
    if refusal is None and _put_back(layer, name, param):
        layer.base_put_back = True
        return
    if refusal is None and not _computed_from(layer, name, param):
        refusal = _copy_refusal(layer, name)
    if refusal is not None and getattr(param, "_fsdp_flattened", False):  # FSDP1 marks what it flattens
        refusal = _fsdp_refusal(layer, name)
    if refusal is not None:
        raise UsageError(refusal)


def _fsdp_refusal(layer: LoRALayer, name: str, early: str | None = None) -> str:
    """Why ``layer`` refuses FSDP1 (``FullyShardedDataParallel``, applied after inject) setting
    its base layer's parameter ``name`` to a view of FSDP's flat parameter; ``early``: what a
    refusal before FSDP set it left (by default, as the assignment hook finds the base layer)."""
    where = layer._path or type(layer.base_layer).__name__
    if early is not None:
        state = early
    elif name in layer.base_layer._parameters:
        state = f"The assignment was refused and FSDP's wrapping or call stopped there: the layer keeps its {name}; "
        state += "call runtime.eject() before wrapping the model in FSDP"
    else:  # FSDP deletes a parameter before it sets its view
        state = "The assignment was refused and FSDP's wrapping or call stopped there: FSDP had already taken the "
        state += f"{name} off the base layer: build the model again, without FSDP"
    doing = "is putting" if early is None else "would put"
    return (
        f"{where}: FSDP (FullyShardedDataParallel, applied after inject) {doing} its base layer's {name} into its "
        "flat parameters, which it shards between calls, so the weight lorahot wrapped is not the one the layer "
        "computes with; lorahot serves models whose ranks each hold the whole weights, or tensor-parallel ones "
        f"(parallelize_module). {state}."
    )


#: What accelerate's ``add_hook_to_module`` sets on a module, ``_old_forward`` before its hook's
#: ``init_hook`` moves or offloads any of the module's tensors.
_ACCELERATE_HOOK = frozenset({"_old_forward", "_hf_hook"})


def _refuse_accelerate_hook(layer: LoRALayer) -> None:
    """Refuses an accelerate hook attached to a LoRA layer after inject (``dispatch_model``,
    ``cpu_offload``, ``disk_offload``, ``load_checkpoint_and_dispatch``, ``add_hook_to_module``),
    before the hook moves or offloads any of the layer's tensors. Its offloading keeps the
    weights it takes off under the model's ``state_dict()`` keys (the base model's: ``b.weight``)
    and puts them back by parameter path (``b.base_layer.weight``), so the forward would raise
    KeyError; a hook that moves the layer to another device would leave the runtime writing LoRA
    buffers the layer no longer reads."""
    raise UsageError(
        f"{layer._path or type(layer).__name__}: accelerate's hooks (dispatch_model, cpu_offload, disk_offload, "
        "load_checkpoint_and_dispatch) cannot be attached to a LoRA layer after inject: they move or offload its "
        "tensors under its parameter paths (base_layer.weight), where its state_dict() keeps the base model's keys "
        "(weight), and the runtime would write LoRA buffers the layer no longer reads. Dispatch or offload the model "
        "before inject, with the targeted layers on an execution device (offloaded layers hold no weights to target), "
        "or call runtime.eject() first. Modules accelerate hooked before this layer keep their hooks: "
        "accelerate.hooks.remove_hook_from_module(model, recurse=True) takes them off."
    )


def _refuse_fsdp1(layer: LoRALayer) -> None:
    """Refuses FSDP1 (``FullyShardedDataParallel``) wrapping a model after inject, at FSDP's
    first pass over the modules, which marks each for dynamo before FSDP changes any parameter
    or module. Refused later, FSDP had changed the model already: where it sets a merged or
    wide layer's weight to a view of its flat parameter (the hook, :func:`_copy_refusal`), it
    had moved every weight into its flat parameter and taken this one off its module; with
    ``use_orig_params=True`` on more than one rank the first forward was refused so (the view
    shaped as the rank's flat shard); where an auto-wrap policy wraps the base layer, the
    modules wrapped before it stayed replaced by FSDP wrappers; and every runtime call refuses
    a layer FSDP shards anyway. The marks FSDP's pass put on the modules up to this one are
    taken off again. FSDP2 (``fully_shard``) marks the modules after it sharded their
    parameters (DTensors by then): left to the runtime's next call, which refuses it."""
    base = layer.base_layer
    if any(is_dtensor(base._parameters.get(name)) for name in _BASE_PARAMETERS):
        return
    name = next((n for n in _BASE_PARAMETERS if n in base._parameters and _copy_refusal(layer, n)), "weight")
    _unmark_fsdp_pass(layer)
    raise UsageError(
        _fsdp_refusal(
            layer,
            name,
            "FSDP's wrapping was refused before it changed any parameter or module: call runtime.eject() before "
            "wrapping the model in FSDP",
        )
    )


def _unmark_fsdp_pass(layer: nn.Module) -> None:
    """Takes FSDP1's dynamo marks (``_is_fsdp_managed_module``, ``_fsdp_use_orig_params``) off
    the modules its pass (``_annotate_modules_for_dynamo``, on the call stack) marked up to
    ``layer``, leaving alone those inside a module FSDP wrapped before (marked by its own pass)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "_annotate_modules_for_dynamo":
        frame = frame.f_back  # type: ignore[assignment]
    root = frame.f_locals.get("module") if frame is not None else None
    if not isinstance(root, nn.Module):
        return
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    wrapped = {id(m) for w in root.modules() if fsdp is not None and isinstance(w, fsdp) for m in w.modules()}
    for module in root.modules():
        if id(module) not in wrapped:
            module.__dict__.pop("_is_fsdp_managed_module", None)
            module.__dict__.pop("_fsdp_use_orig_params", None)
        if module is layer:
            return


def _put_back(layer: LoRALayer, name: str, param: Any) -> bool:
    """Whether ``param`` is put back as a merged layer's base ``weight`` or ``bias`` that the base
    layer no longer stores: a parametrization, ``weight_norm``, ``spectral_norm`` or pruning
    applied after inject took it out (merged mode requires it stored at inject), and its removal
    (``remove_parametrizations``, ``remove_weight_norm``, ``prune.remove``) registers it again.
    Refused, the removal would stop halfway and leave the base layer without one; taken, it is
    the way out eject's refusal of such a layer names (:func:`lorahot.runtime.merge.check_ejectable`).
    FSDP1 taking the parameter off before it sets its flat view is not a removal."""
    base = layer.base_layer
    return (
        layer.pristine_weight is not None
        and name in _BASE_PARAMETERS
        and name not in base._parameters
        and name not in base._buffers
        and not getattr(param, "_fsdp_flattened", False)
    )


def _computed_from(layer: LoRALayer, name: str, new: Any) -> bool:
    """Whether ``new`` holds the very memory ``layer`` computes its base parameter ``name`` from, so
    putting it in place changes nothing: the parameter it has (``tie_weights`` assigning it
    again), a tensor over the same storage (a state-dict entry), or a widened layer's own block
    of the wide buffer (the parameter that ``functional_call`` puts back)."""
    now = layer.base_layer._parameters.get(name)
    if new is now:
        return True
    if name == "weight" and layer.is_wide_block(new):
        return True
    return isinstance(now, torch.Tensor) and isinstance(new, torch.Tensor) and _same_memory(new, now)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same elements: same device, address, dtype, shape and strides."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _put_plain_tensor(layer: LoRALayer, name: str, value: torch.Tensor) -> None:
    """A plain tensor (not a parameter) for the base layer's parameter ``name``, through the
    wrapper: what ``torch.func.functional_call`` and ``nn.utils.stateless`` put in place of a
    parameter for one call. They write it into a module's own ``_parameters``; the wrapper
    holds none, so it goes into the base layer's, as it would have without inject, after the
    checks an assigned parameter gets. A weight of another shape is refused. A merged layer
    refuses any tensor that is not the memory it merged into (a state-dict entry is). A widened
    layer takes another tensor eagerly (the forward notices it is not the wide block and calls
    the base layer, :meth:`LoRALayer.wide_bound`) and refuses it while compiling, where the
    graph would read its block instead."""
    base = layer.base_layer
    refusal = _placement_refusal(layer, name, value) or _shape_refusal(layer, name, value)
    moved = refusal is None and not _computed_from(layer, name, value)
    if moved and (layer.merged or torch.compiler.is_compiling()):
        refusal = _copy_refusal(layer, name)
    if moved and refusal is None and layer._plan[3] and layer.holds_dora():
        refusal = _dora_values_refusal(layer, name)
    if refusal is not None:
        raise UsageError(refusal)
    base._parameters[name] = value  # type: ignore[assignment]  # as torch's stateless call puts it


def _dora_values_refusal(layer: LoRALayer, name: str) -> str:
    """Why ``layer``, holding a DoRA adapter (in the live region or a slot), cannot compute with
    other values for its base layer's ``name`` for one call: its factors ``f = m / ||W0 + s B A||``
    and ``g = (1 - f) * b0`` were computed from the weight and bias it has (at the load, the
    ``set_scale``, the ``load_state_dict``), and PEFT's forward takes the norm from the weight of
    the call; with the old factors the output would be off, silently."""
    return (
        f"{layer._path or type(layer.base_layer).__name__}: torch.func.functional_call (or "
        f"nn.utils.stateless) put other values in place of its base layer's {name} for a call, and the layer holds a "
        "DoRA adapter, whose factors m / ||W0 + scale * B @ A|| (and the bias term) lorahot computes from the "
        "weight and bias it has when the adapter or its scale changes, not at each call as PEFT does: the call would "
        f"compute with the factors of the old {name}. The call was refused before it ran. Pass this layer's own "
        "parameters (a state dict's entries), load the values into the model (load_state_dict computes the factors "
        "again), or load a plain LoRA here."
    )


#: what a refusal did, for an attribute assignment and for ``load_state_dict(assign=True)``
_ASSIGNMENT_REFUSED = "The assignment was refused"
_LOAD_STOPPED = (
    "load_state_dict stopped at this layer (the modules before it were loaded, this one and those after it were not)"
)
_LOAD_REFUSED = "load_state_dict was refused before it loaded anything"


def _load_outcome(prefix: str) -> str:
    """What a layer's own hook refusing a load did: nothing loaded where the load was called on
    the layer (or its base layer) itself, else the modules before it loaded."""
    return _LOAD_STOPPED if prefix else _LOAD_REFUSED


def _refuse_assigned_load(
    layer: LoRALayer,
    state_dict: Mapping[str, Any],
    prefix: str,
    outcome: str = _LOAD_STOPPED,
    *,
    wrapper: str | None = None,
) -> None:
    """``load_state_dict(assign=True)`` of tensors the layer would refuse (see
    :func:`_refuse_replaced_weight`), refused from a load pre hook: raised while torch assigns
    a tensor, the refusal would be folded into torch's own ``RuntimeError``. ``prefix`` is the
    base layer's; with ``wrapper`` (the layer's own prefix) a key there counts too, as the
    layer's own hook would move it to the base layer."""
    for name in _BASE_PARAMETERS:
        new = state_dict.get(prefix + name)
        if new is None and wrapper is not None:
            new = state_dict.get(wrapper + name)
        if new is None:
            continue
        refusal = (
            _placement_refusal(layer, name, new, outcome)
            or _shape_refusal(layer, name, new, outcome)
            or _copy_refusal(layer, name, outcome)
        )
        if refusal is not None:
            raise UsageError(refusal)


def refuse_assigned_load_under(module: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> None:
    """Before a ``load_state_dict(state_dict, assign=True)`` that reaches ``module`` at
    ``prefix`` touches it: raises :class:`~lorahot.errors.UsageError` where a LoRA layer under
    ``module`` would refuse its tensors, so that a refused load loads nothing (the layers' own
    hooks refuse only when torch reaches them, after the modules before them were loaded)."""
    for path, layer in module.named_modules():
        if isinstance(layer, LoRALayer):
            own = f"{prefix}{path}." if path else prefix
            _refuse_assigned_load(layer, state_dict, own + "base_layer.", _LOAD_REFUSED, wrapper=own)


def _placement_refusal(layer: LoRALayer, name: str, new: Any, outcome: str = _ASSIGNMENT_REFUSED) -> str | None:
    """Why ``layer`` cannot take ``new`` as the parameter ``name`` of its base layer: a DTensor
    where the base layer had a plain tensor at inject, or the other way round
    (``parallelize_module`` on the base layer's path, ``full_tensor()`` put back). The layer's
    LoRA buffers have the shape of the weight it had then, whole or this rank's shard, and the
    base layer's output would now be the other: each rank would add the whole update to its
    shard of the output (a shape error, or a wrong sum where the shapes broadcast)."""
    now = layer.base_layer._parameters.get(name)
    if not isinstance(new, torch.Tensor) or not isinstance(now, torch.Tensor):
        return None
    if is_dtensor(new) == is_dtensor(now):
        return None
    where = layer._path or type(layer.base_layer).__name__
    change = (
        "become a DTensor (parallelize_module or distribute_module on the base layer's path?)"
        if is_dtensor(new)
        else "stop being a DTensor (a gathered full_tensor()?)"
    )
    made = "the whole, unsharded" if is_dtensor(new) else "this rank's shard of the"
    return (
        f"{where}: its base layer's {name} would {change} after inject. lorahot made this layer's LoRA buffers at "
        f"inject for {made} {name}, so it could no longer add its update to the base layer's output. {outcome}: the "
        f"layer keeps its {name} (a parallelize_module call may have parallelized the modules before this one). "
        "Parallelize the model before inject, on the modules' own paths: lorahot then shards the LoRA buffers like "
        "each base layer (call runtime.eject() and start again from the unsharded model)."
    )


def _shape_refusal(layer: LoRALayer, name: str, new: Any, outcome: str = _ASSIGNMENT_REFUSED) -> str | None:
    """Why ``layer`` cannot take ``new`` as the parameter ``name`` of its base layer: a shape
    other than the one its LoRA buffers were made for (recorded by :meth:`LoRALayer.attach`).
    Where the parameter it has was already resized in place (``resize_token_embeddings``
    resizes a tied weight before it ties it again), the runtime is marked as no longer able to
    serve the model (:attr:`~lorahot.layers.state.RuntimeState.broken`)."""
    shape = layer.__dict__.get("_base_shapes", {}).get(name)
    if shape is None:
        return None
    where = layer._path or type(layer.base_layer).__name__
    now = layer.base_layer._parameters.get(name)
    if isinstance(now, torch.Tensor) and tuple(now.shape) != shape:
        if layer.state is not None and layer.state.broken is None:
            layer.state.broken = (
                f"{where}: its base layer's {name} was resized in place after inject, from {shape} to "
                f"{tuple(now.shape)}. Call runtime.eject(), then inject into the model as it is now."
            )
        return (
            f"{where}: its base layer's {name} was resized in place after inject, from {shape} to "
            f"{tuple(now.shape)} (resize_token_embeddings on weights tied before inject?): the layer's LoRA buffers "
            "are shaped for the old one, so it can no longer compute, and the runtime refuses its calls. Call "
            "runtime.eject(), resize, then inject again (or resize before inject)."
        )
    if isinstance(new, torch.Tensor) and tuple(new.shape) != shape:
        return (
            f"{where}: its base layer's {name} would change shape after inject, from {shape} to "
            f"{tuple(new.shape)} (resize_token_embeddings?): the layer's LoRA buffers are shaped for the old one. "
            f"{outcome}: the layer keeps its {name}. Resize before inject, or call "
            "runtime.eject(), resize, then inject again."
        )
    return None


def _copy_refusal(layer: LoRALayer, name: str, outcome: str = _ASSIGNMENT_REFUSED) -> str | None:
    """Why ``layer`` cannot take a new parameter ``name`` for its base layer, whatever its
    values: it computes from its own copy of the weight (wide) or holds the adapter merged in."""
    wide = bool(getattr(layer, "wide", False))
    if not ((name == "weight" and wide) or (name in _BASE_PARAMETERS and layer.merged)):
        return None
    own_copy = wide and name == "weight"
    how = "from its own copy of the weight (a wide layer)" if own_copy else "with the adapter merged in"
    return (
        f"{layer._path or type(layer.base_layer).__name__}: its base layer's {name} was replaced after inject "
        f"(tie_weights, resize_token_embeddings, load_state_dict(assign=True)?). lorahot computes this layer {how}, "
        f"so the new tensor would not be used. {outcome}: the layer keeps its {name}. Replace or "
        "tie the weights before inject, or call runtime.eject(), replace them, then inject again."
    )


torch.nn.modules.module.register_module_parameter_registration_hook(_refuse_replaced_weight)


#: per move function (``nn.Module._apply``'s ``fn``, one object for a whole ``model.to()``): the
#: arena tensors it converted, ``id(root) -> (root, converted)``; dropped with the function
_MOVES: weakref.WeakKeyDictionary[Any, dict[int, tuple[torch.Tensor, torch.Tensor]]] = weakref.WeakKeyDictionary()


def _moved_arena(fn: Callable[[torch.Tensor], torch.Tensor], root: torch.Tensor) -> torch.Tensor:
    """``fn(root)``, computed once per move for all the layers that share ``root``."""
    try:
        moved = _MOVES.setdefault(fn, {})
    except TypeError:  # a move function that takes no weak reference: converted per layer
        return fn(root)
    entry = moved.get(id(root))
    if entry is None or entry[0] is not root:
        entry = moved[id(root)] = (root, fn(root))
    return entry[1]


def _same_values(new: torch.Tensor, now: torch.Tensor) -> bool:
    """Whether loading ``new`` into ``now`` (``copy_``: cast to its dtype and device) leaves its
    values as they are (a shape that differs is load_state_dict's own error)."""
    if tuple(new.shape) != tuple(now.shape):
        return True
    try:
        with torch.no_grad():
            return bool(torch.equal(new.detach().to(now.device, now.dtype), now.detach()))
    except (RuntimeError, TypeError, NotImplementedError):  # a meta or distributed tensor: not known equal
        return False


def _report_base_keys(module: nn.Module, incompatible: Any) -> None:
    """Load post hook: missing and unexpected keys are reported as the checkpoint names them
    (``<prefix>k``), not as :func:`_add_base_prefix` renamed them; ``strict`` checks the same."""
    prefix = module.__dict__.pop("_loading_prefix", None)
    loaded = module.__dict__.pop("_loading_base", False)
    if prefix is None:
        return
    inner = prefix + "base_layer."
    for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
        keys[:] = [prefix + k[len(inner) :] if k.startswith(inner) else k for k in keys]
    if loaded and isinstance(module, LoRALayer) and not module.base_layer.__dict__.pop("_lorahot_reported", False):
        _base_written(module)


class _BaseLoadHook:
    """A base module's ``load_state_dict`` pre hook (``post=False``: notes whether the load
    writes its weight or bias) or post hook (then tells the layer that wraps it,
    :func:`_base_written`), installed by :meth:`LoRALayer.attach`. It refers to the layer
    weakly; copied or pickled with the model it refers to none and does nothing (the copy's
    layer has no runtime, and its own load hook covers loads through it)."""

    def __init__(self, layer: LoRALayer | None, *, post: bool = False) -> None:
        self._ref = None if layer is None else weakref.ref(layer)
        self._post = post

    def __call__(self, module: nn.Module, *args: Any) -> None:
        layer = None if self._ref is None else self._ref()
        if layer is None or layer.base_layer is not module:  # unwrapped since
            return
        if not self._post:
            state_dict, prefix, metadata = args[0], args[1], args[2]
            if metadata.get("assign_to_params_buffers"):  # torch would catch the refusal per tensor
                _refuse_assigned_load(layer, state_dict, prefix, _load_outcome(prefix))
            module.__dict__["_lorahot_loading"] = prefix + "weight" in state_dict or prefix + "bias" in state_dict
            return
        if module.__dict__.pop("_lorahot_loading", False):
            module.__dict__["_lorahot_reported"] = True  # for the layer's own hook, if the load came through it
            _base_written(layer)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_BaseLoadHook, (None,), {"_post": self._post})

    def __deepcopy__(self, memo: dict[int, object]) -> _BaseLoadHook:
        return _BaseLoadHook(None, post=self._post)


def _base_written(layer: LoRALayer) -> None:
    """``layer``'s base weight or bias was just loaded: its runtime recomputes what it derived
    from them (DoRA factors); without a runtime (a copy of the model), a layer holding DoRA
    refuses, since it would compute with factors of the old weight."""
    state = layer.state
    if state is None or state.ejected is not None:
        return
    if state.base_loaded is not None:
        state.base_loaded(layer)
    elif not layer._plan[0] and layer.holds_dora():
        raise UsageError(
            f"{layer._path or type(layer).__name__}: a copy of an injected model (copy.deepcopy) had a base weight "
            "or bias loaded into a layer holding a DoRA adapter, whose factors depend on that weight; without its "
            "runtime the copy cannot compute them again, and would compute with the old ones. Load the checkpoint "
            "into the model the runtime was injected into (then copy it), or inject the copy and load the adapter "
            "there."
        )
