"""The safetensors dtype names lorahot reads, and the torch dtype of each.

One table for the header checks (bytes per element) and the reader (the torch dtype). Which
dtypes may hold LoRA weights is the planner's business (:mod:`lorahot.runtime.plan`), so that a
wrong dtype is reported with the module it belongs to; a float8 tensor is widened to float32 as
it is read (:func:`widened`), so the planner never sees one.
"""

from __future__ import annotations

import torch

__all__ = ["TORCH_DTYPES", "DTYPE_BYTES", "FLOAT8_DTYPES", "widened", "widened_all"]

#: safetensors dtype name -> torch dtype.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "C64": torch.complex64, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
}  # fmt: skip

#: safetensors dtype name -> bytes per element.
DTYPE_BYTES: dict[str, int] = {name: t.itemsize for name, t in TORCH_DTYPES.items()}

#: the float8 dtypes a file or mapping may hold; each value is exactly a float32 (and a float16
#: or bfloat16) value
FLOAT8_DTYPES = frozenset(t for t in TORCH_DTYPES.values() if t.is_floating_point and t.itemsize == 1)


def widened(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a float8 ``t`` as float32: the same values exactly.

    Adapters saved in float8 (``float8_e4m3fn``, ``float8_e5m2`` and their ``fnuz`` kinds) are
    read as PEFT loads them (into its float32 parameters) and ComfyUI applies them (cast to the
    model's dtype): each value widened, nothing rounded. torch lacks float8 kernels for the
    checks and products the planner and the layers run on the CPU, so the tensor is widened once,
    where it is read; its NaN elements stay NaN and are refused as any file's are.
    """
    return t.to(torch.float32) if t.dtype in FLOAT8_DTYPES else t


def widened_all(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.dtype]]:
    """Every tensor :func:`widened`, and the dtype each widened one was stored in, by key (what
    ``lorahot inspect`` reports: the file's dtypes and bytes, not the widened copies')."""
    stored = {k: t.dtype for k, t in tensors.items() if t.dtype in FLOAT8_DTYPES}
    return {k: widened(t) for k, t in tensors.items()}, stored
