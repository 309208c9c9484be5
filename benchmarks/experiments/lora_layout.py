"""Micro-benchmark: what one decode-step LoRA layer costs under CUDA graphs, by layout.

154 Llama-shaped linear layers (in 2048 / out 2048..5632 mix), T tokens, bf16, rank 64.
Variants: base only; LoRA with A/B as strided views of a rank-major arena (lorahot today);
LoRA with contiguous per-layer A/B; LoRA with the scale folded and the add fused in addmm.
Prints ms per step (all layers) for T=1 and T=128. Not yet run in this form: an earlier
version returned only the last layer's output, so the compiler dropped the other layers and
its numbers meant nothing.
"""

import torch

torch.manual_seed(0)
dev, dt, R = "cuda", torch.bfloat16, 64
shapes = [(2048, 2048), (2048, 256), (2048, 256), (2048, 2048), (2048, 5632), (2048, 5632), (5632, 2048)] * 22
W = [torch.randn(o, i, device=dev, dtype=dt) * 0.02 for i, o in shapes]
a_width = sum(i for i, _ in shapes)
b_width = sum(o for _, o in shapes)
arenaA = torch.randn(R, a_width, device=dev, dtype=dt) * 0.02
arenaB = torch.randn(R, b_width, device=dev, dtype=dt) * 0.02
sA, sB, off_a, off_b = [], [], 0, 0
for i, o in shapes:
    sA.append(arenaA[:, off_a : off_a + i]); sB.append(arenaB[:, off_b : off_b + o]); off_a += i; off_b += o
cA = [a.contiguous() for a in sA]
cB = [b.contiguous() for b in sB]
scale = torch.tensor(0.5, device=dev)
xs = {i: None for i, _ in shapes}


def step(variant, T):
    outs = []  # every layer's output is returned, so the compiler cannot drop any layer
    for l, (i, o) in enumerate(shapes):
        x = X[T][i]
        y = x @ W[l].t()
        if variant == "strided":
            y = y + ((x @ sA[l].t()) @ sB[l]) * scale
        elif variant == "contig":
            y = y + ((x @ cA[l].t()) @ cB[l]) * scale
        elif variant == "addmm":
            y = torch.addmm(y, x @ cA[l].t(), cB[l])
        outs.append(y)
    return outs


X = {T: {i: torch.randn(T, i, device=dev, dtype=dt) for i in (2048, 5632)} for T in (1, 128)}
for T in (1, 128):
    row = []
    for variant in ("base", "strided", "contig", "addmm"):
        fn = torch.compile(lambda v=variant: step(v, T), mode="reduce-overhead")
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(30):
            e0.record(); fn(); e1.record(); torch.cuda.synchronize(); ts.append(e0.elapsed_time(e1))
        row.append(f"{variant} {sorted(ts)[15]:.3f}")
    print(f"T={T}: " + "  ".join(row), flush=True)
