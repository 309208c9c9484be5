"""Placing a fused adapter module onto several separate layers: the reverse of ``fuse=``.

A file trained on one fused projection (Flux's ``img_attn.qkv`` ``[3 D, D]``) meets a model
that has the parts as separate layers (``to_q``, ``to_k``, ``to_v``). With ``A [r, in]`` and
``B [sum out_j, r]``, part ``j`` receives::

    A_j = A                     # [r, in], shared
    B_j = B[o_j : o_j + out_j]  # [out_j, r], rows cut by the declared output sizes

so that ``B_j @ A_j`` is exactly the fused delta's rows of part ``j``, with the module's scale.
What else the module holds per output row is cut by the same rows: a DoRA magnitude ``m_j =
m[o_j : o_j + out_j]`` (DoRA normalizes each output row on its own, so
``m_i (W + s B A)_i / ||(W + s B A)_i||`` is the same row fused or split) and a LoRA bias.
**Block-sparse** files (kohya's qkv with rank ``r = k r'``) train each part on its own chunk of
A's rows: B is zero outside the diagonal blocks ``B[o_j : o_j + out_j, j r' : (j + 1) r']``.
When the rank divides by the number of parts and every off-diagonal block is exactly zero,
part ``j`` receives ``A[j r' : (j + 1) r']`` and that diagonal block, of rank ``r'``: the same
delta at a ``k``-th of the rank. Either way the scale ``alpha / r`` of the file is kept (the
part's alpha is rescaled to its rank), so nothing is folded into the weights.

:class:`~lorahot.formats.table.Reorder` re-stacks B's row blocks onto one layer (Flux's final
adaLN ``(shift, scale)`` -> diffusers' ``(scale, shift)``), and a magnitude's or bias' values
with them.

Every problem (sizes that do not add up to B's rows, an A that does not match B's rank, a
magnitude or bias without one value per row of B, a conv module, a part that lands on a module
the file also holds) is collected and raised once, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import overload

import torch

from lorahot.adapter import LoraModule, WeightModule
from lorahot.errors import AdapterMismatchError, UsageError, format_problems, lines, name_problem, shown
from lorahot.formats.table import Reorder, Split

__all__ = [
    "SplitSpec",
    "split_module",
    "split_weight",
    "reorder_module",
    "placed",
    "split_by_user",
    "place",
    "weight_kind",
]

#: ``split=``: ``{fused: [(part, out_features), ...]}``, the parts in the fused B's row order.
SplitSpec = Mapping[str, Sequence[tuple[str, int]]]


def split_module(module: LoraModule, parts: Sequence[tuple[str, int]]) -> list[LoraModule]:
    """``module`` (a fused linear LoRA) as one LoRA per part, each with its output rows.

    Args:
        module: ``A [r, in]``, ``B [sum(sizes), r]``, its alpha and rsLoRA flag.
        parts: ``(module key, out_features)`` per part, in B's row order.

    Returns:
        One module per part: ``A`` (or, block-sparse, its ``j``-th chunk of rows), ``B``'s rows
        of the part (or its diagonal block), the part's values of a DoRA magnitude and a LoRA
        bias, the same scale; the fused module's source keys.

    Raises:
        AdapterMismatchError: the sizes do not add up to B's rows, A and B disagree on the rank,
            a magnitude or bias does not hold one value per row of B, or the module is not
            linear (2-D A and B) or carries a base-weight copy.
    """
    problem = _unsplittable(module, [size for _, size in parts])
    if problem is not None:
        raise AdapterMismatchError(f"{_where(module)}: {problem}. {_FIX}")
    sizes = [size for _, size in parts]
    a, b = module.A, module.B  # [r, in], [sum(sizes), r]
    rows = [slice(o, o + n) for o, n in zip(_offsets(sizes), sizes)]
    if _block_sparse(b, sizes):
        rank = a.shape[0] // len(sizes)
        alpha = _alpha_for(module, rank)
        return [
            _part(module, key, a[j * rank : (j + 1) * rank], b[r, j * rank : (j + 1) * rank], alpha, r)
            for j, ((key, _), r) in enumerate(zip(parts, rows))
        ]
    return [_part(module, key, a, b[r], module.alpha, r) for (key, _), r in zip(parts, rows)]


def reorder_module(module: LoraModule, key: str, sizes: Sequence[int], order: Sequence[int]) -> LoraModule:
    """``module`` with B's row blocks (of ``sizes``, in the file's order) re-stacked in ``order``,
    and a DoRA magnitude's or LoRA bias' values with them.

    Raises:
        AdapterMismatchError: the sizes do not add up to B's rows, a magnitude or bias does not
            hold one value per row of B, or the module is not linear.
    """
    problem = _unsplittable(module, list(sizes))
    if problem is not None:
        raise AdapterMismatchError(f"{_where(module)}: {problem}. {_FIX}")
    rows = _reordered(list(sizes), order)  # the file's row of each row
    return _part(module, key, module.A, module.B[rows], module.alpha, rows)


def split_by_user(
    modules: dict[str, LoraModule],
    split: SplitSpec,
    source: str,
    sep: str,
    weights: Mapping[str, WeightModule] | None = None,
) -> tuple[dict[str, LoraModule], dict[str, WeightModule]]:
    """``split=``: each module key ``<parent><sep><fused>`` (or ``<fused>``) placed onto
    ``<parent><sep><part>``, one per ``(part, out_features)``. A LoRA is cut by B's rows, a
    weight delta (``weights``: LoHa, LoKr, a diff; merged mode) by the rows of its ``ΔW``
    (:func:`split_weight`), as the namings' own splits cut them.

    Returns:
        The LoRA modules and the weight deltas, each placed.

    Raises:
        UsageError: a malformed ``split`` argument.
        AdapterMismatchError: as :func:`place`, for either kind (a weight delta whose rows cannot
            be the parts': a per-input ``dora_scale``, a conv, sizes that do not add up).
    """
    rules = tuple(
        Split(
            rf"(?P<head>(?:.*{re.escape(sep)})?){re.escape(fused)}",
            tuple((r"\g<head>" + _literal(part), n) for part, n in parts),
            exact=True,
        )
        for fused, parts in _split_spec(split).items()
    )
    both = place({**modules, **(weights or {})}, rules, source, "split=")
    return (
        {k: m for k, m in both.items() if isinstance(m, LoraModule)},
        {k: m for k, m in both.items() if isinstance(m, WeightModule)},
    )


def weight_kind(module: WeightModule) -> str:
    """What a message calls ``module`` where split= or fuse= cannot reshape it, article included: its kind, a
    weight delta; a LoRA/LoCon whose ``dora_scale`` is per input channel by why (its norm runs
    over every output row of its layer, so no part of the rows holds its own)."""
    if module.kind == "locon":
        shape = tuple(module.factors["dora_scale"].shape)
        return (
            f"a LoRA/LoCon module whose dora_scale {shape} normalizes each input channel over every output row of its "
            "layer (LyCORIS wd_on_out=False), which no part of the rows computes alone"
        )
    if module.rotates:
        return (
            f"{module.named} module, a rotation of its layer's output rows built from that layer's whole weight, "
            "which no part of the rows holds"
        )
    if module.reads_base:
        return f"{module.named} module, a weight delta built from its layer's whole base weight"
    decomposed = " with weight decomposition (dora_scale)" if module.unit_scale else ""
    return f"{module.named} module{decomposed}, a weight delta"


def place(
    modules: Mapping[str, LoraModule | WeightModule], rules: tuple[Split | Reorder, ...], source: str, what: str
) -> dict[str, LoraModule | WeightModule]:
    """Every module that a rule fully matches, placed as the rule says (a LoRA by B's rows, a
    weight delta by its ``ΔW``'s); the others unchanged.

    Raises:
        AdapterMismatchError: every module that cannot be split (sizes that do not add up to
            B's or ``ΔW``'s rows or rows that do not divide by the shares, A and B of different
            ranks, conv modules, a per-input ``dora_scale``), and parts that land on a module key
            the file also holds; all listed at once.
    """
    out: dict[str, LoraModule | WeightModule] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    for key, module in modules.items():
        placed_ = placed(key, module, rules, problems)
        for new in placed_:
            if new.key in out:
                problems.append(f"{_where(new)}: lands on {shown(new.key, 200)}, which {origin[new.key]} already fills")
                continue
            out[new.key], origin[new.key] = new, ", ".join(new.source_keys or (key,))
    if problems:
        raise AdapterMismatchError(
            lines(
                format_problems(
                    f"{source}: fused modules that cannot be placed onto the model's layers ({what}):", problems
                ),
                f"{_FIX}",
            )
        )
    return out


@overload
def placed(
    key: str,
    module: LoraModule,
    rules: tuple[Split | Reorder, ...],
    problems: list[str],
    exists: Callable[[str], bool] = ...,
    head_sizes: Callable[[Sequence[str]], set[int]] = ...,
) -> list[LoraModule]: ...
@overload
def placed(
    key: str,
    module: LoraModule | WeightModule,
    rules: tuple[Split | Reorder, ...],
    problems: list[str],
    exists: Callable[[str], bool] = ...,
    head_sizes: Callable[[Sequence[str]], set[int]] = ...,
) -> list[LoraModule | WeightModule]: ...
def placed(
    key: str,
    module: LoraModule | WeightModule,
    rules: tuple[Split | Reorder, ...],
    problems: list[str],
    exists: Callable[[str], bool] = lambda target: True,
    head_sizes: Callable[[Sequence[str]], set[int]] = lambda targets: set(),
) -> list[LoraModule] | list[LoraModule | WeightModule]:
    """``module`` as the rule for ``key`` places it: ``[module]`` if no rule fully matches it,
    ``[]`` after appending to ``problems`` if it cannot be placed (sizes, ranks, a conv module).
    A weight delta (LoHa, LoKr, a diff: merged mode) is placed by the rows of its ``ΔW``
    (:func:`split_weight`), a LoRA by B's rows.

    Of the rules fully matching ``key``, the first whose every target ``exists`` in the model,
    injected or not (one naming's fused module can be cut one way for one model and another way
    for another: Lumina2's ``attention.qkv`` 3 : 1 : 1 onto ``attn.to_q``, Ideogram 4's
    1 : 1 : 1 onto ``attention.to_q``; a part on a layer not injected is then skipped or refused
    like any key); the first matching one where none does, whose targets then fail to resolve,
    naming them. Where no target of that rule is a module of the model, a module the rule cannot
    cut (its rows, its kind) is left whole (``[module]``), a key that names no layer of the model
    like any other (refused as such, skipped with ``strict=False``): another model's fused module,
    whose sizes say nothing of this model's layers (a PEFT adapter's ``layers.0.attention.qkv`` of
    any other model, which PEFT naming reads in Lumina2's cuts). A :attr:`Split.per_head` rule
    gathers the rows of each part from every head first, at the head size ``head_sizes`` gives for
    the targets (the model's modules holding them): none, or several, is a problem naming the
    shapes."""
    matching = [
        (rule, m) for rule in rules if (m := re.fullmatch(rule.pattern, key)) is not None and _applies(rule, module)
    ]
    fitting = [(rule, m) for rule, m in matching if all(exists(t) for t in _targets(rule, m))]
    for rule, m in (fitting or matching)[:1]:
        whole = _whole_layer(rule, m, exists) if not fitting else None
        if whole is not None:
            problems.append(f"{_where(module)}: {_partial_problem(module, whole, _targets(rule, m))}")
            return []
        shares = [s for _, s in rule.parts] if isinstance(rule, Split) else list(rule.shares)
        shape = _matrix(module)  # (out rows, in); None where not a matrix
        rows = shape[0] if shape is not None else 0
        sizes = shares if isinstance(rule, Split) and rule.exact else _sizes(rows, shares)
        if isinstance(module, WeightModule):
            problem = _share_problem(f"its ΔW has {rows} rows", shares) if sizes is None else None
            problem = problem or _weight_unsplittable(module, shape, sizes or [])
        else:
            problem = _share_problem(f"B has shape {tuple(module.B.shape)}", shares) if sizes is None else None
            problem = problem or _unsplittable(module, sizes or [])
        order = None
        per_head = isinstance(rule, Split) and rule.per_head and all(exists(t) for t in _targets(rule, m))
        if problem is None and sizes is not None and per_head:
            order, problem = _per_head_order(sizes, head_sizes(_targets(rule, m)), shape)
        if (sizes is None or problem is not None) and _foreign(rule, m, exists):
            return [module]  # no part is a module of the model: a key that names no layer, strict=False skips it
        if sizes is None or problem is not None:
            problems.append(f"{_where(module)} -> {', '.join(_targets(rule, m))}: {problem}")
            return []
        targets = [(m.expand(t), n) for (t, _), n in zip(rule.parts, sizes)] if isinstance(rule, Split) else []
        if isinstance(module, LoraModule):
            if isinstance(rule, Split):
                gathered = (
                    module
                    if order is None
                    else _part(module, module.key, module.A, module.B[order], module.alpha, order)
                )
                return split_module(gathered, targets)
            return [reorder_module(module, m.expand(rule.target), sizes, rule.order)]
        if isinstance(rule, Split):
            return list[LoraModule | WeightModule](split_weight(module, targets, order))
        reordered: list[LoraModule | WeightModule] = [
            _weight_part(module, m.expand(rule.target), _reordered(sizes, rule.order))
        ]
        return reordered
    return [module]


def _foreign(rule: Split | Reorder, m: re.Match[str], exists: Callable[[str], bool]) -> bool:
    """Whether none of ``rule``'s targets (nor the fused layer they are rows of) is a module of the model."""
    return not any(exists(t) for t in _targets(rule, m)) and _whole_layer(rule, m, exists) is None


def _whole_layer(rule: Split | Reorder, m: re.Match[str], exists: Callable[[str], bool]) -> str | None:
    """The fused module ``rule``'s parts are the first rows of (:attr:`Split.within`), where the
    model holds it as one layer; else None."""
    if not isinstance(rule, Split) or not rule.within:
        return None
    whole = m.expand(rule.within)
    return whole if exists(whole) else None


def _partial_problem(module: LoraModule | WeightModule, whole: str, parts: list[str]) -> str:
    shape = _matrix(module)
    rows = f"its {shape[0]} output rows" if shape is not None else "its output rows"
    return (
        f"{rows} are the first rows of {shown(whole, 200)} (ComfyUI adds the update to those rows and leaves the "
        "others as they are), which this model holds as one layer with more rows; lorahot places an update on every "
        f"row of a layer, so it cannot load this one. Load it into a model that has {', '.join(parts)} as layers of "
        "their own, or convert the file to the whole layer's rows (zero rows after the first ones)"
    )


def split_weight(
    module: WeightModule, parts: Sequence[tuple[str, int]], order: torch.Tensor | None = None
) -> list[WeightModule]:
    """``module`` (a fused linear weight delta: LoHa, LoKr, a diff) as one module per part, each
    folding its rows of the fused ``ΔW``: exact whatever the kind (a Kronecker or Hadamard
    product has no per-part factors, but its rows are the parts' rows, as fusing the model's
    layers would compute them). A ``diff_b`` and a per-output-row ``dora_scale`` are cut by the
    same rows (weight decomposition normalizes each output row on its own). ``order``: the
    ``ΔW`` row of each row, where the parts' rows are not in place (:attr:`Split.per_head`).

    Raises:
        AdapterMismatchError: the sizes do not add up to ``ΔW``'s rows, or the module is no
            linear delta, or its weight decomposition is per input channel.
    """
    sizes = [size for _, size in parts]
    problem = _weight_unsplittable(module, _matrix(module), sizes)
    if problem is not None:
        raise AdapterMismatchError(f"{_where(module)}: {problem}. {_FIX}")
    rows = torch.arange(sum(sizes)) if order is None else order
    return [_weight_part(module, key, rows[o : o + n]) for (key, n), o in zip(parts, _offsets(sizes))]


def _weight_part(module: WeightModule, key: str, rows: torch.Tensor) -> WeightModule:
    """The part ``key`` of ``module``: ``rows`` of its ``ΔW`` (of the fused module's, for a part),
    and those rows of its ``diff_b`` and ``dora_scale``."""
    shape = _matrix(module)
    whole = module.whole_rows or (shape[0] if shape is not None else 0)
    factors = {k: _rows_of(t, rows) if k in _PER_ROW else t for k, t in module.factors.items()}
    return dataclasses.replace(
        module,
        key=key,
        factors={k: t for k, t in factors.items() if t is not None},
        rows=rows if module.rows is None else module.rows[rows],
        whole_rows=whole,
        source_keys=module.source_keys or (module.key,),
    )


#: the factors of a weight delta that hold one value per output row (cut with ``ΔW``'s rows)
_PER_ROW = ("diff_b", "dora_scale")


def _per_head_order(
    sizes: list[int], heads: set[int], shape: tuple[int, int] | None
) -> tuple[torch.Tensor | None, str | None]:
    """The file's row of each row where B's rows interleave the parts per head of ``heads``' one
    size ``d`` (``[head h: part 0, part 1, ...]``, ``d`` rows each), the parts' rows gathered in
    turn; or why not."""
    rows = shape[0] if shape is not None else sum(sizes)
    if len(heads) != 1:
        found = "states none" if not heads else f"states several ({', '.join(map(str, sorted(heads)))})"
        return None, (
            f"its {rows} rows interleave {len(sizes)} parts of {sizes[0]} rows per attention head, and the model "
            f"{found} for the modules holding the parts (an integer head_dim attribute), so the head size that "
            f"gathers them cannot be read: any that divides {sizes[0]} cuts them another way. Inject a model whose "
            "attention modules state their head_dim, or convert the file to the parts' order"
        )
    (d,) = heads
    if len(set(sizes)) != 1 or sizes[0] % d:
        return None, (
            f"its parts' sizes {sizes} are not whole heads of the model's head size {d}, so its {rows} rows cannot "
            f"interleave them per head"
        )
    k, count = len(sizes), sizes[0] // d
    heads_first = torch.arange(rows).reshape(count, k, d)  # [head, part, row]
    return heads_first.transpose(0, 1).reshape(-1), None


def _reordered(sizes: list[int], order: Sequence[int]) -> torch.Tensor:
    """The rows of blocks of ``sizes`` re-stacked in ``order``: the source row of each row."""
    starts = _offsets(sizes)
    return torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in order])


def _matrix(module: LoraModule | WeightModule) -> tuple[int, int] | None:
    """``(out rows, in)`` of the module's update where it is a matrix (a linear layer's), else
    None; ``in`` is 0 for a diff of a bias alone. A weight delta's is read off its factors'
    shapes (whether they multiply is the plan's check, on the part's rows)."""
    if isinstance(module, LoraModule):
        a, b = module.A, module.B
        return (int(b.shape[0]), int(a.shape[1])) if a.ndim == 2 and b.ndim == 2 else None
    f = module.factors
    dims = {k: tuple(int(d) for d in t.shape) for k, t in f.items()}
    if any(k in f for k in ("hada_t1", "lokr_t2")) or any(len(d) > 2 for d in dims.values() if d):
        return None  # a Tucker core or a kernel: a conv
    if module.rows is not None:
        whole = _whole_matrix(module.kind, dims)
        return None if whole is None else (int(module.rows.shape[0]), whole[1])
    return _whole_matrix(module.kind, dims)


def _whole_matrix(kind: str, d: dict[str, tuple[int, ...]]) -> tuple[int, int] | None:
    """``(out, in)`` of a 2-D weight delta's ``ΔW`` from its factors' shapes ``d``, or None."""

    def two(key: str) -> tuple[int, int] | None:
        shape = d.get(key)
        return (shape[0], shape[1]) if shape is not None and len(shape) == 2 else None

    def half(whole: str, a: str, b: str) -> tuple[int, int] | None:
        got = two(whole)
        if got is not None:
            return got
        left, right = two(a), two(b)
        return None if left is None or right is None else (left[0], right[1])

    if kind == "lokr":
        w1, w2 = half("lokr_w1", "lokr_w1_a", "lokr_w1_b"), half("lokr_w2", "lokr_w2_a", "lokr_w2_b")
        return None if w1 is None or w2 is None else (w1[0] * w2[0], w1[1] * w2[1])
    if kind == "loha":
        return half("", "hada_w1_a", "hada_w1_b")
    if kind == "diff" and "diff" in d:
        return two("diff")
    if "lora_up" in d:  # a diff's LoRA, a Tucker LoCon with a 2-D core
        return half("", "lora_up", "lora_down")
    bias = d.get("diff_b")
    return (bias[0], 0) if bias is not None and len(bias) == 1 else None


def _weight_unsplittable(module: WeightModule, shape: tuple[int, int] | None, sizes: list[int]) -> str | None:
    """Why ``module``'s ``ΔW`` (of ``shape``) cannot be cut into rows of ``sizes``, or None."""
    if module.kind == "locon" or module.reads_base:
        return f"it is {weight_kind(module)}, which cannot be cut by rows"
    if shape is None:
        shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in module.factors.items())
        return f"only linear modules can be split; its {module.kind} factors ({shapes}) make no matrix"
    if any(n <= 0 for n in sizes) or sum(sizes) != shape[0]:
        return f"its ΔW has {shape[0]} output rows, but the parts' sizes {sizes} add up to {sum(sizes)}"
    for k in _PER_ROW:
        t = module.factors.get(k)
        if t is not None and (t.numel() != shape[0] or sum(d != 1 for d in t.shape) > 1):
            return f"its {k} has shape {tuple(t.shape)}, but cutting it with ΔW's rows needs one value per row"
    return None


def _applies(rule: Split | Reorder, module: LoraModule | WeightModule) -> bool:
    """Whether ``module``'s shapes are those ``rule`` is for (:attr:`Reorder.rows_per_input`)."""
    if not isinstance(rule, Reorder) or not rule.rows_per_input:
        return True
    shape = _matrix(module)
    return shape is not None and shape[0] == rule.rows_per_input * shape[1]


def _targets(rule: Split | Reorder, m: re.Match[str]) -> list[str]:
    """The module keys ``rule`` places a matched module on."""
    return [m.expand(t) for t, _ in rule.parts] if isinstance(rule, Split) else [m.expand(rule.target)]


def _sizes(rows: int, shares: list[int]) -> list[int] | None:
    """Each part's rows: ``rows`` in ``sum(shares)`` equal units; None if they do not divide."""
    unit, rest = divmod(rows, sum(shares))
    return None if rest or not unit else [unit * s for s in shares]


def _share_problem(what: str, shares: list[int]) -> str:
    ratio = ":".join(map(str, shares))
    return f"{what}; its rows split in the ratio {ratio}, which needs a positive multiple of {sum(shares)} rows"


def _unsplittable(module: LoraModule, sizes: list[int]) -> str | None:
    """Why ``module`` cannot be cut into rows of ``sizes``, or None."""
    a, b = module.A, module.B
    if a.ndim != 2 or b.ndim != 2:
        return f"only linear modules can be split; got A {tuple(a.shape)}, B {tuple(b.shape)}"
    if a.shape[0] != b.shape[1] or a.shape[0] == 0:
        return f"A {tuple(a.shape)} and B {tuple(b.shape)} disagree on the rank"
    if any(n <= 0 for n in sizes) or sum(sizes) != b.shape[0]:
        return f"B has {b.shape[0]} output rows, but the parts' sizes {sizes} add up to {sum(sizes)}"
    if module.base_weight is not None:
        return "it carries a base-layer weight copy, which cannot be split"
    for which, t in _per_row(module):
        if t.numel() != b.shape[0] or sum(d != 1 for d in t.shape) > 1:
            return (
                f"its {which} has shape {tuple(t.shape)}, but cutting it with B's rows needs one value per row of B "
                f"({b.shape[0]})"
            )
    return None


def _per_row(module: LoraModule) -> list[tuple[str, torch.Tensor]]:
    """What ``module`` holds per output row besides B: its DoRA magnitude and LoRA bias."""
    extras = (("DoRA magnitude", module.magnitude), ("LoRA bias", module.bias))
    return [(which, t) for which, t in extras if t is not None]


def _block_sparse(b: torch.Tensor, sizes: list[int]) -> bool:
    """Whether B ``[sum(sizes), k r']`` is zero outside its ``k`` diagonal blocks (exactly; one
    device read). A meta B (shapes only) counts as dense: each part then keeps the whole rank,
    an upper bound."""
    k, rank = len(sizes), b.shape[1]
    if rank % k or b.device.type == "meta":
        return False
    diagonal = torch.block_diag(*[torch.ones(n, rank // k, dtype=torch.bool, device=b.device) for n in sizes])
    return not bool(b.masked_fill(diagonal, 0).any())


def _offsets(sizes: list[int]) -> list[int]:
    return [sum(sizes[:j]) for j in range(len(sizes))]


def _alpha_for(module: LoraModule, rank: int) -> float:
    """The alpha that gives a part of ``rank`` the scale of ``module``."""
    return module.scale * (math.sqrt(rank) if module.use_rslora else rank)


def _part(
    module: LoraModule, key: str, a: torch.Tensor, b: torch.Tensor, alpha: float, rows: slice | torch.Tensor
) -> LoraModule:
    """The part ``key`` of ``module``: ``a``, ``b``, and the ``rows`` (of the fused B) of its
    magnitude and bias (each of one value per row, checked by :func:`_unsplittable`)."""
    return dataclasses.replace(
        module,
        key=key,
        A=a,
        B=b.contiguous(),
        alpha=alpha,
        magnitude=_rows_of(module.magnitude, rows),
        bias=_rows_of(module.bias, rows),
        source_keys=module.source_keys or (module.key,),
    )


def _rows_of(t: torch.Tensor | None, rows: slice | torch.Tensor) -> torch.Tensor | None:
    """``rows`` of ``t``, one value per row of B in any shape (``[out]``; LyCORIS' ``[out, 1]``),
    in that shape."""
    if t is None:
        return None
    part = t.reshape(-1)[rows]
    return part.reshape([part.shape[0] if d != 1 else 1 for d in t.shape]).contiguous()


#: the largest out_features split= may give a part
_MAX_PART = 1 << 20
#: the most parts split= may cut one module into
_MAX_PARTS = 4096


def _listed(parts: object) -> list[object] | None:
    """A split entry's parts as a list, or None where it is no list or tuple, holds more than
    ``_MAX_PARTS``, or cannot be read (a sequence type of the caller's whose iteration raises)."""
    if not isinstance(parts, (list, tuple)):
        return None
    try:
        listed = list(itertools.islice(iter(parts), _MAX_PARTS + 1))
    except Exception:
        return None
    return listed if len(listed) <= _MAX_PARTS else None


def _split_spec(split: object) -> dict[str, list[tuple[str, int]]]:
    example = "{'qkv': [('to_q', 3072), ('to_k', 3072), ('to_v', 3072)]}"
    if not isinstance(split, Mapping) or not split:
        raise UsageError(f"split must be a non-empty mapping like {example}, got {shown(split)}.")
    spec = {}
    for fused, given in split.items():
        parts = _listed(given)
        ok = isinstance(fused, str) and bool(fused) and parts is not None and len(parts) >= 2
        parsed = [_split_part(p) for p in parts] if parts is not None and ok else []
        if not ok or None in parsed:
            raise UsageError(
                f"split: each entry maps a fused module name to 2 to {_MAX_PARTS} (part name, out_features) pairs with "
                f"1 <= out_features <= {_MAX_PART}, like {example}; got {shown(fused)}: {shown(given)}."
            )
        spec[fused] = [p for p in parsed if p is not None]
        for name in (fused, *(n for n, _ in spec[fused])):
            if (problem := name_problem(name)) is not None:
                raise UsageError(f"split[{shown(fused, 200)}]: the name {shown(name)} {problem}. Pass module names.")
    return spec


def _split_part(p: object) -> tuple[str, int] | None:
    pair = _listed(p)
    if pair is not None and len(pair) == 2:
        name, size = pair
        if isinstance(name, str) and name and type(size) is int and 0 < size <= _MAX_PART:
            return str.__str__(name), size
    return None


def _literal(text: str) -> str:
    """``text`` as a ``re.Match.expand`` template that expands to itself."""
    return text.replace("\\", "\\\\")


def _where(module: LoraModule | WeightModule) -> str:
    return f"{module.key} ({', '.join(module.source_keys or (module.key,))})"


_FIX = "Load an adapter trained for this model (a fused module's output rows must be the parts' output rows)."
