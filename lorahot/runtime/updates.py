"""A slot's LoRA update stays within its dtype's range at the user's weights.

Unmerged, every layer computes with ``B diag(s) A`` (see :mod:`lorahot.layers.base`): for one
adapter ``w * alpha / r * B @ A``, for a stack the parts' updates summed, each at its weight
(:mod:`lorahot.runtime.stack`); a layer with a LoRA bias adds ``s[0] * lora_bias`` too (its
part's ``w * alpha / r``), or where several parts carry one there their sum
``sum_p w_p * alpha_p / r_p * lora_bias_p`` (:mod:`lorahot.runtime.bias_sums`): the update's
other term. The read of each
adapter refuses one whose update leaves the buffers' dtype at its own scale
(:func:`lorahot.runtime.plan.validate`); a user weight (a ``load``'s ``scale``, every
``set_scale``) can still push it out, and so can the sum of a stack's parts, each of which fits
alone. Every forward would then compute inf.

:class:`UpdateRange` checks both, bound first. Each part's plan carries
:attr:`~lorahot.runtime.plan.LoadPlan.update_bound`, per layer a bound on every entry of its
update at weight 1; ``sum_p |w_p| * bound_p`` bounds the stack's. Per call that is a few Python
floats (each part's largest bound); only where they pass the dtype's largest value does one
NumPy product per arena give the bound of every layer, and only a layer whose bound passes it
gets its summed update computed, in float64 (:func:`lorahot.adapter.deltas.lora_update_max`),
from the parts' factors (a load, before anything is written) or from the slot's rows
(``set_scale``): one host transfer per device for all of them. Merged mode checks its merged
weights instead (:meth:`lorahot.runtime.merge.Merger.check`). The bias term needs no product:
:attr:`~lorahot.runtime.plan.LoadPlan.bias_bound` is its largest entry at weight 1, so
``|w_p| * bias_bound_p`` is what it reaches; where several parts' biases add up on a layer,
``sum_p |w_p| * bias_bound_p`` bounds it, and only a layer whose bound passes the dtype's
largest value gets its sum computed (float64, on the device).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lorahot.adapter import LoraModule
from lorahot.adapter.deltas import lora_update_max
from lorahot.errors import UsageError, format_problems, lines
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.layer_weights import Weight, peak, per_layer, table, weight_in
from lorahot.runtime.plan import dtype_max
from lorahot.runtime.stack import Stack

__all__ = ["UpdateRange"]

#: what the buffers' rounding of A, B and the scales can add to a product over the bound the
#: files' values give, in units of the dtype's epsilon
_ROUNDING = 8.0


class UpdateRange:
    """Refuses weights under which a slot's update would leave its dtype's range (see the
    module docstring). ``names``: per arena, each layer's injected name (for messages)."""

    def __init__(self, buffers: BufferManager, names: list[list[str]]) -> None:
        self.buffers = buffers
        self.names = names
        #: per arena, the largest finite value its products may reach (less the rounding margin)
        self._tops = [dtype_max(a.dtype) / (1.0 + _ROUNDING * torch.finfo(a.dtype).eps) for a in buffers.arenas]
        #: the last stack checked, and per arena its parts' bounds ``[parts, n_layers]`` and
        #: each part's largest, for ``B @ A`` and for the LoRA bias (a re-weighting reads them here)
        self._memo: tuple[weakref.ref[Stack], list[_Bounds]] | None = None

    def _bounds(self, stack: Stack) -> list[_Bounds]:
        memo = self._memo
        if memo is not None and memo[0]() is stack:
            return memo[1]
        out = []
        for a in range(len(self.buffers.arenas)):
            n = len(self.buffers.arenas[a].specs)
            table = _table([plan.update_bound for plan in stack.parts], a, n)
            bias = _table([plan.bias_bound for plan in stack.parts], a, n)
            out.append(_Bounds(table, _largest(table), bias, _largest(bias)))
        self._memo = (weakref.ref(stack), out)
        return out

    def fits(self, stack: Stack, weights: Sequence[Weight]) -> bool:
        """Whether the bound alone keeps every layer's update in range at ``weights`` (a few
        Python floats per arena); False sends the caller to :meth:`check`."""
        return all(
            sum(m * peak(w) for m, w in zip(b.largest, weights)) <= top
            and sum(m * peak(w) for m, w in zip(b.bias_largest, weights)) <= top
            for b, top in zip(self._bounds(stack), self._tops)
        )

    def check(self, stack: Stack, weights: Sequence[Weight], region: int | None = None) -> None:
        """Refuses ``weights`` under which some layer's update ``B diag(s) A`` (the parts'
        updates summed, each at its weight) would leave its buffers' dtype. Computed exactly
        where the bound says it may: from the slot ``region``'s rows (``set_scale``, whose slot
        holds the stack), else from the parts' factors (a load, nothing written yet).

        Raises:
            UsageError: naming each such layer, the value its update reaches, the dtype's
                largest value, and the largest weights that fit. Nothing changed.
        """
        flagged: list[tuple[int, int]] = []
        biases: list[tuple[int, int, float, list[int]]] = []  # (arena, layer, value reached, parts)
        for a, (b, top) in enumerate(zip(self._bounds(stack), self._tops)):
            n = len(self.buffers.arenas[a].specs)
            w = np.abs(table(weights, a, n))  # [parts, n_layers]
            with np.errstate(over="ignore", invalid="ignore"):  # a bound past float64 is inf: flagged below
                bound = (w * b.table).sum(axis=0) if len(b.table) else np.zeros(0)
                bias_bound = (w * b.bias_table).sum(axis=0) if len(b.bias_table) else None
            flagged += [(a, int(i)) for i in np.flatnonzero(~(bound <= top))]  # NaN too
            if bias_bound is not None:
                biases += self._biases(stack, weights, a, bias_bound, b.bias_table)
        if not flagged and not biases:
            return
        with torch.no_grad():  # the B @ A terms the bound flagged, computed (none: nothing to move)
            exact = [self._exact(stack, weights, a, i, region) for a, i in flagged]
            by_device: dict[torch.device, list[int]] = {}
            for k, t in enumerate(exact):
                by_device.setdefault(t.device, []).append(k)
            reached = [0.0] * len(exact)
            for ks in by_device.values():  # one transfer per device
                for k, v in zip(ks, torch.stack([exact[k] for k in ks]).cpu().tolist()):
                    reached[k] = v
        over = [(a, i, v) for (a, i), v in zip(flagged, reached) if not v <= dtype_max(self.buffers.arenas[a].dtype)]
        if over or biases:
            raise UsageError(self._message(stack, weights, over, biases))

    def _biases(
        self, stack: Stack, weights: Sequence[Weight], a: int, bound: np.ndarray, table: np.ndarray
    ) -> list[tuple[int, int, float, list[int]]]:
        """``(arena, layer, value reached, parts)`` of each layer of arena ``a`` whose LoRA bias
        term leaves the LoRA buffers' dtype at ``weights``: ``bound [n_layers]`` is
        ``sum_p |w_p| * bias_bound_p``, exact where one part has a bias on the layer; where
        several do, their sum (:mod:`lorahot.runtime.bias_sums`) is computed."""
        limit = dtype_max(self.buffers.arenas[a].dtype)
        out = []
        for i in np.flatnonzero(~(bound <= limit)):  # NaN too
            parts = [int(p) for p in np.flatnonzero(table[:, i])]
            sums = stack.bias_sums
            reached = float(bound[i])
            if len(parts) > 1 and sums is not None and int(i) in sums.layers[a]:
                reached = sums.largest(a, int(i), [weight_in(w, a, int(i)) for w in weights])
            if not reached <= limit:
                out.append((a, int(i), reached, parts))
        return out

    def _exact(self, stack: Stack, weights: Sequence[Weight], a: int, i: int, region: int | None) -> torch.Tensor:
        """The largest ``|value|`` of layer ``i`` of arena ``a``'s update at ``weights`` (0-d
        float64), from the factors rounded to the buffers' dtype as the forward reads them."""
        arena = self.buffers.arenas[a]
        groups = arena.specs[i].groups
        if region is not None:  # the slot holds the stack: its rows and the new per-row scales
            own, part = stack.owners[a]
            s = torch.from_numpy(own[i] * np.asarray([weight_in(w, a, i) for w in weights], dtype=np.float64)[part[i]])
            rows_a, rows_b = arena.rows(i, region)
            scaled = rows_a.double() * s.to(rows_a.device)[:, None]
            b = rows_b[: arena.rank // groups].t()  # [out, R / groups]
            return lora_update_max([(scaled, b, 1.0)], groups)
        terms = []
        for p, m in stack.terms.get(self.names[a][i], []):
            if isinstance(m, LoraModule):
                c = weight_in(weights[p], a, i) * float(stack.parts[p].scales[a][i])
                terms.append((m.A.to(arena.dtype), m.B.to(m.A.device, arena.dtype), c))
        if not terms:
            return torch.zeros((), dtype=torch.float64)
        return lora_update_max(terms, groups)

    def _message(
        self,
        stack: Stack,
        weights: Sequence[Weight],
        over: list[tuple[int, int, float]],
        biases: Sequence[tuple[int, int, float, list[int]]] = (),
    ) -> str:
        """The refusal: each layer of ``over`` (``B @ A``'s terms, the value reached) and of
        ``biases`` (a LoRA bias or several summed, the value reached, their parts), and the
        weights that fit."""
        single = stack.single
        shown = f"{weights[0]:g}" if single else "[" + ", ".join(f"{w:g}" for w in weights) + "]"
        rows = []
        factor = math.inf  # how much smaller every weight must be for each layer to fit
        for a, i, v, what in [(a, i, v, _summed(stack, self.names[a][i])) for a, i, v in over] + [
            (a, i, v, "its LoRA bias scale * lora_bias" if single else _bias_terms(p)) for a, i, v, p in biases
        ]:
            arena = self.buffers.arenas[a]
            top = dtype_max(arena.dtype)
            name = self.names[a][i]
            dtype = str(arena.dtype).removeprefix("torch.")
            rows.append(f"{name}: {what} reaches |value| {v:.6g} > {dtype} max {top:.6g}")
            factor = min(factor, top / v if math.isfinite(v) and v > 0 else 0.0)
        where = "the slot's update" if single else f"the stack of {len(stack.parts)} adapters' summed update"
        title = f"scale={shown}: {where} would leave the LoRA buffers' dtype in:"
        if single and not per_layer(weights):
            fix = f"Pass a scale of at most {_floor4(peak(weights[0]) * factor):.4g} in magnitude"
        else:
            fix = (
                f"Pass smaller weights (the ones given times at most {_floor4(factor):.4g} fit), or stack fewer "
                "adapters"
            )
        if any(self.buffers.arenas[a].dtype == torch.float16 for a in [*(t[0] for t in over), *(t[0] for t in biases)]):
            fix += ", or inject with dtype=torch.float32 (LoRA buffers of float32's range)"
        return lines(format_problems(title, rows), f"{fix}.")


@dataclass(frozen=True)
class _Bounds:
    """One arena's bounds for a stack: per part and layer ``[parts, n_layers]``, and each
    part's largest, of the update ``B @ A`` (:attr:`~lorahot.runtime.plan.LoadPlan.update_bound`)
    and of the LoRA bias (:attr:`~lorahot.runtime.plan.LoadPlan.bias_bound`), at weight 1."""

    table: np.ndarray
    largest: list[float]
    bias_table: np.ndarray
    bias_largest: list[float]


def _table(bounds: list[list[torch.Tensor]], a: int, n: int) -> np.ndarray:
    """``[parts, n]``: each part's bound per layer of arena ``a`` (0 where it has none)."""
    rows = [b[a].numpy() if len(b) > a else np.zeros(n) for b in bounds]
    return np.stack(rows) if rows else np.zeros((0, n))


def _summed(stack: Stack, name: str) -> str:
    """What reaches the value of a ``B @ A`` refusal on layer ``name``."""
    if stack.single:
        return "its update scale * B @ A"
    parts = [p for p, m in stack.terms.get(name, []) if isinstance(m, LoraModule)]
    return f"the summed update of parts {', '.join(map(str, parts))}"


def _bias_terms(parts: list[int]) -> str:
    """What reaches the value of a LoRA-bias refusal of a stack: one part's bias, or several summed."""
    if len(parts) == 1:
        return f"the LoRA bias of part {parts[0]}"
    return f"the summed LoRA biases of parts {', '.join(map(str, parts))}"


def _largest(table: np.ndarray) -> list[float]:
    """Each part's largest bound (a row of ``table``)."""
    return [float(r.max(initial=0.0)) for r in table]


def _floor4(x: float) -> float:
    """``x`` rounded down to four significant digits (so the number shown still fits)."""
    if not math.isfinite(x) or x <= 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(x)) - 3)
    return math.floor(x / scale) * scale
