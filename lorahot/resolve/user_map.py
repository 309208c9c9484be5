"""User-directed key mapping, applied to an adapter's module keys before they meet the model.

- ``prefix``: keep only modules under this component prefix and strip it
  (``prefix="unet"`` on a file holding ``unet.`` and ``text_encoder.`` modules).
- ``key_map``: ``{regex: replacement}``; a module key that fully matches a regex is renamed
  to the expansion (``\\1`` refers to groups), first match wins.
- ``fuse``: ``{fused: [part, ...]}``; the parts' LoRAs (``q_proj``, ``k_proj``, ``v_proj``)
  become one LoRA on the fused projection (``qkv_proj``): A's stacked, B block-diagonal with
  each part's scale folded into its block, so the rank is the sum of the parts' ranks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from lorahot.adapter import LoraModule
from lorahot.errors import AdapterMismatchError, UsageError, format_problems

__all__ = ["FusePart", "Fuse", "select_prefix", "apply_key_map", "fuse_modules"]

#: A part of a fused projection: its name, or ``(name, out_features)`` so that a part the
#: adapter does not train can be filled with zeros.
FusePart = str | tuple[str, int]
Fuse = Mapping[str, Sequence[FusePart]]


def select_prefix(modules: dict[str, LoraModule], prefix: str, source: str) -> dict[str, LoraModule]:
    """The modules whose key starts with ``prefix`` (then ``.`` or ``_``), with it removed.

    Raises:
        UsageError: ``prefix`` is not a string or no module key starts with it.
    """
    if not isinstance(prefix, str) or not prefix:
        raise UsageError(f"prefix={prefix!r} must be a non-empty string such as 'unet' or 'lora_te1_'.")
    heads = (prefix,) if prefix.endswith((".", "_")) else (prefix + ".", prefix + "_")
    out = {}
    for key, m in modules.items():
        head = next((h for h in heads if key.startswith(h)), None)
        if head is not None:
            out[key[len(head) :]] = _renamed(m, key[len(head) :])
    if not out:
        seen = sorted({k.split(".")[0] if "." in k else "_".join(k.split("_")[:2]) for k in modules})
        raise UsageError(
            f"{source}: prefix={prefix!r} matches no module key; keys start with {', '.join(seen[:8])}. Pass one of "
            "those."
        )
    return out


def apply_key_map(modules: dict[str, LoraModule], key_map: Mapping[str, str], source: str) -> dict[str, LoraModule]:
    """Renames module keys by the first fully matching ``{regex: replacement}`` entry.

    Raises:
        UsageError: a regex does not compile, or two keys are renamed onto one.
    """
    if not isinstance(key_map, Mapping):
        raise UsageError(f"key_map must be a mapping of regex -> replacement, got {type(key_map).__name__}.")
    compiled = []
    for pattern, repl in key_map.items():
        try:
            compiled.append((re.compile(pattern), repl))
        except (re.error, TypeError) as exc:
            raise UsageError(f"key_map entry {pattern!r} is not a valid regex ({exc}).") from None
    out: dict[str, LoraModule] = {}
    origin: dict[str, str] = {}
    for key, m in modules.items():
        new = next((p.sub(r, key) for p, r in compiled if p.fullmatch(key)), key)
        if new in out:
            raise UsageError(
                f"{source}: key_map sends both {origin[new]!r} and {key!r} to {new!r}; make the entries distinct."
            )
        out[new], origin[new] = _renamed(m, new), key
    return out


def fuse_modules(modules: dict[str, LoraModule], fuse: Fuse, source: str) -> dict[str, LoraModule]:
    """Replaces each complete set of part LoRAs by one LoRA on the fused projection.

    A part key is ``<parent><sep><part>`` with ``sep`` ``.`` or ``_``; its fused key is
    ``<parent><sep><fused>``. For parts of rank ``r_i``, ``A_i [r_i, in]``,
    ``B_i [out_i, r_i]`` and scale ``s_i``::

        A = [A_1; A_2; ...]                    # [sum r_i, in]
        B = blockdiag(s_1 B_1, s_2 B_2, ...)   # [sum out_i, sum r_i]

    with alpha equal to the summed rank (scale 1), so ``B @ A`` stacks every part's delta.

    Raises:
        UsageError: a malformed ``fuse`` argument.
        AdapterMismatchError: a part missing with no size given, parts that are not linear, or
            parts whose inputs differ; every problem is listed.
    """
    spec = _fuse_spec(fuse)
    out = dict(modules)
    problems: list[str] = []
    for fused, parts in spec.items():
        for parent, sep in _parents(modules, [p for p, _ in parts]):
            found = {p: modules.get(f"{parent}{sep}{p}") for p, _ in parts}
            for p in found:
                out.pop(f"{parent}{sep}{p}", None)
            key = f"{parent}{sep}{fused}"
            module = _fuse_one(key, [(p, size, found[p]) for p, size in parts], problems)
            if module is not None:
                out[key] = module
    if problems:
        raise AdapterMismatchError(
            format_problems(f"{source}: cannot fuse:", problems)
            + "\nGive the size of untrained parts as (name, out_features), or fix fuse=."
        )
    return out


def _fuse_spec(fuse: Fuse) -> dict[str, list[tuple[str, int | None]]]:
    if not isinstance(fuse, Mapping) or not fuse:
        raise UsageError(
            f"fuse must be a non-empty mapping like {{'qkv_proj': ['q_proj', 'k_proj', 'v_proj']}}, got {fuse!r}."
        )
    spec = {}
    for fused, parts in fuse.items():
        parsed: list[tuple[str, int | None]] = []
        for p in parts if isinstance(parts, (list, tuple)) else [None]:
            if isinstance(p, str):
                parsed.append((p, None))
            elif (
                isinstance(p, (list, tuple))
                and len(p) == 2
                and isinstance(p[0], str)
                and isinstance(p[1], int)
                and p[1] > 0
            ):
                parsed.append((p[0], p[1]))
            else:
                raise UsageError(f"fuse[{fused!r}]: each part must be a name or (name, out_features), got {p!r}.")
        if len(parsed) < 2:
            raise UsageError(f"fuse[{fused!r}] must list at least two parts, got {parts!r}.")
        spec[fused] = parsed
    return spec


def _parents(modules: dict[str, LoraModule], parts: list[str]) -> list[tuple[str, str]]:
    """``(parent, separator)`` of every module key ending in one of ``parts``, in file order."""
    seen: dict[tuple[str, str], None] = {}
    for key in modules:
        for part in parts:
            for sep in (".", "_"):
                if key.endswith(sep + part):
                    seen[(key[: -len(sep + part)], sep)] = None
    return list(seen)


def _fuse_one(
    key: str, parts: list[tuple[str, int | None, LoraModule | None]], problems: list[str]
) -> LoraModule | None:
    present = [m for _, _, m in parts if m is not None]
    if any(m.A.ndim != 2 or m.B.ndim != 2 for m in present):
        problems.append(f"{key}: only linear parts can be fused; got A shapes {[tuple(m.A.shape) for m in present]}")
        return None
    if len({int(m.A.shape[1]) for m in present}) != 1:
        problems.append(f"{key}: parts read different input sizes {[tuple(m.A.shape) for m in present]}")
        return None
    dtype = torch.promote_types(present[0].A.dtype, torch.float32)
    fan_in = int(present[0].A.shape[1])
    a_blocks, b_blocks = [], []
    for name, size, m in parts:
        if m is None:
            if size is None:
                problems.append(f"{key}: no LoRA for part {name!r} and no size for it; pass ({name!r}, out_features)")
                return None
            a_blocks.append(torch.zeros(0, fan_in, dtype=dtype))
            b_blocks.append(torch.zeros(size, 0, dtype=dtype))
            continue
        if size is not None and size != m.B.shape[0]:
            problems.append(f"{key}: part {name!r} has B {tuple(m.B.shape)}, but fuse= says out_features={size}")
            return None
        a_blocks.append(m.A.to(dtype))
        b_blocks.append(m.B.to(dtype) * m.scale)
    a, b = torch.cat(a_blocks), torch.block_diag(*b_blocks)  # [sum r, in], [sum out, sum r]
    keys = tuple(k for m in present for k in (m.source_keys or (m.key,)))
    return LoraModule(key, a, b, float(a.shape[0]), False, keys)


def _renamed(m: LoraModule, key: str) -> LoraModule:
    return LoraModule(key, m.A, m.B, m.alpha, m.use_rslora, m.source_keys)
