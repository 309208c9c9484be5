"""Tensor-parallel test helpers: a tiny Llama-shaped model, its parallelize plan, and a launcher
that runs a scenario of :mod:`tests.parallel_worker` on several CPU processes (gloo).

The launcher starts one ``python -m tests.parallel_worker`` per rank, rendezvous through a
file store in a temporary folder (no port to race for), waits with a deadline, and kills what
is left of its own processes when the deadline passes, so nothing hangs or stays behind.
Each rank writes each scenario's results (check name -> ``"ok"`` or what went wrong) as JSON.
Several scenarios can run in one pair of processes (:func:`run_group`), each under a deadline
of its own, so the interpreters' start-up (torch, lorahot, transformers) is paid once.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent

T = TypeVar("T")

#: The layers the tests put LoRA on: Llama's attention and MLP projections, and the head.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


class Attention(nn.Module):
    """Causal self-attention; heads come from the projections' width, so a rank computes its
    share of the heads when q/k/v are column-parallel."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=True)  # a bias, sharded with its outputs
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=True)  # a bias the row-parallel reduction adds once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.post_attention_layernorm = nn.RMSNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nn.Module):
    """Llama's layout (names as transformers', so PEFT keys match), two blocks, float64.
    (``parallelize_module`` needs even shards: a row-parallel input from ``from_local`` is taken
    to be ``ranks`` times its local width.)"""

    def __init__(self, vocab: int = 40, dim: int = 32, heads: int = 4, hidden: int = 50, blocks: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim, heads, hidden) for _ in range(blocks))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():  # weights large enough that every LoRA delta shows
            nn.init.normal_(p, std=1 / math.sqrt(dim)) if p.ndim > 1 else nn.init.normal_(p, 1.0, 0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


def tiny_llama(seed: int = 0, blocks: int = 2) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama(blocks=blocks).double()


def tp_plan(model: TinyLlama, sequence_parallel: bool = False) -> dict[str, object]:
    """``parallelize_module``'s plan: q/k/v/gate/up column-parallel, o/down row-parallel
    (with ``sequence_parallel``, the norms are sequence-parallel and the activations between
    blocks stay sharded on the sequence: the columns all-gather, the rows reduce-scatter)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan: dict[str, object] = {}
    for i in range(len(model.layers)):
        p = f"layers.{i}."
        col = ColwiseParallel(input_layouts=Shard(1)) if sequence_parallel else ColwiseParallel()
        row = RowwiseParallel(output_layouts=Shard(1)) if sequence_parallel else RowwiseParallel()
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + name] = col
        plan[p + "self_attn.o_proj"] = row
        plan[p + "mlp.down_proj"] = row
        if sequence_parallel:
            plan[p + "input_layernorm"] = SequenceParallel()
            plan[p + "post_attention_layernorm"] = SequenceParallel()
    if sequence_parallel:
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        plan["norm"] = SequenceParallel(use_local_output=True)
    return plan


def run_group(
    scenarios: list[str], folder: Path, world: int = 2, timeouts: dict[str, float] | None = None
) -> dict[str, list[dict[str, str]] | str]:
    """Runs ``scenarios`` of :mod:`tests.parallel_worker` one after the other in the same
    ``world`` processes; each scenario's results by rank, or (a string) why it has none: the
    ranks failed, stopped before it (a scenario before it raised, or the ranks could not meet
    after it), or were killed when its deadline passed. Each scenario has ``timeouts[name]``
    seconds (90 unless given) from the end of the one before it (the first, from the start)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = []
    for rank in range(world):
        log = open(folder / f"rank{rank}.log", "w")  # noqa: SIM115  # closed below
        cmd = [sys.executable, "-m", "tests.parallel_worker", ",".join(scenarios), str(rank), str(world), str(folder)]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))

    def done(name: str) -> bool:
        return all((folder / f"{name}.rank{r}.json").exists() for r in range(world))

    killed = None  # the scenario whose deadline passed
    try:
        current, deadline = 0, time.monotonic() + (timeouts or {}).get(scenarios[0], 90.0)
        while any(p.poll() is None for p, _ in procs):
            while current < len(scenarios) and done(scenarios[current]):
                current += 1  # the next scenario's deadline, or the teardown's once every one is done
                seconds = (timeouts or {}).get(scenarios[current], 90.0) if current < len(scenarios) else 30.0
                deadline = time.monotonic() + seconds
            if time.monotonic() > deadline:
                killed = scenarios[current] if current < len(scenarios) else None
                break
            time.sleep(0.05)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
        for proc, log in procs:
            proc.wait()
            log.close()
    logs = "\n".join(f"--- rank {r} ---\n{(folder / f'rank{r}.log').read_text()[-3000:]}" for r in range(world))
    codes = [p.returncode for p, _ in procs]
    outcome: dict[str, list[dict[str, str]] | str] = {}
    for name in scenarios:
        if done(name):
            outcome[name] = [json.loads((folder / f"{name}.rank{r}.json").read_text()) for r in range(world)]
        elif killed is not None:
            seconds = (timeouts or {}).get(killed, 90.0)
            outcome[name] = f"{name}: not run, the ranks still running {killed} after {seconds}s were killed\n{logs}"
        else:
            outcome[name] = f"{name}: not run, the ranks stopped before it (exit codes {codes})\n{logs}"
    return outcome


def run_ranks(scenario: str, folder: Path, world: int = 2, timeout: float = 90.0) -> list[dict[str, str]]:
    """Runs ``scenario`` of :mod:`tests.parallel_worker` on ``world`` processes; each rank's
    results. Raises ``AssertionError`` with the ranks' output when one fails or the deadline
    passes (the processes are killed then)."""
    outcome = run_group([scenario], folder, world, {scenario: timeout})[scenario]
    assert not isinstance(outcome, str), outcome
    return outcome


def once_per_session(name: str, base: Path, run: Callable[[Path], T]) -> T:
    """``run(folder)`` once per test session, its results shared by every pytest-xdist worker
    and every fixture that asks for them.

    The tests of a module can run on several workers at once (``--dist worksteal``), and each
    worker would start a module-scoped scenario of its own: more interpreters per rank doing the
    same work. Under xdist, ``base`` (``tmp_path_factory.getbasetemp()``) is one worker's folder
    in the session's folder: the first worker to ask runs ``run`` there under a file lock and
    writes its results (or the error it raised); the others wait on the lock and read them.
    Outside xdist, the results are kept in ``base`` the same way, for the session's other
    fixtures of the same ``name`` (the scenarios of one group)."""
    from filelock import FileLock

    shared = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "tensor_parallel"
    shared.mkdir(exist_ok=True)
    done = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            try:
                outcome: dict[str, object] = {"results": run(shared / name)}
            except AssertionError as exc:
                outcome = {"error": str(exc)}
            done.write_text(json.dumps(outcome))
    outcome = json.loads(done.read_text())
    assert "error" not in outcome, outcome.get("error")
    return outcome["results"]  # type: ignore[return-value]
