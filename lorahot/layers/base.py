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
checkpoint unchanged. The LoRA buffers are not persistent. Those hooks, and the checks of what
may replace the base module's weight after inject, are in :mod:`lorahot.layers.base_guards`;
what a layer tells its runtime when ``torch.export`` or ``torch.jit.trace`` records it is in
:mod:`lorahot.layers.recording`, and the probe forwards the layers check their base modules
with in :mod:`lorahot.layers.probes`.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lorahot.errors import UsageError
from lorahot.layers import routing
from lorahot.layers.base_guards import (
    _ACCELERATE_HOOK,
    _BASE_PARAMETERS,
    _WRAPPERS,
    ARENA_BUFFERS,
    ArenaBuffers,
    _add_base_prefix,
    _BaseLoadHook,
    _dora_values_refusal,
    _drop_base_prefix,
    _put_plain_tensor,
    _refuse_accelerate_hook,
    _refuse_fsdp1,
    _report_base_keys,
    is_dtensor,
    refuse_assigned_load_under,
    unwrapped,
)  # pickles of injected models name _BaseLoadHook and the three state-dict hooks here, where they lived
from lorahot.layers.probes import forward_mismatch, kept_parametrizations, mismatch, probe_forward
from lorahot.layers.recording import _compiled, _recorded
from lorahot.layers.refusal import refuse
from lorahot.layers.reparametrized import NoParameters, NoParametrizations, refuse_removal
from lorahot.layers.saved_extras import saved_extras
from lorahot.layers.state import RuntimeState
from lorahot.layers.state_marks import marked
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
_ARENA_BUFFERS = ARENA_BUFFERS
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


def arena_views(
    layer: LoRALayer, key: int, geometry: tuple[Any, ...] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, scale, extras)`` of ``layer`` as a compiled graph reads them: views of its arena's
    global tensors (``TENSORS[key]``) at the layer's ``geometry``, constants of the graph; the
    layer's own views where it is regional (``geometry`` None), inputs of the graph."""
    if geometry is None:
        assert layer._live is not None
        return layer._live
    a, b, s, e = TENSORS[key]
    ga, gb, gs, ge = geometry
    return a.as_strided(*ga), b.as_strided(*gb), s.as_strided(*gs), e.as_strided(*ge)


def _no_compiled_path(*_: Any) -> None:
    return None


#: The compiled one-call paths of the layers that have them, ``(wide, routed)``: a wide layer's
#: (``compiled_wide(layer, x, fused, key, geometry, shift_at)``) and a fused layer's per-row
#: routed one (``compiled_routed(layer, x, route, fused, wide, key, slot_geometry)``), each
#: returning None where the general forward decides. Only :mod:`lorahot.layers.linear`'s layers
#: are wide or fused; it registers its functions (:func:`register_compiled_paths`). Module
#: functions, not methods: a method looked up on the layer is re-checked by a compiled call's
#: guards for every layer (that the instance does not shadow it), a global function once per graph.
_COMPILED_PATHS: list[Callable[..., torch.Tensor | None]] = [_no_compiled_path, _no_compiled_path]


def register_compiled_paths(
    wide: Callable[..., torch.Tensor | None], routed: Callable[..., torch.Tensor | None]
) -> None:
    """Sets the forward's compiled one-call paths (:data:`_COMPILED_PATHS`)."""
    _COMPILED_PATHS[:] = [wide, routed]


#: The attributes :attr:`LoRALayer._plan` gathers for the forward.
_PLANNED = frozenset(
    {
        "merged",
        "fused",
        "wide",
        "extras",
        "regional",
        "_key",
        "_geometry",
        "_slot_geometry",
        "_wide_at",
        "_input_name",
        "_shift_at",
    }
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
    #: from the one lorahot last wrote (compared in full when it loads:
    #: :func:`~lorahot.layers.base_guards._add_base_prefix`).
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
    #: view geometry, slot views' geometry, wide group, unrouted, input name, shifted A,
    #: max_norm)``, kept equal to those attributes by
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
    #: ``shifted A``: :attr:`_shift_at`, True for a :attr:`regional` layer that has one.
    #: ``max_norm``: :attr:`checks_max_norm`.
    _plan: tuple[Any, ...] = (False, False, False, True, -1, (), (), None, False, None, None, False)
    #: Whether the base's forward may renormalize what it reads in place, by a ``max_norm`` set
    #: after inject (an ``nn.Embedding``'s): the forward then reads it, which the base's own
    #: forward reads too (no guard of its own), and refuses a call before anything runs
    #: (:meth:`refuse_call`). A class constant: a layer of another kind reads nothing.
    checks_max_norm: ClassVar[bool] = False
    #: For a wide layer whose buffer is one of a group's, back to back in one allocation
    #: (:mod:`lorahot.kernels.wide_groups`): ``(handle key, (size, stride, offset), outs)``, the
    #: geometry of its buffer in the allocation, as the compiled graph reads it, and every
    #: member's output width (the fused kernel is taken where it pays for all of them); else
    #: None. Set by :meth:`widen`.
    _wide_at: tuple[int, tuple[Any, ...], tuple[int, ...]] | None = None
    #: For a wide layer whose shifted A rows (float16, :data:`lorahot.kernels.wide_linear.SHIFTED_DTYPES`)
    #: the runtime keeps in a contiguous copy laid out as the arena's live A
    #: (:mod:`lorahot.runtime.wide`): ``(handle key, (size, stride, offset))``, the rows as the
    #: compiled shrink reads them, so that the stacked-shrink and extern-input passes match it
    #: as they match an arena's A; else None. Set by :meth:`shift_rows`.
    _shift_at: tuple[int, tuple[Any, ...]] | None = None
    #: For a layer some slot of which holds a DoRA adapter (unmerged), its base weight's and
    #: bias's version counters and addresses when its factors were last computed
    #: (:meth:`dora_versions`), which an eager forward compares first (:meth:`_check_dora_base`);
    #: else None, and the forward pays one attribute test. Set by the runtime
    #: (:class:`lorahot.runtime.dora.DoraFactors`).
    _dora_seen: tuple[Any, ...] | None = None

    def __init__(self, base_layer: nn.Module, spec: LayerSpec) -> None:
        complex_ = next((t for t in (*base_layer.parameters(), *base_layer.buffers()) if t.is_complex()), None)
        if complex_ is not None:  # inject(dtype=...) would give it real buffers, and cast its input to them
            raise UsageError(
                f"{type(base_layer).__name__} has {complex_.dtype} weights; LoRA buffers are real, and the update of a "
                "complex input would drop its imaginary part. Exclude this module from targets."
            )
        super().__init__()
        # holds none; torch's weight_norm and spectral_norm reaching for the weight in it are
        # refused there (lorahot.layers.reparametrized)
        own = NoParameters()
        own.layer = type(self).__name__
        object.__setattr__(self, "_parameters", own)
        # another tensor swapped in for a LoRA buffer once bound (functional_call) is refused there
        object.__setattr__(self, "_buffers", ArenaBuffers())
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

    @property
    def parametrizations(self) -> nn.ModuleDict:
        """None: the layer holds no tensor to parametrize, and its base module answers for its
        own (``model.fc.base_layer.parametrizations``). ``register_parametrization`` and
        ``remove_parametrizations`` applied to the layer are refused (:mod:`lorahot.layers.reparametrized`);
        before, the base module's were forwarded, and torch's removal through the layer rewrote
        the base's original then failed."""
        return NoParametrizations(self._path or type(self).__name__)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """Refuses a parameter of the wrapper's own, which holds none: ``torch.nn.utils.prune``
        applied to the wrapper (``prune.l1_unstructured(model.fc, "weight", 0.5)``) registered
        the base weight on it as ``weight_orig``, then failed with a ``KeyError`` on the weight it
        does not hold, leaving that key in the model's state dict (a base checkpoint then no
        longer loads strictly); a parameter assigned to it would be saved under the LoRA layer.

        Raises:
            UsageError: naming the layer, the parameter and the fix, nothing registered.
        """
        if param is not None and self.__dict__.get("_base") is not None:
            raise UsageError(
                f"{self._path or type(self).__name__}: a parameter {name!r} registered on the LoRA layer itself, which "
                "holds none (torch.nn.utils.prune, weight_norm or spectral_norm applied to the wrapper?); nothing was "
                f"registered. Apply it to the module that holds the weight, {self._path or 'the layer'}.base_layer "
                "(merged mode refuses such a base at its next call), or before inject."
            )
        super().register_parameter(name, param)

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
            # could not follow (:func:`lorahot.layers.base_guards._refuse_replaced_weight`)
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
            shift_at = seen.get("_shift_at")
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
                True if self.regional and shift_at is not None else shift_at,
                self.checks_max_norm,
            )
            if self.merged:  # the forward reads nothing else: the smallest constant to compare
                plan = (True, False, False, False, -1, (), (), None, False, None, None, self.checks_max_norm)
            object.__setattr__(self, "_plan", plan)

    def __delattr__(self, name: str) -> None:
        """Refuses deleting ``base_layer`` after inject (the layer computes with it; without it the
        model's state dict lost the layer's keys and eject could not put it back), and ``weight``
        or ``bias`` through the layer (they are its base module's).

        Raises:
            UsageError: naming the layer and the fix, nothing deleted.
        """
        base = self.__dict__.get("_base")
        where = self._path or type(self).__name__
        if name == "base_layer" and base is not None:
            raise UsageError(
                f"{where}: its base_layer cannot be deleted after inject: the layer computes with the module it "
                "wrapped, which eject puts back in the model. Call runtime.eject(), then change the model."
            )
        if name in _BASE_PARAMETERS and base is not None and name not in self._parameters:
            raise UsageError(
                f"{where}: del {name} on the LoRA layer, which holds none (reading its {name} gives its base "
                f"module's); nothing was deleted. Delete it from {where}.base_layer, or call runtime.eject() first."
            )
        super().__delattr__(name)

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
        if isinstance(self._parameters, NoParameters):
            self._parameters.layer = path or type(self).__name__
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
        object.__setattr__(self, "_arena_seen", roots)  # what the buffers hold: ArenaBuffers
        self._arm_buffers()
        self.fused = fused and self.fusable(lora_A)
        self.state = state
        self.regional = regional
        if regional:  # graph inputs of fixed shapes, at fixed addresses, whose values loads rewrite in place
            for view in (*self._live, *routing_views):
                # static shapes: under dynamic=True a view's size that equals the batch (or another
                # view's offset) would otherwise become a guard, which the next block or batch breaks
                mark_static(view)

    def __getstate__(self) -> dict[str, Any]:
        """The layer's state as ``nn.Module`` pickles it, with its merged-mode probe
        (:attr:`written_probe`) in tensors of its own: its pieces are views of one int64 buffer
        that every layer on the device shares, in the weight's dtype and as int32 sums
        (:mod:`lorahot.runtime.written_probes`), and ``torch.save`` refuses views of one memory
        in two dtypes, so ``torch.save(model)`` of a merged model raised. The copy compares as
        the original does (a copy has no runtime; its probe serves ``lorahot.eject``)."""
        state: dict[str, Any] = super().__getstate__()
        probe = state.get("written_probe")
        if probe is not None:
            positions, written, numel, bias, version, digest = probe
            own = None if digest is None else (digest[0].clone(), digest[1].clone())
            state["written_probe"] = (
                positions,
                written.clone(),
                numel,
                None if bias is None else bias.clone(),
                version,
                own,
            )
        return state

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
        shifts, shift_at = self.__dict__.get("_shift_handle"), self.__dict__.get("_shift_at")
        if shifts is not None and shift_at is not None and shift_at[0] != shifts.key:  # the copy's own rows
            self._shift_at = (shifts.key, shift_at[1])
        base = self._modules.get("base_layer")
        if base is not None and "_base_load_hooks" in self.__dict__:  # a copy of an attached layer
            _WRAPPERS[base] = weakref.ref(self)  # its weights are checked as the original's
        self._arm_buffers()

    def _arm_buffers(self) -> None:
        """From now on (a bound layer, or its copy) another tensor swapped in for a LoRA buffer is
        refused (:class:`~lorahot.layers.base_guards.ArenaBuffers`)."""
        if isinstance(self._buffers, ArenaBuffers) and self.__dict__.get("_arena_seen") is not None:
            self._buffers.__dict__["layer"] = weakref.ref(self)

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
        base = self.base_layer
        for hooks in (base._load_state_dict_pre_hooks, base._load_state_dict_post_hooks):
            for key, hook in list(hooks.items()):  # one an interrupted attach registered but did not note
                found = getattr(hook, "hook", hook)  # torch wraps a pre hook
                if isinstance(found, _BaseLoadHook) and found.refers_to(self):
                    del hooks[key]
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
        try:  # before they are taken out: an interrupt at the return of the update puts them back
            self._buffers.update(dict.fromkeys(arenas))  # None: nn.Module._apply skips them
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(arenas)
        now = {n: _moved_arena(fn, root) for n, root in arenas.items()}  # type: ignore[arg-type]
        self._buffers.update(now)
        if len(now) == len(_ARENA_BUFFERS):  # a bound layer: its forward accepts the moved buffers
            object.__setattr__(self, "_arena_seen", tuple(now[n] for n in _ARENA_BUFFERS))
        self._leave_moved_allocation()
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

    def _leave_moved_allocation(self) -> None:
        """After a move: where it converted the layer's wide buffer apart from its group's
        allocation (another dtype or device: ``model.double()``), the layer leaves the group
        (:attr:`_wide_at` None, so its plan changes and a compiled graph retraces), and the
        compiled forward reads the layer's own buffer. A compiled call then re-checks only the
        plan, not the buffer, on every call (:func:`lorahot.layers.linear.wide_input`)."""
        at = self.__dict__.get("_wide_at")
        if at is None:
            return
        wide, alloc = self._buffers.get(WIDE_BUFFER), TENSORS[at[0]][0]
        if wide is None or wide.dtype != alloc.dtype or wide.device != alloc.device:
            self._wide_at = None

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

    def _views(self, forward: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, B, scale, extras)``: the live views eagerly; rebuilt from the global arena
        tensors under ``torch.compile`` (free in the graph). The forward takes all at once
        (``forward``: eagerly, a layer holding a DoRA adapter first checks its base, and computes
        with its own copy of the extras where autograd records it: :meth:`_dora_views`)."""
        if not torch.compiler.is_compiling():
            live = self._live
            if live is None:
                raise UsageError(
                    f"this {type(self).__name__} has no buffers: layers are made and bound by lorahot.inject, not "
                    "constructed by hand."
                )
            if torch._C._get_tracing_state() is not None:  # torch.jit.trace records this call
                return self._traced_views()
            if forward and self._dora_seen is not None:  # off for every layer without a DoRA adapter
                return self._dora_views(live)
            return live
        _compiled(self)  # an export's record, inductor's freezing: constants when compiling, no guard
        key, geometry = self._plan[4:6]
        return arena_views(self, key, geometry)

    def dora_versions(self) -> tuple[tuple[int | None, int], tuple[int | None, int] | None]:
        """The base weight's and bias's version counters (None for an inference tensor) and
        addresses, as :attr:`_dora_seen` keeps them: a write in place moves the counter,
        ``weight.data = new`` (pruning's ``prune.remove``) the address. Reads the stored tensors,
        never a parametrization (see :meth:`_check_dora_base`)."""
        weight = self.base_weight
        to_local = getattr(weight, "to_local", None)  # a tensor-parallel layer's: this rank's shard
        if callable(to_local):
            weight = to_local()
        bias = self.base_bias
        return stamp(weight), None if bias is None else stamp(bias)

    def _dora_views(
        self, live: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live views for an eager forward of a layer holding a DoRA adapter, after
        :meth:`_check_dora_base`; where autograd records the forward, the extras are a copy, so
        that what the backward reads of them (the factor ``f``) is the one this forward computed
        with, whatever a later forward's check computes into the arena (it writes without
        moving the arena's version counter, which other layers' saved extras share)."""
        self._check_dora_base()
        if not torch.is_grad_enabled():
            return live
        a, b, s, e = live
        return a, b, s, e.clone()

    def _check_dora_base(self) -> None:
        """Before an eager forward of a layer holding a DoRA adapter: where its base weight or bias
        was written in place (its version counter moved: an optimizer's step, ``weight.mul_``,
        ``model.apply``) or given new memory since its factors were computed, has the runtime
        compute them again (:attr:`RuntimeState.base_moved`), as PEFT's forward computes its norm
        from the weight it reads. Not while a CUDA graph is being captured (its replays would not
        run it), nor under a ``torch.func`` transform (``grad``, ``vmap``: the weights it passes
        are its own wrappers, holding no memory, and the factors are no function of theirs). A base
        that computes its weight at each call (a parametrization, which reading the weight would
        run) is left to the runtime, whose next call refuses it. A plain tensor in other memory
        in place of the base's parameter is one call's value (``torch.func.functional_call`` over
        the ``base_layer`` keys): refused as the wrapper refuses it (:meth:`_refuse_call_values`),
        where computing its factors would leave them in the arena for a compiled forward."""
        if torch._C._functorch.peek_interpreter_stack() is not None:
            self._refuse_transformed_base()
            return
        if "parametrizations" not in self._base._modules and self.dora_versions() == self._dora_seen:
            return
        if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
            return
        self._refuse_call_values()
        state = self.state
        moved = None if state is None else state.base_moved
        if moved is None:  # a copy of the model (no runtime): nothing can compute its factors
            object.__setattr__(self, "_dora_seen", None)
            return
        moved(self)

    def _refuse_call_values(self) -> None:
        """Refuses a base weight or bias that is a plain tensor (not a parameter) in other memory
        than the one the factors were computed from: what ``torch.func.functional_call`` (and
        ``nn.utils.stateless``) put in the base layer's ``_parameters`` for one call when the keys
        name it (``q.base_layer.weight``), past the wrapper's own check. Computing the factors
        of that call's values gave PEFT's output but left them in the arena after the call, where
        a compiled forward read them (1.19 off its output before the call), silently. A write in
        place, ``weight.data = new`` or a new parameter keeps a parameter there, and is followed.

        Raises:
            UsageError: naming the layer and the parameter, before anything is computed.
        """
        seen = self._dora_seen
        if seen is None:
            return
        for name, stamped in (("weight", seen[0]), ("bias", seen[1])):
            value = self._base._parameters.get(name)
            plain = isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
            if plain and (stamped is None or value.data_ptr() != stamped[1]):
                raise UsageError(_dora_values_refusal(self, name))

    def _refuse_transformed_base(self) -> None:
        """Under a ``torch.func`` transform, where the factors cannot be computed again: refuses a
        base weight or bias that is not the memory they were computed from, as the transform's
        wrappers hold it (``vmap`` over stacked parameters through ``functional_call``, whose
        batch of weights would each need factors of its own: 1.32 off PEFT's output, silently).
        The model's own parameters, wrapped by ``grad`` or ``jvp`` or passed unbatched, pass.

        Raises:
            UsageError: naming the layer and the parameter, before this layer computes.
        """
        seen = self._dora_seen
        if seen is None:
            return
        for name, tensor, stamped in (("weight", self.base_weight, seen[0]), ("bias", self.base_bias, seen[1])):
            inner = unwrapped(tensor)
            if inner is tensor or not isinstance(tensor, torch.Tensor):
                continue
            if inner.shape != tensor.shape or stamp(inner) != stamped:
                raise UsageError(_dora_values_refusal(self, name))

    def _traced_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live views as ``torch.jit.trace`` must see them: rebuilt from the arena tensors
        the layer registers as buffers, which the trace reads as the module's own. The views
        themselves it would record as constants, pooled by value (an empty slot's zero A and B
        became one tensor, and equal scales of two layers one), so a later load reached the
        traced graph only in part; from the buffers, it follows every write in place (loads,
        ``unload``, ``set_scale``, ``activate(k)``). See :func:`lorahot.layers.recording._recorded`."""
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
        merged, fused, wide, extras, key, geometry, slot_geometry, _, unrouted, name, shift_at, checked = self._plan
        if checked and self._base.max_norm is not None:  # before the base renormalizes anything in place
            self.refuse_call()
        if merged:
            if len(args) + len(kwargs) > 1:  # static for a compiled graph: checked once, when traced
                self.refuse_merged_arguments(args, kwargs)
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
            _compiled(self)  # an export's record, inductor's freezing (as in _views)
            # the common compiled cases in one call each, module functions rather than methods
            # (see _COMPILED_PATHS); only a linear layer is wide or fused
            if route is not None:  # one slot per row (a graph of its own: the compiler guards on None)
                z = _COMPILED_PATHS[1](self, x, route, fused, wide, key, slot_geometry) if fused else None
            elif wide:
                z = _COMPILED_PATHS[0](self, x, fused, key, geometry, shift_at)
            else:
                z = None
            if z is not None:
                return z
        a, b, scale, e = self._views(forward=True)
        if x.device != a.device:  # a constant of a compiled graph: no guard, no cost there
            raise UsageError(
                f"this {type(self).__name__}'s input is on {x.device} and its LoRA buffers on {a.device}: the model "
                "was moved to another device after inject, or its input does not reach the layer's device. Move the "
                "model first, then inject (or eject, move, and inject again)."
            )
        if route is not None:  # one slot per row (a graph of its own: the compiler guards on None)
            return marked(self._routed_forward(x, route, *args, **kwargs), key, self)
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
            return marked(added(y, self.lora_delta(x, a, b, scale)), key, self)
        z = y + (self.lora_delta(x, a, b, scale) + e[EXTRA_BIAS] * scale[0])
        e = saved_extras(e, z)  # compiled with autograd: the backward's own copy
        out = self._bias_gradient(torch.addcmul(e[EXTRA_G], e[EXTRA_F], z), e[EXTRA_F], e[EXTRA_G].shape)
        return marked(out.to(y.dtype), key, self)

    def refuse_merged_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raises for a merged-mode call that passes the base module more than its input.

        Merged mode folds the LoRA into the weight, which inject checked is right where the
        base's forward computes its weight's linear map (or convolution, or lookup) on a probe
        input passed alone: torch's own forwards take nothing else, and a class's own forward
        with more parameters was checked at their defaults only. With other values (a
        ``scale`` its output is multiplied by, say) the folded LoRA would go through whatever
        they change, where PEFT's unmerged forward and lorahot's add it to the output.

        Raises:
            UsageError: always, naming the layer, the arguments and the fix.
        """
        kind = type(self._base).__name__
        given = ", ".join([f"{len(args)} positional argument{'s' * (len(args) != 1)}", *(f"{k}=" for k in kwargs)])
        raise UsageError(
            f"{self._describe()}: called in merged mode with {given}, more than its input. Merged mode folds the LoRA "
            f"into the weight, checked at inject to give the unmerged result where {kind}.forward is called with its "
            "input alone; with other arguments its forward may transform the folded LoRA along with the base "
            "output. Call it with its input alone, or inject without merged=True (the LoRA is then added to what "
            "it returns, as PEFT's unmerged forward adds it)."
        )

    def refuse_call(self) -> None:
        """Raises, before a call computes or writes anything, for a layer whose base has a
        ``max_norm`` set after inject (:attr:`checks_max_norm`); the forward calls it only then."""
        raise AssertionError(f"{type(self).__name__} has no max_norm to refuse")  # pragma: no cover

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
            return marked(z, self._plan[4], self)
        biased = z + e[EXTRA_BIAS] * scale[0]
        e = saved_extras(e, biased)  # compiled with autograd: the backward's own copy
        out = torch.addcmul(e[EXTRA_G], e[EXTRA_F], biased)
        return marked(self._bias_gradient(out, e[EXTRA_F], e[EXTRA_G].shape).to(z.dtype), self._plan[4], self)

    def _bias_gradient(self, out: torch.Tensor, f: torch.Tensor, channels: torch.Size) -> torch.Tensor:
        """``out`` (``f * (base(x) + ...) + g``, ``g = (1 - f) * b0`` a constant of the DoRA load)
        plus ``(1 - f) * (b - b.detach())``, zero in value, where a derivative may flow from the
        base bias ``b`` (:func:`_differentiated`: autograd records it, or a forward-mode tangent
        or a ``torch.func`` transform rides on it): its derivative is then ``f + (1 - f) = 1``
        per channel, as in PEFT's forward, which adds the bias outside the factor, instead of
        ``f``. ``f`` broadcasts against ``out``, and ``channels`` is the shape one value per
        output channel takes to broadcast alike (``[out]``, a conv's ``[out, *ones]``). Nothing is
        added where no derivative flows or for a layer without a bias: the outputs of inference
        are untouched."""
        bias = getattr(self._base, "bias", None)
        if not (isinstance(bias, torch.Tensor) and _differentiated(bias)):
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
        e = saved_extras(e, z)  # compiled with autograd: the backward's own copy
        on, index, s0 = routing.row_scales(s[:, :1], route)  # s0 [L, 1]: zero for no slot
        rows = e[index]  # [L, 4, out, *ones]
        flag = on.view(length, *(1,) * (rows.dim() - 2))  # [L, 1, *ones]
        f = torch.where(flag, rows[:, EXTRA_F], torch.ones_like(rows[:, EXTRA_F]))
        g = rows[:, EXTRA_G] * flag.to(rows.dtype)
        bias = rows[:, EXTRA_BIAS] * s0.view(flag.shape)
        shape = self.row_shape(length)
        f = f.reshape(shape)
        out = torch.addcmul(g.reshape(shape), f, self.row_view(z, length) + bias.reshape(shape))
        out = self._bias_gradient(out, f, rows.shape[2:]).reshape(z.shape).to(z.dtype)
        # eagerly, no view of the row-shaped result (as routed_sum's output): a block compiled on its
        # own (regional=True) that takes it as input would guard on its base, and compile once more
        return out.clone() if out._base is not None and not torch.compiler.is_compiling() else out

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
        z = added(y, self.routed_delta(x, *library_operands(a, b), scales, index))
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

    def shift_rows(self, view: torch.Tensor, handle: TensorHandle, geometry: tuple[Any, ...]) -> None:
        """Where a widened layer's compiled shrink reads its shifted A rows (float16, see the
        subclass and :mod:`lorahot.runtime.wide`); only for layers :meth:`widen` applies to."""
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
        refuse_removal(self, self._path or type(self).__name__)  # torch's remove_weight_norm(layer) names it
        s = self.spec
        return f"kind={s.kind}, in_dim={s.in_dim}, out_dim={s.out_dim}, groups={s.groups}"


#: the dtypes the layers compute their LoRA in, and merged mode rewrites weights in
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def version(t: torch.Tensor) -> int | None:
    """``t``'s version counter, or None where it has none (an inference tensor)."""
    return None if t.is_inference() else int(t._version)


def stamp(t: torch.Tensor) -> tuple[int | None, int]:
    """``t``'s version counter and address: a write in place moves the first, ``weight.data =
    new`` (pruning's ``prune.remove``) the second."""
    return version(t), t.data_ptr()


def added(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``y + delta`` in ``y``'s dtype, rounded once: an update wider than the output (float32,
    from float16 buffers or ``inject(..., dtype=torch.float32)`` on a half-precision model) is
    added in its own dtype and the sum rounded, as PEFT adds its float32 update and as the
    compiler's fused add computes; rounding the update first, then the sum, put the output up to
    one ulp off the float64 reference instead of half of one (a float16 Linear 256 -> 256, rank 8:
    max 0.0072 against 0.0039)."""
    if delta.dtype == y.dtype:
        return y + delta
    return (y + delta).to(y.dtype)


def library_operands(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The live ``a`` and ``b`` as the library formula computes the update with them: float16
    buffers as float32 copies, on every device, so that the rank-wide intermediate ``x @ A.T``,
    its scaled copy ``s * (x @ A.T)`` and the update stay in float32, as with PEFT's float32
    adapter weights, the update rounded to the output's dtype where it is added. Kept in float16
    (largest value 65504) either overflows to inf where the output itself is well in range
    (``x @ A.T`` of 1e5 with a small B, or ``s = alpha / r = 32`` on ``x @ A.T`` of 3e3). On CUDA
    that costs a float16 layer's update its tensor cores (float32 GEMMs over the rank, and a
    float32 copy of ``x``); the fused kernels keep the intermediate in float32 with tensor-core
    dots (:mod:`lorahot.kernels.triton_lora_linear`), and the wide layers shift each rank row
    of their float16 copy by a power of two (:data:`lorahot.kernels.wide_linear.SHIFTED_DTYPES`).
    Other dtypes keep their buffers as they are: bfloat16 has float32's range."""
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


def _differentiated(t: torch.Tensor) -> bool:
    """Whether a derivative may flow from ``t``: autograd records it (grad mode on and ``t``
    requiring one), it carries a forward-mode tangent (``torch.autograd.forward_ad``, whatever
    the grad mode), or a ``torch.func`` transform wraps it (``jvp``, ``grad``, ``vmap``: its own
    wrappers, which :attr:`requires_grad` does not tell apart). A compiled graph is traced with
    the first test alone."""
    if t.requires_grad and torch.is_grad_enabled():
        return True
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return True
    return forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None


def under_transform() -> bool:
    """Whether, eagerly, a forward-mode dual level (``torch.autograd.forward_ad``) or a
    ``torch.func`` transform (``jvp``, ``vmap``, ``grad``, ...) is active: a derivative may then
    flow through a call whose tensors require no gradient, so the kernels, which have no
    derivative of their own (a ``jvp`` through one gave a zero tangent), must not take it. Two
    reads of global state, no per-tensor test."""
    return forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None
