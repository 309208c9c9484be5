"""Concurrency: background threads prepare adapters while the main thread swaps and runs.

The threading contract (README, "Guarantees"): ``preload``, ``prefetch`` and the host cache
may be used from any thread; ``load``, ``activate``, ``unload``, ``set_scale`` and forward
passes are issued from one thread at a time. Under that contract no forward ever sees a mix
of two adapters: each output is bitwise the reference output of exactly one adapter, the one
the main thread put in the active slot.
"""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

import pytest
import torch

import lorahot
from tests.helpers import make_adapter, tiny_lm, token_ids
from tests.reliability_helpers import DOWN0, EMB, Q0, TARGETS, V1, VOCAB, report, within, write_valid

_ALL = (Q0, V1, DOWN0, EMB)
_ADAPTERS = [(1, _ALL), (8, _ALL), (4, (Q0, V1)), (2, (EMB,)), (8, (DOWN0,)), (6, _ALL)]
STEPS = 300
#: one intra-op thread, so bitwise comparisons see the same kernels while other threads work
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _state(model: torch.nn.Module, runtime: lorahot.LoraRuntime) -> list[torch.Tensor]:
    """Copies of every parameter and buffer of ``model`` and every arena of ``runtime``."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
    return [t.detach().clone() for t in tensors]


def test_background_preload_and_prefetch_while_swapping(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    model = tiny_lm(seed=2, vocab=VOCAB)
    x = token_ids((2, 6), VOCAB, seed=2)
    paths = [
        write_valid(tmp_path / f"a{i}", model, dict.fromkeys(names, r), seed=20 + i)
        for i, (r, names) in enumerate(_ADAPTERS)
    ]
    runtime = lorahot.inject(model, TARGETS, max_rank=8, slots=2)

    def output() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    refs = {}
    for p in paths:
        runtime.load(p, slot=0)
        refs[p] = output()
    assert not any(torch.equal(r, u) for i, r in enumerate(refs.values()) for u in list(refs.values())[i + 1 :])
    # room for about half the adapters, so entries are evicted and re-read while in use
    one = runtime.preload(paths[1]).nbytes
    runtime.cache.clear()
    runtime.cache.budget_bytes = 3 * one

    stop, failures = threading.Event(), []
    prepared = {"preload": 0, "prefetch": 0}

    def background(kind: str, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                p = rng.choice(paths)
                if kind == "preload":
                    runtime.preload(p)
                else:
                    runtime.prefetch(p).result()
                prepared[kind] += 1
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [
        threading.Thread(target=background, args=(k, i), daemon=True) for i, k in enumerate(("preload", "prefetch"))
    ]
    for t in threads:
        t.start()
    rng, forwards = random.Random(0), 0
    try:
        for step in range(STEPS):
            active, other = step % 2, 1 - step % 2
            p, q = rng.choice(paths), rng.choice(paths)
            runtime.load(p, slot=active)  # a cache hit prepared by another thread, or a read
            runtime.activate(active)
            y = output()
            runtime.load(q, slot=other)  # filling the inactive slot must not show
            z = output()
            forwards += 2
            for out in (y, z):
                assert torch.equal(out, refs[p]), f"step {step}: output is not adapter {paths.index(p)}'s"
                assert sum(torch.equal(out, r) for r in refs.values()) == 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not failures, failures
    assert prepared["preload"] > 0 and prepared["prefetch"] > 0, "the background threads never overlapped the swaps"
    assert runtime.cache.nbytes <= runtime.cache.budget_bytes
    report(
        request.config,
        "concurrency",
        {"steps": STEPS, "forwards": forwards, "background": prepared, "cache_entries_at_end": len(runtime.cache)},
    )


def test_prefetched_adapter_is_loaded_whole(tmp_path: Path) -> None:
    """``prefetch`` returns a future; loading its result while the next prefetch runs is a
    plain copy of a fully prepared adapter."""
    model = tiny_lm(seed=3, vocab=VOCAB)
    x = token_ids((2, 6), VOCAB, seed=3)
    paths = [
        write_valid(tmp_path / f"a{i}", model, dict.fromkeys(names, r), seed=30 + i)
        for i, (r, names) in enumerate(_ADAPTERS)
    ]
    runtime = lorahot.inject(model, TARGETS, max_rank=8, slots=1)
    refs = []
    for p in paths:
        runtime.load(p)
        with torch.no_grad():
            refs.append(model(x))
    runtime.cache.clear()
    future = runtime.prefetch(paths[0])
    for i in range(3 * len(paths)):
        ready = future.result()
        future = runtime.prefetch(paths[(i + 1) % len(paths)])  # prepares while we swap and run
        runtime.load(ready)
        with torch.no_grad():
            assert torch.equal(model(x), refs[i % len(paths)])
    future.result()


@pytest.mark.parametrize("second", ["load", "set_scale"])
def test_calls_from_two_threads_run_one_after_the_other(second: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load``, ``activate``, ``unload`` and ``set_scale`` from two threads run one after the
    other. Merged mode folds the live region into the weights once a load has written it; here
    the main thread's fold waits until the other thread's call is done (at most 0.5 s: under the
    call lock that call cannot begin before the load is done). Interleaved, the
    fold used to apply the load's scales to the second adapter's factors (or the scales before
    the ``set_scale``): weights other than those ``info`` named. Now the output is bitwise the
    reference of what ``info`` says the slot holds."""
    from lorahot.runtime import merge

    model = tiny_lm(seed=4, vocab=VOCAB)
    x = token_ids((2, 6), VOCAB, seed=4)
    runtime = lorahot.inject(model, TARGETS, max_rank=8, merged=True)
    names = list(runtime.layers)
    preps = [runtime.preload(make_adapter(model, dict.fromkeys(names, r), seed=40 + r)[0]) for r in (8, 2)]
    refs = {}
    for i, p in enumerate(preps):
        for scale in (1.0, 0.5):
            runtime.load(p, scale=scale)
            with torch.no_grad():
                refs[i, scale] = model(x)
    runtime.unload()
    main, folding, done = threading.current_thread(), threading.Event(), threading.Event()
    apply = merge.Merger.apply

    def held_fold(self: merge.Merger, *args: object, **kwargs: object) -> None:
        if threading.current_thread() is main:
            folding.set()
            done.wait(0.5)
        apply(self, *args, **kwargs)

    def call() -> None:
        folding.wait(10)
        runtime.load(preps[1]) if second == "load" else runtime.set_scale(1.0)
        done.set()

    monkeypatch.setattr(merge.Merger, "apply", held_fold)
    other = threading.Thread(target=call, daemon=True)
    other.start()
    runtime.load(preps[0], scale=0.5)
    other.join(10)
    assert not other.is_alive()
    info = runtime.info()
    held = 0 if max(info.ranks.values()) == 8 else 1
    assert (held, info.scale) == ((1, 1.0) if second == "load" else (0, 1.0))
    with torch.no_grad():
        assert torch.equal(model(x), refs[held, info.scale])


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("inner", ["load", "set_scale", "unload", "activate"])
def test_a_runtime_call_from_code_a_load_runs_is_refused(inner: str, merged: bool) -> None:
    """A source whose mapping methods call the runtime (on the load's own thread, under its
    reentrant call lock): a nested ``load`` waited forever for the read buffers its own thread
    held (unmerged), and the other nested calls ran inside the load, between its reads and its
    writes (for a stack, between one part's checks and the next part's read).
    Now the nested call is refused with a UsageError, nothing changes (every parameter, buffer
    and arena bitwise as before), and the slot keeps its adapter."""
    model = tiny_lm(seed=5, vocab=VOCAB)
    x = token_ids((2, 6), VOCAB, seed=5)
    runtime = lorahot.inject(model, TARGETS, max_rank=8, slots=2, merged=merged)
    held, _ = make_adapter(model, {Q0: 4, V1: 4}, seed=50)
    given, _ = make_adapter(model, {Q0: 4, V1: 4}, seed=51)
    runtime.load(dict(held), slot=0)
    calls = {
        "load": lambda: runtime.load(dict(given), slot=0),
        "set_scale": lambda: runtime.set_scale(0.5, 0),
        "unload": lambda: runtime.unload(0),
        "activate": lambda: runtime.activate(1),
    }

    class Hostile(dict):  # type: ignore[type-arg]
        def keys(self):  # type: ignore[no-untyped-def]
            calls[inner]()
            return super().keys()

        def items(self):  # type: ignore[no-untyped-def]
            calls[inner]()
            return super().items()

        def __iter__(self):  # type: ignore[no-untyped-def]
            calls[inner]()
            return super().__iter__()

    with torch.no_grad():
        before_out = model(x)
    before, info = _state(model, runtime), runtime.info(0)
    with pytest.raises(lorahot.UsageError, match=rf"runtime\.{inner}\(\) was called while a load of this runtime"):
        within(30, lambda: runtime.load(Hostile(given), slot=0))
    assert all(torch.equal(a, b) for a, b in zip(_state(model, runtime), before, strict=True))
    assert runtime.info(0) == info and runtime.active_slot == 0
    with torch.no_grad():
        assert torch.equal(model(x), before_out)
    runtime.load(dict(given), slot=0)  # the runtime serves on


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("inner", ["load", "set_scale", "unload", "activate", "eject", "lorahot.eject"])
@pytest.mark.parametrize(
    "outer", ["set_scale(float)", "set_scale(weights)", "activate(routing)", "activate(slot)", "unload(slot)"]
)
def test_a_runtime_call_from_an_argument_of_another_is_refused(outer: str, inner: str, merged: bool) -> None:
    """An argument whose conversion calls the runtime (a float subclass's ``__float__``, a
    list's ``__len__``/``__getitem__``/``__iter__``, an int subclass's ``__index__``), read by
    ``set_scale``, ``activate`` or ``unload`` under the call lock on the same thread: the nested
    call ran inside the outer one, which then wrote what it had checked against the slots before
    (``set_scale([w0, w1])`` with a load of one adapter nested in its weights wrote a two-part
    stack's scales over it) or wrote into a runtime ejected meanwhile (merged: the ejected model's
    weights). Now the nested call is refused with a UsageError, so the outer one raises one too;
    every parameter, buffer and arena stays bitwise as before, and the runtime serves on."""
    model = tiny_lm(seed=5, vocab=VOCAB)
    x = token_ids((2, 6), VOCAB, seed=5)
    runtime = lorahot.inject(model, TARGETS, max_rank=8, slots=2, merged=merged)
    held, _ = make_adapter(model, {Q0: 4, V1: 4}, seed=50)
    given, _ = make_adapter(model, {Q0: 2}, seed=51)
    runtime.load([dict(held), dict(held)], slot=0, scale=[1.0, 0.5])
    runtime.load(dict(held), slot=1)
    nested = {
        "load": lambda: runtime.load(dict(given), slot=0),
        "set_scale": lambda: runtime.set_scale(3.0, 0),
        "unload": lambda: runtime.unload(0),
        "activate": lambda: runtime.activate(1),
        "eject": runtime.eject,
        "lorahot.eject": lambda: lorahot.eject(model),
    }[inner]

    class Weight(float):
        def __float__(self) -> float:
            nested()
            return float.__float__(self)

    class Slot(int):
        def __index__(self) -> int:
            nested()
            return int(self)

        def __int__(self) -> int:
            nested()
            return int.__int__(self)

    class Listed(list):  # type: ignore[type-arg]
        def __len__(self) -> int:
            nested()
            return super().__len__()

        def __getitem__(self, i):  # type: ignore[no-untyped-def]
            nested()
            return super().__getitem__(i)

        def __iter__(self):  # type: ignore[no-untyped-def]
            nested()
            return super().__iter__()

    call = {
        "set_scale(float)": lambda: runtime.set_scale(Weight(0.7), 0),
        "set_scale(weights)": lambda: runtime.set_scale(Listed([0.7, 0.2]), 0),
        "activate(routing)": lambda: runtime.activate(Listed([0, 1])),
        "activate(slot)": lambda: runtime.activate(Slot(1)),
        "unload(slot)": lambda: runtime.unload(Slot(1)),
    }[outer]

    with torch.no_grad():
        before_out = model(x)
    before, infos = _state(model, runtime), (runtime.info(0), runtime.info(1))
    with pytest.raises(lorahot.UsageError) as refused:
        within(30, call)
    cause = refused.value.__cause__ or refused.value.__context__
    assert re.search(rf"runtime\.{inner.rpartition('.')[2]}\(\) was called while runtime\.", str(cause)), cause
    assert all(torch.equal(a, b) for a, b in zip(_state(model, runtime), before, strict=True))
    assert (runtime.info(0), runtime.info(1)) == infos and runtime.active_slot == 0
    with torch.no_grad():
        assert torch.equal(model(x), before_out)
    runtime.set_scale([0.5, 0.5], 0)  # the runtime serves on
