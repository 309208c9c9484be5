"""Which modules of a model take LoRA, and wrapping or unwrapping them in place.

:func:`match_targets` turns ``inject``'s ``targets`` into module names; :func:`wrap_modules`
and :func:`unwrap_modules` swap each module for its LoRA layer and back; :func:`layer_placement`
says where a layer's buffers live. :mod:`lorahot.runtime.inject` drives them.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from lorahot.errors import UsageError, shown
from lorahot.layers import SUPPORTED, LoRALayer, layer_class_for
from lorahot.layers.linear import is_conv1d, returns_other_than_rows
from lorahot.layers.norm import is_weightless_norm
from lorahot.resolve.file_names import is_compile_wrapper, wrapper_level, wrapper_levels
from lorahot.resolve.keys import outside
from lorahot.runtime.arguments import text
from lorahot.runtime.fused_projections import FUSED_PROJECTIONS
from lorahot.runtime.merge import replaced, restores, writing
from lorahot.runtime.plan import WEIGHT_DTYPES
from lorahot.runtime.weight_reads import Sources, direct_read

__all__ = [
    "Targets",
    "ExactNames",
    "match_targets",
    "wrap_modules",
    "lazy_refusal",
    "refuse_lazy",
    "unwrap_modules",
    "layer_placement",
    "through_wrappers",
    "submodule_at",
    "fsdp_owner_on_path",
    "fsdp_owners",
    "fsdp_refusal",
    "flattened_on_path",
    "unwrappable",
    "beside_layers",
]

#: What ``inject`` accepts as targets: names (PEFT ``target_modules`` semantics), a regex
#: (full match on the qualified name), ``"all-linear"``, or ``(name, module) -> bool``.
Targets = Sequence[str] | str | Callable[[str, nn.Module], bool]


class ExactNames(list[str]):
    """Module names that ``inject`` matches exactly, each against the whole qualified name: a
    plain list matches as PEFT's ``target_modules`` does (a name, or any name ending in
    ``"." + entry``), so a top-level ``proj_out`` would also wrap every block's ``proj_out``.
    :func:`lorahot.plan_targets` gives its targets in this form when it plans against a model.
    Otherwise a list: equal to, and used as, the list of its names."""

    __slots__ = ()


#: torch's FSDP module classes, (module, class name): FSDP2's ``fully_shard`` makes a module an
#: instance of ``FSDPModule`` (``torch.distributed._composable.fsdp`` before torch 2.6), FSDP1
#: wraps it in ``FullyShardedDataParallel``; looked up where the user's code imported them
#: (lorahot never imports ``torch.distributed``: no FSDP module exists until the user's has)
_FSDP_CLASSES = (
    ("torch.distributed.fsdp", "FSDPModule"),
    ("torch.distributed.fsdp", "FullyShardedDataParallel"),
    ("torch.distributed._composable.fsdp", "FSDPModule"),
)


def fsdp_owners(modules: Mapping[str, nn.Module]) -> list[str]:
    """The names in ``modules`` (a model's ``named_modules()``) of the modules FSDP manages:
    every parameter under one is sharded across ranks between calls and gathered for each call
    (a DTensor or a flat shard at rest, a plain tensor while it computes)."""
    classes = _fsdp_classes()
    return [n for n, m in modules.items() if isinstance(m, classes)] if classes else []


def fsdp_owner_on_path(model: nn.Module, name: str) -> str | None:
    """The innermost module FSDP manages (:func:`fsdp_owners`) among ``model`` (``""``), the
    modules on the path to ``name`` and ``name`` itself, or None: what :func:`fsdp_refusal`
    finds in the whole model's owners, looked up along one path (a depth's worth of
    ``isinstance`` calls, not a walk of every module: a load checks each of its layers)."""
    classes = _fsdp_classes()
    if not classes:
        return None
    owner: str | None = None
    module: nn.Module | None = model
    parts = name.split(".") if name else []
    for depth in range(len(parts) + 1):
        if module is None:
            break
        if isinstance(module, classes):
            owner = ".".join(parts[:depth])
        if depth < len(parts):
            module = submodule_at(module, parts[depth])
    return owner


def _fsdp_classes() -> tuple[type, ...]:
    """The FSDP module classes of :data:`_FSDP_CLASSES` that the user's code has imported."""
    found = (getattr(sys.modules.get(module), name, None) for module, name in _FSDP_CLASSES)
    return tuple(c for c in found if isinstance(c, type))


def fsdp_refusal(name: str, owners: Collection[str]) -> str | None:
    """Why module ``name`` cannot take LoRA when ``owners`` (:func:`fsdp_owners`) manage
    parameters, or None where none of them is on its path (looked up along it: a set of
    owners costs a lookup per level)."""
    on_path = [w for w in (*_heads(name), name) if w in owners]
    if not on_path:
        return None
    owner = max(on_path, key=len)  # the innermost: the one that shards this module's parameters
    where = "" if owner == name else f" on {owner or 'the model'}"
    return (
        f"{name}: its parameters are sharded by FSDP (fully_shard or FullyShardedDataParallel{where}), which "
        "gathers them for each call and shards them again after it, so the weight lorahot would wrap is not the one "
        "the layer computes with (a DTensor would be taken for a tensor-parallel weight, and the LoRA computed on the "
        "wrong rows). lorahot serves models whose ranks each hold the whole weights, or tensor-parallel ones "
        "(parallelize_module with ColwiseParallel / RowwiseParallel): inject into the model without fully_shard or "
        "FullyShardedDataParallel (or tensor-parallel instead), or exclude this module from targets."
    )


def flattened_on_path(model: nn.Module, name: str) -> str | None:
    """Where FSDP1 (``FullyShardedDataParallel``, applied after inject) took over the parameters
    of LoRA layer ``name`` in ``model``: ``name``, or the module above it (``""``: ``model``)
    that holds the flat parameter; None where it did not. FSDP1 marks every tensor it
    flattens, and the flat parameter itself, with ``_fsdp_flattened``: the flat parameter
    sits on the module it wraps (with ``use_orig_params=False`` its original parameters
    leave their modules), the original parameters stay in their modules marked (with
    ``use_orig_params=True``). Checks the modules from ``model`` down to the layer's base."""
    module: nn.Module | None = model
    parts = name.split(".") if name else []
    for depth in range(len(parts) + 2):  # model, each module on the path, the layer, its base
        if module is None:
            return None
        if any(getattr(p, "_fsdp_flattened", False) for p in module._parameters.values() if p is not None):
            return ".".join(parts[:depth]) if depth <= len(parts) else name
        if depth < len(parts):
            module = submodule_at(module, parts[depth])
        else:
            module = getattr(module, "base_layer", None) if isinstance(module, LoRALayer) else None
    return None


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _all_linear_leaves_out(modules: dict[str, nn.Module]) -> set[str]:
    """The linears ``"all-linear"`` leaves out besides the output layer: those whose parent
    computes with their weight without calling them or is a compiled wrapper made of them before
    inject (a LoRA there would never apply), and
    ``nn.Linear`` subclasses whose forward does not return their output (a router's tuple),
    which inject would refuse."""
    found = Sources()
    return {
        n
        for n, m in modules.items()
        if n
        and _is_plain_linear(m)
        and (
            _bypassed(modules, n) is not None
            or _compiled_by(modules, n) is not None
            or _never_called(modules, n, found)
            or returns_other_than_rows(m)
        )
    }


def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the model's output projection, which ``"all-linear"`` leaves alone, as PEFT
    does: the module ``get_output_embeddings()`` returns where the model has that method (none
    where it returns None: a CTC or classification head named ``lm_head`` is an ordinary
    target, as in PEFT's adapters for transformers' ``Wav2Vec2ForCTC``), else any module named
    ``lm_head``."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}
    try:
        head = getter()
    except Exception:  # models without an output head may raise
        head = None
    return {n for n, m in model.named_modules() if head is not None and m is head}


#: Modules that read some of their children's weights directly instead of calling them, so a
#: LoRA wrapped around such a child would never run: ``nn.MultiheadAttention`` passes
#: ``out_proj.weight`` to ``F.multi_head_attention_forward``, and ``nn.TransformerEncoderLayer``'s
#: inference fast path (``torch._transformer_encoder_layer_fwd``) reads ``linear1`` and ``linear2``.
_READ_DIRECTLY: tuple[type[nn.Module], ...] = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _bypassed(modules: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The parent of module ``name`` if it computes with that module's weight without calling
    it (:data:`_READ_DIRECTLY`), or with a fused copy of it (:func:`_fused_away`), else None."""
    parent_name, _, child = name.rpartition(".")
    parent = modules.get(parent_name)
    return parent if isinstance(parent, _READ_DIRECTLY) or _fused_away(parent, child) else None


def _compiled_by(modules: Mapping[str, nn.Module], name: str) -> str | None:
    """The path of the ``torch.compile`` wrapper (``OptimizedModule``) that module ``name`` is the
    ``_orig_mod`` of, made before inject, else None. Such a wrapper's forward was bound to the
    module it was made of when it was made (``torch._dynamo.eval_frame.OptimizedModule._initialize``):
    a module put in its place under ``_orig_mod`` is never called, where a wrapper made after
    inject calls the LoRA layer (:func:`through_wrappers`)."""
    parent_name, _, child = name.rpartition(".")
    if child != "_orig_mod" or not is_compile_wrapper(modules.get(parent_name)):
        return None
    return parent_name


def _compiled_alone(where: str, name: str) -> str:
    """Why inject refuses module ``name``, the module of the ``torch.compile`` wrapper at ``where``
    (:func:`_compiled_by`), with the fix."""
    if not where:  # the model given to inject is the wrapper, made of one layer
        return (
            "it is the layer torch.compile(...) was made of, and the OptimizedModule given to inject calls that "
            "layer, not one put in its place, so a LoRA there would never apply. Put the layer in a container "
            "(nn.Sequential(layer)), inject into that and target '0', then compile it"
        )
    return (
        f"it is the module that model.{where} = torch.compile(...) was made of before inject, and that OptimizedModule "
        "calls the module it was made of, not one put in its place, so a LoRA there would never apply. Inject first "
        f"and compile after (model.{where} = torch.compile(model.{where}) after inject compiles its LoRA layers), or "
        "compile the whole model"
    )


def _unwrappable_why(modules: dict[str, nn.Module], name: str, found: Sources) -> str | None:
    """Why inject refuses module ``name`` as a target, its weight being read without a call to it
    (:func:`_bypassed`, :func:`_never_called`) or it being what a compiled wrapper made before
    inject holds and never calls (:func:`_compiled_by`), so that no LoRA layer there would ever
    apply; None where it is not."""
    where = _compiled_by(modules, name)
    if where is not None:
        return _compiled_alone(where, name)
    parent = _bypassed(modules, name)
    if parent is not None:
        fused = (
            " (its projections are fused: call unfuse_qkv_projections() first)"
            if _fused_away(parent, name.rpartition(".")[2])
            else ""
        )
        return (
            f"its parent {type(parent).__name__} computes with its weight directly (in its own functional or fused "
            f"path) instead of calling it, so a LoRA there would never apply{fused}"
        )
    read = _never_called(modules, name, found)
    if read:
        return (
            f"{read} and nothing on its path calls it, so a LoRA there would never apply (PEFT's would not either), "
            "and merged mode would fold it into that computation"
        )
    return None


def unwrappable(modules: Mapping[str, nn.Module], layers: Collection[str]) -> tuple[tuple[str, str], ...]:
    """The linears of a model (``modules``: its ``dict(named_modules())``, the linears as
    ``"all-linear"`` takes them) whose weight the model reads without calling them, so that inject
    refuses them as targets (``nn.MultiheadAttention``'s ``out_proj``, ``nn.TransformerEncoderLayer``'s
    ``linear1``), each with why; the injected ``layers`` and what lies inside them left out. A
    file's module that names one of them is refused at load with that reason
    (:func:`lorahot.resolve.keys.resolve_all`), not with a hint to inject it."""
    found = Sources()
    named = dict(modules)
    out = []
    for n, m in named.items():
        if not n or not _is_plain_linear(m) or n in layers or any(w in layers for w in _heads(n)):
            continue
        why = _unwrappable_why(named, n, found)
        if why is not None:
            out.append((n, why))
    return tuple(out)


def beside_layers(
    modules: Sequence[tuple[str, nn.Module]],
    layers: Collection[str],
    read: Sequence[tuple[str, str]] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, str], ...]]:
    """What a file's keys are resolved against besides the ``layers`` of a model (``modules``: its
    ``named_modules()``), as :func:`lorahot.resolve.keys.resolve_all` takes them: its other module
    paths (``others``, its norms without a weight left out), those norms (``weightless``), and its
    linears read without a call, each with why (``unwrapped``, :func:`unwrappable`). A runtime's
    load and :func:`lorahot.plan_targets` with a model both resolve against these, so a key gets
    the same verdict and text from either. ``read``: :func:`unwrappable` of the whole model (no
    layers), where the caller has it; those inside ``layers`` are left out as there."""
    paths = [name for name, module in modules if not is_weightless_norm(module)]
    others = outside(paths, list(layers))
    weightless = tuple(name for name, module in modules if is_weightless_norm(module))
    if read is None:
        unwrapped = unwrappable(dict(modules), layers)
    else:
        kept = set(outside([n for n, _ in read], list(layers)))
        unwrapped = tuple((n, why) for n, why in read if n in kept)
    return others, weightless, unwrapped


def _never_called(modules: dict[str, nn.Module], name: str, found: Sources) -> str | None:
    """Where module ``name``'s weight is read as a value by a module on its path that never
    calls it (:mod:`lorahot.runtime.weight_reads`), else None."""
    read = direct_read(modules, name, found)
    return read[0] if read is not None and not read[1] else None


def _fused_away(parent: nn.Module | None, child: str) -> bool:
    """Whether ``parent`` is a diffusers attention module whose QKV projections are fused
    (``fuse_qkv_projections()``: its ``fused_projections`` set, which its ``unfuse_projections``
    clears) and ``child`` one of those it copied into the fused one and no longer calls."""
    return (
        child in FUSED_PROJECTIONS
        and callable(getattr(type(parent), "unfuse_projections", None))
        and getattr(parent, "fused_projections", False) is True
    )


def _matcher(model: nn.Module, targets: Targets) -> Callable[[str, nn.Module], bool]:
    if callable(targets):
        return _guarded(targets)
    if isinstance(targets, str):
        if targets == "all-linear":  # no output layer, nothing it could not wrap faithfully
            modules = dict(model.named_modules())
            skip = _output_layer_names(model) | _all_linear_leaves_out(modules)
            return lambda name, m: _is_plain_linear(m) and name not in skip
        try:
            pattern = re.compile(targets)
        except (re.error, RecursionError, OverflowError) as exc:
            raise UsageError(f"targets={shown(targets, 200)} is not a valid regex ({exc}).") from None
        return lambda name, m: pattern.fullmatch(name) is not None
    entries = set(_entries(targets))
    if isinstance(targets, ExactNames):
        return lambda name, m: name in entries
    # ``name == e or name.endswith("." + e)`` for some entry: the name, or its part after one of its
    # dots, is an entry (a set lookup per dot, not a comparison per entry)
    return lambda name, m: name in entries or any(tail in entries for tail in _tails(name))


def _tails(name: str) -> Iterator[str]:
    """Each part of ``name`` after one of its dots (``a.b.c``: ``b.c``, ``c``)."""
    at = name.find(".")
    while at >= 0:
        yield name[at + 1 :]
        at = name.find(".", at + 1)


def _heads(name: str) -> Iterator[str]:
    """Each module path above ``name`` in its model: the root ``""``, then each part before
    one of its dots (``a.b.c``: ``""``, ``a``, ``a.b``); ``w`` is one exactly where
    ``not w or name.startswith(w + ".")``."""
    yield ""
    at = name.find(".")
    while at >= 0:
        yield name[:at]
        at = name.find(".", at + 1)


def _first_on_path(name: str, ordered: Mapping[str, int]) -> str | None:
    """The first of ``ordered`` (path -> its place in the model's order) that is ``name`` or
    above it (:func:`_heads`), or None."""
    found = [w for w in (*_heads(name), name) if w in ordered]
    return min(found, key=ordered.__getitem__) if found else None


def _entries(targets: object) -> list[str]:
    """The module names of a list-like ``targets``, or a :class:`UsageError`."""
    entries: list[object] = []
    if isinstance(targets, Iterable) and not isinstance(targets, (bytes, bytearray, torch.Tensor)):
        try:
            entries = list(targets)
        except Exception:  # a user iterable that cannot be iterated
            entries = []
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise UsageError(
            f"targets must be a non-empty list of module names, a regex, 'all-linear' or a callable; got "
            f"{shown(targets, 200)}."
        )
    return [text(e) for e in entries]


def _guarded(match: Callable[[str, nn.Module], object]) -> Callable[[str, nn.Module], bool]:
    """A user's ``(name, module) -> bool``, whose exceptions become a :class:`UsageError`."""

    def call(name: str, module: nn.Module) -> bool:
        try:
            return bool(match(name, module))
        except Exception as exc:
            raise UsageError(
                f"targets callable raised {type(exc).__name__} on module {shown(name, 200)} "
                f"({type(module).__name__}): {exc}. "
                "Fix the callable so it returns True or False for every module."
            ) from None

    return call


def _no_match_fix(targets: Targets, modules: dict[str, nn.Module]) -> str:
    """What to pass instead of ``targets``, which matched no module: a string is one regex over
    whole names, so a bare module name (``"q_proj"``) matches none of a model's nested ones."""
    if not isinstance(targets, str) or targets == "all-linear":
        return ""
    named = [n for n in modules if n.endswith("." + targets)]
    if named:
        shown_names = ", ".join(named[:3]) + (", ..." if len(named) > 3 else "")
        return (
            f" A string is one regex matched against each whole qualified name; to wrap the {len(named)} module(s) "
            f"named {shown(targets, 200)} ({shown_names}), pass a list: targets=[{shown(targets, 200)}]."
        )
    return (
        " A string is one regex matched against each whole qualified name (r'.*\\.q_proj' for every name ending "
        "in '.q_proj'); a list of names matches a qualified name or its last dotted components."
    )


def match_targets(model: nn.Module, targets: Targets) -> list[str]:
    """Qualified names of the modules ``targets`` selects, in model order.

    Raises:
        ValueError: nothing matches (the message lists some module names).
        TypeError: a matched module is of a type lorahot cannot wrap, or already wrapped.
        UsageError: a match lies inside another match.
    """
    targets = text(targets)  # a str of a subclass compares as a plain one
    match = _matcher(model, targets)
    names = [n for n, m in model.named_modules() if n and match(n, m)]
    modules = dict(model.named_modules())
    if not names and not any(modules) and layer_class_for(model) is not None:  # one layer, no submodules
        raise UsageError(
            f"targets={shown(targets, 200)} matched no module: the model is a single {type(model).__name__} with no "
            "submodules, and lorahot wraps a model's submodules (it replaces each one in its parent). Put it in a "
            "container first, as nn.Sequential(layer), and target '0'."
        )
    if not names:
        sample = [n for n in modules if n][:12]
        skipped = _all_linear_leaves_out(modules)
        left = [n for n in modules if n in skipped]
        why = (
            f" ('all-linear' leaves out {', '.join(left[:3])}{', ...' if len(left) > 3 else ''}: their parents compute "
            "with their weights directly instead of calling them or are torch.compile wrappers made of them before "
            "inject, so a LoRA there would never apply, or their forward does not return their output)"
            if targets == "all-linear" and left
            else ""
        )
        raise UsageError(
            f"targets={shown(targets, 200)} matched no module{why}. Some module names: {', '.join(sample)}."
            + _no_match_fix(targets, modules)
        )
    # each by its place in model order: a name's first one on its path is found along that path
    wrapped = {w: i for i, (w, m) in enumerate(modules.items()) if isinstance(m, LoRALayer)}
    found = Sources()
    scripted = {w: i for i, (w, m) in enumerate(modules.items()) if isinstance(m, torch.jit.ScriptModule)}
    sharded = set(fsdp_owners(modules))
    for n in names:
        m = modules[n]
        # its base_layer too, and anything inside a model that is itself a LoRA layer ("")
        owner = _first_on_path(n, wrapped)
        if owner is not None:
            where = owner or "the model given to inject"
            raise UsageError(
                f"{where}: already a {type(modules[owner]).__name__}; call lorahot.eject(model) before injecting again."
            )
        script = _first_on_path(n, scripted)
        if script is not None:
            within = "" if script == n else f" (inside {script or 'the model'})"
            raise UsageError(
                f"{n}: a TorchScript module{within} (torch.jit.script or trace): its calls run compiled TorchScript, "
                "which lorahot cannot wrap or hook. Inject into the eager module, then script or compile the model."
            )
        refusal = fsdp_refusal(n, sharded)
        if refusal is not None:
            raise UsageError(refusal)
        if layer_class_for(m) is None:
            inner = through_wrappers(m)
            fix = (
                f"It is torch.compile's wrapper of a {type(inner).__name__}, made before inject: inject first and "
                f"compile after (model.{n} = torch.compile(model.{n}) after inject compiles its LoRA layer)."
                if is_compile_wrapper(m) and inner is not m
                else "Narrow targets to exclude it."
            )
            raise UsageError(
                f"{n}: cannot add LoRA to {type(m).__name__}. Supported: {', '.join(d for d, _, _ in SUPPORTED)}. {fix}"
            )
        unserved = _unwrappable_why(modules, n, found)
        if unserved is not None:
            raise UsageError(f"{n}: {unserved}. Narrow targets to exclude it ('all-linear' leaves it out).")
    order = {n: i for i, n in enumerate(names)}
    # (p, c) with c under p, the first in (p, c) order: each name's selected paths above it
    nested = [(order[p], order[c]) for c in names for p in _heads(c) if p in order]
    if nested:
        p, c = (names[i] for i in min(nested))
        raise UsageError(
            f"targets select both {p} and its submodule {c}; narrow targets so no match lies inside another."
        )
    _check_single_path(model, names, modules)
    return names


def _check_single_path(model: nn.Module, names: list[str], modules: dict[str, nn.Module]) -> None:
    """Refuses a target the model reaches under several names (one module object used twice):
    wrapping replaces it under one name only, and the other would run without LoRA."""
    paths: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(n)
    for n in names:
        others = [p for p in paths.get(id(modules[n]), []) if p != n]
        if others:
            raise UsageError(
                f"{n}: this {type(modules[n]).__name__} is also the model's {others[0]} (one module used under two "
                "names); lorahot would wrap it under one name only and the other would run without the adapter. "
                "Give each use its own module (copy.deepcopy), or exclude it from targets."
            )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = submodule_at(model, parent_name) if parent_name else model
    if parent is None:
        raise UsageError(f"{name}: no module {parent_name!r} in the model to hold it.")
    setattr(parent, child, module)


def through_wrappers(module: nn.Module | None) -> nn.Module | None:
    """``module``, or the module it calls where it is a wrapper made of one
    (:func:`~lorahot.resolve.file_names.wrapper_level`: ``torch.compile``'s ``OptimizedModule``,
    torch's activation checkpointing's ``CheckpointWrapper``, which FSDP's
    ``apply_activation_checkpointing`` puts in place of each block;
    ``model.layers[0] = torch.compile(model.layers[0])`` after inject): calling the wrapper runs it.
    A module of the model's own with a child merely named as a wrapper's level is no wrapper."""
    while module is not None:
        level = wrapper_level(module)
        if level is None:
            return module
        module = module._modules[level]
    return module


def submodule_at(model: nn.Module, name: str) -> nn.Module | None:
    """The module at ``name`` in ``model``, or None if there is none. A wrapper made since on
    the way (:func:`through_wrappers`) is looked through: a name that is not its child is
    looked up in the module it wraps."""
    module: nn.Module | None = model
    for part in name.split(".") if name else []:
        if module is None:
            return None
        child = module._modules.get(part)
        if child is None and through_wrappers(module) is not module:  # a wrapper: its module holds the child
            child = through_wrappers(module)._modules.get(part)  # type: ignore[union-attr]
        module = child
    return module


def lazy_refusal(name: str, base: nn.Module) -> str | None:
    """Why target ``name`` is refused while a lazy module in it (itself or one inside) has not
    been materialized: its weight's shape is unknown, and any use of it raises, until its first
    call; None where every parameter and buffer in it is materialized."""
    if any(
        isinstance(p, (nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer))
        for p in (*base.parameters(), *base.buffers())
    ):
        return (
            f"{name}: {type(base).__name__} has not been materialized yet (its weight's shape is unknown until its "
            "first call); run one forward of the model before inject."
        )
    return None


def refuse_lazy(name: str, base: nn.Module) -> None:
    """Refuses target ``name`` while a lazy module in it has not been materialized
    (:func:`lazy_refusal`).

    Raises:
        UsageError: naming the target and the fix.
    """
    refusal = lazy_refusal(name, base)
    if refusal is not None:
        raise UsageError(refusal)


def wrap_modules(model: nn.Module, names: list[str]) -> dict[str, LoRALayer]:
    """Replaces each named module by its LoRA wrapper; returns the wrappers by name.

    Every wrapper is built (and its base checked) before the first module is replaced, so a
    refusal leaves the model as it was; a failure or interrupt while replacing them puts back
    the modules replaced so far.
    """
    layers = {}
    for name in names:
        base = model.get_submodule(name)
        wrapper = layer_class_for(base)
        if wrapper is None:  # match_targets checked every name; a model changed since
            raise UsageError(f"{name}: cannot add LoRA to {type(base).__name__}.")
        refuse_lazy(name, base)
        try:
            layers[name] = wrapper(base)
        except UsageError as exc:
            raise UsageError(f"{name}: {exc}") from None
    placed: list[str] = []
    try:
        for name, layer in layers.items():
            placed.append(name)  # first: an interrupt at the return of the swap still undoes it
            _set_submodule(model, name, layer)
            layer.attach()
    except BaseException:  # interrupted (Ctrl-C) or failed midway: the model as it was
        for name in placed:
            layers[name].detach()
            if submodule_at(model, name) is layers[name]:
                _set_submodule(model, name, layers[name].base_layer)
        raise
    return layers


def unwrap_modules(model: nn.Module, layers: dict[str, LoRALayer]) -> list[str]:
    """Puts each wrapper's base module back in its place; the inverse of :func:`wrap_modules`.

    A merged-mode layer first gets its pristine base weight back (unless its weight was
    replaced since lorahot last wrote it: a base checkpoint loaded after inject stays; a weight
    put back by the removal of a reparametrization applied since does not), a
    widened one its weight in its own storage (wherever the layer is now).
    A name where ``model`` no longer holds the wrapper (the model was edited since) is left
    alone; returns those names. A wrapper the model holds at other places too (the same
    layer assigned to a second attribute after inject, or moved) gets its base module back at
    each of them: left there, it would go on adding its adapter after eject.
    """
    gone = []
    others = _other_places(model, layers)
    merged = [layer for layer in layers.values() if layer.pristine_weight is not None]
    # a checkpoint loaded since stays; a weight put back by the removal of a reparametrization does not
    kept = {id(layer) for layer, flag in zip(merged, replaced(merged)) if flag and not restores(layer)}
    for name, layer in layers.items():
        if layer.pristine_weight is not None and id(layer) not in kept:
            with writing([layer.base_weight, layer.base_bias]):
                layer.base_weight.copy_(layer.pristine_weight)
                bias = layer.base_bias
                if layer.pristine_bias is not None and bias is not None:
                    bias.copy_(layer.pristine_bias)
        layer.unwiden()
        layer.detach()
        if through_wrappers(submodule_at(model, name)) is layer:  # itself, or a wrapper made of it
            _set_submodule(model, name, layer.base_layer)
        else:
            gone.append(name)
        for place in others.get(id(layer), ()):
            _set_submodule(model, place, layer.base_layer)
    return gone


def _other_places(model: nn.Module, layers: dict[str, LoRALayer]) -> dict[int, list[str]]:
    """Where ``model`` holds each of ``layers`` (or a wrapper made of it) under another name
    than its own, by the layer's id."""
    own = {id(layer): name for name, layer in layers.items()}
    places: dict[int, list[str]] = {}
    modules = list(model.named_modules(remove_duplicate=False))
    levels = wrapper_levels(modules)  # a wrapper's own module: the same place as the wrapper
    for path, module in modules:
        found = through_wrappers(module)
        if id(found) in own and path != own[id(found)] and path not in levels:
            places.setdefault(id(found), []).append(path)
    return places


def layer_placement(layer: LoRALayer, dtype: torch.dtype | None, name: str) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of a layer's LoRA buffers: the base weight's, unless ``dtype``."""
    ref = next((t for t in (*layer.base_layer.parameters(), *layer.base_layer.buffers())), None)
    device = ref.device if ref is not None else torch.device("cpu")
    if device.type == "meta":
        if "_hf_hook" in layer.base_layer.__dict__:  # accelerate's hook offloads it: it onloads them per call
            raise UsageError(
                f"{name}: base weights are offloaded by accelerate's hooks (dispatch_model, cpu_offload, "
                "disk_offload, load_checkpoint_and_dispatch to 'cpu' or 'disk'), on the meta device between calls; "
                "lorahot does not target offloaded layers: place this layer on an execution device in the "
                "device_map, or leave it out of targets."
            )
        raise UsageError(
            f"{name}: base weights are on the meta device (no data); materialize the model (load its weights, or "
            "model.to_empty(device=...)) before inject."
        )
    if dtype is not None:
        return device, dtype
    if ref is None or ref.dtype not in WEIGHT_DTYPES:
        raise UsageError(
            f"{name}: base weights are {None if ref is None else ref.dtype}, not floating point; pass dtype= (e.g. "
            "torch.bfloat16) to inject (LoRA buffers are float16, bfloat16, float32 or float64)."
        )
    return device, ref.dtype
