"""transformers ``generate()`` with a static KV cache, compiled, swapping LoRA adapters without
recompiling.

Builds a tiny Llama from a config (no download), writes two PEFT-style adapters on different
modules and ranks, plans one inject that covers both (:func:`lorahot.plan_targets`, from the
files' headers, for the two loaded together too), then generates greedily with adapter A, with
B, with B at half strength, with A and B stacked in one slot (then re-weighted), and with none,
printing the tokens and the recompiles after warm-up (0; the swaps run under
``torch._dynamo.config.patch(error_on_recompile=True)``).

How generate() gets compiled: ``torch.compile(model)`` returns a wrapper whose ``generate``
is the model's own, so nothing is compiled. transformers compiles the decoding step itself
when the cache is static: ``generation_config.cache_implementation = "static"`` and a
``generation_config.compile_config`` (:class:`transformers.CompileConfig`). On CUDA that is
automatic; on the CPU it is opt-in (``compile_config._compile_all_devices = True``, which this
demo sets so it runs anywhere). The prefill runs eagerly; each decoding step runs the compiled
forward, whose graph reads lorahot's buffers in place, so loads, ``activate`` and
``set_scale`` never invalidate it.

Run: ``python examples/generate_demo.py`` (CPU, well under 30 s; ``--backend inductor`` to
compile with Inductor instead of the default ``aot_eager``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

import lorahot

TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
NEW_TOKENS = 12


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()


def save_adapter(model: torch.nn.Module, directory: Path, targets: list[str], r: int, seed: int, **config) -> None:
    """A random PEFT-style adapter (adapter_model.safetensors + adapter_config.json) on ``targets``;
    ``rank_pattern`` in ``config`` gives some modules another rank."""
    g = torch.Generator().manual_seed(seed)
    pattern = config.get("rank_pattern", {})
    tensors = {}
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in targets:
            continue
        rank = next((v for k, v in pattern.items() if name.endswith(k)), r)
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g)
    directory.mkdir(parents=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": targets, **config}
    (directory / "adapter_config.json").write_text(json.dumps(cfg))


def compile_generate(model: transformers.PreTrainedModel, backend: str) -> None:
    """Static cache + compile config: generate() then compiles its decoding step."""
    model.generation_config.cache_implementation = "static"
    mode = "reduce-overhead" if model.device.type == "cuda" else "default"  # CUDA graphs on a GPU
    config = transformers.CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode=mode)
    config._compile_all_devices = True  # CUDA compiles without this; the CPU only when asked
    model.generation_config.compile_config = config


def graphs() -> int:
    """Graphs dynamo has compiled so far in this process (first compiles and recompiles)."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def main(backend: str = "aot_eager", quiet: bool = False) -> dict[str, list[int]]:
    """Runs the demo; returns the tokens generated in each step (for the smoke test)."""
    say = (lambda *a: None) if quiet else print
    torch._dynamo.reset()
    model = tiny_llama()
    prompt = torch.randint(0, TINY["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(1))

    def generate() -> list[int]:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return out[0, prompt.shape[1] :].tolist()

    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "style", Path(tmp) / "persona"
        save_adapter(model, a, ["q_proj", "v_proj"], 4, 1, rank_pattern={"layers.1.self_attn.v_proj": 16})
        save_adapter(model, b, ["k_proj", "o_proj", "down_proj"], 8, 2)

        plan = lorahot.plan_targets([a, b], model, stacked=True)  # headers and configs only; A and B together
        say(f"plan: {len(plan.targets)} targets, max_rank={plan.max_rank}")
        base = generate()  # eager, before inject: the reference for unload
        runtime = lorahot.inject(model, plan.targets, max_rank=plan.max_rank, slots=2)
        runtime.load(a, slot=0)
        runtime.load(b, slot=1)
        compile_generate(model, backend)

        start, before = time.perf_counter(), graphs()
        tokens = {"base": base, "A": generate()}  # warm-up: compiles the decoding step
        compiled = graphs() - before
        say(f"warm-up compiled {compiled} graph(s) in {time.perf_counter() - start:.1f}s")
        if compiled == 0:
            raise RuntimeError("generate() compiled nothing: check cache_implementation and compile_config")

        after_warmup = graphs()
        with torch._dynamo.config.patch(error_on_recompile=True):
            runtime.activate(1)
            tokens["B"] = generate()
            runtime.set_scale(0.5)
            tokens["B x0.5"] = generate()
            runtime.load(a, slot=1)  # a swap by load: copies into the same buffers
            tokens["A (reloaded)"] = generate()
            runtime.load([a, b], slot=1, scale=[1.0, 0.5])  # both active together
            tokens["A+B x0.5"] = generate()
            runtime.set_scale([0.25, 1.0])  # re-weighted: scales only
            tokens["A x0.25+B"] = generate()
            runtime.unload()
            tokens["unloaded"] = generate()
        recompiles = graphs() - after_warmup

    for name, ids in tokens.items():
        say(f"{name:>13}: {ids}")
    say(f"recompiles: {recompiles}")
    if recompiles:
        raise RuntimeError(f"{recompiles} recompiles after warm-up")
    if tokens["unloaded"] != tokens["base"]:
        raise RuntimeError("after unload, generate() should give the base model's tokens")
    return tokens


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backend", default="aot_eager", help="torch.compile backend (aot_eager, inductor, ...)")
    main(parser.parse_args().backend)
