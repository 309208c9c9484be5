"""Direct launches of compiled Triton binaries (lorahot.kernels.direct_launch): a call launches a
recorded binary only where everything the binary was specialized on is the same (a stand-in
kernel on the CPU), and on the GPU the fused operators' direct launches give the bits of
``kernel[grid]``'s."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

from lorahot.kernels import direct_launch
from lorahot.kernels.triton_import import triton_module


class _Binary:
    """A compiled kernel's stand-in: ``binary[grid](*args, stream=)`` records a direct launch."""

    def __init__(self, log: list[tuple[str, Any, tuple[Any, ...]]], grid: tuple[int, int, int]) -> None:
        self.log, self.grid = log, grid

    def __getitem__(self, grid: tuple[int, int, int]) -> Any:
        assert grid == self.grid

        def runner(*args: Any, stream: int) -> None:
            self.log.append(("direct", grid, args))

        return runner


class _Kernel:
    """A ``@triton.jit`` function's stand-in: ``kernel[grid](*args, **options)`` records a JIT
    launch (one that binds its arguments, compiling where needed) and returns its binary."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Any, tuple[Any, ...]]] = []

    def __getitem__(self, grid: tuple[int, int, int]) -> Any:
        def launch(*args: Any, **options: Any) -> _Binary:
            self.log.append(("jit", grid, args))
            return _Binary(self.log, grid)

        return launch


@pytest.fixture
def direct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct_launch, "available", lambda: True)
    monkeypatch.setattr(direct_launch, "_stream", lambda device: 0)


def test_a_binary_is_launched_directly_only_where_its_specialization_is_the_same(direct: None) -> None:
    kernel = _Kernel()
    launch = direct_launch.Launcher(kernel)
    store = torch.zeros(64, dtype=torch.float16)
    x, y = store[:16], store[16:48]  # 16-byte aligned: offsets of 0 and 32 bytes
    grid = (2, 1, 1)

    def call(*tensors: torch.Tensor, rest: tuple[Any, ...] = (16, 3, True), grid: Any = grid, **options: Any) -> str:
        launch(grid, tensors, rest, num_warps=options.get("num_warps", 4), num_stages=3, launch_pdl=False)
        return kernel.log[-1][0]

    assert call(x, y) == "jit"  # first: bound and compiled, its binary recorded
    assert call(x, y) == "direct"
    assert kernel.log[-1] == ("direct", grid, (x, y, 16, 3, True))  # tensors then the rest, in order
    assert call(y, x) == "direct"  # other addresses, the same alignment and dtypes
    assert call(store[1:17], y) == "jit"  # 2 bytes off a 16-byte boundary: another binary
    assert call(store[1:17], y) == "direct"
    assert call(x.float(), y) == "jit"  # another dtype
    assert call(x, y, rest=(17, 3, True)) == "jit"  # an integer of another value
    assert call(x, y, rest=(16, 3, False)) == "jit"  # a constant of another value
    assert call(x, y, grid=(3, 1, 1)) == "jit"
    assert call(x, y, num_warps=8) == "jit"
    assert launch.binaries() == 7


def test_the_launcher_starts_over_past_its_limit(direct: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct_launch, "LIMIT", 2)
    kernel = _Kernel()
    launch = direct_launch.Launcher(kernel)
    x = torch.zeros(8)
    for m in (1, 2, 3):
        launch((1, 1, 1), (x,), (m,), num_warps=4, num_stages=3)
    assert launch.binaries() == 1  # cleared at the third, which is then recorded alone
    launch((1, 1, 1), (x,), (3,), num_warps=4, num_stages=3)
    assert kernel.log[-1][0] == "direct"


def test_without_a_verified_triton_every_launch_binds_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct_launch, "available", lambda: False)
    kernel = _Kernel()
    launch = direct_launch.Launcher(kernel)
    x = torch.zeros(8)
    for _ in range(3):
        launch((1, 1, 1), (x,), (8,), num_warps=4, num_stages=3)
    assert [entry[0] for entry in kernel.log] == ["jit"] * 3 and launch.binaries() == 0


class _OutOfResources(Exception):
    """Triton's ``OutOfResources`` (``triton.runtime.errors``), as it names the resource."""

    def __init__(self, required: int, limit: int, name: str) -> None:
        super().__init__(f"out of resource: {name}, Required: {required}, Hardware limit: {limit}")
        self.name = name


class _SharedMemoryKernel(_Kernel):
    """A kernel whose binary loads only with at most ``fits`` stages (each stage a copy of its
    tiles in shared memory); with more it raises ``OutOfResources`` as Triton does, or ``other``
    where given."""

    def __init__(self, fits: int, other: Exception | None = None) -> None:
        super().__init__()
        self.fits, self.other = fits, other
        self.stages: list[int] = []

    def __getitem__(self, grid: tuple[int, int, int]) -> Any:
        jit = super().__getitem__(grid)

        def launch(*args: Any, num_stages: int, **options: Any) -> _Binary:
            self.stages.append(num_stages)
            if num_stages > self.fits:
                raise self.other or _OutOfResources(86016 * num_stages, 232448, "shared memory")
            return jit(*args, num_stages=num_stages, **options)

        return launch


@pytest.mark.parametrize("verified", [True, False], ids=["direct", "bound"])
def test_a_binary_that_needs_more_shared_memory_than_the_device_has_runs_with_fewer_stages(
    monkeypatch: pytest.MonkeyPatch, verified: bool
) -> None:
    """Where a launch's binary needs more shared memory than the device gives a program (Triton's
    OutOfResources at load), the launcher takes one stage fewer until it fits, and keeps that
    depth for the specialization: later calls ask for it at once (and launch its binary directly
    where they can), another specialization starts from the stages asked. With one stage left,
    or for any other error, the error is raised."""
    errors = types.SimpleNamespace(OutOfResources=_OutOfResources)
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(runtime=types.SimpleNamespace(errors=errors)))
    monkeypatch.setitem(sys.modules, "triton.runtime", sys.modules["triton"].runtime)
    monkeypatch.setitem(sys.modules, "triton.runtime.errors", errors)
    monkeypatch.setattr(direct_launch, "available", lambda: verified)
    monkeypatch.setattr(direct_launch, "_stream", lambda device: 0)
    kernel = _SharedMemoryKernel(fits=2)
    launch = direct_launch.Launcher(kernel)
    x = torch.zeros(8, dtype=torch.float16)
    launch((1, 1, 1), (x,), (256,), num_warps=4, num_stages=4)
    assert kernel.stages == [4, 3, 2] and kernel.log[-1][0] == "jit"
    launch((1, 1, 1), (x,), (256,), num_warps=4, num_stages=4)
    assert kernel.stages == ([4, 3, 2] if verified else [4, 3, 2, 2])
    assert kernel.log[-1][0] == ("direct" if verified else "jit")
    launch((1, 1, 1), (x,), (64,), num_warps=4, num_stages=4)  # another rank: its own depth
    assert kernel.stages[-3:] == [4, 3, 2]
    for failing in (_SharedMemoryKernel(fits=0), _SharedMemoryKernel(fits=1, other=ValueError("bad argument"))):
        with pytest.raises((_OutOfResources, ValueError)):
            direct_launch.Launcher(failing)((1, 1, 1), (x,), (256,), num_warps=4, num_stages=3)
        assert failing.stages == ([3, 2, 1] if failing.other is None else [3])


@pytest.mark.parametrize(
    ("version", "enabled", "expected"),
    [("3.6.0", True, True), ("3.6.0+git1234", True, True), ("3.5.1", True, False), ("3.7.0", True, False),
     ("3.6.0", False, False), ("weird", True, False)],
)  # fmt: skip
def test_it_is_available_for_the_verified_triton_versions_only(
    monkeypatch: pytest.MonkeyPatch, version: str, enabled: bool, expected: bool
) -> None:
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__=version))
    monkeypatch.setattr(direct_launch, "ENABLED", enabled)
    direct_launch.available.cache_clear()
    try:
        assert direct_launch.available() is expected
    finally:
        direct_launch.available.cache_clear()


# -- GPU ------------------------------------------------------------------------------------


def _linear_case(rows: int, n: int, k: int, bias: bool, offset: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator("cuda").manual_seed(rows * 7 + n + offset)
    dt = torch.bfloat16
    store = torch.randn(rows * k + offset, device="cuda", dtype=dt, generator=g)
    x = store[offset:].view(rows, k)  # offset elements of 2 bytes from the allocation
    w = torch.randn(n, k, device="cuda", dtype=dt, generator=g) / k**0.5
    b = torch.randn(n, device="cuda", dtype=dt, generator=g) if bias else None
    a = torch.randn(16, k, device="cuda", dtype=dt, generator=g) / k**0.5
    bt = torch.randn(16, n, device="cuda", dtype=dt, generator=g)
    s = torch.linspace(-1.0, 1.0, 16, device="cuda")
    return x, w, b, a, bt, s  # type: ignore[return-value]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "n", "k", "bias"),
    [(1, 2048, 2048, False), (1, 256, 2048, True), (4, 5632, 2048, False), (1, 2048, 5632, True),
     (100, 512, 512, True)],
)  # fmt: skip
@pytest.mark.parametrize("split", [True, False])
def test_gpu_the_fused_kernel_s_direct_launches_give_the_bits_of_its_jit_launches(
    monkeypatch: pytest.MonkeyPatch, rows: int, n: int, k: int, bias: bool, split: bool
) -> None:
    """The tiles ``config_for`` picks (K split in every case here: two kernels, the split-K sum
    the second) and the same tiles unsplit (one kernel), with and without bias, decode and
    prefill tiles: the output, NaN-poisoned first, is bitwise the same launched directly as
    bound by ``kernel[grid]``; then an input 2 bytes off a 16-byte boundary, which Triton
    compiles for apart, after the aligned one's binaries were recorded."""
    if not direct_launch.available():
        pytest.skip("direct launches are off for this Triton (lorahot.kernels.direct_launch.VERIFIED)")
    kernel = triton_module("triton_lora_linear")
    assert kernel is not None
    launches = {"direct": 0}
    real_stream = direct_launch._stream

    def counted(device: int) -> int:
        launches["direct"] += 1
        return real_stream(device)

    monkeypatch.setattr(direct_launch, "_stream", counted)

    config = kernel.config_for(rows, n, k)
    config = config if split else (*config[:-1], 1)

    def run(case: tuple[torch.Tensor, ...], direct: bool) -> torch.Tensor:
        x, w, b, a, bt, s = case
        out = torch.full((x.shape[0], w.shape[0]), float("nan"), device="cuda", dtype=x.dtype)
        with monkeypatch.context() as m:
            m.setattr(direct_launch, "available", lambda: direct)
            kernel.launch(x, w, b, a, bt, s, out, config)
        return out

    for offset in (0, 1):
        case = _linear_case(rows, n, k, bias, offset)
        assert (case[0].data_ptr() % 16 == 0) == (offset == 0)
        assert kernel.config_for(rows, n, k)[-1] > 1  # every case splits
        bound = run(case, direct=False)
        before = launches["direct"]
        run(case, direct=True)  # the binary of each kernel recorded (bound again where new)
        got = run(case, direct=True)
        assert launches["direct"] > before, "no direct launch"
        torch.cuda.synchronize()
        assert torch.isfinite(got).all() and torch.equal(got, bound), (offset, (got - bound).abs().max())
        x, w, b, a, bt, s = (t.double() if t is not None else None for t in case)
        ref = x @ w.T + ((x @ a.T) * s) @ bt + (0 if b is None else b)  # type: ignore[operator]
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused-decode", "segmented-prefill"])
def test_gpu_rank_256_kernels_fit_the_device_with_fewer_stages(path: str) -> None:
    """At rank 256 the fused kernel on a decode row into 14,336 outputs and the segmented
    shrink above 256 rows need more shared memory than an H100/H200 gives a program at the
    stages asked (258,048 and 245,760 bytes for sm90, by the compile metadata): they run with
    fewer stages, and match the float64 reference."""
    from lorahot.kernels import routed_lora as routed

    g = torch.Generator("cuda").manual_seed(3)
    dt, r, k = torch.bfloat16, 256, 4096
    rows, n = (1, 14336) if path == "fused-decode" else (300, 4096)
    x = torch.randn(rows, k, device="cuda", dtype=dt, generator=g)
    if path == "fused-decode":
        kernel = triton_module("triton_lora_linear")
        assert kernel is not None
        w = torch.randn(n, k, device="cuda", dtype=dt, generator=g) / k**0.5
        a = torch.randn(r, k, device="cuda", dtype=dt, generator=g) / k**0.5
        bt = torch.randn(r, n, device="cuda", dtype=dt, generator=g) / r**0.5
        s = torch.rand(r, device="cuda", generator=g)
        out = torch.full((rows, n), float("nan"), device="cuda", dtype=dt)
        kernel.launch(x, w, None, a, bt, s, out, kernel.config_for(rows, n, k))
        xd = x.double()
        want = xd @ w.double().T + ((xd @ a.double().T) * s.double()) @ bt.double()
    else:
        kernels = triton_module("triton_routed_lora")
        assert kernels is not None
        slots = 3
        y = torch.randn(rows, n, device="cuda", dtype=dt, generator=g)
        a = torch.randn(slots, r, k, device="cuda", dtype=dt, generator=g) / k**0.5
        bt = torch.randn(slots, r, n, device="cuda", dtype=dt, generator=g) / r**0.5
        s = torch.rand(slots, r, device="cuda", generator=g)
        route = torch.randint(-1, slots, (rows,), device="cuda", generator=g)
        out = torch.full((rows, n), float("nan"), device="cuda", dtype=dt)
        kernels.launch(x, y, a, bt, s, route, out, gather=False, segs=routed.segments(route, slots))
        want = routed.reference(x.double(), y.double(), a.double(), bt.double(), s.double(), route)
    assert float((out.double() - want).norm() / want.norm()) < 1e-2


def test_host_arithmetic_matches_its_definition() -> None:
    for a in range(0, 70):
        for b in (1, 2, 3, 16, 64):
            assert direct_launch.cdiv(a, b) == -(-a // b) == (a + b - 1) // b
    assert [direct_launch.next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 9, 16, 17)] == [1, 1, 2, 4, 4, 8, 16, 16, 32]
