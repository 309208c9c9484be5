"""``ΔW`` of the adapter kinds that are not ``B @ A``: LoHa, LoKr, Tucker LoCon and full diffs.

Each builder takes a :class:`~lorahot.adapter.WeightModule`'s factors and returns ``ΔW`` in
the torch layout ``[out, in, *kernel]`` without its scale (see
:attr:`~lorahot.adapter.WeightModule.scale`), following LyCORIS' own formulas
(``lycoris.functional.loha``/``lokr``/``general``) as ComfyUI applies them:

- LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)``; with Tucker cores ``t1``/``t2`` each half is
  ``einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a)``.
- LoKr: ``kron(w1, w2)``, each half whole or ``w_a @ w_b``; a Tucker ``w2`` is
  ``einsum("i j ..., i p, j r -> p r ...", t2, w2_a, w2_b)``; a 2-D ``w1`` against a conv
  ``w2`` gets trailing unit dims.
- Tucker LoCon: ``einsum("m n ..., i m, n j -> i j ...", lora_mid, lora_up, lora_down)``.
- LoCon (a LoRA/LoCon folded for its weight decomposition over the input channels):
  ``lora_up @ lora_down``.
- diff: ``diff`` itself (and ``diff_b`` for the bias); where the module also has a LoRA
  (``lora_down``/``lora_up``, as Wan's lightx2v files and ComfyUI's patches put both on one
  layer), ``diff + alpha / r * lora_up @ lora_down``: the diff unscaled, the LoRA at its own
  ``alpha / r`` (alpha = r without one), as ComfyUI applies the two.

- OFT, BOFT and kohya's OFT (:data:`~lorahot.adapter.ROTATION_KINDS`): ``rescale * R W0 - W0``,
  built from the pristine base weight ``W0`` (``base``), ``R`` orthogonal on the output
  channels, each ``b x b`` block the Cayley transform ``(I + Q)(I - Q)^-1`` of the skew part
  ``Q = B - B^T`` of its ``oft_blocks`` entry ``B``. Diagonal OFT (LyCORIS' and sd-scripts')
  applies block ``k``'s transpose to rows ``[k b, (k + 1) b)``; BOFT applies ``m`` stages, stage
  ``i`` permuting the rows so that each block mixes rows ``2^i b / 2`` apart, as LyCORIS'
  ``functional.boft`` does. The ``.alpha`` bounds ``||Q||`` (over every block at once) to
  ``alpha * out``: LyCORIS scales ``Q`` by ``c / (||Q|| + 1e-8)`` where ``||Q|| + 1e-8 > c > 0``,
  sd-scripts always by ``(min(||Q||, c) + 1e-8) / (||Q|| + 1e-8)`` (so an alpha of 0 leaves
  ``R`` the identity up to 1e-8). ``rescale`` ``[out, 1, *ones]`` scales each output row.
- (IA)^3 (LyCORIS): ``W0 * w``, ``w`` one factor per output row (``on_input`` 0: ``[out]``, a
  conv's ``[1, out, *ones]``) or per input column (``on_input`` 1: ``[in]``, ``[1, in, *ones]``):
  LyCORIS' merged weight ``W0 * (1 + s w)``.
- GLoRA (LyCORIS): ``W0 a1 a2 + b1 b2``, ``a1 a2`` ``[in, in]`` acting on the input channels of
  every kernel position (``einsum("o i ..., i j -> o j ...")``), ``b1 b2`` a LoRA/LoCon
  ``[out, in, *kernel]``; scaled by ``alpha / r`` (``r`` = ``a2``'s rows).

- LoRA (a plain LoRA part that ``fuse=`` joins with weight-delta parts): ``lora_up @ lora_down``.
- fused (``fuse=``): the parts' ``ΔW`` stacked by rows, each at its own scale and, for a kind
  built from the base weight, built from its own rows of ``W0``.

A ``dora_scale`` is no factor of ``ΔW``: :func:`fold_delta` applies it to the folded weight
(:func:`decompose`), a fused module's part by part on its own rows.

Built on meta tensors they give the shape without any arithmetic (the plan's shape check).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from lorahot.adapter import WeightModule

__all__ = [
    "build_delta",
    "fold_delta",
    "delta_shape",
    "delta_bound",
    "decompose",
    "norm_eps",
    "lora_update_max",
    "base_problem",
    "base_rows",
    "rotation_problem",
]

#: factors that are not part of ``ΔW``: a diff's bias, the magnitude of weight decomposition
_NOT_DELTA = ("diff_b", "dora_scale")


def build_delta(
    module: WeightModule,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ΔW`` of ``module`` (unscaled), in ``dtype`` on ``device``, reshaped to ``shape``.

    Args:
        shape: the base weight's torch-layout shape ``[out, in, *kernel]``.
        base: the pristine base weight in that layout, which the kinds of
            :data:`~lorahot.adapter.BASE_KINDS` build ``ΔW`` from (required for those, unused
            otherwise).

    Raises:
        RuntimeError: the factors do not multiply to ``shape`` (the plan checks this first).
    """
    if module.kind == "fused":  # each part's rows, at the part's own scale, from its rows of W0
        whole = None if base is None else base.reshape(shape)
        built = [
            p.scale * build_delta(p, (q.out, *shape[1:]), dtype, device, _rows(whole, rows))
            for (p, rows), q in zip(module.part_rows(), module.parts)
        ]
        return torch.cat(built)
    if module.reads_base:
        if base is None or module.rows is not None:  # the plan refuses these on a fused part
            raise RuntimeError(f"{module.key}: {module.named} delta is built from its whole layer's base weight")
        return _from_base(module, base.to(device, dtype).reshape(shape), device)
    if module.rows is not None:  # a part of a fused module: its rows of the whole ΔW
        whole = build_delta(_whole(module), (module.whole_rows, *shape[1:]), dtype, device)
        return whole[module.rows.to(device)]
    f = {k: t.to(device, dtype) for k, t in module.factors.items() if k not in _NOT_DELTA}
    if module.kind == "diff":
        delta = f.get("diff")
        delta = torch.zeros(shape, dtype=dtype, device=device) if delta is None else delta.reshape(shape)
        return delta if "lora_down" not in f else delta + (_diff_lora_scale(module) * _lora(f)).reshape(shape)
    return _BUILD[module.kind](f, shape).reshape(shape)


def fold_delta(module: WeightModule, weight: torch.Tensor, s: float, base: torch.Tensor | None = None) -> torch.Tensor:
    """``weight + s * ΔW`` after ``module``'s weight decomposition (a ``dora_scale``, see
    :func:`decompose`), for ``weight`` in the torch layout ``[out, in, *kernel]``, computed in
    its dtype on its device. A ``"fused"`` module folds each part into its own rows, as the part
    would fold into a layer of its own: its ``ΔW`` at ``s`` times its scale, built from its rows
    of ``base`` (the pristine base weight in that layout, for the kinds of
    :data:`~lorahot.adapter.BASE_KINDS`), then normalized by its own ``dora_scale``.
    """
    if module.kind == "fused" and module.decomposes:
        return torch.cat(
            [fold_delta(p, weight[rows], s * p.scale, _rows(base, rows)) for p, rows in module.part_rows()]
        )
    delta = build_delta(module, tuple(weight.shape), weight.dtype, weight.device, base)
    folded = weight + s * delta
    return folded if "dora_scale" not in module.factors else decompose(folded, module.factors["dora_scale"])


def _rows(base: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """``base``'s ``rows`` (None without a base)."""
    return None if base is None else base[rows]


def delta_shape(module: WeightModule, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape ``ΔW`` has before any reshape (built on meta tensors), or None if the factors
    do not even multiply; equal numel to ``shape`` means it fits. For a part of a fused module
    (:attr:`~lorahot.adapter.WeightModule.rows`), the whole ``ΔW``'s shape with the part's rows."""
    if module.kind == "fused":  # every part's ΔW its rows of shape, as the plan checks each
        fits = all(
            (got := delta_shape(p, (q.out, *shape[1:]))) is not None and math.prod(got) == q.out * math.prod(shape[1:])
            for p, q in zip(module.part_modules(), module.parts)
        )
        return (sum(q.out for q in module.parts), *shape[1:]) if fits else None
    if module.reads_base:  # base_problem says what does not fit
        return shape if base_problem(module, shape) is None else None
    if module.rows is not None:
        got = delta_shape(_whole(module), (module.whole_rows, *shape[1:]))
        if got is None or len(got) < 2 or got[0] != module.whole_rows:
            return None
        return (int(module.rows.shape[0]), *got[1:])
    try:
        meta = WeightModule(module.key, module.kind, {k: t.to("meta") for k, t in module.factors.items()})
        f = {k: t.float() for k, t in meta.factors.items() if k not in _NOT_DELTA}
        if module.kind == "diff":
            lora = _lora(f) if "lora_down" in f else None
            if "diff" not in f:
                return shape if lora is None else tuple(lora.shape)
            if lora is not None and (lora.numel() != f["diff"].numel() or lora.shape[0] != f["diff"].shape[0]):
                return None  # the two are deltas of different weights
            return tuple(f["diff"].shape)
        return tuple(_BUILD[module.kind](f, shape).shape)
    except (RuntimeError, ValueError, IndexError):
        return None


def base_rows(module: WeightModule) -> int | None:
    """The output rows of a base kind's ``ΔW`` (:data:`~lorahot.adapter.BASE_KINDS`) as its
    factors name them, or None where they do not: an input-side (IA)^3 (one factor per input
    column, on any number of rows), factors too malformed to say (:func:`base_problem` names
    what)."""
    f = module.factors
    if module.rotates:
        return _rotated_rows(module) or None
    if module.kind == "glora":
        return int(f["b1"].shape[0]) if f["b1"].ndim else None
    flag, w = f["on_input"], f["weight"]
    if flag.numel() != 1 or flag.is_meta or flag.dtype.is_complex or float(flag.reshape(-1)[0]) != 0.0:
        return None
    return int(w.numel())  # [out], a conv's [1, out, *ones]


def delta_bound(module: WeightModule, base_max: float = math.inf) -> float:
    """A bound on every entry of the unscaled ``ΔW`` (and of ``diff_b``) from the factors'
    largest values: one reduction per factor, no product built. A product of an ``[a, r]``
    and an ``[r, b]`` matrix is at most ``r * max * max``; a Tucker half ``r1 * r2`` times the
    three maxima; LoHa multiplies its halves entrywise, LoKr's kron multiplies entries. A
    rotation kind's ``rescale * R W0 - W0`` takes ``base_max``, the largest ``|W0|``: an entry
    of ``R W0`` is a dot product of a row of the orthogonal ``R`` (norm 1) with at most
    ``out`` entries of a column of ``W0``, so at most ``sqrt(out) * base_max``; (IA)^3's
    ``W0 * w`` at most ``max|w| * base_max``; GLoRA's ``W0 a1 a2`` at most
    ``in * r * base_max * max|a1| * max|a2|``, plus its ``b1 b2``."""
    if module.kind == "fused":
        bias = module.factors.get("diff_b")
        parts = [abs(p.scale) * delta_bound(p, base_max) for p in module.part_modules()]
        return max([*parts, float(bias.abs().max()) if bias is not None and bias.numel() else 0.0])
    top = {
        k: float(t.abs().max()) if t.numel() else 0.0
        for k, t in module.factors.items()
        if k not in ("dora_scale", "on_input")
    }
    if module.rotates:
        out = int(module.factors["rescale"].shape[0]) if "rescale" in module.factors else _rotated_rows(module)
        return (top.get("rescale", 1.0) * math.sqrt(out) + 1.0) * base_max
    if module.kind == "ia3":
        return top["weight"] * base_max
    if module.kind == "glora":
        a1, a2 = module.factors["a1"], module.factors["a2"]
        fan_in, r = int(a1.shape[0]), int(a2.shape[0])
        return fan_in * r * base_max * top["a1"] * top["a2"] + r * top["b1"] * top["b2"]
    rank = {k: int(t.shape[0]) if t.ndim else 1 for k, t in module.factors.items()}
    f = module.factors

    def low(a: str, b: str, t: str | None = None) -> float:
        if t is not None and t in f:
            return rank[t] * int(f[t].shape[1]) * top[t] * top[a] * top[b]
        return rank[b] * top[a] * top[b]

    if module.kind == "loha":
        return low("hada_w1_a", "hada_w1_b", "hada_t1") * low("hada_w2_a", "hada_w2_b", "hada_t2")
    if module.kind == "lokr":
        w1 = top["lokr_w1"] if "lokr_w1" in f else low("lokr_w1_a", "lokr_w1_b")
        w2 = top["lokr_w2"] if "lokr_w2" in f else low("lokr_w2_a", "lokr_w2_b", "lokr_t2")
        return w1 * w2
    if module.kind in ("locon", "lora"):
        return low("lora_up", "lora_down")
    if module.kind == "locon-tucker":
        return rank["lora_mid"] * int(f["lora_mid"].shape[1]) * top["lora_mid"] * top["lora_up"] * top["lora_down"]
    lora = abs(_diff_lora_scale(module)) * low("lora_up", "lora_down") if "lora_down" in f else 0.0
    return max(top.get("diff", 0.0) + lora, top.get("diff_b", 0.0))


def _whole(module: WeightModule) -> WeightModule:
    """The fused module ``module`` is a part of: its factors, every row."""
    return dataclasses.replace(module, rows=None, whole_rows=0)


def _diff_lora_scale(module: WeightModule) -> float:
    """``alpha / r`` of a diff module's LoRA (1 without an alpha)."""
    r = int(module.factors["lora_down"].shape[0])
    return 1.0 if module.alpha is None or r == 0 else module.alpha / r


def _lora(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """``lora_up @ lora_down`` as ``[out, in * prod(kernel)]``."""
    up, down = f["lora_up"], f["lora_down"]
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


#: elements of one float64 block of an update :func:`lora_update_max` builds at a time (128 MiB)
UPDATE_BLOCK = 1 << 24


def lora_update_max(terms: list[tuple[torch.Tensor, torch.Tensor, float]], groups: int = 1) -> torch.Tensor:
    """The largest ``|value|`` of a LoRA update ``sum_k c_k * B_k @ A_k``, computed in float64
    on the factors' device (0-d; inf or NaN where float64 overflows): ``terms`` are
    ``(A [r_k, in_dim], B [out, r_k / groups], c_k)``. For a grouped conv, output group ``j``
    takes rows ``[j * r_k / groups, (j + 1) * r_k / groups)`` of each A (see
    :mod:`lorahot.layers.conv`). Built a block of output rows at a time, at most
    :data:`UPDATE_BLOCK` elements each: a vocabulary-wide embedding's update never exists
    whole. Only called where a cheap bound says the update may leave a dtype's range."""
    a0, b0 = terms[0][0], terms[0][1]
    out, in_dim = b0.shape[0], a0.reshape(a0.shape[0], -1).shape[1]
    best = torch.zeros((), dtype=torch.float64, device=a0.device)
    if not out or not in_dim:
        return best
    per = out // groups
    step = max(1, UPDATE_BLOCK // in_dim)
    with torch.no_grad():
        factors = [(a.reshape(a.shape[0], -1).double(), b.reshape(out, -1).double(), c) for a, b, c in terms]
        for j in range(groups):
            for start in range(j * per, (j + 1) * per, step):
                stop = min(start + step, (j + 1) * per)
                block: torch.Tensor | None = None
                for a, b, c in factors:
                    rows = a.shape[0] // groups
                    part = (b[start:stop] * c) @ a[j * rows : (j + 1) * rows]
                    block = part if block is None else block + part
                assert block is not None  # terms is not empty
                best = torch.maximum(best, block.abs().max())  # NaN propagates
    return best


def _tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """``[out, in, *k]`` from a core ``t [r1, r2, *k]``, ``w_a [r1, out]``, ``w_b [r2, in]``:
    LyCORIS' ``einsum("i j ..., i p, j r -> p r ...", t, w_a, w_b)``, as two tensordots (meta
    tensors run them too)."""
    tmp: torch.Tensor = torch.tensordot(w_a, t, dims=([0], [0]))  # [out, r2, *k]
    out: torch.Tensor = torch.tensordot(tmp, w_b, dims=([1], [0]))  # [out, *k, in]
    return out.movedim(-1, 1).contiguous()  # [out, in, *k]


def _loha(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if "hada_t1" in f:
        return _tucker(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"]) * _tucker(
            f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"]
        )
    b1, b2 = f["hada_w1_b"], f["hada_w2_b"]
    w1 = f["hada_w1_a"] @ b1.reshape(b1.shape[0], -1)  # [out, in * prod(k)]
    w2 = f["hada_w2_a"] @ b2.reshape(b2.shape[0], -1)
    delta = w1 * w2
    # factors that carry their kernel dimensions ([r, in, *k]) keep them, for the shape check
    return delta.reshape(delta.shape[0], *b1.shape[1:]) if b1.ndim > 2 else delta


def _lokr(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]  # [o1, i1]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = _tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        b = f["lokr_w2_b"]
        w2 = (f["lokr_w2_a"] @ b.reshape(b.shape[0], -1)).reshape(f["lokr_w2_a"].shape[0], *b.shape[1:])
        if len(shape) > 2 and w2.ndim == 2:  # a conv's w2 saved flat: [o2, i2 * prod(k)]
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    while w1.ndim < w2.ndim:
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2)


def _locon_tucker(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    up = f["lora_up"].reshape(f["lora_up"].shape[0], -1)  # [out, r]
    down = f["lora_down"].reshape(f["lora_down"].shape[0], -1)  # [r, in]
    return _tucker(f["lora_mid"], up.t(), down)


def _locon(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    return _lora(f).reshape(f["lora_up"].shape[0], *f["lora_down"].shape[1:])


_BUILD = {"loha": _loha, "lokr": _lokr, "locon-tucker": _locon_tucker, "locon": _locon, "lora": _locon}


def _rotated_rows(module: WeightModule) -> int:
    """The output rows a rotation kind's blocks cover: ``n * b`` of ``[(m,) n, b, b]``."""
    blocks = module.factors["oft_blocks"]
    return int(blocks.shape[-3]) * int(blocks.shape[-1]) if blocks.ndim >= 3 else 0


def base_problem(module: WeightModule, shape: tuple[int, ...]) -> str | None:
    """Why the factors of a kind built from the base weight (:data:`~lorahot.adapter.BASE_KINDS`)
    do not fit a weight of torch-layout ``shape``, or None. A rotation's ``oft_blocks`` must be
    square blocks, ``[n, b, b]`` (``[m, n, b, b]`` for BOFT, ``b`` even and ``n`` a multiple of
    ``2^(m-1)``: stage ``i`` pairs rows ``2^i b / 2`` apart) with ``n * b`` the layer's output
    rows; a ``rescale`` one value per output row, ``[out, 1, *ones]``. (IA)^3 and GLoRA: see
    :func:`_ia3_problem` and :func:`_glora_problem`. Factors whose layout fits are then built on
    meta tensors (no arithmetic), so that what the plan accepts the write can build."""
    problem = _layout_problem(module, shape)
    return problem if problem is not None else _build_problem(module, shape)


def _build_problem(module: WeightModule, shape: tuple[int, ...]) -> str | None:
    """Why ``ΔW`` of a base kind cannot be built for a weight of ``shape`` (on meta tensors), or
    None. A shapes-only read's (IA)^3 flag is taken from its factor's shape."""
    factors = {k: t if k == "on_input" else t.to("meta") for k, t in module.factors.items()}
    flag = factors.get("on_input")
    if flag is not None and flag.is_meta:
        factors["on_input"] = torch.tensor(float(tuple(module.factors["weight"].shape) != _ia3_shape(shape, False)))
    meta = torch.device("meta")
    try:
        _from_base(dataclasses.replace(module, factors=factors), torch.empty(shape, device=meta), meta)
    except (RuntimeError, ValueError, IndexError) as e:
        return f"its factors do not build a weight of shape {shape}: {e}"
    return None


def _layout_problem(module: WeightModule, shape: tuple[int, ...]) -> str | None:
    """Why a base kind's factors are not laid out for a weight of ``shape`` (see
    :func:`base_problem`), or None."""
    if module.kind == "ia3":
        return _ia3_problem(module, shape)
    if module.kind == "glora":
        return _glora_problem(module, shape)
    blocks, out = module.factors["oft_blocks"], shape[0]
    dims = tuple(int(d) for d in blocks.shape)
    want = 4 if module.kind == "boft" else 3
    if len(dims) != want or dims[-1] != dims[-2]:
        form = "[stages, blocks, size, size]" if want == 4 else "[blocks, size, size]"
        return f"oft_blocks has shape {dims}, where {module.kind} holds square blocks, {form}"
    n, b = dims[-3], dims[-1]
    if n * b != out or b == 0:
        return (
            f"oft_blocks has shape {dims}: {n} blocks of {b} rows rotate {n * b} output rows, but the layer has {out} "
            f"(the block count must divide {out} and the blocks cover every row)"
        )
    if module.kind == "boft":
        m = dims[0]
        if b % 2 or m == 0 or n % (1 << (m - 1)):
            return (
                f"oft_blocks has shape {dims}: a butterfly of {m} stages needs an even block size and a block count "
                f"that is a multiple of 2^(stages - 1) = {1 << max(m - 1, 0)}"
            )
    rescale = module.factors.get("rescale")
    per_row = (out, *(1,) * (len(shape) - 1))
    if rescale is not None and tuple(rescale.shape) != per_row:
        return f"rescale has shape {tuple(rescale.shape)}, expected {per_row} (one factor per output row)"
    return None


def _cayley(blocks: torch.Tensor, module: WeightModule, out: int) -> torch.Tensor:
    """Each block's rotation ``(I + Q)(I - Q)^-1`` (``[..., b, b]``, float64) from
    ``Q = B - B^T`` under the module's norm constraint (see the module docstring); ``I - Q`` is
    invertible for every real skew-symmetric ``Q``. Computed in float64 whatever the model's
    dtype, from ``Q / g`` (``g = max|Q|``, entries in ``[-1, 1]``): ``Q`` scaled to the bound
    ``c`` is ``(Q / g) c / (||Q / g|| + 1e-8 / g)``, which stays finite where ``||Q||`` or ``Q``
    itself would not (in float32, blocks past about 1e19 made ``||Q||`` inf and the constraint
    scaled ``Q`` to 0; past 1.7e38 ``Q`` was inf and the weight NaN). Only an unconstrained ``Q``
    past float64's range gives no finite rotation (:func:`rotation_problem` refuses it)."""
    b = blocks.double()
    half = b / 2 - b.transpose(-1, -2) / 2  # Q / 2: finite for every finite B
    top = half.abs().amax()
    unit = half / torch.where(top > 0, top, 1.0)  # Q / g
    g = 2 * top  # inf where Q itself leaves float64's range
    n = torch.linalg.vector_norm(unit)  # ||Q|| / g
    limit = (module.alpha or 0.0) * out
    if module.kind == "kohya-oft":
        q = unit * ((torch.clamp(g * n, max=limit) + 1e-8) / (n + 1e-8 / g))
    elif limit > 0:
        q = torch.where(g * n + 1e-8 > limit, unit * (limit / (n + 1e-8 / g)), unit * g)
    else:
        q = unit * g
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    r: torch.Tensor = torch.linalg.solve(eye - q, eye + q)  # (I - Q)^-1 (I + Q), which equals (I + Q)(I - Q)^-1
    return r


def rotation_problem(module: WeightModule) -> str | None:
    """Why a rotation kind's ``oft_blocks`` make no finite rotation (computed as the merge does),
    or None; blocks that are not square matrices are :func:`base_problem`'s."""
    blocks = module.factors["oft_blocks"]
    if not module.rotates or blocks.ndim < 3 or blocks.shape[-1] != blocks.shape[-2] or not blocks.numel():
        return None
    if bool(torch.isfinite(_cayley(blocks, module, _rotated_rows(module))).all()):
        return None
    top = float(blocks.abs().max())
    return (
        f"oft_blocks holds values up to {top:g}, whose skew part B - B^T leaves float64's range without a norm "
        "constraint to scale it: no finite rotation"
    )


def _ia3_problem(module: WeightModule, shape: tuple[int, ...]) -> str | None:
    """Why an (IA)^3 module does not fit ``shape``: ``on_input`` one number, 0 or 1; the factor
    one per output row (``on_input`` 0) or input column (1), ``[dim]`` for a linear and
    ``[1, dim, *ones]`` for a conv as LyCORIS saves it."""
    on_input, w = module.factors["on_input"], module.factors["weight"]
    if on_input.numel() != 1:
        return f"on_input has shape {tuple(on_input.shape)}; it must be one number, 0 or 1"
    if on_input.dtype.is_complex:
        return f"on_input is {on_input.dtype}; it must be one real number, 0 or 1"
    flags = (0.0, 1.0) if on_input.is_meta else (float(on_input.reshape(-1)[0]),)  # a shapes-only read
    if flags[0] not in (0.0, 1.0):
        return f"on_input is {flags[0]:g}; it must be 0 or 1"
    wants = [_ia3_shape(shape, bool(flag)) for flag in flags]
    if tuple(w.shape) not in wants:
        what = " or ".join(
            f"{want} (one factor per {'input' if f else 'output'} channel)" for f, want in zip(flags, wants)
        )
        return f"weight has shape {tuple(w.shape)}, expected {what}"
    return None


def _ia3_shape(shape: tuple[int, ...], on_input: bool) -> tuple[int, ...]:
    """The shape LyCORIS saves an (IA)^3 factor in for a weight of ``shape``."""
    dim = shape[1] if on_input else shape[0]
    return (dim,) if len(shape) == 2 else (1, dim, *(1,) * (len(shape) - 2))


def _glora_problem(module: WeightModule, shape: tuple[int, ...]) -> str | None:
    """Why a GLoRA module does not fit ``shape`` ``[out, in, *kernel]``: LyCORIS' layout,
    ``a1`` ``[in, r]``, ``a2`` ``[r, in]``, ``b1`` ``[out, r]`` (a conv's with ``*ones``) and
    ``b2`` ``[r, in]`` (a conv's ``[r, in, *kernel]``). Where ``r``, ``in`` and ``out`` are one
    number, ComfyUI reads the file as the older layout (``b2 b1 + W0 a2 a1``), so the two
    references disagree: refused."""
    f = {k: tuple(int(d) for d in module.factors[k].shape) for k in ("a1", "a2", "b1", "b2")}
    out, fan_in, ones = shape[0], shape[1], (1,) * (len(shape) - 2)
    r = f["a2"][0] if f["a2"] else 0
    want = {"a1": (fan_in, r, *ones), "a2": (r, fan_in, *ones), "b1": (out, r, *ones), "b2": (r, fan_in, *shape[2:])}
    bad = [f"{k} {f[k]} (expected {want[k]})" for k in want if f[k] != want[k]]
    if not bad and r == 0:
        return "a2 has no rows: its rank is 0, where a GLoRA's is at least 1 (LyCORIS scales it by alpha / rank)"
    if bad:
        return (
            f"its factors are not LyCORIS' GLoRA layout for a [{out}, {fan_in}] weight: {', '.join(bad)}; an older "
            "GLoRA layout (b2 b1 + W0 a2 a1) is not read"
        )
    if r == fan_in == out:
        return (
            f"its rank {r} equals the layer's input and output size, where ComfyUI reads the factors as the older "
            "GLoRA layout (b2 b1 + W0 a2 a1) and LyCORIS as W0 a1 a2 + b1 b2: the references disagree on its weight; "
            "merge it into the model with the tool it was trained for and load the merged model"
        )
    return None


def _from_base(module: WeightModule, w0: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``ΔW`` of a kind built from the base weight ``w0`` ``[out, in, *kernel]`` (unscaled)."""
    f = {k: t.to(device, w0.dtype) for k, t in module.factors.items() if k != "on_input"}
    if module.kind == "ia3":
        on_input = bool(float(module.factors["on_input"].reshape(-1)[0]))
        out, fan_in = int(w0.shape[0]), int(w0.shape[1])
        view = (1, fan_in) if on_input else (out, 1)
        return w0 * f["weight"].reshape(*view, *(1,) * (w0.ndim - 2))
    if module.kind == "glora":
        out, fan_in, r = int(w0.shape[0]), int(w0.shape[1]), int(f["a2"].shape[0])
        a = f["a1"].reshape(fan_in, r) @ f["a2"].reshape(r, fan_in)  # [in, in]
        mixed: torch.Tensor = torch.tensordot(w0, a, dims=([1], [0])).movedim(-1, 1)  # [out, in, *kernel]
        b = f["b1"].reshape(out, r) @ f["b2"].reshape(r, -1)  # [out, in * prod(kernel)]
        return mixed + b.reshape(w0.shape)
    return _rotated(module, w0, w0.dtype, device) - w0


def _rotated(module: WeightModule, w0: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``rescale * R W0`` for ``w0`` ``[out, in, *kernel]``."""
    out = int(w0.shape[0])
    r = _cayley(module.factors["oft_blocks"].to(device), module, out).to(dtype)  # [(m,) n, b, b]
    flat = w0.reshape(out, -1)  # [out, in * prod(kernel)]
    if module.kind == "boft":
        for i, stage in enumerate(r):  # stage: [n, b, b]
            flat = _butterfly_stage(flat, stage, (1 << i) * (stage.shape[-1] // 2))
    else:  # block k's transpose on rows [k b, (k + 1) b), as LyCORIS and sd-scripts apply it
        n, b = int(r.shape[0]), int(r.shape[-1])
        flat = torch.einsum("knm,knc->kmc", r, flat.reshape(n, b, -1)).reshape(out, -1)
    rotated = flat.reshape(w0.shape)
    rescale = module.factors.get("rescale")
    return rotated if rescale is None else rescale.to(device, dtype) * rotated


def _butterfly_stage(flat: torch.Tensor, r: torch.Tensor, k: int) -> torch.Tensor:
    """One BOFT stage on ``flat`` ``[out, c]``: rows grouped as ``[groups, 2, k]`` and read as
    ``[groups, k, 2]`` (each pair ``k`` rows apart side by side), cut into ``n`` blocks of ``b``
    rows that ``r`` ``[n, b, b]`` multiplies, then put back in place."""
    out, c = flat.shape
    n, b = int(r.shape[0]), int(r.shape[-1])
    paired = flat.reshape(-1, 2, k, c).transpose(1, 2).reshape(n, b, c)
    mixed = torch.bmm(r, paired)  # [n, b, c]
    return mixed.reshape(-1, k, 2, c).transpose(1, 2).reshape(out, c)


def decompose(weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """LyCORIS' weight decomposition at multiplier 1: ``weight * dora_scale / (||weight|| + eps)``
    for ``weight`` in the torch layout ``[out, in, *kernel]``, the norm per output channel
    (``dora_scale`` ``[out, 1, *ones]``) or per input channel (``[1, in, *ones]``; over the output
    channels and the kernel), ``eps`` the machine epsilon of ``weight``'s dtype, the one it is
    computed in (see :func:`norm_eps`). A ``[1, 1, ...]`` scale of a layer with one output and
    one input channel normalizes the whole weight either way."""
    eps = norm_eps(weight.dtype)
    m = dora_scale.to(weight.device, weight.dtype)
    if m.shape[0] == weight.shape[0] and m.shape[1] == 1:  # per output channel
        norm = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1)
        norm = norm.reshape(weight.shape[0], *(1,) * (weight.ndim - 1))
    else:  # per input channel
        norm = torch.linalg.vector_norm(weight.transpose(0, 1).reshape(weight.shape[1], -1), dim=1)
        norm = norm.reshape(1, weight.shape[1], *(1,) * (weight.ndim - 2))
    out: torch.Tensor = weight * (m / (norm + eps))
    return out


def norm_eps(dtype: torch.dtype) -> float:
    """The ``eps`` LyCORIS' weight decomposition adds to each norm, for a norm computed in
    ``dtype`` (float32, or float64 for float64 weights): ``finfo(dtype).eps``. LyCORIS adds the
    machine epsilon of the dtype it computes in, its module's ``dora_scale``'s, which its loader
    keeps in float32 whatever the file's dtype (a float64 module: float64); ComfyUI adds that of
    its float32 working copy of the weight. Neither reads the file's dtype: a ``dora_scale`` saved
    in bfloat16 still gets 1.2e-7, not bfloat16's 7.8e-3."""
    return torch.finfo(dtype).eps
