"""The Triton kernel behind :mod:`lorahot.kernels.lora_linear` (imported only where Triton and CUDA exist).

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y = x @ W.T + bias + ((x @ A.T) * s) @ Bt``,
``s [R]`` a scale per row of A (per column of the shrink): its K loop accumulates the base
product and the whole ``[BLOCK_M, R]`` shrink ``x @ A.T`` from the same loads of ``x``; the
epilogue scales the float32 shrink by ``s`` (one ``R``-vector load), rounds it to the weights'
dtype and runs the expand ``h @ Bt[:, tile]``; the output is rounded once. Each program
recomputes the shrink for its rows, which costs ``R / BLOCK_N`` times the tile's weight reads
again (from L2, A being small) and saves the separate shrink and expand launches that dominate
a small-batch LoRA forward.

float16 weights (``H32``, :func:`~lorahot.kernels.triton_routed_lora.keeps_float32`): the
scaled shrink stays float32 and the ``Bt`` tile is widened to float32 for the expand's dot
(TF32 on tensor cores: float16's 10 bits of mantissa, float32's range). A scaled shrink past
float16's 65504 (``x @ A.T`` of 1e5 with a small B, or ``s = 32`` on 3e3) then stays finite
where the output is in range, as with PEFT's float32 adapter weights; rounded to float16 it
was inf. bfloat16 has float32's range, and its kernels compile as before (``H32`` off).

A layer with few output tiles (narrow, or deep in K) leaves most of the GPU idle with one
program per tile, and makes each program stream all of ``A``. There the K loop is split
(``split`` in :data:`Config`): each program covers one K chunk, adds its share of the base
product and of the expand (the shrink and its scaling are linear in K, so partial shrinks
expand to partial outputs), and stores a float32 partial; :func:`_split_k_sum` adds the
partials and rounds once. That is two launches for such layers, as cuBLAS itself does for them.

Routed (``ROUTED``, :mod:`lorahot.kernels.routed_linear`): each row has its own slot. The K loop
then computes the base product alone; the rows' scaled shrinks come from a workspace ``H`` the
segmented shrink wrote, and the epilogue adds, for each slot the tile's rows use, the expand
``where(row in slot, H, 0) @ Bt_slot``, the slots dealt round the programs of a split K.

Every kernel here takes ``PDL``: launched early (:mod:`lorahot.kernels.pdl`, off by default),
it waits for the kernel before it only where it needs its results (the routed kernel after its
K loop, the others before their first load).

The op is a plain operator (:mod:`lorahot.kernels.op_registry`), opaque to the compiler, not a
``triton_op``: the compiler works out which arguments a visible Triton kernel writes by
compiling it to TTIR and walking it, tens of milliseconds each time, at several stages and at
every call site (pytorch#193227). With 154 call sites per graph and one graph per input shape,
that took most of lorahot's compile time on an H200 (a 7-shape run: 442 s against the base
model's 99 s). Opaque, the kernel compiles once per tile configuration, at its first launch;
later launches of that binary skip Triton's argument binding (:mod:`lorahot.kernels.direct_launch`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lorahot.kernels import pdl
from lorahot.kernels.device_guard import launching_on
from lorahot.kernels.direct_launch import Launcher, cdiv
from lorahot.kernels.op_registry import define, refuse_grad
from lorahot.kernels.rows import as_rows
from lorahot.kernels.triton_routed_lora import gdc_launch_dependents, gdc_wait, keeps_float32, rank_pad, shrink

__all__ = ["lora_linear", "launch", "run_into", "config_for", "split_for", "split_k", "sum_splits"]


@triton.jit
def _lora_linear_kernel(
    X, W, A, BT, BIAS, S, Y, WS, H, ROUTE,
    M, N, K, R, K_CHUNK, SLOTS, T,
    stride_xm, stride_wn, stride_am, stride_bm, stride_ym, stride_bs, stride_hm,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROUTED: tl.constexpr,
    PDL: tl.constexpr, H32: tl.constexpr,
):  # fmt: skip
    if PDL:  # launched early (lorahot.kernels.pdl): the split-K sum may launch now and wait for this
        if not ROUTED:  # x comes from the kernel before: wait for it
            gdc_wait()
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R
    k0 = pid_s * K_CHUNK
    rk = k0 + tl.arange(0, BLOCK_K)
    x_ptr = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptr = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    a_ptr = A + rr[None, :] * stride_am + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    hacc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(0, tl.cdiv(tl.minimum(K_CHUNK, K - k0), BLOCK_K)):
        k_ok = rk < tl.minimum(K, k0 + K_CHUNK) - k * BLOCK_K
        x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        if not ROUTED:  # one adapter: its shrink from the same loads of x
            a = tl.load(a_ptr, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            hacc = tl.dot(x, a, hacc)
        x_ptr += BLOCK_K
        w_ptr += BLOCK_K
        a_ptr += BLOCK_K
    if ROUTED:  # each row's scaled shrink is in H; each slot of the tile's rows adds its expand
        if PDL:  # the base product above ran beside the shrink; H is its result
            gdc_wait()
        slot_of = tl.load(ROUTE + rm // T, mask=m_ok, other=-1)
        h_ptr = H + rm[:, None].to(tl.int64) * stride_hm + rr[None, :]
        h = tl.load(h_ptr, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        # the split programs share the slots' expands
        acc = slot_expands(acc, h, slot_of, BT, rr, rn, r_ok, n_ok, SLOTS, pid_s, SPLIT, stride_bs, stride_bm, H32)
    else:
        s = tl.load(S + rr, mask=r_ok, other=0.0).to(tl.float32)  # [R_PAD]: the scale of each row of A
        h = hacc * s[None, :]
        if not H32:  # a dot of two 16-bit tiles; float16 weights keep h in float32 (H32)
            h = h.to(BT.dtype.element_ty)
        bt = tl.load(BT + rr[:, None] * stride_bm + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if H32:
            bt = bt.to(tl.float32)
        acc = tl.dot(h, bt, acc)
    if HAS_BIAS:  # noqa: SIM102 - a compile-time branch around a run-time one
        if pid_s == 0:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SPLIT == 1:
        y_ptr = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
        tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:  # this split's partial sum, in float32; _split_k_sum adds them up
        ws_ptr = WS + (pid_s * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
        tl.store(ws_ptr, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def slot_expands(acc, h, slot_of, BT, rr, rn, r_ok, n_ok, SLOTS, first, step, stride_bs, stride_bm, H32: tl.constexpr):
    """``acc`` plus, for each slot ``first, first + step, ...`` that some row uses (``slot_of``),
    the expand ``where(row in slot, h, 0) @ Bt_slot[:, rn]``: ``h`` the rows' float32 scaled
    shrink ``[BLOCK_M, R_PAD]``, rounded to ``BT``'s dtype for the dot, or with ``H32`` kept in
    float32 and the ``Bt`` tile widened (see :func:`_lora_linear_kernel`)."""
    for slot in range(first, SLOTS, step):
        hit = slot_of == slot
        if tl.max(hit.to(tl.int32), axis=0) > 0:
            hs = tl.where(hit[:, None], h, 0.0)
            if not H32:
                hs = hs.to(BT.dtype.element_ty)
            bt_ptr = BT + tl.cast(slot, tl.int64) * stride_bs + rr[:, None] * stride_bm + rn[None, :]
            bt = tl.load(bt_ptr, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            if H32:
                bt = bt.to(tl.float32)
            acc = tl.dot(hs, bt, acc)
    return acc


@triton.jit
def _split_k_sum(
    WS, Y, ZERO, M, N, stride_ym, ZERO_NUMEL,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr, ZEROES: tl.constexpr,
):  # fmt: skip
    """``Y = sum(WS[s] for s in range(SPLIT))``, rounded once; WS is ``[SPLIT, M, N]`` float32.
    ``ZEROES``: then ``ZERO[:ZERO_NUMEL] = 0`` (the routed shrink's workspace, which the kernel
    before has read), so that the workspace is zero again when the call ends."""
    if PDL:  # launched early: the partials are the kernel before's
        gdc_wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(WS + s * M * N + offs, mask=ok, other=0.0)
    tl.store(Y + (offs // N) * stride_ym + offs % N, acc.to(Y.dtype.element_ty), mask=ok)
    if ZEROES:
        for start in range(tl.program_id(0) * BLOCK, ZERO_NUMEL, tl.num_programs(0) * BLOCK):
            z = start + tl.arange(0, BLOCK)
            tl.store(ZERO + z, tl.zeros((BLOCK,), dtype=tl.float32), mask=z < ZERO_NUMEL)


#: the kernels' launches (:mod:`lorahot.kernels.direct_launch`: each compiled binary launched
#: directly after its first launch, at a fraction of ``kernel[grid]``'s host cost)
_LINEAR = Launcher(_lora_linear_kernel)
_SUM = Launcher(_split_k_sum)

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split): ``split`` > 1 cuts K into that
#: many chunks, each program summing one chunk into a float32 workspace that a second small
#: kernel adds up (more programs for narrow or deep layers, and fewer re-reads of ``A``).
Config = tuple[int, int, int, int, int, int]


@functools.lru_cache(maxsize=4096)  # asked on every call of the operator
def config_for(m: int, n: int, k: int) -> Config:
    """The tile configuration for ``m`` rows, ``n`` outputs and ``k`` inputs.

    A layer with few output tiles is split along K until about 256-384 programs run (a power
    of two; a wide one is not split). Measured on an H200 over the Llama projection shapes at
    rank 64 (``benchmarks/experiments/forward_probe.py sweep``, each call in a CUDA graph with 22
    weight sets, us; the base GEMM in brackets):

    - 1 row: q/o 7.59 (6.30), k/v 4.62 (5.22), gate/up 11.28 (8.66), down 11.20 (11.37). Split in
      4, gate/up went from 12.86 to 11.28 (88 tiles were left unsplit under the earlier 256-program
      rule).
    - 64 rows: q/o 9.28 (6.59), k/v 5.28 (5.26), down 13.75 (12.01).
    - 256 rows, k/v: 6.35 with 64-column tiles against 6.82 with 32 (5.88).
    """
    small = m <= 16
    bm = 16 if small else 64
    bn = 32 if n <= 512 and m <= 64 else 64
    split = split_for(m, n, k, bm, bn)
    bk = 128 if small and split == 1 else 64
    return (bm, bn, bk, 4, 4 if small else 3, split)


def split_for(m: int, n: int, k: int, bm: int, bn: int) -> int:
    """How many chunks :func:`config_for` cuts K into for ``[bm, bn]`` tiles over ``m`` rows and
    ``n`` outputs: none (1) past 192 tiles, else a power of two that brings about 256-384
    programs (at most 16 for up to 16 rows, 8 above), each chunk at least 128 inputs deep."""
    tiles = max(1, -(-m // bm) * -(-n // bn))  # no rows or no outputs: nothing launches
    if tiles > 192:
        return 1
    split = min(16 if m <= 16 else 8, 384 // tiles, max(1, k // 128))
    return 1 << (split.bit_length() - 1)  # a power of two


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
    config: Config,
    routing: tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None] | None = None,
    h: torch.Tensor | None = None,
) -> None:
    """Runs the kernel on 2-D ``x [M, K]`` into ``out [M, N]`` (rows contiguous), with
    ``scale [R]`` contiguous, one per row of ``a``.

    With ``routing = (segs, route, rows per entry, workspace)`` each row computes with its own
    slot (``route`` int64, ``-1`` for none; ``segs`` its grouping by slot, see
    :func:`lorahot.kernels.routed_lora.segments`): ``a [slots, R, K]``, ``bt [slots, R, N]`` and
    ``scale [slots, R]`` are every slot's. The segmented shrink
    (:func:`lorahot.kernels.triton_routed_lora.shrink`) first writes each row's scaled shrink to
    a float32 workspace, which costs one more launch (two where its K is split and it must
    zero a fresh workspace: ``workspace``, zero and large enough, saves that one, and the
    split-K sum zeroes it again); this kernel then tiles the rows as for one adapter (the base
    product read once for the whole batch) and adds, for each slot its tile's rows use, the
    expand with that slot's B. ``h``: the rows' scaled shrinks already computed (float32 ``[M,
    >= R]``, columns contiguous, rows ``h.stride(0)`` apart; see
    :func:`lorahot.kernels.routed_linear.routed_shrink`): no shrink runs and no workspace is
    used."""
    m, k = x.shape
    n = weight.shape[0]
    r = a.shape[-2]
    if m == 0 or n == 0:  # nothing to write; and a shrink into the workspace would stay there
        return
    # the base layer's own tensors, whatever their layout: the kernel reads the weight's rows
    # and the bias as contiguous runs
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    bm, bn, bk, warps, stages, split = config
    chunk, split, ws = split_k(k, bk, split, out)
    early = pdl.active(x.device)
    kept = None if h is not None else _workspace(routing, split, m, r)
    try:
        if routing is not None:
            segs, route, t, _ = routing
            slots = a.shape[0]
            if h is None:
                h = shrink(x, a, scale, segs, t, early=early, workspace=kept)[0]
        else:
            route, t, slots, h = x, 1, 0, x  # unused placeholders without routing
        grid = (cdiv(m, bm), cdiv(n, bn), split)
        _LINEAR(
            grid,
            (x, weight, a, bt, bias if bias is not None else weight, scale, out, ws, h, route),
            (
                m, n, k, r, chunk, slots, t,
                x.stride(0), weight.stride(0), a.stride(-2), bt.stride(-2), out.stride(0), bt.stride(0), h.stride(0),
                # HAS_BIAS, R_PAD, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, ROUTED, PDL, H32
                bias is not None, rank_pad(r), split, bm, bn, bk, routing is not None, early, keeps_float32(bt),
            ),
            num_warps=warps, num_stages=stages, launch_pdl=early,
        )  # fmt: skip
        sum_splits(ws, out, early=early, zero=kept)
    except BaseException:  # a launch failed, perhaps after the shrink added into the workspace
        if kept is not None:
            kept.zero_()
        raise


def _workspace(
    routing: tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None] | None, split: int, m: int, r: int
) -> torch.Tensor | None:
    """The part of the routing's zeroed workspace a call of ``m`` rows uses, where it can: K
    split (the sum kernel that zeroes it again runs) and the rows fitting; else None."""
    workspace = None if routing is None else routing[3]
    if workspace is None or split == 1 or workspace.numel() < m * rank_pad(r):
        return None
    return workspace.view(-1)[: m * rank_pad(r)]  # routed_linear.workspace: its first m rows


def split_k(k: int, block_k: int, split: int, out: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """K cut into at most ``split`` chunks of whole ``block_k`` steps, none empty: ``(chunk,
    split, workspace)``, the workspace where the chunks' partial outputs go (``out`` itself
    when K is not split, else float32 ``[split, M, N]`` for :func:`sum_splits`)."""
    chunk = max(1, cdiv(cdiv(k, block_k), split)) * block_k
    split = max(1, cdiv(k, chunk))  # no inputs: one program per tile, adding the bias alone
    m, n = out.shape
    return chunk, split, out if split == 1 else torch.empty((split, m, n), device=out.device, dtype=torch.float32)


def sum_splits(ws: torch.Tensor, out: torch.Tensor, *, early: bool = False, zero: torch.Tensor | None = None) -> None:
    """``out = ws.sum(0)`` rounded once (:func:`_split_k_sum`), where ``ws`` is a split-K
    workspace of :func:`split_k`; nothing where it is ``out`` itself. ``early``: launched with
    programmatic dependent launch (:mod:`lorahot.kernels.pdl`) after the kernel that wrote ``ws``.
    ``zero``: a contiguous float32 tensor the same kernel zeroes (``ws`` must then be split)."""
    if ws is out:
        return
    m, n = out.shape
    split, block = ws.shape[0], 1024
    _SUM(
        (cdiv(m * n, block), 1, 1),
        (ws, out, ws if zero is None else zero),
        # M, N, stride_ym, ZERO_NUMEL, SPLIT, BLOCK, PDL, ZEROES
        (m, n, out.stride(0), 0 if zero is None else zero.numel(), split, block, early, zero is not None),
        num_warps=4, num_stages=3, launch_pdl=early,
    )  # fmt: skip


def _fake(x: torch.Tensor, weight: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@define("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor bt, Tensor scale) -> Tensor", _fake)
def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """``x @ weight.T + bias + ((x @ a.T) * scale) @ bt``, ``x [..., K]``, ``scale [R]``: one
    kernel, two with split K (the operator ``lorahot::lora_linear``)."""
    refuse_grad("lora_linear", x, weight, bias, a, bt)
    x2 = as_rows(x)
    n = weight.shape[0]
    out = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
    run_into(x2, weight, bias, a, bt, scale, out)
    return out.view(*x.shape[:-1], n)


def run_into(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """The kernel on 2-D ``x2 [M, K]`` into ``out [M, N]`` (columns contiguous, any row stride),
    with the tile configuration :func:`config_for` picks."""
    if x2.shape[0] == 0:
        return
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    with launching_on(x2.device):
        launch(x2, weight, bias, a, bt, scale, out, config_for(x2.shape[0], weight.shape[0], x2.shape[1]))
