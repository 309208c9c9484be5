"""Probe: layers that share an input as one GEMM, in default mode (no CUDA graphs) and under CUDA graphs.

Default mode is launch-bound on the H200 hosts: the compiled wrapper costs about 20 us per
launch whatever it launches, and lorahot's wide GEMMs add about one launch per LoRA layer
(489 launches per decode call against the base model's 335: 1.46x from the counts alone,
``runs/20261202T032445-default-mode-probe.log``). No single-layer form adds less (twenty-first
session). What is left is fewer launches per *group* of layers that read one input: q/k/v, and
gate/up. This probe measures that before the library is changed, with the forward suite's
model (TinyLlama-shaped, bf16, 154 rank-64 layers, one PEFT adapter) and these forms, each an
opaque operator of its own (``lorahot_probe::wide``) whose body is eager torch:

- ``base``, ``lorahot``: as the forward suite builds them;
- ``op_each``: every LoRA layer one operator, ``[y | h] = x @ [W; A].T`` then ``y += h @ B_s.T``
  in place (two GEMMs, the layer's eager formula): what the operator form costs without groups;
- ``group_rows``: q/k/v (and gate/up) as one operator over the layers' wide buffers stacked by
  rows, ``[W_q; A_q; W_k; A_k; W_v; A_v]``: one GEMM, then one in-place expand per layer (four
  GEMMs for q/k/v, three for gate/up). Each layer's own rows stay ``[W; A]``, so this layout
  keeps every single-layer form as it is;
- ``group_bd``: the group's W stacked, then its A, ``[W_q; W_k; W_v; A_q; A_k; A_v]``, and one
  block-diagonal ``B_s``: one GEMM, then one in-place expand for the whole group (two GEMMs for
  q/k/v, one fewer than the base model's three; two for gate/up, as the base's). The expand
  does ``k`` times the arithmetic of the layers' own (zeros off the diagonal).

Predicted launches per block over the base model's: ``lorahot`` about +7, ``op_each`` +7,
``group_rows`` +4, ``group_bd`` +1 (so about 1.07x at decode in default mode, if the operator's
own host cost is small). Per configuration: relative error of the compiled decode and prefill
against lorahot's eager output, host and synced milliseconds per call in interleaved rounds,
the GPU's time (calls back to back), and launches per call.

Measured on an H200 host (torch 2.11, 2026-12-02, ``runs/20261202T071434-grouped-probe.log``;
medians of 3 interleaved rounds of 30 calls, ms, ratio to the base model in brackets):

============  ========  ==================  ==================  ==================
form          launches  decode, synced      prefill, synced     decode rounds
============  ========  ==================  ==================  ==================
base          335       8.51                7.18                8.67 7.09 8.50
lorahot       489       13.09 (1.54x)       14.03 (1.95x)       11.58 13.09 26.09
group_rows    423       11.71 (1.38x)       13.98 (1.95x)       10.84 11.71 16.29
group_bd      357       14.44 (1.70x)       13.00 (1.81x)       10.72 14.44 19.25
============  ========  ==================  ==================  ==================

The launch counts are the predicted ones exactly (+154, +88, +22). The times do not follow
them: ``group_bd`` launches 6% more kernels than the base model and took 1.70x its time. The
operator's Python body (the narrows, the in-place ``addmm_``, the dispatcher into Python, a
list of tensors) costs the host more than the launches it saves, and the rounds spread by up
to 2x. So on these hosts a grouped layer would need the compiler's own wrapper to launch its
two GEMMs (not an operator with a Python body); the in-place expand has no functional form
that the compiler keeps in place. Errors against lorahot's eager output: 0.026 (decode) and
0.031 (prefill), lorahot's own compiled 0.023 / 0.028.

``traced_rows`` and ``traced_bd`` are ``group_rows`` and ``group_bd`` written as plain torch in
the module's forward, no operator: the compiler's wrapper launches the GEMMs, and each expand is
an out-of-place GEMM whose addition to ``y`` the compiler fuses with what follows (RoPE, the
SiLU product, the residual add). Predicted in default mode: the launch counts of their operator
forms (+4 and +1 per block, if every addition fuses), at the base model's cost per launch,
about 1.26x and 1.07x at decode. ``traced_kx`` keeps the library's layout (each member's
``[[W, B_s], [A, 0]]`` back to back) and does every expand in one batched GEMM over strided
views, as :func:`lorahot.kernels.wide_groups.expands` does in default mode (written here
first). Measured (H200, torch 2.11, 2026-12-02; synced ms, ratio to base, launches per call):

- ``runs/20261202T143921-grouped-probe-default-traced-bd.log``: base 5.28 decode, 5.54
  prefill, 335 launches; lorahot with a shrink and a wide GEMM per layer 10.47 (1.98x), 13.58
  (2.45x), 489; ``traced_bd`` 7.16 (1.36x), 9.27 (1.67x), 401.
- ``runs/20261202T150507-grouped-probe-default-library-groups.log``: base 5.67, 6.09, 335;
  lorahot with :func:`~lorahot.kernels.wide_groups.expands` 6.73 (1.19x), 9.01 (1.48x), 423;
  ``traced_kx`` 9.78 (1.72x), 8.00 (1.31x), 401.

The rounds spread widely (``traced_kx``'s decode 6.37 / 9.78 / 11.64 ms); the launch counts are
firm. The one difference left from ``traced_kx`` was a wide layer outside any group (down),
which took its shrink and the wide GEMM; since then it takes two GEMMs in default mode too
(:data:`lorahot.kernels.wide_groups.ALONE`; ``lorahot_traced`` is the library with it off). ``PROBE_PART=k`` lists the kernels of one decode call of the 2-layer model per form
(``runs/20261202T150345-grouped-probe-kernels-small.log``): base 33, lorahot / ``traced_kx`` /
``traced_bd`` 39 each: one GEMM and two elementwise kernels more per block, kernels whose names
show RoPE over the sums ``y + expand`` (the base model's RoPE reads the GEMM's output).

``lorahot_split`` is the library with :data:`lorahot.kernels.wide_groups.ONE_BUFFER` off (a
group's sums apart, as measured above); since then, a group some output of which is read at
two places (q and k, by RoPE) writes its sums into one buffer with one kernel.

``traced_kcat`` stacks a group's A into one shrink, then one GEMM over ``[x | h_1 .. h_k]``
against ``[[W_1, B_1, 0 ..], [W_2, 0, B_2 ..], ..]``: each member's output whole out of one GEMM,
no expand, no sums kernel. Predicted 357 launches per decode call and about 1.08x; measured (H100,
torch 2.11, 2026-12-06, ``runs/20261206T0420-grouped-probe-default-kcat.log``) 401 launches and
1.35x at decode (lorahot 379, 1.23x; base 335), 1.34x at prefill (lorahot 1.27x): on CUDA each
concatenation ``[x | h]`` is a kernel of its own, and the GEMM of the longer K cost the GPU more
than the base GEMM and an expand (back to back 8.66 ms against lorahot's 5.54). Refuted.

``lorahot`` runs :mod:`lorahot.kernels.unrolled_expand` switched on (a few static rows' expands
as elementwise sums inside their readers), ``lorahot_gemm`` switched off, and
``lorahot_unrolled`` every expand unrolled at any row count (inductor's reduction unrolling,
set globally while it compiles). Measured (H100, torch 2.11, 2026-12-06,
``runs/20261206T1617-grouped-probe-default-unrolled.log``, at 75ab6c2 where q/k/v were unrolled
too): decode 357 launches and 1.08x the base's time against ``lorahot_gemm``'s 379 and 1.19x;
the process compiled in 171 s against 91 s. Since then ``lorahot`` takes the library's
defaults with the switch on (gate/up's members unrolled into the SiLU product, o and down
not), ``lorahot_all`` unrolls lone layers too (``unrolled_expand.LONE``), ``lorahot_lone``
only lone layers' expands (o, down; ``unrolled_expand.MEMBERS`` off). Since the sixty-third
session the defaults write q/k/v's one buffer with ``unrolled_sums`` (``unrolled_expand.SUMS``;
``lorahot_nosums`` without) and lower the unrolled expands as reductions over the rank
(``unrolled_expand.REDUCED``; ``lorahot_elementwise`` without); ``lorahot_rows128`` unrolls
them at up to 128 static rows (``unrolled_expand.ROWS``), the 128-row prefill included. On
CUDA part ``d`` also prints each form's summed kernel time per call (the profiler's; with early
launches a kernel waiting on the one before it counts as running). At 3bf7b52
(``runs/20261206T1825-grouped-probe-default-lone-sums.log``, where ``lorahot`` was today's
``lorahot_all``) the host took 9 ms per base decode call and hid the GPU's time; the forward
suite then showed o's and down's unrolled expands GPU-bound (fifty-eighth session).
``PROBE_TIMES=1`` prints the compile phases' times, summed over the process, after each form.
``PROBE_DSHAPES`` picks part ``d``'s shapes (default ``prefill,decode``, compiled in that
order) and ``PROBE_DROWS`` adds row counts after them.

A form named ``NAME_dyn`` is ``NAME`` compiled with ``dynamic=True`` (the row count symbolic,
as the rows suite compiles: lorahot's layers then run the dynamic-shapes operator). Every other
form compiles each shape with static rows (``dynamic=False``): the forms share the model's code
object, and under the compiler's default a form compiled after one that has seen two lengths
gets a symbolic row count (``benchmarks/forward.py``, ``STATIC``). Until the sixty-fifth session
default-mode forms had the compiler's default, so every form after the first ran its prefill on
a symbolic graph.

Under CUDA graphs (``PROBE_PART=r``; ``runs/20261202T100147-grouped-probe-r256.log``,
``101839-grouped-probe-r256-dyn.log``, ``101238-grouped-probe-r2048.log``), GPU time per call
against the base model's: at 256 rows lorahot 1.29x / 1.28x, ``group_rows`` 1.12x, ``group_bd``
1.04x / 1.04x (two processes); at 2048 rows every form 1.12-1.14x.

``PROBE_PART``: ``d`` default mode (decode 1 row, prefill 128 rows, compiled after the prefill
as the forward suite does); ``r`` reduce-overhead at 256 and 2048 rows (static shapes;
``PROBE_ROWS``); ``k`` the kernel list above; default ``d``. ``PROBE_FORMS`` picks the forms
of either part (default all five).

    PYTHONPATH=. python3 -m benchmarks.experiments.grouped_probe
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from types import MethodType
from typing import Any

import torch
from safetensors.torch import load_file

import lorahot
from benchmarks.common import kernel_profile
from benchmarks.experiments.default_mode_probe import host_and_synced, launches, sync
from benchmarks.workload import MAX_RANK, RANKS, TARGETS, adapter_file, build
from lorahot.kernels import unrolled_expand, wide_groups

try:  # the probe patches transformers' Llama forwards (imported here: not inside traced code)
    from transformers.models.llama import modeling_llama as ml
except ImportError:  # pragma: no cover
    ml = None

Call = Callable[[], object]
_lib = torch.library.Library("lorahot_probe", "DEF")
_lib.define("wide(Tensor x, Tensor g, Tensor[] bs, int[] outs, int rank, bool blocks) -> Tensor")


def _wide(
    x: torch.Tensor, g: torch.Tensor, bs: list[torch.Tensor], outs: list[int], rank: int, blocks: bool
) -> torch.Tensor:
    """``x @ G.T`` then the expands in place; the output ``[rows, sum(out) + k * rank]`` holds
    each layer's ``y`` (and the shrinks) where the layout puts them."""
    x2 = x.reshape(-1, x.shape[-1])
    yh = torch.nn.functional.linear(x2, g)
    if blocks:  # [y_1 .. y_k | h_1 .. h_k], one block-diagonal B_s
        n = sum(outs)
        yh.narrow(1, 0, n).addmm_(yh.narrow(1, n, len(outs) * rank), bs[0].t())
    else:  # [y_1 | h_1 | y_2 | h_2 ...]
        at = 0
        for out, b in zip(outs, bs, strict=True):
            yh.narrow(1, at, out).addmm_(yh.narrow(1, at + out, rank), b.t())
            at += out + rank
    return yh.view(*x.shape[:-1], g.shape[0])


def _wide_fake(
    x: torch.Tensor, g: torch.Tensor, bs: list[torch.Tensor], outs: list[int], rank: int, blocks: bool
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], g.shape[0]))


_lib.impl("wide", _wide, "CompositeExplicitAutograd")
torch.library.register_fake("lorahot_probe::wide")(_wide_fake)


class Group:
    """One operator's weights for layers ``mods`` reading one input."""

    def __init__(
        self,
        mods: list[torch.nn.Linear],
        ab: list[tuple[torch.Tensor, torch.Tensor]],
        blocks: bool,
        kx: bool = False,
        kcat: bool = False,
    ) -> None:
        self.outs = [m.out_features for m in mods]
        self.blocks = blocks
        self.kx = kx
        self.kcat = kcat
        r = ab[0][0].shape[0]
        self.rank = r
        ws = [m.weight.detach() for m in mods]
        if kcat:  # the shrinks' A stacked; [[W_1, B_1, 0 ..], [W_2, 0, B_2, ..], ..]: one GEMM over [x | h_1 .. h_k]
            k = len(mods)
            self.a = torch.cat([a for a, _ in ab]).contiguous()
            self.wk = torch.cat(
                [
                    torch.cat([w, torch.nn.functional.pad(b, (i * r, (k - 1 - i) * r))], 1)
                    for i, (w, (_, b)) in enumerate(zip(ws, ab, strict=True))
                ]
            ).contiguous()
            self.g = self.wk
            self.bs = []
        elif kx:  # the library's group layout: each member's [[W, B_s], [A, 0]] back to back
            self.wide = torch.cat(
                [
                    torch.cat([torch.cat([w, b], 1), torch.nn.functional.pad(a, (0, r))])
                    for w, (a, b) in zip(ws, ab, strict=True)
                ]
            ).contiguous()
            self.bs = []
            self.g = self.wide
        elif blocks:
            self.g = torch.cat(ws + [a for a, _ in ab]).contiguous()
            bd = ws[0].new_zeros((sum(self.outs), r * len(mods)))
            row = 0
            for i, (_, b) in enumerate(ab):
                bd[row : row + b.shape[0], i * r : (i + 1) * r] = b
                row += b.shape[0]
            self.bs = [bd]
        else:
            self.g = torch.cat([t for w, (a, _) in zip(ws, ab, strict=True) for t in (w, a)]).contiguous()
            self.bs = [b.contiguous() for _, b in ab]
        self.splits: list[tuple[int, int]] = []
        at = 0
        for out in self.outs:
            self.splits.append((at, out))
            at += out if blocks else out + r

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.traced:  # aten the compiler sees: its wrapper launches the GEMMs, the adds fuse with what follows
            return self.traced_call(x)
        yh = torch.ops.lorahot_probe.wide(x, self.g, self.bs, self.outs, self.rank, self.blocks)
        return [yh.narrow(-1, at, out) for at, out in self.splits]

    traced = False

    def traced_call(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x @ G.T`` then the expands out of place, each added to its ``y``: one GEMM per
        expand (one for the whole group where ``blocks`` or ``kx``) and additions the compiler fuses."""
        r = self.rank
        if self.kx:
            return self.kx_call(x)
        if self.kcat:
            x2 = x.reshape(-1, x.shape[-1])
            y = torch.cat([x2, x2 @ self.a.t()], -1) @ self.wk.t()
            return [y.narrow(-1, at, out).view(*x.shape[:-1], out) for at, out in self.splits]
        yh = torch.nn.functional.linear(x, self.g)
        if self.blocks:
            n = sum(self.outs)
            y = yh[..., :n] + yh[..., n:] @ self.bs[0].t()
            return [y.narrow(-1, at, out) for at, out in self.splits]
        return [
            yh[..., at : at + out] + yh[..., at + out : at + out + r] @ b.t()
            for (at, out), b in zip(self.splits, self.bs, strict=True)
        ]

    def kx_call(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The library's layout ``[[W_1, B_1], [A_1, 0], [W_2, B_2], ...]``: one GEMM over its
        first ``in`` columns gives ``[y_1 | h_1 | y_2 | h_2 ..]``; the shrinks, evenly spaced
        where members 2..k have one width, are one strided view ``[k, rows, R]``, and one
        batched GEMM gives every expand: against each member's own ``B_s`` where all members
        have one width (the B blocks are then evenly spaced too), else against the B columns
        of the whole group for every member (``k`` times the expand's arithmetic), of which
        member i keeps its own block. Views only: no copy at any row count."""
        r, k = self.rank, len(self.outs)
        n_in = x.shape[-1]
        total = self.wide.shape[0]
        x2 = x.reshape(-1, n_in)
        yh = torch.nn.functional.linear(x2, self.wide[:, :n_in])
        if k == 1:
            n = self.outs[0]
            return [(yh[:, :n] + yh[:, n:] @ self.wide[:n, n_in:].t()).view(*x.shape[:-1], n)]
        rows = yh.shape[0]
        gap = self.outs[-1] + r
        # [k, rows, R]: the k gaps that end at each shrink (member 1 at least as wide as the rest)
        h = yh.narrow(1, self.outs[0] + r - gap, k * gap).view(rows, k, gap)[..., gap - r :].transpose(0, 1)
        bt = self.wide[:, n_in:].t()  # [R, total]
        out, at = [], 0
        if all(n == self.outs[0] for n in self.outs):
            d = torch.bmm(h, bt.view(r, k, gap).transpose(0, 1)[..., : self.outs[0]])  # [k, rows, out]
            for i, n in enumerate(self.outs):
                out.append((yh[:, i * gap : i * gap + n] + d[i]).view(*x.shape[:-1], n))
            return out
        d = torch.bmm(h, bt.expand(k, r, total))  # [k, rows, total]
        for i, n in enumerate(self.outs):
            out.append((yh[:, at : at + n] + d[i, :, at : at + n]).view(*x.shape[:-1], n))
            at += n + r
        return out


def _group(
    mods: list[torch.nn.Linear],
    ab: list[tuple[torch.Tensor, torch.Tensor]],
    blocks: bool,
    traced: bool,
    kx: bool = False,
    kcat: bool = False,
) -> Group:
    group = Group(mods, ab, blocks, kx, kcat)
    group.traced = traced
    return group


def adapter_weights(
    path: str, dtype: torch.dtype, device: torch.device
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> ``(A, s * B)`` from a PEFT file of rank 64 (alpha 128)."""
    raw = load_file(path)
    scale = RANKS[MAX_RANK] / MAX_RANK
    out = {}
    for key, a in raw.items():
        if key.endswith("lora_A.weight"):
            name = key[len("base_model.model.") : -len(".lora_A.weight")]
            b = raw[key.replace("lora_A", "lora_B")]
            out[name] = (a.to(device, dtype), (b * scale).to(device, dtype))
    return out


def _attention(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: Any = None,
    attention_mask: Any = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    kwargs.pop("past_key_values", None), kwargs.pop("cache", None), kwargs.pop("past_key_value", None)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q, k, v = (t.reshape(shape).transpose(1, 2) for t in self._probe_qkv(hidden_states))
    cos, sin = position_embeddings
    q, k = ml.apply_rotary_pos_emb(q, k, cos, sin)
    impl = self.config._attn_implementation
    fn = ml.eager_attention_forward if impl == "eager" else ml.ALL_ATTENTION_FUNCTIONS[impl]
    out, weights = fn(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
    return self._probe_o(out)[0], weights


def _mlp(self: Any, x: torch.Tensor) -> torch.Tensor:
    gate, up = self._probe_gu(x)
    out: torch.Tensor = self._probe_down(self.act_fn(gate) * up)[0]
    return out


def grouped(model: torch.nn.Module, ab: dict[str, tuple[torch.Tensor, torch.Tensor]], form: str) -> torch.nn.Module:
    """Patches every attention and MLP of ``model`` to run its projections as ``form``'s operators."""
    kcat = form == "traced_kcat"
    blocks = form in ("group_bd", "traced_bd") or kcat
    traced = form.startswith("traced_")
    kx = form == "traced_kx"

    def shared(
        mod: torch.nn.Module, name: str, projections: tuple[str, ...]
    ) -> Callable[[torch.Tensor], list[torch.Tensor]]:
        """The projections of ``mod`` that read one input: one operator, or one each (``op_each``)."""
        mods = [getattr(mod, p) for p in projections]
        weights = [ab[f"{name}.{p}"] for p in projections]
        if form != "op_each":
            return _group(mods, weights, blocks, traced, kx, kcat)
        each = [Group([m], [w], False) for m, w in zip(mods, weights, strict=True)]
        return lambda h: [g(h)[0] for g in each]

    for name, mod in model.named_modules():
        if name.endswith("self_attn"):
            mod._probe_qkv = shared(mod, name, ("q_proj", "k_proj", "v_proj"))
            mod._probe_o = _group([mod.o_proj], [ab[f"{name}.o_proj"]], blocks, traced, kx, kcat)
            mod.forward = MethodType(_attention, mod)
        elif name.endswith("mlp"):
            mod._probe_gu = shared(mod, name, ("gate_proj", "up_proj"))
            mod._probe_down = _group([mod.down_proj], [ab[f"{name}.down_proj"]], blocks, traced, kx, kcat)
            mod.forward = MethodType(_mlp, mod)
    return model


def timed(call: Call, n: int = 30) -> tuple[float, float, float]:
    """(host, synced, back to back) ms per call: the first two as the default-mode probe takes
    them, then ``n`` calls with one sync at the end."""
    host, synced = host_and_synced(call, n)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        call()
    sync()
    return host, synced, (time.perf_counter() - t) / n * 1e3


_LIBRARY_EXPANDS = wide_groups._expands


def _unrolled_expands(
    yh: torch.Tensor, bt: torch.Tensor, outs: list[int], at: list[int], r: int, rows: int
) -> list[tuple[torch.Tensor, int, int]]:
    """Form ``lorahot_unrolled``: each member's expand as a sum over the rank, ``(h[:, :, None] *
    B_s.T[None]).sum(1)`` in float32, which the compiler unrolls into an elementwise expression
    (``unroll_reductions_threshold`` above the rank, set by :func:`switches`) and computes inside
    whatever reads the member's output (the residual add and RMSNorm, the SiLU product, RoPE):
    no expand GEMM, so each layer costs the launches of its one GEMM over ``[W; A]``."""
    parts = []
    for i, o in zip(at, outs, strict=True):
        h = yh[:, i + o : i + o + r].float()
        d = (h.unsqueeze(-1) * bt[:, i : i + o].float().unsqueeze(0)).sum(1).to(yh.dtype)
        parts.append((d[None], i, o + r))
    return parts


def switches(name: str) -> None:
    """Sets the library's switches for form ``name``: read when a model compiles (which follows
    its ``make``), and ``ALONE`` guarded by the compiled code, so set again before each call."""
    name = name.removesuffix("_dyn")
    wide_groups.ONE_BUFFER = name != "lorahot_split"
    wide_groups.ALONE = name != "lorahot_traced"
    unrolled = name == "lorahot_unrolled"
    wide_groups._expands = _unrolled_expands if unrolled else _LIBRARY_EXPANDS
    torch._inductor.config.unroll_reductions_threshold = MAX_RANK + 1 if unrolled else 8
    unrolled_expand.ENABLED = name != "lorahot_gemm"
    unrolled_expand.MEMBERS = name != "lorahot_lone"
    unrolled_expand.LONE = name in ("lorahot_all", "lorahot_lone")
    unrolled_expand.SUMS = name != "lorahot_nosums"
    unrolled_expand.REDUCED = name != "lorahot_elementwise"
    unrolled_expand.ROWS = 128 if name == "lorahot_rows128" else 16


def make(name: str, w: Any, ab: dict[str, tuple[torch.Tensor, torch.Tensor]], keep: list[Any]) -> torch.nn.Module:
    name = name.removesuffix("_dyn")
    model = w.fresh_base()
    switches(name)
    if name == "lorahot" or name.startswith("lorahot_"):  # the library, its switches set by switches()
        runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK)
        runtime.load(adapter_file(w.adapters[MAX_RANK]))
        keep.append(runtime)
    elif name != "base":
        grouped(model, ab, name)
    keep.append(model)
    return model


def part(
    mode: str,
    shapes: dict[str, torch.Tensor],
    w: Any,
    ab: dict[str, tuple[torch.Tensor, torch.Tensor]],
    configs: tuple[str, ...],
) -> None:
    keep: list[Any] = []
    ref_model = make("lorahot", w, ab, keep)
    with torch.inference_mode():
        want = {k: ref_model(input_ids=ids).logits.float() for k, ids in shapes.items()}
    calls: dict[str, dict[str, Call]] = {}
    for name in configs:
        t = time.perf_counter()
        model = make(name, w, ab, keep)
        c = torch.compile(
            model,
            fullgraph=True,
            mode=None if mode == "default" else mode,
            # static rows unless _dyn: the forms share the model's code object (forward.STATIC)
            dynamic=name.endswith("_dyn"),
        )

        def call(ids: torch.Tensor, c: Any = c, name: str = name) -> torch.Tensor:
            switches(name)
            with torch.inference_mode():
                out: torch.Tensor = c(input_ids=ids).logits
                return out

        errs = []
        for shape, ids in shapes.items():
            for _ in range(3):
                got = call(ids).float()
            errs.append(f"{shape} {((got - want[shape]).norm() / want[shape].norm()).item():.4f}")
        calls[name] = {shape: (lambda ids=ids, call=call: call(ids)) for shape, ids in shapes.items()}
        print(
            f"{mode} {name}: compiled in {time.perf_counter() - t:.1f} s; relative error against lorahot eager (base: what the adapter moves): {', '.join(errs) or '-'}",
            flush=True,
        )
        if os.environ.get("PROBE_TIMES") == "1":  # dynamo's and inductor's phases, summed over the process so far
            print(
                f"compile phases after {name}:",
                torch._dynamo.utils.compile_times(repr="str", aggregate=True),
                flush=True,
            )
    for by in calls.values():
        for f in by.values():
            for _ in range(10):
                f()
    got: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for _ in range(3):
        for name, by in calls.items():
            for shape, f in by.items():
                got.setdefault((name, shape), []).append(timed(f))
    print(f"--- {mode}: medians of 3 interleaved rounds (30 calls each); ratio to base in brackets")
    for shape in shapes:
        b = got[("base", shape)]
        b_sync = statistics.median(x[1] for x in b)
        b_gpu = statistics.median(x[2] for x in b)
        for name in calls:
            r = got[(name, shape)]
            h = statistics.median(x[0] for x in r)
            s = statistics.median(x[1] for x in r)
            g = statistics.median(x[2] for x in r)
            n = launches(calls[name][shape])
            print(
                f"{mode:16s} {shape:9s} {name:11s} host {h:7.3f}  synced {s:7.3f} ({s / b_sync:.2f}x)  "
                f"back to back {g:7.3f} ({g / b_gpu:.2f}x)  launches {n}  rounds {' '.join(f'{x[1]:.2f}' for x in r)}",
                flush=True,
            )
    if torch.cuda.is_available():  # the GPU's own time, which a slow host hides from the timings above
        for shape in shapes:
            for name in calls:
                prof = kernel_profile(calls[name][shape], calls=5)
                print(
                    f"{mode:16s} {shape:9s} {name:11s} kernel time {prof['gpu_us_per_call'] / 1e3:7.3f} ms per call; "
                    f"most: {prof['top_us']}",
                    flush=True,
                )


def kernels(forms: tuple[str, ...]) -> None:
    """Prints, per form, the kernels one default-mode decode call of the 2-layer model launches
    (after a prefill call, as ``part`` compiles), and its error against lorahot's eager output;
    with ``PROBE_KSHAPE=prefill``, those of the prefill call instead. ``PROBE_KSHAPE=rows:N,..``
    (``rows:N:T`` for N sequences of T tokens) lists each shape's call after calls of 1 and 8
    rows, so that it runs the graph with a symbolic row count, as in the rows suite; each form is
    compiled once for all of them. ``PROBE_KFULL=1``: the full-size model (the rows suite's)."""
    from collections import Counter

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    w = build(small=os.environ.get("PROBE_KFULL") != "1", device=dev)
    ab = adapter_weights(adapter_file(w.adapters[MAX_RANK]), w.dtype, dev)
    keep: list[Any] = []
    shapes = os.environ.get("PROBE_KSHAPE", "decode").split(",")
    calls: dict[str, torch.Tensor] = {}
    warm = [w.prefill]
    for shape in shapes:
        calls[shape] = w.prefill if shape == "prefill" else w.decode
        if shape.startswith("rows:"):
            seqs, tokens = (int(v) for v in [*shape.split(":")[1:], "1"][:2])
            gen = torch.Generator().manual_seed(0)
            calls[shape] = torch.randint(0, w.config.vocab_size, (seqs, tokens), generator=gen).to(dev)
            warm = [w.decode[:1, :1], w.decode[:1, :1].expand(8, 1).contiguous()]
    with torch.inference_mode():
        eager = make("lorahot", w, ab, keep)
        want = {shape: eager(input_ids=ids).logits.float() for shape, ids in calls.items()}
        del eager
    for name in forms:
        torch._dynamo.reset()
        c = torch.compile(make(name, w, ab, keep), fullgraph=True)
        with torch.inference_mode():
            for first in warm:
                c(input_ids=first)
            for shape, ids in calls.items():
                for _ in range(3):
                    got = c(input_ids=ids).logits.float()
                sync()
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=activities) as prof:
                    c(input_ids=ids)
                    sync()
                names: Counter[str] = Counter()
                for e in prof.events():
                    if e.device_type == torch.autograd.DeviceType.CUDA:
                        names[e.name[:90]] += 1
                err = ((got - want[shape]).norm() / want[shape].norm()).item()
                print(f"kernels {name} ({shape}): {sum(names.values())} kernels, error {err:.4f}")
                for k, v in sorted(names.items()):
                    print(f"    {v:3d} {k}")
        keep.clear()


def main() -> None:
    # every configuration's model shares the same code objects: one dynamo cache for them all
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    w = build(small=dev.type == "cpu", device=dev)
    ab = adapter_weights(adapter_file(w.adapters[MAX_RANK]), w.dtype, dev)
    parts = os.environ.get("PROBE_PART", "d")
    forms = tuple(os.environ.get("PROBE_FORMS", "base,lorahot,op_each,group_rows,group_bd").split(","))
    if "k" in parts:  # the kernels of one decode call per form, on the 2-layer model
        kernels(forms)
    if "d" in parts:  # PROBE_DROWS: more row counts, after these two (each a static graph of its own)
        gen = torch.Generator().manual_seed(3)
        more = [int(n) for n in os.environ.get("PROBE_DROWS", "").split(",") if n]
        vocab = w.config.vocab_size  # type: ignore[attr-defined]
        shapes = {"prefill": w.prefill, "decode": w.decode}  # as the forward suite compiles
        picked = os.environ.get("PROBE_DSHAPES", "prefill,decode").split(",")  # a subset, in this order
        shapes = {k: v for k, v in shapes.items() if k in picked}
        shapes |= {f"rows{n}": torch.randint(0, vocab, (1, n), generator=gen).to(dev) for n in more}
        part("default", shapes, w, ab, forms)
    if "r" in parts:
        gen = torch.Generator().manual_seed(2)
        vocab = w.config.vocab_size  # type: ignore[attr-defined]
        rows = [int(n) for n in os.environ.get("PROBE_ROWS", "256,2048").split(",")]
        shapes = {f"rows{n}": torch.randint(0, vocab, (1, n), generator=gen).to(dev) for n in rows}
        part("reduce-overhead", shapes, w, ab, forms)


if __name__ == "__main__":
    main()
