"""Probe: loads from file with the runtime's read buffers (``lorahot/io/read_buffers.py``) and
without, in one process.

The workload of ``swap_host_probe`` (TinyLlama-shaped, 154 layers, max_rank 64, float32 PEFT
files of ranks 8 / 16 / 64, the model in bfloat16). Per round and rank: the median of
``PROBE_REPS`` ``runtime.load(path)`` with the buffers, then with the runtime's buffers taken
away (every read allocates, as before them, and the kept plans keep their values). On the CPU
a fresh buffer over 32 MB is mapped anew by the allocator on every read; on a GPU the first
loads of a size call ``cudaHostAlloc`` and ``cudaMalloc``.

    PYTHONPATH=. python -m benchmarks.experiments.read_buffers_probe

Environment: ``PROBE_WORKDIR`` (the adapters, as for ``swap_host_probe``), ``PROBE_REPS`` (15),
``PROBE_ROUNDS`` (3), ``PROBE_THREADS`` (1).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import lorahot
from benchmarks.experiments.swap_host_probe import MAX_RANK, TARGETS, median_ms, model_and_adapters


def main() -> None:
    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "1")))
    reps, rounds = int(os.environ.get("PROBE_REPS", "15")), int(os.environ.get("PROBE_ROUNDS", "3"))
    model, adapters = model_and_adapters(
        torch.bfloat16, Path(os.environ.get("PROBE_WORKDIR", "/tmp/lorahot-swap-host"))
    )
    model = model.cuda() if torch.cuda.is_available() else model
    runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK)
    buffers = runtime._read_buffers
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for rnd in range(rounds):
        for rank in (8, 16, 64):
            row = []
            for on in (True, False):
                runtime._read_buffers = buffers if on else None
                row.append(median_ms(lambda: (runtime.load(adapters[rank]), sync()), reps))
            print(f"round {rnd} r{rank}: with the buffers {row[0]:.2f} ms, without {row[1]:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
