"""The safetensors dtype names lorahot reads, and the torch dtype of each.

One table for the header checks (bytes per element) and the reader (the torch dtype). Which
dtypes may hold LoRA weights is the planner's business (:mod:`lorahot.runtime.plan`), so that a
wrong dtype is reported with the module it belongs to.
"""

from __future__ import annotations

import torch

__all__ = ["TORCH_DTYPES", "DTYPE_BYTES"]

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
