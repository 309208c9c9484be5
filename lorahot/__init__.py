"""lorahot: fixed-shape LoRA layers for any PyTorch model, hot-swapped in place under torch.compile.

    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=64)
    model = torch.compile(model)
    runtime.load("path/to/adapter")      # copies into preallocated buffers: no recompile
"""

from lorahot.adapter import Adapter, LoraModule
from lorahot.cache import AdapterCache, PreparedAdapter
from lorahot.errors import (
    AdapterMismatchError,
    AdapterReadError,
    LoraError,
    SourceNotFoundError,
    UnknownFormatError,
    UsageError,
)
from lorahot.inject import eject
from lorahot.layers import LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear
from lorahot.loader import read_adapter
from lorahot.runtime import AdapterInfo, LoraRuntime, inject

__all__ = [
    "inject",
    "eject",
    "read_adapter",
    "LoraRuntime",
    "AdapterInfo",
    "PreparedAdapter",
    "AdapterCache",
    "Adapter",
    "LoraModule",
    "LoRALayer",
    "LoRALinear",
    "LoRAConv",
    "LoRAEmbedding",
    "LoraError",
    "AdapterReadError",
    "UnknownFormatError",
    "AdapterMismatchError",
    "SourceNotFoundError",
    "UsageError",
]

__version__ = "0.1.0"
