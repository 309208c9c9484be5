"""Hot-swapping LoRA adapters on a compiled model, with zero recompiles.

Builds a small transformer-like model in code, saves three adapters of different ranks as
PEFT-style safetensors directories, injects LoRA layers, compiles the model once, then swaps
between the adapters and prints how the output changes and how many times it recompiled.

Run: ``make demo`` (or ``python examples/hotswap_demo.py``); CPU, well under a minute.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import lorahot

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj", "embed"]


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.up_proj, self.down_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        attn = torch.softmax(self.q_proj(h) @ h.transpose(1, 2) / h.shape[-1] ** 0.5, dim=-1)
        x = x + attn @ self.v_proj(h)
        return x + self.down_proj(torch.relu(self.up_proj(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def save_adapter(model: nn.Module, directory: Path, rank: int, alpha: float, seed: int) -> None:
    """Writes a random PEFT-style adapter (adapter_model.safetensors + adapter_config.json)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in TARGETS):
            continue
        if isinstance(m, nn.Embedding):
            a, b = (rank, m.num_embeddings), (m.embedding_dim, rank)
            ka, kb = "lora_embedding_A", "lora_embedding_B"
        else:
            a, b = (rank, m.in_features), (m.out_features, rank)
            ka, kb = "lora_A.weight", "lora_B.weight"
        tensors[f"base_model.model.{name}.{ka}"] = torch.randn(a, generator=g) * 0.1
        tensors[f"base_model.model.{name}.{kb}"] = torch.randn(b, generator=g) * 0.1
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": TARGETS}
    (directory / "adapter_config.json").write_text(json.dumps(config))


class CountingBackend:
    """A torch.compile backend that counts graph compilations, then hands off to inductor."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compiles += 1
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)


def main() -> None:
    torch.manual_seed(0)
    model = TinyLM().eval()
    ids = torch.randint(0, 256, (2, 16))
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {}
        for i, (rank, alpha) in enumerate([(4, 8), (16, 16), (32, 64)]):
            adapters[f"r{rank}"] = Path(tmp) / f"adapter_r{rank}"
            save_adapter(model, adapters[f"r{rank}"], rank, alpha, seed=i)

        runtime = lorahot.inject(model, TARGETS, max_rank=32)
        backend = CountingBackend()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            base = compiled(ids)
        print(f"compiled once in {time.perf_counter() - t0:.1f} s; {runtime}")
        print(f"{'step':<22}{'swap ms':>9}{'|out - base|':>14}{'out[0,0,:3]':>32}")
        plan = ["r4", "r16", "r32", "r4", "unload", "r32", "scale=0.5"]
        for step in plan:
            t = time.perf_counter()
            if step == "unload":
                runtime.unload()
            elif step.startswith("scale="):
                runtime.set_scale(float(step.split("=")[1]))
            else:
                runtime.load(adapters[step])
            ms = (time.perf_counter() - t) * 1e3
            with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
                out = compiled(ids)
            head = ", ".join(f"{v:+.3f}" for v in out[0, 0, :3].tolist())
            print(f"{step:<22}{ms:>9.2f}{(out - base).abs().max().item():>14.4f}{head:>32}")
        print(f"recompiles: {backend.compiles - 1}")


if __name__ == "__main__":
    main()
