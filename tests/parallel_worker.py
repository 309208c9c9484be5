"""One rank of tensor-parallel test scenarios (run by :func:`tests.parallel_helpers.run_ranks`).

``python -m tests.parallel_worker <scenario>[,<scenario>...] <rank> <world> <folder>``: joins
the gloo group through a file store in ``folder``, runs the scenarios one after the other and
writes ``<scenario>.rank<r>.json`` (check name -> ``"ok"`` or what went wrong) as each ends. The
adapters they load were written into ``folder`` by the test. Each rank builds the same model
from the same seed, keeps an unsharded copy as the reference (with its own lorahot runtime,
given the same calls) and parallelizes the other.

Scenarios of one process start from dynamo's caches emptied (``torch._dynamo.reset``), so each
compiles and counts recompiles as in a process of its own. A scenario that raises, or that
leaves the ranks unable to meet at the barrier after it, ends the run: the scenarios after it
write nothing, and their tests fail as not run instead of passing on a broken group.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import lorahot
from lorahot.layers import ShardedLoRALinear
from tests.parallel_helpers import TARGETS, tiny_llama, tp_plan

MAX_RANK = 8
#: The layers of transformers' tiny DeepSeek-V2 the tests put LoRA on.
MLA_TARGETS = ["embed_tokens", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


class Checks:
    """Named checks of one rank; a failing one records its message and the run goes on."""

    def __init__(self) -> None:
        self.results: dict[str, str] = {}

    def __call__(self, name: str, fn: Callable[[], object]) -> None:
        try:
            out = fn()
            self.results[name] = "ok" if out is None or out is True else f"failed: {out}"
        except Exception as exc:
            self.results[name] = f"raised {type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"


def same(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when ``got`` equals ``want`` to float64 rounding, else the largest difference."""
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = float((got - want).abs().max())
    return None if diff <= 1e-9 * max(1.0, float(want.abs().max())) else f"max diff {diff:.3g}"


def raises(kind: type[Exception], fn: Callable[[], object], *words: str) -> str | None:
    """None when ``fn()`` raises ``kind`` with every one of ``words`` in its message."""
    try:
        fn()
    except kind as exc:
        missing = [w for w in words if w not in str(exc)]
        return f"message lacks {missing}: {exc}" if missing else None
    except Exception as exc:
        return f"raised {type(exc).__name__} instead of {kind.__name__}: {exc}"
    return f"did not raise {kind.__name__}"


class Rig:
    """The sharded model and its unsharded reference, each with a runtime. With ``blocks=1``,
    the tiny Llama has one block and :meth:`path` names the one-block copies of ``a``, ``b`` and
    ``c`` (``a_one_block``...)."""

    def __init__(
        self, mesh: object, folder: Path, sequence_parallel: bool = False, slots: int = 2, blocks: int = 2
    ) -> None:
        from torch.distributed.tensor.parallel import parallelize_module

        self.folder, self.mesh, self.blocks = folder, mesh, blocks
        self.ref = tiny_llama(blocks=blocks)
        self.tp = copy.deepcopy(self.ref)
        parallelize_module(self.tp, mesh, tp_plan(self.tp, sequence_parallel))  # type: ignore[arg-type]
        self.sp = sequence_parallel
        self.ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(1))
        self.rt = lorahot.inject(self.tp, TARGETS, max_rank=MAX_RANK, slots=slots)
        self.rr = lorahot.inject(self.ref, TARGETS, max_rank=MAX_RANK, slots=slots)

    def both(self, call: Callable[[lorahot.LoraRuntime], object]) -> None:
        call(self.rt)
        call(self.rr)

    def parity(self) -> str | None:
        with torch.no_grad():
            got, want = self.tp(self.ids), self.ref(self.ids)
        if self.sp:  # each rank holds its share of the sequence
            rank, world = dist.get_rank(), dist.get_world_size()
            want = want.chunk(world, dim=1)[rank]
        return same(got, want)

    def compiled_parity(self) -> Callable[[], str | None]:
        """A check like :meth:`parity` that runs the sharded model compiled (``aot_eager``)."""
        compiled = torch.compile(self.tp, backend="aot_eager")
        eager = self.tp

        def parity() -> str | None:
            self.tp = compiled
            try:
                return self.parity()
            finally:
                self.tp = eager

        return parity

    def path(self, name: str) -> str:
        return str(self.folder / (name if self.blocks == 2 else f"{name}_one_block"))

    def snapshot(self) -> list[torch.Tensor]:
        tensors = [t.clone() for a in self.rt.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
        routing = self.rt.routing
        state = torch.tensor([self.rt.active_slot, *([-2] if routing is None else routing)])  # -2: no routing
        with torch.no_grad():
            return [*tensors, state, self.tp(self.ids)]

    def unchanged_output(self, before: torch.Tensor) -> str | None:
        """None when the sharded model computes ``before`` bitwise."""
        with torch.no_grad():
            return None if torch.equal(self.tp(self.ids), before) else "the output differs"

    def unchanged(self, before: list[torch.Tensor]) -> str | None:
        after = self.snapshot()
        bad = [i for i, (x, y) in enumerate(zip(before, after)) if not torch.equal(x, y)]
        return f"tensors {bad} changed" if bad else None


def scenario_parity(mesh: object, folder: Path, check: Checks) -> None:
    rig = Rig(mesh, folder)
    check("inject keeps the outputs", rig.parity)
    layer = rig.rt.layers["layers.0.mlp.down_proj"]
    check("row-parallel layer holds its columns of A", lambda: layer.lora_A.shape == (MAX_RANK, 25))
    gate = rig.rt.layers["layers.0.mlp.gate_proj"]
    check("column-parallel layer holds its rows of B", lambda: gate.lora_B.shape == (MAX_RANK, 25))
    check("layers are sharded wrappers", lambda: isinstance(layer, ShardedLoRALinear) and layer.spec.shard is not None)
    rig.both(lambda r: r.load(rig.path("a")))
    check("load", rig.parity)
    rig.both(lambda r: r.load(rig.path("b"), slot=1))
    rig.both(lambda r: r.activate(1))
    check("swap to another slot", rig.parity)
    rig.both(lambda r: r.load(rig.path("b"), slot=1, scale=-0.5))
    check("swap in place", rig.parity)
    rig.both(lambda r: r.load([rig.path("a"), rig.path("b")], slot=0, scale=[0.7, -0.4]))
    rig.both(lambda r: r.activate(0))
    check("stack", rig.parity)
    rig.both(lambda r: r.set_scale([0.2, 1.3]))
    check("set_scale of a stack", rig.parity)
    rig.both(lambda r: r.activate([0, 1, -1]))
    check("per-row routing", rig.parity)
    rig.both(lambda r: r.activate([1, -1, 0]))
    check("per-row routing rewritten", rig.parity)
    rig.both(lambda r: r.activate(0))
    rig.both(lambda r: r.preload(rig.path("c"), key="c"))
    rig.both(lambda r: r.load("c"))
    check("load from the host cache", rig.parity)
    rig.both(lambda r: r.load(["c", rig.path("a")], scale=[1.0, 0.5]))
    check("stack from the host cache and a file", rig.parity)
    rig.both(lambda r: r.unload())
    check("unload", rig.parity)
    o_proj = rig.tp.get_submodule("layers.0.self_attn.o_proj")
    check("the wrapper runs the parallelize hooks", lambda: len(o_proj._forward_pre_hooks) == 1)
    rig.both(lambda r: r.eject())
    check(
        "eject gives the hooks back",
        lambda: (
            len(o_proj._forward_pre_hooks) == 0
            and len(o_proj.base_layer._forward_pre_hooks) == 1
            and rig.tp.get_submodule("layers.0.self_attn.o_proj") is o_proj.base_layer
        ),
    )
    check("eject restores the model", rig.parity)


def scenario_atomic(mesh: object, folder: Path, check: Checks) -> None:
    rig = Rig(mesh, folder)
    rank = dist.get_rank()
    rig.both(lambda r: r.load(rig.path("a")))
    rig.both(lambda r: r.load(rig.path("b"), slot=1))
    before = rig.snapshot()
    check(
        "NaN in rank 1's slice only",
        lambda: raises(
            lorahot.AdapterReadError,
            lambda: rig.rt.load(rig.path("nan_rank1")),
            *(["rank 1"] if rank == 0 else ["NaN"]),
        ),
    )
    check("unchanged after the NaN slice", lambda: rig.unchanged(before))
    check(
        "NaN in rank 1's slice, in a stack",
        lambda: raises(lorahot.AdapterReadError, lambda: rig.rt.load([rig.path("b"), rig.path("nan_rank1")], slot=1)),
    )
    check("unchanged after the stack", lambda: rig.unchanged(before))
    check(
        "a file only rank 1 lacks",
        lambda: raises(
            lorahot.SourceNotFoundError,
            lambda: rig.rt.load(rig.path("b") if rank == 0 else rig.path("missing")),
            *(["rank 1"] if rank == 0 else []),
        ),
    )
    check("unchanged after the missing file", lambda: rig.unchanged(before))
    check("an overflowing scale", lambda: raises(lorahot.UsageError, lambda: rig.rt.load(rig.path("b"), scale=1e308)))
    check("unchanged after the scale", lambda: rig.unchanged(before))
    check(
        "an overflowing set_scale on rank 1",
        lambda: raises(
            lorahot.UsageError,
            lambda: rig.rt.set_scale(1.0 if rank == 0 else 1e308),
            "rank 1" if rank == 0 else "scale",
        ),
    )
    check("unchanged after set_scale", lambda: rig.unchanged(before))
    check(
        "an adapter for another model",
        lambda: raises(lorahot.AdapterMismatchError, lambda: rig.rt.load(rig.path("wide")), "tensor-parallel"),
    )
    check("unchanged after the mismatch", lambda: rig.unchanged(before))
    check(
        "a preload failing on rank 1",
        lambda: raises(lorahot.AdapterReadError, lambda: rig.rt.preload(rig.path("nan_rank1"), key="bad")),
    )
    check("nothing cached after it", lambda: rig.rt.cache.get("bad") is None)
    check("prefetch is refused", lambda: raises(lorahot.UsageError, lambda: rig.rt.prefetch(rig.path("a")), "preload"))
    check("a good load still works", lambda: rig.rt.load(rig.path("b")) and None)
    rig.rr.load(rig.path("b"))
    check("and computes the reference", rig.parity)
    disagreements(rig, check)
    writes_failing_on_one_rank(rig, check)
    refusals(mesh, check)
    transformers_refusals(folder, check)


def disagreements(rig: Rig, check: Checks) -> None:
    """Calls that pass every check on every rank, but would leave the ranks holding different
    adapters (another file, alpha, scale or slot on rank 1) or computing with different slots
    (another ``activate``, routing or ``unload`` on rank 1): every rank refuses with a
    UsageError naming what differs, and nothing changes; the same contents at another path
    load (the negative control). Slot 0 holds ``b`` and is active, and is left so."""
    rank = dist.get_rank()
    before = rig.snapshot()
    mine = "a" if rank == 0 else "a_values"
    cases = [
        ("another file on rank 1", lambda: rig.rt.load(rig.path(mine)), "values"),
        ("another alpha on rank 1", lambda: rig.rt.load(rig.path("a" if rank == 0 else "a_alpha")), "modules"),
        ("another scale on rank 1", lambda: rig.rt.load(rig.path("b"), scale=1.0 if rank == 0 else 0.5), "arguments"),
        ("another slot on rank 1", lambda: rig.rt.load(rig.path("b"), slot=rank), "arguments"),
        ("another set_scale on rank 1", lambda: rig.rt.set_scale(1.0 if rank == 0 else 0.7), "arguments"),
        ("a preload of another file on rank 1", lambda: rig.rt.preload(rig.path(mine), key="k"), "values"),
        ("another activate on rank 1", lambda: rig.rt.activate(rank), "arguments"),
        ("another routing on rank 1", lambda: rig.rt.activate([0, 1] if rank == 0 else [1, 0]), "arguments"),
        (  # the same entries, read per token on rank 1: a batch one rank refuses, the other runs into o_proj
            "the same routing per token on rank 1",
            lambda: rig.rt.activate([0, 0, 1, 1]) if rank == 0 else rig.rt.activate([0, 1], lengths=[2, 2]),
            "arguments",
        ),
        ("another unload on rank 1", lambda: rig.rt.unload(rank), "arguments"),
        ("an unload of every slot on rank 1 only", lambda: rig.rt.unload(0 if rank == 0 else None), "arguments"),
    ]
    for name, call, aspect in cases:
        check(name, lambda call=call, aspect=aspect: raises(lorahot.UsageError, call, aspect, "rank 1", "no rank"))
        check(f"unchanged after {name}", lambda: rig.unchanged(before))
    whole_factors(rig, check, before)
    sliced_factors(rig, check, before)
    # a check failing on rank 1 alone (it ran before the agreement there: rank 0 waited in the
    # agreement's collective until the process group timed out)
    check(
        "lengths with one slot on rank 1 only",
        lambda: raises(
            lorahot.UsageError,
            lambda: rig.rt.activate(0) if rank == 0 else rig.rt.activate(0, lengths=[3]),
            "rank 1" if rank == 0 else "lengths",
        ),
    )
    check("unchanged after lengths with one slot", lambda: rig.unchanged(before))
    check("nothing cached after the preloads", lambda: rig.rt.cache.get("k") is None)
    same = rig.path("a" if rank == 0 else "a_copy")
    check("the same contents at another path load", lambda: rig.rt.load(same) and None)
    rig.rr.load(rig.path("a"))
    check("and compute the reference", rig.parity)
    check("the same contents as a dict of tensors on rank 1 load", lambda: load_as_dict(rig, "a", rank) and None)
    check("and compute the reference from the dict", rig.parity)
    rig.rt.preload(rig.path("c"))
    if rank == 1:  # rank 0 loads from its host cache, rank 1 reads the file: the same write
        rig.rt.cache.clear()
    check("a cache hit on rank 0 and a read on rank 1 load", lambda: rig.rt.load(rig.path("c")) and None)
    rig.rr.load(rig.path("c"))
    check("and compute the reference too", rig.parity)
    rig.both(lambda r: r.load(rig.path("b")))
    extras_disagreements(rig.mesh, check)


def whole_factors(rig: Rig, check: Checks, before: list[torch.Tensor]) -> None:
    """A factor every rank holds whole (a column-parallel layer's A, a row-parallel one's B)
    that differs on rank 1 only where no sampled position looks (one element changed, or two
    swapped so that every sum of its values stays): every rank refuses, naming the key, each
    rank's file and the ranks, from a file, a stack, a preload, and rank 0's host cache against
    rank 1's read; nothing changes. Slot 0 holds ``b`` and is active."""
    rank = dist.get_rank()
    edited, swapped = ("a", "a") if rank == 0 else ("a_edited", "a_swapped")
    rig.rt.preload(rig.path("a"), key="whole_a")  # every rank caches a, agreed
    q_key, o_key = "layers.0.self_attn.q_proj.lora_A.weight", "layers.0.self_attn.o_proj.lora_B.weight"
    cases = [
        ("one element of a replicated A on rank 1", lambda: rig.rt.load(rig.path(edited)), q_key, "a_edited"),
        (
            "two elements of a replicated B swapped on rank 1",
            lambda: rig.rt.load(rig.path(swapped)),
            o_key,
            "a_swapped",
        ),
        (
            "a stack with one element changed on rank 1",
            lambda: rig.rt.load([rig.path("b"), rig.path(edited)], slot=1),
            q_key,
            "a_edited",
        ),
        (
            "a preload with one element changed on rank 1",
            lambda: rig.rt.preload(rig.path(edited), key="k"),
            q_key,
            "a_edited",
        ),
        (
            "a cached copy on rank 0 and an edited file on rank 1",
            lambda: rig.rt.load("whole_a" if rank == 0 else rig.path("a_edited"), slot=1),
            q_key,
            "a_edited",
        ),
    ]
    for name, call, key, file in cases:
        words = ("values", key, str(rig.folder / "a" / "adapter_model.safetensors"), file, "rank 1", "no rank")
        check(name, lambda call=call, words=words: raises(lorahot.UsageError, call, *words))
        check(f"unchanged after {name}", lambda: rig.unchanged(before))
    rig.rt.cache.discard("whole_a")


def sliced_factors(rig: Rig, check: Checks, before: list[torch.Tensor]) -> None:
    """Files that differ only where a rank reads its own slice (a column-parallel B's rows, a
    row-parallel A's columns; the same A with another B where every target is column-parallel):
    every rank refuses, naming the key, each rank's file and the ranks, whether the slice that
    differs is rank 0's or rank 1's, from a file, a stack, a preload, rank 0's host cache against
    rank 1's read, and a dict of tensors; nothing changes. Slot 0 holds ``b`` and is active."""
    rank = dist.get_rank()
    q_b = "layers.0.self_attn.q_proj.lora_B.weight"
    down_a, o_a = "layers.1.mlp.down_proj.lora_A.weight", "layers.0.self_attn.o_proj.lora_A.weight"

    def mine(name: str, other: str = "a") -> str:
        return rig.path(other if rank == 0 else name)

    rig.rt.preload(rig.path("a"), key="sliced_a")  # every rank caches a, agreed
    cases = [
        ("another B in rank 0's rows of a column-parallel layer on rank 1", lambda: rig.rt.load(mine("a_rows0")), q_b),
        ("another B in rank 1's rows of a column-parallel layer on rank 1", lambda: rig.rt.load(mine("a_rows1")), q_b),
        (
            "another A in rank 0's columns of a row-parallel layer on rank 1",
            lambda: rig.rt.load(mine("a_cols0")),
            down_a,
        ),
        ("another A in rank 1's columns of a row-parallel layer on rank 1", lambda: rig.rt.load(mine("a_cols1")), o_a),
        (
            "the same A with another B on rank 1, every target column-parallel",
            lambda: rig.rt.load(mine("qkv_b", "qkv")),
            "layers.0.self_attn.q_proj.lora_B.weight",
        ),
        (
            "a stack with another B in rank 0's rows on rank 1",
            lambda: rig.rt.load([rig.path("b"), mine("a_rows0")], slot=1),
            q_b,
        ),
        (
            "a preload with another A in rank 0's columns on rank 1",
            lambda: rig.rt.preload(mine("a_cols0"), key="k"),
            down_a,
        ),
        (
            "a cached copy on rank 0 and another B in rank 0's rows on rank 1",
            lambda: rig.rt.load("sliced_a" if rank == 0 else rig.path("a_rows0"), slot=1),
            q_b,
        ),
        (
            "a dict of tensors with another B in rank 0's rows on rank 1",
            lambda: load_as_dict(rig, "a_rows0", rank),
            q_b,
        ),
    ]
    for name, call, key in cases:
        words = ("values", key, "rank 0", "rank 1", "no rank", "the same files")
        check(name, lambda call=call, words=words: raises(lorahot.UsageError, call, *words))
        check(f"unchanged after {name}", lambda: rig.unchanged(before))
    rig.rt.cache.discard("sliced_a")


def load_as_dict(rig: Rig, name: str, rank: int) -> object:
    """Rank 0 loads ``a``'s file, rank 1 adapter ``name`` as a dict of its tensors (in memory,
    its config given as ``config=``)."""
    if rank == 0:
        return rig.rt.load(rig.path("a"))
    tensors = load_file(str(rig.folder / name / "adapter_model.safetensors"))
    return rig.rt.load(tensors, config={"r": 4, "lora_alpha": 8})


def extras_disagreements(mesh: object, check: Checks) -> None:
    """A LoRA bias or a DoRA magnitude that differs on rank 1, on an unsharded layer (the
    head, which takes extras; sharded layers refuse them): refused, nothing changed."""
    from torch.distributed.tensor.parallel import parallelize_module

    rank = dist.get_rank()
    model = tiny_llama()
    parallelize_module(model, mesh, tp_plan(model))  # type: ignore[arg-type]
    runtime = lorahot.inject(model, ["lm_head", "o_proj"], max_rank=4, extras=True)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g, dtype=torch.float64), torch.randn(40, 4, generator=g, dtype=torch.float64)
    for what in ("bias", "magnitude"):
        value = torch.full((40,), 1.0 if rank == 0 else 5.0, dtype=torch.float64)
        module = lorahot.LoraModule("lm_head", a, b, 4.0, **{what: value})  # type: ignore[arg-type]
        adapter = lorahot.Adapter({module.key: module}, "peft", "<memory>")
        before = [t.clone() for arena in runtime.buffers.arenas for t in (arena.A, arena.B, arena.S, arena.E)]

        def unchanged(before: list[torch.Tensor] = before) -> str | None:
            after = [t for arena in runtime.buffers.arenas for t in (arena.A, arena.B, arena.S, arena.E)]
            return None if all(torch.equal(x, y) for x, y in zip(before, after)) else "changed"

        check(
            f"another LoRA {what} on rank 1",
            lambda a=adapter: raises(lorahot.UsageError, lambda: runtime.load(a), "values", "rank 1"),
        )
        check(f"unchanged after another LoRA {what} on rank 1", unchanged)


def writes_failing_on_one_rank(rig: Rig, check: Checks) -> None:
    """A write that fails on rank 1 only, after every check passed on every rank (out of
    memory mid-write): every rank empties the slot and raises WriteError, so no rank keeps an
    adapter the others lack. Slot 0 holds ``b`` and is active."""
    rank = dist.get_rank()
    buffers = rig.rt.buffers

    def failing(method: str) -> Callable[[], object]:
        original = getattr(buffers, method)

        def write(*args: object, **kwargs: object) -> object:
            if rank != 1:
                return original(*args, **kwargs)
            buffers.touched = True  # part of the slot written, then the device fails
            raise RuntimeError("CUDA error: out of memory (simulated on rank 1)")

        def call() -> None:
            setattr(buffers, method, write)
            try:
                rig.rt.load(rig.path("a")) if method == "write_staged" else rig.rt.set_scale(0.5)
            finally:
                delattr(buffers, method)

        return call

    for method, what in (("write_staged", "load"), ("set_scales", "set_scale")):
        check(
            f"a {what} whose write fails on rank 1 only",
            lambda method=method: raises(
                lorahot.WriteError, failing(method), "rank 1 of 2" if rank == 0 else "out of memory", "emptied"
            ),
        )
        check(f"every rank emptied the slot after the {what}", lambda: None if rig.rt.info(0) is None else "not empty")
        rig.rr.unload(0)
        check(f"and computes the base model after the {what}", rig.parity)
        rig.both(lambda r: r.load(rig.path("b")))


def refusals(mesh: object, check: Checks) -> None:
    """What lorahot refuses on a sharded model, with the reason."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    model = tiny_llama()
    plan = {**tp_plan(model), "embed_tokens": RowwiseParallel(input_layouts=Replicate())}
    parallelize_module(model, mesh, plan)  # type: ignore[arg-type]

    def inject(targets: list[str], **kwargs: object) -> lorahot.LoraRuntime:
        return lorahot.inject(model, targets, max_rank=4, **kwargs)  # type: ignore[arg-type]

    check(
        "merged mode is refused", lambda: raises(lorahot.UsageError, lambda: inject(["o_proj"], merged=True), "merged")
    )
    check(
        "a sharded embedding is refused",
        lambda: raises(lorahot.UsageError, lambda: inject(["embed_tokens"]), "tensor-parallel Embedding"),
    )
    runtime = inject(["o_proj"], extras=True)
    gen = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(4, 32, generator=gen, dtype=torch.float64),
        torch.randn(32, 4, generator=gen, dtype=torch.float64),
    )
    for what, extra in (("magnitude", "DoRA"), ("bias", "LoRA bias")):
        module = lorahot.LoraModule(
            "layers.0.self_attn.o_proj", a, b, 4.0, **{what: torch.ones(32, dtype=torch.float64)}
        )
        adapter = lorahot.Adapter({module.key: module}, "peft", "<memory>")
        check(
            f"{extra} on a sharded layer is refused",
            lambda adapter=adapter, extra=extra: raises(
                lorahot.AdapterMismatchError, lambda: runtime.load(adapter), extra, "tensor-parallel"
            ),
        )


def transformers_refusals(folder: Path, check: Checks) -> None:
    """Styles of transformers' own tensor parallelism lorahot does not compute LoRA for are
    refused at inject, naming the style and the fix, and the model keeps its modules: a
    ``packed_colwise`` projection, and an ``embedding_rowwise`` embedding whose class has a
    forward of its own (as Gemma's scaled one); so is a sharded linear whose forward another
    engine set."""
    import transformers
    from transformers.distributed import DistributedConfig

    plan = {"model.layers.*.mlp.gate_proj": "packed_colwise"}
    config = DistributedConfig(tp_plan=plan, tp_size=dist.get_world_size())
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(folder / "hf_llama"), distributed_config=config, dtype=torch.float64
    )
    gate = model.model.layers[0].mlp.gate_proj
    check(
        "a packed_colwise projection is refused",
        lambda: raises(
            lorahot.UsageError,
            lambda: lorahot.inject(model, ["q_proj", "gate_proj"], max_rank=4),
            "transformers' PackedColwiseParallel",
            "not a style lorahot computes",
            "parallelize_module",
        ),
    )

    class ScaledEmbedding(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * 2.0

    model.model.embed_tokens.__class__ = ScaledEmbedding
    check(
        "an embedding transformers' tp_plan sharded whose class has a forward of its own is refused",
        lambda: raises(
            lorahot.UsageError,
            lambda: lorahot.inject(model, ["embed_tokens"], max_rank=4),
            "transformers' EmbeddingParallel (shard_dim=0) shards a ScaledEmbedding",
            "forward of its own",
            "parallelize_module",
        ),
    )
    check(
        "the model keeps its modules after the refusal",
        lambda: (model.model.layers[0].mlp.gate_proj is gate and type(gate) is torch.nn.Linear) or "wrapped",
    )
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    other = torch.nn.Sequential(torch.nn.Linear(4, 4)).double()
    parallelize_module(other, model.model.layers[0].self_attn.q_proj.weight.device_mesh, {"0": ColwiseParallel()})
    linear = other[0]
    linear.forward = lambda x: torch.nn.Linear.forward(linear, x)  # another engine's forward
    check(
        "a sharded linear with another engine's forward is refused",
        lambda: raises(
            lorahot.UsageError,
            lambda: lorahot.inject(other, ["0"], max_rank=4),
            "not one of transformers' tensor-parallel styles",
            "parallelize_module",
        ),
    )


#: c10d operators that move no data between ranks (a wait, a wrapper for autograd) or only sync them
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd", "barrier", "monitored_barrier")


class Collectives(TorchDispatchMode):
    """Records each collective a forward runs (c10d's and the functional ones): its name and the
    shape of the tensor it reduces or gathers."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        namespace, name = func.namespace, func.__name__.split(".")[0]
        if namespace in ("c10d", "_c10d_functional") and name not in _NOT_COLLECTIVES:
            first = args[0][0] if isinstance(args[0], list) else args[0]
            self.seen.append((name, tuple(first.shape)))
        return func(*args, **(kwargs or {}))


def scenario_transformers(mesh: object, folder: Path, check: Checks) -> None:
    """transformers' tiny Llama loaded sharded by its own tensor parallelism
    (``from_pretrained(distributed_config=DistributedConfig(tp_plan="auto", tp_size=2))``:
    q/k/v/gate/up ``colwise``, o/down ``rowwise``, lm_head ``colwise_gather_output``, and
    embed_tokens ``embedding_rowwise``, which transformers adds to every plan) against PEFT on the
    unsharded model, float64: load, swap, stack, set_scale, per-row routing (prefill and decode
    shapes), unload and eject; the collectives a forward runs; compiled."""
    import peft
    import transformers
    from transformers.distributed import DistributedConfig

    from lorahot.layers import StyledLoRAEmbedding, StyledLoRALinear

    path, a, b, e = (str(folder / name) for name in ("hf_llama", "hf_a", "hf_b", "hf_e"))
    oracle = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float64).eval(), a, adapter_name="a"
    )
    oracle.load_adapter(b, adapter_name="b")
    oracle.load_adapter(e, adapter_name="e")
    config = DistributedConfig(tp_plan="auto", tp_size=dist.get_world_size())
    tp = transformers.LlamaForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.float64).eval()
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))

    def logits(model: torch.nn.Module, x: torch.Tensor = ids, **kwargs: object) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=x, **kwargs).logits  # type: ignore[no-any-return]

    def weigh(weights: dict[str, float]) -> None:
        """PEFT's own per-adapter weight: ``scaling = w * alpha / r`` on every LoRA layer."""
        for module in oracle.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for name in ("a", "b", "e"):
                    if name in module.scaling:
                        module.set_scale(name, weights.get(name, 1.0))

    def peft_logits(x: torch.Tensor = ids, **weights: float) -> torch.Tensor:
        """PEFT's multi-adapter forward with ``weights``' adapters active at those weights."""
        weigh(weights)
        oracle.base_model.set_adapter(list(weights))
        return logits(oracle, x)

    def peft_rows(x: torch.Tensor, names: tuple[str, ...] = ("a", "b", "__base__")) -> torch.Tensor:
        """PEFT's mixed batch: row ``i`` with adapter ``names[i]``."""
        weigh({})
        return logits(oracle, x, adapter_names=list(names))

    def matches(want: Callable[[], torch.Tensor], x: torch.Tensor = ids) -> Callable[[], str | None]:
        return lambda: same(logits(tp, x), want())

    with torch.no_grad(), oracle.disable_adapter():
        base = logits(oracle)
    check("the sharded base model computes the unsharded one", lambda: same(logits(tp), base))
    counter = Collectives()
    with counter:
        logits(tp)
    before = sorted(counter.seen)

    def planned() -> object:
        plan = lorahot.plan_targets(a, tp)
        return (len(plan.targets) == 15 and plan.max_rank == 4) or plan

    check("plan_targets reads the whole layers", planned)
    rt = lorahot.inject(tp, [*TARGETS, "embed_tokens"], max_rank=MAX_RANK, slots=2)
    layers = {n.split(".")[-1]: rt.layers[n] for n in rt.layers}
    check(
        "the layers take the style's layout",
        lambda: (
            (
                all(isinstance(layer, StyledLoRALinear) for n, layer in layers.items() if n != "embed_tokens")
                and layers["q_proj"].spec.shard.dim == "out"  # type: ignore[union-attr]
                and layers["down_proj"].spec.shard.dim == "in"  # type: ignore[union-attr]
                and layers["lm_head"].spec.shard is None
                and tuple(layers["up_proj"].lora_B.shape) == (MAX_RANK, 24)
                and tuple(layers["o_proj"].lora_A.shape) == (MAX_RANK, 16)
                and tuple(layers["lm_head"].lora_B.shape) == (MAX_RANK, 64)
            )
            or {n: (tuple(x.lora_A.shape), tuple(x.lora_B.shape)) for n, x in layers.items()}
        ),
    )
    vocab = tp.model.embed_tokens.weight  # embedding_rowwise: the vocabulary split by rank
    check(
        "an embedding_rowwise embedding takes a whole LoRA",
        lambda: (
            (
                isinstance(layers["embed_tokens"], StyledLoRAEmbedding)
                and layers["embed_tokens"].spec.shard is None
                and tuple(layers["embed_tokens"].lora_A.shape) == (MAX_RANK, 64)
                and tuple(layers["embed_tokens"].lora_B.shape) == (MAX_RANK, 32)
                and tuple(vocab.to_local().shape) == (32, 32)  # type: ignore[attr-defined]
            )
            or (type(layers["embed_tokens"]).__name__, tuple(layers["embed_tokens"].lora_A.shape))
        ),
    )
    check("inject keeps the outputs", lambda: same(logits(tp), base))
    rt.load(e)
    check("an embedding_rowwise embedding: load", matches(lambda: peft_logits(e=1.0)))
    check(
        "an embedding_rowwise embedding: load, autograd on",
        lambda: same(tp(input_ids=ids).logits.detach(), peft_logits(e=1.0)),
    )
    rt.load(a, slot=1)
    rt.activate([0, 1, -1])
    rows = ("e", "a", "__base__")
    check("an embedding_rowwise embedding: per-row routing", matches(lambda: peft_rows(ids, rows)))
    check(
        "an embedding_rowwise embedding: per-row routing, decode rows",
        matches(lambda: peft_rows(ids[:, :1], rows), ids[:, :1]),
    )
    rt.activate(0)
    rt.load(a)
    check("load", matches(lambda: peft_logits(a=1.0)))
    check("load, autograd on", lambda: same(tp(input_ids=ids).logits.detach(), peft_logits(a=1.0)))
    counter = Collectives()
    with counter:
        logits(tp)
    extra = sorted(counter.seen)
    for item in before:
        if item in extra:
            extra.remove(item)
    tokens = ids.numel()
    check(
        "one all-reduce of [tokens, max_rank] per row-parallel layer, and nothing else",
        lambda: (
            (len(counter.seen) == len(before) + 4 and extra == [("all_reduce", (*ids.shape, MAX_RANK))] * 4)
            or f"extra {extra} ({tokens} tokens), base {before}"
        ),
    )
    rt.load(b, slot=1)
    rt.activate(1)
    check("swap to another slot", matches(lambda: peft_logits(b=1.0)))
    rt.load(b, slot=1, scale=-0.5)
    check("swap in place", matches(lambda: peft_logits(b=-0.5)))
    rt.load([a, b], slot=0, scale=[0.7, -0.4])
    rt.activate(0)
    check("stack", matches(lambda: peft_logits(a=0.7, b=-0.4)))
    rt.set_scale([0.2, 1.3])
    check("set_scale of a stack", matches(lambda: peft_logits(a=0.2, b=1.3)))
    rt.load(a)
    rt.load(b, slot=1)
    rt.activate([0, 1, -1])
    check("per-row routing", matches(lambda: peft_rows(ids)))
    decode = ids[:, :1]  # more rows than slots, one token each: every slot's shrink, each row keeping its own
    check("per-row routing, decode rows", matches(lambda: peft_rows(decode), decode))
    rt.activate(0)
    before_failure = logits(tp)
    check(
        "a file only rank 1 lacks changes no rank",
        lambda: (
            raises(lorahot.SourceNotFoundError, lambda: rt.load(b if dist.get_rank() == 0 else a + "_missing"))
            or (None if torch.equal(logits(tp), before_failure) else "changed")
        ),
    )
    for style, edited in (("colwise", "hf_a_rows0"), ("rowwise", "hf_a_cols0")):  # rank 0's slice, on rank 1
        check(
            f"a file differing in rank 0's slice of a {style} layer on rank 1 changes no rank",
            lambda edited=edited: (
                raises(
                    lorahot.UsageError,
                    lambda: rt.load(a if dist.get_rank() == 0 else str(folder / edited)),
                    "values",
                    "rank 1",
                    "no rank",
                    edited,
                )
                or (None if torch.equal(logits(tp), before_failure) else "changed")
            ),
        )
    rt.unload()
    check("unload", lambda: same(logits(tp), base))
    o_proj = rt.layers["model.layers.0.self_attn.o_proj"]
    rt.eject()
    restored = tp.get_submodule("model.layers.0.self_attn.o_proj")
    check(
        "eject restores the model",
        lambda: (
            (restored is o_proj.base_layer and "forward" in restored.__dict__ and same(logits(tp), base) is None)
            or "not restored"
        ),
    )
    plan = {"lm_head": "rowwise_split_input", "model.embed_tokens": "embedding_colwise"}
    split = DistributedConfig(tp_plan=plan, tp_size=dist.get_world_size())
    other = transformers.LlamaForCausalLM.from_pretrained(path, distributed_config=split, dtype=torch.float64)
    other_rt = lorahot.inject(other, [*TARGETS, "embed_tokens"], max_rank=MAX_RANK)
    other_rt.load(a)
    check("a rowwise_split_input head takes a whole LoRA", lambda: same(logits(other.eval()), peft_logits(a=1.0)))
    columns = other.model.embed_tokens.weight.to_local().shape  # embedding_colwise: each vector split by rank
    other_rt.load(e)
    check(
        "an embedding_colwise embedding takes a whole LoRA",
        lambda: same(logits(other), peft_logits(e=1.0)) if tuple(columns) == (64, 16) else f"local {tuple(columns)}",
    )
    only = str(folder / "hf_embedding")
    alone = transformers.LlamaForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.float64)
    alone_rt = lorahot.inject(alone.eval(), ["embed_tokens"], max_rank=MAX_RANK)
    check(
        "a load only rank 1 fails changes no rank, the embedding the only sharded target",
        lambda: (
            raises(lorahot.SourceNotFoundError, lambda: alone_rt.load(only if dist.get_rank() == 0 else only + "_x"))
            or same(logits(alone), base)
        ),
    )
    compiled_transformers(tp, a, b, e, peft_logits, check)
    mla_transformers(folder, check)
    peft_parallelized(mesh, folder, check)


def mla_transformers(folder: Path, check: Checks) -> None:
    """transformers' tiny DeepSeek-V2 loaded sharded by its tp_plan against PEFT on the unsharded
    model, float64, LoRA on every attention projection and the embedding: ``mla_kv_a_proj``
    leaves kv_a_proj_with_mqa's weight whole (its forward only marks the rope part's gradient
    for an all-reduce), so the layer takes a whole LoRA as an unsharded one does."""
    import peft
    import transformers
    from transformers.distributed import DistributedConfig

    path, adapter = str(folder / "hf_mla_model"), str(folder / "hf_mla")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    unsharded = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(unsharded, adapter)(input_ids=ids).logits
    config = DistributedConfig(tp_plan="auto", tp_size=dist.get_world_size())
    tp = transformers.DeepseekV2ForCausalLM.from_pretrained(path, distributed_config=config, dtype=torch.float64)
    rt = lorahot.inject(tp.eval(), MLA_TARGETS, max_rank=MAX_RANK)
    kv = rt.layers["model.layers.0.self_attn.kv_a_proj_with_mqa"]
    check(
        "DeepSeek-V2's mla_kv_a_proj keeps its weight whole and takes a whole LoRA",
        lambda: (
            (
                type(kv) is lorahot.LoRALinear
                and "forward" in kv.base_layer.__dict__
                and type(kv.base_layer.weight) is torch.nn.Parameter
                and tuple(kv.lora_B.shape) == (MAX_RANK, 12)
            )
            or (type(kv).__name__, type(kv.base_layer.weight).__name__, tuple(kv.lora_B.shape))
        ),
    )
    rt.load(adapter)
    with torch.no_grad():
        got = tp(input_ids=ids).logits
    check("DeepSeek-V2 sharded by its tp_plan computes PEFT on the unsharded model", lambda: same(got, want))


def compiled_transformers(
    tp: torch.nn.Module, a: str, b: str, e: str, peft_logits: Callable[..., torch.Tensor], check: Checks
) -> None:
    """The model compiled (``aot_eager``) after inject: swaps (to an adapter on the embedding too),
    stacks and scales under ``error_on_recompile``, and another input shape (the negative
    control) does recompile."""
    rt = lorahot.inject(tp, [*TARGETS, "embed_tokens"], max_rank=MAX_RANK, slots=2)
    rt.load(a)
    compiled = torch.compile(tp, backend="aot_eager")
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))

    def matches(**weights: float) -> Callable[[], str | None]:
        def parity() -> str | None:
            with torch.no_grad():
                got = compiled(input_ids=ids).logits
            return same(got, peft_logits(**weights))

        return parity

    check("compiled", matches(a=1.0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        rt.load(b)
        check("swap without recompiling", matches(b=1.0))
        rt.load(e)
        check("swap to an adapter on the embedding without recompiling", matches(e=1.0))
        rt.load([a, b], scale=[0.5, 2.0])
        check("stack without recompiling", matches(a=0.5, b=2.0))
        rt.set_scale([1.5, -1.0])
        check("set_scale without recompiling", matches(a=1.5, b=-1.0))
        check(
            "another input shape recompiles",
            lambda: raises(
                torch._dynamo.exc.RecompileError, lambda: compiled(input_ids=ids[:, :4]), "Recompiling function"
            ),
        )


def scenario_sequence(mesh: object, folder: Path, check: Checks) -> None:
    """Sequence parallelism (the norms ``SequenceParallel``, the activations between blocks
    sharded on the sequence): every runtime call as on the plain tensor-parallel model, and
    compiled."""
    rig = Rig(mesh, folder, sequence_parallel=True)
    check("inject keeps the outputs", rig.parity)
    rig.both(lambda r: r.load(rig.path("a")))
    check("load", rig.parity)
    rig.both(lambda r: r.load([rig.path("a"), rig.path("b")], scale=[0.3, 0.9]))
    check("stack", rig.parity)
    rig.both(lambda r: r.set_scale([-0.7, 1.2]))
    check("set_scale of a stack", rig.parity)
    rig.both(lambda r: r.load(rig.path("c"), slot=1))
    rig.both(lambda r: r.activate([0, 1, -1]))
    check("per-row routing", rig.parity)
    rig.both(lambda r: r.activate(0))
    rig.both(lambda r: r.preload(rig.path("b"), key="b"))
    rig.both(lambda r: r.load("b", slot=1))
    rig.both(lambda r: r.activate(1))
    check("load from the host cache", rig.parity)
    rig.both(lambda r: r.unload())
    check("unload", rig.parity)
    compiled_swaps(mesh, folder, check, sequence_parallel=True)


def scenario_compile(mesh: object, folder: Path, check: Checks) -> None:
    compiled_swaps(mesh, folder, check)


def compiled_swaps(mesh: object, folder: Path, check: Checks, sequence_parallel: bool = False) -> None:
    """The sharded model compiled (``aot_eager``) with ``a`` in slot 0: swaps, stacks,
    re-scales, a load from the host cache and per-row routing (after one compile of the per-row
    graph) under ``error_on_recompile``; another input length (the negative control) recompiles.
    The tiny Llama has one block here (tracing a DTensor model is most of the scenario's time,
    and each block is the same layers): the guards a swap must not fail are each layer's, and
    every layout of the plan, sequence-parallel or not, is in the one block and around it."""
    rig = Rig(mesh, folder, sequence_parallel=sequence_parallel, blocks=1)
    rig.both(lambda r: r.load(rig.path("a")))
    parity = rig.compiled_parity()
    check("compiled", parity)
    with torch._dynamo.config.patch(error_on_recompile=True):
        rig.both(lambda r: r.load(rig.path("b")))
        check("swap without recompiling", parity)
        rig.both(lambda r: r.load([rig.path("a"), rig.path("b")], scale=[0.5, 2.0]))
        check("stack without recompiling", parity)
        rig.both(lambda r: r.set_scale([1.5, -1.0]))
        check("set_scale without recompiling", parity)
        rig.both(lambda r: r.preload(rig.path("c"), key="c compiled"))
        rig.both(lambda r: r.load("c compiled", slot=1))
        rig.both(lambda r: r.activate(1))
        check("a load from the host cache without recompiling", parity)
        ids = rig.ids
        rig.ids = ids[:, :4]
        try:
            check(
                "another input length recompiles",
                lambda: raises(torch._dynamo.exc.RecompileError, parity, "Recompiling function"),
            )
        finally:
            rig.ids = ids
    rig.both(lambda r: r.activate([1, 0, -1]))
    check("per-row routing compiled", parity)  # the per-row graph, compiled once
    with torch._dynamo.config.patch(error_on_recompile=True):
        rig.both(lambda r: r.activate([0, -1, 1]))
        check("another routing without recompiling", parity)


def scenario_fused(mesh: object, folder: Path, check: Checks) -> None:
    """The sharded layers' fused path (the fused kernels on each rank's shards, the result
    wrapped as the base's output DTensor) on the CPU: the CUDA kernel replaced by a library
    stand-in that computes the same formula, the routed op on its own CPU path. The row-parallel
    layer with a bias keeps the library formula."""
    from lorahot.kernels import lora_linear as fused_kernel
    from lorahot.kernels import routed_linear
    from lorahot.kernels import routed_lora as routed_kernel

    calls = {"whole": 0, "routed": 0}
    routed = routed_linear.routed_lora_linear

    def whole(x, weight, bias, a, bt, scale):  # type: ignore[no-untyped-def]
        if not torch.compiler.is_compiling():  # counted eagerly; a compiled graph guards on nothing here
            calls["whole"] += 1
        return torch.nn.functional.linear(x, weight, bias) + ((x @ a.T) * scale).to(x.dtype) @ bt

    def per_row(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not torch.compiler.is_compiling():
            calls["routed"] += 1
        return routed(*args, **kwargs)

    patches = [
        (fused_kernel, "lora_linear", whole),
        (routed_linear, "routed_lora_linear", per_row),
        (fused_kernel, "supports_tensors", lambda *args: True),  # what the sharded layers ask
        (fused_kernel, "supports", lambda *args: False),  # what the unsharded reference asks: it stays library
        (routed_kernel, "available", lambda: True),
    ]
    originals = [(module, attr, getattr(module, attr)) for module, attr, _ in patches]
    for module, attr, value in patches:
        setattr(module, attr, value)
    try:
        fused_checks(mesh, folder, check, calls)
    finally:  # the scenarios after this one in the process get the library's own functions
        for module, attr, value in originals:
            setattr(module, attr, value)


def fused_checks(mesh: object, folder: Path, check: Checks, calls: dict[str, int]) -> None:
    """:func:`scenario_fused`'s checks, with the stand-ins in place."""
    rig = Rig(mesh, folder)
    sharded = {n: layer for n, layer in rig.rt.layers.items() if isinstance(layer, ShardedLoRALinear)}
    biased_rows = "layers.0.mlp.down_proj"
    check(
        "the sharded layers take the fused path, but a row-parallel one with a bias",
        lambda: (
            all(layer.fused == (n.split(".", 2)[2] != "mlp.down_proj") for n, layer in sharded.items())
            and not sharded[biased_rows].fused
        ),
    )
    rig.both(lambda r: r.load(rig.path("a")))
    check("load", rig.parity)
    check("the fused stand-in ran", lambda: calls["whole"] > 0)
    rig.both(lambda r: r.load([rig.path("a"), rig.path("b")], scale=[0.7, -0.4]))
    check("stack", rig.parity)
    rig.both(lambda r: r.set_scale([0.2, 1.3]))
    check("set_scale of a stack", rig.parity)
    rig.both(lambda r: r.load(rig.path("c"), slot=1))
    rig.both(lambda r: r.activate([0, 1, -1]))
    check("per-row routing", rig.parity)
    check("the routed op ran", lambda: calls["routed"] > 0)
    # compiled: the tiny Llama of one block, as in compiled_swaps (each block is the same layers)
    one = Rig(mesh, folder, blocks=1)
    one.both(lambda r: r.load([one.path("a"), one.path("b")], scale=[0.2, 1.3]))
    parity = one.compiled_parity()
    check("compiled", parity)
    with torch._dynamo.config.patch(error_on_recompile=True):
        one.both(lambda r: r.load(one.path("b")))
        check("swap without recompiling", parity)


def same_list(targets: object) -> str | None:
    return None if targets == ["0", "2"] else f"targets {targets}"


def scenario_empty_shard(mesh: object, folder: Path, check: Checks) -> None:
    """Four channels over three ranks (``torch.chunk``: 2, 2, 0): the last rank's shards of a
    column-parallel layer's output and a row-parallel layer's input are empty. Whole-batch and
    per-row routing equal the unsharded model (the routed product reshaped an empty shard with
    a -1 dimension and raised)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5)).double()
    tp = copy.deepcopy(ref)
    parallelize_module(tp, mesh, {"0": ColwiseParallel(use_local_output=False), "2": RowwiseParallel()})  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(3)

    def adapter(rank: int, hidden: int = 4) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, fin, fout in (("0", 6, hidden), ("2", hidden, 5)):
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fin, generator=gen)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fout, rank, generator=gen)
        return tensors

    adapters = [adapter(2), adapter(3)]
    check("plan_targets checks the whole layers", lambda: same_list(lorahot.plan_targets(adapters[0], tp).targets))
    check(
        "plan_targets refuses an adapter that fits a shard only",
        lambda: raises(lorahot.AdapterMismatchError, lambda: lorahot.plan_targets(adapter(2, hidden=2), tp), "(r, 4)"),
    )
    runtimes = [lorahot.inject(m, ["0", "2"], max_rank=4, slots=2) for m in (tp, ref)]
    for slot, tensors in enumerate(adapters):
        for runtime in runtimes:
            runtime.load(tensors, slot=slot)
    x = torch.randn(3, 6, dtype=torch.float64, generator=gen)

    def parity() -> str | None:
        with torch.no_grad():
            return same(tp(x), ref(x))

    check("an empty shard, whole batch", parity)
    for runtime in runtimes:
        runtime.activate([1, -1, 0])
    check("an empty shard, per-row routing", parity)
    gathered = torch.nn.Parameter(tp[0].base_layer.weight.full_tensor())
    check(
        "a sharded weight gathered after inject is refused",
        lambda: raises(lorahot.UsageError, lambda: setattr(tp[0], "weight", gathered), "stop being a DTensor"),
    )
    check("after the refused gathering the model computes the unsharded one", parity)
    late_after_inject(mesh, adapters[0], x, check)


def late_after_inject(mesh: object, adapter: dict[str, torch.Tensor], x: torch.Tensor, check: Checks) -> None:
    """A model parallelized after inject, on its base layers' paths (the wrappers are no
    ``nn.Linear`` to parallelize_module): refused before a weight becomes a DTensor, naming the
    layer, and the model computes what it did (the forward raised a raw RuntimeError on
    mismatched shapes, each rank adding the whole update to its shard of the output). A weight
    made a DTensor behind ``nn.Module``'s back is refused at the next load."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(1)
    late = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5)).double()
    late_runtime = lorahot.inject(late, ["0", "2"], max_rank=4)
    late_runtime.load(adapter)
    with torch.no_grad():
        before = late(x)
    for plan in (
        {"0.base_layer": ColwiseParallel(), "2.base_layer": RowwiseParallel()},
        {"2.base_layer": RowwiseParallel()},
    ):
        first = next(iter(plan)).split(".")[0]
        check(
            f"parallelizing {sorted(plan)} after inject is refused",
            lambda plan=plan, first=first: raises(
                lorahot.UsageError,
                lambda: parallelize_module(late, mesh, plan),  # type: ignore[arg-type]
                f"{first}: its base layer's weight would become a DTensor",
                "Parallelize the model before inject",
            ),
        )

        def unchanged() -> str | None:
            if any(type(p).__name__ == "DTensor" for p in late.parameters()):
                return "a weight became a DTensor"
            with torch.no_grad():
                return None if torch.equal(late(x), before) else "the output changed"

        check(f"after the refused {sorted(plan)} the model computes what it did", unchanged)
    base = late[2].base_layer
    base._parameters["weight"] = torch.nn.Parameter(distribute_tensor(base.weight.detach(), mesh, [Shard(1)]))  # type: ignore[arg-type]
    check(
        "a weight made a DTensor behind nn.Module's back is refused at the next load",
        lambda: raises(lorahot.UsageError, lambda: late_runtime.load(adapter), "parallelized", "then inject"),
    )


#: the hand-built MLP's adapters: ``(targets, rank by module, alpha by module, rsLoRA)``
LAYOUT_ADAPTERS = [
    (
        ["gate_proj", "up_proj", "down_proj"],
        {"gate_proj": 2, "up_proj": 5, "down_proj": 3},
        {"gate_proj": 4.0, "up_proj": 3.0, "down_proj": 7.0},
        False,
    ),
    (["up_proj", "down_proj"], {"up_proj": 4, "down_proj": 1}, {"up_proj": 2.0, "down_proj": 5.0}, True),
    (["down_proj"], {"down_proj": 6}, {"down_proj": 6.0}, True),
    (["gate_proj"], {"gate_proj": 6}, {"gate_proj": 3.0}, False),
]


def _whole(y: torch.Tensor) -> torch.Tensor:
    """``y`` whole: a DTensor output (``use_local_output=False``) gathered."""
    return y.full_tensor() if type(y).__name__ == "DTensor" else y  # type: ignore[attr-defined,no-any-return]


def _layout_adapter(
    model: torch.nn.Module, path: Path, ranks: dict[str, int], alphas: dict[str, float], rs: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """A PEFT adapter of another rank and alpha per module (``rank_pattern`` / ``alpha_pattern``),
    saved at ``path``; each module's ``(A, B, alpha / r)`` (``alpha / sqrt(r)`` with rsLoRA)."""
    from tests.helpers import save_peft

    gen = torch.Generator().manual_seed(3)
    tensors, factors = {}, {}
    for name, r in ranks.items():
        base = model.get_submodule(name)
        a = torch.randn(r, base.in_features, generator=gen, dtype=torch.float64)
        b = torch.randn(base.out_features, r, generator=gen, dtype=torch.float64)
        tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"] = a, b
        factors[name] = (a, b, alphas[name] / (r**0.5 if rs else r))
    first = next(iter(ranks))
    save_peft(
        path, tensors, r=ranks[first], lora_alpha=alphas[first], rank_pattern=ranks, alpha_pattern=alphas, use_rslora=rs
    )
    return factors


def _merged(
    model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]], weight: float
) -> torch.nn.Module:
    """The float64 dense reference: a copy of ``model`` with ``weight * s * B @ A`` added to each
    adapted weight."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, (a, b, s) in factors.items():
            merged.get_submodule(name).weight += weight * s * b @ a
    return merged


def scenario_layouts(mesh: object, folder: Path, check: Checks) -> None:
    """A hand-built MLP (gate/up column-parallel, down row-parallel with a bias), its outputs
    kept local or left DTensors (``use_local_output``), its hidden width even or uneven over the
    ranks, with adapters of another rank and alpha per module, rsLoRA, and targets covering some
    projections only: load, ``set_scale``, a weighted stack, per-row routing, unload, the host
    cache and eject against the float64 dense reference; then DTensor inputs a sharded layer's
    LoRA cannot compute on (:func:`misplaced_inputs`)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from tests.parallel_helpers import MLP

    rank = dist.get_rank()
    x = torch.randn(3, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    for hidden, local_columns, local_rows in (
        (22, True, True),
        (22, False, True),
        (22, True, False),
        (21, False, False),
    ):
        torch.manual_seed(0)
        ref = MLP(12, hidden).double()
        tp = copy.deepcopy(ref)
        columns = ColwiseParallel(use_local_output=local_columns)
        plan = {"gate_proj": columns, "up_proj": columns, "down_proj": RowwiseParallel(use_local_output=local_rows)}
        parallelize_module(tp, mesh, plan)  # type: ignore[arg-type]
        layout = f"hidden {hidden}, local outputs {local_columns}/{local_rows}"
        for i, (targets, ranks, alphas, rs) in enumerate(LAYOUT_ADAPTERS):
            path = folder / f"layout{i}_rank{rank}"
            factors = _layout_adapter(ref, path, ranks, alphas, rs)
            runtime = lorahot.inject(copy.deepcopy(tp), targets, max_rank=12, slots=2)
            layout_calls(f"{layout}, {targets}", runtime, ref, str(path), factors, x, check)
    misplaced_inputs(mesh, check)


def layout_calls(
    name: str,
    runtime: lorahot.LoraRuntime,
    ref: torch.nn.Module,
    path: str,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
    x: torch.Tensor,
    check: Checks,
) -> None:
    """Load, ``set_scale``, a weighted stack, per-row routing, unload, the host cache and eject
    on ``runtime``'s sharded model, each against ``ref`` with ``factors`` merged in float64."""
    model = runtime.model
    whole, scaled, stacked = (_merged(ref, factors, w) for w in (1.0, -0.6, 0.75))

    def matches(want: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], str | None]:
        def compare() -> str | None:
            with torch.no_grad():
                return same(_whole(model(x)), want(x))

        return compare

    runtime.load(path)
    check(f"{name}: load", matches(whole))
    runtime.set_scale(-0.6)
    check(f"{name}: set_scale", matches(scaled))
    runtime.load([path, path], slot=1, scale=[0.5, 0.25])
    runtime.activate(1)
    check(f"{name}: a weighted stack", matches(stacked))
    runtime.activate([0, 1, -1])
    check(f"{name}: per-row routing", matches(lambda x: torch.cat([scaled(x[:1]), stacked(x[1:2]), ref(x[2:])])))
    runtime.activate(0)
    runtime.preload(path, key="cached")
    runtime.unload()
    check(f"{name}: unload", matches(ref))
    runtime.load("cached")
    check(f"{name}: load from the host cache", matches(whole))
    runtime.eject()
    check(f"{name}: eject", matches(ref))


def misplaced_inputs(mesh: object, check: Checks) -> None:
    """A sharded linear called with a DTensor input of another placement than its style's input
    hook makes (a weight distributed without ``parallelize_module``'s hooks): the base computes
    it (DTensor redistributes), but the LoRA part reads the local tensor, so each placement other
    than ``Replicate`` (column-parallel) or ``Shard(-1)`` (row-parallel) is refused, eagerly and
    compiled. A column-parallel layer fed a batch-sharded input computed a wrong delta before."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    adapter = {
        "base_model.model.0.lora_A.weight": torch.randn(4, 12, generator=gen, dtype=torch.float64),
        "base_model.model.0.lora_B.weight": torch.randn(10, 4, generator=gen, dtype=torch.float64),
    }
    x = torch.randn(2, 12, dtype=torch.float64, generator=gen)
    for dim, fits, placement in (
        (0, True, Replicate()),
        (1, True, Shard(1)),
        (0, False, Shard(0)),
        (0, False, Shard(1)),
        (1, False, Shard(0)),
        (1, False, Replicate()),
    ):
        ref = torch.nn.Sequential(torch.nn.Linear(12, 10)).double()
        model = copy.deepcopy(ref)
        weight = distribute_tensor(model[0].weight.detach(), mesh, [Shard(dim)])  # type: ignore[arg-type]
        bias = distribute_tensor(model[0].bias.detach(), mesh, [Shard(0) if dim == 0 else Replicate()])  # type: ignore[arg-type]
        model[0].weight, model[0].bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
        for m in (model, ref):
            lorahot.inject(m, ["0"], max_rank=4).load(adapter)
        given = distribute_tensor(x, mesh, [placement])  # type: ignore[arg-type]
        name = f"a Shard({dim}) weight given a {placement!r} input"

        def run(m: torch.nn.Module = model, given: torch.Tensor = given) -> torch.Tensor:
            with torch.no_grad():
                return _whole(m(given))

        if fits:
            check(f"{name} computes the unsharded model", lambda run=run, ref=ref: same(run(), ref(x)))
            continue
        words = (f"input is a DTensor placed ({placement!r},)", "Replicate()" if dim == 0 else "Shard(-1)")
        check(f"{name} is refused", lambda run=run, words=words: raises(lorahot.UsageError, run, *words))
        compiled = torch.compile(model, backend="aot_eager")
        check(
            f"{name} is refused compiled",
            lambda c=compiled, run=run, words=words: raises(lorahot.UsageError, lambda: run(c), *words),
        )
    undeclared_sequence_sharding(mesh, adapter, check)


def undeclared_sequence_sharding(mesh: object, adapter: dict[str, torch.Tensor], check: Checks) -> None:
    """A SequenceParallel norm (its output a DTensor sharded on the sequence) before a
    ``ColwiseParallel()`` that does not declare ``input_layouts=Shard(1)``: the style's input hook
    redistributes from the declared layout only, so the layer gets the sequence-sharded DTensor,
    which the base computes right and the LoRA part refuses, naming the fix (a raw size mismatch
    before)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, SequenceParallel, parallelize_module

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.RMSNorm(12), torch.nn.Linear(12, 10)).double()
    model = copy.deepcopy(ref)
    columns = ColwiseParallel(use_local_output=False)
    parallelize_module(model, mesh, {"0": SequenceParallel(), "1": columns})  # type: ignore[arg-type]
    x = torch.randn(2, 4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mine = x.chunk(dist.get_world_size(), dim=1)[dist.get_rank()]  # SequenceParallel takes this rank's share

    def run() -> torch.Tensor:
        with torch.no_grad():
            return _whole(model(mine))

    check("an undeclared sequence-sharded input: the base model computes it", lambda: same(run(), ref(x)))
    adapter = {k.replace(".0.", ".1."): v for k, v in adapter.items()}
    lorahot.inject(model, ["1"], max_rank=4).load(adapter)
    check(
        "an undeclared sequence-sharded input is refused naming input_layouts",
        lambda: raises(lorahot.UsageError, run, "placed (Shard(dim=1),)", "input_layouts", "Shard(1)"),
    )


def peft_parallelized(mesh: object, folder: Path, check: Checks) -> None:
    """transformers' tiny Llama parallelized with ``parallelize_module`` (q/k/v/gate/up
    ColwiseParallel, o/down RowwiseParallel) against PEFT on the unsharded model, float64: an
    adapter with ``rank_pattern`` and ``alpha_pattern`` on every projection and an rsLoRA one on
    q and down (written by the test), through load, swap, a weighted stack, ``set_scale``,
    per-row routing (PEFT's ``adapter_names=``) and unload (part of :func:`scenario_transformers`)."""
    import peft
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from tests.helpers import tiny_llama as hf_llama

    base = hf_llama().double()
    x, y = str(folder / "peft_x"), str(folder / "peft_y")
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(base), x, adapter_name="x")
    oracle.load_adapter(y, adapter_name="y")
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))

    def peft_logits(rows: list[str] | None = None, **weights: float) -> torch.Tensor:
        """PEFT with ``weights``' adapters active at those weights, or ``rows``' adapter per row."""
        for module in oracle.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for name in module.scaling:
                    module.set_scale(name, weights.get(name, 1.0))
        with torch.no_grad():
            if rows is not None:
                return oracle(input_ids=ids, adapter_names=rows).logits  # type: ignore[no-any-return]
            oracle.base_model.set_adapter(list(weights))
            return oracle(input_ids=ids).logits  # type: ignore[no-any-return]

    tp = copy.deepcopy(base)
    plan: dict[str, object] = {}
    for i in range(len(tp.model.layers)):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    parallelize_module(tp, mesh, plan)  # type: ignore[arg-type]
    rt = lorahot.inject(tp, TARGETS[:-1], max_rank=12, slots=2)

    def matches(want: Callable[[], torch.Tensor]) -> Callable[[], str | None]:
        def compare() -> str | None:
            with torch.no_grad():
                return same(tp(input_ids=ids).logits, want())

        return compare

    rt.load(x)
    check("parallelize_module: load", matches(lambda: peft_logits(x=1.0)))
    rt.load(y, slot=1)
    rt.activate(1)
    check("parallelize_module: swap", matches(lambda: peft_logits(y=1.0)))
    rt.load([x, y], scale=[0.3, -1.2])
    rt.activate(0)
    check("parallelize_module: a weighted stack", matches(lambda: peft_logits(x=0.3, y=-1.2)))
    rt.set_scale([1.1, 0.4])
    check("parallelize_module: set_scale of a stack", matches(lambda: peft_logits(x=1.1, y=0.4)))
    rt.load(x)
    rt.activate([0, 1, -1])
    check("parallelize_module: per-row routing", matches(lambda: peft_logits(["x", "y", "__base__"])))
    rt.unload()
    check("parallelize_module: unload", matches(lambda: peft_logits(["__base__"] * 3)))


def scenario_one_rank(mesh: object, folder: Path, check: Checks) -> None:
    """Calls whose checks fail on rank 1 only, each a way an adapter or an argument can differ
    between ranks that :func:`scenario_atomic` does not take: a typed error on every rank (rank
    0's naming rank 1), within the process group's timeout, and every rank bitwise unchanged.
    Then a check interrupted on rank 1 (:func:`interrupted_checks`)."""
    rig = Rig(mesh, folder)
    rank = dist.get_rank()
    rig.both(lambda r: r.load(rig.path("a")))
    rig.both(lambda r: r.load(rig.path("b"), slot=1))
    rig.rt.preload(rig.path("c"), key="c")
    if rank == 1:  # the key cached on rank 0 only
        rig.rt.cache.clear()
    before = rig.snapshot()
    path = rig.path

    def mine(good: object, bad: object) -> Any:
        return good if rank == 0 else bad

    cases: list[tuple[str, type[Exception], Callable[[], object]]] = [
        (
            "a shape that fits no layer in rank 1's file",
            lorahot.AdapterMismatchError,
            lambda: rig.rt.load(path(mine("a", "shape"))),
        ),
        (
            "A of another rank than B in rank 1's file",
            lorahot.AdapterMismatchError,
            lambda: rig.rt.load(path(mine("a", "ranks"))),
        ),
        ("a module fewer in rank 1's file", lorahot.UsageError, lambda: rig.rt.load(path(mine("a", "fewer")))),
        (
            "a module no layer takes in rank 1's file",
            lorahot.AdapterMismatchError,
            lambda: rig.rt.load(path(mine("a", "extra"))),
        ),
        (
            "strict=False on rank 1 only, skipping a module",
            lorahot.UsageError,
            lambda: rig.rt.load(path(mine("a", "extra")), strict=mine(True, False)),
        ),
        (
            "NaN in rank 1's rows of a column-parallel B",
            lorahot.AdapterReadError,
            lambda: rig.rt.load(path("nan_columns")),
        ),
        ("a cache key only rank 0 holds", lorahot.UsageError, lambda: rig.rt.load("c")),
        ("a slot out of range on rank 1", lorahot.UsageError, lambda: rig.rt.load(path("a"), slot=mine(0, 5))),
        (
            "a stack of another length on rank 1",
            lorahot.UsageError,
            lambda: rig.rt.load(mine([path("a")], [path("a"), path("c")])),
        ),
        (
            "an unknown read option on rank 1",
            lorahot.UsageError,
            lambda: rig.rt.load(path("a"), **mine({}, {"bogus": 1})),
        ),
        (
            "a preload of a missing file on rank 1",
            lorahot.SourceNotFoundError,
            lambda: rig.rt.preload(path(mine("a", "missing")), key="p"),
        ),
        ("another preload key on rank 1", lorahot.UsageError, lambda: rig.rt.preload(path("a"), key=mine("p", "q"))),
        ("activate out of range on rank 1", lorahot.UsageError, lambda: rig.rt.activate(mine(0, 7))),
        ("a routing out of range on rank 1", lorahot.UsageError, lambda: rig.rt.activate(mine([0, 1, 0], [0, 9, 0]))),
        ("a routing of another length on rank 1", lorahot.UsageError, lambda: rig.rt.activate(mine([0, 1, 0], [0, 1]))),
        ("set_scale of another length on rank 1", lorahot.UsageError, lambda: rig.rt.set_scale(mine(1.0, [1.0, 2.0]))),
        ("set_scale NaN on rank 1", lorahot.UsageError, lambda: rig.rt.set_scale(mine(1.0, float("nan")))),
        ("set_scale a dict on rank 1", lorahot.UsageError, lambda: rig.rt.set_scale(mine(1.0, {"lm": 0.5}))),
        (
            "load at a dict on rank 1",
            lorahot.UsageError,
            lambda: rig.rt.load(path("a"), scale=mine(1.0, {"down": 0.0})),
        ),
        ("unload out of range on rank 1", lorahot.UsageError, lambda: rig.rt.unload(mine(0, 9))),
    ]
    for name, kind, call in cases:
        check(name, lambda kind=kind, call=call: raises(kind, call, *(["rank 1"] if rank == 0 else [])))
        check(f"unchanged after {name}", lambda: rig.unchanged(before))
    check(
        "nothing cached under the refused preloads' keys",
        lambda: rig.rt.cache.get("p") is None and rig.rt.cache.get("q") is None,
    )
    interrupted_checks(rig, check)


def interrupted_checks(rig: Rig, check: Checks) -> None:
    """A ``KeyboardInterrupt`` in rank 1's checks (the caller's path object read, a routing
    iterated): rank 1 still takes part in the ranks' agreement before its interrupt goes on, so
    rank 0 raises a UsageError naming rank 1 at once, no rank changes anything, and the process
    group serves the next call (rank 0 waited in the agreement's collective until the process
    group timed out, then raised UnexpectedError, and the group was broken)."""
    rank = dist.get_rank()
    before = rig.snapshot()

    class Interrupting(os.PathLike[str]):
        def __fspath__(self) -> str:
            raise KeyboardInterrupt

    class Rows(list[int]):
        def __iter__(self) -> Any:
            raise KeyboardInterrupt

    calls = [
        ("load", lambda: rig.rt.load(rig.path("b") if rank == 0 else Interrupting())),
        ("activate", lambda: rig.rt.activate([0, 1, -1] if rank == 0 else Rows([0, 1, -1]))),
    ]
    for what, call in calls:
        if rank == 0:
            got = raises(lorahot.UsageError, call, f"{what} was interrupted (KeyboardInterrupt) on rank 1 of 2")
        else:
            try:
                call()
                got = "returned"
            except KeyboardInterrupt:
                got = None
            except Exception as exc:
                got = f"raised {type(exc).__name__}: {exc}"
        check(f"a {what} interrupted in rank 1's checks", lambda got=got: got)
        check(f"unchanged after a {what} interrupted in rank 1's checks", lambda: rig.unchanged(before))
    rig.both(lambda r: r.load(rig.path("c")))
    check("a load after the interrupted checks computes the reference", rig.parity)


def scenario_interrupted(mesh: object, folder: Path, check: Checks) -> None:
    """A write, activate or unload interrupted (KeyboardInterrupt) or failing on rank 1 only,
    after every check passed on every rank: rank 1 still tells the others before its error goes
    on (they waited in the write's agreement for it until the process group timed out, or went
    on serving another slot than rank 1), every rank ends in the same state (the slot emptied,
    or the slot before live again), and rank 0 raises a WriteError naming rank 1."""
    rig = Rig(mesh, folder)
    rank = dist.get_rank()
    buffers = rig.rt.buffers
    with torch.no_grad():
        base = rig.tp(rig.ids)

    def on_rank_1(
        method: str, fault: BaseException, wrote: bool, call: Callable[[], object], then: Exception | None = None
    ) -> str:
        """``call()`` with ``buffers.<method>`` raising ``fault`` the first time on rank 1 (after
        writing part of a slot where ``wrote``), and ``then`` every later time if given: what it
        raised, as ``"Type: message"``."""
        original = getattr(buffers, method)
        calls = []

        def failing(*args: object, **kwargs: object) -> object:
            calls.append(1)
            if rank != 1 or (len(calls) > 1 and then is None):
                return original(*args, **kwargs)
            buffers.touched = buffers.touched or wrote
            raise fault if len(calls) == 1 else then  # type: ignore[misc]

        setattr(buffers, method, failing)
        try:
            call()
        except BaseException as exc:  # the interrupt itself is what rank 1 must raise
            return f"{type(exc).__name__}: {exc}"
        finally:
            delattr(buffers, method)
        return "returned"

    persisting = RuntimeError("device fault (simulated on rank 1, persisting)")

    def clears_failing(call: Callable[[], object]) -> Callable[[], object]:
        """``call`` with every emptying of a slot (``buffers.clear``) failing on rank 1."""

        def failing() -> object:
            def clear(*args: object, **kwargs: object) -> None:
                raise persisting

            if rank == 1:
                buffers.clear = clear  # type: ignore[method-assign]
            try:
                return call()
            finally:
                if rank == 1:
                    del buffers.clear

        return failing

    def expect(got: str, rank_0: list[str], rank_1: str | list[str]) -> str | None:
        words = (
            ["WriteError: ", "rank 1 of 2", *rank_0] if rank == 0 else [rank_1] if isinstance(rank_1, str) else rank_1
        )
        missing = [w for w in words if w not in got]
        return f"{missing} not in {got!r}" if missing else None

    def unnamed(*slots: int) -> str | None:
        named = [s for s in slots if rig.rt.info(s) is not None]
        return f"slots {named} still name an adapter" if named else None

    def recovered(*slots: int) -> str | None:
        """After the unload the error names, every rank computes the base model bitwise."""
        for s in slots:
            rig.rt.unload(s)
        return rig.unchanged_output(base)

    def fill() -> None:
        rig.both(lambda r: r.unload())
        rig.both(lambda r: r.load(rig.path("b")))
        rig.both(lambda r: r.load(rig.path("a"), slot=1))
        rig.both(lambda r: r.activate(0))

    interrupt = KeyboardInterrupt()
    fault = RuntimeError("device fault (simulated on rank 1)")

    def load() -> object:
        return rig.rt.load(rig.path("c"))

    writes = [
        ("a load interrupted mid-write", "write_staged", interrupt, True, load),
        ("a load interrupted before its first write", "write_staged", interrupt, False, load),
        ("a set_scale interrupted", "set_scales", interrupt, True, lambda: rig.rt.set_scale(0.5)),
    ]
    for name, method, exc, wrote, call in writes:
        fill()
        got = on_rank_1(method, exc, wrote, call)
        check(f"{name} on rank 1", lambda got=got: expect(got, ["KeyboardInterrupt", "emptied"], "KeyboardInterrupt"))
        check(f"every rank emptied slot 0 after {name}", lambda: None if rig.rt.info(0) is None else "not empty")
        check(f"and computes the base model bitwise after {name}", lambda: rig.unchanged_output(base))
    for name, exc, words in (
        ("an activate interrupted", interrupt, "KeyboardInterrupt"),
        ("an activate failing", fault, "device fault"),
    ):
        fill()
        with torch.no_grad():
            before = rig.tp(rig.ids)
        got = on_rank_1("activate", exc, False, lambda: rig.rt.activate(1))
        check(f"{name} on rank 1", lambda got=got, w=words: expect(got, [w, "Slot 0"], w))
        check(f"every rank serves slot 0 after {name}", lambda: None if rig.rt.active_slot == 0 else "slot 1 live")
        check(f"and computes what it did bitwise after {name}", lambda b=before: rig.unchanged_output(b))
    # putting slot 0 back fails too on rank 1: every rank says so (rank 0 put it back, but the
    # model it is part of may compute a mix), and the activate it names, on every rank, heals it
    fill()
    with torch.no_grad():
        before = rig.tp(rig.ids)
    got = on_rank_1("activate", fault, False, lambda: rig.rt.activate(1), persisting)
    again = "Call runtime.activate(0) again on every rank"
    check(
        "an activate whose putting back fails on rank 1",
        lambda: expect(got, ["putting slot 0 back failed on rank 1", again], ["WriteError: ", "putting slot 0", again]),
    )
    check(
        "and the activate it names computes what it did bitwise after it",
        lambda: rig.rt.activate(0) or rig.unchanged_output(before),
    )
    for name, exc, words in (
        ("an unload interrupted", interrupt, "KeyboardInterrupt"),
        ("an unload failing", fault, "device fault"),
    ):
        fill()
        got = on_rank_1("clear", exc, True, lambda: rig.rt.unload())
        check(f"{name} on rank 1", lambda got=got, w=words: expect(got, [w], w))
        check(
            f"every rank emptied every slot after {name}",
            lambda: None if rig.rt.info(0) is None and rig.rt.info(1) is None else "a slot is filled",
        )
        check(f"and computes the base model bitwise after {name}", lambda: rig.unchanged_output(base))
    # the second try fails too on rank 1: every rank says which slots rank 1 may still hold part
    # of, none names an adapter there, and the unload it names gives every rank the base model
    for name, slots, exc, words in (
        ("an unload interrupted whose second try fails", (0, 1), interrupt, "KeyboardInterrupt"),
        ("an unload of slot 1 failing whose second try fails", (1,), fault, "device fault"),
    ):
        fill()
        got = on_rank_1("clear", exc, True, lambda s=slots: rig.rt.unload(None if len(s) > 1 else 1), persisting)
        which = f"{'Slots' if len(slots) > 1 else 'Slot'} {', '.join(map(str, slots))} on"
        check(
            f"{name} on rank 1",
            lambda got=got, w=words, which=which: expect(
                got, [w, f"{which} rank 1 could not be emptied"], [w, f"{which} this rank could not be emptied"]
            ),
        )
        check(f"no rank names an adapter in the slots after {name}", lambda s=slots: unnamed(*s))
        check(f"and the unload it names empties every rank after {name}", lambda: recovered(0, 1))
    fill()
    got = on_rank_1("write_staged", interrupt, True, clears_failing(load))
    check(
        "a load interrupted whose emptying fails on rank 1",
        lambda: expect(
            got,
            ["KeyboardInterrupt", "emptying slot 0 failed too on rank 1"],
            ["KeyboardInterrupt", "emptying slot 0 failed too on this rank"],
        ),
    )
    check("no rank names an adapter in slot 0 after it", lambda: unnamed(0))
    check("and the unload it names empties every rank after it", lambda: recovered(0, 1))
    fill()
    rig.rr.activate(0)
    check("a load after them computes the reference", rig.parity)


def scenario_replicated_targets(mesh: object, folder: Path, check: Checks) -> None:
    """The tiny Llama parallelized, LoRA on its ``lm_head`` alone, a layer the plan leaves whole
    on every rank: the ranks agree over the mesh of the model's tensor-parallel weights as where
    a target is sharded. A load whose checks fail on rank 1 only, or another scale on rank 1,
    changes no rank (rank 0 loaded alone before, and the ranks' logits differed); a load on
    every rank computes the unsharded model."""
    rank = dist.get_rank()
    ref = tiny_llama()
    tp = copy.deepcopy(ref)
    parallelize_module_plan(tp, mesh)
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    runtimes = [lorahot.inject(m, ["lm_head"], max_rank=MAX_RANK) for m in (tp, ref)]
    gen = torch.Generator().manual_seed(3)
    adapter = {
        "base_model.model.lm_head.lora_A.weight": torch.randn(4, 32, generator=gen, dtype=torch.float64),
        "base_model.model.lm_head.lora_B.weight": torch.randn(40, 4, generator=gen, dtype=torch.float64),
    }
    nan = {k: v.clone() for k, v in adapter.items()}
    if rank == 1:
        nan["base_model.model.lm_head.lora_B.weight"][0, 0] = float("nan")
    arenas = runtimes[0].buffers.arenas
    with torch.no_grad():
        before = [*(t.clone() for a in arenas for t in (a.A, a.B, a.S, a.E)), tp(ids)]

    def unchanged() -> str | None:
        with torch.no_grad():
            after = [*(t for a in arenas for t in (a.A, a.B, a.S, a.E)), tp(ids)]
        return None if all(torch.equal(x, y) for x, y in zip(before, after)) else "changed"

    def ranks_alike() -> str | None:
        with torch.no_grad():
            out = tp(ids)
        gathered = [torch.zeros_like(out) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, out)
        return None if all(torch.equal(gathered[0], o) for o in gathered) else "the ranks' logits differ"

    words = ["rank 1"] if rank == 0 else []
    check("a load only rank 1 fails", lambda: raises(lorahot.AdapterReadError, lambda: runtimes[0].load(nan), *words))
    check("unchanged after a load only rank 1 fails", unchanged)
    check("the ranks compute alike after a load only rank 1 fails", ranks_alike)
    check(
        "another scale on rank 1",
        lambda: raises(lorahot.UsageError, lambda: runtimes[0].load(adapter, scale=0.5 if rank else 1.0), "scale"),
    )
    check("unchanged after another scale on rank 1", unchanged)
    for runtime in runtimes:
        runtime.load(adapter, scale=0.5)
    check("a load on every rank computes the unsharded model", lambda: same(tp(ids), ref(ids)))


def parallelize_module_plan(model: torch.nn.Module, mesh: object) -> None:
    """``model`` (the tiny Llama) parallelized with :func:`tests.parallel_helpers.tp_plan`."""
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, mesh, tp_plan(model))  # type: ignore[arg-type]


SCENARIOS = {
    "empty_shard": scenario_empty_shard,
    "layouts": scenario_layouts,
    "one_rank": scenario_one_rank,
    "interrupted": scenario_interrupted,
    "parity": scenario_parity,
    "atomic": scenario_atomic,
    "sequence": scenario_sequence,
    "compile": scenario_compile,
    "fused": scenario_fused,
    "replicated_targets": scenario_replicated_targets,
    "transformers": scenario_transformers,
}


def run_scenario(name: str, mesh: object, folder: Path) -> dict[str, str]:
    """Scenario ``name``'s checks; ``"scenario"`` holds what broke if it raised, or if it left
    the process's global state (default dtype, grad mode) changed for the scenarios after it."""
    check = Checks()
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    try:
        SCENARIOS[name](mesh, folder, check)
    except Exception as exc:  # the scenario itself broke: report it as a check
        check.results["scenario"] = f"raised {type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    if (torch.get_default_dtype(), torch.is_grad_enabled()) != (dtype, grad):
        check.results.setdefault("scenario", f"left the default dtype {torch.get_default_dtype()}, grad mode")
    return check.results


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    names, rank, world, folder = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    torch.set_num_threads(1)
    store = f"file://{folder / 'store'}"  # a bounded wait: a rank left alone gives up
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,))
    code = 0
    for i, name in enumerate(names):
        if i:
            torch._dynamo.reset()  # compiled graphs, guards and recompile counts of this scenario only
        start = time.monotonic()
        results = run_scenario(name, mesh, folder)
        print(f"{name}: {time.monotonic() - start:.1f} s", flush=True)
        (folder / f"{name}.rank{rank}.json").write_text(json.dumps(results))
        sys.stdout.flush()
        if "scenario" in results:  # the ranks may stand at different collectives: stop here
            code = 1
            break
        try:
            dist.barrier()  # every rank done before the next scenario (or the teardown)
        except Exception:
            traceback.print_exc()
            code = 1
            break
    if code == 0:
        dist.destroy_process_group()
    # gloo's threads could still abort the process in its static destructors ("terminate called
    # without an active exception", about one run in twenty) after everything above succeeded:
    # the results are written, so leave without running them
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
