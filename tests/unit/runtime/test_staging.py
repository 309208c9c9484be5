"""Host-to-device uploads through a staging buffer (lorahot.runtime.staging): the copies land,
and on CUDA they are queued without waiting for the work before them."""

from __future__ import annotations

import time

import pytest
import torch

from lorahot.runtime.staging import Staging


def test_copies_land_and_the_buffer_can_be_reused() -> None:
    staging = Staging(6, torch.int64, torch.device("cpu"))
    a, b = torch.zeros(2, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    for first in (1, 7):
        host = staging.acquire()
        host.copy_(torch.arange(first, first + 6))
        staging.send([(a, host[:2]), (b, host[2:])])
        assert a.tolist() == [first, first + 1] and b.tolist() == list(range(first + 2, first + 6))


@pytest.mark.gpu
def test_gpu_upload_is_queued_behind_the_stream_without_waiting_for_it() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    staging = Staging(4, torch.float32, torch.device("cuda"))
    assert staging.buffer.is_pinned()
    dst = torch.zeros(4, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # keeps the stream busy for a while (about 0.1 s)
    start = time.perf_counter()
    staging.acquire().copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    staging.send([(dst, staging.buffer)])
    queued = time.perf_counter() - start
    staging.acquire()  # waits for the upload itself
    waited = time.perf_counter() - start
    assert queued < waited / 4, (queued, waited)  # send returned long before the stream got there
    assert dst.tolist() == [1.0, 2.0, 3.0, 4.0]
