"""The benchmark workload: a Llama-shaped model built from its config, and PEFT-saved adapters.

Full size is TinyLlama-1.1B's shape (22 layers, LoRA on q/k/v/o/gate/up/down = 154 layers),
bf16 on a GPU with random weights; ``small`` is a 2-layer shape that runs on a CPU.
Adapters are saved by PEFT's ``save_pretrained`` (float32, as PEFT saves them).
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = {8: 16, 16: 16, 64: 128}  # rank -> lora_alpha
MAX_RANK = 64


@dataclass
class Workload:
    config: object
    device: torch.device
    dtype: torch.dtype
    base_state: dict[str, torch.Tensor]
    adapters: dict[int, Path]
    prefill: torch.Tensor  # [1, 128] token ids
    decode: torch.Tensor  # [1, 1]

    def fresh_base(self, dtype: torch.dtype | None = None) -> torch.nn.Module:
        from transformers import LlamaForCausalLM

        with torch.device(self.device):
            model = LlamaForCausalLM(self.config).to(dtype or self.dtype).eval()
        model.load_state_dict(self.base_state)
        return model


def llama_config(small: bool) -> object:
    from transformers import LlamaConfig

    if small:
        shape = {
            "hidden_size": 128,
            "intermediate_size": 352,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 1000,
        }
    else:
        shape = {
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "vocab_size": 32000,
        }
    return LlamaConfig(**shape, use_cache=False)


def build(small: bool, device: torch.device, workdir: Path | None = None) -> Workload:
    """Builds the model once and saves one PEFT adapter per rank in :data:`RANKS`."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = llama_config(small)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    workdir = Path(workdir or tempfile.mkdtemp(prefix="lorahot-bench-"))
    adapters = {}
    for rank, alpha in RANKS.items():
        torch.manual_seed(rank)
        peft_model = get_peft_model(
            copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
        )
        with torch.no_grad():  # init B with the same spread as A so the adapter moves the output
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        adapters[rank] = workdir / f"r{rank}"
        peft_model.save_pretrained(adapters[rank])
        del peft_model
    gen = torch.Generator().manual_seed(1)
    prefill = torch.randint(0, config.vocab_size, (1, 128), generator=gen).to(device)
    decode = torch.randint(0, config.vocab_size, (1, 1), generator=gen).to(device)
    return Workload(config, device, dtype, base_state, adapters, prefill, decode)


def adapter_file(path: Path) -> str:
    return os.path.join(path, "adapter_model.safetensors")
