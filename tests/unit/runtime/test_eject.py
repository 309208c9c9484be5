"""One runtime state decides whether a runtime serves: both ejects mark it, every operation reads it,
and a layer that left the model any other way is noticed too."""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

import lorahot
from tests.helpers import Block, make_adapter, model_reference, save_peft, tiny_lm, token_ids

TARGETS = ["q_proj", "v_proj", "embed_tokens"]
Q0 = "layers.0.self_attn.q_proj"
IDS = token_ids((2, 5), 32, seed=1)


def _runtime(slots: int = 2) -> tuple[nn.Module, lorahot.LoraRuntime, dict[str, torch.Tensor]]:
    model = tiny_lm()
    runtime = lorahot.inject(model, TARGETS, max_rank=4, slots=slots)
    tensors = make_adapter(model, {Q0: 2, "embed_tokens": 4}, seed=1)[0]
    runtime.load(tensors)
    return model, runtime, tensors


def _operations(runtime: lorahot.LoraRuntime, tensors: dict, tmp: Path) -> dict[str, Callable[[], object]]:
    path = save_peft(tmp / "ad", tensors)
    return {
        "load": lambda: runtime.load(tensors),
        "load_path": lambda: runtime.load(path, slot=1),
        "preload": lambda: runtime.preload(tensors),
        "prefetch": lambda: runtime.prefetch(path),
        "activate": lambda: runtime.activate(1),
        "unload": lambda: runtime.unload(),
        "set_scale": lambda: runtime.set_scale(0.5),
        "info": lambda: runtime.info(),
        "nbytes": lambda: runtime.nbytes,  # eject frees no buffer: the runtime holds them until dropped
        "eject": lambda: runtime.eject(),
    }


EJECTS: dict[str, Callable[[nn.Module, lorahot.LoraRuntime], object]] = {
    "module": lambda model, runtime: lorahot.eject(model),
    "runtime": lambda model, runtime: runtime.eject(),
    "module_of_a_submodule": lambda model, runtime: lorahot.eject(model.layers[0]),
}


@pytest.mark.parametrize("eject", list(EJECTS))
def test_every_operation_after_either_eject_raises(tmp_path: Path, eject: str) -> None:
    with torch.no_grad():
        base = tiny_lm()(IDS)
    model, runtime, tensors = _runtime()
    EJECTS[eject](model, runtime)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules()), "every layer of the runtime left"
    for name, call in _operations(runtime, tensors, tmp_path).items():
        with pytest.raises(lorahot.UsageError, match=r"this runtime was ejected; call lorahot\.inject again"):
            call()
        with torch.no_grad():
            assert torch.equal(model(IDS), base), name
    assert "ejected by " in repr(runtime)  # what it says of itself still prints


def _prefetch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("lorahot-prefetch")}


def test_module_eject_stops_the_prefetch_thread(tmp_path: Path) -> None:
    others = _prefetch_threads()  # other runtimes' (earlier tests in this process), not this one's
    model, runtime, tensors = _runtime()
    path = save_peft(tmp_path / "ad", tensors)
    runtime.prefetch(path).result()
    assert _prefetch_threads() - others
    lorahot.eject(model)
    assert not _prefetch_threads() - others
    with pytest.raises(lorahot.UsageError, match=r"ejected"):
        runtime.prefetch(path)
    assert not _prefetch_threads() - others


@pytest.mark.parametrize("how", ["runtime", "module"])
def test_eject_from_a_prefetch_done_callback_ejects(tmp_path: Path, how: str) -> None:
    """A prefetch future's done callback runs on the prefetch thread; an eject from there must
    not wait for that thread (it would join itself: an UnexpectedError saying nothing changed,
    after the model was already unwrapped; found by an independent audit). It ejects, the base
    model comes back bitwise, and the thread ends."""
    model = tiny_lm()
    with torch.no_grad():
        base = model(IDS)
    others = _prefetch_threads()  # other runtimes' (earlier tests in this process), not this one's
    runtime = lorahot.inject(model, TARGETS, max_rank=4)
    path = save_peft(tmp_path / "ad", make_adapter(model, {Q0: 2}, seed=1)[0])
    runtime.load(path)
    done = threading.Event()
    errors: list[BaseException] = []

    def eject(_: object) -> None:
        try:
            runtime.eject() if how == "runtime" else lorahot.eject(model)
        except BaseException as e:  # reported by the test, not swallowed by the future
            errors.append(e)
        done.set()

    runtime.prefetch(path).add_done_callback(eject)
    assert done.wait(30)
    assert errors == []
    with torch.no_grad():
        assert torch.equal(model(IDS), base)
    with pytest.raises(lorahot.UsageError, match=r"ejected"):
        runtime.load(path)
    for thread in _prefetch_threads() - others:
        thread.join(30)
    assert not _prefetch_threads() - others


def test_module_eject_restores_the_base_model_bitwise() -> None:
    model = tiny_lm()
    with torch.no_grad():
        base = model(IDS)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, merged=True)
    runtime.load(make_adapter(model, {Q0: 2}, seed=3)[0])
    lorahot.eject(model.layers[1])  # a part of the model: the whole runtime goes
    with torch.no_grad():
        assert torch.equal(model(IDS), base)


def test_two_runtimes_module_eject_marks_both() -> None:
    model = tiny_lm()
    first = lorahot.inject(model, ["q_proj"], max_rank=4)
    second = lorahot.inject(model, ["v_proj"], max_rank=4)
    lorahot.eject(model)
    for runtime in (first, second):
        with pytest.raises(lorahot.UsageError, match=r"ejected"):
            runtime.activate(0)


@pytest.mark.parametrize(
    "edit",
    [
        lambda model: setattr(model.layers[0].self_attn, "q_proj", nn.Linear(16, 16)),  # the layer replaced
        lambda model: setattr(model.layers, "0", tiny_lm(seed=5).layers[0]),  # a block on its path replaced
        lambda model: delattr(model.layers[0].self_attn, "q_proj"),  # deleted
    ],
    ids=["layer_replaced", "parent_replaced", "deleted"],
)
def test_a_layer_that_left_the_model_otherwise_is_refused(edit: Callable[[nn.Module], object]) -> None:
    model, runtime, tensors = _runtime()
    edit(model)
    snap = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S)]
    for call in (lambda: runtime.load(tensors), lambda: runtime.set_scale(2.0), lambda: runtime.activate(1)):
        with pytest.raises(
            lorahot.UsageError,
            match=rf"{Q0}: this LoRA layer is no longer in the model .* Call runtime\.eject\(\), then inject",
        ):
            call()
    assert all(torch.equal(t, u) for t, u in zip((t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S)), snap))
    runtime.eject()  # still possible: puts back what is still in place
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())


@pytest.mark.parametrize("how", ["runtime", "model"])
@pytest.mark.parametrize("where", ["block", "layer", "checkpointed"])
def test_a_module_wrapped_after_inject_is_still_served_and_ejected(where: str, how: str) -> None:
    """``model.layers[0] = torch.compile(model.layers[0])`` (compiling block by block), a layer
    compiled the same way, or activation checkpointing's wrapper put in place of each block
    (``apply_activation_checkpointing``) leaves the LoRA layers in the model, called through
    the wrapper: loads and activate serve them (float64 reference), and either eject puts the
    base modules back (bitwise the base output). Before, every call was refused as 'no longer
    in the model', and runtime.eject() left the layers in place: the model computed the adapter
    after eject (max abs diff 1.57 from the base)."""
    base = tiny_lm()
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, slots=2)
    if where == "block":
        model.layers[0] = torch.compile(model.layers[0], backend="eager")
    elif where == "layer":
        model.layers[0].self_attn.q_proj = torch.compile(model.layers[0].self_attn.q_proj, backend="eager")
    else:
        apply_activation_checkpointing(model, check_fn=lambda module: isinstance(module, Block))
    tensors, ab = make_adapter(base, {Q0: 2, "layers.1.self_attn.v_proj": 2}, seed=4)
    runtime.load(tensors, slot=1, config={"r": 2, "lora_alpha": 2})
    runtime.activate(1)
    runtime.set_scale(0.5)
    want = model_reference(base, IDS, {n: (a, b, 0.5) for n, (a, b) in ab.items()})
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).double(), want, rtol=0, atol=1e-5)
    runtime.eject() if how == "runtime" else lorahot.eject(model)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))


@pytest.mark.parametrize("how", ["runtime", "model"])
def test_a_layer_assigned_to_a_second_place_after_inject_gets_its_base_back_there_too(how: str) -> None:
    """The same LoRA layer assigned to a second attribute after inject (``attn.k_proj =
    attn.q_proj``, and one the forward never calls) computes its adapter wherever it is
    called, as any shared module does (float64 reference with the base model shared the same
    way). Eject put the base module back at the layer's own path only: the second place kept
    the layer, which went on adding the adapter after eject (max abs diff 0.15 from the base
    model shared the same way). Now every place gets the base module back."""
    base = tiny_lm()
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4)
    tensors, ab = make_adapter(base, {Q0: 2}, seed=4)
    runtime.load(tensors, config={"r": 2, "lora_alpha": 2})
    for m in (model, base):
        m.layers[0].self_attn.k_proj = m.layers[0].self_attn.q_proj
        m.spare = m.layers[0].self_attn.q_proj
    want = model_reference(base, IDS, {n: (a, b, 1.0) for n, (a, b) in ab.items()})
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).double(), want, rtol=0, atol=1e-5)
    runtime.eject() if how == "runtime" else lorahot.eject(model)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules(remove_duplicate=False))
    attention = model.layers[0].self_attn
    assert attention.k_proj is attention.q_proj is model.spare
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))


@pytest.mark.parametrize("level", ["_orig_mod", "_checkpoint_wrapped_module"])
def test_a_second_place_merely_named_as_a_wrapper_level_gets_its_base_back(level: str) -> None:
    """An ordinary module holding a layer under a child named ``_orig_mod`` (no torch.compile) was
    taken, by that name alone, for a wrapper made of the layer: eject put the base Linear in place of
    the whole module (``model.spare`` became the Linear). Only ``OptimizedModule`` and
    ``CheckpointWrapper`` are wrappers (:func:`~lorahot.resolve.file_names.wrapper_level`): the child
    gets the base module back, the module stays, the model bitwise the base model shared the same way."""
    base = tiny_lm()
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4)
    tensors, _ = make_adapter(base, {Q0: 2}, seed=4)
    runtime.load(tensors, config={"r": 2, "lora_alpha": 2})
    for m in (model, base):
        m.spare = nn.Module()
        m.spare.add_module(level, m.layers[0].self_attn.q_proj)
    runtime.eject()
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules(remove_duplicate=False))
    assert model.spare._modules[level] is model.layers[0].self_attn.q_proj
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))


def test_runtime_eject_takes_out_a_copy_of_a_layer_put_in_the_model_since() -> None:
    """A layer replaced by its own copy (``attn.q_proj = copy.deepcopy(attn.q_proj)``) is
    refused by the runtime's calls, which say to call runtime.eject(); that eject unwrapped its
    own layers only, and the copy, which no runtime holds, stayed in the model adding its
    adapter (max abs diff 0.22 from the base on the tiny LM), silently. Now runtime.eject()
    takes out such copies too (another runtime's layers stay: see the two-runtime tests)."""
    base = tiny_lm()
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4)
    other = lorahot.inject(model, ["o_proj"], max_rank=4)  # a second runtime, serving
    runtime.load(make_adapter(base, {Q0: 2}, seed=4)[0], config={"r": 2, "lora_alpha": 2})
    attention = model.layers[0].self_attn
    attention.q_proj = copy.deepcopy(attention.q_proj)
    with pytest.raises(lorahot.UsageError, match=rf"{Q0}: this LoRA layer is no longer in the model .*runtime\.eject"):
        runtime.load(make_adapter(base, {Q0: 2}, seed=5)[0])
    runtime.eject()
    assert [n for n, m in model.named_modules() if isinstance(m, lorahot.LoRALayer)] == list(other.layers)
    other.eject()
    with torch.no_grad():
        assert torch.equal(model(IDS), base(IDS))


def test_a_copy_of_the_model_is_ejected_without_touching_the_original() -> None:
    import copy
    import pickle

    model, runtime, tensors = _runtime()
    clone = copy.deepcopy(model)
    assert pickle.loads(pickle.dumps(model)) is not None  # torch.save(model) works
    lorahot.eject(clone)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in clone.modules())
    runtime.load(tensors, slot=1)  # the original runtime still serves
    assert isinstance(model.layers[0].self_attn.q_proj, lorahot.LoRALayer)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("how", ["runtime", "model"])
def test_an_eject_failing_midway_is_finished_by_the_next(
    how: str, merged: bool, error: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault or Ctrl-C after the first layers were put back left the model half ejected, a
    mix of base and adapter, and the runtime refusing every call, ``eject()`` included (it was
    marked ejected first). Now every call but eject refuses, naming the unfinished eject, and the
    next eject (either one) finishes it: the base model, bitwise."""
    from lorahot.layers.base import LoRALayer
    from lorahot.runtime import targets

    model = tiny_lm(0, dim=32, hidden=48)
    ids = token_ids((2, 6), 32, seed=1)
    with torch.no_grad():
        base = model(ids)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=8, merged=merged)
    runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 4), seed=1)[0])
    original, calls = targets._set_submodule, []

    def interrupted(*args: object) -> None:
        original(*args)  # type: ignore[arg-type]
        calls.append(1)
        if len(calls) == 2:
            raise error("midway")

    monkeypatch.setattr(targets, "_set_submodule", interrupted)
    with pytest.raises((error, lorahot.UnexpectedError), match=r"midway|did not finish"):
        runtime.eject() if how == "runtime" else lorahot.eject(model)
    monkeypatch.undo()
    assert sum(isinstance(m, LoRALayer) for m in model.modules()) == 2  # half ejected
    with pytest.raises(lorahot.UsageError, match="did not finish"):
        runtime.unload()
    runtime.eject() if how == "runtime" else lorahot.eject(model)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    with pytest.raises(lorahot.UsageError, match="this runtime was ejected"):
        runtime.unload()


@contextlib.contextmanager
def _no_cycle_collector() -> Iterator[None]:
    """Python's cycle collector off: what is freed in the block is freed by its last reference."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _served(tmp_path: Path, merged: bool) -> tuple[nn.Module, lorahot.LoraRuntime]:
    """A runtime that did a little of everything: loads (a path, a prefetch, a stack), a per-row
    routing, set_scale and forwards."""
    model = tiny_lm()
    runtime = lorahot.inject(model, TARGETS, max_rank=8, slots=2, merged=merged, extras=not merged)
    paths = [save_peft(tmp_path / f"a{i}", make_adapter(model, {Q0: 2, "embed_tokens": 4}, seed=i)[0]) for i in (1, 2)]
    runtime.load(paths[0], slot=0)
    runtime.prefetch(paths[1]).result()
    runtime.load([paths[0], paths[1]], slot=1, scale=[0.5, 0.5])
    runtime.set_scale([0.25, 1.0], slot=1)
    with torch.no_grad():
        if not merged:
            runtime.activate([0, 1])
            model(IDS)
        runtime.activate(1)
        model(IDS)
    return model, runtime


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("how", ["runtime", "module"])
def test_an_ejected_runtime_and_its_model_go_with_their_last_reference(tmp_path: Path, how: str, merged: bool) -> None:
    """After eject, dropping the runtime and the model frees both at once, as a model that
    never had a runtime is freed: nothing the runtime keeps refers back to it. Before, its DoRA
    factors and the layers' state held its bound methods, so the runtime, its arenas (on a GPU
    up to gigabytes) and the model it holds waited for Python's cycle collector, which neither
    ``del`` nor ``torch.cuda.empty_cache()`` runs."""
    model, runtime = _served(tmp_path, merged)
    arena = runtime.buffers.arenas[0].A
    refs = [weakref.ref(x) for x in (model, runtime, arena)]
    with _no_cycle_collector():
        runtime.eject() if how == "runtime" else lorahot.eject(model)
        del model, runtime, arena
        assert [r() is None for r in refs] == [True, True, True]


@pytest.mark.filterwarnings("ignore:Complex modules:UserWarning")
@pytest.mark.parametrize("end", ["dropped", "failed-inject"])
def test_a_runtime_dropped_without_eject_or_a_failed_inject_leaves_nothing_behind(tmp_path: Path, end: str) -> None:
    """A runtime dropped with its model, never ejected, is collected with it (the model's layers
    hold the runtime, which lorahot.eject(model) needs, so the two go at the collector's next
    run), and an inject that fails keeps nothing: no model, no global handle, no thread."""
    from lorahot.layers.tensor_handles import TENSORS, TensorHandle

    gc.collect()
    TensorHandle(())  # a safe point: collected handles' entries removed
    handles, threads = set(TENSORS), threading.active_count()
    if end == "dropped":
        model, runtime = _served(tmp_path, merged=False)
        refs = [weakref.ref(model), weakref.ref(runtime)]
        del model, runtime
    else:
        model = tiny_lm()
        model.layers[1].self_attn.v_proj.to(torch.complex64)  # refused after the layers before it
        refs = [weakref.ref(model)]
        with pytest.raises(lorahot.UsageError, match="complex64"):
            lorahot.inject(model, TARGETS, max_rank=4)
        del model
    gc.collect()
    assert all(r() is None for r in refs)
    TensorHandle(())
    assert set(TENSORS) <= handles | {max(TENSORS)}
    # a dropped executor's worker is told to stop when the executor is collected, and exits on
    # its own thread: give it a moment on a loaded machine, but it must go
    deadline = time.monotonic() + 10.0
    while threading.active_count() > threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == threads


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("how", ["runtime.eject", "lorahot.eject", "a layer replaced"])
def test_a_load_whose_read_ejects_the_runtime_or_moves_a_layer_writes_nothing(how: str, merged: bool) -> None:
    """A source whose mapping methods eject the runtime from another thread (or put a plain
    module where a layer was) while the load reads it: the load checked the runtime before its reads only, so it
    went on and wrote its adapter anyway: merged, into the ejected model's own weights (its
    output no longer the base model's, with no runtime left to take it out); unmerged, it
    returned an AdapterInfo of a runtime no longer in the model. Now the load checks the
    runtime again after its reads and refuses; the model keeps its weights bitwise."""
    model = tiny_lm(seed=6, vocab=32)
    x = token_ids((2, 5), 32, seed=6)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=8, merged=merged)
    names = list(runtime.layers)
    tensors, _ = make_adapter(model, dict.fromkeys(names, 4), seed=60)
    plain = copy.deepcopy(runtime.layers[names[0]].base_layer)

    acted: list[bool] = []

    def act() -> None:  # once: a second eject would refuse (the runtime was ejected)
        if acted:
            return
        acted.append(True)
        if "eject" in how:  # from another thread: on the load's own thread an eject is refused itself
            failed: list[BaseException] = []
            eject = runtime.eject if how == "runtime.eject" else functools.partial(lorahot.eject, model)
            other = threading.Thread(target=lambda: _noting(failed, eject))
            other.start()
            other.join(30)
            assert not other.is_alive() and not failed, failed
        else:
            model.set_submodule(names[0], plain)

    class Hostile(dict):  # type: ignore[type-arg]
        def keys(self):  # type: ignore[no-untyped-def]
            act()
            return super().keys()

        def items(self):  # type: ignore[no-untyped-def]
            act()
            return super().items()

        def __iter__(self):  # type: ignore[no-untyped-def]
            act()
            return super().__iter__()

    with torch.no_grad():
        before = model(x)
    with pytest.raises(lorahot.UsageError, match="ejected" if "eject" in how else names[0]):
        runtime.load(Hostile(tensors))
    if "eject" in how:
        assert model.state_dict().keys() == original.keys()
        assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    else:
        assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items() if k in original)
    with torch.no_grad():
        assert torch.equal(model(x), before)


def _noting(failed: list[BaseException], call: Callable[[], object]) -> None:
    """Runs ``call``, appending what it raises to ``failed`` (for a call on another thread)."""
    try:
        call()
    except BaseException as exc:
        failed.append(exc)
