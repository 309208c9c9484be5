"""lorahot: fixed-shape LoRA layers for any PyTorch model, hot-swapped in place under torch.compile.

    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=64)
    model = torch.compile(model)
    runtime.load("path/to/adapter")      # copies into preallocated buffers: no recompile
    runtime.load(["style/", "character/"], scale=[0.8, 0.5])  # two adapters active together
    runtime.set_scale([0.6, 1.0])        # re-weights them: no recompile

The package is layered; each folder imports only from the ones above it in this list:

- :mod:`lorahot.errors`, :mod:`lorahot.adapter`: the error hierarchy and the normalized adapter;
- :mod:`lorahot.formats`: adapter namings, one declarative table each;
- :mod:`lorahot.resolve`: matching module keys to the model's layers, user key mapping;
- :mod:`lorahot.io`: reading adapters from files, directories, mappings and the Hub;
- :mod:`lorahot.kernels`: the fused CUDA kernel;
- :mod:`lorahot.layers`: the LoRA layers and the global handles compiled graphs read;
- :mod:`lorahot.runtime`: inject, the buffer manager, load planning, stacks, the cache, merged
  mode and :class:`LoraRuntime`;
- :mod:`lorahot.cli`: ``lorahot inspect``.
"""

from lorahot.adapter import Adapter, LoraModule
from lorahot.errors import (
    AdapterMismatchError,
    AdapterReadError,
    LoraError,
    SourceNotFoundError,
    UnexpectedError,
    UnknownFormatError,
    UsageError,
    WriteError,
)
from lorahot.io import read_adapter
from lorahot.layers import LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear, ShardedLoRALinear
from lorahot.runtime import (
    AdapterCache,
    AdapterInfo,
    LoraRuntime,
    PartInfo,
    PreparedAdapter,
    TargetPlan,
    eject,
    inject,
    plan_targets,
)

__all__ = [
    "inject",
    "eject",
    "plan_targets",
    "TargetPlan",
    "read_adapter",
    "LoraRuntime",
    "AdapterInfo",
    "PartInfo",
    "PreparedAdapter",
    "AdapterCache",
    "Adapter",
    "LoraModule",
    "LoRALayer",
    "LoRALinear",
    "LoRAConv",
    "LoRAEmbedding",
    "ShardedLoRALinear",
    "LoraError",
    "AdapterReadError",
    "UnknownFormatError",
    "AdapterMismatchError",
    "SourceNotFoundError",
    "UsageError",
    "UnexpectedError",
    "WriteError",
]

__version__ = "0.1.0"
