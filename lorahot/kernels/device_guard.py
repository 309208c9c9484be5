"""The CUDA device a Triton launch runs on.

Triton launches a kernel on the *current* CUDA device and its current stream, whatever device
the tensors it is given live on. A model spread over several GPUs (a device map, pipeline
stages) calls a layer on ``cuda:1`` while ``cuda:0`` is current: the launch would then run on
the wrong device with the other device's addresses. :func:`launching_on` makes the tensors'
device current for the launch, and costs nothing more than one device query where it already is.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["launching_on"]


def launching_on(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """A context in which ``device`` (a CUDA device) is the current one: a no-op if it is."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)
