"""Shared test setup: the ``gpu`` marker skips without CUDA; hypothesis profiles."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

from tests.helpers import freeze_the_heap

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)  # make test: 15 minutes on 2 cores
settings.register_profile("dev", max_examples=15, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _share_the_cores() -> None:
    """Under pytest-xdist (``make test`` runs one worker per core) each worker takes its share of
    the cores for intra-op threads, so that two workers' OpenMP pools do not fight over them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores()


def _scalar_cpu_kernels() -> None:
    """inductor's C++ kernels for the CPU without SIMD (``cpp.simdlen = 1``, no vector ISA that
    wide): the tests check what lorahot puts in a graph and what the compiled model computes, not
    how torch vectorizes a kernel, and a kernel of ``at::vec`` templates costs g++ about a fifth
    more to build (a tiny LM's compile from a cold cache: 4.8-5.0 s against 5.9-6.5 s). Triton
    kernels on CUDA are not affected."""
    import torch._inductor.config

    torch._inductor.config.cpp.simdlen = 1


_scalar_cpu_kernels()


def _no_hub_registry_request() -> None:
    """huggingface_hub (2.x) fetches an agent registry from ``{ENDPOINT}/api/agent-harnesses`` on a
    process's first request (up to 3 s), through whatever endpoint that first request uses: a
    test's stand-in Hub, stalled or not, would spend part of the timeout it checks on it, and only
    when it runs first in its worker. Pinned to the empty registry, no test makes that request."""
    try:
        from huggingface_hub.utils import _detect_agent
    except ImportError:  # an older huggingface_hub, which makes no such request
        return
    if hasattr(_detect_agent, "_registry") and hasattr(_detect_agent, "_EMPTY_REGISTRY"):
        _detect_agent._registry = _detect_agent._EMPTY_REGISTRY


_no_hub_registry_request()


def pytest_collection_finish(session: pytest.Session) -> None:
    freeze_the_heap()


@pytest.fixture
def frozen_heap() -> None:
    """For a test that collects the garbage many times: what earlier tests left alive is frozen
    too, so its collections walk only what it makes."""
    freeze_the_heap()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with empty compile caches, so recompile counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Runs a test with one intra-op thread: the tiny model's matmuls gain nothing from more,
    on a loaded 2-core machine OpenMP barriers make them 100x slower, and bitwise comparisons
    want the same kernel split every time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
