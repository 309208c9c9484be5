"""``plan_targets``: the targets and ``max_rank`` that cover a known set of adapters.

Inject allocates every layer's buffers at ``max_rank`` once; an adapter that touches a layer
inject did not wrap, or has a larger rank, is refused at load. For a set of adapters known up
front, :func:`plan_targets` computes what to inject so that every one of them loads:

    plan = lorahot.plan_targets(["style/", "character.safetensors"], model)
    runtime = lorahot.inject(model, plan.targets, max_rank=plan.max_rank)

It reads headers and configs only (:func:`lorahot.read_adapter` with ``device="meta"``): the
safetensors header gives every A's shape, so the rank; ``adapter_config.json`` and diffusers'
header metadata give ``r`` and ``rank_pattern``, checked against those shapes as a load would.
No tensor data is read. With a model, keys are matched to its layers exactly as ``load`` matches
them, and each module's shapes are checked against the layer it lands on. The model can be
several models, as :func:`lorahot.inject` takes them (a dict of component name -> module, or a
diffusers pipeline): each file's modules are routed to components by their prefixes exactly as
``load`` routes them (:func:`lorahot.resolve.components.resolve_components`), and the plan's
targets are a dict keyed by component:

    plan = lorahot.plan_targets(["sdxl_lora.safetensors", "kohya_unet.safetensors"], model=pipe)
    runtime = lorahot.inject(pipe, plan.targets, max_rank=plan.max_rank)

Adapters meant to be loaded together in one slot (``runtime.load([a, b])``, a stack) each
occupy their own rows of a layer, so with ``stacked=True`` a target's rank is the sum of the
adapters' ranks there instead of the largest.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lorahot.adapter import Adapter, LoraModule, WeightModule
from lorahot.errors import AdapterMismatchError, UsageError, format_problems, lines, message, public_api, shown
from lorahot.formats import ModelNames, format_named
from lorahot.io.loader import read_adapter, reading_for
from lorahot.io.sources import Source
from lorahot.layers import LoRALayer, layer_class_for
from lorahot.resolve.components import DENOISER, ROUTES, non_denoisers, resolve_components
from lorahot.resolve.file_names import wrapper_levels
from lorahot.resolve.keys import head_sizes, resolve_all
from lorahot.resolve.ldm import LDM_MARKER
from lorahot.runtime.arguments import check_read_options, denoisers_of, entries, text
from lorahot.runtime.components import Components, components_of, is_several
from lorahot.runtime.flux_inputs import pad_embedder_input
from lorahot.runtime.inject import MAX_RANK_LIMIT, check_merged_model
from lorahot.runtime.merge import check_mergeable
from lorahot.runtime.plan import check_extras, check_module, check_weight_module, layer_refusal
from lorahot.runtime.sharding import localize
from lorahot.runtime.stack import SHARED_FIX, part_named, shared_problems
from lorahot.runtime.targets import ExactNames, beside_layers, fsdp_owners, fsdp_refusal, lazy_refusal, unwrappable

__all__ = ["TargetPlan", "plan_targets"]


@dataclass(frozen=True)
class TargetPlan:
    """What to inject so that every planned adapter loads.

    Attributes:
        targets: module names, in a form :func:`lorahot.inject` accepts: the model's qualified
            names when planned against a model (in model order; an
            :class:`~lorahot.runtime.targets.ExactNames` list, which inject matches exactly, not
            as name suffixes), else the adapters' module
            paths without their component prefix (``base_model.model.``, ``unet.``), in first-seen
            order (only namings that spell the model's module paths, PEFT and diffusers, plan
            without a model). Planned
            against several models (a dict of components, a pipeline): a dict component ->
            its module names, holding only the components some adapter loads into, in the
            components' order (the per-component form of ``inject``'s ``targets``).
        max_rank: the largest rank any adapter loads into any target (at least 1), rounded up to
            a multiple of every targeted grouped conv's ``groups``; planned ``stacked``, the
            largest sum of the adapters' ranks in one target.
        ranks: target -> the largest rank any adapter has there (0 for LyCORIS kinds and diffs,
            which load only with ``merged=True`` and take no LoRA buffer rows); planned
            ``stacked``, the sum of their ranks there. With several models it is keyed
            ``<component>.<module name>``, as the runtime names its layers.
        sources: each adapter's source, in the order given.
        skipped: tensor keys left out (only with ``strict=False``).
        extras: whether some adapter has a DoRA magnitude or a LoRA bias, which run unmerged
            only with ``inject(..., extras=True)``.
        merged_only: whether some adapter holds LyCORIS kinds or full diffs, which load only
            with ``inject(..., merged=True)``. Several parts of a stack with a LoRA bias on one
            layer need no particular mode: both add them.
        stacked: whether the ranks are sums over the adapters (``plan_targets(..., stacked=True)``:
            room to load them all into one slot together) rather than maxima.
    """

    targets: list[str] | dict[str, list[str]]
    max_rank: int
    ranks: dict[str, int]
    sources: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    extras: bool = False
    merged_only: bool = False
    stacked: bool = False

    def inject_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`lorahot.inject` this plan needs:
        ``lorahot.inject(model, plan.targets, **plan.inject_options())``."""
        options: dict[str, Any] = {"max_rank": self.max_rank}
        if self.extras and not self.merged_only:
            options["extras"] = True
        if self.merged_only:
            options["merged"] = True
        return options


@public_api
def plan_targets(
    sources: Sequence[Source | Adapter] | Source | Adapter,
    model: nn.Module | Mapping[str, nn.Module] | Any | None = None,
    *,
    stacked: bool = False,
    denoiser: str | Sequence[str | None] | None = None,
    **read_options: Any,
) -> TargetPlan:
    """The targets and ``max_rank`` that let every adapter in ``sources`` load, from headers.

    Args:
        sources: adapters, each anything :func:`lorahot.read_adapter` reads (a directory, a
            ``.safetensors`` file, a Hub repo id, a mapping of tensors, an :class:`Adapter`);
            one source alone is taken as a list of one.
        model: the model to inject into, not yet injected. With it, the adapters' keys are
            matched to its layers as ``load`` matches them, and the plan names its modules.
            Or several models, as :func:`lorahot.inject` takes them: a dict of component name
            -> ``nn.Module``, or an object with a ``components`` mapping (a diffusers
            pipeline). Each module of a file then goes to the component its prefix names
            (``unet.``, ``text_encoder_2.``, ``lora_te1_``, ...) exactly as ``load`` routes it,
            and ``plan.targets`` is a dict keyed by component.
        stacked: plan for loading all of ``sources`` together into one slot
            (``runtime.load(sources)``): each target's rank is the sum of the adapters' ranks
            there, not the largest. Without a model, the modules of one path under PEFT's
            ``base_model.model.``, diffusers' ``unet.`` or ``transformer.`` or no prefix are one
            layer (the denoiser's, as ``load`` routes them), and under another component's
            prefix (``text_encoder.``) another layer.
        denoiser: with several models, the component that takes each file's denoiser
            modules, as ``runtime.load(..., denoiser=)`` takes it: one name for every source,
            or a list of one name (or None: the pipeline's own ``unet``/``transformer``) per
            source (``denoiser=[None, "transformer_2"]`` for a Wan 2.2 pipeline's high-noise
            and low-noise files).
        **read_options: passed to :func:`lorahot.read_adapter` for every source (``prefix``,
            ``key_map``, ``fuse``, ``split``, ``config``, ``weight_name``, ``subfolder``,
            ``revision``, ``token``, ``strict``); ``device`` is not accepted (nothing is read
            onto a device).

    Returns:
        The plan: ``lorahot.inject(model, plan.targets, **plan.inject_options())`` (its
        ``max_rank``, and ``extras=True`` / ``merged=True`` where an adapter needs them). Its
        ``max_rank`` is exact but for fused modules a naming splits onto several layers (Flux's
        ``qkv``): with no values read, a block-diagonal B cannot be told from a dense one, so
        every part is counted at the fused module's full rank (an upper bound).

    A Hub repo id is fetched as ``read_adapter`` fetches it (``huggingface_hub`` downloads the
    file into its cache); of the file, only the header is read.

    Raises:
        UsageError: ``sources`` is empty or not a list of sources; an unknown option; the
            model is not an ``nn.Module``, a dict of them or an object with a ``components``
            mapping of them; ``stacked=True`` without a model for adapters that name their
            modules in different namings (a kohya and a diffusers file), whose names only the
            model tells to be one layer or several; without a model, any adapter whose names are
            not the model's module paths (PEFT, diffusers): kohya's underscore names, an original
            model's names (BFL, Wan, ...), which no target ``inject`` matches could be made of;
            ``denoiser`` without several models, or naming no component; a module of a file on a
            lazy module not yet materialized, with ``inject``'s reason.
        lorahot.LoraError: what reading an adapter raises (:func:`lorahot.read_adapter`), and
            with a model an :class:`AdapterMismatchError` listing every key that matches no
            layer (or several) and every module whose shapes do not fit its layer; with several
            models, also the modules whose prefix names a component the model lacks (with
            ``strict=False`` those are skipped, as ``load`` skips them); also, with or without
            a model, an :class:`AdapterMismatchError` for a rank above 65536 (what ``inject``
            allocates at most); with ``stacked=True``, with or without a model, also for a DoRA
            module, a LyCORIS module with weight decomposition on a layer other parts load into,
            which ``load`` refuses in a stack; with a model, for a LoRA bias on a layer without a
            bias or a LoRA on a grouped conv beside modules that need merged mode (LyCORIS kinds,
            diffs), which no runtime loads (without one, a layer's own bias and groups are
            unknown: such a plan's ``merged=True`` runtime refuses them at ``load``), and for a
            DoRA magnitude or LoRA bias the layer refuses (:func:`~lorahot.runtime.plan.layer_refusal`,
            :func:`~lorahot.runtime.plan.check_extras`), with ``load``'s reason; where the plan needs
            merged mode, for a target ``inject(..., merged=True)`` refuses (a weight tied to another
            module's, one not dense in memory, ...), with ``inject``'s reason.
    """
    items = _source_list(sources)
    if not isinstance(stacked, bool):
        raise UsageError(f"stacked={shown(stacked, 200)} must be True or False.")
    combine: Combine = operator.add if stacked else max
    if "device" in read_options:
        raise UsageError("plan_targets reads headers only; drop device=.")
    check_read_options(read_options)
    several = model is not None and is_several(model)
    if model is not None and not several and not isinstance(model, nn.Module):
        raise UsageError(
            "model must be a torch.nn.Module, a dict of component name -> nn.Module, an object with a `components` "
            f"mapping (a diffusers pipeline), or None; got {type(model).__name__}."
        )
    if denoiser is not None and not several:
        raise UsageError(
            f"denoiser={shown(denoiser, 80)} picks a component of several models, and the plan has "
            + ("no model" if model is None else "one model, which takes every module")
            + ": pass the pipeline (or a dict of components) as model, or plan without denoiser=."
        )
    named, roles = _denoiser_roles(model) if several else ((), {})
    routes = denoisers_of(denoiser, len(items), named, "sources has", roles)
    strict = read_options.get("strict", True)
    # read as a load into a runtime over the model reads them: its own module names first
    names = None if model is None else ModelNames.of(_module_paths(model, several))
    with contextlib.nullcontext() if names is None else reading_for(names):
        adapters = [read_adapter(s, device="meta", **read_options) for s in items]
    skipped = [k for a in adapters for k in a.skipped]
    if model is None:
        if stacked:
            _check_one_spelling(adapters)
        _check_module_paths(adapters)
        ranks = _file_ranks(adapters, combine, stacked)
        groups = [1]
    else:
        components: tuple[str, ...] = ()
        if several:
            modules = components_of(model)[0]
            components = tuple(modules)
            every = [(f"{c}.{n}" if n else c, sub) for c, m in modules.items() for n, sub in m.named_modules()]
            # inject refuses these as targets: a key naming one is refused with why, as load refuses it
            read = tuple((f"{c}.{n}", why) for c, m in modules.items() for n, why in _unread(m))
            layers = {
                f"{c}.{n}": layer for c, m in modules.items() for n, layer in _wrappable(m, _names_of(read, c)).items()
            }
        else:
            assert isinstance(model, nn.Module)  # checked above
            every = list(model.named_modules())
            read = _unread(model)
            layers = _wrappable(model, {n for n, _ in read})
        paths = {n for n, _ in every}
        heads = head_sizes(every)
        ranks = _model_ranks(
            adapters,
            layers,
            skipped if strict is False else None,
            components,
            combine,
            paths,
            stacked=stacked,
            heads=heads,
            routes=routes,
            beside=beside_layers(every, layers, read),
            levels=wrapper_levels(every),
        )
        ranks = {n: ranks[n] for n in layers if n in ranks}  # model order
        groups = [layers[n].spec.groups for n in ranks]
        if any(a.weights for a in adapters):  # inject_options() says merged=True: what inject refuses there
            root: nn.Module = Components(components_of(model)[0]) if several else model  # type: ignore[assignment]  # checked above
            _check_merged_targets(root, {n: layers[n] for n in ranks}, adapters)
    max_rank = _covering_rank(ranks, groups)
    if max_rank > MAX_RANK_LIMIT:  # inject would refuse the plan (with a model, the layer checks said so)
        over = [f"{n}: rank {r}" for n, r in ranks.items() if r > MAX_RANK_LIMIT] or [f"covering rank {max_rank}"]
        raise AdapterMismatchError(
            lines(
                format_problems(
                    f"{', '.join(a.source for a in adapters)}: ranks above {MAX_RANK_LIMIT}, the most inject "
                    "allocates:",
                    over,
                ),
                "No real adapter has such a rank: the file is probably corrupt. Re-save it, or plan without it.",
            )
        )
    # against a model, the exact modules (a plain list would also wrap every module whose name
    # ends with a planned one: Flux's top-level proj_out, and each single block's)
    targets: list[str] | dict[str, list[str]] = list(ranks) if model is None else ExactNames(ranks)
    if several:
        per: dict[str, list[str]] = {}
        for name in ranks:
            component, _, path = name.partition(".")
            per.setdefault(component, ExactNames()).append(path)
        targets = per
    return TargetPlan(
        targets,
        max_rank,
        ranks,
        tuple(a.source for a in adapters),
        tuple(skipped),
        extras=any(m.magnitude is not None or m.bias is not None for a in adapters for m in a.modules.values()),
        merged_only=any(a.weights for a in adapters),
        stacked=stacked,
    )


def _module_paths(model: Any, several: bool) -> list[str]:
    """Every module path of ``model``: each component's under its name where it has several."""
    if not several:
        return [n for n, _ in model.named_modules()]
    return [f"{c}.{n}" if n else c for c, m in components_of(model)[0].items() for n, _ in m.named_modules()]


def _denoiser_roles(model: Any) -> tuple[tuple[str, ...], dict[str, str]]:
    """A pipeline's component names, and those that are no denoiser with what each is (see
    :func:`lorahot.resolve.components.non_denoisers`)."""
    modules = components_of(model)[0]
    paths = [f"{c}.{p}" for c, m in modules.items() for p, _ in m.named_modules() if p]
    return tuple(modules), non_denoisers(tuple(modules), paths)


def _source_list(sources: Any) -> list[Any]:
    if isinstance(sources, (str, Mapping, Adapter)) or not isinstance(sources, Sequence):
        items = [text(sources)]
    else:
        items = [text(s) for s in entries(sources, "sources", "a list of sources")]
    if not items:
        raise UsageError("sources is empty; pass the adapters to plan for (paths, Hub ids, mappings).")
    return items


def _module_rank(m: LoraModule | WeightModule) -> int:
    return m.rank if isinstance(m, LoraModule) else 0


#: How the ranks of several adapters on one target combine: the largest, or (stacked) the sum.
Combine = Callable[[int, int], int]


#: Namings whose module keys are the model's own module paths once the component prefix is
#: stripped: files of these name one layer by one path, so their names compare without a model.
_MODULE_PATHS = frozenset({"peft", "diffusers", "diffusers-old"})


def _file_ranks(adapters: list[Adapter], combine: Combine = max, stacked: bool = False) -> dict[str, int]:
    """File-side module path (component prefix stripped) -> the largest rank there (``combine``
    of the ranks, each adapter's counted once per component it targets: an SDXL file's
    ``text_encoder.`` and ``text_encoder_2.`` modules of one path are two layers, while PEFT's
    ``base_model.model.``, diffusers' ``unet.`` or ``transformer.`` and no prefix all name the
    denoiser's, as ``load`` routes them). ``stacked``: the adapters are a stack's parts, and
    what cannot share a layer with the other parts there is refused as with a model.

    Raises:
        AdapterMismatchError: ``stacked``, and a DoRA module, a LyCORIS module with weight
            decomposition or one built from the base weight on a layer other parts load into
            (:func:`~lorahot.runtime.stack.shared_problems`).
    """
    per: dict[tuple[str, str], list[tuple[int, LoraModule | WeightModule]]] = {}  # (component, path) -> parts
    for part, adapter in enumerate(adapters):
        fmt = format_named(adapter.format)
        own: dict[tuple[str, str], LoraModule | WeightModule] = {}
        entries: list[tuple[str, LoraModule | WeightModule]] = [*adapter.modules.items(), *adapter.weights.items()]
        for key, m in entries:
            name = fmt.strip_prefix(key)
            where = (_file_component(key[: len(key) - len(name)]), name)
            if where not in own or _module_rank(m) > _module_rank(own[where]):
                own[where] = m
        for where, m in own.items():
            per.setdefault(where, []).append((part, m))
    if stacked:
        shared = shared_problems(
            {name if c == "" else f"{c}.{name}": items for (c, name), items in per.items()},
            [part_named(p, a.source) for p, a in enumerate(adapters)],
        )
        if shared:
            raise AdapterMismatchError(
                lines(
                    format_problems("adapters of a stack that cannot share the layers they name:", shared), SHARED_FIX
                )
            )
    ranks: dict[str, int] = {}
    for (_, name), items in per.items():
        combined = functools.reduce(combine, (_module_rank(m) for _, m in items))
        ranks[name] = max(ranks.get(name, 0), combined)
    return ranks


def _file_component(prefix: str) -> str:
    """The component a module key's prefix names, as ``load`` routes it
    (:data:`~lorahot.resolve.components.ROUTES`): ``""`` for the denoiser (no prefix, PEFT's
    ``base_model.model.``, ``unet.``, ``transformer.``), else the component's name."""
    component = next((c for p, c in ROUTES if prefix.startswith(p)), None)
    return "" if component is None or component in DENOISER else component


def _spelling(adapter: Adapter) -> str:
    """How ``adapter`` spells its module paths, for telling whether two files' names can be
    compared without a model: the model's own paths (PEFT, diffusers), or a naming's own,
    with original Stable Diffusion block names (``input_blocks``) told apart from diffusers'."""
    fmt = format_named(adapter.format)
    names = [fmt.strip_prefix(k).replace(".", "_") for k in (*adapter.modules, *adapter.weights)]
    ldm = " with original SD block names" if any(LDM_MARKER.match(n) for n in names) else ""
    return ("module paths" if adapter.format in _MODULE_PATHS else adapter.format) + ldm


def _check_one_spelling(adapters: list[Adapter]) -> None:
    """Refuses a stack planned without a model whose files spell their modules apart: a
    layer's ranks add up only where its names are known to be one layer, which takes the
    model (``lora_unet_down_blocks_0_..._to_q`` and ``down_blocks.0....to_q`` are one layer,
    ``double_blocks_0_img_attn_qkv`` is three)."""
    spellings: dict[str, list[str]] = {}
    for adapter in adapters:
        spellings.setdefault(_spelling(adapter), []).append(adapter.source)
    if len(spellings) > 1:
        listed = [f"{s}: {', '.join(shown(src, 120) for src in sources)}" for s, sources in spellings.items()]
        raise UsageError(
            lines(
                format_problems(
                    "plan_targets(..., stacked=True) without a model: the adapters name modules in different namings:",
                    listed,
                ),
                "Without the model there is no telling which of their names are one layer, so no sum of their "
                "ranks per layer is known. Pass the model: lorahot.plan_targets(sources, model, stacked=True).",
            )
        )


def _check_module_paths(adapters: list[Adapter]) -> None:
    """Refuses a plan without a model for adapters whose names are not the model's module
    paths: kohya's underscore names, or the names of an original model (BFL's Flux, Wan's own
    code) that ``load`` maps onto the layers through the model. No target could be given that
    ``inject`` matches, so the plan would name modules no model has."""
    others = [a for a in adapters if a.format not in _MODULE_PATHS]
    if others:
        listed = [f"{shown(a.source, 120)}: {a.format} naming" for a in others[:8]]
        listed += [f"... and {len(others) - 8} more"] if len(others) > 8 else []
        raise UsageError(
            lines(
                format_problems(
                    "plan_targets without a model: these adapters do not name their modules by the model's module "
                    "paths:",
                    listed,
                ),
                "Only the model tells which of its modules their names are (a kohya name is a path with its dots "
                "made underscores; an original model's name maps onto another layout), so no target inject could match "
                "is known. Pass the model: lorahot.plan_targets(sources, model) (or the pipeline), which plans its "
                "module names, max_rank and inject options.",
            )
        )


def _unread(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """The linears of ``model`` it reads without calling them, each with why inject refuses them
    as targets (:func:`~lorahot.runtime.targets.unwrappable`)."""
    return unwrappable(dict(model.named_modules()), ())


def _names_of(read: Sequence[tuple[str, str]], component: str) -> set[str]:
    """The paths within ``component`` of ``read``'s modules, named ``<component>.<path>``."""
    head = component + "."
    return {n[len(head) :] for n, _ in read if n.startswith(head)}


def _wrappable(model: nn.Module, refused: Container[str] = ()) -> dict[str, LoRALayer]:
    """A throwaway LoRA wrapper (for its spec) of every module inject could wrap, but those of
    ``refused`` (read without a call: inject refuses them as targets); the model is not
    changed."""
    out: dict[str, LoRALayer] = {}
    modules = dict(model.named_modules())
    sharded = set(fsdp_owners(modules))
    for name, module in modules.items():
        if isinstance(module, LoRALayer):
            raise UsageError(f"{name}: already a {type(module).__name__}; plan against the model before inject.")
        cls = layer_class_for(module)
        if not name or cls is None or name in refused:
            continue
        if (refusal := fsdp_refusal(name, sharded)) is not None:
            raise UsageError(refusal)  # as inject would: a plan of layers no inject wraps would mislead
        try:
            out[name] = cls(module)
        except UsageError:
            continue  # inject would refuse it too; a key landing here matches no layer
    return out


def _model_ranks(
    adapters: list[Adapter],
    layers: dict[str, LoRALayer],
    skipped: list[str] | None,
    components: tuple[str, ...] = (),
    combine: Combine = max,
    paths: Container[str] = (),
    stacked: bool = False,
    heads: Mapping[str, int] | None = None,
    routes: Sequence[str | None] = (),
    beside: tuple[tuple[str, ...], tuple[str, ...], tuple[tuple[str, str], ...]] = ((), (), ()),
    levels: frozenset[str] | None = None,
) -> dict[str, int]:
    """Model module name -> the largest rank any adapter loads there (``combine`` of the
    ranks), after checking every adapter's keys and shapes against the model as ``load`` would
    (``paths``: the model's module paths, for
    :func:`~lorahot.runtime.flux_inputs.pad_embedder_input`).
    With ``components`` (layers named ``<component>.<path>``) each module is first routed to its
    component as ``load`` routes it. ``stacked``: the adapters are a stack's parts, and what
    cannot share a layer with the other parts there is refused as ``load`` refuses it (several
    LoRA biases on one layer share it: both modes add them); ``heads``:
    the attention head sizes of the model's modules, as ``load`` reads them
    (:func:`~lorahot.runtime.stack.shared_problems`); ``routes``: each adapter's ``denoiser``
    component (None, or none given: the model's own); ``beside``: the model's other module
    paths, norms without a weight and linears read without a call, as ``load`` resolves against
    them (:func:`~lorahot.runtime.targets.beside_layers`); ``levels``: its wrapper levels
    (:func:`~lorahot.resolve.file_names.wrapper_levels`), as ``load`` reads layers' file names."""
    names = list(layers)
    others, weightless, unwrapped = beside
    ranks: dict[str, int] = {}
    problems: list[str] = []
    biased: list[str] = []  # LoRA biases on layers without a base bias: no merged runtime takes them
    unfoldable: list[str] = []  # LoRA modules on layers merged mode cannot fold them into (a grouped conv)
    merged_only = any(a.weights for a in adapters)
    by_layer: dict[str, list[tuple[int, LoraModule | WeightModule]]] = {}  # what each part loads where
    lazy: dict[str, str] = {}  # targets inject refuses until materialized: their shapes are unknown
    for part, adapter in enumerate(adapters):
        # unknown, ambiguous or unroutable keys raise here
        if components:
            route = routes[part] if part < len(routes) else None
            lora, weights = resolve_components(
                adapter, names, components, skipped, others, heads, route, weightless, unwrapped, levels
            )
        else:
            lora, weights = resolve_all(adapter, names, skipped, others, heads, weightless, unwrapped, levels=levels)
        for name in (*lora, *weights):
            if name not in lazy and (why := lazy_refusal(name, layers[name].base_layer)) is not None:
                lazy[name] = why
        for name, m in lora.items():
            if name in lazy:
                continue
            spec, rank = layers[name].spec, m.rank
            m = pad_embedder_input(name, m, spec, paths.__contains__)  # a Flux.1 LoRA on Fill or a control model
            if spec.shard is not None:  # a tensor-parallel layer: the whole layer's shapes, then its shard's part
                m, found = localize(name, m, spec)
                if found:
                    problems += [f"{adapter.source}: {p}" for p in found]
                    continue
            problems += [f"{adapter.source}: {p}" for p in check_module(name, m, spec, MAX_RANK_LIMIT)]
            if m.magnitude is not None or m.bias is not None:  # as load checks them, in either mode
                found = check_extras(name, m, spec, layer_refusal(layers[name], m))
                problems += [f"{adapter.source}: {p}" for p in found]
            if m.bias is not None and layers[name].base_bias is None:
                biased.append(f"{adapter.source}: {name}")
            if (why := layers[name].merged_lora_refusal()) is not None:
                unfoldable.append(f"{adapter.source}: {name}: {why}")
            ranks[name] = combine(ranks.get(name, 0), rank)
            by_layer.setdefault(name, []).append((part, m))
        for name, w in weights.items():
            if name in lazy:
                continue
            by_layer.setdefault(name, []).append((part, w))
            problems += [f"{adapter.source}: {p}" for p in check_weight_module(name, w, layers[name].spec)]
            if "diff_b" in w.factors and layers[name].base_bias is None:
                problems.append(f"{adapter.source}: {name}: a bias diff (diff_b) for a layer without a bias")
            ranks.setdefault(name, 0)
    if merged_only:  # as load refuses each in a merged runtime, the only kind the others load
        apart = (
            ", while another module needs merged mode (LyCORIS kinds or full diffs): no one runtime loads them all; "
            "plan them apart"
        )
        problems += [
            f"{b}: a LoRA bias (lora_bias) on a layer without a bias, which merged mode cannot fold{apart}"
            for b in biased
        ]
        problems += [f"{u}{apart}" for u in unfoldable]
    if lazy:  # inject's refusal, before any shape is compared with the unknown ones
        raise UsageError(lines(*lazy.values()) if len(lazy) > 1 else next(iter(lazy.values())))
    shared: list[str] = []
    if stacked:  # several LoRA biases on one layer share it: both modes add them
        shared = shared_problems(by_layer, [part_named(p, a.source) for p, a in enumerate(adapters)])
    if problems or shared:
        raise AdapterMismatchError(
            lines(
                format_problems(
                    "adapters that do not fit the model's layers (shapes, biases, the modes they need"
                    + (", the layers a stack's parts share" if shared else "")
                    + "):",
                    problems + shared,
                ),
                *(
                    ["Plan with adapters made for this model, or map their keys with prefix=/key_map=."]
                    if problems
                    else []
                ),
                *([SHARED_FIX] if shared else []),
            )
        )
    return ranks


def _check_merged_targets(root: nn.Module, layers: dict[str, LoRALayer], adapters: list[Adapter]) -> None:
    """Refuses a plan that needs merged mode (some adapter holds LyCORIS kinds or full diffs)
    onto targets ``inject(..., merged=True)`` refuses (:func:`~lorahot.runtime.inject.check_merged_model`,
    :func:`~lorahot.runtime.merge.check_mergeable` on each throwaway wrapper): no runtime would
    load those adapters, as an unmerged one refuses their modules."""
    try:
        check_merged_model(root, list(layers))
        for name, layer in layers.items():
            check_mergeable(name, layer, None)
    except UsageError as exc:
        needing = [a.source for a in adapters if a.weights]
        raise AdapterMismatchError(
            lines(
                f"{', '.join(needing[:8])}: modules that load only in merged mode (LyCORIS kinds, full diffs), and a "
                f"planned target merged mode refuses (inject(..., merged=True) says): {message(exc)}",
                "Plan the adapters that need merged mode apart from those whose targets merged mode refuses, or make "
                "the model fit merged mode as said.",
            )
        ) from None


def _covering_rank(ranks: dict[str, int], groups: list[int]) -> int:
    """The largest rank (at least 1), rounded up to a multiple of every conv's groups."""
    top = max(ranks.values(), default=0) or 1
    step = math.lcm(*groups) if groups else 1
    return -(-top // step) * step
