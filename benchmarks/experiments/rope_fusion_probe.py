"""Whether a q/k/v group's sums in one buffer (:data:`lorahot.kernels.wide_groups.ONE_BUFFER`)
save launches, across Llama shapes: the kernels inductor writes in default mode for one call of
a two-block transformers Llama (KV cache on, transformers' default; every projection injected,
rank 8), with the switch on and off.

Measured on an H200 (torch 2.11, 2026-12-02, ``runs/20261202T174000-rope-fusion-probe.log``):
with the cache on, one buffer launched 41 against 39 at hidden 32, 64 and 256 (16 rows), 37
against 35 at hidden 128, and 35 against 35 at one row: with the cache, the compiler fused the
separate sums into attention's input kernels itself. Without the cache (the forward suite's
model, ``use_cache=False``) the probe ``grouped_probe`` measured one launch fewer per block.

    PYTHONPATH=. python3 -m benchmarks.experiments.rope_fusion_probe
"""

from __future__ import annotations

import re

import torch

import lorahot
from lorahot.kernels import wide_groups
from tests.helpers import make_adapter

NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: (hidden, heads, KV heads, rows)
SHAPES = ((32, 4, 2, 16), (128, 2, 1, 16), (128, 2, 1, 1), (256, 4, 2, 16), (64, 8, 2, 16))


def main() -> None:
    import transformers
    from torch._inductor.utils import run_and_get_code

    for hidden, heads, kv, rows in SHAPES:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=64,
        )
        model = transformers.LlamaForCausalLM(config).eval().cuda().to(torch.bfloat16)
        runtime = lorahot.inject(model, NAMES, max_rank=8, extras=False)
        ranks = {n: 8 for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in NAMES}
        runtime.load(make_adapter(model, ranks, seed=0)[0])
        ids = torch.randint(0, 64, (1, rows), device="cuda")
        for on in (True, False):
            wide_groups.ONE_BUFFER = on
            torch._dynamo.reset()
            with torch.no_grad():
                _, code = run_and_get_code(torch.compile(model, fullgraph=True), input_ids=ids)
            src = "\n".join(code)
            launches = src.count(".run(") + src.count("extern_kernels.")
            print(f"hd {hidden // heads} hidden {hidden} rows {rows} one_buffer {on}: launches {launches}", flush=True)
            for name in re.findall(r"(triton_\w+)\.run\(", src):
                print("    ", name[:110])


if __name__ == "__main__":
    main()
