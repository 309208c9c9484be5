"""Planning a load: map an adapter onto the injected layers, check everything, stage it.

Nothing here touches the model. One function, :func:`validate`, decides whether an adapter
can be loaded, for ``load`` and ``preload`` alike: :func:`plan_load` checks keys, shapes,
ranks, dtypes, alphas and the scales ``alpha / r`` against the scale buffers' range, then the
values (NaN, Inf, beyond the buffers' dtype) are checked where the tensors are: on the
arenas' devices for ``load`` (after :func:`stage` moved them there), where they were read for
``preload``. What passes is then written (``load``) or packed into one compact host buffer per
arena (:func:`pack_host`, ``preload``); neither can fail on the adapter's content any more.
:func:`check_multiplier` checks the user's scale on top, for ``load`` and ``set_scale``. Each part
of a stack passes the same checks (a preloaded part's tensors are moved to the arenas' devices by
:func:`restage`), then :func:`lorahot.runtime.stack.check_parts` checks the parts together.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lorahot.adapter import Adapter, LoraModule, WeightModule, storage_problem
from lorahot.adapter.deltas import base_problem, delta_shape, lora_update_max, rotation_problem
from lorahot.errors import AdapterMismatchError, AdapterReadError, UsageError, format_problems, lines
from lorahot.kernels.row_scale import power_of_two_at_least
from lorahot.kernels.wide_linear import SHIFTED_DTYPES
from lorahot.layers.base import EXTRA_BIAS, EXTRA_M, FLOAT_DTYPES, LayerSpec, LoRALayer, unusual_values
from lorahot.resolve.components import resolve_components
from lorahot.resolve.keys import resolve_all
from lorahot.runtime.buffers import Arena, BufferManager, Entry, Extra, Pack
from lorahot.runtime.flux_inputs import pad_embedder_input
from lorahot.runtime.layer_weights import LayerWeights, Weight, weight_in
from lorahot.runtime.sharding import CutFactor, cut_factors, localize

__all__ = [
    "WEIGHT_DTYPES",
    "LoadPlan",
    "Staged",
    "Checked",
    "validate",
    "plan_load",
    "check_fit",
    "check_module",
    "check_extras",
    "layer_refusal",
    "check_values",
    "check_multiplier",
    "check_unit_scale",
    "forget_values",
    "stage_entries",
    "restage",
    "pack_host",
]


@dataclass
class LoadPlan:
    """Everything a load writes, computed before anything is written.

    Attributes:
        targets: injected layer name -> the adapter module loaded into it.
        entries: per arena (the buffer manager's order), ``(layer index, module)`` pairs.
        scales: per arena, float64 ``[n_layers]``: each layer's ``alpha / r`` (0 if untouched);
            the slot's per-row scales are built from them (:class:`~lorahot.runtime.stack.Stack`).
        largest: per arena, the largest ``|alpha / r|`` (what the user's scale multiplies).
        source: where the adapter came from, for messages.
        ranks: injected layer name -> the rank loaded into it.
        nbytes: bytes of adapter weights (before padding).
        delta_bound: injected layer name -> ``r * max|A| * max|B|``, a bound on every entry of
            ``B @ A`` (filled by the value checks, which put the exact ``max|B @ A|`` in its place
            where they computed it; merged mode checks its weights' range with it).
        factor_bound: injected layer name -> ``r * max|A| * max|B|`` as the factors give it,
            never tightened: it bounds every partial sum of a GEMM forming ``B @ A`` too, which
            the exact ``max|B @ A|`` does not (terms of 1e40 that cancel); merged mode's
            one-GEMM rewrite checks its range with it (filled by the value checks).
        scaled_b: per arena, float64 ``[n_layers]``: ``max|B| * |alpha / r|`` of each layer (0
            if untouched; filled by the value checks; the wide layers, which store ``scale * B``,
            check their dtype's range with it).
        a_shift: per arena, float64 ``[n_layers]``: for a float16 arena, a bound on the power of
            two a wide layer divides each of its A rows by and multiplies its B columns by
            (:func:`lorahot.kernels.row_scale.row_shifts`; filled by the value checks: the wide
            layers check ``scale * B`` times it against float16's range); 1 elsewhere.
        update_bound: per arena, float64 ``[n_layers]``: ``|alpha / r|`` times
            :attr:`delta_bound`, a bound on every entry of the layer's update
            ``alpha / r * B @ A`` at weight 1 (0 if untouched; filled by the value checks; a
            stack's summed update at the user's weights is checked with it,
            :mod:`lorahot.runtime.updates`).
        bias_bound: per arena, float64 ``[n_layers]``: ``|alpha / r| * max|lora_bias|``, the
            largest entry of the update's other term ``alpha / r * lora_bias`` at weight 1 (0
            where the layer's module has no LoRA bias; filled by the value checks, checked at
            the user's weights as :attr:`update_bound` is).
        skipped: tensor keys left out (``strict=False``): those the reader skipped and those
            of modules that map onto no injected layer.
        weights: injected layer name -> the LoHa/LoKr/Tucker LoCon/diff module folded into
            it (merged mode only; their layers hold no LoRA in the arena).
        dora: per arena, the indices of the layers the adapter loads DoRA into (their factors
            are computed after the write, and again after every ``set_scale``).
        cut: tensor-parallel layer name -> the factor of its module that each rank holds a
            slice of, summed whole before it was cut (what the ranks compare of it,
            :mod:`lorahot.runtime.fingerprint`); empty off a tensor-parallel model.
    """

    targets: dict[str, LoraModule]
    entries: list[list[tuple[int, LoraModule]]]
    scales: list[torch.Tensor]
    largest: list[float]
    source: str
    ranks: dict[str, int]
    nbytes: int
    delta_bound: dict[str, float] = field(default_factory=dict)
    factor_bound: dict[str, float] = field(default_factory=dict)
    scaled_b: list[torch.Tensor] = field(default_factory=list)
    a_shift: list[torch.Tensor] = field(default_factory=list)
    update_bound: list[torch.Tensor] = field(default_factory=list)
    bias_bound: list[torch.Tensor] = field(default_factory=list)
    skipped: tuple[str, ...] = ()
    weights: dict[str, WeightModule] = field(default_factory=dict)
    dora: list[list[int]] = field(default_factory=list)
    cut: dict[str, CutFactor] = field(default_factory=dict)

    @functools.cached_property
    def unit_scale(self) -> str | None:
        """The layer of the first module that means something at a user scale of 1 only
        (:attr:`~lorahot.LoraModule.unit_scale`), or None: looked for once, as every
        ``set_scale`` asks (:func:`check_unit_scale`). A name, not the module: the plan's
        modules may give their tensors up (:func:`forget_values`)."""
        modules: list[tuple[str, LoraModule | WeightModule]] = [*self.targets.items(), *self.weights.items()]
        return next((name for name, m in modules if m.unit_scale), None)

    @functools.cached_property
    def smallest(self) -> list[float]:
        """Per arena, the smallest nonzero ``|alpha / r|`` (inf where the plan loads no layer
        there): what a user's scale must not push below the scale buffers' smallest normal
        number (:func:`check_multiplier`)."""
        out = []
        for values in self.scales:
            nonzero = values[values != 0].abs()
            out.append(float(nonzero.min()) if nonzero.numel() else math.inf)
        return out


def check_extras(name: str, module: LoraModule, spec: LayerSpec, refusal: str | None) -> list[str]:
    """A DoRA magnitude or LoRA bias must hold one value per output channel along one dimension
    (PEFT's ``[out]``, a conv's ``[1, out, 1, ...]``; a ``[2, 3]`` for 6 channels says no order),
    and the runtime must be able to run it on the layer (``refusal``: why not, or None). A LyCORIS or kohya
    ``dora_scale`` (:attr:`~lorahot.adapter.LoraModule.unit_scale`) is refused on an embedding:
    LyCORIS decomposes the weights of Linear and conv layers only, so no reference computes it
    there (PEFT's DoRA on an embedding is its ``lora_magnitude_vector``, whose norm has no
    ``eps``)."""
    problems = []
    out = spec.full_dims()[1]  # a tensor-parallel layer's whole output, as the file holds it
    for which, t in (("DoRA magnitude vector", module.magnitude), ("LoRA bias", module.bias)):
        if t is not None and (t.numel() != out or sum(d > 1 for d in t.shape) > 1):
            problems.append(
                f"{_where(name, module)}: {which} has shape {tuple(t.shape)}, expected {out} values (one per "
                "output channel) along one dimension"
            )
    if module.magnitude is not None and module.bias is not None:
        problems.append(
            f"{_where(name, module)}: both a DoRA magnitude and a LoRA bias, which PEFT refuses to combine "
            "(LoraConfig: lora_bias=True is not supported for DoRA): its forward would scale the bias by the DoRA "
            "factor and its merge adds it unscaled, so no one result stands. Drop one of the two, or load them as "
            "two adapters on different layers"
        )
    if module.magnitude is not None and module.unit_scale and spec.kind == "embedding":
        problems.append(
            f"{_where(name, module)}: a dora_scale (LyCORIS weight decomposition) on an embedding layer, where "
            "LyCORIS decomposes the weights of Linear and conv layers only: no reference library computes it on an "
            "embedding (PEFT's DoRA there is a lora_magnitude_vector). Leave this module out of the adapter, or "
            "load a PEFT DoRA adapter for the embedding"
        )
    if refusal is not None:
        problems.append(f"{_where(name, module)}: {refusal}")
    return problems


def layer_refusal(layer: LoRALayer, module: LoraModule) -> str | None:
    """Why ``layer`` cannot run ``module``'s LoRA bias or DoRA magnitude in any mode, or None:
    what the layer itself refuses (:meth:`~lorahot.layers.LoRALayer.lora_bias_refusal`,
    :meth:`~lorahot.layers.LoRALayer.dora_refusal`), as ``load`` and ``plan_targets`` ask it."""
    if module.bias is not None and (refusal := layer.lora_bias_refusal()) is not None:
        return refusal
    return layer.dora_refusal() if module.magnitude is not None else None


#: PEFT's keys of an embedding's LoRA (``lora_embedding_A`` ``[r, num]``, ``lora_embedding_B``
#: ``[dim, r]``, with or without the adapter's name): the one spelling a reference reads as one.
_PEFT_EMBEDDING = re.compile(r"\.lora_embedding_[AB](?:\.[^.]+)?$")


def _embedding_spelling(name: str, module: LoraModule, spec: LayerSpec) -> str:
    """Why a LoRA on an embedding in another spelling than PEFT's (kohya's ``lora_down`` /
    ``lora_up``, ``lora_A.weight`` / ``lora_B.weight``) is refused: no reference reads it as an
    embedding's LoRA. PEFT (under diffusers and transformers too) reads only ``lora_embedding_A``
    / ``lora_embedding_B`` there and leaves other keys unloaded; sd-scripts and LyCORIS wrap no
    embedding (sd-scripts' loader skips the keys, LyCORIS' raises); diffusers' kohya conversion
    raises; ComfyUI adds ``up @ down`` reshaped to the table's ``[num, dim]`` (the table read as a
    linear's ``[out, in]``) where its key map names the table, and skips the keys elsewhere."""
    num, dim = spec.in_dim, spec.out_dim
    shapes = f"A {tuple(module.A.shape)}, B {tuple(module.B.shape)}"
    return (
        f"{_where(name, module)}: a LoRA ({shapes}) on an nn.Embedding of {num} rows of {dim} in another spelling "
        "than PEFT's lora_embedding_A / lora_embedding_B, which no reference library reads as an embedding's LoRA: "
        "PEFT (and diffusers and transformers through it) leaves these keys unloaded, sd-scripts wraps no embedding "
        "and skips them, LyCORIS' loader and diffusers' kohya conversion raise, and ComfyUI, where its key map names "
        f"the table, adds up @ down reshaped to ({num}, {dim}), the table read as a linear's weight. Rename the pair "
        f"lora_embedding_A (r, {num}) and lora_embedding_B ({dim}, r) if it is PEFT's layout (for ComfyUI's layout, "
        f"up ({num}, r) and down (r, {dim}): lora_embedding_A = up.T, lora_embedding_B = down.T), or leave this "
        "module out of the adapter"
    )


def check_module(name: str, module: LoraModule, spec: LayerSpec, max_rank: int) -> list[str]:
    """Every problem with loading ``module`` into the layer ``name``; empty when it fits."""
    if spec.kind == "norm":
        return [
            f"{_where(name, module)}: a LoRA (A and B) on a normalization layer, which takes only deltas of its weight "
            "and bias (.diff / .diff_b, LyCORIS w_norm / b_norm); leave this module out of the adapter or the targets"
        ]
    if spec.kind == "embedding" and module.source_keys and not any(map(_PEFT_EMBEDDING.search, module.source_keys)):
        return [_embedding_spelling(name, module, spec)]
    a, b = module.A, module.B
    rank = int(a.shape[0]) if a.ndim else 0
    a_ok = a.ndim == 1 + len(spec.a_row_shape) and rank > 0 and tuple(a.shape) == spec.a_shape(rank)
    if a_ok and rank <= max_rank and not rank % spec.groups and tuple(b.shape) == spec.b_shape(rank):
        return []  # the usual case: no message is built
    where = _where(name, module)
    if not a_ok:
        expected = "(r, " + ", ".join(map(str, spec.a_row_shape)) + ")"
        return [f"{where}: A has shape {tuple(a.shape)}, expected {expected} with r >= 1 for this {spec.kind} layer"]
    if rank > max_rank:
        return [f"{where}: rank {rank} > max_rank {max_rank}; inject with max_rank >= {rank}"]
    if rank % spec.groups:
        return [f"{where}: rank {rank} is not a multiple of the conv's groups={spec.groups}"]
    if tuple(b.shape) != spec.b_shape(rank):
        return [
            f"{where}: B has shape {tuple(b.shape)}, expected {spec.b_shape(rank)} for rank {rank} (A {tuple(a.shape)})"
        ]
    return []


#: dtypes lorahot copies from, and the dtypes its buffers may have: the dtypes the layers compute
#: their LoRA in. Integer weights are refused; float8 ones never reach the planner: they are read
#: as float32, value for value (:func:`lorahot.io.dtypes.widened`), as PEFT loads them.
WEIGHT_DTYPES = FLOAT_DTYPES


def check_values(name: str, module: LoraModule) -> list[str]:
    """Problems with ``module``'s content that no model could accept: dtype, storage, alpha
    (messages are built only for a module that has one)."""
    tensors = [(module.A, "A"), (module.B, "B"), (module.magnitude, "the DoRA magnitude"), (module.bias, "the bias")]
    for t, which in tensors:
        if t is None:
            continue
        if t.dtype not in WEIGHT_DTYPES:
            return [
                f"{_where(name, module)}: {which} has dtype {t.dtype}; LoRA weights must be float16, bfloat16, "
                "float32 or float64"
            ]
        why = storage_problem(t)
        if why is not None:
            return [f"{_where(name, module)}: {which} is {why}; LoRA weights must be dense tensors with data"]
    if not math.isfinite(module.alpha):  # any finite alpha scales as PEFT's lora_alpha does, 0 and < 0 too
        return [f"{_where(name, module)}: alpha is {module.alpha}; it must be finite"]
    return []


def _where(name: str, module: LoraModule | WeightModule) -> str:
    return f"{name} ({', '.join(module.source_keys or (module.key,))})"


#: The model's own weight of an injected layer, by name (for adapters that carry a copy of it).
WeightOf = Callable[[str], torch.Tensor]
#: Why the runtime cannot run a module's DoRA magnitude or LoRA bias on an injected layer (or
#: None), by the layer's name and the module.
ExtrasRefusal = Callable[[str, LoraModule], str | None]


def plan_load(
    adapter: Adapter,
    buffers: BufferManager,
    specs: dict[str, LayerSpec],
    weight_of: WeightOf | None = None,
    strict: bool = True,
    extras_refusal: ExtrasRefusal | None = None,
    components: tuple[str, ...] = (),
    others: tuple[str, ...] = (),
    heads: Mapping[str, int] | None = None,
    denoiser: str | None = None,
    weightless: tuple[str, ...] = (),
    unwrapped: tuple[tuple[str, str], ...] = (),
    levels: frozenset[str] | None = None,
) -> LoadPlan:
    """Resolves and checks ``adapter`` for the layers ``specs`` whose storage ``buffers`` holds.

    Layers the adapter does not touch get zeros and scale 0. The plan holds the adapter's
    tensors detached (a tensor that requires grad is read like any other). With
    ``strict=False`` modules that map onto no injected layer are left out and listed in
    :attr:`LoadPlan.skipped`; an adapter of which nothing is left is still refused. With
    ``components`` (a runtime over several models, layers named ``<component>.<path>``) each
    module is first routed to its component by its prefix
    (:func:`lorahot.resolve.components.resolve_components`; ``denoiser``: the component that
    takes the denoiser's modules, None for the runtime's own). ``others``: the model's module
    paths that are not injected layers, which keys may name but never land beside
    (:func:`lorahot.resolve.keys.resolve_all`); ``heads``: the attention head sizes its modules
    state, by path (:func:`lorahot.resolve.keys.head_sizes`); ``weightless``: its normalization
    layers without a weight, which a key may name only to be refused as such; ``unwrapped``: its
    modules read without a call, each with why (:func:`lorahot.runtime.targets.unwrappable`),
    which a key may name only to be refused so; ``levels``: its wrapper levels
    (:func:`lorahot.resolve.file_names.wrapper_levels`), the only ones a layer's file name drops.

    Raises:
        AdapterMismatchError: keys that map onto no injected layer (or onto one twice), or
            shapes and ranks the layers cannot take, or a saved copy of a base weight that is
            not the model's (see :func:`check_base_weight`; ``weight_of`` gives the model's).
        AdapterReadError: values no model could take: non-float dtypes, an alpha that is not
            finite, a scale ``alpha / r`` beyond the range of the layer's scale buffer.
    """
    limit = buffers.max_rank
    uncut: dict[str, LoraModule] = {}  # the modules of the sharded layers, as read, before their cut
    targets, weights, unplaced = _fit(
        adapter,
        buffers,
        specs,
        weight_of,
        strict,
        extras_refusal,
        components,
        others,
        limit,
        heads,
        denoiser,
        weightless,
        unwrapped,
        uncut,
        levels,
    )
    unreadable = [p for name, m in targets.items() for p in check_values(name, m)]
    unreadable += [p for name, w in weights.items() for p in check_weight_values(name, w)]
    if unreadable:
        _raise_unreadable(adapter.source, unreadable)
    cut = cut_factors(uncut, specs) if uncut else {}
    entries: list[list[tuple[int, LoraModule]]] = [[] for _ in buffers.arenas]
    per_layer = [[0.0] * len(a.specs) for a in buffers.arenas]
    dora: list[list[int]] = [[] for _ in buffers.arenas]
    for name, m in targets.items():  # one pass: the usual adapter passes every check below
        arena, index = buffers.where[name]
        targets[name] = m = _detached(m)
        entries[arena].append((index, m))
        if m.magnitude is not None:
            dora[arena].append(index)
        per_layer[arena][index] = float(m.scale)
    ranges = [(_NORMAL_MIN[a.S.dtype], _FINITE_MAX[a.S.dtype]) for a in buffers.arenas]
    # 0 on the layers it leaves alone; NaN fails too
    if not all(v == 0.0 or tiny <= abs(v) <= top for values, (tiny, top) in zip(per_layer, ranges) for v in values):
        _raise_unreadable(adapter.source, [p for name, m in targets.items() for p in _check_scale(name, m, buffers)])
    scales = [torch.tensor(values, dtype=torch.float64) for values in per_layer]  # one tensor per arena
    largest = [max(map(abs, values), default=0.0) for values in per_layer]
    ranks = {n: m.rank for n, m in targets.items()} | {n: w.rank for n, w in weights.items()}
    nbytes = sum(m.A.nbytes + m.B.nbytes for m in targets.values()) + sum(w.nbytes for w in weights.values())
    skipped = (*adapter.skipped, *(unplaced or ()))
    weights = {n: replace(w, factors={k: t.detach() for k, t in w.factors.items()}) for n, w in weights.items()}
    return LoadPlan(
        targets,
        entries,
        scales,
        largest,
        adapter.source,
        ranks,
        nbytes,
        skipped=skipped,
        weights=weights,
        dora=dora,
        cut=cut,
    )


def check_fit(
    adapter: Adapter,
    buffers: BufferManager,
    specs: dict[str, LayerSpec],
    strict: bool = True,
    extras_refusal: ExtrasRefusal | None = None,
    components: tuple[str, ...] = (),
    others: tuple[str, ...] = (),
    heads: Mapping[str, int] | None = None,
    denoiser: str | None = None,
    weightless: tuple[str, ...] = (),
    unwrapped: tuple[tuple[str, str], ...] = (),
    levels: frozenset[str] | None = None,
) -> tuple[int, tuple[str, ...]]:
    """The checks of :func:`plan_load` that read no value: the keys map onto injected layers,
    and the shapes fit them. Runs on an adapter read from its header alone (``device="meta"``),
    so that an adapter made for another model is refused before its data is read. The rank
    against ``max_rank`` is left to the load: a fused module that a split places onto several
    layers (Flux's ``linear1``) takes each part's rank from its values (a block-sparse B), which
    the header lacks.

    Returns:
        The number of injected layers the adapter loads into, and the tensor keys the load skips
        (``strict=False``: the reader's and those of modules no injected layer takes), as
        :attr:`LoadPlan.ranks` and :attr:`LoadPlan.skipped` list them.

    Raises:
        AdapterMismatchError: as :func:`plan_load`.
    """
    targets, weights, unplaced = _fit(
        adapter,
        buffers,
        specs,
        None,
        strict,
        extras_refusal,
        components,
        others,
        _NO_RANK_LIMIT,
        heads,
        denoiser,
        weightless,
        unwrapped,
        levels=levels,
    )
    return len(targets) + len(weights), (*adapter.skipped, *(unplaced or ()))


#: the rank limit :func:`check_fit` checks against: none (see there)
_NO_RANK_LIMIT = 1 << 62


def _fit(
    adapter: Adapter,
    buffers: BufferManager,
    specs: dict[str, LayerSpec],
    weight_of: WeightOf | None,
    strict: bool,
    extras_refusal: ExtrasRefusal | None,
    components: tuple[str, ...],
    others: tuple[str, ...],
    rank_limit: int,
    heads: Mapping[str, int] | None = None,
    denoiser: str | None = None,
    weightless: tuple[str, ...] = (),
    unwrapped: tuple[tuple[str, str], ...] = (),
    uncut: dict[str, LoraModule] | None = None,
    levels: frozenset[str] | None = None,
) -> tuple[dict[str, LoraModule], dict[str, WeightModule], list[str] | None]:
    """The adapter's modules resolved onto the layers (LoRA, other kinds, the keys left out
    where not ``strict``), every problem of fit raised at once; ranks against ``rank_limit``.
    ``uncut`` receives the modules of the tensor-parallel layers as read, before their cut."""
    unplaced: list[str] | None = None if strict else []
    if components:
        targets, weights = resolve_components(
            adapter, list(specs), components, unplaced, others, heads, denoiser, weightless, unwrapped, levels
        )
    else:
        targets, weights = resolve_all(
            adapter, list(specs), unplaced, others, heads, weightless, unwrapped, levels=levels
        )
    if not targets and not weights and unplaced:
        raise AdapterMismatchError(
            f"{adapter.source}: no module of the adapter ({adapter.format} naming) maps onto an injected layer, "
            f"even with strict=False: it skips the keys that fit no layer, and here that is all {len(unplaced)} of "
            f"them (e.g. {', '.join(unplaced[:3])}), which would load nothing. Inject those modules (targets=...), "
            "map the names with prefix=/key_map=, or leave this adapter out of the load."
        )
    _pad_embedder_inputs(targets, specs, others)
    misfits = _localize(targets, specs, uncut)
    problems = [p for found in misfits.values() for p in found]
    problems += [
        p for name, m in targets.items() if name not in misfits for p in check_module(name, m, specs[name], rank_limit)
    ]
    if weight_of is not None:
        problems += [p for name, m in targets.items() for p in check_base_weight(name, m, weight_of)]
    problems += [p for name, w in weights.items() for p in check_weight_module(name, w, specs[name])]
    problems += [
        p
        for name, m in targets.items()
        if m.magnitude is not None or m.bias is not None
        for p in check_extras(name, m, specs[name], extras_refusal(name, m) if extras_refusal else None)
    ]
    if problems:
        raise AdapterMismatchError(
            lines(
                format_problems(f"{adapter.source}: adapter does not fit the injected model:", problems),
                "Load an adapter trained for this model and these target modules, or inject with a larger max_rank.",
            )
        )
    return targets, weights, unplaced


def _pad_embedder_inputs(targets: dict[str, LoraModule], specs: dict[str, LayerSpec], others: tuple[str, ...]) -> None:
    """Widens the A of a Flux.1 LoRA's ``x_embedder`` to a Fill or control model's wider input
    (:mod:`lorahot.runtime.flux_inputs`), in place in ``targets``."""

    def has(path: str) -> bool:
        return path in specs or path in others

    for name, m in targets.items():
        targets[name] = pad_embedder_input(name, m, specs[name], has)


def _localize(
    targets: dict[str, LoraModule], specs: dict[str, LayerSpec], uncut: dict[str, LoraModule] | None = None
) -> dict[str, list[str]]:
    """Replaces each module bound for a tensor-parallel layer by this rank's part of it
    (:func:`lorahot.runtime.sharding.localize`); returns, by layer, the problems with the
    full shapes of those that do not fit. ``uncut`` receives each module a sharded layer's
    cut took a slice of, as it was."""
    misfits: dict[str, list[str]] = {}
    for name, m in targets.items():
        if specs[name].shard is not None or specs[name].weight_shard is not None:
            targets[name], found = localize(name, m, specs[name])
            if found:
                misfits[name] = found
            elif uncut is not None and specs[name].shard is not None:
                uncut[name] = m
    return misfits


def check_weight_module(name: str, module: WeightModule, spec: LayerSpec) -> list[str]:
    """Every problem with folding ``module`` (LoHa, LoKr, Tucker LoCon, diff) into layer ``name``."""
    where = _where(name, module)
    if spec.shard is not None or spec.weight_shard is not None:  # its weight a DTensor: no merged mode
        return [
            f"{where}: {module.kind} weights fold into the layer's weight (merged mode), which lorahot does not "
            "rewrite on a tensor-parallel (DTensor) layer; convert the adapter to plain LoRA, or load it on an "
            "unsharded model"
        ]
    if spec.kind == "norm":
        return _norm_problems(where, module, spec)
    if spec.kind not in ("linear", "conv") or (spec.groups != 1 and spec.kind != "conv"):
        return [
            f"{where}: {module.kind} weights fold only into Linear/Conv1D and conv layers, not this {spec.kind} layer "
            "(convert the adapter to plain LoRA, or leave this module out)"
        ]
    if spec.groups != 1 and (module.kind == "fused" or module.rows is not None):
        return [f"{where}: {_regrouped(module, spec)}"]
    if module.kind == "fused":
        return _fused_problems(name, module, spec)
    grouped = _grouped_problem(module, spec) if spec.groups != 1 else None
    if grouped is not None:
        return [f"{where}: {grouped}"]
    shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in module.factors.items())
    if module.reads_base:
        problem = base_problem(module, spec.weight_shape())
        return [] if problem is None else [f"{where}: its {module.kind} factors ({shapes}) do not fit: {problem}"]
    contradiction = _contradiction(module)
    if contradiction is not None:
        return [f"{where}: its {module.kind} factors ({shapes}) contradict each other: {contradiction}"]
    expected = spec.weight_shape()  # the torch layout [out, in / groups, *kernel]
    got = delta_shape(module, expected)
    # a flat [out, in * prod(kernel)] weight is the torch layout read row by row (LyCORIS saves
    # conv factors of LoHa and LoKr so); one with its own kernel dimensions must match them: a
    # [16, 8, 1, 9] kernel is not a [16, 8, 3, 3] one, though it has as many elements
    fits = (
        got is not None
        and len(got) > 0
        and got[0] == spec.out_dim
        and math.prod(got) == math.prod(expected)
        and (len(got) == 2 or _unit_kernel_free(got) == _unit_kernel_free(expected))
    )
    bias = module.factors.get("diff_b")
    if not fits:
        return [f"{where}: its {module.kind} factors ({shapes}) make a weight of shape {got}, expected {expected}"]
    diff = module.factors.get("diff")
    if diff is not None and _unit_kernel_free(tuple(diff.shape))[1:] != _unit_kernel_free(expected)[1:]:
        return [_flat_diff(where, tuple(diff.shape), expected)]
    if bias is not None and tuple(bias.shape) != (spec.out_dim,):
        return [f"{where}: diff_b has shape {tuple(bias.shape)}, expected ({spec.out_dim},)"]
    magnitude = module.factors.get("dora_scale")
    ones = (1,) * (len(expected) - 2)
    per_out, per_in = (spec.out_dim, 1, *ones), (1, expected[1], *ones)
    if magnitude is not None and tuple(magnitude.shape) not in (per_out, per_in):
        return [
            f"{where}: dora_scale has shape {tuple(magnitude.shape)}, expected {per_out} (one magnitude per output "
            f"channel, LyCORIS' wd_on_out=True) or {per_in} (per input channel, wd_on_out=False)"
        ]
    return []


def _flat_diff(where: str, got: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """Why a full diff whose shape is not its conv's weight's (flattened over the kernel,
    ``[out, in * prod(kernel)]``) is refused: no reference reads it. ComfyUI adds a ``.diff`` only
    where its shape is the weight's (else it warns ``SHAPE MISMATCH ... WEIGHT NOT MERGED`` and
    skips it), LyCORIS' loader fails to copy it into the conv's weight, diffusers' conversions drop
    such keys (Wan's) or raise (SD's). Trailing kernel dimensions of 1 count as none (a 1x1 conv's
    weight is a linear's); the rows are the module's to check (a fused module's part holds its own)."""
    return (
        f"{where}: its full diff has shape {got}, the conv's weight {expected} flattened over its kernel, which no "
        "reference library reads: ComfyUI skips a .diff whose shape is not the weight's (warning SHAPE MISMATCH ... "
        "WEIGHT NOT MERGED), LyCORIS' loader fails to copy it into the conv's weight, diffusers' conversions drop "
        f"such keys or raise. Reshape it to {expected} in the file if it is that weight in torch's order, or leave "
        "this module out of the adapter"
    )


def _grouped_problem(module: WeightModule, spec: LayerSpec) -> str | None:
    """Why ``module`` has no merged weight on a conv with ``groups > 1`` (weight
    ``[out, in / groups, *kernel]``), or None. The rotations and an output-side (IA)^3 act on
    the weight's output rows, which the grouping leaves whole: LyCORIS and ComfyUI merge them
    into the grouped weight as it is. An input-side (IA)^3 holds one factor per input channel of
    the whole conv and GLoRA's ``a1 a2`` mixes every input channel: LyCORIS builds neither
    against a grouped weight (its merged weight fails to multiply or reshape), so there is no
    merged weight to reproduce."""
    on_input = module.kind == "ia3" and _ia3_on_input(module, spec)
    if module.kind != "glora" and not on_input:
        return None
    what = (
        "an input-side (IA)^3 scales every input channel of the conv"
        if on_input
        else "a GLoRA's a1 a2 mixes every input channel"
    )
    return (
        f"{module.named} module on a conv with groups={spec.groups}: {what}, which its grouped weight "
        f"{spec.weight_shape()} (each output channel reading only its group's {spec.weight_shape()[1]} input "
        "channels) cannot hold, and LyCORIS builds no merged weight for it there; merge it with the tool that trained "
        "it (its bypass forward) and load the merged model, or leave this module out"
    )


def _regrouped(module: WeightModule, spec: LayerSpec) -> str:
    """Why rows of ``ΔW`` cut from a fused module (``split=``) or stacked from separate modules
    (``fuse=``) do not fit a conv with ``groups > 1``: output channel ``o`` of such a conv reads
    input group ``o // (out / groups)``, so a row keeps its input channels only in a layer of the
    same width. Cut from (or stacked into) a layer of another width, a part's rows of a grouped
    ``ΔW`` would read other input channels than those it was trained on."""
    how = "joins separate modules onto" if module.kind == "fused" else "cuts rows of a fused module onto"
    return (
        f"{module.named} module that {how} a conv with groups={spec.groups}: each output channel of a grouped conv "
        f"reads its group's {spec.weight_shape()[1]} input channels, picked by its row's place in the layer's "
        f"{spec.out_dim} rows, so rows cut from or stacked into a layer of another width would read other input "
        "channels than they were trained on; load the module into a model whose layer it names (no split= or fuse=), "
        "or leave it out"
    )


def _fused_problems(name: str, module: WeightModule, spec: LayerSpec) -> list[str]:
    """Every problem with folding a ``fuse=`` module into layer ``name``: the parts' rows add up
    to the layer's outputs, each part fits its rows (as a layer of its own would be checked),
    and a stacked ``diff_b`` has one value per output."""
    where = _where(name, module)
    rows = [q.out for q in module.parts]
    if sum(rows) != spec.out_dim:
        return [
            f"{where}: its parts {[q.key for q in module.parts]} have {rows} output rows, {sum(rows)} in all, but the "
            f"layer has {spec.out_dim}; give fuse= the parts in the fused layer's row order, each with its size"
        ]
    problems = [
        p
        for part, q in zip(module.part_modules(), module.parts)
        for p in check_weight_module(name, part, replace(spec, out_dim=q.out))
    ]
    bias = module.factors.get("diff_b")
    if bias is not None and tuple(bias.shape) != (spec.out_dim,):
        problems.append(f"{where}: diff_b has shape {tuple(bias.shape)}, expected ({spec.out_dim},)")
    return problems


def _ia3_on_input(module: WeightModule, spec: LayerSpec) -> bool:
    """Whether an (IA)^3 module scales the input channels: its ``on_input`` is 1 (read off the
    factor's size where a shapes-only read has no value); a malformed flag is
    :func:`~lorahot.adapter.deltas.base_problem`'s."""
    flag = module.factors.get("on_input")
    if flag is None or flag.numel() != 1 or flag.dtype.is_complex:
        return False
    if flag.is_meta:
        return module.factors["weight"].numel() != spec.out_dim
    return float(flag.reshape(-1)[0]) == 1.0


def _norm_problems(where: str, module: WeightModule, spec: LayerSpec) -> list[str]:
    """Every problem with folding ``module`` into a normalization layer (``where`` names it): a
    plain diff of its weight (the weight's own shape) and of its bias (one value per channel),
    nothing else. The bias's presence is checked with the layer (no ``diff_b`` without a bias)."""
    weight = spec.weight_shape()
    shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in module.factors.items())
    others = sorted(set(module.factors) - {"diff", "diff_b"})
    if module.kind != "diff" or others:
        return [
            f"{where}: {module.kind} factors ({shapes}) on a normalization layer, which takes only deltas of its "
            "weight and bias (.diff / .diff_b, LyCORIS w_norm / b_norm); leave this module out of the adapter or the "
            "targets"
        ]
    problems = []
    diff, bias = module.factors.get("diff"), module.factors.get("diff_b")
    if diff is not None and tuple(diff.shape) != weight:
        problems.append(
            f"{where}: its weight delta has shape {tuple(diff.shape)}, expected {weight} (the norm's weight)"
        )
    if bias is not None and tuple(bias.shape) != weight:
        problems.append(f"{where}: its bias delta has shape {tuple(bias.shape)}, expected {weight} (the norm's bias)")
    return problems


def _unit_kernel_free(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` without trailing kernel dimensions of 1: a 1x1 conv's ``[out, in, 1, 1]`` weight is
    a linear's ``[out, in]``."""
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _contradiction(module: WeightModule) -> str | None:
    """What makes ``module``'s factors ambiguous, or None: LoHa halves of different ranks (the
    alpha divides one rank), a LoKr half given both whole and as two factors (which one is
    the weight, and whether the alpha applies, is then undecided), LoKr halves both factored
    at different ranks (LyCORIS' loader takes the first's rank and cannot build the second,
    ComfyUI divides the alpha by the second's), a Tucker LoCon whose core ``lora_mid`` is not
    square (LyCORIS' core is ``[r, r, *kernel]``; ComfyUI builds the weight as if it were), or a
    whole ``lokr_w1`` of more than two dimensions (ComfyUI's ``kron`` of a 4-D one orders the
    weight's rows and columns otherwise than a 2-D one's). LyCORIS refuses all five."""
    f = module.factors
    mid = f.get("lora_mid") if module.kind == "locon-tucker" else None
    if mid is not None and mid.ndim >= 2 and mid.shape[0] != mid.shape[1]:
        return (
            f"lora_mid has shape {tuple(mid.shape)}, where a Tucker LoCon's core is square, [rank, rank, *kernel]: "
            "neither LyCORIS nor ComfyUI builds a weight from a core of two ranks"
        )
    for kind, (b1, b2), what in (
        ("loha", ("hada_w1_b", "hada_w2_b"), "two Hadamard halves have ranks {} and {}; LoHa's halves"),
        ("lokr", ("lokr_w1_b", "lokr_w2_b"), "two Kronecker halves are factored at ranks {} and {}; LoKr's halves"),
    ):
        if module.kind == kind and b1 in f and b2 in f:
            r1, r2 = (int(f[k].shape[0]) if f[k].ndim else 0 for k in (b1, b2))
            if r1 != r2:
                return f"the {what.format(r1, r2)} share one rank"
    if module.kind == "lokr":
        for half in ("lokr_w1", "lokr_w2"):
            if half in f and (f"{half}_a" in f or f"{half}_b" in f):
                return f"{half} is given both whole and as {half}_a/{half}_b; keep one form"
        w1 = f.get("lokr_w1")
        if w1 is not None and w1.ndim > 2:
            return (
                f"lokr_w1 has shape {tuple(w1.shape)}, where LoKr's first half is a matrix [out1, in1] (LyCORIS "
                "reads no other, and ComfyUI's Kronecker product of one with more dimensions orders the weight's "
                "rows and columns otherwise); save it as 2-D"
            )
    return None


def check_weight_values(name: str, module: WeightModule) -> list[str]:
    """The factors' dtypes and values (finite), and the alpha; a ``"fused"`` module's part by
    part (each as a module of its own) and its stacked ``diff_b``."""
    if module.kind == "fused":
        bias = module.factors.get("diff_b")
        own = [] if bias is None else [replace(module, kind="diff", factors={"diff_b": bias}, parts=())]
        return [p for m in (*module.part_modules(), *own) for p in check_weight_values(name, m)]
    weights = {k: t for k, t in module.factors.items() if k != "on_input"}  # (IA)^3's flag: base_problem
    for k, t in weights.items():
        if t.dtype not in WEIGHT_DTYPES or storage_problem(t) is not None:
            return [f"{_where(name, module)}: {k} is {storage_problem(t) or t.dtype}; weights must be dense floats"]
    flag = module.factors.get("on_input")
    if flag is not None and (why := storage_problem(flag)):
        return [f"{_where(name, module)}: on_input is {why}"]
    finite = _max_abs(list(weights.values()))
    if not bool(torch.isfinite(finite).all()):
        return [f"{_where(name, module)}: NaN or Inf in its {module.kind} factors"]
    rotation = rotation_problem(module) if module.rotates else None
    return [] if rotation is None else [f"{_where(name, module)}: {rotation}"]


def _raise_unreadable(source: str, problems: list[str]) -> None:
    raise AdapterReadError(
        lines(
            format_problems(f"{source}: values that cannot be LoRA weights:", problems),
            "Re-save the adapter in float16/bfloat16/float32 with a finite alpha.",
        )
    )


def _detached(m: LoraModule) -> LoraModule:
    """``m`` with its tensors out of any autograd graph (a copy only where one requires grad)."""
    if any(t is not None and t.requires_grad for t in (m.A, m.B, m.magnitude, m.bias)):
        detach = lambda t: None if t is None else t.detach()  # noqa: E731
        return replace(m, A=m.A.detach(), B=m.B.detach(), magnitude=detach(m.magnitude), bias=detach(m.bias))
    return m


def check_base_weight(name: str, module: LoraModule, weight_of: WeightOf) -> list[str]:
    """A copy of the base weight the adapter carries (PEFT's ``<module>.base_layer.weight``,
    saved for LoRA on ``embed_tokens``/``lm_head``) must be the model's own weight.

    PEFT saves it in case the vocabulary was resized during training. When it equals the
    model's weight (compared in the model's dtype) it changes nothing and the adapter loads;
    when it does not, the adapter's LoRA was trained against other embeddings, and loading it
    would compute something the trainer never saw. A model whose weight is not a dense
    floating-point tensor (a quantized layer: packed data, torchao's tensor subclasses) cannot
    be compared with it: refused too.
    """
    saved = module.base_weight
    if saved is None:
        return []
    where = _where(name, module)
    try:
        own = weight_of(name)
    except UsageError:  # the layer has no weight tensor (a quantized module's packed data)
        form: str | None = "not a tensor (packed quantized data?)"
    else:
        form = unusual_values(own)
    if form is not None:
        return [
            f"{where}: carries a copy of the base weight (base_layer.weight) to compare with the model's, whose weight "
            f"is {form}: the two cannot be compared; load it into the unquantized model, or drop the copy from the "
            "adapter if it was trained on this model's weights"
        ]
    if tuple(saved.shape) != tuple(own.shape):
        rows = f" ({saved.shape[0]} rows vs the model's {own.shape[0]})" if saved.ndim and own.ndim else ""
        return [
            f"{where}: carries a copy of the base weight of shape {tuple(saved.shape)}, but the model's is "
            f"{tuple(own.shape)}: it was trained with a resized vocabulary{rows}; resize the model's embeddings "
            "(resize_token_embeddings) and load its fine-tuned weights first"
        ]
    same = saved.dtype.is_floating_point and torch.equal(saved.detach().to(own.device, own.dtype), own.detach())
    if not same:
        return [
            f"{where}: carries a copy of the base weight that differs from the model's (same shape "
            f"{tuple(own.shape)}): it was trained on other embeddings (a resized or retrained vocabulary); load "
            "the matching base weights first"
        ]
    return []


def check_saved_bases(plan: LoadPlan, names: Sequence[str], weight_of: WeightOf) -> None:
    """:func:`check_base_weight` again, for the layers ``names`` of a plan prepared earlier
    (``runtime.preload``): the copy of the base weight an adapter carries is compared with the
    model's weight as it is now, which ``load_state_dict`` or an in-place write may have changed
    since the preload compared them.

    Raises:
        AdapterMismatchError: naming each layer whose weight is no longer the adapter's copy.
    """
    problems = [p for name in names for p in check_base_weight(name, plan.targets[name], weight_of)]
    if problems:
        raise AdapterMismatchError(
            lines(
                format_problems(
                    f"{plan.source}: preloaded adapter does not fit the model's weights as they are now:", problems
                ),
                "The model's weights changed since preload; load the base weights the adapter was trained on.",
            )
        )


#: The largest finite value of each buffer dtype.
_FINITE_MAX = {t: torch.finfo(t).max for t in WEIGHT_DTYPES}
#: The smallest normal value of each buffer dtype: below it a scale keeps fewer significant
#: bits (float32's 1.2e-38 holds 1e-44 as 7 times its smallest step, 2% off)
_NORMAL_MIN = {t: torch.finfo(t).tiny for t in WEIGHT_DTYPES}


def _check_scale(name: str, module: LoraModule, buffers: BufferManager) -> list[str]:
    """The module's ``alpha / r`` must fit the scale buffer it is written to, at its full
    precision: neither beyond its largest value nor below its smallest normal one."""
    dtype = buffers.arenas[buffers.where[name][0]].S.dtype
    top, tiny = _FINITE_MAX[dtype], _NORMAL_MIN[dtype]
    scale = float(module.scale)
    if tiny <= abs(scale) <= top:  # NaN and inf fail
        return []
    if abs(scale) < tiny:
        return [
            f"{_where(name, module)}: alpha {float(module.alpha):g} over rank {module.rank} gives scale {scale:g}, "
            f"below the smallest normal number of the {dtype} scale buffer ({tiny:.4g}), where it would lose its "
            "precision; the alpha is corrupt"
        ]
    return [
        f"{_where(name, module)}: alpha {float(module.alpha):g} over rank {module.rank} gives scale {scale:g}, beyond "
        f"the range of the {dtype} scale buffer (max {top:.4g}); the alpha is corrupt"
    ]


@functools.cache
def dtype_max(dtype: torch.dtype) -> float:
    """The largest finite value of a floating dtype, as a Python float."""
    return float(torch.finfo(dtype).max)


@functools.cache
def dtype_tiny(dtype: torch.dtype) -> float:
    """The smallest normal value of a floating dtype, as a Python float."""
    return float(torch.finfo(dtype).tiny)


def check_multiplier(plan: LoadPlan, multiplier: Weight, buffers: BufferManager, part: str | None = None) -> None:
    """The user's ``multiplier`` on the plan's per-layer scales must keep every scale within
    its buffer's range (Python floats only: cheap enough for every ``set_scale``): none beyond
    its largest value, and, unless the multiplier is 0, none below its smallest normal one,
    where the scale would lose its precision (the forward multiplies by the rounded scale, and
    merged mode's GEMM takes it in the weights' precision). Each part of a stack is checked
    with its own weight (its rows hold only its own scales); ``part`` names it in the message.

    Raises:
        UsageError: naming the scale, the product out of range and the scales allowed.
    """
    where = f"{part}: " if part else ""
    if isinstance(multiplier, LayerWeights):
        _check_layer_multiplier(plan, multiplier, buffers, where)
        return
    for arena, largest, smallest in zip(buffers.arenas, plan.largest, plan.smallest):
        top = dtype_max(arena.S.dtype)
        if largest * abs(multiplier) > top:  # a Python float: overflow shows as inf
            raise UsageError(
                f"{where}scale={multiplier:g} times the adapter's largest alpha/r ({largest:g}) is "
                f"{largest * multiplier:g}, beyond the range of the {arena.S.dtype} scale buffers (max {top:.4g}). "
                f"Pass a scale of at most {top / largest:.4g} in magnitude."
            )
        tiny = dtype_tiny(arena.S.dtype)
        if multiplier != 0 and smallest * abs(multiplier) < tiny:
            least = tiny / smallest * (1 + 1e-3)  # shown to 4 digits: still enough
            raise UsageError(
                f"{where}scale={multiplier:g} times the adapter's smallest alpha/r ({smallest:g}) is "
                f"{smallest * multiplier:g}, below the smallest normal number of the {arena.S.dtype} scale buffers "
                f"({tiny:.4g}), where it would lose its precision. Pass a scale of at least {least:.4g} in magnitude, "
                "or 0."
            )


def _check_layer_multiplier(plan: LoadPlan, weights: LayerWeights, buffers: BufferManager, where: str) -> None:
    """:func:`check_multiplier` with a weight per layer: each layer's ``alpha / r`` times its
    own weight (a layer at weight 0 is not checked against the smallest normal number)."""
    for a, arena in enumerate(buffers.arenas):
        if len(plan.scales) <= a:
            continue
        own = plan.scales[a].detach().cpu().double().numpy()
        products = np.abs(own * weights.vectors[a])
        top, tiny = dtype_max(arena.S.dtype), dtype_tiny(arena.S.dtype)
        high = np.flatnonzero(~(products <= top))
        low = np.flatnonzero((products < tiny) & (products != 0))
        for i, what, bound in [(int(j), "beyond the range", f"max {top:.4g}") for j in high[:1]] + [
            (int(j), "below the smallest normal number", f"{tiny:.4g}, where it would lose its precision")
            for j in low[:1]
        ]:
            name = next((n for n, (b, k) in buffers.where.items() if b == a and k == i), f"layer {i}")
            w = float(weights.vectors[a][i])
            fix = (
                f"a weight of at most {top / abs(own[i]):.4g} in magnitude"
                if what.startswith("beyond")
                else f"a weight of at least {tiny / abs(own[i]) * (1 + 1e-3):.4g} in magnitude, or 0"
            )
            raise UsageError(
                f"{where}scale={weights:g}: on {name}, alpha/r ({own[i]:g}) times its weight ({w:g}) is "
                f"{own[i] * w:g}, {what} of the {arena.S.dtype} scale buffers ({bound}). Pass {fix} there."
            )


def unit_weight(plan: LoadPlan, multiplier: Weight, where: dict[str, tuple[int, int]]) -> float:
    """The weight :func:`check_unit_scale` checks: ``multiplier``, or with a weight per layer, the
    first of the plan's layers' weights that is not 1 (else 1)."""
    if not isinstance(multiplier, LayerWeights) or plan.unit_scale is None:
        return multiplier if not isinstance(multiplier, LayerWeights) else 1.0
    for name in [*plan.targets, *plan.weights]:
        w = weight_in(multiplier, *where[name])
        if w != 1:
            return w
    return 1.0


def check_unit_scale(plan: LoadPlan, multiplier: float, part: str | None = None) -> None:
    """A plan holding a module that means something only at scale 1
    (:attr:`~lorahot.LoraModule.unit_scale`, :attr:`~lorahot.WeightModule.unit_scale`: a LyCORIS
    or kohya module trained with weight decomposition) must be loaded at a user ``multiplier``
    of 1; ``part`` names a stack's part.

    Raises:
        UsageError: naming the module, why, and the fix.
    """
    name = plan.unit_scale
    if multiplier != 1 and name is not None:
        modules: list[tuple[str, LoraModule | WeightModule]] = [*plan.targets.items(), *plan.weights.items()]
        found = next((n, m) for n, m in modules if n == name and m.unit_scale)
        where = f"{part}: " if part else ""
        shown_scale = f"{multiplier:g}" if float(f"{multiplier:g}") == multiplier else repr(multiplier)  # never "1"
        module = found[1]
        if isinstance(module, WeightModule) and module.kind == "fused":  # the part that is
            module = next(p for p in module.part_modules() if p.unit_scale)
            found = (found[0], module)
        if isinstance(module, WeightModule) and module.rotates and "dora_scale" not in module.factors:
            raise UsageError(
                f"{where}scale={shown_scale}, but {_where(*found)} is a LyCORIS {module.kind} module, which lorahot "
                "loads at scale 1 only: at another strength the reference libraries disagree on its weight (LyCORIS "
                "rotates by I + s * (R - I), per block or per butterfly stage; ComfyUI takes that rotation's change "
                "of the weight times s once more). Load it at scale 1, or merge it into the model at the strength "
                "you want with your tool (LyCORIS, ComfyUI) and load the merged model."
            )
        raise UsageError(
            f"{where}scale={shown_scale}, but {_where(*found)} is a module trained with LyCORIS weight decomposition "
            "(dora_scale), which lorahot loads at scale 1 only: at another strength the reference libraries disagree "
            "on its weight (LyCORIS rescales V = W + dW to V * (s * (m / ||V|| - 1) + 1), ComfyUI blends "
            "W + s * (m * V / ||V|| - W)), and neither is DoRA at scale s. Load it at scale 1, or merge it into the "
            "model at the strength you want with your tool (LyCORIS, ComfyUI) and load the merged model."
        )


#: per arena, ``(layer index, A, B)`` triples
Staged = list[list[Entry]]


@dataclass
class Checked:
    """An adapter that passed every check, ready to write (``entries`` on the arenas'
    devices) or to pack (``entries`` where they were read)."""

    plan: LoadPlan
    entries: Staged
    extras: list[list[Extra]] = field(default_factory=list)


def validate(
    adapter: Adapter,
    buffers: BufferManager,
    specs: dict[str, LayerSpec],
    *,
    stage: bool,
    weight_of: WeightOf | None = None,
    strict: bool = True,
    extras_refusal: ExtrasRefusal | None = None,
    components: tuple[str, ...] = (),
    planned: LoadPlan | None = None,
    others: tuple[str, ...] = (),
    merged: bool = False,
    heads: Mapping[str, int] | None = None,
    denoiser: str | None = None,
    weightless: tuple[str, ...] = (),
    unwrapped: tuple[tuple[str, str], ...] = (),
    levels: frozenset[str] | None = None,
) -> Checked:
    """Decides whether ``adapter`` can be loaded; the one path ``load`` and ``preload`` share.

    Args:
        stage: move the tensors to the arenas' devices first (``load``); else check them where
            they are (``preload``, which packs them on the host).
        weight_of: the model's weight of an injected layer, to compare with a saved copy.
        strict: refuse modules that map onto no injected layer (else skip them, see
            :func:`plan_load`).
        extras_refusal: why the runtime cannot run a module's DoRA magnitude or LoRA bias on
            an injected layer, or None.
        components: the runtime's component names (a runtime over several models), or empty.
        planned: the plan :func:`plan_load` makes for ``adapter`` with these arguments, known
            already (from its structure, see :mod:`lorahot.runtime.skeleton`); its values are
            checked all the same.
        others: the model's module paths that are not injected layers (see :func:`plan_load`).
        merged: the runtime is in merged mode, whose buffers take the weights' dtype (the fix a
            refusal names is then another model dtype, or unmerged buffers of a wider one).
        heads: the attention head sizes of the model's modules (see :func:`plan_load`).
        denoiser: with ``components``, the one that takes the adapter's denoiser modules
            (:func:`lorahot.resolve.components.route`); None: the runtime's own.
        weightless: the model's normalization layers without a weight (see :func:`plan_load`).
        unwrapped: the model's modules read without a call (see :func:`plan_load`).
        levels: the model's wrapper levels (see :func:`plan_load`).

    Raises:
        AdapterMismatchError, AdapterReadError: see :func:`plan_load`; also NaN or Inf in any
            weight, or values beyond the range of the arena's dtype. Nothing has been written.
    """
    plan = planned or plan_load(
        adapter,
        buffers,
        specs,
        weight_of,
        strict,
        extras_refusal,
        components,
        others,
        heads,
        denoiser,
        weightless,
        unwrapped,
        levels,
    )
    entries = stage_entries(plan, buffers) if stage else [[(i, m.A, m.B) for i, m in e] for e in plan.entries]
    extras = _extras(plan, buffers, stage)
    _check_range(plan, buffers, entries, merged)
    _check_extras(plan, buffers, extras, merged)
    return Checked(plan, entries, extras)


def _extras(plan: LoadPlan, buffers: BufferManager, stage: bool) -> list[list[Extra]]:
    """Per arena, the ``(layer, row, values [out])`` extras rows the adapter writes: DoRA
    magnitudes and LoRA biases, flattened (on the arena's device if ``stage``)."""
    out: list[list[Extra]] = []
    with torch.no_grad():
        for arena, entries in zip(buffers.arenas, plan.entries):
            rows: list[Extra] = []
            for i, m in entries:
                for row, t in ((EXTRA_M, m.magnitude), (EXTRA_BIAS, m.bias)):
                    if t is not None:
                        rows.append((i, row, t.reshape(-1).to(arena.device) if stage else t.reshape(-1)))
            out.append(rows)
    return out


def _check_extras(plan: LoadPlan, buffers: BufferManager, extras: list[list[Extra]], merged: bool = False) -> None:
    """DoRA magnitudes and LoRA biases finite and within the scales' dtype, and (unmerged) each
    LoRA bias's update ``alpha / r * lora_bias`` within the LoRA buffers' dtype, as
    :func:`_check_range` checks the update ``alpha / r * B @ A``; fills
    :attr:`LoadPlan.bias_bound`. Merged mode checks its merged biases instead.

    Raises:
        AdapterReadError: naming the modules with NaN, Inf or values out of range.
    """
    names = {(a, i): n for n, (a, i) in buffers.where.items()}
    bad: list[str] = []
    too_large: list[str] = []
    reached_most = 0.0  # the largest bias update out of range, to name a dtype that holds it
    plan.bias_bound = [torch.zeros(len(arena.specs), dtype=torch.float64) for arena in buffers.arenas]
    for a, (arena, rows) in enumerate(zip(buffers.arenas, extras)):
        if not rows:
            continue
        top = torch.finfo(arena.E.dtype).max
        largest = _max_abs([t for _, _, t in rows])
        bad += [
            f"{names[(a, i)]}: {'DoRA magnitude' if row == EXTRA_M else 'LoRA bias'} has largest |value| {v:.6g}"
            for (i, row, _), v in zip(rows, largest.tolist())
            if not v <= top  # NaN fails too
        ]
        for (i, row, _), v in zip(rows, largest.tolist()):
            if row == EXTRA_BIAS:
                plan.bias_bound[a][i] = reached = v * abs(float(plan.scales[a][i]))
                if not merged and math.isfinite(reached) and reached > torch.finfo(arena.dtype).max:
                    reached_most = max(reached_most, reached)
                    too_large.append(
                        f"{names[(a, i)]}: its LoRA bias alpha / r * lora_bias reaches |value| {reached:.6g} > "
                        f"{_dtype_name(arena)} max {torch.finfo(arena.dtype).max:.6g}"
                    )
    if bad:
        raise AdapterReadError(
            lines(
                format_problems(f"{plan.source}: NaN, Inf or out-of-range values in:", bad),
                "The adapter is corrupt; re-train or re-download it.",
            )
        )
    if too_large:
        raise AdapterReadError(
            lines(
                format_problems(f"{plan.source}: LoRA weights or updates out of the LoRA buffers' range:", too_large),
                f"{_range_fix(reached_most)}",
            )
        )


def forget_values(plan: LoadPlan) -> None:
    """Replaces, in place, the tensors of ``plan``'s LoRA modules with meta tensors of the same
    shapes and dtypes, once the arena holds their values: they may be views of a buffer the
    next read reuses (:mod:`lorahot.io.read_buffers`), and a read of them would now fail
    loudly instead of seeing another file's bytes. Shapes, ranks and every host-side figure
    (scales, ranges) stay. Not for merged mode, which recomputes from the values."""
    new: dict[int, LoraModule] = {}
    metas: dict[tuple[torch.Size, torch.dtype], torch.Tensor] = {}  # one per shape: layers repeat theirs

    def meta(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        key = (t.shape, t.dtype)
        if key not in metas:
            metas[key] = torch.empty(t.shape, dtype=t.dtype, device="meta")
        return metas[key]

    def forgotten(m: LoraModule) -> LoraModule:
        if id(m) not in new:
            tensors = {f: meta(getattr(m, f)) for f in ("A", "B", "base_weight", "magnitude", "bias")}
            new[id(m)] = replace(m, **tensors)  # type: ignore[arg-type]
        return new[id(m)]

    plan.targets = {name: forgotten(m) for name, m in plan.targets.items()}
    plan.entries = [[(i, forgotten(m)) for i, m in entries] for entries in plan.entries]


def stage_entries(plan: LoadPlan, buffers: BufferManager) -> Staged:
    """Moves every A and B to its arena's device (no checks: see :func:`validate`)."""
    with torch.no_grad():
        return [
            [(i, m.A.to(arena.device), m.B.to(arena.device)) for i, m in entries]
            for arena, entries in zip(buffers.arenas, plan.entries)
        ]


def restage(plan: LoadPlan, buffers: BufferManager) -> Checked:
    """A plan that passed :func:`validate` already (a prepared adapter's, from the host cache)
    with its tensors and extras moved to the arenas' devices, ready to write as a part of a
    stack (no check is repeated)."""
    return Checked(plan, stage_entries(plan, buffers), _extras(plan, buffers, stage=True))


def _check_range(plan: LoadPlan, buffers: BufferManager, staged: Staged, merged: bool = False) -> None:
    """Every value finite and within the arena dtype's range (so converting it stays finite).

    Raises:
        AdapterReadError: naming the modules with NaN or Inf, or else those out of range (with
            the dtype to inject with where a wider one holds them: a float16 model's adapter
            whose values only float32 holds is not corrupt).
    """
    names = {(a, i): n for n, (a, i) in buffers.where.items()}
    bad_values: list[str] = []
    too_large: list[str] = []
    reached_most = 0.0  # the largest value out of range, to name a dtype that holds it
    plan.scaled_b = [torch.zeros(len(arena.specs), dtype=torch.float64) for arena in buffers.arenas]
    plan.a_shift = [torch.ones(len(arena.specs), dtype=torch.float64) for arena in buffers.arenas]
    plan.update_bound = [torch.zeros(len(arena.specs), dtype=torch.float64) for arena in buffers.arenas]
    for a, (arena, entries) in enumerate(zip(buffers.arenas, staged)):
        tensors = [t for _, A, B in entries for t in (A, B)]
        if not tensors:
            continue
        top = torch.finfo(arena.dtype).max
        largest = _max_abs(tensors)  # float64 [2 * n], host
        ranks = torch.tensor([A.shape[0] for _, A, _ in entries], dtype=torch.float64)
        products = ranks * (largest[0::2] * largest[1::2])  # r * max|A| * max|B| bounds every entry of B @ A
        bounds = {names[(a, i)]: b for (i, _, _), b in zip(entries, products.tolist())}
        plan.delta_bound.update(bounds)
        plan.factor_bound.update(bounds)
        index = torch.tensor([i for i, _, _ in entries])
        scales = plan.scales[a][index].abs()
        plan.scaled_b[a][index] = largest[1::2] * scales
        if arena.dtype in SHIFTED_DTYPES and bool(torch.isfinite(largest).all()):
            plan.a_shift[a][index] = _a_shifts(entries, largest[0::2], plan.scaled_b[a][index], top)
        _check_precision(plan, arena, [names[(a, i)] for i, _, _ in entries], largest, merged)
        in_range = (largest[0::2] <= top) & (largest[1::2] <= top)  # factors out of it are named below
        maybe = ((products * scales > top) & in_range).nonzero().flatten().tolist()
        for k in maybe:  # each factor in range, their product perhaps not: computed where the bound says so
            i, A, B = entries[k]
            exact = _delta_max(A, B, arena.specs[i].groups)
            if not (reached := exact * float(scales[k])) <= top:  # NaN fails too
                reached_most = max(reached_most, reached)
                too_large.append(
                    f"{names[(a, i)]}: its update scale * B @ A reaches |value| {reached:.6g} > {_dtype_name(arena)} "
                    f"max {top:.6g} (each factor is in range)"
                )
            elif exact < float(products[k]):  # the exact maximum is the tighter bound
                products[k] = exact
                plan.delta_bound[names[(a, i)]] = exact
        plan.update_bound[a][index] = products * scales
        if bool((largest <= top).all()):  # NaN compares False
            continue
        for k, (i, _, _) in enumerate(entries):
            pair = largest[2 * k : 2 * k + 2]
            if not bool(torch.isfinite(pair).all()):
                bad_values.append(names[(a, i)])
            elif not bool((pair <= top).all()):
                reached_most = max(reached_most, float(pair.max()))
                too_large.append(
                    f"{names[(a, i)]}: largest |value| {float(pair.max()):.6g} > {_dtype_name(arena)} max {top:.6g}"
                )
    if bad_values:
        raise AdapterReadError(
            lines(
                format_problems(f"{plan.source}: NaN or Inf in LoRA weights of:", bad_values),
                "The adapter is corrupt; re-train or re-download it.",
            )
        )
    if too_large:
        raise AdapterReadError(
            lines(
                format_problems(f"{plan.source}: LoRA weights or updates out of the LoRA buffers' range:", too_large),
                f"{_range_fix(reached_most, merged)}",
            )
        )


def _a_shifts(entries: list[Entry], max_a: torch.Tensor, scaled_b: torch.Tensor, top: float) -> torch.Tensor:
    """Per entry of a float16 arena, at least the largest power of two a wide layer divides
    one of its A rows by (:func:`lorahot.kernels.row_scale.row_shifts`: twice the row's sum of
    ``|value|`` as stored in float16, rounded up). From ``max|A|`` first: the sum is at most the
    row's length times it (times ``1 + 2**-11`` for float16's rounding). Where that bound would
    leave ``scale * B`` times it within 1024 of float16's largest value, from the rows themselves
    (a margin of ``2**-7`` for the summation order), so that only a shift that is really needed
    bounds the scale."""
    lengths = torch.tensor([A.reshape(A.shape[0], -1).shape[1] for _, A, _ in entries], dtype=torch.float64)
    out = power_of_two_at_least((2.0 * (1 + 2**-10) * lengths * max_a).clamp_min(1.0))
    for k in ((out * scaled_b) * 1024 > top).nonzero().flatten().tolist():
        A = entries[k][1]
        sums = A.reshape(A.shape[0], -1).to(torch.float16).float().abs().sum(dim=1)
        out[k] = float(power_of_two_at_least((2.0 * (1 + 2**-7) * sums.max().double()).clamp_min(1.0)))
    return out


def _wider(name: str, merged: bool) -> str:
    """How to get LoRA buffers of dtype ``name``: ``inject(..., dtype=...)``, which merged mode
    (buffers of the weights' dtype) refuses."""
    if merged:
        return (
            f"Inject without merged=True and with dtype=torch.{name}, or convert the model to {name} before inject "
            "(merged mode keeps the adapter in the weights' dtype)"
        )
    return f"Inject with dtype=torch.{name}"


def _range_fix(reached: float, merged: bool = False) -> str:
    """The fix for values (factors, or an update ``scale * B @ A``) of largest ``|value|``
    ``reached`` that the LoRA buffers' dtype cannot hold: the narrowest wider dtype that holds
    them (PEFT keeps a float16 model's adapters in float32), else a smaller adapter."""
    for dtype in (torch.float32, torch.float64):
        if reached <= torch.finfo(dtype).max:
            name = str(dtype).removeprefix("torch.")
            return (
                f"{_wider(name, merged)} (LoRA buffers of {name}'s range; PEFT keeps a float16 model's adapters in "
                "float32), or re-save the adapter with smaller values or a smaller alpha."
            )
    return "Re-save the adapter with smaller values or a smaller alpha: no float dtype holds its update."


def _check_precision(
    plan: LoadPlan, arena: Arena, layers: list[str], largest: torch.Tensor, merged: bool = False
) -> None:
    """Refuses factors (``largest``: each layer's A and B largest ``|value|``, interleaved) whose
    every value lies below the arena dtype's smallest normal number: stored there they would
    keep a few bits or none (float16 from 6.1e-5 down). PEFT keeps adapters in float32."""
    tiny = torch.finfo(arena.dtype).tiny
    pairs = largest.view(-1, 2)
    lost = ((pairs > 0) & (pairs < tiny)).any(dim=1).tolist()
    if any(lost):
        raise AdapterMismatchError(
            lines(
                format_problems(
                    f"{plan.source}: factors whose every value is below the smallest normal {_dtype_name(arena)} "
                    f"({tiny:.3g}), so they would lose their precision in this model's LoRA buffers:",
                    [
                        f"{n}: largest |value| {float(pair[pair > 0].min()):.3g}"
                        for n, pair, x in zip(layers, pairs, lost)
                        if x
                    ],
                ),
                f"{_wider('float32', merged)}; PEFT keeps adapters in float32 too.",
            )
        )


def _dtype_name(arena: Arena) -> str:
    return str(arena.dtype).removeprefix("torch.")


def _delta_max(a: torch.Tensor, b: torch.Tensor, groups: int) -> float:
    """The largest ``|value|`` of ``B @ A`` (in float64; for a grouped conv, of each group's
    product), computed only where the factors' bound says it may leave the dtype's range."""
    return float(lora_update_max([(a, b, 1.0)], groups))


def _max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The largest ``|value|`` of each tensor (NaN if it holds one), as float64 on the host;
    one reduction and one transfer per device."""
    out = torch.empty(len(tensors), dtype=torch.float64)
    by_device: dict[torch.device, list[int]] = {}
    for k, t in enumerate(tensors):
        if t.numel() == 0:  # the inf norm of nothing is undefined; nothing is out of range
            out[k] = 0.0
        else:
            by_device.setdefault(t.device, []).append(k)
    with torch.no_grad():
        for device, ks in by_device.items():
            group = [tensors[k] for k in ks]
            if device.type == "cpu":
                norms = _cpu_max_abs(group)
            else:
                norms = torch.stack(torch._foreach_norm(group, float("inf")))
            out[ks] = norms.double().cpu()  # one cast and one transfer, not one per tensor
    return out


def _cpu_max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The largest ``|value|`` of each CPU tensor (NaN if it holds one), ``[n]``.

    As ``max(-min, max)`` from one ``aminmax`` pass per tensor: the CPU's infinity norm is
    about ten times slower (13 ms against 1.2 ms for a 154-layer rank-8 adapter on the CPU
    box). Both propagate NaN, so the range checks see the same values."""
    pairs = [torch.aminmax(t) for t in tensors]
    low = torch.stack([lo for lo, _ in pairs])
    high = torch.stack([hi for _, hi in pairs])
    return torch.maximum(low.neg(), high)


def pack_host(checked: Checked, buffers: BufferManager) -> list[Pack]:
    """Packs a checked adapter into one host buffer per arena (pinned for GPU arenas)."""
    packs = []
    with torch.no_grad():
        for k, (arena, entries, scales) in enumerate(zip(buffers.arenas, checked.entries, checked.plan.scales)):
            extras = checked.extras[k] if checked.extras else []
            packs.append(arena.pack(entries, scales, pin=arena.device.type == "cuda", extras=extras))
    return packs
