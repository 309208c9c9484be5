"""The model the probes share: TinyLlama widths (hidden 2048, MLP 5632, 32 heads, 4 KV heads),
random bf16 weights, and a random rank-``rank`` adapter in PEFT naming on all seven projections."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(
    blocks: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, rank: int = 64
) -> tuple[Callable[[], nn.Module], dict[str, torch.Tensor]]:
    """``(fresh, adapter)``: ``fresh()`` builds a new eval-mode model with the same weights each
    call; ``adapter`` maps PEFT keys to float32 CPU tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=blocks,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        proto = LlamaForCausalLM(cfg).to(dtype).eval()
    state = {k: v.clone() for k, v in proto.state_dict().items()}
    adapter = {}
    for name, mod in proto.named_modules():
        if name.split(".")[-1] in TARGETS:
            adapter[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features) * 0.02
            adapter[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank) * 0.02
    del proto

    def fresh() -> nn.Module:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype).eval()
        model.load_state_dict(state)
        return model

    return fresh, adapter
