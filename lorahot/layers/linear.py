"""``LoRALinear``: LoRA on anything that maps ``(..., in)`` to ``(..., out)``.

Above the fused kernel's sizes, an ``nn.Linear`` layer runs *wide*: at inject its weight moves
into an ``[out + R, in + R]`` buffer ``[[W, B_s], [A, 0]]`` holding beside it the live B, each
column times its rank row's scale, and beneath it the live A (the weight parameter stays, as a
view of the ``W`` block, so state dicts, merged writes and user code see the same tensor; its
rows are ``in + R`` apart). Compiled, the shrink ``h = x @ A.T`` feeds one GEMM over ``[x | h]``
that adds the expand in the base product's own accumulator; eagerly, one GEMM gives the base
output and the shrink, and the expand accumulates in place (see
:mod:`lorahot.kernels.wide_linear`). Either way one extra GEMM per layer and no scale
multiply, the per-row scales folded into B (see :mod:`lorahot.runtime.wide`, which keeps both
blocks equal to the live adapter after every load, activation and scale change).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorahot.errors import UsageError
from lorahot.kernels import compile_mode, extern_inputs, routed_linear, wide_groups
from lorahot.kernels import lora_linear as fused_kernel
from lorahot.kernels import routed_lora as routed_kernel
from lorahot.kernels import wide_linear as wide_kernel
from lorahot.layers import routing
from lorahot.layers.base import (
    WIDE_BUFFER,
    LayerSpec,
    LoRALayer,
    arena_views,
    dora_needs,
    overrides_forward,
    own_code,
    register_compiled_paths,
    under_transform,
    unusual_values,
)
from lorahot.layers.probes import forward_mismatch, probe_forward
from lorahot.layers.refusal import literal, refuse
from lorahot.layers.tensor_handles import SEGMENTS, TENSORS, TOKENS, WORKSPACES, TensorHandle

__all__ = ["LoRALinear", "linear_features", "is_conv1d", "computes_as_stored", "returns_other_than_rows"]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers-style ``Conv1D`` (a linear with weight ``[in, out]``).

    Matched by class name: lorahot never imports transformers.
    """
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` for a linear-like module, or None if it is not one.

    Recognizes ``nn.Linear``; transformers-style ``Conv1D`` (weight ``[in, out]``, attribute
    ``nf``); and any other module that declares integer ``in_features`` and ``out_features``
    (quantized and custom linears). An ``nn.Linear`` that computes with torch's forward gives
    its weight's ``[out, in]``, which is all that forward reads: its ``in_features`` and
    ``out_features`` may be stale (a weight sliced or replaced by hand, as pruning does).
    """
    if isinstance(module, nn.Linear):
        weight = _stored_weight(module)
        if weight is not None and not overrides_forward(module, nn.Linear):
            return int(weight.shape[1]), int(weight.shape[0])
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if is_conv1d(module) and isinstance(weight, torch.Tensor):
        return int(weight.shape[0]), int(weight.shape[1])
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int) and not isinstance(module, nn.modules.conv._ConvNd):
        return fin, fout
    return None


def _stored_weight(module: nn.Module) -> torch.Tensor | None:
    """``module.weight`` where it is a 2-D tensor of known shape (not a lazy module's
    uninitialized parameter), else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or isinstance(weight, nn.parameter.UninitializedParameter):
        return None
    return weight if weight.dim() == 2 else None


def _size_refusal(module: nn.Module, fin: int, fout: int) -> str | None:
    """Why the sizes an ``nn.Linear`` subclass with a ``forward`` of its own declares cannot be
    trusted: a floating-point weight of another shape than their ``[out, in]`` (which of the two
    its forward computes with lorahot cannot tell); None where they agree, or where the weight is
    stored another way (packed quantized data)."""
    weight = _stored_weight(module)
    if not isinstance(module, nn.Linear) or weight is None or not weight.is_floating_point():
        return None
    if tuple(weight.shape) == (fout, fin):
        return None
    return (
        f"{type(module).__name__} declares in_features={fin} and out_features={fout}, but its weight has shape "
        f"{tuple(weight.shape)}, not ({fout}, {fin}), and its class overrides forward, so lorahot cannot tell which "
        "sizes it computes with. Set in_features and out_features to the weight's (after slicing or replacing it), "
        "or exclude this module from targets."
    )


def _layout_refusal(module: nn.Module, fin: int, fout: int, raising: bool = True) -> str | None:
    """Why ``module``, linear-like only by the ``in_features`` and ``out_features`` it declares
    (neither an ``nn.Linear`` nor a Conv1D), or an ``nn.Linear`` subclass with a ``forward`` of
    its own, does not map inputs ``(..., in)`` to outputs ``(..., out)``, over which lorahot
    computes and adds its LoRA; None where it does. A forward that returns something else (a
    router's ``(scores, logits)`` tuple, as transformers' ``Llama4Router``) is refused; one that
    raises on the probe only where ``raising`` (an ``nn.Linear`` subclass is trusted then: a
    quantized one may take only its own device or dtype). Checked
    on a probe input ``(b, t, in)`` whose ``b`` and ``t`` are neither ``in`` nor ``out``, so
    that a module computing over another dimension (channels first) cannot pass by a
    coincidence of sizes (:func:`lorahot.layers.probes.probe_forward`: the module's forward
    alone, its state and the random generators put back). Not checked on the meta device
    (inject refuses it there)."""
    tensors = [*module.parameters(), *module.buffers()]
    if any(t.is_meta for t in tensors):
        return None
    floating = next((t for t in tensors if t.is_floating_point()), None)
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = floating.dtype if floating is not None else torch.get_default_dtype()
    b, t = [n for n in range(2, 6) if n not in (fin, fout)][:2]
    probe = torch.randn(b, t, fin, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    try:
        out = probe_forward(module, probe)
    except Exception as exc:  # the module's own code: anything can happen
        if not raising:
            return None
        why = f"its forward raised {type(exc).__name__} on a probe input of shape {(b, t, fin)}: {exc}"
    else:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        if got == (b, t, fout):
            return None
        why = f"its forward maps a probe input of shape {(b, t, fin)} to {got}, not {(b, t, fout)}"
    return (
        f"{type(module).__name__} declares in_features={fin} and out_features={fout}, but {why.splitlines()[0]}. "
        "lorahot adds the LoRA of such a module over the last dimension of its input and output; one that computes "
        "over another dimension (channels first) would get it over the wrong one. Exclude this module from targets."
    )


def returns_other_than_rows(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` subclass whose own forward does not return its
    output row for row (a router's ``(scores, logits)`` tuple, as transformers'
    ``Llama4Router``): wrapping it is refused, and ``"all-linear"`` leaves it out. A forward
    that raises on the probe input is not counted (see :func:`_layout_refusal`)."""
    if not (isinstance(module, nn.Linear) and overrides_forward(module, nn.Linear)):
        return False
    features = linear_features(module)
    return features is not None and _layout_refusal(module, *features, raising=False) is not None


class LoRALinear(LoRALayer):
    """``base(x) + ((x @ A.T) * s) @ B.T`` on a linear-like ``base_layer``.

    Buffers (views into the arena): ``lora_A [R, in]``, ``lora_B [R, out]`` (B stored
    transposed, so a rank prefix is contiguous), ``lora_scale`` the per-row scales ``[R]``
    (float32; float64 for float64 layers).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        features = linear_features(base_layer)
        if features is None:
            raise UsageError(f"{type(base_layer).__name__} is not a linear-like module")
        fin, fout = features
        refusal = _size_refusal(base_layer, fin, fout)
        if refusal is not None:
            raise UsageError(refusal)
        super().__init__(base_layer, LayerSpec("linear", fin, fout, (fin,)))
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):  # known by its attributes alone
            refusal = _layout_refusal(base_layer, fin, fout)
        elif isinstance(base_layer, nn.Linear) and overrides_forward(base_layer, nn.Linear):
            refusal = _layout_refusal(base_layer, fin, fout, raising=False)
        if refusal is not None:
            raise UsageError(refusal)

    def live_views(self, a_rows: torch.Tensor, b_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Arena rows ``[R, in]``, ``[R, out]`` are used as they are."""
        return a_rows, b_rows

    def fusable(self, lora_A: torch.Tensor) -> bool:
        """:mod:`lorahot.kernels.lora_linear` applies: CUDA, fp16/bf16, an ``nn.Linear`` base.
        Then the routed kernels (:mod:`lorahot.kernels.routed_lora`) serve per-row routing too."""
        base = self.base_layer
        return fused_kernel.supports(base, lora_A) and routed_kernel.available() and computes_as_stored(base)

    def can_fuse(self, x: torch.Tensor, a: torch.Tensor) -> bool:
        # compiled without CUDA graphs the operator's body would run on every call: the
        # compiler's own formulas cost the host less (lorahot.kernels.compile_mode). Asked
        # first: the row limits of a symbolic row count would make the compiler guard on them.
        if compile_mode.launched_per_call():
            return False
        rows_pay = fused_kernel.worth_it(_rows(x), self.spec.out_dim, wide=self._plan[2])
        return rows_pay and _kernel_input(x, a.dtype, self._base)

    def fused_forward(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        weight, bias = self.kernel_weights()
        return fused_kernel.lora_linear(x, weight, bias, a, b, scale)

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base ``weight`` and ``bias`` the fused kernels read (the base module's own)."""
        base = self._base
        return base.weight, base.bias

    def lora_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != a.shape[-1]:  # sizes the graph is specialized on: no guard of its own
            return self._refuse_input(x)
        h = torch.matmul(x.to(a.dtype), a.t())  # (..., R)
        return torch.matmul((h * scale).to(h.dtype), b)  # (..., out)

    def _refuse_input(self, x: torch.Tensor) -> torch.Tensor:
        """Refuses an input whose last dimension is not the layer's ``in`` features, which the base
        module took (one that computes over another dimension, such as channels first, where
        the LoRA would add its update over the wrong one), naming the layer and ``x``'s shape
        (:func:`lorahot.layers.refusal.refuse`, compiled or not)."""
        kind, fin = type(self._base).__name__, self.spec.in_dim
        head = literal(f"{self._describe()}: its input has shape ")
        tail = literal(
            f", whose last dimension is not its {fin} input features. lorahot adds a linear-like module's LoRA "
            f"over the last dimension of its input, and {kind} took this one: it computes over another dimension "
            "(channels first?), where the LoRA would be added over the wrong one. Exclude this module from targets, "
            f"or call it with inputs (..., {fin})."
        )
        message = head + "{0}" + tail
        return refuse(message, lambda: x.new_zeros(()), x)

    def routed_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Rows ``[L, T, in]`` (``x``'s leading dims split into ``L`` groups) times their own
        slot's ``A [R, in]`` and ``B [R, out]``: each entry's A and B gathered, two batched
        products; or, where that would copy a slot's weights for every row or two
        (:func:`lorahot.layers.routing.gathers`; ``L * R * (in + out)`` elements, gigabytes per
        layer for thousands of packed tokens at a width of 4096), every slot's shrink over every
        row, each row keeping its own slot's columns (selected, not multiplied: another slot's
        overflow stays out), and one product with every slot's B; that form also where batched
        products miscompute (:func:`lorahot.layers.routing.batched_products`)."""
        if x.dim() == 0 or x.shape[-1] != a.shape[-1]:
            return self._refuse_input(x)
        length = index.shape[0]
        x3 = x.reshape(length, math.prod(x.shape[:-1]) // length, x.shape[-1]).to(a.dtype)  # (L, T, in); in may be 0
        slots, rank = b.shape[0], b.shape[1]  # an A arena with no elements (in = 0) has one slot's view
        if routing.gathers(length, x3.shape[1], slots) and routing.batched_products(x):
            h = torch.bmm(x3, a[index].transpose(1, 2))  # (L, T, R)
            h = (h * scales[:, None, :]).to(h.dtype)
            return torch.bmm(h, b[index]).reshape(*x.shape[:-1], b.shape[-1])  # (..., out)
        k = x.shape[-1]
        h = torch.matmul(x3, a.expand(slots, rank, k).reshape(slots * rank, k).t()).unflatten(-1, (slots, rank))
        return routing.every_slot_expand(h, b, scales, index).reshape(*x.shape[:-1], b.shape[-1])  # (..., out)

    def routed_fused(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, route: torch.Tensor
    ) -> torch.Tensor | None:
        """The routed fused linear (:mod:`lorahot.kernels.routed_linear`: the segmented shrink,
        then base and each slot's expand in one kernel) where it pays for this many rows
        against the base GEMM and the segmented pair (:func:`lorahot.kernels.lora_linear.routed_worth_it`),
        else None."""
        if not self._plan[1]:
            return None
        weight, bias = self.kernel_weights()
        return _routed_op(x, weight, bias, self._base, a, b, s, route, self._plan[4], self._plan[2])

    def routed_sum(
        self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, route: torch.Tensor
    ) -> torch.Tensor:
        """The routed kernel (:mod:`lorahot.kernels.routed_lora`) where the fused kernel applies
        (CUDA, fp16/bf16, no autograd); the library formula elsewhere."""
        if self._plan[1] and x.dtype == a.dtype == y.dtype and not _needs_grad(x, self._base):  # fused
            return routed_kernel.routed_lora(x, y, a, b, s, route, _published_segments(self._plan[4], a, route))
        return super().routed_sum(x, y, a, b, s, route)

    def widenable(self, max_rank: int, dtype: torch.dtype) -> bool:
        """An exact ``nn.Linear`` whose weight is a plain contiguous tensor of the buffers'
        ``dtype`` that owns its whole storage (a weight sharing memory with anything else stays
        where it is: moving it would untie it)."""
        base = self.base_layer
        weight = getattr(base, "weight", None)
        if type(base) is not nn.Linear or not isinstance(weight, torch.Tensor) or not computes_as_stored(base):
            return False
        return (
            type(weight) in (nn.Parameter, torch.Tensor)
            and weight.dtype == dtype
            and not weight.is_meta
            and weight.is_contiguous()
            and weight.storage_offset() == 0
            and weight.untyped_storage().nbytes() == weight.numel() * weight.element_size()
            and weight._base is None
        )

    def widen(self, max_rank: int, block: torch.Tensor | None = None, at: tuple[Any, ...] | None = None) -> None:
        """Moves the weight into ``[[W, B_s], [A, 0]]`` (``[out + max_rank, in + max_rank]``, the
        adapter's blocks zero; see :mod:`lorahot.kernels.wide_linear`) and makes the parameter a
        view of its ``W`` block, in place: the parameter object stays the same. ``block``: that
        buffer, zero, one of a group's (``at``: the group's handle, ``(size, stride, offset)`` of
        the block in its allocation and every member's ``out``, see
        :mod:`lorahot.kernels.wide_groups`); else the layer's own."""
        weight = self.base_weight
        n, k = self.spec.out_dim, self.spec.in_dim
        # a normal tensor even when inject runs under inference_mode: every later write to it
        # (loads, swaps, merged mode) happens outside, where inference tensors are read-only
        with torch.inference_mode(False), torch.no_grad():
            if block is None:
                block = torch.zeros((n + max_rank, k + max_rank), device=weight.device, dtype=weight.dtype)
            block[:n, :k].copy_(weight)
            weight.data = block[:n, :k]
        self.register_buffer(WIDE_BUFFER, block, persistent=False)
        self._register_wide()
        if at is not None:
            handle, geometry, outs = at
            object.__setattr__(self, "_wide_handle", handle)  # keeps the allocation's entry alive
            self._wide_at = (handle.key, geometry, outs)
        self.wide = True

    def _register_wide(self) -> None:
        """Registers the wide buffer's geometry with the extern-input rewrite
        (:func:`lorahot.kernels.extern_inputs.register`): a graph input it matches, a group's
        block too (read as one)."""
        geometry, wide = self.__dict__.get("_geometry"), self._buffers.get(WIDE_BUFFER)
        shift_at = self.__dict__.get("_shift_at")
        if shift_at is not None and wide is not None and shift_at[0] in TENSORS:  # the shifted rows' copy
            extern_inputs.register(wide, TENSORS[shift_at[0]][0], shift_at[1])
        elif geometry and wide is not None and self.__dict__.get("_key") in TENSORS:
            extern_inputs.register(wide, TENSORS[self._key][0], geometry[0])

    def shift_rows(self, view: torch.Tensor, handle: TensorHandle, geometry: tuple[Any, ...]) -> None:
        """The contiguous copy of this wide layer's shifted A rows (float16,
        :data:`lorahot.kernels.wide_linear.SHIFTED_DTYPES`; :mod:`lorahot.runtime.wide` keeps it
        equal to the wide buffer's A rows): ``view``, which is ``handle``'s tensor seen through
        ``geometry``. The traced shrink reads it there, as a bfloat16 layer's reads the arena."""
        object.__setattr__(self, "_shifted_view", view)
        object.__setattr__(self, "_shift_handle", handle)  # keeps the copy's entry alive
        self._shift_at = (handle.key, geometry)
        self._register_wide()

    def _shifted_a(self, shift_at: Any) -> torch.Tensor:
        """The shifted A rows (:meth:`shift_rows`) as this call reads them: the layer's own view
        eagerly or for a :attr:`regional` layer (``shift_at`` True), else through the handle."""
        if shift_at is True or not torch.compiler.is_compiling():
            view: torch.Tensor = self.__dict__["_shifted_view"]
            return view
        return TENSORS[shift_at[0]][0].as_strided(*shift_at[1])

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``deepcopy``, unpickled) registers its own wide buffer (:meth:`_register_wide`)."""
        super().__setstate__(state)
        if self.__dict__.get("wide"):
            self._register_wide()

    def wide_rows(self) -> torch.Tensor:
        wide: torch.Tensor = self._buffers[WIDE_BUFFER]  # type: ignore[assignment]
        return wide[: self.spec.out_dim, self.spec.in_dim :].t()

    def wide_a_rows(self) -> torch.Tensor:
        wide: torch.Tensor = self._buffers[WIDE_BUFFER]  # type: ignore[assignment]
        return wide[self.spec.out_dim :, : self.spec.in_dim]

    def unwiden(self) -> None:
        """The weight gets a contiguous copy of its columns as its own storage; the wide buffer goes."""
        if not self.wide:
            return
        weight = self.base_weight
        with torch.inference_mode(False), torch.no_grad():
            weight.data = weight.detach().clone(memory_format=torch.contiguous_format)
        wide = self._buffers.pop(WIDE_BUFFER, None)
        if wide is not None:  # the runtime may keep views of it: no rewrite reads it as a layer's any more
            extern_inputs.unregister(wide)
        self.__dict__.pop("_wide_handle", None)
        self.__dict__.pop("_shifted_view", None)
        self.__dict__.pop("_shift_handle", None)
        self._wide_at = None
        self._shift_at = None
        self.wide = False

    def bound_address(self) -> tuple[int, ...]:
        if not self.wide:
            return super().bound_address()
        wide = self._buffers.get(WIDE_BUFFER)
        return (*super().bound_address(), 0 if wide is None else wide.data_ptr(), self.base_weight.data_ptr())

    def can_widen(self, x: torch.Tensor) -> bool:
        # self._base and self._buffers, not base_weight or the buffer's attribute: those go through
        # this class's __getattr__, which the compiler traces in every layer (on the CPU box, 200
        # wide layers traced in 4.4 s with them, 3.7 s without; the base model's 0.9 s)
        return _kernel_input(x, self._base.weight.dtype, self._base)

    def wide_bound(self) -> bool:
        """Whether the base weight is still the ``W`` block of the wide buffer (same storage, shape,
        strides and dtype). Not after edits that bypass attribute assignment: new storage under
        the same parameter (``weight.data = ...``, ``torch.utils.swap_tensors``, a parameter put in
        ``_parameters`` directly, as accelerate does, ``torch.func.functional_call``), or a move of
        the model (``model.float()``), which converts the weight and the buffer apart. The eager
        forward then calls the base layer, so the output follows the weight the model now has
        (the runtime's next call refuses, as for any replaced buffer). Two pointer reads per call,
        eagerly; True while compiling: a compiled graph computes from what it traced (a pointer is
        no value it can read)."""
        if torch.compiler.is_compiling():
            return True
        return self.is_wide_block(self._base._parameters.get("weight"))

    def is_wide_block(self, weight: Any) -> bool:
        wide = self._buffers.get(WIDE_BUFFER)
        return (
            wide is not None
            and isinstance(weight, torch.Tensor)
            and weight.data_ptr() == wide.data_ptr()
            and weight.device == wide.device
            and weight.dtype == wide.dtype
            and weight.shape == (self.spec.out_dim, self.spec.in_dim)
            and weight.stride() == (wide.stride(0), 1)
        )

    def wide_forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The layer from its wide buffer (:mod:`lorahot.kernels.wide_linear`): compiled, the
        shrink over ``a`` (the live A's arena view, which the stacked-shrink pass joins with its
        neighbours') then ``[x | h] @ [W | B_s].T + bias`` in one GEMM; eagerly, ``[y | h] = x @
        [W; A].T`` then the expand in place and the bias."""
        wide = self._buffers[WIDE_BUFFER]
        shift_at = self._plan[10]
        if shift_at is not None:  # float16: the shifted rows, not the arena's
            return wide_kernel.wide_linear(x, wide, self._base.bias, self._shifted_a(shift_at), True)  # type: ignore[arg-type]
        y: torch.Tensor = wide_kernel.wide_linear(x, wide, self._base.bias, a)  # type: ignore[arg-type]
        return y

    def dynamic_rows(self, x: torch.Tensor) -> bool:
        """Compiled with a symbolic row count (dynamic shapes) that the fused kernel's row limits
        cannot be decided on without a guard, where the wide path applies: the layer then runs
        :meth:`dynamic_forward`, and one graph serves every row count (see
        :mod:`lorahot.kernels.wide_linear`)."""
        return _symbolic_rows(x) and self.can_widen(x)

    def dynamic_forward(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """:func:`dynamic_wide` on this layer."""
        return dynamic_wide(self, x, a, b, scale)

    def merge_refusal(self) -> str | None:
        """Merged mode folds the LoRA into the weight, which is right only where the base computes
        ``F.linear(x, weight, bias)`` (``x @ weight + bias`` for Conv1D) from the weight and bias
        as they are when it runs: checked on a probe input for Conv1D and for ``nn.Linear``
        subclasses that override ``forward``, before and after a probe change written into both
        (:func:`~lorahot.layers.probes.forward_mismatch`)."""
        base = self.base_layer
        if not (isinstance(base, nn.Linear) or is_conv1d(base)):
            return f"merged mode needs nn.Linear or Conv1D weights, got {type(base).__name__}"
        return self._map_refusal(written=True)

    def dora_refusal(self) -> str | None:
        """DoRA's factor ``m / ||W0 + scale * B @ A||`` reads the base weight ``W0``, which must be
        the one the base computes with: a dense floating-point ``weight`` (not a quantized
        layer's packed data, such as an int8 weight its forward scales, or torchao's tensor
        subclasses), and, unless the base is an ``nn.Linear`` with torch's forward,
        ``F.linear(x, weight, bias)`` (``x @ weight + bias`` for Conv1D; a linear-like module of
        another class must have a weight ``[out, in]``) on a probe input. Found once per layer
        (the probe runs at the first DoRA adapter's load)."""
        hooked = super().dora_refusal()
        if hooked is not None:
            return hooked
        if "_dora_refusal" not in self.__dict__:
            self.__dict__["_dora_refusal"] = self._dora_found()
        found: str | None = self.__dict__["_dora_refusal"]
        return found

    def _dora_found(self) -> str | None:
        """:meth:`dora_refusal`'s own checks, after the base class's (a dense weight, no pre-hooks)."""
        base = self.base_layer
        weight = self.base_weight
        if not (isinstance(base, nn.Linear) or is_conv1d(base)) and tuple(weight.shape) != (
            self.spec.out_dim,
            self.spec.in_dim,
        ):
            why = f"its weight has shape {tuple(weight.shape)}, not its ({self.spec.out_dim}, {self.spec.in_dim})"
            return dora_needs(base, why)
        mismatch = self._map_refusal(written=False)
        return None if mismatch is None else dora_needs(base, mismatch)

    def _map_refusal(self, written: bool) -> str | None:
        """Why the base does not compute the linear map of its ``weight`` and ``bias`` (checked on
        a probe input, for all but an ``nn.Linear`` with torch's forward; ``written``: also after a
        probe change written into both in place), or None."""
        base = self.base_layer
        kind = type(base).__name__
        if isinstance(base, nn.Linear):
            if not overrides_forward(base, nn.Linear):
                return None
            kind += " overrides forward and"
        weight, bias = self.base_weight, getattr(base, "bias", None)
        if not weight.is_floating_point() or weight.is_meta:
            return f"merged mode needs floating-point weights with data, got {weight.dtype} on {weight.device}"
        fin = self.spec.in_dim
        probe = torch.randn(2, fin, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)

        def expected(x: torch.Tensor) -> torch.Tensor:
            w = weight.t() if is_conv1d(base) else weight
            return torch.nn.functional.linear(x, w, bias if isinstance(bias, torch.Tensor) else None)

        changed = [t for t in (weight, bias) if isinstance(t, torch.Tensor)] if written else []
        mismatch = forward_mismatch(base, probe, expected, changed)
        if mismatch is not None:
            return f"{kind} does not compute the linear map of its weight ({mismatch})"
        return None

    def channel_dim(self) -> int:
        """Rows of a linear weight ``[out, in]``, columns of a Conv1D's ``[in, out]``."""
        return 1 if is_conv1d(self.base_layer) else 0

    def merge_operands(self, a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Linear weight ``[out, in]``: ``B @ A``; Conv1D weight ``[in, out]``: ``A.T @ B.T``."""
        return (a.t(), bt) if is_conv1d(self.base_layer) else (bt.t(), a)

    def weight_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """``delta [out, in]`` as the base weight lays it out (``[in, out]`` for Conv1D)."""
        return delta.t() if is_conv1d(self.base_layer) else delta.reshape(self.base_weight.shape)


def _autocast_recasts(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether autocast is on for ``x``'s device with a dtype other than ``dtype``, the one the
    layer's weights have. Autocast then runs the base layer's product in its own dtype; the
    fused kernel (an operator autocast does not enter) and the wide path (whose in-place
    accumulate would mix the two dtypes) would not follow, so the layer takes the library
    formula, which autocast governs as it governs the base layer. Only CUDA and the CPU are
    asked (the fast paths run nowhere else; autocast refuses to be asked about ``meta``)."""
    device = x.device.type
    if device not in ("cuda", "cpu"):
        return False
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != dtype


def _routed_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    base: nn.Module,
    a: torch.Tensor,
    b: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    key: int,
    wide: bool,
) -> torch.Tensor | None:
    """The routed fused linear (:mod:`lorahot.kernels.routed_linear`: the segmented shrink, then
    base and each slot's expand in one kernel) over the slot views, where it pays for this many
    rows against the base GEMM and the segmented pair (:func:`lorahot.kernels.lora_linear.routed_worth_it`)
    and takes ``x``; else None. A function, not a method: the compiler guards a method per layer."""
    # the operator decides per call: compiled with symbolic rows, or where it has its own form
    # above the fused path's rows (routed_linear.ACCUMULATE)
    sized = _symbolic_rows(x) or routed_linear.ACCUMULATE
    if not (sized or fused_kernel.routed_worth_it(_rows(x), weight.shape[0], wide=wide)):
        return None
    if not _kernel_input(x, a.dtype, base):
        return None
    segs = _published_segments(key, a, route)
    return routed_linear.routed_lora_linear(
        x, weight, bias, a, b, s, route, segs, sized=sized, wide=wide, workspace=WORKSPACES[key]
    )


def _published_segments(key: int, a: torch.Tensor, route: torch.Tensor) -> torch.Tensor | None:
    """The routing grouped by slot, as the runtime published it for arena ``key``; None where it
    was grouped for another slot count (a layer bound by hand): the kernels group it themselves."""
    segs = SEGMENTS[key]
    return segs if segs is not None and routed_kernel.segments_fit(segs, a.shape[0], route.shape[0]) else None


def computes_as_stored(base: nn.Module) -> bool:
    """Whether ``F.linear(x, base.weight, base.bias)`` is what calling ``base`` gives, as the
    fused kernel and the wide path compute it without calling ``base``: no forward hooks or
    pre-hooks on it (registered before inject: the wrapper's own hooks run either way), no
    ``forward`` of the instance's own (accelerate's offloading hooks set one), and a weight
    stored as a parameter (not recomputed by a parametrization or weight_norm's pre-hook) that
    holds its values as a dense tensor, as does the bias (not torchao's quantized and float8
    tensor subclasses, which report the dtype they stand for and keep their values elsewhere:
    :func:`~lorahot.layers.base.unusual_values`). Other layers take the library path, which
    calls ``base``."""
    weight, bias = base._parameters.get("weight"), getattr(base, "bias", None)
    dense = weight is not None and unusual_values(weight) is None
    return dense and not own_code(base) and (not isinstance(bias, torch.Tensor) or unusual_values(bias) is None)


def _kernel_input(x: torch.Tensor, dtype: torch.dtype, base: nn.Module) -> bool:
    """The kernels' conditions on ``x`` other than its row count: the layer's ``dtype``, no
    autograd to record, no autocast to another dtype."""
    return x.dtype == dtype and not _needs_grad(x, base) and not _autocast_recasts(x, dtype)


def _rows(x: torch.Tensor) -> int:
    """The rows of ``x``: every dimension but the last."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _symbolic_rows(x: torch.Tensor) -> bool:
    """Whether ``x`` is traced by the compiler with a row count that the fused kernel's row
    limits cannot be decided on without a guard (dynamic shapes; see
    :func:`lorahot.kernels.lora_linear.decidable`)."""
    return torch.compiler.is_compiling() and not fused_kernel.decidable(_rows(x))


def _needs_grad(x: torch.Tensor, base: nn.Module) -> bool:
    """Whether a derivative must flow through this call (the fused kernels have none): autograd
    records it, or, eagerly, forward-mode AD or a ``torch.func`` transform is active
    (:func:`~lorahot.layers.base.under_transform`), where a ``jvp`` through the kernels' operators
    gave a zero tangent. A compiled graph is traced with the first test alone."""
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, base.weight, base.bias)
    ):
        return True
    return not torch.compiler.is_compiling() and under_transform()


def compiled_wide(
    layer: LoRALinear, x: torch.Tensor, fused: bool, key: int, geometry: tuple[Any, ...] | None, shift_at: Any = None
) -> torch.Tensor | None:
    """The fused kernel or the wide path, as the general forward would choose between them
    (the checks of :meth:`can_fuse` and :meth:`can_widen`), in one function: the compiler
    traces the forward of every layer of every graph, and each call it inlines costs it
    milliseconds (``benchmarks/experiments/trace_cost_probe.py``). Only the arena views the
    path reads are made. None where the row count is symbolic (the dynamic-shapes operator)
    or the checks fail: the general forward then decides."""
    # can_widen's checks (for a fused, wide layer also the fused kernel's conditions on x),
    # written out: two inlined calls fewer in every layer's trace
    base = layer._base
    if x.dtype != base.weight.dtype or (torch.is_grad_enabled() and _needs_grad(x, base)):
        return None
    if _autocast_recasts(x, x.dtype):
        return None
    per_call = compile_mode.launched_per_call()
    group = layer._plan[7]
    if per_call and (group is not None or wide_groups.ALONE) and wide_groups.joins(_rows(x)):
        # default mode, rows where launches bound a step: the operator, which the grouping
        # pass replaces by one GEMM for a wide group's members over one input and their
        # expands (a layer alone: its GEMM over [W; A] and its expand), in aten the
        # compiler launches itself (lorahot.kernels.wide_groups.expands). Those GEMMs read the
        # wide buffer alone, so A, B and the scale go in as the arena's tensors, unviewed: each
        # view traced is a node, a fake value and guards in every layer of every graph (a
        # layer's trace took 13.6-14.7 ms over the base layer's with the four views on the CPU
        # box, 7.1-9.2 ms without: benchmarks/README.md, sixty-third session). dynamic_wide and
        # wide_input written out, as the checks above: each call inlined costs the trace a
        # tracer of its own, in every layer
        a, b, s, _ = layer._live if geometry is None else TENSORS[key]  # type: ignore[misc]
        wide = layer._buffers[WIDE_BUFFER] if group is None else TENSORS[group[0]][0].as_strided(*group[1])
        y: torch.Tensor = torch.ops.lorahot.wide_linear_dynamic(x, wide, a, b, s, False)
        return y if base.bias is None else y + base.bias
    if fused and not per_call:  # not replayed: the wide GEMMs (compile_mode)
        rows = _rows(x)
        if not fused_kernel.decidable(rows):  # a choice per call: the general forward's operator
            return None
        if group is not None and not all(fused_kernel.worth_it(rows, n, wide=True) for n in group[2]):
            # a member of a wide group under CUDA graphs, at rows where the fused kernel does
            # not pay for every member: the operator, which the grouping pass joins with its
            # neighbours' over the same input (lorahot.kernels.wide_groups), and which takes
            # the one GEMM where they are joined
            a, b, s, _ = arena_views(layer, key, geometry)
            return dynamic_wide(layer, x, a, b, s)
        if fused_kernel.worth_it(rows, layer.spec.out_dim, wide=True):  # the fused kernel
            if geometry is None:  # regional: the layer's own views
                a, b, s, _ = layer._live  # type: ignore[misc]
            else:
                arena = TENSORS[key]
                a, b, s = (
                    arena[0].as_strided(*geometry[0]),
                    arena[1].as_strided(*geometry[1]),
                    arena[2].as_strided(*geometry[2]),
                )
            z: torch.Tensor = fused_kernel.lora_linear(x, base.weight, base.bias, a, b, s)
            return z
    # the wide path's traced form as one operator, called here rather than through
    # wide_forward: the compiler's trace of every layer records one node for it
    if shift_at is not None:  # float16: the shifted rows' copy (wide_linear.SHIFTED_DTYPES)
        return wide_kernel.wide_traced(x, layer._buffers[WIDE_BUFFER], base.bias, layer._shifted_a(shift_at), True)  # type: ignore[arg-type]
    a = layer._live[0] if geometry is None else TENSORS[key][0].as_strided(*geometry[0])  # type: ignore[index]
    return wide_kernel.wide_traced(x, layer._buffers[WIDE_BUFFER], base.bias, a)  # type: ignore[arg-type]


def compiled_routed(
    layer: LoRALinear,
    x: torch.Tensor,
    route: torch.Tensor,
    fused: bool,
    wide: bool,
    key: int,
    slot_geometry: tuple[Any, ...] | None,
) -> torch.Tensor | None:
    """The routed fused linear (:meth:`LoRALinear.routed_fused`'s operator) in one function, the misfit check
    of :meth:`_routed_forward` and the slot views inlined: each method the general routed
    path calls on the layer adds guards a compiled call re-checks for every layer (about 20 per
    layer; on an H200 host the routed decode's guards took 0.28 ms more per call than the
    base model's, ``benchmarks/experiments/mixed_profile_probe.py``). None where an input
    does not fit the routing (the general path refuses it) or the operator does not apply."""
    if not fused or routing.row_misfit(x, route.shape[0], "linear", 1, TOKENS.get(key, False)):
        return None
    if slot_geometry is None:  # regional: the layer's own views
        a, b, s, _ = layer._slots  # type: ignore[misc]
    else:
        arena = TENSORS[key]
        ga, gb, gs, _ = slot_geometry
        a, b, s = arena[0].as_strided(*ga), arena[1].as_strided(*gb), arena[2].as_strided(*gs)
    base = layer._base
    return _routed_op(x, base.weight, base.bias, base, a, b, s, route, key, wide)


def dynamic_wide(
    layer: LoRALinear, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """The fused kernel or the wide GEMMs, whichever pays for the rows of each call, chosen at
    run time inside the operator ``lorahot::wide_linear_dynamic``; the bias added outside it,
    in the elementwise pass the compiler fuses with what follows."""
    fused = not compile_mode.launched_per_call()  # not replayed: the GEMMs alone (compile_mode)
    y = wide_kernel.wide_linear_dynamic(x, wide_input(layer), a, b, scale, fused=fused)
    bias = layer._base.bias
    return y if bias is None else y + bias


def wide_input(layer: LoRALinear) -> torch.Tensor:
    """The wide buffer as a compiled graph reads it: for a member of a wide group, a view of
    the group's allocation through its handle (one graph input per group, the offsets
    constants of the graph, as :func:`lorahot.kernels.wide_groups.group_wide_layers` needs
    them); else the layer's own buffer. A move that converted the layer's buffer apart from
    the allocation (``model.double()``) took the layer out of its group
    (:meth:`~lorahot.layers.base.LoRALayer._leave_moved_allocation`). A member's buffer is
    not read here: a compiled call re-checks every tensor and dictionary key its graph read
    (on the CPU box about 0.6 us per layer, ``benchmarks/experiments/guard_cost_probe.py``)."""
    at = layer._plan[7]
    if at is None or not torch.compiler.is_compiling():
        wide: torch.Tensor = layer._buffers[WIDE_BUFFER]  # type: ignore[assignment]
        return wide
    return TENSORS[at[0]][0].as_strided(*at[1])


register_compiled_paths(compiled_wide, compiled_routed)
