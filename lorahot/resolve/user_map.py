"""User-directed key mapping, applied to an adapter's module keys before they meet the model.

- ``prefix``: keep only modules under this component prefix and strip it
  (``prefix="unet"`` on a file holding ``unet.`` and ``text_encoder.`` modules). The prefix
  matches whole name components, per the naming's separator: ``prefix + "."`` for dotted
  namings, ``prefix + "_"`` for kohya's (``lora_te1``), so ``text_encoder`` never selects
  ``text_encoder_2`` and ``lora_te`` never ``lora_te1``.
- ``key_map``: ``{regex: replacement}``; a module key that fully matches a regex is renamed
  to the expansion (``\\1`` refers to groups), first match wins. These regexes are the
  caller's own code and run with Python's ``re``; a bad one is a :class:`UsageError`.
- ``fuse``: ``{fused: [part, ...]}``; the parts' LoRAs (``q_proj``, ``k_proj``, ``v_proj``)
  become one LoRA on the fused projection (``qkv_proj``): A's stacked, B block-diagonal with
  each part's scale folded into its block, so the rank is the sum of the parts' ranks. What a
  part holds per output row is stacked by the same rows: DoRA magnitudes (DoRA normalizes each
  output row on its own, so the fused layer's DoRA rows are the parts' DoRA rows, at any scale)
  and LoRA biases (each times its part's scale; zeros for a part without one). DoRA parts beside
  parts without a magnitude are refused: a plain row has no magnitude that stays exact under
  ``set_scale``. Where a part is a weight delta (LyCORIS kinds, diffs: merged mode), the fused
  layer's ``ΔW`` is the parts' ``ΔW`` by rows, each built against its own rows of the base weight
  and normalized by its own ``dora_scale``, as its own layer would fold it; a plain LoRA part is
  then its ``B @ A`` at its scale.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

import torch

from lorahot.adapter import FusedPart, LoraModule, WeightModule, storage_problem
from lorahot.adapter.deltas import base_rows, delta_shape
from lorahot.errors import (
    AdapterMismatchError,
    AdapterReadError,
    UsageError,
    format_problems,
    lines,
    name_problem,
    shown,
)
from lorahot.formats import KeyFormat

__all__ = ["FusePart", "Fuse", "select_prefix", "keys_under", "apply_key_map", "fuse_modules"]

#: A part of a fused projection: its name, or ``(name, out_features)`` so that a part the
#: adapter does not train can be filled with zeros.
FusePart = str | tuple[str, int]
Fuse = Mapping[str, Sequence[FusePart]]


#: A LoRA module or a weight-kind module (both carry ``key``; renames treat them alike).
M = TypeVar("M", LoraModule, WeightModule, LoraModule | WeightModule)


def select_prefix(modules: dict[str, M], prefix: str, source: str, fmt: KeyFormat) -> dict[str, M]:
    """The modules whose key starts with the component ``prefix``, with it removed.

    ``prefix`` matches whole components: it is followed by ``fmt``'s separator (added unless
    ``prefix`` ends with it).

    Raises:
        UsageError: ``prefix`` is not a non-empty string, or no module key starts with it.
    """
    if not isinstance(prefix, str) or not prefix.strip(fmt.separator + " "):
        raise UsageError(f"prefix={shown(prefix)} must be a non-empty string such as 'unet' or 'lora_te1'.")
    if (problem := name_problem(prefix)) is not None:
        raise UsageError(f"prefix={shown(prefix)} {problem}. Pass a component name such as 'unet' or 'lora_te1'.")
    head = _head(prefix, fmt)
    out = {key[len(head) :]: _renamed(m, key[len(head) :]) for key, m in modules.items() if key.startswith(head)}
    if not out:
        seen = sorted({_component(k, fmt) for k in modules})
        raise UsageError(
            f"{source}: prefix={shown(prefix)} matches no module key; keys start with {', '.join(seen[:8])} (a "
            f"prefix matches whole components, up to {shown(fmt.separator, 200)}). Pass one of those."
        )
    return out


def keys_under(keys: Sequence[str], prefix: str, fmt: KeyFormat) -> tuple[str, ...]:
    """The ``keys`` that start with the component ``prefix`` (as :func:`select_prefix` selects
    modules, ``prefix`` checked there), with it removed: an adapter's file keys
    (:attr:`~lorahot.adapter.Adapter.file_keys`) narrowed as its modules are."""
    head = _head(prefix, fmt)
    return tuple(key[len(head) :] for key in keys if key.startswith(head))


def _head(prefix: str, fmt: KeyFormat) -> str:
    """``prefix`` ending with ``fmt``'s separator: it matches whole components."""
    return prefix if prefix.endswith(fmt.separator) else prefix + fmt.separator


def _component(key: str, fmt: KeyFormat) -> str:
    """The leading component of ``key``: a known prefix of its naming, else up to the separator."""
    known = next((p for p in fmt.prefixes if key.startswith(p)), None)
    if known is not None:
        return known[: -len(fmt.separator)] if known.endswith(fmt.separator) else known
    if fmt.separator == "_":
        return "_".join(key.split("_")[:2])
    return key.split(fmt.separator)[0]


def apply_key_map(modules: dict[str, M], key_map: Mapping[str, str], source: str) -> dict[str, M]:
    """Renames module keys by the first fully matching ``{regex: replacement}`` entry.

    Raises:
        UsageError: a regex does not compile, or two keys are renamed onto one.
    """
    if not isinstance(key_map, Mapping):
        raise UsageError(f"key_map must be a mapping of regex -> replacement, got {type(key_map).__name__}.")
    compiled = [(_compile(pattern, repl), repl) for pattern, repl in key_map.items()]
    out: dict[str, M] = {}
    origin: dict[str, str] = {}
    for key, m in modules.items():
        new = _renamed_key(key, compiled)
        if new in out:
            raise UsageError(
                f"{source}: key_map sends both {shown(origin[new], 200)} and {shown(key, 200)} to "
                f"{shown(new, 200)}; make the entries distinct."
            )
        out[new], origin[new] = _renamed(m, new), key
    return out


def _compile(pattern: object, repl: object) -> re.Pattern[str]:
    """``pattern`` compiled, with ``repl`` checked against it; any failure is the caller's."""
    if not isinstance(pattern, str) or not isinstance(repl, str):
        raise UsageError(f"key_map entries must map str to str, got {shown(pattern)}: {shown(repl)}.")
    try:
        compiled = re.compile(pattern)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise UsageError(f"key_map entry {shown(pattern)} is not a valid regex ({_cut(str(exc))}).") from None
    try:
        compiled.sub(repl, "")  # parses the template: a bad group reference fails here, not mid-load
    except (re.error, IndexError, ValueError) as exc:
        raise UsageError(
            f"key_map entry {shown(pattern)}: replacement {shown(repl)} is not valid ({_cut(str(exc))})."
        ) from None
    return compiled


def _renamed_key(key: str, compiled: list[tuple[re.Pattern[str], str]]) -> str:
    """``key`` renamed by the first pattern that fully matches it (unchanged if none does)."""
    for pattern, repl in compiled:
        m = pattern.fullmatch(key)
        if m is not None:
            try:
                new = m.expand(repl)
            except (re.error, IndexError) as exc:
                raise UsageError(
                    f"key_map entry {shown(pattern.pattern)}: {shown(repl)} fails on {shown(key)} ({exc})."
                ) from None
            if (problem := name_problem(new)) is not None:
                raise UsageError(
                    f"key_map entry {shown(pattern.pattern)} renames {shown(key)} to {shown(new)}, which {problem}. "
                    "Map keys to the model's module names."
                )
            return new
    return key


def fuse_modules(
    modules: dict[str, LoraModule],
    fuse: Fuse,
    source: str,
    fmt: KeyFormat,
    weights: Mapping[str, WeightModule] | None = None,
) -> tuple[dict[str, LoraModule], dict[str, WeightModule]]:
    """Replaces each complete set of part modules by one module on the fused projection: LoRA
    parts by one LoRA; parts among which is a weight delta (``weights``: any LyCORIS kind, a
    diff) by one ``"fused"`` weight module whose ``ΔW`` stacks each part's rows (merged mode),
    a LoRA part among them as its ``B @ A`` (kind ``"lora"``).

    A part key is ``<parent><sep><part>`` with ``sep`` the naming's separator (``.``, or ``_``
    for kohya); its fused key is ``<parent><sep><fused>``. For LoRA parts of rank ``r_i``,
    ``A_i [r_i, in]``, ``B_i [out_i, r_i]`` and scale ``s_i``::

        A = [A_1; A_2; ...]                    # [sum r_i, in]
        B = blockdiag(s_1 B_1, s_2 B_2, ...)   # [sum out_i, sum r_i]

    with alpha equal to the summed rank (scale 1), so ``B @ A`` stacks every part's delta. A
    DoRA magnitude ``m = [m_1; m_2; ...]`` and a LoRA bias ``c = [s_1 c_1; s_2 c_2; ...]`` (zeros
    for a part without one) are stacked by the same rows; the fused module is ``unit_scale`` when
    any part is. Weight-delta parts stack as ``ΔW = [s_1 ΔW_1; s_2 ΔW_2; ...]``, each built from
    its own factors (:attr:`~lorahot.adapter.WeightModule.parts`) and, for a kind built from the
    base weight (OFT, BOFT, (IA)^3, GLoRA), from its own rows of ``W0``; a part's ``dora_scale``
    normalizes its own rows; their ``diff_b`` (a LoRA part's bias) stack likewise.

    Returns:
        ``(modules, weights)`` with the parts replaced.

    Raises:
        UsageError: a malformed ``fuse`` argument.
        AdapterReadError: a part's weights are not dense tensors with data (sparse, meta).
        AdapterMismatchError: a part missing with no size given, parts that are not linear,
            parts whose inputs or devices differ, or that carry a base-layer weight copy, a
            magnitude or bias without one value per row of its B, DoRA parts beside parts
            without a magnitude (untrained ones included), a DoRA LoRA part beside weight-delta
            parts, a part already cut from or joined into a fused module; every problem is listed.
    """
    spec = _fuse_spec(fuse)
    out, out_weights = dict(modules), dict(weights or {})
    problems: list[str] = []
    both: dict[str, LoraModule | WeightModule] = {**modules, **out_weights}
    for fused, parts in spec.items():
        for parent in _parents(both, [p for p, _ in parts], fmt.separator):
            keys = {p: _child(parent, fmt.separator, p) for p, _ in parts}
            key = _child(parent, fmt.separator, fused)
            deltas = {p: out_weights.pop(k) for p, k in keys.items() if k in out_weights}
            if deltas:
                loras = {p: out.pop(k) for p, k in keys.items() if k in out}
                as_deltas = {p: _lora_delta(key, m, problems) for p, m in loras.items()}
                if any(w is None for w in as_deltas.values()):
                    continue
                deltas |= {p: w for p, w in as_deltas.items() if w is not None}
                joined = _fuse_deltas(key, [(p, size, deltas.get(p)) for p, size in parts], problems)
                if joined is not None:
                    out_weights[key] = joined
                continue
            found = {p: modules.get(k) for p, k in keys.items()}
            for k in keys.values():
                out.pop(k, None)
            module = _fuse_one(key, [(p, size, found[p]) for p, size in parts], problems)
            if module is not None:
                out[key] = module
    if problems:
        raise AdapterMismatchError(
            lines(
                format_problems(f"{source}: cannot fuse:", problems),
                "Give the size of untrained parts as (name, out_features), or fix fuse=.",
            )
        )
    return out, out_weights


def _fuse_deltas(
    key: str, parts: list[tuple[str, int | None, WeightModule | None]], problems: list[str]
) -> WeightModule | None:
    """One ``"fused"`` weight module on ``key`` from weight-delta parts (an untrained part, with
    its size, is a zero diff), or None with the problems appended."""
    pieces: list[tuple[WeightModule, int]] = []
    for name, size, w in parts:
        if w is None:
            if size is None:
                problems.append(
                    f"{key}: no module for part {shown(name, 200)} and no size for it; pass ({shown(name, 200)}, "
                    "out_features)"
                )
                return None
            pieces.append((WeightModule(name, "diff", {}), size))
            continue
        why = _unjoinable(w, name, size)
        if why is not None:
            problems.append(f"{key}: part {w.key} is {why}")
            return None
        got = _part_rows(w, size)
        if got is None:
            problems.append(f"{key}: part {w.key}'s {w.kind} factors do not multiply to a weight")
            return None
        if size is not None and size != got:
            problems.append(f"{key}: part {shown(name, 200)} has {got} output rows, but fuse= says {size}")
            return None
        bias = w.factors.get("diff_b")
        if bias is not None:
            _check_bias_values(key, w, bias)
        if bias is not None and tuple(bias.shape) != (got,):
            problems.append(
                f"{key}: part {w.key}'s diff_b has shape {tuple(bias.shape)}, but the part has {got} output rows; a "
                f"diff_b holds one value per row, ({got},)"
            )
            return None
        pieces.append((w, got))
    factors = {f"{i}.{k}": t for i, (w, _) in enumerate(pieces) for k, t in w.factors.items() if k != "diff_b"}
    biases = [w.factors.get("diff_b") for w, _ in pieces]
    present = [b for b in biases if b is not None]
    if present:
        dtype = _widest(present)
        device = present[0].device
        factors["diff_b"] = torch.cat(
            [
                torch.zeros(n, dtype=dtype, device=device) if b is None else b.to(device, dtype).reshape(-1) * w.scale
                for (w, n), b in zip(pieces, biases)
            ]
        )
    return WeightModule(
        key,
        "fused",
        factors,
        None,
        tuple(k for w, _ in pieces for k in w.source_keys),
        parts=tuple(FusedPart(w.key, w.kind, w.alpha, n, w.source_keys) for w, n in pieces),
    )


def _lora_delta(key: str, m: LoraModule, problems: list[str]) -> WeightModule | None:
    """The LoRA part ``m`` of weight-delta parts as a weight delta of its own: ``B @ A`` at its
    scale (kind ``"lora"``), its LoRA bias a ``diff_b``; or None with the problem appended.

    Raises:
        AdapterReadError: its weights are not dense floating-point tensors with data.
    """
    problem = _unfusable(key, [m])
    if problem is None and m.magnitude is not None:
        problem = (
            f"{key}: part {m.key} is DoRA (a magnitude vector) beside weight-delta parts; its magnitude applies to "
            "its LoRA's update, which fuse= joins only with LoRA parts. Inject the parts as separate layers (no fuse=)"
        )
    if problem is not None:
        problems.append(problem)
        return None
    factors = {"lora_down": m.A, "lora_up": m.B} | ({} if m.bias is None else {"diff_b": m.bias.reshape(-1)})
    alpha = m.scale * m.rank if m.use_rslora else m.alpha  # WeightModule's scale is alpha / r
    return WeightModule(m.key, "lora", factors, alpha, m.source_keys or (m.key,))


def _part_rows(w: WeightModule, size: int | None) -> int | None:
    """The output rows of the weight-delta part ``w``, or None if its factors make no weight. A
    diff of a bias alone (``diff_b``, no ``diff``) has as many rows as the bias, or ``size``."""
    if w.reads_base:  # the rows its factors name (an input-side (IA)^3: the size fuse= gives)
        rows = base_rows(w)
        return size if rows is None else rows
    if w.kind == "diff" and "diff" not in w.factors and "lora_down" not in w.factors:
        bias = w.factors.get("diff_b")
        return size if size is not None or bias is None else int(bias.shape[0]) if bias.ndim else 1
    got = delta_shape(w, (0, 0))
    return None if not got else int(got[0])


def _check_bias_values(key: str, w: WeightModule, bias: torch.Tensor) -> None:
    """Checks that the part's ``diff_b`` holds values fuse= can stack (a dense float).

    Raises:
        AdapterReadError: it holds no data (sparse, meta) or is not floating point, which
            stacking would cast away before the values are checked.
    """
    why = storage_problem(bias) or (f"of dtype {bias.dtype}" if bias.dtype not in _FUSABLE else None)
    if why is not None:
        raise AdapterReadError(
            f"{key}: part {w.key}'s diff_b is {why}; weights must be dense float16/bfloat16/float32/float64 tensors "
            "with data. Pass real weights."
        )


def _unjoinable(w: WeightModule, name: str, size: int | None) -> str | None:
    """Why fuse= cannot join the weight-delta part ``w`` (part ``name``, of ``size`` rows where
    fuse= gives them), or None."""
    if w.kind == "ia3" and size is None and base_rows(w) is None:
        return (
            f"{w.named} module whose factors do not say how many output rows it acts on (an input-side (IA)^3 "
            f"scales input columns); give fuse= its size as ({shown(name, 200)}, out_features)"
        )
    if w.rows is not None or w.kind == "fused":
        return f"{w.named} module already cut from or joined into a fused module"
    return None


#: the largest out_features fuse= may give an untrained part (its zero block is allocated)
_MAX_PART = 1 << 20


def _fuse_spec(fuse: Fuse) -> dict[str, list[tuple[str, int | None]]]:
    if not isinstance(fuse, Mapping) or not fuse:
        raise UsageError(
            f"fuse must be a non-empty mapping like {{'qkv_proj': ['q_proj', 'k_proj', 'v_proj']}}, got {shown(fuse)}."
        )
    spec = {}
    for fused, parts in fuse.items():
        if not isinstance(fused, str) or not fused:
            raise UsageError(f"fuse: the fused name {shown(fused)} must be a non-empty string such as 'qkv_proj'.")
        if (problem := name_problem(fused)) is not None:
            raise UsageError(f"fuse: the fused name {shown(fused)} {problem}. Pass the fused layer's module name.")
        parsed = [_fuse_part(fused, p) for p in (parts if isinstance(parts, (list, tuple)) else [None])]
        if len(parsed) < 2:
            raise UsageError(f"fuse[{shown(fused, 200)}] must list at least two parts, got {shown(parts)}.")
        spec[fused] = parsed
    named: dict[str, str] = {}  # part -> the fused name listing it
    for fused, parsed in spec.items():
        for part, _ in parsed:
            if part in named or part in spec:
                where = "is itself a fused name" if part in spec else f"is already a part of {shown(named[part], 200)}"
                raise UsageError(
                    f"fuse[{shown(fused, 200)}]: part {shown(part, 200)} {where}; each module can fill one place of "
                    "one fused layer. List each part once."
                )
            named[part] = fused
    return spec


def _fuse_part(fused: str, p: object) -> tuple[str, int | None]:
    if isinstance(p, str) and p:
        return _part_name(fused, p), None
    if isinstance(p, (list, tuple)) and len(p) == 2:
        name, size = p
        if isinstance(name, str) and name and type(size) is int and 0 < size <= _MAX_PART:
            return _part_name(fused, name), size
    raise UsageError(
        f"fuse[{shown(fused, 200)}]: each part must be a name or (name, out_features) with 1 <= out_features <= "
        f"{_MAX_PART}, "
        f"got {shown(p)}."
    )


def _part_name(fused: str, name: str) -> str:
    if (problem := name_problem(name)) is not None:
        raise UsageError(f"fuse[{shown(fused, 200)}]: the part {shown(name)} {problem}. Pass the part's module name.")
    return name


def _parents(modules: Mapping[str, LoraModule | WeightModule], parts: list[str], sep: str) -> list[str]:
    """The parent of every module key ending in ``sep`` + one of ``parts``, in file order
    (``""`` for a part at the model's root)."""
    seen: dict[str, None] = {}
    for key in modules:
        for part in parts:
            if key == part:
                seen[""] = None
            elif key.endswith(sep + part):
                seen[key[: -len(sep + part)]] = None
    return list(seen)


def _child(parent: str, sep: str, name: str) -> str:
    """The key of ``name`` under ``parent`` (``""``: the root)."""
    return f"{parent}{sep}{name}" if parent else name


def _fuse_one(
    key: str, parts: list[tuple[str, int | None, LoraModule | None]], problems: list[str]
) -> LoraModule | None:
    present = [m for _, _, m in parts if m is not None]
    problem = _unfusable(key, present)
    if problem is not None:
        problems.append(problem)
        return None
    dora = [m.key for m in present if m.magnitude is not None]
    plain = [m.key for m in present if m.magnitude is None] + [n for n, size, m in parts if m is None and size]
    if dora and plain:
        problems.append(
            f"{key}: parts {dora} are DoRA and {plain} are not; the fused layer's DoRA needs a magnitude for every "
            "row, and none reproduces plain LoRA at every scale. Inject the parts as separate layers (no fuse=)"
        )
        return None
    dtype = _widest([t for m in present for t in (m.A, m.B, m.magnitude, m.bias) if t is not None])
    fan_in, device = int(present[0].A.shape[1]), present[0].A.device
    a_blocks, b_blocks, magnitudes, biases = [], [], [], []
    for name, size, m in parts:
        if m is None:
            if size is None:
                problems.append(
                    f"{key}: no LoRA for part {shown(name, 200)} and no size for it; pass ({shown(name, 200)}, "
                    f"out_features)"
                )
                return None
            a_blocks.append(torch.zeros(0, fan_in, dtype=dtype, device=device))
            b_blocks.append(torch.zeros(size, 0, dtype=dtype, device=device))
            biases.append(torch.zeros(size, dtype=dtype, device=device))
            continue
        if size is not None and size != m.B.shape[0]:
            problems.append(
                f"{key}: part {shown(name, 200)} has B {tuple(m.B.shape)}, but fuse= says out_features={size}"
            )
            return None
        a_blocks.append(m.A.to(dtype))
        b_blocks.append(m.B.to(dtype) * m.scale)
        if m.magnitude is not None:
            magnitudes.append(m.magnitude.to(dtype).reshape(-1))
        bias = torch.zeros(m.B.shape[0], dtype=dtype, device=device) if m.bias is None else m.bias.to(dtype)
        biases.append(bias.reshape(-1) * m.scale)
    a, b = torch.cat(a_blocks), torch.block_diag(*b_blocks)  # [sum r, in], [sum out, sum r]
    keys = tuple(k for m in present for k in (m.source_keys or (m.key,)))
    magnitude = None
    if magnitudes:  # in the parts' layout: PEFT's [out], LyCORIS' dora_scale [out, 1]
        ndim = present[0].magnitude.ndim  # type: ignore[union-attr]
        magnitude = torch.cat(magnitudes).reshape([-1] + [1] * (ndim - 1))
    return LoraModule(
        key,
        a,
        b,
        float(a.shape[0]),
        False,
        keys,
        magnitude=magnitude,
        bias=torch.cat(biases) if any(m.bias is not None for m in present) else None,
        unit_scale=any(m.unit_scale for m in present),
    )


def _widest(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype that holds every value of ``tensors`` exactly, at least float32: a part saved in
    float64 beside one in float16 keeps its float64 values in the fused module."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


#: dtypes fuse can combine (torch promotes none of the others with float32: float8, complex, ...)
_FUSABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _unfusable(key: str, present: list[LoraModule]) -> str | None:
    """Why the parts ``present`` cannot be fused into ``key``, or None.

    Raises:
        AdapterReadError: a part's weights hold no data (sparse, meta) or are not floating point:
            no model could use them.
    """
    for m in present:
        tensors = [t for t in (m.A, m.B, m.magnitude, m.bias) if t is not None]
        why = next((w for t in tensors if (w := storage_problem(t)) is not None), None)
        why = why or next((f"of dtype {t.dtype}" for t in tensors if t.dtype not in _FUSABLE), None)
        if why is not None:
            raise AdapterReadError(
                f"{key}: part {m.key} is {why}; LoRA weights must be dense float16/bfloat16/float32/float64 "
                "tensors with data. Pass real weights."
            )
    if any(m.A.ndim != 2 or m.B.ndim != 2 for m in present):
        return f"{key}: only linear parts can be fused; got A shapes {[tuple(m.A.shape) for m in present]}"
    if len({int(m.A.shape[1]) for m in present}) != 1:
        return f"{key}: parts read different input sizes {[tuple(m.A.shape) for m in present]}"
    devices = {t.device for m in present for t in (m.A, m.B, m.magnitude, m.bias) if t is not None}
    if len(devices) != 1:
        return f"{key}: parts lie on different devices {sorted(str(d) for d in devices)}"
    for m in present:
        for which, t in (("DoRA magnitude", m.magnitude), ("LoRA bias", m.bias)):
            if t is not None and (t.numel() != m.B.shape[0] or sum(d != 1 for d in t.shape) > 1):
                return (
                    f"{key}: part {m.key}'s {which} has shape {tuple(t.shape)}, but fusing it with B's rows needs one "
                    f"value per row of B ({m.B.shape[0]})"
                )
    if len({m.magnitude.ndim for m in present if m.magnitude is not None}) > 1:
        shapes = [tuple(m.magnitude.shape) for m in present if m.magnitude is not None]
        return f"{key}: parts' DoRA magnitudes have different layouts {shapes}; they come from different namings"
    carrying = [m.key for m in present if m.base_weight is not None]
    if carrying:
        return f"{key}: parts {carrying} carry a base-layer weight copy, which cannot be fused"
    return None


def _renamed(m: M, key: str) -> M:
    """``m`` under a new key; every other field (base_weight included) carried along."""
    return dataclasses.replace(m, key=key)


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
