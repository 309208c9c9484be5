"""The one-launch scaled row copy behind the wide layers' refresh (CUDA with Triton only)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorahot
from lorahot.kernels import row_scale

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_every_block_gets_its_rows_times_its_scales_and_nothing_else(dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    R, widths, layers = 16, [64, 1000, 2048 + 3, 5], [3, 0, 2, 3]
    src = [torch.randn(R, w, device="cuda", generator=g).to(dtype) for w in widths]
    dst = [torch.full((R, w), float("nan"), device="cuda", dtype=dtype) for w in widths]
    scales = torch.randn(4, R, device="cuda", generator=g)
    scales[0, 5] = 0.0
    scaler = row_scale.RowScaler(dst, src, layers)
    assert row_scale.available(dst[0].device, dtype)
    for rows in (5, R):
        scaler(scales, rows)
        for d, s, layer in zip(dst, src, layers):
            want = (s[:rows].float() * scales[layer, :rows, None]).to(dtype)  # PyTorch's own half-precision multiply
            assert torch.equal(d[:rows], want)
            if rows < R:
                assert torch.isnan(d[rows:]).all()  # rows past the count untouched


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_transposed_blocks_get_their_rows_times_their_scales_and_nothing_else(dtype: torch.dtype) -> None:
    """Destinations as the wide layers' B columns: transposed views into ``[cols, k + R]`` buffers."""
    g = torch.Generator(device="cuda").manual_seed(0)
    R, widths, layers, k = 64, [64, 1000, 2048 + 3, 5], [3, 0, 2, 3], 40
    src = [torch.randn(R, w, device="cuda", generator=g).to(dtype) for w in widths]
    bufs = [torch.full((w, k + R), float("nan"), device="cuda", dtype=dtype) for w in widths]
    dst = [b[:, k:].t() for b in bufs]
    scales = torch.randn(4, R, device="cuda", generator=g)
    scaler = row_scale.RowScaler(dst, src, layers)
    assert scaler.transposed
    for rows in (5, 33, R):
        scaler(scales, rows)
        for d, b, s, layer in zip(dst, bufs, src, layers):
            assert torch.equal(d[:rows], (s[:rows].float() * scales[layer, :rows, None]).to(dtype))
            assert torch.isnan(b[:, :k]).all()
            if rows < R:
                assert torch.isnan(d[rows:]).all()


def test_blocks_of_mixed_layouts_are_refused() -> None:
    """lorahot's own buffers: a layout the kernel does not handle is a bug, said at construction."""
    src = [torch.zeros(4, 6), torch.zeros(4, 6)]
    dst = [torch.zeros(6, 9)[:, 5:].t(), torch.zeros(4, 6)]
    with pytest.raises(ValueError, match="all of contiguous rows or all transposed"):
        row_scale.RowScaler(dst, src, [0, 1])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_wide_rows_from_the_kernel_equal_the_library_path_bitwise(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same loads, stack, re-weighting and activations on two models, one refreshing its
    wide rows with the kernel and one with multi-tensor library calls: every wide row equal, A
    and B (float16: both shifted by the rows' powers of two, which the kernel finds itself)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128, bias=False)).to("cuda", dtype)
    models, runtimes = [], []
    for kernel in (True, False):
        with monkeypatch.context() as m:
            if not kernel:
                m.setattr(row_scale, "available", lambda device, dtype: False)
            model = copy.deepcopy(base)
            runtimes.append(lorahot.inject(model, ["0", "2"], max_rank=32, slots=2))
            models.append(model)
    assert models[0][0].wide and models[1][2].wide
    g = torch.Generator().manual_seed(1)

    def adapter(rank: int) -> dict[str, torch.Tensor]:
        return {
            f"{n}.lora_{k}.weight": torch.randn(shape, generator=g)
            for n, (fin, fout) in {"0": (256, 512), "2": (512, 128)}.items()
            for k, shape in (("A", (rank, fin)), ("B", (fout, rank)))
        }

    a, b, c = adapter(8), adapter(16), adapter(32)

    def same() -> None:
        for name in ("0", "2"):
            for rows in ([m[int(name)].wide_rows() for m in models], [m[int(name)].wide_a_rows() for m in models]):
                assert torch.equal(rows[0], rows[1]), name

    steps = [
        lambda rt: rt.load(a, config={"lora_alpha": 16}),
        lambda rt: rt.load([b, a], scale=[0.7, -1.5], slot=1),
        lambda rt: rt.activate(1),
        lambda rt: rt.set_scale([2.0, 0.25]),
        lambda rt: rt.load(c, slot=1, scale=0.5),
        lambda rt: rt.activate(0),
        lambda rt: rt.set_scale(3.0),
        lambda rt: rt.unload(0),
    ]
    for step in steps:
        for rt in runtimes:
            step(rt)
        same()


def test_stack_scales_library_path_writes_both_regions() -> None:
    """Where the kernel does not run (the CPU), the library calls compute the same formula."""
    own = torch.tensor([[0.5, 2.0, 0.0]], dtype=torch.float64)
    part = torch.tensor([[1, 0, 0]])
    weights = torch.tensor([3.0, -0.25], dtype=torch.float64)
    out, mirror = torch.full((1, 3), float("nan")), torch.full((1, 3), float("nan"))
    row_scale.stack_scales(own, part, weights, out, mirror)
    assert torch.equal(out, torch.tensor([[-0.125, 6.0, 0.0]])) and torch.equal(mirror, out)
