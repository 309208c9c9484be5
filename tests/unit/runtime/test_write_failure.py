"""A write that fails after every check passed (out of device memory, a device fault) empties
the slot it was writing, as ``unload`` does, and raises :class:`lorahot.WriteError` saying so:
the model then computes its base output bitwise, never a mix of two adapters."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import lorahot
from lorahot.runtime import buffers, lora_runtime, merge
from tests.helpers import make_adapter, tiny_lm, token_ids


def _two_arenas() -> nn.Module:
    """A tiny LM whose second block and head run in float64: two arenas, written one after the other."""
    model = tiny_lm()
    model.layers[1].double()
    model.layers[1].register_forward_pre_hook(lambda m, a: (a[0].double(),))
    model.lm_head.double()
    return model


def test_a_load_failing_in_its_second_arena_empties_the_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _two_arenas()
    ids = token_ids((2, 6), 32, seed=1)
    with torch.no_grad():
        base = model(ids)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4)
    names = list(runtime.layers)
    assert len(runtime.buffers.arenas) == 2
    runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=1)[0])
    calls: list[int] = []
    write = buffers.Arena.write_staged

    def failing(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("no memory for the second arena")
        return write(self, *args, **kwargs)

    monkeypatch.setattr(buffers.Arena, "write_staged", failing)
    with pytest.raises(
        lorahot.WriteError, match=r"MemoryError while writing slot 0 .* slot 0 was emptied \(unloaded\)"
    ):
        runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=2)[0])
    monkeypatch.undo()
    assert runtime.info(0) is None
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=2)[0])  # and it serves again
    assert runtime.info(0) is not None


def test_a_load_failing_while_staging_its_data_is_a_write_error_saying_nothing_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of device memory while a host-cache load stages its packs on the device, before its
    first write: nothing was changed, and the error says so and how to go on (it was an
    UnexpectedError blaming a gap in lorahot's checks)."""
    model = _two_arenas()
    ids = token_ids((2, 6), 32, seed=1)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4)
    names = list(runtime.layers)
    runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=1)[0])
    prepared = runtime.preload(make_adapter(model, dict.fromkeys(names, 4), seed=2)[0])
    with torch.no_grad():
        before = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def out_of_memory(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(buffers.BufferManager, "stage", out_of_memory)
    with pytest.raises(lorahot.WriteError) as caught:
        runtime.load(prepared)
    message = str(caught.value)
    assert message.startswith(
        "LoraRuntime.load: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB, while staging slot 0's "
        "data before its first write. Nothing was changed; slot 0 holds what it held."
    ), message
    assert "gap in lorahot" not in message
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    runtime.load(prepared)  # and it loads once memory is there
    with torch.no_grad():
        assert not torch.equal(model(ids), before)


@pytest.mark.parametrize("kind", [MemoryError, torch.OutOfMemoryError])
def test_memory_running_out_in_a_load_s_checks_says_so_and_asks_for_no_report(
    monkeypatch: pytest.MonkeyPatch, kind: type[Exception]
) -> None:
    """Memory that runs out while a load reads its adapter (before any write) is no missed
    check: the error says memory ran out and how to free it, where it asked for a report of a
    gap in lorahot's checks; nothing changed."""
    model = _two_arenas()
    ids = token_ids((2, 6), 32, seed=1)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4)
    names = list(runtime.layers)
    runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=1)[0])
    with torch.no_grad():
        before = model(ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise kind("Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lora_runtime, "read_adapter", out_of_memory)
    with pytest.raises(lorahot.UnexpectedError) as caught:
        runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=2)[0])
    message = str(caught.value)
    assert message.startswith(
        f"LoraRuntime.load: out of memory ({kind.__name__}: Tried to allocate 2.00 GiB). Nothing was changed. Free "
        "memory on the device"
    ), message
    assert "gap in lorahot" not in message
    assert isinstance(caught.value.__cause__, kind)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_merged_load_failing_while_folding_a_diff_puts_the_base_weights_back(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8)).double()
    weights = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)

    def lora() -> dict[str, torch.Tensor]:
        shapes = {"0": (16, 24), "1": (24, 8)}
        return {
            f"{n}.lora_{r}.weight": torch.randn(*((4, i) if r == "A" else (o, 4)), generator=g, dtype=torch.float64)
            for n, (i, o) in shapes.items()
            for r in "AB"
        }

    runtime = lorahot.inject(model, ["0", "1"], max_rank=8, merged=True)
    runtime.load(lora())

    def out_of_memory(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise MemoryError("no memory for the diff's delta")

    monkeypatch.setattr(merge, "fold_delta", out_of_memory)
    diff = {"lora_unet_1.diff": torch.randn(8, 24, generator=g, dtype=torch.float64)}
    with pytest.raises(lorahot.WriteError, match="slot 0 was emptied"):
        runtime.load([lora(), diff])
    assert runtime.info(0) is None
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "negative-control"])
def test_the_unload_a_failed_merged_write_advises_rebuilds_the_base(
    recorded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merged rewrite that fails partway (the first layer written, then a device fault), and
    whose emptying fails too: the WriteError advises ``runtime.unload(0)``. The weights hold
    lorahot's own partial write, not an edit, so that unload goes through and gives the base
    weights back bitwise. The negative control leaves the partial write unrecorded: the unload
    is refused as if the user had edited the weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8)).double()
    weights = [p.detach().clone() for p in model.parameters()]
    runtime = lorahot.inject(model, ["0", "1"], max_rank=8, merged=True)
    runtime.load(make_adapter(model, {"0": 4, "1": 4}, seed=1, dtype=torch.float64)[0])
    first = model[0].weight.detach().clone()
    real_fold = merge.Merger._fold_bias
    calls: list[int] = []

    def faulting(layer, extras, s):
        calls.append(1)
        if len(calls) > 1:  # the first layer is rewritten, then every layer's step faults, emptying's too
            raise RuntimeError("device fault")
        return real_fold(layer, extras, s)

    monkeypatch.setattr(merge.Merger, "_fold_bias", staticmethod(faulting))
    if not recorded:
        monkeypatch.setattr(merge.Merger, "record_all", lambda self: None)
    with pytest.raises(lorahot.WriteError, match=r"emptying slot 0 failed too.*runtime\.unload\(0\)"):
        runtime.load(make_adapter(model, {"0": 4, "1": 4}, seed=2, dtype=torch.float64)[0])
    monkeypatch.setattr(merge.Merger, "_fold_bias", staticmethod(real_fold))
    assert not torch.equal(model[0].weight, first)  # the partial write: the first layer holds the new adapter
    if not recorded:
        with pytest.raises(lorahot.UsageError, match="changed since lorahot last wrote them"):
            runtime.unload(0)
        return
    runtime.unload(0)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


# -- interrupted writes (KeyboardInterrupt from Ctrl-C or a signal handler) ----------------------


def _interrupting(
    monkeypatch: pytest.MonkeyPatch, cls: type, method: str, after: int, error: type[BaseException] = KeyboardInterrupt
) -> None:
    """``cls.method`` runs ``after`` times as it is, then once more and raises ``error``
    (having written its part: an interrupt, or a device fault, between two writes of one call)."""
    original = getattr(cls, method)
    calls: list[int] = []

    def interrupted(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == after + 1:
            raise error("interrupted midway")
        return out

    monkeypatch.setattr(cls, method, interrupted)


def _served(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("call", ["load", "set_scale"])
def test_an_interrupted_write_empties_the_slot_and_the_interrupt_goes_on(
    call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt after the first arena's write left it holding the new adapter, the
    second the old one, and info() naming the old: the slot is emptied and the interrupt raised."""
    model = _two_arenas()
    ids = token_ids((2, 6), 32, seed=1)
    base = _served(model, ids)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4)
    names = list(runtime.layers)
    runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=1)[0])
    method = "write_staged" if call == "load" else "set_scales"
    _interrupting(monkeypatch, buffers.Arena, method, after=0)
    with pytest.raises(KeyboardInterrupt):
        if call == "load":
            runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=2)[0])
        else:
            runtime.set_scale(0.5)
    monkeypatch.undo()
    assert runtime.info(0) is None
    assert torch.equal(_served(model, ids), base)


def test_an_interrupted_activate_keeps_the_slot_active_before(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _two_arenas()
    ids = token_ids((2, 6), 32, seed=1)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4, slots=2)
    names = list(runtime.layers)
    for slot in (0, 1):
        runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=slot + 1)[0], slot=slot)
    first = _served(model, ids)
    _interrupting(monkeypatch, buffers.Arena, "copy_region", after=0)  # the first arena copied, then interrupted
    with pytest.raises(KeyboardInterrupt):
        runtime.activate(1)
    monkeypatch.undo()
    assert runtime.active_slot == 0
    assert torch.equal(_served(model, ids), first)
    runtime.activate(1)
    assert not torch.equal(_served(model, ids), first)


def test_an_interrupted_unload_still_empties_the_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _two_arenas()
    ids = token_ids((2, 6), 32, seed=1)
    base = _served(model, ids)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4)
    runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 4), seed=1)[0])
    _interrupting(monkeypatch, buffers.Arena, "clear", after=0)
    with pytest.raises(KeyboardInterrupt):
        runtime.unload()
    monkeypatch.undo()
    assert runtime.info(0) is None
    assert torch.equal(_served(model, ids), base)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("after", [0, 1])
@pytest.mark.parametrize("new", [[1, 0], [1, 1], [-1, 0]])
def test_a_failed_per_row_activate_puts_back_every_arenas_routing(
    new: list[int], after: int, error: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A per-row routing is published arena by arena: one failing or interrupted after the first
    arena's upload left that arena on the new routing and the second on the old, a mix of both
    while ``routing`` named the old. Every arena's routing (and, for one slot on every row, the
    live slot) is put back; the model serves what it served before, then the new routing."""
    from lorahot.runtime import routing, staging

    model = _two_arenas()
    ids = token_ids((2, 6), 32, seed=1)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4, slots=2)
    names = list(runtime.layers)
    for slot in (0, 1):
        runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=slot + 1)[0], slot=slot)
    runtime.activate(new)
    wanted = _served(model, ids)
    runtime.activate(0)
    runtime.activate([0, 1])
    before = _served(model, ids)
    after = 0 if new == [1, 1] else after  # one call there
    # one slot on every row: the slot made live, then the routing recorded; else uploaded arena by arena
    cls, method = (routing.Routing, "one_slot") if new == [1, 1] else (staging.Staging, "send")
    _interrupting(monkeypatch, cls, method, after=after, error=error)
    with pytest.raises((KeyboardInterrupt, lorahot.WriteError)) as raised:
        runtime.activate(new)
    monkeypatch.undo()
    if error is RuntimeError:  # a device fault: typed, saying what is live now
        assert "Slot 0 and the routing before are live again" in str(raised.value)
    assert runtime.routing == (0, 1)
    assert runtime.active_slot == 0
    assert torch.equal(_served(model, ids), before)
    runtime.activate(new)
    assert torch.equal(_served(model, ids), wanted)


@pytest.mark.parametrize("persists", [False, True], ids=["once", "persisting"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_device_fault_during_activate_is_a_write_error_saying_what_is_live(
    merged: bool, persists: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory while activate makes a slot live (the copy into the live region, or merged
    mode's rewrite) is a WriteError, not a report of a gap in lorahot's checks: the slot live
    before is live again and the model serves it bitwise. Where putting it back fails too, the
    WriteError says the model may compute a mix and how to recover."""
    model, runtime, ids = _two_slots(merged)
    first = _served(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls, method = (merge.Merger, "apply") if merged else (buffers.Arena, "copy_region")
    _fault(monkeypatch, cls, method, MemoryError("CUDA out of memory"), persists)
    with pytest.raises(lorahot.WriteError, match=r"^LoraRuntime\.activate: MemoryError: CUDA out of memory") as raised:
        runtime.activate(1)
    monkeypatch.undo()
    if persists:
        assert "putting slot 0 and the routing before back failed too" in str(raised.value)
        assert "runtime.activate(0) again" in str(raised.value)
        runtime.activate(0)  # the recovery it names
    else:
        assert "Slot 0 and the routing before are live again; nothing else changed." in str(raised.value)
    assert isinstance(raised.value.__cause__, MemoryError)
    assert runtime.active_slot == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_served(model, ids), first)
    runtime.activate(1)
    assert not torch.equal(_served(model, ids), first)


def _two_slots(merged: bool = False) -> tuple[nn.Module, lorahot.LoraRuntime, torch.Tensor]:
    """:func:`_two_arenas` with an adapter in each of two slots, slot 0 active."""
    model = _two_arenas()
    ids = token_ids((2, 6), 32, seed=1)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4, slots=2, merged=merged)
    names = list(runtime.layers)
    for slot in (0, 1):
        runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=slot + 1)[0], slot=slot)
    runtime.activate(0)
    return model, runtime, ids


def test_a_faulting_activate_replay_whose_fallback_puts_the_slot_back_says_the_slot_is_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The graph replay of activate copies the new slot's first arena, then the device faults;
    make_live's fallback copies the slot active before back whole (the ordinary path), so the
    model serves it bitwise and the WriteError says so, not that putting it back failed."""
    from lorahot.runtime.activate_replay import ActivateReplay

    model, runtime, ids = _two_slots()
    first = _served(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def faulting(self: ActivateReplay, slot: int, *args: Any) -> bool:
        self.buffers.arenas[0].copy_region(slot, self.buffers.live)  # the graph's first copies ran
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(ActivateReplay, "__call__", faulting)
    with pytest.raises(lorahot.WriteError) as raised:
        runtime.activate(1)
    monkeypatch.undo()
    assert str(raised.value) == (
        "LoraRuntime.activate: RuntimeError: CUDA error: an illegal memory access was encountered, while making the "
        "new slot or routing live after every check had passed. Slot 0 and the routing before are live again; "
        "nothing else changed."
    )
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert runtime.active_slot == 0 and runtime.routing is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(_served(model, ids), first)


@pytest.mark.parametrize("persists", [False, True], ids=["once", "persisting"])
@pytest.mark.parametrize("failure", [lorahot.UsageError, KeyboardInterrupt], ids=["refusal", "interrupt"])
def test_a_device_fault_putting_back_after_a_refusal_is_a_write_error_saying_what_is_live(
    failure: type[BaseException], persists: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """activate(1) copied slot 1 live, then publishing its routing was refused (or interrupted);
    copying slot 0 back faults. Once: make_live's fallback copies slot 1 back whole, and the
    WriteError says slot 1 is live (the model serves it bitwise). Persisting: the live region
    may hold a mix, and the WriteError says so and names the recovery. Either way the refusal
    (the interrupt) is its cause."""
    from lorahot.runtime import routing

    model, runtime, ids = _two_slots()
    first = _served(model, ids)
    runtime.activate(1)
    second = _served(model, ids)
    runtime.activate(0)
    clear = routing.Routing.clear
    refused: list[int] = []

    def refusing(self: Any) -> None:
        refused.append(1)
        if len(refused) == 1:
            raise failure("refused")
        clear(self)

    monkeypatch.setattr(routing.Routing, "clear", refusing)
    copy = buffers.Arena.copy_region
    copies: list[int] = []

    def faulting(self: Any, src: int, dst: int) -> None:
        copies.append(src)
        if len(copies) > 2 and (persists or len(copies) == 3):  # slot 1 copied into both arenas, then faults
            raise torch.OutOfMemoryError("CUDA out of memory")
        copy(self, src, dst)

    monkeypatch.setattr(buffers.Arena, "copy_region", faulting)
    with pytest.raises(
        lorahot.WriteError, match=rf"^LoraRuntime\.activate: {failure.__name__}: refused, and "
    ) as raised:
        runtime.activate(1)
    monkeypatch.undo()
    assert isinstance(raised.value.__cause__, failure)
    if persists:
        assert str(raised.value).endswith(
            "putting slot 0 and the routing before back failed too (OutOfMemoryError: CUDA out of memory): the model "
            "may compute a mix of slots. Call runtime.activate(0) again, or runtime.unload()."
        )
        runtime.activate(0)  # the recovery it names
        assert torch.equal(_served(model, ids), first)
        return
    assert str(raised.value).endswith(
        "putting slot 0 back failed too (OutOfMemoryError: CUDA out of memory): slot 1 is live, with the routing "
        "before. Call runtime.activate(0) again."
    )
    assert runtime.active_slot == 1 and runtime.routing is None
    assert torch.equal(_served(model, ids), second)
    runtime.activate(0)
    assert torch.equal(_served(model, ids), first)


def _fault(monkeypatch: pytest.MonkeyPatch, cls: type, method: str, error: Exception, persists: bool) -> None:
    """``cls.method`` raises ``error`` before it does anything: on its first call, or on every call."""
    original = getattr(cls, method)
    calls: list[int] = []

    def faulting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if persists or len(calls) == 1:
            raise error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, faulting)


def _faulting_clears(monkeypatch: pytest.MonkeyPatch, persists: bool) -> None:
    """``Arena.clear`` faults before it zeroes anything: on its first call, or on every call."""
    _fault(monkeypatch, buffers.Arena, "clear", RuntimeError("CUDA error: unspecified launch failure"), persists)


@pytest.mark.parametrize("persists", [False, True], ids=["once", "persisting"])
def test_a_device_fault_during_unload_is_a_write_error_saying_what_is_empty(
    persists: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """unload() faults while emptying slot 0. It is emptied again, so no half-emptied slot
    serves, and unload goes on to slot 1 (on a tensor-parallel model every rank then empties
    the same slots): once, that goes through (the model computes its base output bitwise) and
    the WriteError says every slot is empty; persisting, it says both may hold part of their
    adapter and names the recovery. Either way no slot still names its adapter. Not an
    UnexpectedError saying nothing changed."""
    model, runtime, ids = _two_slots()
    base = _served(_two_arenas(), ids)  # the same model, not injected
    _faulting_clears(monkeypatch, persists)
    with pytest.raises(lorahot.WriteError) as raised:
        runtime.unload()
    monkeypatch.undo()
    assert isinstance(raised.value.__cause__, RuntimeError)
    what = "LoraRuntime.unload: RuntimeError: CUDA error: unspecified launch failure, while emptying slot 0"
    assert runtime.info(0) is None and runtime.info(1) is None
    if persists:
        assert str(raised.value) == (
            f"{what}. Slots 0, 1 could not be emptied (a second try failed too) and may hold part of their adapter, "
            "though no adapter is named there. Call runtime.unload() again."
        )
        runtime.unload()  # the recovery it names
    else:
        assert str(raised.value) == f"{what}. A second try emptied it: slots 0, 1 are empty."
    assert torch.equal(_served(model, ids), base)


@pytest.mark.parametrize("call", ["load", "set_scale"])
def test_an_interrupted_write_whose_emptying_faults_is_a_write_error(
    call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt midway through a write, then a device fault while emptying the
    half-written slot: a WriteError naming the interrupt and saying the slot may hold parts of
    two adapters, not an UnexpectedError saying nothing changed; the unload it names gives the
    base output back bitwise."""
    model = _two_arenas()
    ids = token_ids((2, 6), 32, seed=1)
    base = _served(model, ids)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4)
    names = list(runtime.layers)
    runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=1)[0])
    _interrupting(monkeypatch, buffers.Arena, "write_staged" if call == "load" else "set_scales", after=0)
    _faulting_clears(monkeypatch, persists=True)
    with pytest.raises(lorahot.WriteError) as raised:
        if call == "load":
            runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=2)[0])
        else:
            runtime.set_scale(0.5)
    monkeypatch.undo()
    assert str(raised.value).startswith(f"LoraRuntime.{call}: KeyboardInterrupt while writing slot 0 ")
    assert str(raised.value).endswith(
        "emptying slot 0 failed too, so it may hold parts of two adapters there, though no adapter is named there: "
        "call runtime.unload(0)."
    )
    assert isinstance(raised.value.__cause__, KeyboardInterrupt)
    assert runtime.info(0) is None  # not the adapter it held before: it may hold parts of two
    runtime.unload(0)
    assert torch.equal(_served(model, ids), base)
