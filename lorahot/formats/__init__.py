"""Adapter namings lorahot reads, one declarative :class:`KeyFormat` per naming.

Detection tries :data:`FORMATS` in order and takes the first whose table accounts for every
key; more specific namings (required prefixes, distinct roles) come before PEFT's. Where the
keys are of several namings (their markers, renames, aliases, splits), the naming most keys are
of wins and the others' keys are strays (:func:`read_as`), so one key never decides how a whole
file is read; a marked naming takes a file only where it takes more keys than the rest, which an
unmarked naming (PEFT's, kohya's, diffusers', ComfyUI's) reads. Where the model a file is
read for is known (:class:`ModelNames`: a runtime's load), a key whose module, as every naming
that reads the key reads it, is a module of that model is never a stray: where the keys alone
make one so, such keys vote for no naming and mark none (diffusers' Wan-Animate-2 keeps Wan's
original ``blocks.N.ffn.0`` and ``text_embedding.0``, which the ``wan`` naming marks and aliases).
The verdict is memoized by a digest of the key list and of the model's names (a file loaded
again skips the scans), never by the keys themselves.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from lorahot.formats import (
    anima,
    comfyui,
    diffusers,
    flux,
    flux3,
    hunyuan,
    hunyuan_dit,
    kohya,
    krea2,
    ltx2,
    lumina2,
    minimax_h3,
    peft,
    sd3,
    wan,
)
from lorahot.formats.table import KeyFormat, Reorder, Rule, Split, group_keys
from lorahot.memo import BoundedMemo, digest

__all__ = [
    "FORMATS",
    "KeyFormat",
    "ModelNames",
    "Reorder",
    "Rule",
    "Split",
    "detect",
    "format_named",
    "group_keys",
    "read_as",
]

#: Every known naming, in detection order.
FORMATS: tuple[KeyFormat, ...] = (
    krea2.KOHYA,  # the kohya spellings built from a naming of original names: markers of their own names
    ltx2.KOHYA,
    flux3.KOHYA,  # before flux-kohya, whose marker (lora_unet_single_blocks_N_) it shares
    hunyuan.MUSUBI,  # before flux-kohya: the same prefix and block names, spelled apart (img_mlp_fc1)
    flux.KOHYA,  # before kohya: original Flux block names, which only its renames and splits place
    flux.KOHYA_OUTSIDE,  # before kohya: a flux-kohya file without a block key (its rules read no other module)
    hunyuan_dit.KOHYA,  # before minimax-h3-musubi, whose marker (blocks_N_mlp_fc1) its keys match, and kohya
    minimax_h3.MUSUBI,  # before kohya: original MiniMax-H3 block names (blocks_N_attn_qkv_proj)
    anima.KOHYA,  # before wan-musubi, whose marker (blocks_N_self_attn_) its keys match, and kohya
    wan.MUSUBI,  # before kohya: original Wan block names
    sd3.KOHYA,  # before kohya: original SD3 block names (joint_blocks), which only its renames and splits place
    sd3.KOHYA_OUTSIDE,  # before kohya, after flux.KOHYA_OUTSIDE (a file of the final layer alone is either's)
    lumina2.KOHYA,  # before kohya: original Lumina2 / Z-Image attention names (attention_qkv, attention_out)
    lumina2.KOHYA_OUTSIDE,  # before kohya, after sd3.KOHYA_OUTSIDE (a file of t_embedder/final_layer alone is SD3's)
    kohya.FORMAT,
    flux.XLABS,  # before diffusers-old, whose processor keys look alike
    flux.FAL,  # before PEFT, whose keys look alike
    hunyuan_dit.FORMAT,  # before minimax-h3 (whose marker, blocks.N.mlp.fc1, its keys match) and PEFT
    minimax_h3.DIFFSYNTH,  # before minimax-h3, which reads .default. too, and PEFT
    minimax_h3.FORMAT,  # before PEFT (bare keys, PEFT's .default.) and Wan (blocks.N.)
    krea2.FORMAT,  # before PEFT (AI-Toolkit's base_model.model.) and Wan (blocks.N.)
    flux3.FORMAT,  # before flux-bfl and HunyuanVideo, whose marker (single_blocks.N.) it shares
    hunyuan.FORMAT,  # before flux-bfl: the same block names, spelled apart (img_attn_qkv)
    flux.BFL,
    sd3.FORMAT,  # before ComfyUI, diffusers and PEFT, whose diffusion_model., transformer. and bare keys look alike
    lumina2.FORMAT,  # before ComfyUI, whose diffusion_model. keys look alike
    anima.FORMAT,  # before Wan, whose block names it shares (blocks.N.self_attn)
    wan.FORMAT,  # before ComfyUI, whose diffusion_model. keys look alike
    ltx2.FORMAT,  # before ComfyUI, whose diffusion_model. keys look alike
    comfyui.FORMAT,
    diffusers.FORMAT,
    diffusers.OLD_FORMAT,
    peft.FORMAT,
)


@dataclass(frozen=True, eq=False)
class ModelNames:
    """The module paths of the model a file is read for (every ``named_modules`` path), which
    detection consults before any naming's aliases (:func:`read_as`).

    Attributes:
        dotted: the paths.
        underscored: the paths with ``.`` -> ``_`` (an underscore naming's spelling of them).
        key: a digest of the paths, which the memoized verdicts are keyed by.
    """

    dotted: frozenset[str]
    underscored: frozenset[str]
    key: bytes

    @classmethod
    def of(cls, paths: Iterable[str]) -> ModelNames:
        """The names of a model whose module paths are ``paths`` (the root's ``""`` left out)."""
        dotted = frozenset(p for p in paths if p)
        return cls(dotted, frozenset(p.replace(".", "_") for p in dotted), digest(sorted(dotted)))


#: (digest of a key list, of the model's names) -> its format and stray keys (about 300 bytes an
#: entry, and the strays)
_DETECTED: BoundedMemo[tuple[bytes, bytes], tuple[KeyFormat | None, tuple[str, ...]]] = BoundedMemo(
    1 << 20, lambda k, v: 96 + sum(len(s) + 56 for s in v[1])
)


def detect(keys: list[str], names: ModelNames | None = None) -> KeyFormat | None:
    """The naming a file of ``keys`` is read as (:func:`read_as`), or None (memoized)."""
    return read_as(keys, names)[0]


def read_as(keys: list[str], names: ModelNames | None = None) -> tuple[KeyFormat | None, tuple[str, ...]]:
    """The naming a file of ``keys`` is read as, and its stray keys (memoized).

    The first format in :data:`FORMATS` that accounts for every key, unless the keys are of two
    namings or more: each key is of the namings that place it their own way (a rename, an alias,
    a split), else of those whose marker it matches (:meth:`KeyFormat.claims`), and the naming
    that most keys are of wins (of equals, the first
    in :data:`FORMATS`, which lists the more specific namings first), so that a stray key never decides the
    naming of a whole file, and the keys of other namings and not of it are the strays,
    which a strict read refuses and ``strict=False`` skips. A marked naming takes the file only
    where it takes more keys than the others tell it from (:func:`_unmarked`); else the file is of
    the naming that reads the keys no marked naming takes, and the marked namings' keys are its
    strays. None where no format accounts for every key and no vote is held.

    With ``names`` (the model the file is read for), where the keys alone make strays of keys
    that name a module of that model (:func:`_model_own`), those keys are of no naming: they vote
    for none, a marker that matches only them marks no naming, and none is a stray; every naming
    reads them onto that module, its exact name coming before its aliases and splits
    (:mod:`lorahot.resolve.keys`). Elsewhere the verdict is the keys' alone."""
    return _DETECTED.get((digest(keys), b"" if names is None else names.key), _vote, keys, names)


def _vote(keys: list[str], model: ModelNames | None = None) -> tuple[KeyFormat | None, tuple[str, ...]]:
    verdict = _vote_among(keys, frozenset())
    model_own = _model_own(keys, model) if verdict[1] else frozenset()
    if model_own.isdisjoint(verdict[1]):  # the keys alone make none of the model's own names a stray
        return verdict
    return _vote_among(keys, model_own)


def _vote_among(keys: list[str], model_own: frozenset[str]) -> tuple[KeyFormat | None, tuple[str, ...]]:
    """The vote of :func:`read_as`, ``model_own`` (:func:`_model_own`) of no naming."""
    first = next((f for f in FORMATS if f.detect(keys) and _marked(f, keys, model_own)), None)
    if first is None and model_own:  # only a naming marked by the model's own names reads them all
        first = next((f for f in FORMATS if f.detect(keys)), None)
    present = [f for f in FORMATS if f.marker and f.score(keys) >= 0 and _marked(f, keys, model_own)]
    voters: dict[str, tuple[tuple[str, ...], int]] = {}  # key -> the namings it is one of, and how (claims)
    weak: set[str] = set()  # the keys only namings of modules outside the blocks take (KeyFormat.outside)
    # the keys that tell none of the namings that take them apart (KeyFormat.shares): names other
    # models have for their own modules (PixArt's adaln_single, which LTX-2's naming aliases)
    neutral: set[str] = set()
    claimed = [_module_claims(f, keys) for f in present]
    # the model's own names: of no naming, but for the marked namings that would claim them
    theirs: dict[str, set[str]] = {}
    for key in keys:
        if key in model_own:
            theirs[key] = {f.name for f, claims in zip(present, claimed, strict=True) if claims(key)}
            continue
        how = [(f, claims(key)) for f, claims in zip(present, claimed, strict=True)]
        best = max((c for _, c in how), default=0)
        if best:  # a naming that places the key its own way outvotes a marker alone
            voters[key] = (tuple(dict.fromkeys(f.name for f, c in how if c == best)), best)
            if all(f.shares(key) for f, c in how if c == best):
                neutral.add(key)
            if key in neutral or all(f.outside for f, c in how if c == best):
                weak.add(key)
    votes = {f.name: 0 for f in present}  # in FORMATS order: the first of equals wins
    for names, _ in voters.values():
        for name in names:
            votes[name] = votes.get(name, 0) + 1
    votes = {name: n for name, n in votes.items() if n}
    strays: tuple[str, ...] = ()
    if len(votes) < 2:
        winner = first
    else:
        won = max(votes, key=lambda name: votes[name])  # the first of equals: FORMATS is most specific first
        winner = first if first is not None and first.name == won else next(f for f in present if f.name == won)
        strays = _strays(winner, won, voters)
    if not voters:
        return winner, strays
    mine = [f for f in present if winner is not None and f.name == winner.name and f.marker]
    unmarked, rest = _unmarked(keys, voters, mine, theirs)
    # the keys that tell the marked naming apart: of those it takes, not the names it shares with other models
    own = sum(1 for k, (names, _) in voters.items() if mine and mine[0].name in names and k not in neutral)
    if unmarked is None or (mine and own > rest):
        return winner, strays
    # a file of an unmarked naming (its keys but those marked namings take), and a few keys of
    # marked ones: the strays, but for those it reads that only a naming of modules outside the
    # blocks takes, or only namings it comes before in FORMATS (less specific than it: the old
    # diffusers spelling, which ComfyUI's naming reads too)
    return unmarked, tuple(
        k
        for k in _strays(unmarked, "", voters)
        if (unmarked.parse(k) is None and unmarked.refusal(k) is None)
        or (k not in weak and min(_ORDER[name] for name in voters[k][0]) < _ORDER[unmarked.name])
    )


def _model_own(keys: list[str], names: ModelNames | None) -> frozenset[str]:
    """The keys that name a module of the model (``names``): every naming that reads the key
    reads it as such a module, by its path, without a component prefix (:data:`_PREFIXES`), or,
    in an underscore naming, by its underscore form. Any naming reads such a key onto that
    module: the lookup tries a key's exact name before a naming's aliases or splits."""
    if names is None:
        return frozenset()
    return frozenset(
        key
        for key in keys
        if (modules := _READ_AS_MODULES.get(key, _modules_read, key))
        and all(_names_module(module, underscored, names) for module, underscored in modules)
    )


def _modules_read(key: str) -> tuple[tuple[str, bool], ...]:
    """The modules the namings that read ``key`` read it as, each once, with whether the naming
    spells the model's ``.`` as ``_`` (most namings read a key alike)."""
    read = ((parsed[0], f.separator == "_") for f in FORMATS if (parsed := f.parse(key)) is not None)
    return tuple(dict.fromkeys(read))


#: tensor key -> :func:`_modules_read` of it (keys come from files: bounded by bytes)
_READ_AS_MODULES: BoundedMemo[str, tuple[tuple[str, bool], ...]] = BoundedMemo(
    4 << 20, lambda k, v: 2 * len(k) + sum(len(m) + 64 for m, _ in v)
)


def _names_module(module: str, underscored: bool, names: ModelNames) -> bool:
    """Whether ``module``, a module key of a naming (``underscored`` where it spells the model's
    ``.`` as ``_``), names a module of the model (``names``)."""
    bare = [module]
    if module.startswith(_PREFIXES):
        bare += [module[len(p) :] for p in _PREFIXES if module.startswith(p)]
    return any(m in names.dotted for m in bare) or (
        underscored and any(m.replace(".", "_") in names.underscored for m in bare)
    )


def _marked(fmt: KeyFormat, keys: list[str], model_own: frozenset[str]) -> bool:
    """Whether ``fmt``'s marker (if any) matches a key of ``keys`` other than the model's own names."""
    if not fmt.marker or not model_own:
        return True
    marker = re.compile(fmt.marker)
    return any(marker.search(k) for k in keys if k not in model_own)


def _module_claims(fmt: KeyFormat, keys: list[str]) -> Callable[[str], int]:
    """How each key is ``fmt``'s own (:meth:`KeyFormat.claims`), or its module's: the most any key
    of the module that ``fmt`` reads it into claims. A module is one naming's whole: its
    ``.alpha`` (which no marker names) goes with its marked factors, as the old diffusers
    naming's ``to_q.alpha`` with its ``to_q.lora.down.weight``."""
    own = {key: fmt.claims(key) for key in keys}
    most: dict[str, int] = {}
    for key in keys:
        parsed = fmt.parse(key)
        if parsed is not None:
            most[parsed[0]] = max(most.get(parsed[0], 0), own[key])

    def claims(key: str) -> int:
        parsed = fmt.parse(key)
        return own[key] if parsed is None else most[parsed[0]]

    return claims


#: naming -> where it first stands in :data:`FORMATS` (the more specific namings first)
_ORDER = {f.name: i for i, f in reversed(list(enumerate(FORMATS)))}

#: Every component prefix any naming knows, longest first (as the lookup strips them).
_PREFIXES = tuple(sorted({p for f in FORMATS for p in f.prefixes}, key=len, reverse=True))


#: Module keys of a component other than the denoiser (kohya's ``lora_te1_``, ComfyUI's
#: ``text_encoders.``, diffusers' ``text_encoder_2.``): every naming spells a text encoder's modules
#: in that encoder's own names, so such a key tells no naming of a file apart.
_OTHER_COMPONENT = re.compile(r"^(?:lora_te\d?_|text_encoders?(?:_\d)?\.)")


def _unmarked(
    keys: list[str],
    voters: dict[str, tuple[tuple[str, ...], int]],
    winner: list[KeyFormat],
    model_own: Mapping[str, set[str]] | None = None,
) -> tuple[KeyFormat | None, int]:
    """The naming of ``keys`` without those a marked naming takes (``voters``), where one reads
    them all, and how many of them tell it from ``winner`` (the formats of the marked naming the
    vote gives the file): those of the denoiser (not :data:`_OTHER_COMPONENT`) that no format of
    ``winner`` reads as a module of its model its marker leaves unmarked (:meth:`KeyFormat.shares`).
    A marked naming takes a file only where it claims more keys than that: else the file is of
    the unmarked naming (PEFT's, kohya's, diffusers', ComfyUI's) with a few keys of a marked one.
    The model's own names (``model_own``: :func:`_model_own`'s keys, each with the marked namings
    that would claim it) mark no naming, and tell the unmarked naming from ``winner`` unless
    ``winner`` would claim them (Ideogram 4's ``layers.N.feed_forward.w1``, Lumina2's names too,
    beside Lumina2's fused ``attention.qkv``)."""
    own = model_own or {}
    rest = [k for k in keys if k not in voters]
    unmarked = next((f for f in FORMATS if f.detect(rest) and _marked(f, rest, frozenset(own))), None) if rest else None
    if unmarked is None or unmarked.marker:
        return None, 0
    return unmarked, sum(
        1
        for k in rest
        if not _OTHER_COMPONENT.match(k)
        and not any(f.shares(k) for f in winner)
        and not any(f.name in own.get(k, ()) for f in winner)
    )


def _strays(winner: KeyFormat, won: str, voters: dict[str, tuple[tuple[str, ...], int]]) -> tuple[str, ...]:
    """The keys of other namings than ``won`` (``winner``'s name; empty for an unmarked naming)
    that are not of it."""
    return tuple(
        k
        for k, (names, how) in voters.items()
        # a key another naming only marks (no rename, alias or split of it) is placed as that
        # naming would place it by the winner's rules too, where they read it or refuse it
        if won not in names and (how == 2 or (winner.parse(k) is None and winner.refusal(k) is None))
    )


def format_named(name: str) -> KeyFormat:
    """The format called ``name``; PEFT's for names lorahot does not know (user-built adapters)."""
    return next((f for f in FORMATS if f.name == name), peft.FORMAT)
