"""Triton kernels launched from their compiled binaries, without the JIT's argument binding.

``kernel[grid](*args)`` binds its arguments on every call: it works out each argument's
specialization (dtype, 16-byte alignment, integer divisibility), hashes it, looks the compiled
binary up and builds the launch. On an H200 host that took 25-48 us per launch where the
binary's own runner (``compiled[grid]``) took 10-18 and the base layer's ``F.linear`` 14-27
(``benchmarks/experiments/launch_host_probe.py``, ``runs/20261202T004321-launch-host-probe.log``
and ``runs/20261202T005058-launch-host-probe.log``; one decode row, TinyLlama shapes). Under CUDA
graphs that cost is paid once, at capture. Without them (eager, and the routed layers'
operators in ``torch.compile``'s default mode) it is paid on every call.

:class:`Launcher` keeps, per kernel, the runner of each compiled binary (Triton's own launch of a
compiled kernel, which keeps the launch hooks profilers set) under a key that holds everything
the binary was specialized on: every integer and constant argument's value, every tensor's
dtype and whether its address is 16-byte aligned, the grid, the launch options and the device.
A call whose key it has seen launches that runner directly; any other call goes through
``kernel[grid]`` (compiling where Triton must) and records the binary it returns. The key is
exact, so a direct launch runs the binary Triton itself would have chosen; the GPU test checks
the outputs bitwise against ``kernel[grid]``'s, aligned and not.

Measured (same runs): the fused operator ``lorahot::lora_linear`` cost the host 75-100 us per call
with direct launches against 96-136 us with every launch bound. That is still 4-5 times
``F.linear``: in default mode a whole compiled model with the operator in every layer read 33.8
ms per decode step against 17.6 with the wide layer's GEMMs and 7.0 for the base model
(``runs/20261202T004403-forward.json``), so the layers keep the compiler's own formulas there
(:mod:`lorahot.kernels.compile_mode`). cProfile then found most of the operator's remaining
body in ``triton.cdiv`` (see :func:`cdiv`), since replaced; not measured again.

It applies where the Triton version is one whose runner takes the arguments as the GPU tests
check (:data:`VERIFIED`: the constant arguments passed with the others, in signature order);
with any other, every launch goes through ``kernel[grid]`` as before.
``LORAHOT_DIRECT_LAUNCH=0`` turns it off.

Limits: Triton's own key also holds its debug and instrumentation settings (``TRITON_DEBUG``,
``knobs.runtime.debug``), read at every bound launch; a binary recorded before one of them is
changed keeps being launched. The caller makes the tensors' device current
(:func:`lorahot.kernels.device_guard.launching_on`), as Triton launches on the current device.
An argument of ``rest`` compares by value, so ``True`` and ``1`` at one position share a key:
no kernel here takes both at one position.

Shared memory: each pipeline stage of a kernel's K loop holds a copy of its tiles, which for the
LoRA kernels grow with the rank (the fused kernel's ``A`` tile is ``BLOCK_K x R_PAD``). A binary
that needs more than the device gives one program (227 KB on an H100/H200, 163 KB on an A100, 99
KB on sm86/sm89) fails to load, and Triton raises ``OutOfResources``: by the compile metadata for
sm90, the fused kernel at rank 256 on a decode of more than 12,288 outputs (258,048 bytes) and
the segmented shrink at rank 256 above 256 rows (245,760), and on sm89 the fused kernel at rank
64 on such a decode (110,592). :class:`Launcher` then launches the binary with one stage fewer,
until it fits (one stage left: the error is raised), and keeps that depth for the launch's
specialization. The stages change how far ahead the loop loads, not what it computes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["VERIFIED", "ENABLED", "available", "Launcher", "cdiv", "next_power_of_2"]

#: Triton versions (major, minor) whose compiled-kernel runner takes a kernel's arguments as
#: :class:`Launcher` passes them, checked by ``tests/unit/kernels/test_direct_launch.py`` on a GPU.
VERIFIED = ((3, 6),)

#: Whether direct launches are on (where :func:`available`): unless ``LORAHOT_DIRECT_LAUNCH=0``
#: at import.
ENABLED = os.environ.get("LORAHOT_DIRECT_LAUNCH", "1") != "0"

#: The most compiled binaries a launcher keeps runners for; past it, it starts over.
LIMIT = 4096


@functools.cache
def available() -> bool:
    """Whether launches go to the compiled binaries directly: :data:`ENABLED` and a Triton of
    :data:`VERIFIED`."""
    if not ENABLED:
        return False
    try:
        import triton
    except Exception:  # no Triton, or one this torch cannot use
        return False
    return _major_minor(triton.__version__) in VERIFIED


def _major_minor(version: str) -> tuple[int, ...]:
    parts = version.split(".")[:2]
    try:
        return tuple(int("".join(ch for ch in p if ch.isdigit()) or "-1") for p in parts)
    except ValueError:
        return ()


class Launcher:
    """Launches one Triton kernel (a ``@triton.jit`` function), each compiled binary directly
    after its first launch (see the module docstring).

    ``tensors`` must be the kernel's leading arguments, every tensor among them, and ``rest``
    the ones after them in signature order (integers, floats, booleans and the ``tl.constexpr``
    values), so that one tuple serves both ``kernel[grid]`` and the binary's runner."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self._runners: dict[tuple[Any, ...], Callable[..., Any]] = {}
        #: the stages a specialization fits the device's shared memory with, where fewer than asked
        self._stages: dict[tuple[Any, ...], int] = {}

    def __call__(
        self,
        grid: tuple[int, int, int],
        tensors: Sequence[torch.Tensor],
        rest: tuple[Any, ...],
        *,
        num_warps: int,
        num_stages: int,
        launch_pdl: bool = False,
    ) -> None:
        """Launches the kernel on the current CUDA device and stream (the caller makes the
        tensors' device current), with fewer ``num_stages`` where its binary needs more shared
        memory than the device has (see the module docstring)."""
        device = tensors[0].get_device()
        specialization = (
            rest,
            num_warps,
            num_stages,
            launch_pdl,
            device,
            tuple([t.dtype for t in tensors]),
            tuple([t.data_ptr() % 16 == 0 for t in tensors]),
        )
        stages = self._stages.get(specialization, num_stages) if self._stages else num_stages  # one dict read fewer
        if not available():
            self._bind(grid, tensors, rest, num_warps, stages, launch_pdl, specialization)
            return
        key = (grid, stages, specialization)
        runner = self._runners.get(key)
        if runner is not None:
            runner(*tensors, *rest, stream=_stream(device))
            return
        compiled, stages = self._bind(grid, tensors, rest, num_warps, stages, launch_pdl, specialization)
        if compiled is None or not hasattr(compiled, "__getitem__"):  # a Triton that returns no binary
            return
        if len(self._runners) >= LIMIT:
            self._runners.clear()
        self._runners[(grid, stages, specialization)] = compiled[grid]

    def _bind(
        self,
        grid: tuple[int, int, int],
        tensors: Sequence[torch.Tensor],
        rest: tuple[Any, ...],
        num_warps: int,
        stages: int,
        launch_pdl: bool,
        specialization: tuple[Any, ...],
    ) -> tuple[Any, int]:
        """``kernel[grid]`` with ``stages``, or the most stages below it whose binary fits the
        device's shared memory (kept for ``specialization``): ``(the binary, its stages)``."""
        while True:
            try:
                launch = self.kernel[grid]
                return launch(*tensors, *rest, num_warps=num_warps, num_stages=stages, launch_pdl=launch_pdl), stages
            except Exception as error:
                if stages <= 1 or not _out_of_shared_memory(error):
                    raise
                stages -= 1
                self._stages[specialization] = stages

    def binaries(self) -> int:
        """How many compiled binaries this launcher launches directly now."""
        return len(self._runners)


def _out_of_shared_memory(error: Exception) -> bool:
    """Whether ``error`` is Triton's refusal to load a binary that needs more shared memory than
    the device gives one program."""
    try:
        from triton.runtime.errors import OutOfResources
    except Exception:  # no Triton, or one without that error
        return False
    return isinstance(error, OutOfResources) and getattr(error, "name", None) == "shared memory"


def _stream(device: int) -> int:
    """The current CUDA stream of ``device``, as the address Triton's runners take."""
    return int(torch._C._cuda_getCurrentRawStream(device))


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``, on the host. Not ``triton.cdiv``: in Triton 3.6 that is
    a constexpr function whose call unwraps its arguments, several microseconds a call on an
    H200 host (most of the fused operator's body after its launches, by cProfile,
    ``runs/20261202T005058-launch-host-probe.log``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two at least ``n`` (1 for ``n <= 1``), on the host (see :func:`cdiv`)."""
    return 1 << max(0, n - 1).bit_length()
