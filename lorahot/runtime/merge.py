"""Merged mode: fold ``B diag(s) A`` into the base weights, for forward speed equal to the base.

Each swap recomputes every targeted weight from a pristine copy kept at inject time,
``W = W0 + B diag(s) A`` (``W0 + s * B @ A`` for one adapter, whose rows share one scale), in
one fused multiply-add per layer, so rounding never accumulates however many swaps run. The
adapter itself still lives in the arena (the slots), and the forward reads only the base
weights: no LoRA work per token at all. A stack (:mod:`lorahot.runtime.stack`) merges the same
way, each row of A scaled by its part's scale first. A layer that also holds LyCORIS or diff
modules is computed whole in at least float32, ``W0 + B diag(s) A + sum s_m ΔW_m`` (each
``ΔW_m`` times its own scale and its part's weight) and its bias ``b0 + s c + sum s_m diff_b``,
and each is rounded once to its dtype: a half-precision weight is never rounded between the
LoRA parts and the others.

DoRA and LoRA biases fold too: ``W = f * (W0 + scale * dW)`` with the live DoRA factor ``f``
per output channel, and ``b = b0 + f * scale * c`` for the LoRA bias ``c`` (a layer without a
base bias cannot take a LoRA bias in merged mode: the load is refused). Where several parts of
a stack carry a LoRA bias on one layer (none of them with DoRA there: a stack refuses DoRA on a
shared layer), ``b = b0 + sum_p w_p * scale_p * c_p``, each bias added as a bias diff
(:meth:`lorahot.runtime.stack.Stack.weight_terms`).

Normalization layers (:class:`lorahot.layers.norm.LoRANorm`: LayerNorm, GroupNorm, RMSNorm and
their look-alikes, targets in merged mode only) are rewritten too, from pristine copies of their
weight and bias: ``w = w0 + s * diff``, ``b = b0 + s * diff_b`` for the delta an adapter carries
(a ComfyUI-extracted ``.diff``/``.diff_b``, LyCORIS' ``w_norm``/``b_norm``); in a stack each
part's delta is added times its part's weight, as every diff module is. A norm takes nothing
else: a LoRA or another LyCORIS kind on it, a delta of another shape, or a ``diff_b`` on a norm
without a bias is refused at load, nothing changed. Unload restores the pristine weight and bias
bitwise; the norm's forward stays the base module's own.

A rewrite writes only the layers whose inputs changed since the last whole rewrite
(:meth:`Merger._inputs`: the live A and B rows, told by the arena's count of writes to them, the
layer's per-row scales, its extras and weight-kind modules): a layer no adapter touches, or in a
stack one that only unchanged parts touch, keeps what it holds, which is bitwise what a rewrite
would write. After a rewrite that failed partway, a move, or a weight written since, every layer
is written again.

Costs: one extra copy of every targeted base weight, and a swap that rewrites those weights
(a few ms for a 1B model on a GPU). A grouped convolution takes only the kinds whose update has
its weight's ``[out, in / groups, *kernel]`` layout (LoHa, LoKr, diffs, rotations, an output-side
(IA)^3), not a LoRA, whose A mixes every group's input channels; only modules whose weight layout
lorahot knows are accepted.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from lorahot.adapter import LoraModule, WeightModule
from lorahot.adapter.deltas import delta_bound, fold_delta
from lorahot.errors import AdapterReadError, UsageError, format_problems, lines
from lorahot.layers import LoRALayer
from lorahot.layers.base import EXTRA_BIAS, EXTRA_F, own_code, unusual_values, version
from lorahot.resolve.file_names import is_compile_wrapper
from lorahot.runtime.aliases import plain
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.graph_replays import Captured, GraphReplays
from lorahot.runtime.layer_weights import Weight, weight_in
from lorahot.runtime.stack import Stack
from lorahot.runtime.written_probes import Signature, WrittenProbes, positions, signature, sums, words

__all__ = ["Merger", "check_mergeable", "check_untied", "dense", "hooked", "writing", "record", "replaced"]


def check_mergeable(name: str, layer: LoRALayer, dtype: torch.dtype | None) -> None:
    """Raises :class:`UsageError` if ``layer`` cannot run in merged mode."""
    base = layer.base_layer
    refusal = _stored_refusal(name, base)
    if refusal is not None:
        raise UsageError(refusal)
    refusal = _storage_refusal(layer) or hooked(base) or layer.merge_refusal()  # hooks first: no probe runs their code
    if refusal is not None:
        raise UsageError(f"{name}: {refusal}; inject without merged=True.")
    weight = layer.base_weight
    if dtype is not None and dtype != weight.dtype:
        raise UsageError(f"merged mode computes in the base weights' dtype ({weight.dtype}); drop dtype={dtype}.")
    if not weight.is_meta and not dense(weight):
        raise UsageError(
            f"{name}: merged mode rewrites the weight in place and needs its elements dense in memory, each once "
            f"(contiguous, channels_last or any other order of its dimensions); its strides are {weight.stride()} "
            f"for shape {tuple(weight.shape)} (a strided slice of a larger tensor, or overlapping elements). Give the "
            "module a weight of its own (module.weight = nn.Parameter(module.weight.detach().contiguous())) before "
            "inject, or drop merged=True."
        )


def dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill a span of its memory exactly once: its strides are those of
    a contiguous tensor of its dimensions in some order (contiguous, ``channels_last``,
    ``channels_last_3d``, a transpose), dimensions of size 1 left out. Merged mode writes such a
    weight in place in its own layout (its strides never change: a compiled model keeps reading
    it), where a strided slice of a larger tensor or overlapping strides are refused."""
    if t.numel() <= 1:
        return True
    dims = sorted(((int(st), int(n)) for st, n in zip(t.stride(), t.shape, strict=True) if n != 1), reverse=True)
    expected = 1
    for stride, size in reversed(dims):
        if stride != expected:
            return False
        expected *= size
    return True


def _stored_refusal(name: str, base: nn.Module) -> str | None:
    """Why merged mode has no weight (or bias) of ``base`` to rewrite: what its forward reads as
    ``weight`` (``bias``) is not the parameter it stores under that name (the bias may be a
    buffer), so a rewrite of the stored one would be thrown away, or would reach nothing; None
    where both are stored."""
    for kind in ("weight", "bias"):
        value = getattr(base, kind, None)
        if kind == "bias" and not isinstance(value, torch.Tensor):
            continue
        stored: torch.Tensor | None = base._parameters.get(kind)
        if stored is None and kind == "bias":
            stored = base._buffers.get(kind)
        if stored is not None and value is stored:
            continue
        how, fix = _computed(base, kind, value)
        dropped = (
            "the adapter would be dropped" if kind == "weight" else "a LoRA bias (or a LyCORIS diff_b) would be dropped"
        )
        return (
            f"{name}: its {kind} is {how}, so merged mode has no {kind} to rewrite: {dropped}. Inject without "
            f"merged=True, or {fix}."
        )
    return None


def _computed(base: nn.Module, kind: str, value: object) -> tuple[str, str]:
    """How ``base`` holds its ``kind`` (``weight``, ``bias``) other than as a stored parameter, and
    what makes it one."""
    if is_compile_wrapper(base):
        return (
            f"the parameter of the {type(base._orig_mod).__name__} that torch.compile wrapped before inject, which "
            "the wrapper holds, not stores",
            "inject first and compile it after (torch.compile of it after inject compiles its LoRA layer)",
        )
    if parametrize.is_parametrized(base, kind):
        return (
            "computed from other tensors on each call (a parametrization), not stored",
            "remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) first",
        )
    if any(f"{kind}{end}" in base._parameters for end in ("_orig", "_g", "_v")):
        return (
            "computed from other tensors on each call by a forward pre-hook (pruning, spectral_norm or weight_norm), "
            "not stored",
            "make it a parameter again first (torch.nn.utils.prune.remove, remove_spectral_norm or remove_weight_norm)",
        )
    if kind not in base._parameters and isinstance(getattr(type(base), kind, None), property):
        return (
            f"given by a property of {type(base).__name__}, not stored as a parameter",
            "exclude this module from targets",
        )
    if kind not in base._parameters and (kind == "weight" or kind not in base._buffers):
        held = (
            "a buffer"
            if kind in base._buffers
            else "a plain tensor attribute"
            if isinstance(value, torch.Tensor)
            else None
        )
        if held is not None:
            return f"{held}, not a parameter", f"register it as a parameter (nn.Parameter) under {kind!r} first"
    if value is None:
        return "missing", "exclude this module from targets"
    if not isinstance(value, torch.Tensor):
        return (
            f"a {type(value).__name__}, not a stored tensor (a quantized module's packed weight?)",
            "exclude this module from targets",
        )
    return (
        f"not the parameter it stores as {kind!r} (a property or an attribute of {type(base).__name__} gives another "
        "tensor)",
        "exclude this module from targets",
    )


def _stored_tensors(base: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The weight parameter ``base`` stores, and its bias parameter (or bias buffer), or None each."""
    bias = base._parameters["bias"] if "bias" in base._parameters else base._buffers.get("bias")
    return base._parameters.get("weight"), bias


def reparametrized(layer: LoRALayer) -> list[str]:
    """How a merged ``layer``'s base layer computes each of its weight and bias it no longer
    stores (a parametrization, ``weight_norm``, ``spectral_norm`` or pruning applied after
    inject: :func:`_computed`'s description), as ``"its weight is ..."``; empty where it stores
    both (or the layer is not merged)."""
    if layer.pristine_weight is None:
        return []
    base = layer.base_layer
    kinds = ["weight"] if layer.pristine_bias is None else ["weight", "bias"]
    return [
        f"its {kind} is {_computed(base, kind, base.__dict__.get(kind))[0]}"
        for kind, held in zip(("weight", "bias"), _stored_tensors(base), strict=True)
        if kind in kinds and held is None
    ]


def check_ejectable(layers: dict[str, LoRALayer]) -> None:
    """Refuses an eject, before it changes anything, where a merged layer's base weight (or
    bias) is computed on each call by a parametrization, ``weight_norm``, ``spectral_norm`` or
    pruning applied after inject: computed from the merged weight (the adapter folded in), it
    has no stored tensor to put the base weight back into, and the eject would leave the
    adapter in the model, silently. The way out is the removal of the reparametrization, which
    stores a tensor again; eject puts the base weight of inject back into it
    (:attr:`~lorahot.layers.base.LoRALayer.base_put_back`).

    Raises:
        UsageError: naming each such layer, what its weight is, and the fix.
    """
    found = [f"{name}: {how}" for name, layer in layers.items() for how in reparametrized(layer)]
    if found:
        raise UsageError(
            lines(
                format_problems(
                    "eject cannot take the adapter out of merged layers whose weight or bias a parametrization, "
                    "weight_norm, spectral_norm or pruning computes since inject (from the weight with the adapter "
                    "merged in):",
                    found,
                ),
                "Nothing was changed. Remove it first (torch.nn.utils.parametrize.remove_parametrizations, "
                "remove_weight_norm, remove_spectral_norm, prune.remove), then eject: it puts the base weight and bias "
                "as they were at inject into the tensors the removal stores (the reparametrization's effect on them "
                "is not kept); apply it again after eject if it is wanted.",
            )
        )


def restores(layer: LoRALayer) -> bool:
    """Whether eject puts a merged ``layer``'s base weight and bias of inject back whatever they
    hold now: a parameter was put back in its base layer after a reparametrization applied since
    inject (:attr:`~lorahot.layers.base.LoRALayer.base_put_back`), holding the merged weight
    reparametrized (which :func:`replaced` would take for a checkpoint loaded since), and no
    ``load_state_dict`` brought a base checkpoint since."""
    return layer.base_put_back and not layer.checkpoint_loaded


def _storage_refusal(layer: LoRALayer) -> str | None:
    """Why merged mode cannot rewrite ``layer``'s weight or bias in place: one that does not hold
    its values as a dense tensor of a dtype it computes in (:func:`~lorahot.layers.base.unusual_values`:
    torchao's quantized and float8 weights, a quantized tensor, a float8 or integer dtype); None
    where both do (a weight on the meta device is refused where the buffers are placed)."""
    for kind, t in (("weight", layer.base_weight), ("bias", layer.base_bias)):
        form = None if t is None or t.is_meta else unusual_values(t)
        if form is not None:
            return (
                f"its {kind} is {form}, so merged mode cannot rewrite it in place as {kind} + scale * B @ A (it "
                "writes float16, bfloat16, float32 or float64 tensors in their own dtype)"
            )
    return None


def hooked(base: nn.Module) -> str | None:
    """Why merged mode would change what ``base``'s own code does to its output: forward hooks
    or pre-hooks on it, or a ``forward`` of the instance's own (accelerate sets one). A folded
    weight passes the LoRA through them too, where unmerged (and PEFT's unmerged forward) they
    see the base alone; None where it has none."""
    kinds = own_code(base)
    if not kinds:
        return None
    return (
        f"{type(base).__name__} has {' and '.join(kinds)}, which would act on the folded LoRA too (unmerged, they "
        "see the base layer alone), so merged mode would compute something else; remove them first"
    )


def check_untied(model: nn.Module, names: list[str]) -> None:
    """Refuses a target whose weight or bias shares memory with any other tensor of the model.

    Merged mode rewrites each targeted weight (and bias: a LoRA bias or a ``diff_b`` folds into
    it) in place, so one tied to another module (an ``lm_head`` sharing ``embed_tokens.weight``,
    two layers sharing one bias, or any view of the same storage) would change that module too.
    Found by storage and byte range, not by names.

    Raises:
        UsageError: naming the target and the module its weight or bias is tied to.
    """
    by_storage: dict[tuple[torch.device, int], list[tuple[str, torch.Tensor]]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for qualname, t in named:  # sparse, quantized and wrapper tensors have no storage to share with a dense weight
        if plain(t) and t.numel():
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((qualname, t))
    for name in names:
        module = model.get_submodule(name)
        # a weight not stored as the parameter its forward reads (spectral_norm's, computed from
        # weight_orig and sharing its memory until the first call; a property over another
        # parameter of the module) is refused for what it is, not as a tie to its own module
        refusal = _stored_refusal(name, module)
        if refusal is not None:
            raise UsageError(refusal)
        for kind in ("weight", "bias"):
            tensor = getattr(module, kind, None)
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or not tensor.numel():
                continue
            if not plain(tensor):  # no storage to tie (check_mergeable refuses such a weight)
                continue
            own = f"{name}.{kind}"
            for qualname, t in by_storage.get((tensor.device, tensor.untyped_storage().data_ptr()), []):
                if qualname != own and _overlap(t, tensor):
                    owner = qualname.rpartition(".")[0] or "the model"
                    raise UsageError(
                        f"{name}: its {kind} is tied to {owner} ({qualname} shares its memory); merged mode would "
                        f"rewrite both {name} and {owner}. Inject without merged=True, or untie them (give {owner} its "
                        f"own copy of the {kind}) first."
                    )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one storage touch a common byte."""

    def span(t: torch.Tensor) -> tuple[int, int]:
        start = int(t.storage_offset()) * t.element_size()
        last = sum((int(size) - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        return start, start + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def writing(tensors: Sequence[torch.Tensor | None]) -> contextlib.AbstractContextManager[None]:
    """The mode to rewrite ``tensors`` in place in: ``torch.inference_mode()`` where one is an
    inference tensor (weights made under it, as serving stacks load them, can be written only
    there), else ``torch.no_grad()``."""
    if any(t is not None and t.is_inference() for t in tensors):
        return torch.inference_mode()
    return torch.no_grad()


def record(layer: LoRALayer) -> None:
    """Notes what lorahot has just written into ``layer``'s weight, to notice a change since
    (:func:`replaced`): a few of its elements, how many it has, its whole bias (one value per
    output: an optimizer stepping only the biases changes no weight element), the weight's
    version counter (torch counts every in-place write through it: ``copy_``, ``w[i] = v``, an
    optimizer's step; ``None`` for an inference tensor, which has none) and its row and column
    sums (:func:`~lorahot.runtime.written_probes.words`), compared when the version moved or is
    unknown. The layer by layer form of :class:`~lorahot.runtime.written_probes.WrittenProbes`."""
    layer.checkpoint_loaded = False
    weight = layer.base_weight.detach()
    at = positions(weight.numel(), weight.device)
    bias = layer.base_bias
    written_bias = None if bias is None else bias.detach().clone()
    samples = torch.take(weight, at)  # in the logical order, a new tensor (not a view), whatever the layout
    layer.written_probe = (at, samples, weight.numel(), written_bias, version(weight), _digest(weight))


def _digest(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's row sums and column sums, its bytes read as integers (:func:`words`,
    :func:`sums`): two reductions."""
    w = words(weight)
    return sums(w, 1), sums(w, 0)


def _differs(layer: LoRALayer) -> bool | tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
    """Whether the weight is no longer what :func:`record` noted: True where that is plain
    on the host, else what to compare on the device: pairs of byte views ``(now, then)`` that
    differ in a byte where it changed, and flags (0-d bool tensors) set where it changed. The
    sampled elements are compared as bytes (NaN equals itself) where the weight is now, after
    the conversion a move of the model (``model.half()``, ``.to(device)``) applies to it,
    since such a move changes nothing lorahot wrote; and, where its version counter moved (or
    it has none) and no move converted its bytes since, its row and column sums
    (:func:`_digest`). A weight of another size, or one on the meta device, has changed. An
    edit through ``weight.data`` moves no version counter: it is noticed where it changes a
    sampled element, or in an inference tensor."""
    at, written, numel, written_bias, noted_version, digest = layer.written_probe  # type: ignore[misc]
    weight, bias = layer.base_weight.detach(), layer.base_bias
    if weight.is_meta or weight.numel() != numel or (bias is None) != (written_bias is None):
        return True
    pairs = [_bytes(torch.take(weight, at.to(weight.device)), written.to(weight.device, weight.dtype))]
    flags = []
    if digest is not None and (noted_version is None or version(weight) != noted_version):
        flags = [(now != then.to(now.device)).any() for now, then in zip(_digest(weight), digest, strict=True)]
    if bias is None or written_bias is None:
        return pairs, flags
    if bias.is_meta or bias.shape != written_bias.shape:
        return True
    pairs.append(_bytes(bias.detach(), written_bias.to(bias.device, bias.dtype)))
    return pairs, flags


def _bytes(now: torch.Tensor, then: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two tensors of one shape and dtype as flat byte views, to compare (NaN equals itself)."""
    return now.contiguous().view(torch.uint8).reshape(-1), then.contiguous().view(torch.uint8).reshape(-1)


def replaced(layers: Sequence[LoRALayer]) -> list[bool]:
    """Per layer, whether its weight or bias is no longer what lorahot last wrote there (a base
    checkpoint loaded after inject, in merged mode): noted in full by ``load_state_dict``
    (:attr:`~lorahot.layers.base.LoRALayer.checkpoint_loaded`), and for a weight written
    otherwise a few of its elements read back and, where its version counter moved, its row
    and column sums. A move of the model to another dtype or device is not a change (see
    :func:`_differs`). Per device the bytes of every layer are compared at once and read to
    the host once: a launch per layer (its samples gathered), where a comparison of its own
    cost four (64 ms over the SDXL UNet's 700 layers on an H200 host)."""
    flags = [layer.checkpoint_loaded for layer in layers]
    by_device: dict[torch.device, list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]]] = {}
    for i, layer in enumerate(layers):
        if layer.written_probe is not None:
            differs = _differs(layer)
            if differs is True or differs is False:
                flags[i] = flags[i] or differs
                continue
            pairs, extra = differs
            by_device.setdefault(pairs[0][0].device, []).append((i, pairs, extra))
    for device, found in by_device.items():
        for i, changed in zip((i for i, _, _ in found), _compared(device, found)):
            flags[i] = flags[i] or changed
    return flags


def _compared(
    device: torch.device, found: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]]
) -> list[bool]:
    """For each entry of ``found`` (one layer's byte pairs and flags, all on ``device``),
    whether any pair differs or any flag is set: one comparison of all the bytes, one sum per
    layer, one read to the host."""
    sizes = torch.tensor([sum(now.numel() for now, _ in pairs) for _, pairs, _ in found], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(found)), sizes)  # each byte's layer, on the host
    nows = torch.cat([now.to(device) for _, pairs, _ in found for now, _ in pairs])
    thens = torch.cat([then.to(device) for _, pairs, _ in found for _, then in pairs])
    counts = torch.zeros(len(found), dtype=torch.int64, device=device)
    counts.index_add_(0, owner.to(device), (nows != thens).to(torch.int64))
    extra = [(k, flag) for k, (_, _, flags) in enumerate(found) for flag in flags]
    if extra:
        counts.index_add_(
            0,
            torch.tensor([k for k, _ in extra], dtype=torch.int64).to(device),
            torch.stack([flag.to(device) for _, flag in extra]).to(torch.int64),
        )
    return [bool(c) for c in counts.tolist()]


def _flat(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as ``[out, in * prod(kernel)]`` in its logical order: a view where its memory
    allows, else a copy (a conv weight moved to ``channels_last``)."""
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))


def _flat_view(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` as ``[out, in * prod(kernel)]``, a view through which a write writes it, or None
    where its memory allows none (a conv weight in ``channels_last``): no copy made to find out."""
    try:
        return weight.view(weight.shape[0], math.prod(weight.shape[1:]))
    except RuntimeError:  # torch's "view size is not compatible with input tensor's size and stride"
        return None


def _per_channel(layer: LoRALayer, weight: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``weight`` (flattened to 2-D, see :meth:`~lorahot.layers.base.LoRALayer.channel_dim`)
    with each output channel times its ``f [out]``."""
    return weight * (f[:, None] if layer.channel_dim() == 0 else f[None, :])


def _folded(layer: LoRALayer, weight: torch.Tensor, module: WeightModule, s: float) -> torch.Tensor:
    """``weight`` (the base weight's layout, or that flattened to 2-D) plus ``s`` times
    ``module``'s ``ΔW``, after its weight decomposition
    (:func:`~lorahot.adapter.deltas.fold_delta`), in ``weight``'s shape: a Conv1D's
    ``[in, out]`` is read as the torch layout ``[out, in]``."""
    shape = layer.spec.weight_shape()  # torch layout [out, in / groups, *kernel]
    torch_layout = weight.t() if layer.channel_dim() == 1 else weight.reshape(shape)
    folded = fold_delta(module, torch_layout, s, _base_for(layer, module))
    return layer.weight_delta(folded).reshape(weight.shape)


def _bias_only(module: WeightModule) -> bool:
    """Whether ``module`` is a bias diff alone (no ``ΔW``): a ``.diff_b`` without weights, or
    one of several LoRA biases a stack adds on one layer (:meth:`Stack.weight_terms`)."""
    return module.kind == "diff" and module.factors.keys() == {"diff_b"}


def _base_for(layer: LoRALayer, module: WeightModule) -> torch.Tensor | None:
    """The pristine base weight in the torch layout ``[out, in, *kernel]`` (a Conv1D's
    ``[in, out]`` transposed) where ``module``'s ``ΔW`` is built from it (OFT, BOFT, (IA)^3,
    GLoRA), else None: every rewrite starts from the weights copied at inject, never from what an
    earlier swap wrote."""
    pristine = layer.pristine_weight
    if not module.reads_base or pristine is None:
        return None
    shape = layer.spec.weight_shape()
    return pristine.t() if layer.channel_dim() == 1 else pristine.reshape(shape)


#: :meth:`Merger._inputs` of a layer written from its pristine copies alone
_PRISTINE = "pristine"

#: what a rewrite wrote each layer from (:meth:`Merger._inputs`), what the weights and arenas were
#: then (:meth:`Merger._held`), and each layer's weight-kind modules, which the first names by id
_Written = tuple[list[object], tuple[object, ...], list[list[tuple[WeightModule, float]] | None]]


def _leaves_gemm_range(bound: float, dtype: torch.dtype) -> bool:
    """Whether an unscaled ``B @ A`` whose entries ``bound`` bounds may leave the range of the
    dtype a one-GEMM rewrite of a ``dtype`` weight accumulates in (at least float32), with a
    margin for the factors' rounding; NaN counts as leaving."""
    top = torch.finfo(torch.promote_types(dtype, torch.float32)).max
    return not bound * (1.0 + 1e-3) < top


class _Rewrite(NamedTuple):
    """What :meth:`Merger.apply` writes into one layer (see :meth:`Merger._plan`)."""

    s: float
    nonzero: bool
    rows: int
    extras: torch.Tensor | None
    terms: list[tuple[WeightModule, float]] | None  # the layer's weight-kind modules and their scales
    #: the unscaled ``B @ A`` may leave the range of the dtype a one-GEMM rewrite computes it in
    #: (``W0 + s * B @ A`` with ``s`` as the GEMM's alpha: BLAS may form the product first): the
    #: layer is computed in float64 with ``s`` folded into ``A`` (:meth:`Merger._wide`)
    exact: bool = False


class Merger:
    """Keeps pristine base weights and rewrites the live weights from the live adapter."""

    def __init__(self, layers: dict[str, LoRALayer], buffers: BufferManager) -> None:
        self._buffers = buffers
        self._layers = layers
        self._items: list[tuple[LoRALayer, torch.Tensor, torch.Tensor, int, int]] = []
        self._pristine_max: dict[str, float] = {}  # max |W0| per layer, for the range check
        for name, layer in layers.items():
            weight = layer.base_weight
            with torch.no_grad():  # contiguous: each rewrite reads it flat, a view of it whatever the weight's layout
                pristine = weight.detach().clone(memory_format=torch.contiguous_format)
                self._pristine_max[name] = float(pristine.abs().max()) if pristine.numel() else 0.0
            layer.pristine_weight = pristine  # eject puts it back, even without this runtime
            bias = layer.base_bias
            layer.pristine_bias = None if bias is None else bias.detach().clone()
            arena, index = buffers.where[name]
            self._items.append((layer, weight, pristine, arena, index))
        #: the weights and biases it rewrites, for :func:`writing`
        self._targets = [t for layer in layers.values() for t in (layer.base_weight, layer.base_bias)]
        #: per layer, the weight and bias its base layer stores, which its forward reads (checked at inject)
        self._stored = [_stored_tensors(layer.base_layer) for layer in layers.values()]
        #: every layer's probe laid out at once, while the weights are those it was built for
        self._probes: WrittenProbes | None = None
        #: rewrites of one adapter captured as CUDA graphs (:meth:`_replayed`)
        self._replays: GraphReplays[tuple[object, ...]] = GraphReplays(buffers, keep=8, what="merged mode's rewrite")
        #: the weights' signature the call's check found (:meth:`check_base`), in a tuple of one
        #: (None: no check since the last rewrite), which the call's rewrite takes in place of its
        #: own (:meth:`apply`): nothing runs between them that could replace a weight
        self._checked: tuple[Signature | None] | None = None
        #: per layer, what the last whole rewrite wrote it from (:meth:`_inputs`), with the weights'
        #: signature and the arenas' tensors then (:meth:`_held`) and the weight-kind modules its
        #: keys name by id (kept, so that no other module takes their id); None where unknown
        #: (before the first rewrite, after one that failed partway): the next rewrites every layer
        self._written: _Written | None = None
        self.record_all()

    def record_all(self) -> None:
        """Notes every weight as lorahot has written it (:func:`record`): after each rewrite,
        and after a rewrite that failed partway, whose partial writes are lorahot's own (the
        call checked the weights first), so that the unload it advises may rebuild them. All
        layers at once (:class:`~lorahot.runtime.written_probes.WrittenProbes`, laid out anew
        where a weight is not the tensor the layout was built for), or layer by layer where a
        weight cannot be laid out. The next rewrite writes every layer."""
        self._written = None
        self._checked = None
        self._record(signature(list(self._layers.values())), None)

    def _record(self, now: Signature | None, kept: list[bool] | None) -> None:
        """:meth:`record_all` for the weights' signature ``now``, leaving the probes of the
        layers ``kept`` marks (not written since their record) as they are."""
        layers = list(self._layers.values())
        if now is None:
            self._probes = None
            for layer in layers:
                record(layer)
            return
        if self._probes is None or self._probes.built_for != now:
            self._probes = WrittenProbes(layers, self._buffers, now)
            kept = None
        self._probes.record(None if kept is None else [not k for k in kept])

    def check_base(self) -> None:
        """Raises :class:`UsageError` where a targeted weight is no longer what lorahot wrote
        (a base checkpoint loaded after inject): every rewrite starts from the base weights
        copied at inject, so it would silently throw the checkpoint away. Where they are, the
        weights' :func:`signature` it compared becomes the next :meth:`apply`'s: a runtime call
        checks once it has read every argument of the caller's, and runs nothing of the
        caller's between this and its rewrite (see ``LoraRuntime._check_usable``)."""
        names, layers = list(self._layers), list(self._layers.values())
        self._checked = None
        self._check_stored(names, layers)
        now, flags = signature(layers), None
        if self._probes is not None and self._probes.built_for == now:
            flags = self._probes.changed()
        if flags is None:  # some weight is not the tensor the probes were laid out for
            self._check_converted(names, layers)
        changed = [n for n, flag in zip(names, replaced(layers) if flags is None else flags, strict=True) if flag]
        if changed:
            raise UsageError(
                lines(
                    format_problems(
                        "in merged mode, targeted weights or biases changed since lorahot last wrote them "
                        "(load_state_dict or a checkpoint load after inject?):",
                        changed,
                    ),
                    "Every merged weight is rebuilt from the base weights copied at inject, so this call would throw "
                    "the new weights away. Load base checkpoints before inject, or eject (which keeps the new "
                    "weights), load, and inject again.",
                )
            )
        self._checked = (now,)

    def _check_stored(self, names: list[str], layers: list[LoRALayer]) -> None:
        """Raises :class:`UsageError` where a targeted base layer no longer stores, as the
        parameter (or bias buffer) it had at inject, the weight or bias its forward reads: a
        parametrization, ``weight_norm``, ``spectral_norm`` or pruning applied after inject
        computes it from other tensors on each call, so a rewrite of the stored one would reach
        nothing, and the forward would go on with the adapter and scale of before, silently.
        Identity only: one dictionary lookup per tensor."""
        found = []
        for name, layer, stored in zip(names, layers, self._stored, strict=True):
            base = layer._base  # the base layer, as a plain attribute (see LoRALayer.__init__)
            now = _stored_tensors(base)
            if layer.base_put_back and not reparametrized(layer):
                found.append(
                    f"{name}: a parametrization, weight_norm, spectral_norm or pruning was applied to its base layer "
                    "after inject and removed since: its weight holds the merged weight reparametrized"
                )
                continue
            for kind, was, held in zip(("weight", "bias"), stored, now, strict=True):
                if held is not was:
                    how = (
                        _computed(base, kind, base.__dict__.get(kind))[0]
                        if held is None
                        else "another tensor than the one it stored at inject (put in _parameters directly?)"
                    )
                    found.append(f"{name}: its {kind} is {how}")
                    break
        if found:
            raise UsageError(
                lines(
                    format_problems(
                        "in merged mode, targeted base layers no longer store the weight or bias lorahot rewrites "
                        "(a parametrization, weight_norm, spectral_norm or pruning applied after inject?):",
                        found,
                    ),
                    "A rewrite would not reach what their forward reads, which would keep the adapter and scale of "
                    "before. Remove the reparametrization (torch.nn.utils.parametrize.remove_parametrizations, "
                    "remove_weight_norm, remove_spectral_norm, prune.remove) and call runtime.eject(), which puts "
                    "the base weights of inject back; then apply it, and inject again without merged=True.",
                )
            )

    @staticmethod
    def _check_converted(names: list[str], layers: list[LoRALayer]) -> None:
        """Raises :class:`UsageError` where a targeted weight's dtype, device or shape is no
        longer its base copy's: the base layer alone was converted or moved after inject
        (``model.half()`` converts the copies too, and the runtime then refuses as moved). The
        rewrite would fail partway, at that layer, after writing the ones before it."""
        found = []
        for name, layer in zip(names, layers, strict=True):
            weight, pristine = layer.base_weight, layer.pristine_weight
            if pristine is None:
                continue
            if (weight.dtype, weight.device, weight.shape) != (pristine.dtype, pristine.device, pristine.shape):
                found.append(
                    f"{name}: {tuple(weight.shape)} {weight.dtype} on {weight.device}, where its base weight was "
                    f"copied at inject as {tuple(pristine.shape)} {pristine.dtype} on {pristine.device}"
                )
        if found:
            raise UsageError(
                lines(
                    format_problems(
                        "in merged mode, targeted base layers were converted or moved after inject:", found
                    ),
                    "Every merged weight is rebuilt from the base weight copied at inject, in its dtype and place. "
                    "Convert or move the model before inject, or eject, convert, and inject again.",
                )
            )

    def check(self, stack: Stack, weights: Sequence[Weight]) -> None:
        """Refuses weights under which a merged weight ``W0 + sum_p w_p * scale_p * dW_p``
        would leave the weights' dtype range (it would turn into inf). Reads no weight for the
        usual adapter: ``max|W0| + sum_p |w_p * scale_p| * bound_p`` (``bound_p``:
        ``r * max|A| * max|B|``, or :func:`~lorahot.adapter.deltas.delta_bound`) bounds every
        entry; only a layer whose bound reaches the limit gets its merged weight computed
        exactly (in float64: :meth:`_merged`).

        Raises:
            AdapterReadError: a part overflows alone at its own scale (weight 1).
            UsageError: it overflows only at the user's weights.
        """
        terms = stack.terms
        where = self._buffers.where  # a weight per layer: each part's on that layer

        def at(name: str) -> list[float]:
            return [weight_in(w, *where[name]) for w in weights]

        over = [name for name, items in terms.items() if self._overflows(stack, name, items, at(name))]
        if not over:
            return
        ones = [1.0] * len(stack.parts)
        for p in range(len(stack.parts)):
            own = [n for n in over if self._overflows(stack, n, [t for t in terms[n] if t[0] == p], ones)]
            if own:
                merged_only = any(isinstance(m, WeightModule) for n in own for q, m in terms[n] if q == p)
                fix = (
                    "re-save it with smaller values (its LyCORIS or diff modules load in merged mode only)"
                    if merged_only
                    else "inject without merged=True, or re-save it"
                )
                raise AdapterReadError(
                    lines(
                        format_problems(f"{stack.named(p)}: merged weights would overflow the model's dtype in:", own),
                        f"The adapter's values are too large for merged mode; {fix}.",
                    )
                )
        shown = f"{weights[0]:g}" if stack.single else "[" + ", ".join(f"{w:g}" for w in weights) + "]"
        raise UsageError(
            lines(
                format_problems(f"scale={shown}: merged weights would overflow the model's dtype in:", over),
                "Pass a smaller scale.",
            )
        )

    def _overflows(
        self,
        stack: Stack,
        name: str,
        items: list[tuple[int, LoraModule | WeightModule]],
        weights: Sequence[float],
    ) -> bool:
        """Whether layer ``name`` merged with ``items`` (``(part, module)``) at ``weights``
        leaves its dtype's range: the bound decides for the usual adapter (NaN or inf: exact)."""
        layer = self._layers[name]
        top = torch.finfo(layer.base_weight.dtype).max
        start = self._pristine_max[name]
        b0 = layer.pristine_bias
        if b0 is not None and b0.numel() and any(isinstance(m, WeightModule) for _, m in items):
            start = max(start, float(b0.abs().max()))  # a diff_b adds to the bias
        bound = start
        for p, m in items:
            size = (
                stack.parts[p].delta_bound.get(name, math.inf)
                if isinstance(m, LoraModule)
                else delta_bound(m, self._pristine_max[name])
            )
            bound += abs(weights[p] * m.scale) * size
        if any(isinstance(m, LoraModule) and m.bias is not None for _, m in items):
            # a LoRA bias folds into the bias beside every diff_b: b0 + sum s * c + sum s * diff_b
            biases = [
                (m.bias if isinstance(m, LoraModule) else m.factors.get("diff_b"), weights[p] * m.scale)
                for p, m in items
            ]
            folded = float(b0.abs().max()) if b0 is not None and b0.numel() else 0.0
            bound = max(
                bound, folded + sum(abs(s) * float(c.abs().max()) for c, s in biases if c is not None and c.numel())
            )
        # the buffers hold A and B rounded to their dtype: a product of rounded factors can
        # exceed the file's by a few of its ulps, which the margin covers. DoRA rescales each
        # output channel to its magnitude (any size): no bound, the merged weight itself
        dora = any(m.magnitude is not None if isinstance(m, LoraModule) else m.decomposes for _, m in items)
        rounded = self._buffer_dtype(name)
        if not dora and bound * (1.0 + 8.0 * torch.finfo(rounded).eps) < top:
            return False
        merged = self._merged(layer, [(m, weights[p] * m.scale) for p, m in items], rounded)
        return any(not bool(t.abs().max() <= top) for t in merged if t.numel())  # NaN/inf compare False

    def _buffer_dtype(self, name: str) -> torch.dtype:
        """The dtype of the arena that holds layer ``name``'s A and B."""
        arena, _ = self._buffers.where[name]
        return self._buffers.arenas[arena].A.dtype

    def _merged(
        self, layer: LoRALayer, items: list[tuple[LoraModule | WeightModule, float]], rounded: torch.dtype
    ) -> list[torch.Tensor]:
        """``[W0 + sum s * dW]`` (the base weight flattened to 2-D), and ``b0 + sum s * diff_b``
        where a ``diff_b`` is among them (``b0 + sum s * c`` where a LoRA bias ``c`` is), computed
        in float64 on the weights' device from A and B rounded to ``rounded`` (the buffers'
        dtype, as :meth:`apply` reads them): only a layer whose bound reaches its dtype's limit
        comes here, and there an unscaled ``B @ A`` may leave float32's range where the merged
        weight does not (terms of 1e40 that cancel, at a scale of 0.5)."""
        pristine = layer.pristine_weight
        assert pristine is not None  # set in __init__
        dtype = torch.float64
        device = pristine.device
        with torch.no_grad():
            weight = _flat(pristine).to(dtype)
            bias = None
            for m, s in items:
                if isinstance(m, LoraModule):
                    a2 = m.A.flatten(1).to(device, rounded).to(dtype)  # [r, in_dim]
                    bt2 = m.B.flatten(1).t().to(device, rounded).to(dtype)  # [r, out_dim]
                    m1, m2 = layer.merge_operands(a2, bt2)
                    weight = weight + s * (m1 @ m2)
                    f = None
                    if m.magnitude is not None:  # DoRA (alone on its layer): m / (||W0 + s B A|| + eps) per channel
                        f = m.magnitude.to(device, dtype).reshape(-1) / (layer.dora_norm(weight) + m.norm_eps(dtype))
                        weight = _per_channel(layer, weight, f)
                    b0 = layer.pristine_bias
                    if m.bias is not None and b0 is not None:
                        c = s * m.bias.to(device, dtype).reshape(-1)
                        bias = (b0.to(dtype) if bias is None else bias) + (c if f is None else f * c)
                    continue
                weight = _folded(layer, weight, m, s)  # a dora_scale: alone on its layer
                db, b0 = m.factors.get("diff_b"), layer.pristine_bias
                if db is not None and b0 is not None:
                    bias = (b0.to(dtype) if bias is None else bias) + s * db.to(device, dtype)
        return [weight] if bias is None else [weight, bias]

    def apply(
        self,
        scales: list[torch.Tensor] | None,
        uniform: bool = True,
        terms: dict[str, list[tuple[WeightModule, float]]] | None = None,
        bounds: Mapping[str, float] | None = None,
    ) -> None:
        """Sets every weight to ``W0 + B diag(s) A`` from the live region, plus ``s * ΔW`` of
        each weight-kind module in ``terms`` on its layer, then notes every weight as written
        (:func:`record`). The weights' :func:`signature` is the one :meth:`check_base` found
        just before, where it ran since the last rewrite (one walk over every layer's weight and
        bias a call, not two), else taken now.

        Args:
            scales: per arena, float64 ``[n_layers, R]`` host tensors of the live per-row
                scales (the user's included); None means no adapter.
            uniform: every row of a layer has the same scale (one adapter): one multiply-add
                ``W0 + s * B @ A``. Otherwise (a stack) each row of A is first scaled by its
                own scale, read from the live region on the device.
            terms: injected layer name -> each LyCORIS/diff module folded into it and its scale
                (the module's own times its part's weight, :meth:`Stack.weight_terms`). Such a
                layer is computed whole in at least float32 (:meth:`_fold`) and rounded once.
            bounds: injected layer name -> a bound on every partial sum of the one adapter's
                unscaled ``B @ A`` (its load plan's ``factor_bound``). A layer whose bound leaves
                the range of the one GEMM's dtype is computed in float64 instead, the scale
                folded into ``A`` first: with ``s`` as the GEMM's alpha, a BLAS that forms the
                product before scaling it would write inf or NaN (A and B of 1e22 at a scale of
                1e-30). None: no layer's is known to (a stack folds its scales into ``A``).
        """
        plan = self._plan(scales, uniform, terms or {}, bounds or {})
        checked, self._checked = self._checked, None
        now = signature(list(self._layers.values())) if checked is None else checked[0]
        written = (self._inputs(plan, scales, uniform), self._held(now), [r.terms for r in plan])
        kept = self._kept(written)
        self._written = None  # until this rewrite is whole
        if kept is None or not all(kept):
            if uniform and self._replayed(plan, now):  # every layer, in one graph
                kept = None
            else:
                self._write(plan, uniform, kept)
            if terms:
                self._fold(plan, uniform, kept)
        self._record(now, kept)  # what this wrote, for check_base
        self._written = written

    def _inputs(self, plan: list[_Rewrite], scales: list[torch.Tensor] | None, uniform: bool) -> list[object]:
        """Per layer, what :meth:`_write` or :meth:`_fold` computes its weight and bias from
        under ``plan``, beside the pristine copies: nothing else (:data:`_PRISTINE`: the copies
        alone), or the arena's live :attr:`~lorahot.runtime.buffers.Arena.generation` (its A, B
        and extras as written), the rows read, whether the extras are, the mode (``uniform``),
        the layer's per-row scales (as bytes: ``-0.0`` is not ``0.0``; DoRA's factor follows
        from them and the generation) and its weight-kind modules (by id) and their scales.
        Two rewrites with equal inputs write the same bits."""
        live = self._buffers.live
        generations = [arena.generation[live] for arena in self._buffers.arenas]
        rows_of = None if scales is None else [s.numpy() for s in scales]
        found: list[object] = []
        for (_, _, _, arena_idx, index), rewrite in zip(self._items, plan, strict=True):
            _, nonzero, rows, extras, terms, _ = rewrite
            if (not nonzero or rows == 0) and extras is None and terms is None:
                found.append(_PRISTINE)
                continue
            found.append(
                (
                    generations[arena_idx],
                    rows,
                    extras is not None,
                    uniform,
                    None if rows_of is None else rows_of[arena_idx][index].tobytes(),
                    None if terms is None else tuple((id(m), float(w).hex()) for m, w in terms),
                )
            )
        return found

    def _held(self, now: Signature | None) -> tuple[object, ...]:
        """What the weights and the arenas are (the weights' :func:`signature` ``now``, each
        arena's tensors): a rewrite's inputs (:meth:`_inputs`) name the same values only while
        these stay."""
        arenas = tuple(
            (a.A.data_ptr(), a.B.data_ptr(), a.S.data_ptr(), a.E.data_ptr(), a.A.dtype) for a in self._buffers.arenas
        )
        return now, arenas

    def _kept(self, written: _Written) -> list[bool] | None:
        """Per layer, whether its weight and bias already hold what a rewrite from the inputs
        ``written`` would write: the last whole rewrite had the same inputs, and the weight was
        not written since (its version counter, a base checkpoint's load); the call's check of
        the base weights (:meth:`check_base`) found the rest as written. None where nothing is
        known (every layer is written)."""
        last = self._written
        inputs, held, _ = written
        if last is None or held[0] is None or last[1] != held:
            return None
        kept = []
        for (layer, weight, _, _, _), now, then in zip(self._items, inputs, last[0], strict=True):
            noted = layer.written_probe
            kept.append(
                now == then
                and noted is not None
                and not layer.checkpoint_loaded
                and (noted[4] is None or noted[4] == version(weight))
            )
        return kept

    def _plan(
        self,
        scales: list[torch.Tensor] | None,
        uniform: bool,
        terms: dict[str, list[tuple[WeightModule, float]]],
        bounds: Mapping[str, float],
    ) -> list[_Rewrite]:
        """Per layer, what :meth:`apply` writes: its scale (row 0's), whether any row's scale is
        nonzero, the live rows, its extras where they apply (DoRA, a LoRA bias), its
        weight-kind modules (None where it has none) and whether its unscaled product may leave
        the one GEMM's range (``bounds``, see :meth:`apply`)."""
        live = self._buffers.live
        firsts = None if scales is None else [s[:, 0].tolist() for s in scales]  # row 0's scale: the LoRA bias's
        used = None if scales is None else [s.abs().amax(1).tolist() for s in scales] if not uniform else firsts
        plan = []
        for name, (_, _, pristine, arena_idx, index) in zip(self._layers, self._items, strict=True):
            s = 0.0 if firsts is None else float(firsts[arena_idx][index])
            nonzero = used is not None and used[arena_idx][index] != 0.0
            arena = self._buffers.arenas[arena_idx]
            rows = max(arena.a_extent[live], arena.b_extent[live])
            # DoRA's per-channel factor applies at any weight, 0 included (m / |W0| there)
            extras = arena.extras(index, live) if arena.e_dirty[live] and scales is not None else None
            exact = uniform and _leaves_gemm_range(bounds.get(name, 0.0), pristine.dtype)
            plan.append(_Rewrite(s, nonzero, rows, extras, terms.get(name), exact))
        return plan

    def _replayed(self, plan: list[_Rewrite], weights: Signature | None) -> bool:
        """Runs the rewrite of one adapter without extras (``plan``) as a CUDA graph replay,
        captured at the second call with the same weights (addresses, shapes, dtypes), live
        region, scales and rows (``weights``: the weights' :func:`signature`, None where some
        cannot be laid out); False, having written nothing, where no replay applies (the
        caller then writes layer by layer). One launch where the host issued two or three per
        layer: on an H200's host ~40 ms of host time for the SDXL UNet's 700 layers. Layers
        with weight-kind modules are left to :meth:`_fold`, outside the graph."""
        replays = self._replays
        if not replays.applies() or any((r.extras is not None or r.exact) and r.terms is None for r in plan):
            return False
        if all(r.terms is not None for r in plan):  # every layer folds outside: nothing to capture
            return False
        if weights is None or any(entry[4] != replays.device for entry in weights):
            return False
        writes = tuple(
            "folded" if r.terms is not None else (r.s, r.rows) if r.nonzero and r.rows else None for r in plan
        )
        key = (self._buffers.live, weights, writes)
        captured = replays.found(key, self)
        if captured is None:
            if replays.first_use(key):
                return False
            graph = replays.capture(functools.partial(self._write, plan, True), stacklevel=5)
            if graph is None:
                return False
            captured = Captured(graph, weakref.ref(self))
            replays.store(key, captured)
        replays.replay(key, captured)
        return True

    def _write(self, plan: list[_Rewrite], uniform: bool, kept: list[bool] | None = None) -> None:
        """Writes every weight (and bias) as ``plan`` says (see :meth:`apply`), but those of
        layers with weight-kind modules (:meth:`_fold` writes them) and those ``kept`` marks."""
        with writing(self._targets):
            for k, (item, rewrite) in enumerate(zip(self._items, plan, strict=True)):
                layer, weight, pristine, arena_idx, index = item
                s, nonzero, rows, extras, terms, _ = rewrite
                if terms is not None or (kept is not None and kept[k]):
                    continue
                self._fold_bias(layer, extras, s)
                if (not nonzero or rows == 0) and extras is None:
                    weight.copy_(pristine)
                    continue
                # one adapter: one GEMM in the weights' dtype, rounded once
                if uniform and extras is None and not rewrite.exact:
                    a, bt = self._buffers.arenas[arena_idx].rows(index, self._buffers.live)
                    m1, m2 = layer.merge_operands(a[:rows], bt[:rows])
                    # [out, in * prod(kernel)] even where out or in is 0; the pristine copy is kept
                    # contiguous, a view; the weight written through its own where its memory
                    # allows, else (a channels_last conv) the merged weight is copied into it
                    flat_w, flat_p = _flat_view(weight), _flat(pristine)
                    if flat_w is not None:
                        torch.addmm(flat_p, m1, m2, alpha=s, out=flat_w)
                    else:
                        weight.copy_(torch.addmm(flat_p, m1, m2, alpha=s).view(weight.shape))
                    continue
                weight.copy_(self._wide(item, rewrite, uniform).view(weight.shape))

    def _wide(
        self, item: tuple[LoRALayer, torch.Tensor, torch.Tensor, int, int], rewrite: _Rewrite, uniform: bool
    ) -> torch.Tensor:
        """One layer's ``W0 + B diag(s) A`` flattened to ``[out, in * prod(kernel)]``, each output
        channel times its DoRA factor where ``rewrite`` has extras, in at least float32, not yet
        rounded. A stack's per-row scales and DoRA's per-channel factor each may leave float16's
        range on their own (a part's weight of 1e5 times its A, a factor m / |W| of 3e5) where the
        merged weight does not. A layer whose unscaled product may leave float32's range
        (``rewrite.exact``) is computed in float64."""
        layer, _, pristine, arena_idx, index = item
        flat_p = _flat(pristine)
        wide = torch.float64 if rewrite.exact else torch.promote_types(flat_p.dtype, torch.float32)
        merged = flat_p.to(wide)
        if rewrite.nonzero and rewrite.rows:
            arena, live, rows = self._buffers.arenas[arena_idx], self._buffers.live, rewrite.rows
            a, bt = arena.rows(index, live)
            row_scales = arena.scale(index, live)[:rows, None].to(wide) if not uniform else rewrite.s
            m1, m2 = layer.merge_operands(a[:rows].to(wide) * row_scales, bt[:rows].to(wide))
            # The exact path sums the product first, then adds W0, as the float64 reference does:
            # an addmm may start its accumulator at W0, and terms that cancel (1e40 - 1e40) then
            # absorb W0 on the way (an AMD EPYC CPU box gave 0 for W0 + (1e40 - 1e40); earlier boxes W0)
            merged = merged + m1 @ m2 if rewrite.exact else torch.addmm(merged, m1, m2)
        if rewrite.extras is not None:  # DoRA: each output channel times its factor (1 elsewhere)
            merged = _per_channel(layer, merged, rewrite.extras[EXTRA_F].to(wide))
        return merged

    @staticmethod
    def _fold_bias(layer: LoRALayer, extras: torch.Tensor | None, s: float) -> None:
        """Sets the base bias to ``b0 + f * s * c`` (``b0`` alone without extras)."""
        bias = getattr(layer.base_layer, "bias", None)
        if layer.pristine_bias is None or not isinstance(bias, torch.Tensor):
            return
        if extras is None:
            bias.copy_(layer.pristine_bias)
        else:
            folded = layer.pristine_bias.to(extras.dtype) + extras[EXTRA_F] * extras[EXTRA_BIAS] * s
            bias.copy_(folded)

    def _fold(self, plan: list[_Rewrite], uniform: bool, kept: list[bool] | None = None) -> None:
        """Writes each layer with weight-kind modules (``plan``'s terms) whole: the weight
        ``W0 + B diag(s) A`` (:meth:`_wide`) plus each module's ``s * ΔW`` (built on the weights'
        device from the factors, a module with a ``dora_scale`` then rescaling the sum; a ``fuse=``
        module part by part on its rows: :func:`~lorahot.adapter.deltas.fold_delta`), and the
        bias ``b0 + f * s * c`` plus each ``s * diff_b``, all in at least float32, each rounded
        once to its dtype; but those ``kept`` marks."""
        with writing(self._targets):
            for k, (item, rewrite) in enumerate(zip(self._items, plan, strict=True)):
                if rewrite.terms is None or (kept is not None and kept[k]):
                    continue
                layer, weight = item[0], item[1]
                folded = self._wide(item, rewrite, uniform)
                b0, bias = layer.pristine_bias, layer.base_bias
                folded_bias = None
                if b0 is not None:
                    folded_bias = b0.to(torch.promote_types(b0.dtype, torch.float32))
                    if rewrite.extras is not None:  # a LoRA bias, times DoRA's factor
                        extras = rewrite.extras.to(folded_bias.dtype)
                        folded_bias = folded_bias + extras[EXTRA_F] * extras[EXTRA_BIAS] * rewrite.s
                for module, s in rewrite.terms:
                    if not _bias_only(module):
                        folded = _folded(layer, folded, module, s)  # a dora_scale: alone on its layer
                    db = module.factors.get("diff_b")
                    if db is not None and folded_bias is not None:
                        folded_bias = folded_bias + s * db.to(folded_bias.device, folded_bias.dtype)
                weight.copy_(folded.reshape(weight.shape))
                if folded_bias is not None and bias is not None:
                    bias.copy_(folded_bias)
