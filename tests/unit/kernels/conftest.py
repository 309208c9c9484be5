"""Fixtures of the kernel tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch._inductor import config as inductor_config


@pytest.fixture
def fresh_compiler() -> Iterator[None]:
    """No compiled code from another test or an earlier run (a graph from inductor's on-disk
    cache skips the post-grad passes), and inductor's pass slot as it was afterwards: for the
    tests of the compiler passes (``pytest.mark.usefixtures("fresh_compiler")``)."""
    torch._dynamo.reset()
    with (
        inductor_config.patch(post_grad_custom_pre_pass=None, joint_custom_post_pass=None, fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        yield
    torch._dynamo.reset()
