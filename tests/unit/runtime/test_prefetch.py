"""``prefetch(source, key=...)`` and a ``load`` of that key issued before the prefetch is done.

The host cache holds the key only once the prefetch thread has prepared the adapter; a load of
the key meanwhile must wait for it (or be refused where the prefetch failed), never read the
key as a path or Hub id of its own (:mod:`lorahot.runtime.prefetches`).
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import lorahot
from lorahot.runtime import lora_runtime
from tests.helpers import make_adapter, save_peft, tiny_lm

Q0 = "layers.0.self_attn.q_proj"


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, list[object]]]:
    """Holds every read of the runtime until the event is set (at the latest after 10 s), and
    lists what was read; offline, so that a key read as a Hub id fails at once."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    opened, seen = threading.Event(), []
    real = lora_runtime.read_adapter

    def held(source, **kwargs):
        seen.append(source)
        opened.wait(10)
        return real(source, **kwargs)

    monkeypatch.setattr(lora_runtime, "read_adapter", held)
    yield opened, seen
    opened.set()


def _open_soon(event: threading.Event) -> None:
    """Sets ``event`` from another thread in 0.2 s: the load under test is waiting by then."""
    threading.Timer(0.2, event.set).start()


def _state(model: torch.nn.Module, runtime: lorahot.LoraRuntime) -> list[torch.Tensor]:
    tensors = [*model.state_dict(keep_vars=True).values()]
    tensors += [t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
    return [t.detach().clone() for t in tensors]


def _unchanged(before: list[torch.Tensor], model: torch.nn.Module, runtime: lorahot.LoraRuntime) -> bool:
    return all(torch.equal(b, a) for b, a in zip(before, _state(model, runtime), strict=True))


@pytest.mark.parametrize("key", ["style", "other path"])
def test_a_load_of_a_key_waits_for_its_prefetch(key: str, tmp_path: Path, gate) -> None:
    """``load(key)`` while ``prefetch(path, key=key)`` is under way loads that adapter. It used
    to read the key as a source of its own: a Hub request for ``"style"``, and for a key that is
    another adapter's path, that other adapter, silently (which one depended on the timing)."""
    opened, seen = gate
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    tensors, ab = make_adapter(model, {Q0: 4}, seed=1)
    path = save_peft(tmp_path / "a", tensors, r=4)
    other = save_peft(tmp_path / "b", make_adapter(model, {Q0: 4}, seed=2)[0], r=4)
    name = key if key == "style" else str(other)
    future = runtime.prefetch(path, key=name)
    _open_soon(opened)
    info = runtime.load(name)
    assert future.done() and seen == [path]  # the key itself was never read
    assert info.source == str(path / "adapter_model.safetensors")
    assert torch.equal(runtime.layers[Q0].lora_A[:4], ab[Q0][0])


def test_a_load_of_a_key_whose_prefetch_failed_is_refused(tmp_path: Path, gate) -> None:
    """A prefetch that fails leaves no adapter under its key: a load of the key, issued before
    it failed or after (as a stack's part too), is refused naming the failure; none reads the
    key as a source, and the model stays bitwise as it was."""
    opened, seen = gate
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    opened.set()
    runtime.load(make_adapter(model, {Q0: 4}, seed=3)[0])
    opened.clear()
    seen.clear()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    before = _state(model, runtime)
    future = runtime.prefetch(bad, key="style")
    _open_soon(opened)
    with pytest.raises(lorahot.UsageError, match=r"'style' is the key of a prefetch that failed \(AdapterReadError: "):
        runtime.load("style")
    assert isinstance(future.exception(), lorahot.AdapterReadError)
    with pytest.raises(lorahot.UsageError, match=r"'style' is the key of a prefetch that failed \(AdapterReadError: "):
        runtime.load(["style"])
    assert seen == [bad] and _unchanged(before, model, runtime)
    runtime.prefetch(bad, key=str(bad))  # a key that is the source's own path: a load reads that path
    with pytest.raises(lorahot.AdapterReadError, match=r"bad\.safetensors"):
        runtime.load(str(bad))
    assert _unchanged(before, model, runtime)


def test_a_load_of_a_queued_key_on_the_prefetch_thread_is_refused_not_a_deadlock(tmp_path: Path, gate) -> None:
    """A done callback of one prefetch runs on the prefetch thread; a load there of a key whose
    prefetch is queued behind it cannot wait for it (the thread would wait for itself): it is
    refused, and the queued prefetch then runs."""
    opened, _ = gate
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    first = save_peft(tmp_path / "a", make_adapter(model, {Q0: 4}, seed=1)[0], r=4)
    second = save_peft(tmp_path / "b", make_adapter(model, {Q0: 4}, seed=2)[0], r=4)
    raised: list[BaseException] = []

    def load_second(_: object) -> None:
        try:
            runtime.load("second")
        except BaseException as exc:
            raised.append(exc)

    runtime.prefetch(first).add_done_callback(load_second)
    queued = runtime.prefetch(second, key="second")
    opened.set()
    queued.result(timeout=20)
    assert len(raised) == 1 and isinstance(raised[0], lorahot.UsageError)
    assert "is the key of a prefetch queued on the prefetch thread" in str(raised[0])
    assert runtime.info() is None  # nothing was loaded


_EXIT_SCRIPT = """
import time
from pathlib import Path
import lorahot
from lorahot.runtime import lora_runtime
from tests.helpers import make_adapter, save_peft, tiny_lm

model = tiny_lm()
runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
path = save_peft(Path({folder!r}), make_adapter(model, {{{q0!r}: 4}}, seed=1)[0], r=4)
real = lora_runtime.read_adapter

def slow(source, **kwargs):
    print("read", flush=True)
    time.sleep(0.2)
    return real(source, **kwargs)

lora_runtime.read_adapter = slow
futures = [runtime.prefetch(path, key=f"k{{i}}") for i in range(20)]
while not any(f.running() for f in futures):
    time.sleep(0.01)
print("exit", flush=True)
"""


def test_prefetches_still_queued_at_interpreter_exit_are_cancelled(tmp_path: Path) -> None:
    """A script that exits with prefetches queued exits once the one under way is done. Python
    joins a prefetch thread only when its queue is empty, so it used to run all 20 first
    (queued Hub reads: each up to its timeout)."""
    script = _EXIT_SCRIPT.format(folder=str(tmp_path / "a"), q0=Q0)
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # counted as substrings: the two threads' prints may interleave ("readexit\n\n")
    assert "exit" in done.stdout and done.stdout.count("read") <= 2, done.stdout


_CALLBACK_SCRIPT = """
import time
from pathlib import Path
import lorahot
from lorahot.runtime import lora_runtime
from tests.helpers import make_adapter, save_peft, tiny_lm

model = tiny_lm()
runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
first, second = (
    save_peft(Path({folder!r}) / n, make_adapter(model, {{{q0!r}: 4}}, seed=s)[0], r=4) for n, s in (("a", 1), ("b", 2))
)
real = lora_runtime.read_adapter

def slow(source, **kwargs):
    time.sleep(0.3)
    return real(source, **kwargs)

lora_runtime.read_adapter = slow
runtime.prefetch(first, key="first").add_done_callback(lambda _: runtime.activate(0))
runtime.prefetch(second, key="second")
print(runtime.load("second").source, flush=True)
"""


def test_a_load_waiting_for_a_prefetch_lets_an_earlier_prefetch_s_callback_call_the_runtime(tmp_path: Path) -> None:
    """``load("second")`` waits for that key's prefetch, queued behind another whose done
    callback calls ``runtime.activate`` on the prefetch thread. The load waits before it takes
    the runtime's call lock, which that callback needs: holding it, the two threads would wait
    for each other forever (a subprocess with a timeout)."""
    script = _CALLBACK_SCRIPT.format(folder=str(tmp_path), q0=Q0)
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "b" / "adapter_model.safetensors")


@pytest.mark.parametrize("kind", ["mapping", "Adapter"])
def test_a_prefetched_mapping_is_the_adapter_as_it_was_when_prefetch_returned(kind: str, tmp_path: Path, gate) -> None:
    """``prefetch`` of a mapping of tensors (or an :class:`Adapter`) takes its copy before it
    returns, as ``preload`` does: the caller may reuse its tensors at once (an optimizer step,
    ``mul_``) or change the dict. It used to copy them only when the prefetch thread came to
    it, here behind another prefetch, and prepared the changed values, silently."""
    opened, _ = gate
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    runtime.prefetch(save_peft(tmp_path / "a", make_adapter(model, {Q0: 4}, seed=1)[0], r=4))  # held: the queue
    tensors, ab = make_adapter(model, {Q0: 4}, seed=2)
    want = ab[Q0][0].clone()
    source = tensors if kind == "mapping" else lorahot.read_adapter(tensors)
    future = runtime.prefetch(source)
    for t in tensors.values() if kind == "mapping" else (source.modules[Q0].A, source.modules[Q0].B):
        t.mul_(2)
    if kind == "mapping":
        tensors.clear()
    opened.set()
    runtime.load(future.result(timeout=20))
    assert torch.equal(runtime.layers[Q0].lora_A[:4], want)


@pytest.mark.parametrize("raised", [RuntimeError, SystemExit, KeyboardInterrupt], ids=lambda e: e.__name__)
def test_a_done_callback_that_raises_leaves_later_prefetches_and_loads_working(
    raised: type[BaseException], tmp_path: Path, gate
) -> None:
    """A prefetch future's done callback that raises runs on the prefetch thread. A
    ``SystemExit`` or ``KeyboardInterrupt`` there went out of ``concurrent.futures``' worker loop,
    which ended the runtime's one prefetch thread: every later prefetch stayed queued, and a
    ``load`` of its key waited forever. Each is logged and dropped, as an ``Exception`` is; the
    later prefetch runs, the loads of both keys load their adapters."""
    opened, _ = gate
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    first_tensors, first_ab = make_adapter(model, {Q0: 4}, seed=1)
    second_tensors, second_ab = make_adapter(model, {Q0: 4}, seed=2)
    first = save_peft(tmp_path / "a", first_tensors, r=4)
    second = save_peft(tmp_path / "b", second_tensors, r=4)

    def callback(_: object) -> None:
        raise raised("from a done callback")

    runtime.prefetch(first, key="first").add_done_callback(callback)  # held by the gate: it runs on that thread
    later = runtime.prefetch(second, key="second")
    opened.set()
    loaded: list[object] = []
    waiter = threading.Thread(target=lambda: loaded.append(runtime.load("second")), daemon=True)
    waiter.start()
    waiter.join(20)
    assert not waiter.is_alive() and later.done() and len(loaded) == 1
    assert torch.equal(runtime.layers[Q0].lora_A[:4], second_ab[Q0][0])
    runtime.load("first")
    assert torch.equal(runtime.layers[Q0].lora_A[:4], first_ab[Q0][0])


def test_the_failed_prefetches_remembered_are_bounded_in_bytes(tmp_path: Path) -> None:
    """The errors of the last 256 failed keyed prefetches are kept, by key, for a later load of
    the key to name; bounded by count alone, 256 keys of 4 MiB each pinned 1 GiB (a key is any
    str the caller passes; measured 1,024 MiB). They are bounded to 16 MiB as the cache's names
    are: 6 keys of 4 MiB (24 MiB held before) keep at most 16 MiB, and the last failure is still
    refused naming its error (the oldest, forgotten as the oldest names are, is read as the path
    it spells: too long a name, a SourceNotFoundError)."""
    runtime = lorahot.inject(tiny_lm(), ["q_proj"], max_rank=4)
    missing = str(tmp_path / "missing.safetensors")

    def key(i: int) -> str:
        return chr(ord("a") + i) * (4 << 20)

    tracemalloc.start()
    try:
        held = tracemalloc.get_traced_memory()[0]
        for i in range(6):
            with pytest.raises(lorahot.SourceNotFoundError):
                runtime.prefetch(missing, key=key(i)).result()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - held
    finally:
        tracemalloc.stop()
    assert held <= (16 << 20) + (1 << 20), held
    with pytest.raises(lorahot.UsageError, match=r"is the key of a prefetch that failed \(SourceNotFoundError: "):
        runtime.load(key(5))
    with pytest.raises(lorahot.SourceNotFoundError, match=r"File name too long"):
        runtime.load(key(0))
    assert runtime.info() is None
