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

A ``dora_scale`` is no factor of ``ΔW``: :mod:`lorahot.runtime.merge` applies it to the folded
weight (:func:`decompose`).

Built on meta tensors they give the shape without any arithmetic (the plan's shape check).
"""

from __future__ import annotations

import dataclasses

import torch

from lorahot.adapter import WeightModule

__all__ = ["build_delta", "delta_shape", "delta_bound", "decompose", "lora_update_max"]

#: factors that are not part of ``ΔW``: a diff's bias, the magnitude of weight decomposition
_NOT_DELTA = ("diff_b", "dora_scale")


def build_delta(module: WeightModule, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``ΔW`` of ``module`` (unscaled), in ``dtype`` on ``device``, reshaped to ``shape``.

    Args:
        shape: the base weight's torch-layout shape ``[out, in, *kernel]``.

    Raises:
        RuntimeError: the factors do not multiply to ``shape`` (the plan checks this first).
    """
    if module.rows is not None:  # a part of a fused module: its rows of the whole ΔW
        whole = build_delta(_whole(module), (module.whole_rows, *shape[1:]), dtype, device)
        return whole[module.rows.to(device)]
    f = {k: t.to(device, dtype) for k, t in module.factors.items() if k not in _NOT_DELTA}
    if module.kind == "diff":
        delta = f.get("diff")
        delta = torch.zeros(shape, dtype=dtype, device=device) if delta is None else delta.reshape(shape)
        return delta if "lora_down" not in f else delta + (_diff_lora_scale(module) * _lora(f)).reshape(shape)
    return _BUILD[module.kind](f, shape).reshape(shape)


def delta_shape(module: WeightModule, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape ``ΔW`` has before any reshape (built on meta tensors), or None if the factors
    do not even multiply; equal numel to ``shape`` means it fits. For a part of a fused module
    (:attr:`~lorahot.adapter.WeightModule.rows`), the whole ``ΔW``'s shape with the part's rows."""
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


def delta_bound(module: WeightModule) -> float:
    """A bound on every entry of the unscaled ``ΔW`` (and of ``diff_b``) from the factors'
    largest values: one reduction per factor, no product built. A product of an ``[a, r]``
    and an ``[r, b]`` matrix is at most ``r * max * max``; a Tucker half ``r1 * r2`` times the
    three maxima; LoHa multiplies its halves entrywise, LoKr's kron multiplies entries."""
    top = {k: float(t.abs().max()) if t.numel() else 0.0 for k, t in module.factors.items() if k != "dora_scale"}
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
    if module.kind == "locon":
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


_BUILD = {"loha": _loha, "lokr": _lokr, "locon-tucker": _locon_tucker, "locon": _locon}


def decompose(weight: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """LyCORIS' weight decomposition at multiplier 1: ``weight * dora_scale / (||weight|| + eps)``
    for ``weight`` in the torch layout ``[out, in, *kernel]``, the norm per output channel
    (``dora_scale`` ``[out, 1, *ones]``) or per input channel (``[1, in, *ones]``; over the output
    channels and the kernel), ``eps`` the machine epsilon of ``dora_scale``'s dtype (LyCORIS
    computes in that dtype; this computes in ``weight``'s). A ``[1, 1, ...]`` scale of a layer
    with one output and one input channel normalizes the whole weight either way."""
    eps = torch.finfo(dora_scale.dtype).eps
    m = dora_scale.to(weight.device, weight.dtype)
    if m.shape[0] == weight.shape[0] and m.shape[1] == 1:  # per output channel
        norm = torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1)
        norm = norm.reshape(weight.shape[0], *(1,) * (weight.ndim - 1))
    else:  # per input channel
        norm = torch.linalg.vector_norm(weight.transpose(0, 1).reshape(weight.shape[1], -1), dim=1)
        norm = norm.reshape(1, weight.shape[1], *(1,) * (weight.ndim - 2))
    out: torch.Tensor = weight * (m / (norm + eps))
    return out
