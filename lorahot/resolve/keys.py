"""Matching an adapter's module keys to the injected layers, through the model's own names.

For each key, in order:

1. the key itself, then the key without a known component prefix (``base_model.model.``,
   ``unet.``, ``diffusion_model.``, ...): a layer of exactly that name;
2. the format's aliases of those (``img_in`` -> ``x_embedder``), exactly;
3. a layer whose name ends with ``"." + key`` or the key ends with ``"." + name`` (the key, then
   its aliases: an old diffusers ``text_model.encoder...q_proj`` key, its ``to_q_lora`` renamed, on
   a transformers-5 CLIP without the ``text_model`` level); for a naming whose aliases are exact (PEFT's), this step,
   over the key alone, comes before step 2: its aliases stand for a name that is no layer of the
   model, and a key that is one under a wrapper (Krea 2's ``first`` on a model's own
   ``enc.first``) keeps it; for any other dotted naming, this step's first half, a layer whose name
   ends with ``"." + key`` (the key's own path under a wrapper level of the model), comes before
   step 2 as well (the old diffusers naming's ``layers.0.attention.out`` on a model's own
   ``enc.layers.0.attention.out``, never Lumina2's ``layers.0.attn.to_out.0``); an underscore
   naming's keys keep step 2 first, their dots being a guess of the naming's renames (musubi's
   ``time_embedder.proj_in`` is MiniMax-H3's time embedder, which the alias names, never a
   model's ``proj_in``);
4. the underscore form: every injected layer's name with ``.`` -> ``_`` (kohya names, and
   LDM block names mapped to diffusers ones), exactly or as a ``_``-suffix;
5. the underscore form of a key that carries wrapper levels the model lacks
   (``text_model_encoder_layers_0_self_attn_q_proj`` on transformers-5 CLIP, whose layers are
   ``encoder.layers.0.self_attn.q_proj``): the longest ``_``-suffix of the key that is a
   layer's underscore form, dropping only leading segments without a number (wrappers such as
   ``text_model`` or ``model``, never a block index) and keeping at least one named segment,
   so no table per model is needed;
6. for an underscore naming, the underscore form of the format's aliases of the key (the kohya
   spelling of original names, :func:`lorahot.formats.kohya.of_original`, whose alias targets
   keep a stream name such as Flux.3's ``image_0`` in underscores).

The levels a suffix match skips, on either side, are wrappers: none carries a number (a key
without a block index never lands inside ``transformer_blocks.0``), and those skipped from the
key name no module of the model (``time_embedder.proj_in`` names a module under the model's
``time_embedder``, which it lacks, never the model's top-level ``proj_in``). A key's first level
that is a pipeline component's name (:data:`COMPONENT_NAMES`: ``vae.``, ``image_encoder.``) is
never a wrapper either: its modules are that component's, not the injected model's whose paths
the rest of the key happens to match; a naming's own component prefixes (``unet.``,
``text_encoder_3.``) are stripped as before (step 1).

A key that matches nothing and that the format declares fused (Flux's ``img_attn.qkv``) is
split into its parts (:mod:`lorahot.resolve.split`: a LoRA by B's rows, a weight delta such as
LoKr by the rows of its ``ΔW``), which are then matched in its place.

Every step sees each layer by its path and by its file name
(:func:`~lorahot.resolve.file_names.file_name`: the path with the wrapper levels of a block compiled
or checkpoint-wrapped before inject dropped, ``layers.0._orig_mod.self_attn.q_proj`` as
``layers.0.self_attn.q_proj``), and each key as it is spelled, then without such levels of its own
(a file saved from the wrapped model on the unwrapped one); a hit is the layer's path.

The first step with any hit decides; more than one hit is an error listing the candidates.
Where the model's other modules are known (``others``: every module path that is not an
injected layer), the steps run over the injected layers and those modules together, so a key
that names a module which is not injected matches nothing, rather than a neighbour its
underscore form also fits (kohya's ``single_transformer_blocks_0_attn_to_q`` is no
``transformer_blocks.0.attn.to_q`` when the single blocks are not injected, nor the reverse).
The model's normalization layers without a weight are none of those modules (a naming's alias
of such a path lands on the norm it means); a key that names one of them and nothing else is
refused as such, in any naming: there is no weight to fold its delta into. So is a key that
names only modules the model reads without calling them (``unwrapped``: ``nn.MultiheadAttention``'s
``out_proj``), which inject refuses as targets: refused with why, not with a hint to inject them.
Component prefixes end with their naming's separator (``unet.``, ``lora_te1_``), so stripping
one never cuts a name component in two (``text_encoder.`` does not strip ``text_encoder_2.``).
Lookups are memoized within a byte budget (keys come from files).
"""

from __future__ import annotations

import collections
import difflib
import functools
import re
from collections.abc import Collection, Iterable, Mapping, Sequence

from lorahot.adapter import Adapter, LoraModule, WeightModule
from lorahot.errors import AdapterMismatchError, format_problems, lines, shown
from lorahot.formats import FORMATS, KeyFormat, format_named
from lorahot.formats.table import alias_hits
from lorahot.memo import BoundedMemo, str_bytes
from lorahot.resolve import ldm
from lorahot.resolve.file_names import file_name, may_hold_wrapper
from lorahot.resolve.split import placed

__all__ = [
    "resolve_keys",
    "resolve_all",
    "file_naming",
    "outside",
    "head_sizes",
    "COMPONENT_NAMES",
    "COMPONENT_PREFIXES",
    "ROOT_PREFIXES",
    "PREFIXED_COMPONENTS",
]

#: Every component prefix any format knows, longest first.
_PREFIXES = tuple(sorted({p for f in FORMATS for p in f.prefixes}, key=len, reverse=True))
#: diffusers' pipeline components that hold modules (``pipe.components``): a key starting with one
#: of these and a dot names that component's modules (routed to it on a pipeline runtime,
#: :mod:`lorahot.resolve.components`), so the lookup never drops it as a wrapper level
COMPONENT_NAMES = frozenset(
    (
        *("unet", "transformer", "transformer_2", "prior", "controlnet"),
        *("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4", "image_encoder"),
        *("vae", "audio_vae", "vocoder", "movq", "safety_checker", "connectors", "text_conditioner"),
    )
)
#: File prefixes that name a pipeline component by another name than the component's: the
#: original LTX-2 checkpoint's ``text_embedding_projection.`` is an LTX-2 pipeline's ``connectors``
#: (diffusers' ``LTX2TextConnectors``), where diffusers' LTX-2 loader sends its modules; so are its
#: ``video_embeddings_connector.`` and ``audio_embeddings_connector.``, which the checkpoint holds
#: in the transformer (``diffusion_model.``; ComfyUI adapts them there) and diffusers' checkpoint
#: conversion moves to the connectors (``video_connector.``), with any prefix of the original names,
#: and in their kohya spelling (``lora_unet_video_embeddings_connector_``, ``lora_transformer_``).
#: Anima's ``llm_adapter.`` (:data:`ROOT_PREFIXES`) is an Anima pipeline's ``text_conditioner``
#: (diffusers' ``AnimaTextConditioner``), where diffusers' Anima loader sends its modules.
COMPONENT_PREFIXES = {
    "text_embedding_projection.": "connectors",
    **{
        f"{head}{modality}_embeddings_connector.": "connectors"
        for head in ("", "diffusion_model.", "model.diffusion_model.", "transformer.", "net.")
        for modality in ("video", "audio")
    },
    **{
        f"{head}{modality}_embeddings_connector_": "connectors"
        for head in ("lora_unet_", "lora_transformer_")
        for modality in ("video", "audio")
    },
    **dict.fromkeys(
        (
            *(
                f"{head}llm_adapter."
                for head in ("", "diffusion_model.", "model.diffusion_model.", "transformer.", "net.")
            ),
            *(f"{head}llm_adapter_" for head in ("lora_unet_", "lora_transformer_")),
        ),
        "text_conditioner",
    ),
}
#: The :data:`COMPONENT_PREFIXES` after which the component's own module paths follow, as diffusers'
#: conversion keeps them: Anima's ``diffusion_model.llm_adapter.blocks.0.self_attn.q_proj`` is the
#: text conditioner's ``blocks.0.self_attn.q_proj`` (any prefix of Anima's original names, and
#: kohya's ``lora_unet_llm_adapter_``). Routing strips them; a lookup over any other model's layers
#: never matches a key under one (the conditioner's module names are the transformer's original
#: ones, which Anima's naming aliases onto the transformer's layers).
ROOT_PREFIXES = tuple(p for p, c in COMPONENT_PREFIXES.items() if c == "text_conditioner")
#: What each component that :data:`COMPONENT_PREFIXES` names is, for messages.
PREFIXED_COMPONENTS = {
    "connectors": "diffusers' LTX-2 pipeline's text connectors",
    "text_conditioner": "diffusers' Anima pipeline's text conditioner, AnimaTextConditioner",
}

#: The top modules of a pipeline component that no other component has, which a naming's aliases
#: name (LTX-2's connector transformers, ``video_connector.``): like a component's name, never a
#: wrapper level that a lookup drops, so such a key never lands on another component's layers
#: (``video_connector.transformer_blocks.0.attn1.to_q`` on the transformer's ``transformer_blocks.0``).
COMPONENT_ROOTS = frozenset(("video_connector", "audio_connector", "llm_adapter"))


class _Names:
    """The injected layer names, indexed for the lookups above.

    Suffix lookups go through dicts of every name's suffixes after each ``.`` (and, in the
    underscore form, each ``_``), so one key costs O(its own components), not O(layers): a
    file of 30,000 keys that match nothing must not cost minutes.
    """

    def __init__(self, names: list[str], levels: frozenset[str] | None = None) -> None:
        self.names = names
        #: a file name (:func:`~lorahot.resolve.file_names.file_name`) of names under a wrapper level
        #: of the model (``levels``; None: every level of those names) -> those names (and itself,
        #: where it is a name too); the lookups see both spellings
        self.real = _file_names(names, levels)
        names = [*names, *(f for f in self.real if f not in self.real[f])]
        self.exact = set(names)
        self.longest = max(map(len, names), default=0)
        self.underscore: dict[str, list[str]] = {}
        for n in names:
            self.underscore.setdefault(n.replace(".", "_"), []).append(n)
        self.dotted_tails = _tails({n: [n] for n in names}, ".")  # "b.c" -> names ending in ".b.c"
        self.underscore_tails = _tails(self.underscore, "_")  # "b_c" -> names whose form ends in "_b_c"
        self.per_block = ldm.layers_per_block(names)
        #: the names and the modules they are inside (``time_embedder`` of ``time_embedder.linear_1``)
        self.paths = {n[:i] for n in names for i, c in enumerate(n + ".") if c == "."}
        self.underscore_paths = {p.replace(".", "_") for p in self.paths}
        #: the injected names with the model's other modules, where those are known (_index)
        self.whole: _Names | None = None
        #: ``whole`` with the model's norms without a weight, and those norms (_index)
        self.every: _Names | None = None
        self.weightless: frozenset[str] = frozenset()
        #: the model's modules read without a call, which inject refuses: path -> why (_index)
        self.read_directly: dict[str, str] = {}
        # (key, format) -> the names it matches; per index, so it goes with the index
        self.lookups: BoundedMemo[tuple[str, KeyFormat], tuple[str, ...]] = BoundedMemo(
            _LOOKUP_BYTES, lambda k, v: str_bytes(k[0]) + 8 * len(v)
        )

    def named(self, hits: Iterable[str]) -> tuple[str, ...]:
        """The names ``hits`` (names and file names, as the lookups give them) stand for, sorted."""
        return tuple(sorted({n for h in hits for n in self.real.get(h, (h,))}))

    def dotted(self, key: str) -> list[str]:
        """Names ending in ``"." + key``, and names ``key`` ends in (after a ``.``); the levels
        either side has beyond the other are wrappers (:meth:`wrapper`)."""
        tail = key[-(self.longest + 1) :]  # a name key ends in is at most this long
        return self.wrapping(key) + [
            t for t in _after(tail, ".") if t in self.exact and self.wrapper(key[: -len(t) - 1])
        ]

    def wrapping(self, key: str) -> list[str]:
        """Names ending in ``"." + key``, the levels before it wrappers (none carries a number):
        ``key``'s own path, under a wrapper level of the model the file leaves out."""
        return [n for n in self.dotted_tails.get(key, []) if _unnumbered(n[: -len(key) - 1])]

    def wrapper(self, levels: str) -> bool:
        """Whether ``levels``, the leading levels of a dotted key that a layer's name lacks,
        can be a wrapper the model lacks: none carries a number (a block index), the first is
        no pipeline component (:data:`COMPONENT_NAMES`), and none, after a component prefix or
        not, is a module of the model (see :meth:`module_end`) or the top module of a component
        (:data:`COMPONENT_ROOTS`)."""
        if levels.partition(".")[0] in COMPONENT_NAMES or not COMPONENT_ROOTS.isdisjoint(levels.split(".")):
            return False
        starts = [0, *(i + 1 for i, c in enumerate(levels) if c == ".")]
        return _unnumbered(levels) and all(self.module_end(levels[i:] + ".", ".") > len(levels) - i for i in starts)

    def module_end(self, key: str, sep: str) -> int:
        """Where the first module of the model that ``key``'s leading levels name ends (the
        ``sep`` after it), or ``len(key)``: ``time_embedder`` in ``time_embedder.proj_in``, where
        the model has ``time_embedder.linear_1``. Such a key names a module under one the model
        has, which the model lacks, never a layer that the key only ends like (``proj_in``)."""
        known = self.paths if sep == "." else self.underscore_paths
        i = key.find(sep)
        while 0 <= i <= self.longest:
            if key[:i] in known:
                return i
            i = key.find(sep, i + 1)
        return len(key)

    def by_underscore(self, key: str) -> list[str]:
        u = key.replace(".", "_")
        forms = [u]
        if ldm.LDM_MARKER.match(u):
            mapped = ldm.to_diffusers(u, self.per_block)
            forms = [mapped] if mapped else forms
        for form in forms:
            if form in self.underscore:
                return self.underscore[form]
            hits = self.longer(form)
            if hits:
                return hits
        return []

    def longer(self, form: str) -> list[str]:
        """Names whose underscore form ends in ``"_" + form``, the levels before it wrappers
        (no number: ``transformer_blocks_0_`` is a block, which ``form`` does not name), ``form``
        starting at a level of the name: ``blocks_0_ff_net_0_proj`` names a ``blocks.0`` level,
        never the end of the name ``transformer_blocks`` (another model's blocks)."""
        return [
            n
            for n in self.underscore_tails.get(form, [])
            if n[-len(form) - 1] == "." and _unnumbered(n[: -len(form) - 1])
        ]

    def unwrapped(self, key: str) -> list[str]:
        """Step 5: the names whose underscore form is the longest ``_``-suffix of ``key`` after
        leading wrapper segments (without digits, naming no module of the model) are dropped;
        empty if none is. The suffix names a layer exactly: with levels skipped on both sides,
        any two names that end alike would match (``final_layer_adaln_proj_linear`` and
        ``norm_out.linear``)."""
        u = key.replace(".", "_")
        # a key with dots names its levels (a split's part, a rename's dotted original names):
        # segments are dropped at its dots only, never inside a name (``transformer`` of
        # ``transformer_blocks.0``, whose tail ``blocks.0`` is another model's block)
        cut = "." if "." in key else "_"
        digit = next((k for k, c in enumerate(u) if c.isdigit()), len(u))
        digit = min(digit, self.module_end(u, "_") - 1)  # nor levels that name a module of the model
        # tails longer than every name match none: start where they fit (linear in the key,
        # whatever its length; a hostile file's keys are up to 1,024 characters)
        i = u.find("_", max(0, len(u) - self.longest - 1))
        while i >= 0:
            if i > digit:
                return []  # a dropped segment would carry a block index: not a wrapper
            tail = u[i + 1 :]
            if all(any(c.isdigit() for c in seg) for seg in tail.split("_")):
                return []  # only indices left (``adaLN_modulation_1`` -> ``1``): no name to match
            hits = self.underscore.get(tail) if key[i] == cut else None
            if hits:
                return hits
            i = u.find("_", i + 1)
        return []


def head_sizes(modules: Iterable[tuple[str, object]]) -> dict[str, int]:
    """The attention head size each of ``modules`` (a model's ``named_modules()``) states, by
    path: an integer ``head_dim`` > 0 set on the instance (diffusers' and transformers'
    attention modules); the ``heads`` of :func:`resolve_all`."""
    out = {}
    for name, module in modules:
        size = getattr(module, "__dict__", {}).get("head_dim")
        if type(size) is int and size > 0:
            out[name] = size
    return out


def _held_heads(targets: Sequence[str], fmt: KeyFormat, index: _Names, heads: Mapping[str, int]) -> set[int]:
    """The head sizes of the modules holding the layers ``targets`` match in the model."""
    held = {name.rpartition(".")[0] for target in targets for name in _in_model(target, fmt, index)}
    return {heads[h] for h in held if h in heads}


def outside(modules: Sequence[str], layers: Sequence[str]) -> tuple[str, ...]:
    """The module paths of ``modules`` (a model's, ``named_modules`` order) that are neither
    one of the injected ``layers`` nor inside one (its wrapped base module), nor the root: the
    ``others`` of :func:`resolve_all`."""
    injected = set(layers)
    out = []
    for name in modules:
        if not name or name in injected:
            continue
        head, dot, _ = name.rpartition(".")
        while dot and head not in injected:
            head, dot, _ = head.rpartition(".")
        if not dot:
            out.append(name)
    return tuple(out)


def _unnumbered(levels: str) -> bool:
    """Whether no level of ``levels`` carries a number (a block index, ``attn1``)."""
    return _DIGIT.search(levels) is None


_DIGIT = re.compile(r"[0-9]")


def _tails(forms: dict[str, list[str]], sep: str) -> dict[str, list[str]]:
    """Every suffix of each form after a ``sep``, to the names of that form."""
    out: dict[str, list[str]] = {}
    for form, names in forms.items():
        for tail in _after(form, sep):
            out.setdefault(tail, []).extend(names)
    return out


def _after(text: str, sep: str) -> list[str]:
    """The suffixes of ``text`` after each ``sep`` in it."""
    tails, i = [], text.find(sep)
    while i >= 0:
        tails.append(text[i + 1 :])
        i = text.find(sep, i + 1)
    return tails


def _candidates(key: str, fmt: KeyFormat) -> list[str]:
    """``key`` and ``key`` without each component prefix it starts with."""
    out = [key]
    for prefix in (*fmt.prefixes, *_PREFIXES):
        if key.startswith(prefix) and key[len(prefix) :] not in out:
            out.append(key[len(prefix) :])
    return out


#: bytes of lookups memoized per index: ~7,000 keys; at most 16 indexes are kept (_index)
_LOOKUP_BYTES = 2 << 20


@functools.lru_cache(maxsize=16)
def _index(
    names: tuple[str, ...],
    others: tuple[str, ...] = (),
    weightless: tuple[str, ...] = (),
    unwrapped: tuple[tuple[str, str], ...] = (),
    levels: frozenset[str] | None = None,
) -> _Names:
    """The lookup index of one model's injected names, its other module paths, its norms
    without a weight, its modules read without a call and its wrapper levels (built once per
    five)."""
    index = _Names(list(names), levels)
    index.read_directly = dict(unwrapped)
    if others:
        index.whole = _Names([*names, *others], levels)
    if weightless:
        index.every = _Names([*names, *others, *weightless], levels)
        index.weightless = frozenset(weightless)
    return index


def _lookup(key: str, fmt: KeyFormat, names: _Names) -> tuple[str, ...]:
    """The injected names ``key`` matches (memoized in the index, within its byte budget):
    none where, among every module of the model, it matches only modules that are not
    injected; all of them (ambiguous) where it matches injected and other modules alike."""
    whole = names.whole
    if whole is None:
        return names.lookups.get((key, fmt), _match, key, fmt, names)
    hits = whole.lookups.get((key, fmt), _match, key, fmt, whole)
    return hits if any(h in names.exact for h in hits) else ()


def _weightless(key: str, fmt: KeyFormat, names: _Names) -> tuple[str, ...]:
    """The model's norms without a weight that ``key`` names, where it names no other module
    of the model: the lookup over every module, those norms among them, decides on them only.
    (Looked up after the others, so that a naming's alias of a norm's path still lands on the
    norm it means: Wan's ``blocks.N.norm3`` on diffusers' ``norm2``, not its weightless ``norm3``.)"""
    every = names.every
    if every is None or _in_model(key, fmt, names):
        return ()
    hits = every.lookups.get((key, fmt), _match, key, fmt, every)
    return hits if hits and all(h in names.weightless for h in hits) else ()


def _unwrapped(key: str, fmt: KeyFormat, names: _Names) -> tuple[str, ...]:
    """The model's modules read without a call (:attr:`_Names.read_directly`) that ``key`` names,
    where it names no other module of the model."""
    if not names.read_directly:
        return ()
    hits = _in_model(key, fmt, names)
    return hits if hits and all(h in names.read_directly for h in hits) else ()


def _in_model(key: str, fmt: KeyFormat, names: _Names) -> tuple[str, ...]:
    """The modules ``key`` matches among every module of the model, injected or not (which of a
    fused key's splits a model has the parts of, whatever was injected)."""
    whole = names.whole if names.whole is not None else names
    return whole.lookups.get((key, fmt), _match, key, fmt, whole)


def _match(key: str, fmt: KeyFormat, names: _Names) -> tuple[str, ...]:
    """The names ``key`` matches (the steps of the module docstring), over the names and their file
    names (:func:`~lorahot.resolve.file_names.file_name`), ``key``'s own wrapper levels dropped
    after it is tried as it is: each hit is the name it stands for, a file name that two names
    share standing for both (ambiguous)."""
    hits = _match_spelled(key, fmt, names)
    return names.named(hits) if names.real else hits


def _match_spelled(key: str, fmt: KeyFormat, names: _Names) -> tuple[str, ...]:
    if key.startswith(ROOT_PREFIXES):
        return ()  # another component's module (routed there without the prefix)
    cands = _candidates(key, fmt)
    if may_hold_wrapper(key):  # saved from a wrapped model: tried without the levels as well
        cands += [f for f in map(file_name, cands) if f not in cands]
    exact = next((c for c in cands if c in names.exact), None)
    if exact is not None:  # most keys: the aliases (dozens of regexes per key) are not tried
        return (exact,)
    aliased = [re.sub(p, r, c) for c in cands for p, r in alias_hits(fmt.aliases, c)]

    def renamed() -> list[str]:
        return [c for c in aliased if c in names.exact][:1]

    def wrapped() -> list[str]:
        return _first(names.dotted(c) for c in cands[1:] + cands[:1] + ([] if fmt.aliases_exact else aliased))

    def own() -> list[str]:  # the key's own path under a wrapper of the model (ambiguous as in wrapped)
        return _first(names.dotted(c) if names.wrapping(c) else [] for c in cands[1:] + cands[:1])

    steps = (
        # exact aliases only where the key names no layer of the model, not even under a wrapper (PEFT
        # naming's: Krea 2's first -> img_in never takes a key that is the model's own enc.first); a
        # dotted naming's other aliases only where the key's own path is no layer under a wrapper of
        # the model (the old diffusers naming's layers.0.attention.out on enc.layers.0.attention.out);
        # an underscore naming's aliases first, its dots a guess of its renames (musubi's
        # time_embedder.proj_in is MiniMax-H3's time embedder, never a model's proj_in)
        *(
            (wrapped, renamed)
            if fmt.aliases_exact
            else (own, renamed, wrapped)
            if fmt.separator == "."
            else (renamed, wrapped)
        ),
        lambda: _first(names.by_underscore(c) for c in cands[1:] + cands[:1]),
        lambda: _first(names.unwrapped(c) for c in cands[1:]) if fmt.separator == "_" else [],
        lambda: _first(names.by_underscore(a) for a in aliased) if fmt.separator == "_" else [],
    )
    for step in steps:
        hits = step()
        if hits:
            return tuple(sorted(set(hits)))
    return ()


def _file_names(names: Sequence[str], levels: frozenset[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Each file name of ``names`` that is not the name itself (one under a wrapper level of
    ``levels``, see :func:`~lorahot.resolve.file_names.file_name`) -> the names it is the file name
    of, with itself first where it is one of ``names``."""
    held = set(names)
    under: dict[str, list[str]] = {}
    for n in filter(may_hold_wrapper, names):
        f = file_name(n, levels)
        if f != n:
            under.setdefault(f, []).append(n)
    return {f: ((f,) if f in held else ()) + tuple(ns) for f, ns in under.items()}


def _first(groups) -> list[str]:  # type: ignore[no-untyped-def]
    return next((g for g in groups if g), [])


def _renamed(key: str, fmt: KeyFormat) -> list[str]:
    """The model module names the format's aliases give ``key`` (``diffusion_model.vace_blocks.0.before_proj``
    -> ``vace_blocks.0.proj_in``), so a refusal says which layer the file was made for."""
    probe = _candidates(key, fmt)[-1]  # without its component prefix
    return sorted({re.sub(p, r, probe) for p, r in alias_hits(fmt.aliases, probe)} - {probe})[:3]


def _closest(key: str, fmt: KeyFormat, names: _Names, renamed: Sequence[str] = (), cutoff: float = 0.4) -> list[str]:
    """Up to three injected names nearest to ``key`` (by difflib's ratio, at least ``cutoff``),
    compared in the format's own spelling. An underscore naming's key that the naming places
    (``renamed``, :func:`_renamed`) is compared by the model name it is placed at: its own
    spelling (kohya's underscores, which renames may have left part dotted,
    ``lora_unet_blocks.7.self_attn.q_proj``) is none of the model's."""
    probe = _candidates(key, fmt)[-1]
    if fmt.separator == "_" and renamed:
        return difflib.get_close_matches(renamed[0], names.names, n=3, cutoff=cutoff)
    if fmt.separator == ".":
        return difflib.get_close_matches(probe, names.names, n=3, cutoff=cutoff)
    close = difflib.get_close_matches(probe.replace(".", "_"), list(names.underscore), n=3, cutoff=cutoff)
    return list(dict.fromkeys(names.named([names.underscore[c][0]])[0] for c in close))


def resolve_keys(
    adapter: Adapter, names: list[str], skipped: list[str] | None = None, others: Sequence[str] = ()
) -> dict[str, LoraModule]:
    """The LoRA modules of :func:`resolve_all` (see there)."""
    return resolve_all(adapter, names, skipped, others)[0]


def resolve_all(
    adapter: Adapter,
    names: list[str],
    skipped: list[str] | None = None,
    others: Sequence[str] = (),
    heads: Mapping[str, int] | None = None,
    weightless: Sequence[str] = (),
    unwrapped: Sequence[tuple[str, str]] = (),
    naming: KeyFormat | None = None,
    component: str | None = None,
    levels: Collection[str] | None = None,
) -> tuple[dict[str, LoraModule], dict[str, WeightModule]]:
    """Maps each adapter module key (LoRA and weight kinds) to one injected layer name (see
    the module docstring).

    Args:
        adapter: the normalized adapter; its ``format`` picks the prefixes and aliases.
        names: the injected layers' qualified names in the model.
        skipped: if given (``strict=False``), the tensor keys of modules that match no layer
            are appended here instead of raised (ambiguous keys and two keys on one layer
            still raise: they need a ``key_map``, not silence).
        others: the model's other module paths (not injected layers, nor inside one), so that
            a key naming one of them matches nothing (see the module docstring); empty where
            unknown.
        heads: the attention head size the model's modules state, by path (:func:`head_sizes`):
            a fused module whose rows interleave its parts per head
            (:attr:`~lorahot.formats.table.Split.per_head`) is gathered at the head size of the
            module holding its parts, and refused where none is known.
        weightless: the model's normalization layers without a weight (not among ``others``,
            see :func:`~lorahot.layers.norm.is_weightless_norm`): a key that names one of them
            and no other module is refused as such, there being no weight to fold its delta
            into, rather than with a hint to inject it.
        unwrapped: the model's modules that it reads without calling them, each with why
            (:func:`lorahot.runtime.targets.unwrappable`: ``nn.MultiheadAttention``'s
            ``out_proj``), among ``others``: a key that names one of them and no other module is
            refused with that reason, inject refusing them as targets, rather than with a hint
            to inject it.
        naming: the naming as it reads the whole file (:func:`file_naming`) for this model, where
            ``adapter`` is one component's share of it; else :func:`file_naming` of ``adapter`` for
            ``names`` and ``others``.
        component: the pipeline component whose layers ``names`` are, where ``adapter`` is its
            share of a file (:func:`lorahot.resolve.components.resolve_components`): a key under
            that component's name that matches none of them is told so, the component being
            injected, with its closest layers.
        levels: the model's wrapper levels (:func:`~lorahot.resolve.file_names.wrapper_levels`),
            the only levels a layer's file name drops: a module of the model's own named
            ``_orig_mod`` stays in it, as in PEFT's keys. None where the model is not at hand:
            every level of those names.

    Returns:
        injected layer name -> the LoRA module loaded into it, and the same for the weight
        kinds (LoHa, LoKr, Tucker LoCon, diffs).

    Raises:
        AdapterMismatchError: keys matching no layer (each with the closest layer names),
            keys matching several layers (with the candidates), or two keys on one layer.
    """
    fmt = naming if naming is not None else file_naming(adapter, [*names, *others])
    index = _index(
        tuple(names), tuple(others), tuple(weightless), tuple(unwrapped), None if levels is None else frozenset(levels)
    )
    out: dict[str, LoraModule | WeightModule] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    bare = 0  # problems of keys naming a norm without a weight or a module read without a call: no targets help
    unplaced = 0  # problems of keys that land nowhere, which strict=False skips
    twice = 0  # problems of two modules of the file on one layer
    anywhere = 0  # keys given their component's nearest layers at any distance (_ANYWHERE_SHOWN)
    entries: list[tuple[str, LoraModule | WeightModule]] = [*adapter.modules.items(), *adapter.weights.items()]
    pending: collections.deque[tuple[str, LoraModule | WeightModule, str]] = collections.deque(
        (key, module, fmt.in_file(key, module.source_keys[0]) if module.source_keys else key) for key, module in entries
    )
    while pending:
        key, module, named = pending.popleft()  # named: the key, or "<part> (part of <fused key>)"
        hits = _lookup(key, fmt, index)
        if not hits and fmt.splits:
            parts = placed(
                key,
                module,
                fmt.splits,
                problems,
                lambda target: bool(_in_model(target, fmt, index)),
                lambda targets: _held_heads(targets, fmt, index, heads or {}),
            )
            if not (len(parts) == 1 and parts[0] is module):  # fused: its parts resolve in its place
                # a part by the model path it is for (its key keeps the naming's component prefix)
                pending.extendleft(
                    (p.key, p, f"{_candidates(p.key, fmt)[-1]} (part of {named})") for p in reversed(parts)
                )
                continue
        if not hits and skipped is not None:
            skipped.extend(module.source_keys or (key,))
        elif not hits and (norms := _weightless(key, fmt, index)):
            bare += 1
            unplaced += 1
            problems.append(
                f"{named}: names {', '.join(norms)}, a normalization layer without a weight or bias in this model "
                "(elementwise_affine=False or affine=False): it has no weight to fold a delta into, whatever the "
                "targets or the mode; load with strict=False to skip it"
            )
        elif not hits and (held := _unwrapped(key, fmt, index)):
            bare += 1
            unplaced += 1
            problems.append(
                f"{named}: names {', '.join(held)}, which no LoRA layer can serve, unmerged or merged, as the model "
                f"stands (inject refuses it as a target: {index.read_directly[held[0]]}). Load with strict=False to "
                "skip it knowingly (the model then computes without its delta), or merge the file into the model's "
                "weights with a tool that writes them (PEFT's merge_and_unload, ComfyUI) before injecting"
            )
        elif not hits:
            unplaced += 1
            shown_here = len(problems) < _SHOWN and not key.startswith(ROOT_PREFIXES)  # the rest are not shown
            renamed = _renamed(key, fmt) if shown_here else []
            close = _closest(key, fmt, index, renamed) if shown_here else []
            if shown_here and not close and anywhere < _ANYWHERE_SHOWN and _routed_here(key, component):
                anywhere += 1  # the component's nearest layers, however far
                close = _closest(key, fmt, index, renamed, cutoff=0.0)
            problems.append(
                f"{named}: matches no injected layer"
                + (f" (closest: {', '.join(close)})" if close else "")
                + (
                    f"; the {fmt.name} naming places it at {', '.join(renamed)}, "
                    "which is not injected or not in this model"
                    if renamed
                    else ""
                )
                + _norm_hint(module)
                + _component_hint(key, component)
            )
        elif len(hits) > 1:
            problems.append(
                f"{named}: ambiguous, matches {', '.join(hits[:6])}; pass key_map={{{shown(key, 200)}: '<layer name>'}}"
            )
        elif hits[0] in out:
            twice += 1
            problems.append(f"{named}: lands on {hits[0]}, which {origin[hits[0]]} already fills")
        else:
            out[hits[0]], origin[hits[0]] = module, named
    if problems:
        rest = [_rest_hint(len(out))] if unplaced == len(problems) and out and bare < len(problems) else []
        raise AdapterMismatchError(
            lines(
                format_problems(
                    f"{adapter.source}: adapter modules ({adapter.format} naming) that do not map onto the injected "
                    "layers:",
                    problems,
                ),
                _BARE_HINT if bare == len(problems) else _TWICE_HINT if twice == len(problems) else _fix_hint(adapter),
                *rest,
            )
        )
    lora = {n: m for n, m in out.items() if isinstance(m, LoraModule)}
    return lora, {n: m for n, m in out.items() if isinstance(m, WeightModule)}


def file_naming(adapter: Adapter, model: Sequence[str] = ()) -> KeyFormat:
    """The naming of ``adapter`` as it reads this file for a model whose module paths are
    ``model``: with the aliases of a model only its files take (:meth:`~lorahot.formats.table.KeyFormat.for_file`:
    Krea 2's ``first`` -> ``img_in`` in PEFT naming only where some key is a name only Krea 2 has,
    or the model has a layer only Krea 2 has), judged on the file's own keys
    (:attr:`~lorahot.adapter.Adapter.file_keys`), never on ``key_map=``'s renames of them: a
    Krea 2 file with one key renamed keeps its aliases for the others, and a rename to a name only
    Krea 2 has makes no other model's file Krea 2's."""
    keys = adapter.file_keys or [*adapter.modules, *adapter.weights]
    return format_named(adapter.format).for_file(keys, model)


def _norm_hint(module: LoraModule | WeightModule) -> str:
    """What to do with a normalization layer's delta (a 1-D ``.diff``, LyCORIS' ``w_norm``) that
    lands on no injected layer; empty for any other module."""
    diff = module.factors.get("diff") if isinstance(module, WeightModule) and module.kind == "diff" else None
    if diff is None or diff.ndim != 1:
        return ""
    return (
        f"; it is a normalization layer's weight delta (shape {tuple(diff.shape)}), which lorahot folds only into a "
        "norm injected with merged=True: add that norm to targets (lorahot.plan_targets(adapter, model) lists it) and "
        "inject with merged=True, or load with strict=False to skip it"
    )


def _routed_here(key: str, component: str | None) -> bool:
    """Whether ``key`` names, by its first level or a :data:`COMPONENT_PREFIXES` prefix, the
    pipeline ``component`` whose layers it is being matched against (None: no component)."""
    if component is None:
        return False
    named = next((c for p, c in COMPONENT_PREFIXES.items() if key.startswith(p)), None)
    return component in (named, key.partition(".")[0] if "." in key else None)


def _component_hint(key: str, component: str | None = None) -> str:
    """Where a key starting with a pipeline component's name (:data:`COMPONENT_NAMES`) that
    matches no layer belongs: the ``component`` it is matched in, injected, where it names that
    one (:func:`_routed_here`); empty for any other key."""
    first = key.partition(".")[0]
    prefix, named = next(((p, c) for p, c in COMPONENT_PREFIXES.items() if key.startswith(p)), ("", None))
    if _routed_here(key, component):
        return (
            f"; {component!r} is injected in this runtime, and none of its injected layers has that name: map the "
            "key onto one with key_map=, inject the module it names (targets=...), or load with strict=False to skip it"
        )
    if named is not None:
        return (
            f"; its prefix {prefix!r} names a pipeline component, {named!r} ({PREFIXED_COMPONENTS[named]}), which "
            "holds its module: inject that component too (lorahot.inject(pipe, ...), or "
            f"lorahot.inject({{..., {named!r}: pipe.{named}}}, ...)), or load with strict=False to skip it"
        )
    if first not in COMPONENT_NAMES or "." not in key:
        return ""
    return (
        f"; {first!r} is a pipeline component, whose modules never land on another component's layers: inject it "
        f"(lorahot.inject({{..., {first!r}: pipe.{first}}}, ...)), or load with prefix={first!r} into a runtime over "
        f"that model alone, or with strict=False to skip it"
    )


#: problems a message shows (format_problems' limit); only those get the costly closest names
_SHOWN = 20

#: keys under an injected component with no layer close by difflib's cutoff that still get its
#: nearest layers: each such list scores every layer in full (no cutoff to skip one), about 0.45 s
#: over 20,000 layers, so twenty keys cost 9 s where three show what the names look like
_ANYWHERE_SHOWN = 3


_BARE_HINT = "Load with strict=False to skip those keys, or load an adapter made for this model."

#: what to do with a file that holds two modules for one layer (two spellings of one module, a
#: fused module and one of its parts): its loaders disagree on it, so lorahot picks neither
_TWICE_HINT = (
    "The file holds two modules for each of those layers (two spellings of one module, such as a prefixed and a "
    "bare name, or a fused module and one of its parts), which its loaders read differently: ComfyUI keeps one of two "
    "keys it maps onto the same weight and drops the other, and adds a part of a fused weight to the whole. lorahot "
    "chooses neither: delete the keys of the module the file does not mean, or save the two as two files and load "
    "them as one stack (runtime.load([first, second]) adds both)."
)


def _rest_hint(placed: int) -> str:
    """What ``strict=False`` makes of an adapter whose only problems are modules that land
    nowhere: it skips them and loads the ``placed`` layers the rest lands on."""
    return (
        f"Or load the rest with strict=False: it skips those modules (listed in AdapterInfo.skipped) and loads the "
        f"{placed} layer{'s' if placed != 1 else ''} the others land on."
    )


def _fix_hint(adapter: Adapter) -> str:
    targets = adapter.config.get("target_modules")
    trained = (
        f" (the adapter was trained on target_modules={shown(targets, 200)})" if targets else ""
    )  # shown, never matched
    return (
        f"Inject those modules (targets=...){trained}, map the names with prefix=/key_map= (lorahot.read_adapter, "
        "runtime.load), or load an adapter made for this model."
    )
