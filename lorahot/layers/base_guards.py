"""Guards over a wrapped base layer's parameters after inject, and its state-dict keys.

A :class:`~lorahot.layers.base.LoRALayer` computes with the base module it wraps, whose weight
shaped its LoRA buffers (and, merged or wide, holds the adapter or lives in lorahot's own
buffer). What may replace or rewrite that weight from outside is checked here, before it takes
effect: a new parameter registered on the base layer (``tie_weights``, ``resize_token_embeddings``,
``load_state_dict(assign=True)``, a parametrization's removal; :func:`_refuse_replaced_weight`,
a process-wide registration hook), a plain tensor put in its place for one call
(``torch.func.functional_call``: :func:`_put_plain_tensor`), a DTensor where there was none or
the other way round, FSDP1 and accelerate's hooks wrapping the layer after inject. A load of the
base weight or bias is reported to the runtime (:class:`_BaseLoadHook`: DoRA factors depend on
them), and the wrapper saves and loads the base module's state under its original keys
(:func:`_drop_base_prefix`, :func:`_add_base_prefix`, :func:`_report_base_keys`).

:mod:`lorahot.layers.base` imports this module; the hooks that need the layer class import it
when they run.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorahot.errors import UsageError
from lorahot.layers.tensor_handles import TENSORS

if TYPE_CHECKING:
    from lorahot.layers.base import LoRALayer

__all__ = [
    "ARENA_BUFFERS",
    "ArenaBuffers",
    "is_dtensor",
    "refuse_assigned_load_under",
    "unwrapped",
]


#: The names a LoRA layer registers its arena tensors under (non-persistent buffers).
ARENA_BUFFERS = ("_lora_arena_A", "_lora_arena_B", "_lora_arena_S", "_lora_arena_E")


def _drop_base_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """State-dict post hook: ``<prefix>base_layer.k`` is saved as ``<prefix>k``. ``state_dict`` is
    the whole model's so far (torch passes one dict down the modules): the layer's keys are its
    last ones, each starting with ``prefix`` (children save after their parent, every key of a
    module under this layer starts with it), so only those are looked at, from the end, not the
    whole dict once per layer."""
    inner = prefix + "base_layer."
    ours = list(itertools.takewhile(lambda k: k.startswith(prefix), reversed(state_dict)))
    for key in [k for k in reversed(ours) if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_base_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre hook: ``<prefix>k`` is loaded into ``<prefix>base_layer.k``. In merged mode it
    also notes whether the weight or bias about to be loaded differs from what lorahot wrote
    there (:attr:`~lorahot.layers.base.LoRALayer.checkpoint_loaded`): the next rewrite would start from the copies
    taken at inject and throw it away, so the runtime refuses instead, and eject keeps it."""
    from lorahot.layers.base import _ARENA_BUFFERS, WIDE_BUFFER, LoRALayer  # (here: base imports this module)

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
    # under a torch.func transform, either may be its wrapper: the memory it holds (vmap's has the batch)
    new, now = unwrapped(new), unwrapped(now)
    if name == "weight" and layer.is_wide_block(new):
        return True
    return isinstance(now, torch.Tensor) and isinstance(new, torch.Tensor) and _same_memory(new, now)


def unwrapped(t: Any) -> Any:
    """``t`` without the wrappers of the ``torch.func`` transforms it passes through (``grad``'s,
    ``jvp``'s, ``vmap``'s, nested): the tensor that holds its memory, a ``vmap`` batch's with the
    batch dimension; anything else as it is."""
    while isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


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
    the base layer, :meth:`~lorahot.layers.base.LoRALayer.wide_bound`) and refuses it while compiling, where the
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


def _refuse_other_buffer(layer: LoRALayer, name: str, value: object, own: torch.Tensor, index: int) -> None:
    """Refuses ``value`` in place of ``layer``'s LoRA buffer ``name`` (the ``index``-th arena
    tensor it registers, ``own``) unless it is ``own``, of its memory (a detached alias, under a
    ``torch.func`` transform's wrapper) or of the arena it was bound to; ``own`` follows the
    copies a move of the model makes (:meth:`~lorahot.layers.base.LoRALayer._apply`).

    Raises:
        UsageError: naming the layer, the buffer, both shapes and the fix.
    """
    if value is own:
        return
    bound = TENSORS.get(layer._key, ())
    root = bound[index] if index < len(bound) else own
    inner = unwrapped(value)
    if isinstance(inner, torch.Tensor) and (_same_memory(inner, own) or _same_memory(inner, root)):
        return
    given = f"{inner.dtype} {list(inner.shape)}" if isinstance(inner, torch.Tensor) else type(value).__name__
    raise UsageError(
        f"{layer._path or type(layer.base_layer).__name__}: called with another tensor in place of its LoRA "
        f"buffer {name} ({given}, where the layer computes from its own {root.dtype} {list(root.shape)}): "
        "torch.func.functional_call or torch.func.stack_module_state over the model's buffers? The layers compute "
        "with the adapters lorahot loaded into their own buffers, so these values would be ignored (an ensemble of "
        "injected models would compute every member with this model's adapter). The call was refused before it "
        "ran. Leave the _lora_arena_* keys out of the tensors you pass (the model's own are then used), or to "
        "compute several adapters in one call, load them into slots of one runtime and route the rows: "
        "runtime.activate([0, 1, ...])."
    )


def _has_memory(value: object) -> bool:
    """Whether ``value`` is a tensor whose memory can be read (not a fake tensor that
    ``torch.export`` or the compiler swaps in to trace the model), or no tensor at all."""
    inner = unwrapped(value)
    if not isinstance(inner, torch.Tensor):
        return True
    try:
        inner.data_ptr()
    except RuntimeError:  # FakeTensor, FunctionalTensor: no data
        return False
    return True


class ArenaBuffers(dict[str, Any]):
    """A LoRA layer's ``_buffers``, which refuses another tensor put in place of one of its LoRA
    buffers (:data:`ARENA_BUFFERS`) once the layer is bound (:attr:`layer` set): where
    ``torch.func.functional_call`` swaps it in (``_buffers[name] = tensor``), before the model runs.
    The layers compute with the views of their arena, eager or compiled (through
    :data:`~lorahot.layers.tensor_handles.TENSORS`), never with these buffers, so values passed for
    them (``named_buffers()`` with other tensors, ``torch.func.stack_module_state`` of several
    injected models) were ignored: a ``vmap`` ensemble computed every member with the called
    model's adapter, silently. Checked here, the forward pays nothing. Where a refusal interrupts
    its swap, torch puts back what it swapped. Lookups are a dict's: nothing changes for them."""

    def __setitem__(self, key: str, value: Any) -> None:
        ref = self.__dict__.get("layer")  # set at bind (a weak reference: no cycle); absent while a copy fills it
        layer = ref() if ref is not None else None
        if layer is not None and key in ARENA_BUFFERS and not layer.__dict__.get("merged", False):
            seen = layer.__dict__.get("_arena_seen")  # (merged, the weights hold the adapter: no buffer is read)
            if seen is not None and _has_memory(value):  # (torch.export swaps in fake tensors to trace)
                index = ARENA_BUFFERS.index(key)
                _refuse_other_buffer(layer, key, value, seen[index], index)
        super().__setitem__(key, value)

    def __getstate__(self) -> dict[str, Any]:
        """Nothing but the items: a copy (``deepcopy``, unpickled) is armed for its own layer by
        :meth:`~lorahot.layers.base.LoRALayer.__setstate__`."""
        return {}


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
    from lorahot.layers.base import LoRALayer  # (here: base imports this module)

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
    other than the one its LoRA buffers were made for (recorded by :meth:`~lorahot.layers.base.LoRALayer.attach`).
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
    from lorahot.layers.base import LoRALayer  # (here: base imports this module)

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
    :func:`_base_written`), installed by :meth:`~lorahot.layers.base.LoRALayer.attach`. It refers to the layer
    weakly; copied or pickled with the model it refers to none and does nothing (the copy's
    layer has no runtime, and its own load hook covers loads through it)."""

    def __init__(self, layer: LoRALayer | None, *, post: bool = False) -> None:
        self._ref = None if layer is None else weakref.ref(layer)
        self._post = post

    def refers_to(self, layer: LoRALayer) -> bool:
        """Whether this hook is ``layer``'s (what its detach removes)."""
        return self._ref is not None and self._ref() is layer

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


torch.nn.modules.module.register_module_parameter_registration_hook(_refuse_replaced_weight)
