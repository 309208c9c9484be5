"""The runtime side: wrap a model's modules, own their buffers, and load adapters into them.

- :mod:`~lorahot.runtime.targets`: which modules take LoRA; wrapping and unwrapping them;
- :mod:`~lorahot.runtime.inject`: :func:`inject` and :func:`eject`;
- :mod:`~lorahot.runtime.components`: one runtime over several models (a pipeline's components);
- :mod:`~lorahot.runtime.buffers`: the rank-padded buffer manager (one arena per device and dtype);
- :mod:`~lorahot.runtime.plan`: every check of a load, before anything is written;
- :mod:`~lorahot.runtime.sharding`: an adapter's part for one rank of a tensor-parallel model;
- :mod:`~lorahot.runtime.agreement`: the ranks of a tensor-parallel model agree before each write;
- :mod:`~lorahot.runtime.fingerprint`: digests of what a write would put on a rank, which they compare;
- :mod:`~lorahot.runtime.stack`: several adapters in one slot, their rows side by side;
- :mod:`~lorahot.runtime.updates`: each slot's update (a stack's summed) within its dtype's range at the user's weights;
- :mod:`~lorahot.runtime.union`: :func:`plan_targets`, the targets and max_rank covering a set of adapters;
- :mod:`~lorahot.runtime.cache`: prepared adapters in host memory;
- :mod:`~lorahot.runtime.aliases`: an adapter's tensors that share memory with what a load writes, copied first;
- :mod:`~lorahot.runtime.experts`: which layers are a mixture-of-experts block's experts (by name or structure);
- :mod:`~lorahot.runtime.towers`: which layers are a multimodal model's vision tower;
- :mod:`~lorahot.runtime.module_paths`: whether a module path lies under one of a set (a lookup per level);
- :mod:`~lorahot.runtime.merge`: merged mode;
- :mod:`~lorahot.runtime.peft_arguments`, :mod:`~lorahot.runtime.assigned_loads`,
  :mod:`~lorahot.runtime.embedding_resize`, :mod:`~lorahot.runtime.fused_projections`: hooks
  that refuse PEFT's per-call arguments, a ``load_state_dict(assign=True)`` a layer would
  refuse, transformers' ``resize_token_embeddings`` over wrapped embeddings and diffusers' QKV
  fusion of wrapped projections, up front, each releasing what it changed through
  :mod:`~lorahot.runtime.hooked`;
- :mod:`~lorahot.runtime.lora_runtime`: :class:`LoraRuntime` (load, stack, activate, scale, unload).
"""

from lorahot.runtime.cache import AdapterCache, PreparedAdapter
from lorahot.runtime.inject import eject, inject
from lorahot.runtime.lora_runtime import AdapterInfo, LoraRuntime, PartInfo
from lorahot.runtime.union import TargetPlan, plan_targets

__all__ = [
    "inject",
    "eject",
    "plan_targets",
    "TargetPlan",
    "LoraRuntime",
    "AdapterInfo",
    "PartInfo",
    "AdapterCache",
    "PreparedAdapter",
]
