"""Reading the tensors of a checked safetensors file in one pass, optionally onto a GPU.

After :func:`lorahot.io.safety.check_safetensors` has validated the header (every tensor tiles
the data section exactly), the whole data section is read with a few large positioned reads
into one buffer (pinned when the tensors are headed for a GPU), copied to the device in one
transfer if asked, and every tensor becomes a view of that buffer. Nothing is unpickled, and
no per-tensor allocation or transfer happens.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from lorahot.errors import AdapterReadError
from lorahot.io.dtypes import TORCH_DTYPES
from lorahot.io.safety import SafetensorsHeader

__all__ = ["read_tensors"]


_CHUNK = 16 << 20  # bytes per positioned read; several run at once for large files


def read_tensors(path: Path, header: SafetensorsHeader, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` as a view of one buffer, on ``device`` (default: the CPU).

    Raises:
        AdapterReadError: the file changed or shrank since its header was checked.
    """
    on_gpu = device is not None and device.type == "cuda"
    buf = torch.empty(header.data_size, dtype=torch.uint8, pin_memory=on_gpu)
    if header.data_size:
        _read_into(path, header.data_start, buf)
    if device is not None and device.type != "cpu":
        buf = buf.to(device, non_blocking=on_gpu)
    typed: dict[str, torch.Tensor] = {}
    return {k: _view(buf, typed, *entry) for k, entry in header.entries.items()}


def _read_into(path: Path, start: int, buf: torch.Tensor) -> None:
    """Fills ``buf`` from ``path`` at ``start`` with large positioned reads, several at once."""
    view = memoryview(buf.numpy()).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers
    spans = [(off, min(_CHUNK, len(view) - off)) for off in range(0, len(view), _CHUNK)]
    fd = os.open(path, os.O_RDONLY)

    def read(span: tuple[int, int]) -> int:
        off, size = span
        return os.preadv(fd, [view[off : off + size]], start + off)

    try:
        got = list(_readers().map(read, spans)) if len(spans) > 1 else [read(spans[0])]
    except OSError as exc:
        raise AdapterReadError(f"{path}: cannot read the tensor data ({exc}). Re-download the adapter.") from None
    finally:
        os.close(fd)
    if got != [size for _, size in spans]:
        raise AdapterReadError(
            f"{path}: the file is shorter than its header says (changed while reading?). Re-download the adapter."
        )


@functools.cache
def _readers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=4, thread_name_prefix="lorahot-read")


def _view(
    buf: torch.Tensor, typed: dict[str, torch.Tensor], dtype: str, shape: tuple[int, ...], begin: int, end: int
) -> torch.Tensor:
    """Tensor ``[begin, end)`` of ``buf`` as ``dtype`` and ``shape`` (a copy if misaligned).

    ``typed`` memoizes ``buf`` reinterpreted as each dtype, so that an aligned tensor costs one
    ``as_strided`` instead of a slice and two views (308 tensors: about 1 ms on a CPU).
    """
    t = TORCH_DTYPES[dtype]
    size = t.itemsize
    if begin % size:
        return buf[begin:end].clone().view(t).view(shape)  # a view must start on an element boundary
    whole = typed.get(dtype)
    if whole is None:
        whole = typed[dtype] = buf[: len(buf) - len(buf) % size].view(t)
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return whole.as_strided(shape, strides, begin // size)
