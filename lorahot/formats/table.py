"""The declarative description of an adapter naming, and the one routine that applies it.

Each format is a :class:`KeyFormat`: a table of :class:`Rule` (a regex over a tensor key and
the role the tensor plays: ``A``, ``B``, ``alpha``, ``base``, ``magnitude`` or ``bias``), the
component prefixes files put in front of module paths, the separator that replaced the model's
dots, the fused modules whose rows belong to several of the model's layers (:class:`Split`,
:class:`Reorder`), and the keys it knows but lorahot refuses (DoRA and LoRA biases outside
PEFT's namings, but for a LyCORIS LoRA/LoCon module's ``dora_scale``; LyCORIS variants, PEFT's
trainable tokens, parameter LoRA and module copies). With ``strict=False`` such a key is
skipped, and with it every key of the module it belongs to (:func:`group_keys`); the keys of
:data:`REFUSED_WHOLE` (a Flux Control LoRA's norms) are refused whatever ``strict``.
Detection and grouping are driven by these tables only; no format has code of its own.

Parsing a key is memoized (a server swapping among the same adapters parses each key once),
within a byte budget: keys come from files, and a count bound alone would let hostile long
keys pin memory.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from lorahot.errors import UnknownFormatError, format_problems, lines, shown
from lorahot.memo import BoundedMemo, str_bytes

__all__ = [
    "Rule",
    "Split",
    "Reorder",
    "FileAliases",
    "KeyFormat",
    "alias_hits",
    "any_alias",
    "NAME_START",
    "COMMON_NAMES",
    "DOTTED_START",
    "COMPONENT_HEAD",
    "DIFFUSION_MODEL",
    "DIFFUSION_MODEL_HEAD",
    "ORIGINAL_PREFIXES",
    "ORIGINAL_HEAD",
    "underscored",
    "COMFYUI_TEXT_ENCODERS",
    "lora_rules",
    "DEFAULT_ADAPTER",
    "Parts",
    "group_keys",
    "skip_modules",
    "REFUSED",
    "ATTENTION_POOL",
    "REFUSED_POOL",
    "REFUSED_WHOLE",
    "REFUSED_MERGEABLE",
    "REFUSED_IA3",
    "GLORA_FACTORS",
    "LYCORIS_FACTORS",
    "lycoris_rules",
]


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@functools.cache
def any_alias(aliases: tuple[tuple[str, str], ...]) -> re.Pattern[str] | None:
    """One regex that ``search``-matches a name where some pattern of ``aliases`` does (their
    alternation, each in a group of its own that captures nothing): a name that no alias
    renames, most unmatched keys, is rejected by one search instead of one per alias (PEFT naming
    has about a hundred). None (every name may match) where a pattern could change its meaning
    inside an alternation: a back-reference, a named group or an inline flag."""
    patterns = [p for p, _ in aliases]
    if not patterns or any(re.search(r"\\[1-9]|\(\?P[<=]|\(\?[aiLmsux]", p) for p in patterns):
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def alias_hits(aliases: tuple[tuple[str, str], ...], name: str) -> list[tuple[str, str]]:
    """The ``(pattern, replacement)`` of ``aliases`` whose pattern ``search``-matches ``name``, in
    their order."""
    every = any_alias(aliases)
    if every is not None and every.search(name) is None:
        return []
    return [(p, r) for p, r in aliases if _compiled(p).search(name)]


@functools.cache
def _taking(fmt: KeyFormat, taken: tuple[FileAliases, ...]) -> KeyFormat:
    """``fmt`` with the aliases of ``taken`` after its own (:meth:`KeyFormat.for_file`)."""
    return replace(  # a set taken twice (by the file and by the model) adds its aliases once
        fmt,
        aliases=tuple(dict.fromkeys((*fmt.aliases, *(a for s in taken for a in s.aliases)))),
        splits=tuple(dict.fromkeys((*fmt.splits, *(x for s in taken for x in s.splits)))),
        file_aliases=(),
    )


#: module key -> role -> (tensor key, tensor)
Parts = dict[str, dict[str, tuple[str, torch.Tensor]]]

#: (format, key) -> (refusal, parse result); a 154-layer adapter's keys take ~0.1 MB per format
_CLASSIFIED: BoundedMemo[tuple[KeyFormat, str], tuple[str | None, tuple[str, str] | None]] = BoundedMemo(
    16 << 20, lambda k, v: 2 * str_bytes(k[1])
)

#: (format, key) -> :meth:`KeyFormat.claims` of the key, for the marked formats
_CLAIMED: BoundedMemo[tuple[KeyFormat, str], int] = BoundedMemo(4 << 20, lambda k, v: str_bytes(k[1]))


@dataclass(frozen=True)
class Rule:
    """One tensor-key pattern: ``pattern`` must fully match and capture ``(?P<module>...)``.

    Attributes:
        pattern: the regex over the whole tensor key.
        role: ``"A"`` (down), ``"B"`` (up), ``"alpha"`` (a scalar alpha for the module),
            ``"base"`` (a copy of the base layer's weight, see :attr:`lorahot.LoraModule.base_weight`),
            ``"magnitude"`` (DoRA), ``"bias"`` (the bias of B), a LyCORIS factor name, or ``""``:
            the key's last component (``hada_w1_a``).
    """

    pattern: str
    role: str

    def match(self, key: str) -> str | None:
        m = _compiled(self.pattern).fullmatch(key)
        return None if m is None else m["module"]

    def role_of(self, key: str) -> str:
        """The role; a rule with role ``""`` takes it from the key's last component."""
        return self.role or key.rpartition(".")[2]


@dataclass(frozen=True)
class Split:
    """A fused module whose output rows belong to several layers of the model.

    A file trained on one fused projection (Flux's ``img_attn.qkv`` ``[3 D, D]``, or
    ``single_blocks.N.linear1``: q, k, v and the MLP input, ``[D, D, D, 4 D]``) is placed onto the
    model's separate layers: A goes to every part, B's rows are cut by the parts' sizes (see
    :func:`lorahot.resolve.split.split_module`, which also handles the block-sparse layout).

    Attributes:
        pattern: the regex that must fully match the module key (after the format's renames);
            its groups feed the templates.
        parts: ``(template, share)`` per part, in B's row order: the part's module key (a
            ``re.Match.expand`` template) and its share of B's rows (``1, 1, 1, 4`` for Flux's
            ``linear1``: the rows divide into 7 equal units, ``D`` each).
        exact: the numbers in ``parts`` are the parts' output sizes themselves, not shares
            (``split=`` of :func:`lorahot.read_adapter`).
        per_head: B's rows interleave the parts per attention head, ``[head 0: part 0, part 1,
            ...; head 1: ...]``, each ``d`` rows, ``d`` the head size of the model's module that
            holds the parts (its ``head_dim``); they are gathered part by part before the cut.
            Where the model states no head size the module is refused, as any ``d`` that divides
            the rows would cut them another way.
        within: the module key (a template) of a fused module whose first rows the parts are, the
            rest left untouched (ComfyUI's Flux ``linear1_qkv``: rows ``0 .. 3 D`` of
            ``linear1``). A model that holds that module as one layer and none of the parts is
            refused the module, naming the layer: lorahot places a LoRA on every row of a layer.
    """

    pattern: str
    parts: tuple[tuple[str, int], ...]
    exact: bool = False
    per_head: bool = False
    within: str = ""


@dataclass(frozen=True)
class Reorder:
    """A module whose output rows come in another order in the model's layer.

    Flux's final adaLN projection is ``(shift, scale)`` in the original layout and
    ``(scale, shift)`` in diffusers' ``norm_out.linear``; B's row blocks are re-stacked.

    Attributes:
        pattern: the regex that must fully match the module key (after renames).
        target: the module key in the model's naming (a ``re.Match.expand`` template).
        shares: the row blocks of B in the file's order, as shares of its rows (``1, 1``: halves).
        order: the file's blocks in the model's order (``1, 0``: swap the halves).
        rows_per_input: if set, the rule applies only to a module whose B has this many rows
            per input feature of A (SD3's last context block projects to ``(shift, scale)``,
            2 rows per input feature, where every other block's projects to 6 in the same order
            in both namings); a module it does not apply to is left to the next rule.
    """

    pattern: str
    target: str
    shares: tuple[int, ...]
    order: tuple[int, ...]
    rows_per_input: int = 0


@dataclass(frozen=True)
class FileAliases:
    """Aliases of one model's original names that a naming reading every model's names (PEFT's)
    takes only for a file of that model, as its loader converts them only in such a file.

    AI-Toolkit writes Krea 2's original names under PEFT's ``base_model.model.``; diffusers renames
    them in its Krea 2 loader alone. Some of those names are any model's (``first`` -> ``img_in``,
    ``last.linear``), so aliasing them in every PEFT file would place another model's ``first`` on
    ``img_in``. A file takes the aliases where one of its module keys, without the naming's prefix,
    is a name only that model has (:attr:`marker`), or where the model the file is loaded into is
    that model (:attr:`model_marker`): its own loader converts these names in a file of them alone
    (diffusers' Flux.2 loader places ``base_model.model.img_in`` on ``x_embedder``), where no key of
    the file tells the model.

    Attributes:
        model: the model the names are of, for documentation.
        marker: a regex ``search``-ed in each module key without the naming's component prefix:
            the names only that model has (Krea 2's ``blocks.N.attn.wq``, ``txtfusion.``, ``tmlp.0``);
            empty where no key marks a file (the set is taken by :attr:`model_marker` alone).
        aliases: ``(regex, replacement)``, as :attr:`KeyFormat.aliases`, appended to the naming's.
        splits: fused or re-ordered modules of that model's names, as :attr:`KeyFormat.splits`,
            appended to the naming's (Flux's and SD3's final adaLN, ``(shift, scale)`` halves swapped
            onto ``norm_out.linear``).
        model_marker: a regex ``search``-ed in each module path of the model the file is resolved
            against (a pipeline component's paths within it): the layers only that model has in
            diffusers' names (Flux.2's ``double_stream_modulation_img.linear``); empty where the
            model's own loader converts these names in no file of them alone (SD3's converts
            nothing), or where other models have those layers too, so a file of such names alone
            is refused on any model.
    """

    model: str
    marker: str
    aliases: tuple[tuple[str, str], ...]
    splits: tuple[Split | Reorder, ...] = ()
    model_marker: str = ""

    def takes(self, names: Sequence[str], paths: Sequence[str]) -> bool:
        """Whether a file whose module keys (without the naming's component prefix) are ``names``,
        loaded into a model whose module paths are ``paths``, takes these aliases."""
        by_file = bool(self.marker) and any(_compiled(self.marker).search(n) for n in names)
        return by_file or (bool(self.model_marker) and _model_has(self.model_marker, tuple(paths)))


@functools.lru_cache(maxsize=32)
def _model_has(marker: str, paths: tuple[str, ...]) -> bool:
    """Whether one of a model's module ``paths`` has ``marker``: searched once per model (a
    runtime resolves every load against the same paths), not on each load, where a search over
    20,000 paths cost 12 ms."""
    pattern = _compiled(marker)
    return any(pattern.search(p) for p in paths)


@dataclass(frozen=True, eq=False)  # identity hash: the memoized methods hash self on every call
class KeyFormat:
    """One adapter naming, as data.

    Attributes:
        name: what :attr:`lorahot.Adapter.format` says for files of this naming.
        rules: tensor-key patterns and their roles, tried in order.
        prefixes: component prefixes in front of module paths (``"unet."``, ``"lora_te1_"``);
            resolved against the injected model, never assumed.
        require_prefix: detect this format only if every module key starts with a prefix.
        separator: what stands for the model's ``.`` in module keys (``"_"`` for kohya).
        renames: ``(regex, replacement)`` applied in order to every module key, to undo
            spellings of the format (``.processor.`` in old diffusers attention keys).
        refuse: ``(regex, reason)`` for keys this format knows but lorahot does not load.
        marker: if set, detect this format only if some key matches this regex (what tells
            it apart from a naming whose rules it shares).
        aliases: ``(regex, replacement)`` tried on a module key that names no injected layer
            (``to_q`` -> ``q_proj`` where one spelling served several model families).
        aliases_exact: an alias lands only on an injected layer of exactly its name, never on
            one its name ends in (after a wrapper segment the lookup would drop): for aliases of
            common names, which a key of another model (a text encoder's
            ``encoder.layers.0.self_attn.q_proj``) would otherwise reach.
        splits: fused modules placed onto several layers, or with their rows re-ordered; applied
            at load time to a module key that names no injected layer, not even through an alias
            (a model with the fused layer takes the module whole). Where several match a key,
            the first whose every target is a module of the model (injected or not) applies.
        roles: what the format calls A and B, for messages.
        example: an example key, for documentation (the tests detect each format from it).
        header_alpha: the safetensors header entry in which a file of this naming without
            ``.alpha`` tensors records the one alpha every module was trained at (MiniMax-H3's
            ``alpha``), read as each module's alpha; ignored where the file has ``.alpha``
            tensors, as its loaders do (a module without one beside modules with one takes
            alpha = rank); refused beside LyCORIS modules, for which no loader defines it.
        shared: a regex searched in a module key without its component prefix: the modules of
            this naming's model that its marker leaves unmarked, as other models have modules of
            those names (LTX-2's blocks, named as in diffusers); keys of a file that no marked naming
            takes and that match it (or :data:`COMMON_NAMES`) are this naming's as much as another's,
            so they never outvote its marked ones, nor count for it against an unmarked naming
            (:meth:`shares`, :func:`lorahot.formats.read_as`).
        aliases_claim: its aliases place keys of its own naming (:meth:`claims`); False where they
            are fallbacks that other namings' files take too (the old diffusers naming's Lumina2 block
            names, for ComfyUI's dotted roles on bare names): one key of that naming would otherwise
            make a whole ComfyUI or diffusers file its own.
        outside: its marker matches only modules outside a model's blocks (``img_in``,
            ``final_layer``: :func:`lorahot.formats.kohya.outside`), which other models have too
            (Qwen-Image's ``img_in``): a key it alone takes is no stray in a file of an unmarked
            naming that reads it (:func:`lorahot.formats.read_as`).
        file_aliases: aliases (and splits) taken only for a file that is of their model
            (:class:`FileAliases`, :meth:`for_file`): PEFT naming's Krea 2 names; PEFT's, diffusers'
            and ComfyUI's Flux, SD3 and Lumina2 names.
    """

    name: str
    rules: tuple[Rule, ...]
    prefixes: tuple[str, ...] = ()
    require_prefix: bool = False
    separator: str = "."
    renames: tuple[tuple[str, str], ...] = ()
    refuse: tuple[tuple[str, str], ...] = ()
    marker: str = ""
    aliases: tuple[tuple[str, str], ...] = ()
    aliases_exact: bool = False
    splits: tuple[Split | Reorder, ...] = ()
    roles: tuple[str, str] = ("lora_A", "lora_B")
    example: str = ""
    header_alpha: str = ""
    shared: str = ""
    aliases_claim: bool = True
    outside: bool = False
    file_aliases: tuple[FileAliases, ...] = ()

    def for_file(self, modules: Iterable[str], model: Iterable[str] = ()) -> KeyFormat:
        """This naming as it reads a file whose module keys are ``modules`` for a model whose module
        paths are ``model``: with the :attr:`file_aliases` of every model one of the keys (without a
        component prefix) marks, or the model is (:meth:`FileAliases.takes`), after its own aliases;
        itself where none is taken. One format per set taken (memoized), so lookups memoized per
        format stay apart."""
        if not self.file_aliases:
            return self
        names, paths = [self.strip_prefix(m) for m in modules], list(model)
        taken = tuple(s for s in self.file_aliases if s.takes(names, paths))
        return _taking(self, taken) if taken else self

    def strip_prefix(self, module: str) -> str:
        """``module`` without this format's component prefix, if it has one."""
        prefix = next((p for p in self.prefixes if module.startswith(p)), "")
        return module[len(prefix) :]

    def parse(self, key: str) -> tuple[str, str] | None:
        """``(module key, role)`` for a tensor key of this format, or None (memoized)."""
        return _CLASSIFIED.get((self, key), self._classify, key)[1]

    def in_file(self, module: str, key: str) -> str:
        """``module``, a module key of this format (after :attr:`renames`), as the file spells it,
        read off ``key``, one of its tensor keys: what messages name. In an underscore naming,
        kohya's ``lora_unet_blocks_0_self_attn_q_proj``, which the renames make
        ``lora_unet_blocks.0.self_attn.q_proj``, a name neither the file nor the model has;
        ``module`` itself elsewhere (a dotted naming's renames only drop a wrapper prefix such as
        PEFT's, leaving the model's name), and where ``key`` does not parse to it (a module that
        ``key_map`` or ``prefix=`` named)."""
        parsed = self.parse(key) if self.separator == "_" and self.renames else None
        if parsed is None or parsed[0] != module:
            return module
        return next((m for m in (rule.match(key) for rule in self.rules) if m is not None), module)

    def refusal(self, key: str) -> str | None:
        """Why lorahot refuses ``key``, if this format knows it as an unsupported feature (memoized)."""
        return _CLASSIFIED.get((self, key), self._classify, key)[0]

    def _classify(self, key: str) -> tuple[str | None, tuple[str, str] | None]:
        """``(refusal, parse)`` of ``key``: both, since detection asks for one and grouping for both."""
        why = next((why for pattern, why in (*REFUSED_WHOLE, *self.refuse) if _compiled(pattern).search(key)), None)
        return why, self._parse(key)

    def _parse(self, key: str) -> tuple[str, str] | None:
        for rule in self.rules:
            module = rule.match(key)
            if module is not None:
                for pattern, repl in self.renames:
                    module = re.sub(pattern, repl, module)
                return module, rule.role_of(key)
        return None

    def explain(self, key: str) -> str:
        """Why ``key`` cannot be loaded: a known feature, full module weights, or a foreign name."""
        why = self.refusal(key)
        if why is not None:
            return why
        role = _compiled(_LORA_ROLE).fullmatch(key)
        if role is not None:  # LoRA weights, spelled as another naming spells them
            return (
                f"a LoRA {role['role']} key that the {self.name} naming does not spell this way (its keys look like "
                f"{self.example}); the file mixes namings, or uses one lorahot does not know: rename the keys to one "
                "naming (key_map=), or report the naming"
            )
        if _compiled(_EMBEDDING).fullmatch(key):
            return (
                "a textual-inversion embedding (pivotal tuning), not LoRA weights: load it into the text encoder "
                "yourself (diffusers: pipe.load_textual_inversion); strict=False loads the LoRA without it"
            )
        full = _compiled(_FULL_WEIGHT).fullmatch(key)
        if full is not None:
            return (
                f"full weights of module {shown(full['module'], 200)}, not LoRA weights (PEFT saves these for "
                f"modules_to_save, "
                "trained biases, or an embedding/lm_head whose vocabulary was resized); lorahot loads only LoRA "
                "weights"
            )
        return f"not a LoRA key of the {self.name} naming"

    def claims(self, key: str) -> int:
        """How ``key`` is one of this naming's own, not merely one its rules read: 2 where one of
        its renames, aliases (unless :attr:`aliases_claim` is off) or splits takes its module (it
        places the key its own way), 1 where
        only its marker matches it, 0 where neither, and for a naming without a marker (PEFT's,
        kohya's plain names), whose rules read any model's names; a key outside the prefixes it
        requires is never its own but by its marker. What tells a file's stray keys of another naming
        from its own where both namings read them (:func:`lorahot.formats.read_as`). Memoized, as
        :meth:`parse` is: a file's keys are claimed once per vote and per naming."""
        if not self.marker:
            return 0
        return _CLAIMED.get((self, key), self._claims, key)

    def _claims(self, key: str) -> int:
        marked = 1 if _compiled(self.marker).search(key) else 0
        raw = next((m for m in (rule.match(key) for rule in self.rules) if m is not None), None)
        if raw is None:
            return marked
        module = self._parse(key)
        if self.require_prefix and module is not None and not module[0].startswith(self.prefixes):
            return marked  # never of this naming (detect): Z-Image's transformer.layers.N.feed_forward.w1
        if any(_compiled(pattern).search(raw) for pattern, _ in self.renames):
            return 2
        names = (raw,) if module is None else (module[0], self.strip_prefix(module[0]))
        aliased = self.aliases_claim and any(alias_hits(self.aliases, n) for n in names)
        placed = aliased or any(_compiled(rule.pattern).fullmatch(n) for rule in self.splits for n in names)
        return 2 if placed else marked

    def shares(self, key: str) -> bool:
        """Whether this naming reads ``key`` as a module of its model its marker leaves unmarked
        (:attr:`shared`), or one of the names many models have for their own modules
        (:data:`COMMON_NAMES`): where its marker does not match the key, the key tells no file
        apart, even where this naming places it its own way (:func:`lorahot.formats.read_as`)."""
        module = self.parse(key) if self.marker and not _compiled(self.marker).search(key) else None
        if module is None:
            return False
        name = self.strip_prefix(module[0])
        return _compiled(COMMON_NAMES).search(name) is not None or (
            bool(self.shared) and _compiled(self.shared).search(name) is not None
        )

    def score(self, keys: list[str]) -> int:
        """How many keys this format parses; -1 if its marker or required prefix is absent."""
        if self.marker and not any(map(_compiled(self.marker).search, keys)):
            return -1
        modules = [p[0] for p in map(self.parse, keys) if p is not None]
        if self.require_prefix and not any(m.startswith(self.prefixes) for m in modules):
            return -1
        return len(modules)

    def detect(self, keys: list[str]) -> bool:
        """True if every key parses (or is a known refusal) and prefixes agree."""
        if not keys or (self.marker and not any(map(_compiled(self.marker).search, keys))):
            return False
        modules = []
        for key in keys:
            parsed = self.parse(key)
            if parsed is None and self.refusal(key) is None:
                return False
            if parsed is not None:
                modules.append(parsed[0])
        if self.require_prefix:
            return bool(modules) and all(m.startswith(self.prefixes) for m in modules)
        return True


def group_keys(
    fmt: KeyFormat, tensors: dict[str, torch.Tensor], source: str, skipped: list[str] | None = None
) -> Parts:
    """Groups tensor keys by module and role, per ``fmt``.

    Args:
        skipped: if given (``strict=False``), keys that match no rule or name a refused feature
            are appended here instead of raised, and with them every key of the module such a
            key belongs to (a LoRA or LyCORIS module without its DoRA scale or its bias would
            compute another update); a second tensor for one role still raises.

    Raises:
        UnknownFormatError: keys that match no rule, refused features (DoRA, bias, LyCORIS,
            PEFT trainable tokens, parameter LoRA, full module weights), or two tensors claiming
            one module's role. All are listed at once. Keys of :data:`REFUSED_WHOLE` are refused
            with ``skipped`` given too.
    """
    parts: Parts = {}
    problems: list[str] = []
    for key, tensor in tensors.items():
        why, parsed = _CLASSIFIED.get((fmt, key), fmt._classify, key)
        if why is not None or parsed is None:
            if skipped is not None and why not in _WHOLE_REASONS:
                skipped.append(key)
            else:
                problems.append(f"{key}: {fmt.explain(key)}")
            continue
        module, role = parsed
        roles = parts.setdefault(module, {})
        if role in roles:
            problems.append(f"{key}: a second {role} for module {shown(module, 200)} (also {roles[role][0]})")
            continue
        roles[role] = (key, tensor)
    if problems:
        raise UnknownFormatError(
            lines(
                format_problems(f"{source}: keys lorahot cannot load ({fmt.name} naming):", problems),
                "Remove them, or convert the adapter to plain LoRA (lora_A/lora_B or lora_down/lora_up).",
            )
        )
    if skipped:
        owners = dict.fromkeys(owner for owner in (_owner(fmt, key, parts) for key in skipped) if owner is not None)
        skip_modules(parts, owners, skipped)
    return parts


def skip_modules(parts: Parts, modules: Iterable[str], skipped: list[str]) -> None:
    """Takes ``modules`` out of ``parts`` and appends every key of each to ``skipped``, in
    order: ``strict=False`` skips a module it cannot load whole, listing all its keys."""
    skipped += [k for module in modules for k, _ in parts.pop(module).values()]


#: What a module's own keys end in, tried after a skipped key's stem to find the module it belongs
#: to (each naming spells one of them).
_PROBES = ("lora_down.weight", "lora_A.weight", "lora.down.weight", "hada_w1_a", "lokr_w1", "diff", "oft_blocks")


#: How many of a skipped key's last components :func:`_owner` tries as the part after its
#: module (``dora_scale``; ``lora_up.bias``; ``lora_B.<adapter>.bias``; PEFT's
#: ``lora_magnitude_vector.<adapter>.weight``): a bound on the parses of a hostile key.
_OWNER_DEPTH = 4

#: (format, probe key) -> its parse, for :func:`_owner`'s probes: apart from the keys' own memo
#: (:data:`_CLASSIFIED`), which keys a file does not have would crowd out; a file read again with
#: ``strict=False`` probes the same keys
_PROBED: BoundedMemo[tuple[KeyFormat, str], tuple[str, str] | None] = BoundedMemo(
    4 << 20, lambda k, v: 2 * str_bytes(k[1])
)


def _owner(fmt: KeyFormat, key: str, parts: Parts) -> str | None:
    """The module of ``parts`` that ``key`` belongs to (its DoRA scale, its bias, a factor of
    an unknown kind): the longest stem of ``key`` up to a ``.`` (one of its last
    :data:`_OWNER_DEPTH`) that, with one of the module suffixes of :data:`_PROBES`, parses to a
    module in ``parts``; None if there is none."""
    end = len(key)
    for _ in range(_OWNER_DEPTH):
        end = key.rfind(".", 0, end)
        if end <= 0:
            return None
        for probe in _PROBES:
            parsed = _PROBED.get((fmt, key[: end + 1] + probe), fmt._parse, key[: end + 1] + probe)
            if parsed is not None and parsed[0] in parts:
                return parsed[0]
    return None


#: Module names outside the blocks that many diffusion transformers of diffusers have for their
#: own modules, and that namings of original names alias onto their model's diffusers names:
#: ``final_layer.linear``/``adaLN_modulation.1`` (Flux's, SD3's, Hunyuan-DiT's originals; Krea 2's,
#: Ideogram 4's, Bria Fibo 2's, PRX's own), ``x_embedder.proj`` (SD3's, Hunyuan-DiT's; HunyuanVideo's,
#: HunyuanImage's, Ernie-Image's own), ``t_embedder.mlp.0``/``2``, ``img_in`` and ``txt_in`` (Flux's;
#: Krea 2's, Qwen-Image's, JoyImage's, PRX's own), ``time_in.in_layer``/``out_layer`` (PRX's) and
#: ``adaln_single`` (LTX-2's; PixArt's and Allegro's own). Searched in a module key without its
#: naming's component prefix, in either spelling (``final_layer_linear``): where a naming's marker
#: leaves such a key unmarked, it tells no file apart (:meth:`KeyFormat.shares`).
COMMON_NAMES = (
    r"(?:^|\.)(?:final_layer[._](?:linear|adaLN_modulation[._]1)|x_embedder[._]proj|t_embedder[._]mlp[._][02]"
    r"|img_in|txt_in|time_in[._](?:in|out)_layer|adaln_single(?:[._].+)?)$"
)


#: Where a module name starts inside a key: at its start, or after a ``.`` or ``_`` (for aliases).
NAME_START = r"(?<![^._])"
#: Where a module name starts inside a dotted key: at its start or after a ``.`` only (never
#: inside a name: ``adaln_single`` is not matched in ``audio_adaln_single``).
DOTTED_START = r"(?<![^.])"
#: A component prefix in front of a module, kept (``\g<head>``) for the resolver (for splits).
COMPONENT_HEAD = r"(?P<head>(?:.*[._])?)"
#: The component prefixes of the namings in a model's original module names: ComfyUI's
#: ``diffusion_model.``, and the ``model.diffusion_model.`` of the transformer's keys in a whole
#: ComfyUI checkpoint, which some of its LoRA files keep.
DIFFUSION_MODEL = ("diffusion_model.", "model.diffusion_model.")
#: The text encoders' prefixes in ComfyUI's LoRA files (``text_encoders.clip_l.transformer.`` +
#: the encoder's own module names): CLIP-L, CLIP-G, T5-XXL and the others ComfyUI names by what
#: they are (``llama``, ``qwen25_7b``), each routed to the component of its architecture
#: (:mod:`lorahot.resolve.components`).
COMFYUI_TEXT_ENCODERS = (
    "text_encoders.clip_l.transformer.",
    "text_encoders.clip_g.transformer.",
    "text_encoders.t5xxl.transformer.",
    "text_encoders.",  # any other encoder ComfyUI names (llama, qwen25_7b, umt5xxl, ...)
)
#: A key that starts with one of :data:`DIFFUSION_MODEL` (for markers and refusals).
DIFFUSION_MODEL_HEAD = r"^(?:model\.)?diffusion_model\."
#: What trainers put in front of a model's original module names, besides ComfyUI's
#: :data:`DIFFUSION_MODEL`: diffusers' ``transformer.`` (musubi-tuner's ``--diffusers_prefix``),
#: ``net.`` (the Cosmos checkpoints' root, Anima's, which OneTrainer keeps), or nothing at all
#: (OneTrainer's and DiffSynth-Studio's bare names). Every naming of original names takes them where
#: its marker names no module of a diffusers model (Lumina2's ``feed_forward.w1`` is Z-Image's own
#: name, so that naming keeps its required prefixes).
ORIGINAL_PREFIXES = (*DIFFUSION_MODEL, "transformer.", "net.")
#: One of :data:`ORIGINAL_PREFIXES`, or none, at the start of a key (for markers and refusals).
ORIGINAL_HEAD = r"^(?:(?:model\.)?diffusion_model\.|transformer\.|net\.)?"


def underscored(pattern: str) -> str:
    """A regex over dotted original names (an alias, a marker's module part) as it reads the kohya
    spelling of those names: ``.`` is ``_``, and a name that starts after a ``.``
    (:data:`DOTTED_START`) starts the module key, its component prefix (``lora_unet_``) stripped."""
    return pattern.replace(DOTTED_START, "^").replace(r"\.", "_")


#: PEFT's default adapter name after a LoRA role, ``<module>.lora_down.default.weight``: files made
#: by renaming PEFT's ``lora_A.default``/``lora_B.default`` to kohya's roles keep it, and diffusers'
#: Qwen-Image and Z-Image loaders drop it (``default.``) before reading the role. Read so in every
#: naming that spells kohya's roles; only PEFT's default name, as those loaders drop only it.
DEFAULT_ADAPTER = r"(?:\.default)?"


def lora_rules(module: str = r"(?P<module>.+)") -> tuple[Rule, ...]:
    """A, B and alpha after ``module`` in any spelling of the roles (``lora_A``/``lora_B`` or
    ``lora_down``/``lora_up``, each also with PEFT's :data:`DEFAULT_ADAPTER` name, or ComfyUI's
    dotted ``lora.down``/``lora.up``), as the namings of original model names write them.

    ComfyUI's LoRA loader reads the dotted roles for any model (``<module>.lora.up.weight``, as it
    reads ``lora_up`` and ``lora_B``), and diffusers' Z-Image conversion reads them in Z-Image's
    original names (``attention.qkv`` cut into q, k and v, ``attention.out`` onto
    ``attention.to_out.0``, each module's ``alpha / r`` folded in), so the same file in the
    original names reads alike in every spelling."""
    return (
        Rule(rf"{module}\.(?:lora_A|lora_down){DEFAULT_ADAPTER}\.weight", "A"),
        Rule(rf"{module}\.(?:lora_B|lora_up){DEFAULT_ADAPTER}\.weight", "B"),
        Rule(rf"{module}\.lora\.down\.weight", "A"),
        Rule(rf"{module}\.lora\.up\.weight", "B"),
        Rule(rf"{module}\.alpha", "alpha"),
    )


#: Keys every format may carry for features lorahot refuses, with the reason and the fix.
#: DoRA magnitude vectors: loaded in PEFT and diffusers namings (:data:`EXTRA_RULES`), and as the
#: ``dora_scale`` of a LyCORIS or kohya LoRA/LoCon module in the namings that read LyCORIS
#: (:func:`lycoris_rules`). The reason names the naming's own limit: a file of a naming that
#: does not read them (a kohya-spelled SD3 or Flux.1 file) is no better in another spelling.
REFUSED_DORA = (
    r"(lora_magnitude_vector|dora_scale)",
    "DoRA magnitude (weight decomposition), which this naming does not read: lorahot reads DoRA as PEFT's "
    "lora_magnitude_vector in the PEFT and diffusers namings, and as a LyCORIS LoRA/LoCon module's dora_scale in "
    "the SD/SDXL kohya, ComfyUI, diffusers and PEFT namings; load with strict=False to skip the module (its LoRA "
    "weights with it: without the magnitude they compute another update), or save the adapter with PEFT",
)
#: :data:`REFUSED_DORA` for the namings that read a LoRA/LoCon module's ``dora_scale``: PEFT's
#: ``lora_magnitude_vector`` alone.
REFUSED_MAGNITUDE = (
    r"lora_magnitude_vector",
    "DoRA magnitude vector in PEFT's spelling (lora_magnitude_vector): this naming reads DoRA as a LoRA/LoCon "
    "module's dora_scale; rename the keys to one naming",
)
#: LoRA biases: loaded in PEFT and diffusers namings only.
REFUSED_BIAS = (
    r"(lora_B|lora_up|lora\.up|lora_linear_layer\.up)(\.[^.]+)?\.bias$",
    "LoRA bias (PEFT lora_bias=True): loaded in PEFT and diffusers namings only (lora_B.bias); save the adapter "
    "with PEFT",
)
#: LyCORIS OFT and BOFT: loaded in the namings that read LyCORIS (:data:`REFUSED_MERGEABLE`).
REFUSED_OFT = (
    r"\.(oft_blocks|rescale)(\.weight)?$",
    "LyCORIS OFT/BOFT weights: lorahot loads them (oft_blocks, rescale) in kohya or ComfyUI naming, into a model "
    "injected with merged=True",
)
#: Other OFT spellings than LyCORIS' ``oft_blocks``: its pre-2.0 ``oft_diag`` and PEFT's ``oft_R``.
REFUSED_OTHER_OFT = (
    r"\.(oft_diag|oft_R)(\.weight)?$",
    "OFT weights in another spelling than LyCORIS' oft_blocks (an older LyCORIS oft_diag, PEFT's oft_R): not "
    "supported; re-save them with LyCORIS 2 or later, or use a LoRA, LoHa or LoKr adapter",
)
#: LyCORIS (IA)^3: loaded in kohya naming (LyCORIS' own ``lycoris_`` names included) only, where a
#: module's ``.weight`` cannot be a model weight.
REFUSED_IA3 = (
    r"\.on_input$",
    "LyCORIS (IA)^3 weights (weight, on_input): lorahot loads them in kohya naming (lora_unet_<module>.weight, "
    ".on_input), into a model injected with merged=True",
)
#: LyCORIS GLoRA: loaded in the namings that read LyCORIS (:data:`REFUSED_MERGEABLE`).
REFUSED_GLORA = (
    r"\.(a1|a2|b1|b2|bm)\.weight$",
    "LyCORIS GLoRA weights (a1, a2, b1, b2, bm; or full weights of a module so named): lorahot loads GLoRA in kohya "
    "or ComfyUI naming, into a model injected with merged=True",
)
#: LyCORIS' norm deltas (``train_norm``): loaded in the namings that read LyCORIS (:data:`REFUSED_MERGEABLE`).
REFUSED_NORM = (
    r"\.(w_norm|b_norm)$",
    "LyCORIS norm-layer deltas (w_norm, b_norm): lorahot loads them in kohya or ComfyUI naming, into norms injected "
    "with merged=True",
)
#: Why the modules of Hunyuan-DiT's attention pool are refused, in every naming: the pool hands
#: their weights to ``F.multi_head_attention_forward`` and never calls them, so inject refuses them
#: as targets (:mod:`lorahot.runtime.targets`) and no LoRA layer can serve them.
ATTENTION_POOL = (
    "a module of the attention pool (pooler.q_proj, k_proj, v_proj, c_proj; diffusers' "
    "time_extra_emb.pooler), whose weights the pool hands to F.multi_head_attention_forward without calling the "
    "module, in diffusers' HunyuanDiTAttentionPool as in Tencent's AttentionPool: no LoRA layer can serve it, "
    "unmerged (PEFT's never runs there) or merged (lorahot injects no module whose weight is read so). ComfyUI and "
    "a PEFT merge_and_unload fold it into the weight and the pool computes with it, so skipping it changes the "
    "output: load with strict=False to skip it knowingly, or merge the file into the model with one of those"
)
#: The attention pool's modules in diffusers' names (``time_extra_emb.pooler.q_proj``), either
#: spelling: refused by every naming (the Hunyuan-DiT namings refuse Tencent's ``pooler.*`` too).
REFUSED_POOL = (r"(?:^|[._])time_extra_emb[._]pooler[._][qkvc]_proj[._]", ATTENTION_POOL)
REFUSED: tuple[tuple[str, str], ...] = (
    REFUSED_DORA,
    REFUSED_BIAS,
    (
        r"\.(hada_w\d_[ab]|hada_t\d|lokr_w\d(_[ab])?|lokr_t\d|lora_mid\.weight|diff|diff_b)$",
        "LyCORIS (LoHa/LoKr/Tucker/diff) weights: lorahot loads them in kohya or ComfyUI naming, into a model "
        "injected with merged=True",
    ),
    REFUSED_OFT,
    REFUSED_OTHER_OFT,
    REFUSED_IA3,
    (
        r"\.(lambda_layer|q_layer\.weight|p_layer\.weight)$",
        "LyCORIS T-LoRA weights (q_layer, p_layer, lambda_layer): not supported; use a LoRA, LoHa or LoKr adapter",
    ),
    REFUSED_NORM,
    (
        r"\.token_adapter\.trainable_tokens_delta(\.[^.]+)?$",
        "trainable tokens (PEFT trainable_token_indices): new embedding rows lorahot does not load",
    ),
    (
        r"\.base_layer\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]+)?(\.weight)?$",
        "LoRA on parameters such as MoE experts (PEFT target_parameters): not supported; its A and B hold every "
        "expert's rank, which no re-save turns into per-module LoRA",
    ),
    (
        r"\.(modules_to_save|original_module)\.",
        "a full module copy (PEFT modules_to_save): lorahot loads only LoRA weights",
    ),
    (
        r"\.(lora_velora_embed|lora_monteclora_sampler\.[^.]+)(\.[^.]+)?$",
        "training state of PEFT's VeLoRA (velora_config) or MonteCLoRA (monteclora_config), which PEFT leaves "
        "unused at inference, where the adapter is plain LoRA: delete these keys from the file and load it",
    ),
    REFUSED_GLORA,
    REFUSED_POOL,
)

#: Keys that make a file more than a LoRA of the model it names, refused by every naming and
#: with ``strict=False`` too: what the file's LoRA weights were trained with would be left out,
#: and the rest would compute another model. Besides a Flux Control LoRA's norms, ComfyUI's
#: ``reshape_weight`` (a layer widened before the LoRA is added) and ``set_weight`` (a layer's
#: weight replaced).
REFUSED_WHOLE: tuple[tuple[str, str], ...] = (
    (
        r"(?:^|[._])(?:norm\.(?:query|key)_norm\.scale|attn\.norm_(?:added_)?[qk]\.weight)$",
        "query/key norm weights that replace the model's own: a Flux Control LoRA (Canny, Depth), trained with "
        "these norms and with x_embedder (img_in) widened to take the control image's latents; lorahot loads "
        "LoRA weights only, and skipping these keys would load the rest onto a model it was not trained with, so "
        "the file is refused whole, with strict=False too. Load it with diffusers' FluxControlPipeline "
        "(load_lora_weights)",
    ),
    (
        r"\.reshape_weight$",
        "a reshape of the model's weight (ComfyUI's reshape_weight: the layer's weight is zero-padded to the "
        "shape this key holds before the LoRA is added, so the file was made for a model with wider layers than "
        "this one); lorahot never changes a layer's shape, and skipping the module would load the rest onto a model it "
        "was not trained with, so the file is refused whole, with strict=False too. Load it into the model it was "
        "made for",
    ),
    (
        r"\.set_weight$",
        "a replacement weight (ComfyUI's set_weight: the layer's weight is replaced, not adapted); lorahot loads "
        "adapter deltas, never a weight that takes the model's place, and skipping the module would load the rest "
        "onto a model it was not trained with, so the file is refused whole, with strict=False too. Write the weight "
        "into the base model, or save the file as a .diff (its weight minus the model's) and load it into a model "
        "injected with merged=True",
    ),
)
_WHOLE_REASONS = frozenset(why for _, why in REFUSED_WHOLE)

#: :data:`REFUSED` less the LyCORIS kinds lorahot folds in merged mode (OFT and BOFT as LyCORIS
#: spells them) and a LoRA/LoCon module's ``dora_scale`` (namings whose rules include
#: :func:`lycoris_rules`).
REFUSED_MERGEABLE = tuple(
    REFUSED_MAGNITUDE if r is REFUSED_DORA else r
    for r in REFUSED
    if not r[1].startswith("LyCORIS (LoHa") and r not in (REFUSED_OFT, REFUSED_GLORA, REFUSED_NORM)
)

#: LyCORIS tensor names: each is its own role (see :class:`lorahot.adapter.WeightModule`).
LYCORIS_FACTORS = (
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t1",
    "lokr_t2",
    "diff",
    "diff_b",
    "oft_blocks",
    "rescale",
)


#: GLoRA's factors, each ``<module>.<factor>.weight`` (``bm``: a Tucker core, which lorahot refuses).
GLORA_FACTORS = ("a1", "a2", "b1", "b2", "bm")


def lycoris_rules(module: str) -> tuple[Rule, ...]:
    """Rules for LyCORIS factors (``<module>.hada_w1_a``, ...), a Tucker LoCon core
    (``<module>.lora_mid.weight``) and the magnitude of weight decomposition
    (``<module>.dora_scale``, role ``dora_scale``: read as DoRA on a LoRA/LoCon module, or
    folded with a LyCORIS kind or over the input channels in merged mode, see
    :mod:`lorahot.io.loader`) and GLoRA's ``<module>.a1.weight``, ... (roles ``a1``, ...) after
    the module pattern ``module``.

    A ``<module>.diff_b`` is role ``diff_bias``: beside a module's LoRA it is that LoRA's bias,
    added at the adapter's weight and unscaled by ``alpha / r``, as ComfyUI applies the bias
    deltas its LoRA extraction writes beside every ``lora_up``/``lora_down`` pair (unmerged it
    needs ``extras=True``); beside a ``.diff`` or LyCORIS factors, or alone, the loader reads it
    as the ``diff_b`` of a diff module (merged mode). LyCORIS' ``<module>.w_norm`` and
    ``<module>.b_norm`` (its ``train_norm`` option: a normalization layer's weight and bias
    deltas, ``w0 + s * w_norm``) are read as that module's ``diff`` and ``diff_b``, as ComfyUI
    reads them."""
    return (
        Rule(rf"{module}\.diff_b", "diff_bias"),
        Rule(rf"{module}\.(?:{'|'.join(LYCORIS_FACTORS)})", ""),
        Rule(rf"{module}\.w_norm", "diff"),
        Rule(rf"{module}\.b_norm", "diff_bias"),
        Rule(rf"{module}\.lora_mid\.weight", "lora_mid"),
        Rule(rf"{module}\.dora_scale", "dora_scale"),
        *(Rule(rf"{module}\.{f}\.weight", f) for f in GLORA_FACTORS),
    )


#: DoRA magnitudes and LoRA biases as PEFT names them (an optional adapter name after the role),
#: read by the namings that use PEFT's roles (PEFT, diffusers); also a LoRA/LoCon module's
#: ``dora_scale``, LyCORIS' weight decomposition, which OneTrainer writes beside ``lora_down`` /
#: ``lora_up`` in diffusers' module names (``transformer.<module>.dora_scale``) and ComfyUI reads
#: in every naming.
EXTRA_RULES = (
    Rule(r"(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?", "magnitude"),
    Rule(r"(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias", "bias"),
    Rule(r"(?P<module>.+)\.dora_scale", "dora_scale"),
)
#: :data:`REFUSED` less DoRA and LoRA biases, for the namings of :data:`EXTRA_RULES`.
REFUSED_BUT_EXTRAS = tuple(r for r in REFUSED if r not in (REFUSED_DORA, REFUSED_BIAS))

#: The LoHa and LoKr factors (``<module>.lokr_w1``, ...), each its own role: read in the model's
#: own names without a prefix (PEFT naming), as diffusers' Flux.2 and Z-Image loaders read
#: SimpleTuner's LoKr files, with LyCORIS' ``alpha / r`` (merged mode).
HADAMARD_KRONECKER = Rule(
    rf"(?P<module>.+)\.(?:{'|'.join(f for f in LYCORIS_FACTORS if f.startswith(('hada_', 'lokr_')))})", ""
)
#: :data:`REFUSED_BUT_EXTRAS` for the namings that read :data:`HADAMARD_KRONECKER`: Tucker cores
#: and diffs are refused still.
REFUSED_BUT_EXTRAS_AND_FACTORS = tuple(
    (
        r"\.(lora_mid\.weight|diff|diff_b)$",
        "LyCORIS Tucker or diff weights (lora_mid, diff, diff_b): lorahot loads them in kohya or ComfyUI naming, "
        "into a model injected with merged=True",
    )
    if why.startswith("LyCORIS (LoHa")
    else (pattern, why)
    for pattern, why in REFUSED_BUT_EXTRAS
)

#: A key no rule parses that names a whole module's parameter: PEFT's modules_to_save, trained
#: biases, or a resized embedding saved whole.
_FULL_WEIGHT = r"(?P<module>.+)\.(weight|bias)"
#: A textual-inversion embedding bundled with a LoRA: kohya's and OneTrainer's pivotal tuning
#: (``bundle_emb.<token>.string_to_param.*``, ``bundle_emb.<token>.clip_l``), A1111's
#: ``emb_params``, SDXL's per-encoder vectors (``<token>.clip_l``, ``clip_g``).
_EMBEDDING = r"bundle_emb\..+|emb_params|(?:.+\.)?string_to_(?:param|token)(?:\..+)?|(?:[^.]+\.)?clip_[lg]"
#: A key no rule of a naming parses that still names a LoRA factor (another naming's role).
_LORA_ROLE = r".+\.(?P<role>lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|alpha)(\.[^.]+)?(\.weight)?"
