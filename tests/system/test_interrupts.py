"""Every call interrupted at every point: a ``KeyboardInterrupt`` raised at a line lorahot runs
(``sys.settrace``, a local trace function on frames of ``lorahot/``): at the k-th line event for
k at a stride, or at the first run of each distinct line the call runs.

After each interrupt the model's parameters and buffers (the arenas included), the slots'
``info``, the active slot and the routing are bitwise as before the call, or as after it
completed (an interrupt after its commit point), never a mix; then the same call goes through
and the model computes the float64 dense reference of what it serves.

One documented third state: an interrupt inside a write that has begun (``load`` and
``set_scale`` writing a slot's rows) empties that slot, as :meth:`unload` does, so that no mix
of two adapters serves, and the interrupt goes on (``tests/unit/runtime/test_write_failure.py``).
The slot's old rows are gone by then, and keeping a copy to write back would cost every swap a
copy of the slot. ``eject`` rolls forward instead: interrupted midway, it leaves a runtime that
refuses every call but another eject, which finishes it (``tests/unit/runtime/test_eject.py``).

Where the contract cannot hold, and is not tested: a second interrupt while the first is being
handled (Python cannot shield cleanup code itself); the exit of a ``with`` block before its
``__exit__`` runs, a ``try``'s first line, a ``finally`` run after its ``try`` completed, and
a ``try:`` that opens a ``with`` block (:func:`_counted`: a tracer can raise there, a signal
cannot); a finalizer, where Python prints an exception and drops it. ``make
test`` interrupts each call at about :data:`FAST_POINTS` points; ``LORAHOT_EVERY_LINE=1`` at the
first run of every distinct line it runs (each load about a minute); ``LORAHOT_EVERY_LINE=events``
at every line event (several minutes a load).
"""

from __future__ import annotations

import contextlib
import copy
import dis
import functools
import gc
import itertools
import linecache
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType, SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import lorahot
from lorahot.io import hub, tensorfile
from lorahot.memo import ENTRY_OVERHEAD, BoundedMemo
from lorahot.runtime.cache import AdapterCache, PreparedAdapter
from tests.helpers import (
    PREFIX,
    freeze_the_heap,
    make_adapter,
    peft_keys,
    save_peft,
    stack_reference,
    tiny_convnet,
    token_ids,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LORAHOT = str(Path(lorahot.__file__).parent)
TARGETS = ["embed", "conv", "proj"]
IDS = token_ids((2, 3, 3), 16, seed=5)  # (B, H, W): row 0 and row 1 of a per-row routing
#: interrupts per call in `make test`: every line of a short call, a stride on a long one
FAST_POINTS = 24


# -- the interrupt ---------------------------------------------------------------------------


#: a line of lorahot's code: its file and its number
Line = tuple[str, int]


@dataclass
class Hit:
    """Where the interrupt was raised: the function (with its file and line) and the line
    (``None``: the call ran to its end first), and the line events counted."""

    function: str | None = None
    line: Line | None = None
    lines: int = 0


@functools.cache
def _with_exits(code: CodeType) -> frozenset[int]:
    """The offsets in ``code`` where a line event is a ``with`` block's exit, before its
    ``__exit__`` is called (the line's instructions start with the three ``None`` of that
    call and enter no ``with``)."""
    starts: dict[int, list[dis.Instruction]] = {}
    start = 0
    for ins in dis.get_instructions(code):
        if ins.starts_line is not None:
            start = ins.offset
        starts.setdefault(start, []).append(ins)
    return frozenset(
        offset
        for offset, run in starts.items()
        if [(i.opname, i.argval) for i in run[:3]] == [("LOAD_CONST", None)] * 3
        and not any(i.opname in ("BEFORE_WITH", "BEFORE_ASYNC_WITH") for i in run)
    )


#: instructions after which the next one does not run
_NO_FALL_THROUGH = frozenset(
    {"JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT", "RETURN_VALUE", "RAISE_VARARGS", "RERAISE"}
)


@functools.cache
def _handler_changes(code: CodeType) -> frozenset[int]:
    """The offsets in ``code`` where a line starts under another exception handler than the
    instruction before it, which runs into it: the first line of a ``try``, the first line of
    a ``finally`` run after its ``try`` completed, and 3.11's ``NOP`` of a ``try:`` that opens a
    ``with`` block (outside the block's handler)."""
    entries = dis.Bytecode(code).exception_entries

    def handler(offset: int) -> int | None:
        return next((e.target for e in entries if e.start <= offset < e.end), None)

    ins = list(dis.get_instructions(code))
    return frozenset(
        now.offset
        for before, now in itertools.pairwise(ins)
        if now.starts_line is not None
        and before.opname not in _NO_FALL_THROUGH
        and handler(before.offset) != handler(now.offset)
    )


def _counted(frame: FrameType) -> bool:
    """Whether a line event of ``frame`` is a point where an interrupt may land. A tracer's
    exception at a line's start stands for a signal at the last point CPython checked for one
    before it: after a call returned (``gc.disable()``, then ``try:``), a backward jump, a
    function's start. Not where no such point lies between the line and code under another
    handler, or the tracer's exception is handled as no signal's can be:

    - the exit of a ``with`` block: the tracer runs before ``__exit__`` is called and outside
      the block's handler, so its exception skips ``__exit__`` (a lock stays held, and the next
      call waits for it forever), where a signal's handler runs only once that call returned;
    - a line that starts under another handler than the instruction that runs into it
      (:func:`_handler_changes`): a ``try``'s first line, whose handler no signal before it
      reaches; a ``finally`` run after its ``try`` completed, whose body a signal at the
      ``try``'s last call runs whole; a ``try:`` that opens a ``with`` block, which 3.11 leaves
      outside the block's handler (``with lock:`` then ``try:``: the lock stays held), where a
      signal is checked for neither in entering the block nor at that ``NOP``."""
    return frame.f_lasti not in _with_exits(frame.f_code) and frame.f_lasti not in _handler_changes(frame.f_code)


def interrupted_at(
    k: int | Callable[[FrameType, int], bool], call: Callable[[], object], within: str = LORAHOT
) -> tuple[Hit, BaseException | None]:
    """Runs ``call`` raising ``KeyboardInterrupt`` at the k-th line event in a frame of
    lorahot's code (of the files under ``within``), or at the first for which ``k(frame, event
    number)`` is true. Returns where it was raised and what ``call`` raised."""
    hit = Hit()

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and _counted(frame):
            hit.lines += 1
            if (hit.lines == k) if isinstance(k, int) else (hit.function is None and k(frame, hit.lines)):
                hit.function = f"{frame.f_code.co_qualname} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
                hit.line = frame.f_code.co_filename, frame.f_lineno
                raise KeyboardInterrupt(f"line event {k}")
        return local

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_filename.startswith(within) else None

    raised: BaseException | None = None
    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        call()
    except BaseException as exc:
        raised = exc
    finally:
        sys.settrace(previous)
    return hit, raised


def lines_run(call: Callable[[], object]) -> tuple[int, dict[Line, int]]:
    """The line events of an uninterrupted ``call`` and, for each distinct line it runs, the k
    of its first run."""
    first: dict[Line, int] = {}
    count = 0

    def local(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal count
        if event == "line" and _counted(frame):
            count += 1
            first.setdefault((frame.f_code.co_filename, frame.f_lineno), count)
        return local

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_filename.startswith(LORAHOT) else None

    previous = sys.gettrace()
    gc.collect()
    gc.disable()  # no finalizer of an earlier rig runs in the call
    sys.settrace(calls)
    try:
        call()
    finally:
        sys.settrace(previous)
        gc.enable()
    return count, first


def points(count: int, most: int | None) -> list[int]:
    """Every k of a call of ``count`` line events; with ``most``, about that many at a stride."""
    if most is None or count <= most:
        return list(range(1, count + 1))
    return list(range(1, count + 1, math.ceil(count / most)))


def _first_run(line: Line) -> Callable[[FrameType, int], bool]:
    """The first line event on ``line``."""
    return lambda frame, k: (frame.f_code.co_filename, frame.f_lineno) == line


def targets(
    count: int, first: dict[Line, int], mode: int | str
) -> list[tuple[int | Callable[[FrameType, int], bool], str]]:
    """Where to interrupt a call of ``count`` line events (:func:`lines_run`), each with how
    to name it: ``"lines"``, every distinct line at its first run (by the line, not by its k,
    so that a path that differs in the interrupted run shows as a line missed); ``"events"``,
    every k; a number, about that many k at a stride."""
    if mode == "lines":
        return [
            (_first_run(line), f"the first run of {Path(line[0]).name}:{line[1]} (line event {k} of {count})")
            for line, k in sorted(first.items(), key=lambda item: item[1])
        ]
    return [(k, f"line event {k} of {count}") for k in points(count, None if mode == "events" else int(mode))]


# -- the rig: a Linear, a grouped Conv2d and an Embedding, two slots --------------------------


@functools.cache
def _pristine() -> nn.Module:
    """The base model that :func:`_base` copies (never injected)."""
    model = tiny_convnet(seed=0)
    model.conv = nn.Conv2d(8, 8, 3, padding=1)
    return model.double()


def _base() -> nn.Module:
    """``embed`` -> ``conv`` (a Conv2d of one group: merged mode folds it) -> ``proj``: a fresh
    copy of the same weights each time (a copy, not a build: the sweep makes one per
    interrupt, and ``torch.manual_seed`` records a stack trace for each lazy device seed)."""
    return copy.deepcopy(_pristine())


def _adapter(seed: int, dora: bool = False) -> dict[str, torch.Tensor]:
    tensors = make_adapter(_base(), dict.fromkeys(TARGETS, 2), seed=seed, dtype=torch.float64)[0]
    if dora:  # a DoRA magnitude on the Linear
        gen = torch.Generator().manual_seed(seed)
        tensors[f"{PREFIX}proj.lora_magnitude_vector"] = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    return tensors


#: name -> tensors (the float64 reference reads them too)
ADAPTERS = {"a1": _adapter(1), "a2": _adapter(2), "a3": _adapter(3), "d4": _adapter(4, dora=True)}


@dataclass
class Rig:
    """An injected model and what each slot serves: ``(adapter name, weight)`` parts, or None."""

    model: nn.Module
    runtime: lorahot.LoraRuntime
    files: dict[str, Path]
    served: list[list[tuple[str, float]] | None] = field(default_factory=lambda: [None, None])
    #: holds the prefetch thread until set (see _prefetched)
    gate: threading.Event = field(default_factory=threading.Event)


def _rig(merged: bool, files: dict[str, Path], slot1: str = "a2", stack0: bool = False, active: int = 0) -> Rig:
    """Slot 0 holds a1 (or a stack of a2 and a3), slot 1 ``slot1``; ``active`` is active."""
    model = _base()
    runtime = lorahot.inject(model, TARGETS, max_rank=4, slots=2, merged=merged, extras=True)
    rig = Rig(model, runtime, files)
    if stack0:
        runtime.load([ADAPTERS["a2"], ADAPTERS["a3"]], slot=0, scale=[0.5, -1.0])
        rig.served[0] = [("a2", 0.5), ("a3", -1.0)]
    else:
        runtime.load(ADAPTERS["a1"], slot=0)
        rig.served[0] = [("a1", 1.0)]
    runtime.load(ADAPTERS[slot1], slot=1)
    rig.served[1] = [(slot1, 1.0)]
    runtime.activate(active)
    return rig


def _dora_weight(w: torch.Tensor, tensors: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """PEFT's DoRA weight of the Linear: ``m * (W + s B A) / ||W + s B A||`` by output row."""
    a, b = tensors[f"{PREFIX}proj.lora_A.weight"], tensors[f"{PREFIX}proj.lora_B.weight"]
    adapted = w + scale * b @ a
    return tensors[f"{PREFIX}proj.lora_magnitude_vector"][:, None] * adapted / adapted.norm(dim=1, keepdim=True)


def reference(parts: list[tuple[str, float]] | None, ids: torch.Tensor = IDS) -> torch.Tensor:
    """The float64 dense output of the base model serving ``parts`` (None: the base model)."""
    model = _base()
    loras = []
    for name, weight in parts or []:
        tensors = ADAPTERS[name]
        if f"{PREFIX}proj.lora_magnitude_vector" in tensors:  # PEFT's DoRA: the adapted weight rescaled
            with torch.no_grad():
                model.proj.weight.copy_(_dora_weight(model.proj.weight, tensors, weight))
        dora = f"{PREFIX}proj.lora_magnitude_vector" in tensors
        keys = {t: peft_keys(model.get_submodule(t), t) for t in TARGETS if not (dora and t == "proj")}
        loras.append({t: (tensors[ka], tensors[kb], weight) for t, (ka, kb) in keys.items()})
    return stack_reference(model, ids, loras)


# -- what a call may leave -------------------------------------------------------------------


def state(rig: Rig) -> dict[str, Any]:
    """Every parameter and buffer of the model (the arenas included) and every tensor a module
    holds as an attribute, the modules' kinds and hooks, and the runtime's slots: ``info`` of
    each, the active slot, the routing."""
    seen = model_state(rig.model)
    runtime = rig.runtime
    try:
        seen["infos"] = [runtime.info(s) for s in range(runtime.slots)]
        seen["active"], seen["routing"] = runtime.active_slot, runtime.routing
    except lorahot.UsageError as exc:  # ejected, or an eject under way
        seen["infos"] = str(exc)
    return seen


def model_state(model: nn.Module) -> dict[str, Any]:
    """:func:`state` of the model alone."""
    seen: dict[str, Any] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        hooks = (module._forward_pre_hooks, module._forward_hooks)
        loads = (module._load_state_dict_pre_hooks, module._load_state_dict_post_hooks)
        seen[f"module {name}"] = (type(module).__name__, *map(len, hooks), *map(len, loads))
        tensors = {**module._parameters, **module._buffers}
        tensors.update((k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor))
        for key, tensor in tensors.items():
            if tensor is not None:
                seen[f"{name}.{key}"] = tensor.detach().clone()
    return seen


def differences(now: dict[str, Any], then: dict[str, Any]) -> list[str]:
    """The entries of two :func:`state` s that differ (tensors bitwise)."""
    out = list(now.keys() ^ then.keys())
    for key in now.keys() & then.keys():
        a, b = now[key], then[key]
        same = (
            isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
            if isinstance(a, torch.Tensor)
            else a == b
        )
        if not same:
            out.append(key)
    return sorted(out)


def served(rig: Rig) -> torch.Tensor:
    with torch.no_grad():
        return rig.model(IDS)


@dataclass(frozen=True)
class Call:
    """One call on a rig and the float64 reference of what the model serves after it."""

    name: str
    run: Callable[[Rig], object]
    expected: Callable[[Rig], torch.Tensor]
    slot1: str = "a2"
    stack0: bool = False
    active: int = 0
    #: the slot an interrupted write empties (as unload does), if the call writes one
    writes: int | None = None
    merged: tuple[bool, ...] = (False, True)


def _active(parts: list[tuple[str, float]] | None) -> Callable[[Rig], torch.Tensor]:
    return lambda rig: reference(parts)


def _rows(first: list[tuple[str, float]], second: list[tuple[str, float]]) -> Callable[[Rig], torch.Tensor]:
    return lambda rig: torch.cat([reference(first)[:1], reference(second)[1:]])


class _Held(os.PathLike[str]):
    """A file's path that the prefetch thread reads only once ``gate`` is set (10 s at most)."""

    def __init__(self, path: Path, gate: threading.Event) -> None:
        self.path, self.gate = path, gate

    def __fspath__(self) -> str:
        if threading.current_thread() is not threading.main_thread():
            self.gate.wait(10)
        return os.fspath(self.path)


def _prefetched(rig: Rig) -> None:
    """Queues a prefetch of a3 under the key ``"k3"`` behind one held by the rig's gate."""
    rig.runtime.prefetch(_Held(rig.files["a1"], rig.gate))
    rig.runtime.prefetch(rig.files["a3"], key="k3")


def _load_prefetched(rig: Rig) -> object:
    """``load("k3")`` while its prefetch is queued: the gate opens once the load waits for it
    (in 20 ms), or has opened where the load runs again."""
    threading.Timer(0.02, rig.gate.set).start()
    return rig.runtime.load("k3", slot=0)


A1, A2 = [("a1", 1.0)], [("a2", 1.0)]
STACK = [("a2", 0.5), ("a3", -1.0)]

CALLS = [
    Call("load mapping", lambda rig: rig.runtime.load(ADAPTERS["a3"], slot=0), _active([("a3", 1.0)]), writes=0),
    Call("load file", lambda rig: rig.runtime.load(rig.files["a3"], slot=0), _active([("a3", 1.0)]), writes=0),
    Call(
        "load host cache",
        lambda rig: rig.runtime.load(rig.files["a3"], slot=0),
        _active([("a3", 1.0)]),
        writes=0,
    ),  # the rig preloads the file (see _setup)
    Call("load prefetched", _load_prefetched, _active([("a3", 1.0)]), writes=0),  # the rig prefetches (_setup)
    Call(
        "load stack",
        lambda rig: rig.runtime.load([ADAPTERS["a2"], ADAPTERS["a3"]], slot=0, scale=[0.5, -1.0]),
        _active(STACK),
        writes=0,
    ),
    Call("load dora", lambda rig: rig.runtime.load(ADAPTERS["d4"], slot=0), _active([("d4", 1.0)]), writes=0),
    Call("activate slot", lambda rig: rig.runtime.activate(1), _active(A2)),
    Call("activate dora slot", lambda rig: rig.runtime.activate(1), _active([("d4", 1.0)]), slot1="d4"),
    Call("activate routing", lambda rig: rig.runtime.activate([0, 1]), _rows(A1, A2), merged=(False,)),
    Call("set_scale float", lambda rig: rig.runtime.set_scale(0.5), _active([("a1", 0.5)]), writes=0),
    Call(
        "set_scale dora", lambda rig: rig.runtime.set_scale(0.5), _active([("d4", 0.5)]), slot1="d4", active=1, writes=1
    ),
    Call(
        "set_scale parts",
        lambda rig: rig.runtime.set_scale([2.0, 0.25]),
        _active([("a2", 2.0), ("a3", 0.25)]),
        stack0=True,
        writes=0,
    ),
    Call("unload slot", lambda rig: rig.runtime.unload(0), _active(None)),
    Call("unload all", lambda rig: rig.runtime.unload(), _active(None)),
    Call("eject", lambda rig: rig.runtime.eject(), _active(None)),
]


# -- the sweep -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap() -> None:
    """:func:`lines_run` collects the garbage before each call it counts, so that no finalizer
    of an earlier rig runs in it: what earlier tests left alive is moved out of the collector's
    generations first (:func:`tests.helpers.freeze_the_heap`), so each collection walks what these
    tests made, every rig among them, and collects it as before."""
    freeze_the_heap()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: save_peft(root / name, tensors, r=2, lora_alpha=2) for name, tensors in ADAPTERS.items()}


def _content(call: Call, slot: int) -> tuple[Any, dict[str, Any]]:
    """The arguments of the load that filled ``slot`` of ``call``'s rig."""
    if slot == 1:
        return ADAPTERS[call.slot1], {"slot": 1}
    if call.stack0:
        return [ADAPTERS["a2"], ADAPTERS["a3"]], {"slot": 0, "scale": [0.5, -1.0]}
    return ADAPTERS["a1"], {"slot": 0}


def _setup(call: Call, merged: bool, files: dict[str, Path]) -> Rig:
    rig = _rig(merged, files, call.slot1, call.stack0, call.active)
    if call.name == "load host cache":
        rig.runtime.preload(files["a3"])
    if call.name == "load prefetched":
        _prefetched(rig)
    return rig


def sweep(call: Call, merged: bool, files: dict[str, Path], mode: int | str) -> dict[str, Any]:
    """Interrupts ``call`` at the points :func:`targets` names for ``mode`` and checks what
    each leaves (see the module's docstring). Returns what it saw: the outcomes by kind, the
    distinct lines interrupted and the call's line events."""
    known = ends(call, merged, files)  # memos warm: later runs take the path the counted one takes
    rig = _setup(call, merged, files)
    count, first = lines_run(lambda: call.run(rig))
    outcomes: dict[str, int] = {}
    interrupted: set[Line] = set()
    for k, at in targets(count, first, mode):
        hit, outcome = check_interrupted(call, merged, files, k, known, at)
        if hit.line is not None:
            interrupted.add(hit.line)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if mode in ("lines", "events"):  # every line the call runs was interrupted
        missed = sorted(f"{Path(file).name}:{n}" for file, n in first.keys() - interrupted)
        assert not missed, f"{call.name}: lines never interrupted: {missed}"
    return {"outcomes": outcomes, "lines": len(interrupted), "events": count}


@dataclass
class Ends:
    """The states a call may leave (:func:`state`) and the reference output after it."""

    before: dict[str, Any]
    after: dict[str, Any]
    emptied: dict[str, Any] | None
    expected: torch.Tensor


def ends(call: Call, merged: bool, files: dict[str, Path]) -> Ends:
    rig = _setup(call, merged, files)
    before = state(rig)
    call.run(rig)
    emptied = None
    if call.writes is not None:
        empty = _setup(call, merged, files)
        empty.gate.set()  # its prefetches, if any, run on
        empty.runtime.unload(call.writes)
        emptied = state(empty)
    return Ends(before, state(rig), emptied, call.expected(rig))


def check_interrupted(
    call: Call, merged: bool, files: dict[str, Path], k: int | Callable[[FrameType, int], bool], ends: Ends, at: str
) -> tuple[Hit, str]:
    """``call`` on a fresh rig, interrupted at ``k`` (:func:`interrupted_at`): the interrupt
    goes on, the rig holds one of ``ends``' states, then the call goes through and the model
    computes the reference. Returns where it was interrupted (``hit.line`` None: the call ran
    to its end first) and the outcome."""
    rig = _setup(call, merged, files)
    gc.disable()  # no finalizer of an earlier rig runs in the call (an interrupt there is only printed)
    try:
        hit, raised = interrupted_at(k, lambda: call.run(rig))
    finally:
        gc.enable()
    if hit.function is None:
        return hit, ""
    where = f"{call.name} interrupted at {at}, in {hit.function}"
    assert isinstance(raised, KeyboardInterrupt), f"{where}: raised {raised!r}, not the interrupt"
    outcome = _outcome(rig, call, ends.before, ends.after, ends.emptied, where)
    if outcome == "emptied":  # what the interrupted write emptied is loaded again
        source, options = _content(call, call.writes)  # type: ignore[arg-type]  # writes is set: emptied
        rig.runtime.load(source, **options)
    if outcome != "after" or call.name != "eject":
        call.run(rig)  # the runtime serves on: the call (again) goes through
    left = differences(state(rig), ends.after)
    assert not left, f"{where}: {outcome}, then the call again left {left}"
    torch.testing.assert_close(served(rig), ends.expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{where}: {m}")
    return hit, outcome


def _outcome(
    rig: Rig, call: Call, before: dict[str, Any], after: dict[str, Any], emptied: dict[str, Any] | None, where: str
) -> str:
    """Which state an interrupted call left: ``before``, ``after``, ``emptied`` (its slot, an
    interrupted write) or ``unfinished`` (an eject, finished by the next)."""
    now = state(rig)
    if not differences(now, before):
        return "before"
    if not differences(now, after):
        return "after"
    if emptied is not None and not differences(now, emptied):
        return "emptied"
    if call.name == "eject":
        with pytest.raises(lorahot.UsageError, match="did not finish"):
            rig.runtime.unload()
        return "unfinished"
    raise AssertionError(
        f"{where}: left a mix: against before {differences(now, before)}, against after {differences(now, after)}"
        + ("" if emptied is None else f", against the emptied slot {differences(now, emptied)}")
    )


CASES = [
    pytest.param(c, m, id=f"{c.name.replace(' ', '_')}-{'merged' if m else 'unmerged'}")
    for c in CALLS
    for m in c.merged
]


@pytest.mark.parametrize(("call", "merged"), CASES)
def test_an_interrupted_call_changes_nothing_or_completes(call: Call, merged: bool, files: dict[str, Path]) -> None:
    sweep(call, merged, files, FAST_POINTS)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LORAHOT_EVERY_LINE"),
    reason="every line of every call: LORAHOT_EVERY_LINE=1 (each distinct line), =events (every line event)",
)
@pytest.mark.parametrize(("call", "merged"), CASES)
def test_an_interrupted_call_changes_nothing_or_completes_at_every_line(
    call: Call, merged: bool, files: dict[str, Path]
) -> None:
    sweep(call, merged, files, "events" if os.environ["LORAHOT_EVERY_LINE"] == "events" else "lines")


def _on(text: str, nth: int = 1) -> Callable[[FrameType, int], bool]:
    """The ``nth`` line event on the line of lorahot's code reading ``text`` (stripped)."""
    seen: list[int] = []

    def at(frame: FrameType, k: int) -> bool:
        if linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip() == text:
            seen.append(k)
        return len(seen) == nth

    return at


def _in(function: str, nth: int) -> Callable[[FrameType, int], bool]:
    """The ``nth`` line event in frames of ``function`` (its qualified name)."""
    seen: list[int] = []

    def at(frame: FrameType, k: int) -> bool:
        if frame.f_code.co_qualname == function:
            seen.append(k)
        return len(seen) == nth

    return at


#: points where an interrupt left a mix, each a regression test of its fix
KNOWN = {
    # Arena.copy_region recorded dst's extras as reset after its device copy: an interrupt in
    # between left the live region's DoRA rows that emptying the slot then did not reset
    "copy recorded after": ("load dora", "self.e_dirty[dst] = self.e_dirty[src]", 1),
    # the loop over the slots of unload() ran outside each slot's try: an interrupt between two
    # slots left the rest holding their adapters
    "between two slots": ("unload all", "for s in slots:", 2),
    # set_scale noted the new weights before marking the slot written: an interrupt in between
    # was taken for one before any change, info() naming weights no buffer held
    "weights before written": ("set_scale float", "self.buffers.touched = True  # a replay writes too", 1),
    # (the note of a call under way, reset by a finally an interrupt could skip, refused every later
    # call on that thread: found at the first line of that finally run after its try completed,
    # which no signal reaches (_counted skips it now); calls are refused by the lock's owner since)
    # eject marked the runtime ejected a line before it moved the callbacks that take the layers out
    # to the unfinished ones: interrupted in between, every call refused and no eject took them out
    "ejected before its callbacks": ("eject", "RuntimeState.mark_ejected", 4),
}


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("point", list(KNOWN))
def test_an_interrupt_at_a_point_that_left_a_mix(point: str, merged: bool, files: dict[str, Path]) -> None:
    name, text, nth = KNOWN[point]
    call = next(c for c in CALLS if c.name == name)
    at = _in(text, nth) if "." in text and " " not in text else _on(text, nth)
    hit, _ = check_interrupted(call, merged, files, at, ends(call, merged, files), repr(text))
    assert hit.function is not None, f"{text!r} never ran"


#: functions at any of whose line events an interrupt left a mix, each a regression test of its fix
KNOWN_FUNCTIONS = {
    # Arena._write_extras reset a region's extras (zeroed, then the defaults added) before it
    # recorded them as changed: interrupted in between, emptying the slot took them for the
    # defaults and left them zero (a DoRA factor of 0 on every layer of the arena)
    "extras reset before recorded": ("load dora", "Arena._reset_extras"),
}


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("point", list(KNOWN_FUNCTIONS))
def test_an_interrupt_at_each_line_of_a_function_that_left_a_mix(
    point: str, merged: bool, files: dict[str, Path]
) -> None:
    name, function = KNOWN_FUNCTIONS[point]
    call = next(c for c in CALLS if c.name == name)
    known = ends(call, merged, files)
    nth = 1
    while check_interrupted(call, merged, files, _in(function, nth), known, f"{function}, line event {nth}")[0].line:
        nth += 1
    assert nth > 1, f"{function} never ran"


def _biased(seed: int) -> lorahot.Adapter:
    """A rank-2 adapter of :func:`_biased_model` with a LoRA bias (PEFT's ``lora_bias``) on ``0``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (n_in, n_out) in {"0": (6, 5), "1": (5, 4)}.items():
        tensors[f"{name}.lora_A.weight"] = torch.randn(2, n_in, generator=gen, dtype=torch.float64)
        tensors[f"{name}.lora_B.weight"] = torch.randn(n_out, 2, generator=gen, dtype=torch.float64)
    tensors["0.lora_B.bias"] = torch.randn(5, generator=gen, dtype=torch.float64)
    return lorahot.read_adapter(tensors, config={"r": 2, "lora_alpha": 2, "lora_bias": True})


def _biased_model() -> tuple[nn.Module, lorahot.LoraRuntime]:
    """float64 ``Linear(6, 5) -> Linear(5, 4)``, two slots: slot 0 (active) holds an adapter
    without LoRA biases, so its extras are the defaults."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4, bias=False)).double()
    runtime = lorahot.inject(model, ["0", "1"], max_rank=8, slots=2, extras=True)
    runtime.load(make_adapter(model, {"0": 2, "1": 2}, seed=3, dtype=torch.float64)[0], slot=0)
    return model, runtime


@pytest.mark.parametrize("what", ["load", "set_scale"])
def test_an_interrupted_write_of_summed_lora_biases_leaves_no_bias_in_the_emptied_slot(what: str) -> None:
    """A stack whose two parts carry a LoRA bias on one layer has their sum written into the
    extras (:mod:`lorahot.runtime.bias_sums`). Interrupted at each line of that write (a load
    of the stack into the live slot, or its set_scale), the slot is emptied: every parameter
    and buffer bitwise as after ``unload(0)``, the model's output the base one. The write
    recorded the extras as changed after copying the sums: interrupted in between, emptying
    the slot kept the summed biases, which the base model then added (unmerged: merged mode
    folds them into the weights)."""
    stack = [_biased(1), _biased(2)]

    def rig() -> tuple[nn.Module, lorahot.LoraRuntime]:
        model, runtime = _biased_model()
        if what == "set_scale":
            runtime.load(stack, slot=0, scale=[1.0, 0.5])
        return model, runtime

    def call(runtime: lorahot.LoraRuntime) -> object:
        return runtime.load(stack, slot=0, scale=[1.0, 0.5]) if what == "load" else runtime.set_scale([2.0, -1.0])

    model, runtime = rig()
    runtime.unload(0)
    emptied = model_state(model)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        base = model(x)
    nth = 1
    while True:
        model, runtime = rig()
        hit, raised = interrupted_at(_in("BiasSums.write", nth), lambda runtime=runtime: call(runtime))
        if hit.function is None:
            break
        where = f"{what} interrupted at line event {nth} of BiasSums.write, in {hit.function}"
        assert isinstance(raised, KeyboardInterrupt), f"{where}: raised {raised!r}"
        assert runtime.info(0) is None, f"{where}: slot 0 not emptied"
        assert not differences(model_state(model), emptied), f"{where}: left {differences(model_state(model), emptied)}"
        with torch.no_grad():
            assert torch.equal(model(x), base), where
        nth += 1
    assert nth > 2, "BiasSums.write never ran"


def _entering(function: str, nth: int) -> Callable[[FrameType, int], bool]:
    """The ``nth`` line event in frames of the generator ``function`` (its qualified name)
    before it first yields: in entering the context manager it makes."""
    seen: list[int] = []

    def at(frame: FrameType, k: int) -> bool:
        code = frame.f_code
        if code.co_qualname == function and frame.f_lasti < _first_yield(code):
            seen.append(k)
        return len(seen) == nth

    return at


@functools.cache
def _first_yield(code: CodeType) -> int:
    return next(i.offset for i in dis.get_instructions(code) if i.opname == "YIELD_VALUE")


def test_an_interrupted_load_leaves_the_garbage_collector_on(files: dict[str, Path]) -> None:
    """A load pauses Python's cyclic garbage collector (``lora_runtime._gc_paused``). It turned
    it off a statement before the ``try`` whose ``finally`` turns it on again: an interrupt at
    the return of ``gc.disable()`` left it off for the rest of the process. Interrupted at each
    line of entering that pause, the collector is on again."""
    rig = _rig(False, files)
    assert gc.isenabled()
    nth = 1
    while True:
        at = _entering("_gc_paused", nth)
        hit, raised = interrupted_at(at, lambda: rig.runtime.load(ADAPTERS["a3"], slot=1))
        on = gc.isenabled()
        gc.enable()
        if hit.function is None:
            break
        assert isinstance(raised, KeyboardInterrupt), f"interrupted at {hit.function}: raised {raised!r}"
        assert on, f"interrupted at {hit.function}: the garbage collector is left off"
        nth += 1
    assert nth > 3, f"entering _gc_paused ran {nth - 1} lines"


def test_an_interrupted_move_of_the_model_leaves_every_layer_its_arenas(files: dict[str, Path]) -> None:
    """``model.double()`` (``model.to``, ``half``: ``nn.Module._apply``) runs each LoRA layer's
    ``_apply``, which takes its arena buffers out of its buffers for the move and puts them back
    in a ``finally``. It took them out a statement before that ``try``: an interrupt at the
    return of the update left the layer without its arenas (None), and every later forward
    failed. Interrupted at each line of those ``_apply``, every layer holds its arenas and the
    model serves slot 0's adapter."""
    nth = 1
    while True:
        rig = _rig(False, files)
        layers = [m for m in rig.model.modules() if isinstance(m, lorahot.LoRALayer)]
        arenas = [{n: b for n, b in layer._buffers.items() if n.startswith("_lora_arena_")} for layer in layers]
        hit, raised = interrupted_at(_in("LoRALayer._apply", nth), rig.model.double)
        if hit.function is None:
            break
        where = f"model.double() interrupted at {hit.function}"
        assert isinstance(raised, KeyboardInterrupt), f"{where}: raised {raised!r}"
        for layer, kept in zip(layers, arenas, strict=True):
            assert all(layer._buffers[n] is not None for n in kept), f"{where}: arenas taken out"
        torch.testing.assert_close(
            served(rig), reference(A1), rtol=1e-10, atol=1e-10, msg=lambda m, where=where: f"{where}: {m}"
        )
        nth += 1
    assert nth > 3, f"LoRALayer._apply ran {nth - 1} lines"


def test_an_interrupted_read_returns_once_no_chunk_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file's tensor data is read in chunks on reader threads (``tensorfile._read_into``),
    into a read buffer the next load reuses, from a file descriptor closed once the read
    returns. The chunks were submitted in a list comprehension before the ``try`` whose
    ``finally`` waits for them: an interrupt between two submissions left the chunks
    submitted reading after the load had gone, into the buffer and from a descriptor number
    the next open may take. Interrupted at each line of a read of four chunks (each taking
    10 ms), no chunk runs once the read has returned."""
    monkeypatch.setattr(tensorfile, "_CHUNK", 64)
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)))
    lock, reads = threading.Lock(), []  # (start, end) of each chunk's read
    real = os.preadv

    def slow(fd: int, buffers: list[memoryview], offset: int) -> int:
        start = time.monotonic()
        time.sleep(0.01)
        got = real(fd, buffers, offset)
        with lock:
            reads.append((start, time.monotonic()))
        return got

    monkeypatch.setattr(tensorfile.os, "preadv", slow)
    nth = 1
    while True:
        reads.clear()
        buf = torch.zeros(256, dtype=torch.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            read = functools.partial(tensorfile._read_into, fd, path, 0, buf)
            hit, raised = interrupted_at(_in_file("tensorfile.py", nth), read)
            returned = time.monotonic()
            time.sleep(0.03)  # any chunk left running ends meanwhile
        finally:
            os.close(fd)
        if hit.function is None:
            break
        assert isinstance(raised, KeyboardInterrupt), f"interrupted at {hit.function}: raised {raised!r}"
        late = [r for r in reads if r[1] > returned]
        assert not late, f"interrupted at {hit.function}: {len(late)} chunks read after the read returned"
        nth += 1
    assert nth > 3 and len(reads) == 4, f"_read_into ran {nth - 1} lines, {len(reads)} chunks"


def test_an_interrupted_prefetch_leaves_its_key_no_source_to_read(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prefetch(path, key="k3")`` queues the prefetch, then notes the key as pending, so that a
    ``load("k3")`` meanwhile waits for it. Interrupted between the two, a load of "k3" while the
    prefetch was still queued read "k3" as a path or Hub id (a request to the Hub, or another
    file of that name). Interrupted at each line of the prefetch (the prefetch thread held
    meanwhile), a load of "k3" right after loads a3 or is refused (UsageError) as a key with no
    entry, wherever the prefetch was queued; only one interrupted before any change reads it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a key read as a Hub id fails at once
    nth = 1
    while True:
        rig = _rig(False, files)
        rig.runtime.prefetch(_Held(files["a1"], rig.gate))  # holds the prefetch thread
        hit, raised = interrupted_at(
            _in("LoraRuntime.prefetch", nth), functools.partial(rig.runtime.prefetch, files["a3"], key="k3")
        )
        where = f"prefetch interrupted at {hit.function}"
        threading.Timer(0.02, rig.gate.set).start()
        read: lorahot.LoraError | None = None
        try:
            rig.runtime.load("k3", slot=0)
        except lorahot.UsageError as exc:
            assert "is a key given to preload" in str(exc), f"{where}: {exc}"
        except lorahot.LoraError as exc:
            read = exc
        else:
            torch.testing.assert_close(
                served(rig),
                reference([("a3", 1.0)]),
                rtol=1e-10,
                atol=1e-10,
                msg=lambda m, where=where: f"{where}: {m}",
            )
        rig.runtime.prefetch(files["a2"]).result()  # the prefetch thread ran what was queued before
        queued = "k3" in rig.runtime.cache
        assert not (queued and read), f"{where}: the prefetch was queued, and its key read as a source: {read!r}"
        if hit.function is None:
            break
        assert isinstance(raised, KeyboardInterrupt), f"{where}: raised {raised!r}"
        nth += 1
    assert nth > 3, f"prefetch ran {nth - 1} lines"


def _lines_holding(call: Callable[[], object], within: str, holding: Callable[[], bool]) -> list[Line]:
    """The lines of lorahot's files under ``within`` an uninterrupted ``call`` runs where an
    interrupt may land (:func:`_counted`) while ``holding()`` is true, in the order of their
    first run."""
    found: dict[Line, None] = {}

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line" and _counted(frame) and holding():
            found.setdefault((frame.f_code.co_filename, frame.f_lineno))
        return local

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_filename.startswith(within) else None

    previous = sys.gettrace()
    sys.settrace(calls)
    try:
        call()
    finally:
        sys.settrace(previous)
    return list(found)


def _descriptors() -> set[str]:
    """The file descriptors open in this process, each with what it is."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            found.add(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_an_interrupted_load_leaves_no_file_open(files: dict[str, Path]) -> None:
    """A load of a PEFT folder (its adapter_config.json and safetensors file, hashed again for
    the host cache), interrupted at the first run of each line it runs in lorahot.io while it
    holds a file open: no descriptor it opened stays open. The files were
    opened (``fd = open_regular(...)``, which checked the descriptor between its open and its
    return) before the ``try`` whose ``finally`` closed them: an interrupt at the ``try:`` line,
    or in ``open_regular`` after the open, left the descriptor open for good."""
    io = str(Path(LORAHOT) / "io")

    def load() -> None:
        runtime = lorahot.inject(_base(), TARGETS, max_rank=4)
        runtime.load(files["a3"])

    load()  # memos warm: later runs take the path the counted one takes
    gc.collect()
    gc.disable()  # what a run leaves is counted as it leaves it: no collection closes a file object
    try:
        before = _descriptors()
        held = _lines_holding(load, io, lambda: bool(_descriptors() - before))
        assert len(held) > 30, f"the load ran {len(held)} lines of lorahot.io with a file open"
        for line in held:
            before = _descriptors()
            hit, raised = interrupted_at(_first_run(line), load, within=io)
            assert hit.line is not None and isinstance(raised, KeyboardInterrupt), (line, raised)
            del raised  # its traceback holds the frames, and what their locals hold
            opened = _descriptors() - before
            assert not opened, f"a load interrupted at {hit.function}: left open {sorted(opened)}"
    finally:
        gc.enable()


#: the stand-in Hub's repo and commit (test_an_interrupted_hub_fetch_leaves_no_fetch_running)
_REPO, _COMMIT = "someone/adapter", "c" * 40


def test_an_interrupted_hub_fetch_leaves_no_fetch_running(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load of a Hub repo fetches its files on a worker thread the caller polls
    (``hub_watch._Watch.run``; the Hub is a local stand-in: a listing, and downloads of 20 ms
    that write each file whole into the cache). Interrupted at the first run of each line it
    runs of the fetch's files (hub.py and the hub_*.py beside it), no download starts and no
    branch's ref is written once the load has gone (the download under way then ends, whole),
    no ``*.incomplete`` or partial file is left in the cache, and the model is as it was. A
    download counts as started by the worker's step before it (the check of the abandonment),
    which may run just before the caller returns while the download itself is entered just
    after. The worker was started before the ``try`` whose ``finally`` abandons it: an
    interrupt at that ``try:`` line left it fetching every file and writing the ref after the
    load had gone."""
    import huggingface_hub
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    content = {name: (files["a3"] / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    starts: list[float] = []

    def repo_info(self: object, repo_id: str, **kwargs: object) -> object:
        siblings = [SimpleNamespace(rfilename=name) for name in content]
        return SimpleNamespace(sha=_COMMIT, siblings=siblings)

    def download(repo_id: str, filename: str, *, revision: str, token: object = None, **kwargs: object) -> str:
        starts.append(time.monotonic())
        time.sleep(0.02)
        path = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".incomplete")
        partial.write_bytes(content[filename])
        os.replace(partial, path)  # as huggingface_hub: complete files only
        return str(path)

    refs: list[float] = []  # when each write of a branch's ref ended
    record_ref = hub._record_ref
    passed: list[float] = []  # when each step the worker passed (the check before each download) began
    step = hub._Watch.step

    def checked(self: Any) -> None:
        began = time.monotonic()
        step(self)  # raises once the caller has abandoned the worker
        passed.append(began)

    def recorded(*args: Any) -> None:
        record_ref(*args)
        refs.append(time.monotonic())

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(hub, "_record_ref", recorded)
    monkeypatch.setattr(hub._Watch, "step", checked)
    hub_py = str(Path(LORAHOT) / "io" / "hub")  # a prefix: hub.py, hub_watch.py, hub_cache.py, ...
    repo = cache / f"models--{_REPO.replace('/', '--')}"

    def load(model: nn.Module) -> None:
        lorahot.inject(model, TARGETS, max_rank=4).load(_REPO)

    earlier = set(threading.enumerate())  # another test's abandoned fetch may still end
    model = _base()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    load(model)
    assert (repo / "refs" / "main").read_text() == _COMMIT
    shutil.rmtree(cache)
    _, first = lines_run(lambda: load(_base()))
    lines = [line for line in sorted(first, key=first.__getitem__) if line[0].startswith(hub_py)]
    assert len(lines) > 20, f"the fetch ran {len(lines)} lines of the Hub fetch's files"
    for line in lines:
        shutil.rmtree(cache, ignore_errors=True)
        starts.clear()
        refs.clear()
        passed.clear()
        model = _base()
        hit, raised = interrupted_at(_first_run(line), functools.partial(load, model), within=hub_py)
        ended = time.monotonic()
        assert hit.line is not None and isinstance(raised, KeyboardInterrupt), (line, raised)
        where = f"a Hub load interrupted at {hit.function}"
        for thread in threading.enumerate():
            if thread.name == "lorahot-hub-fetch" and thread not in earlier:
                thread.join(10)
                assert not thread.is_alive(), f"{where}: the fetch is still running"
        # every download follows a step the worker passed, and no step begun once the load had
        # gone passes: the download a step passed just before may still be entering
        # hf_hub_download when the caller returns (a thread switch between the two), and ends whole
        late = [t for t in passed if t > ended]
        assert not late, f"{where}: {len(late)} downloads started after the load had gone"
        assert len(starts) <= len(passed), f"{where}: a download started without its step"
        assert not [t for t in refs if t > ended], f"{where}: the branch's ref was written after the load had gone"
        left = sorted(p.name for p in cache.rglob("*") if p.is_file() and p.name.endswith(".incomplete"))
        assert not left, f"{where}: left {left}"
        for path in cache.rglob("*"):
            if path.is_file() and path.name in content:
                assert path.read_bytes() == content[path.name], f"{where}: {path.name} half written"
        after = model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in base.items()), f"{where}: the model changed"


def _in_file(name: str, nth: int) -> Callable[[FrameType, int], bool]:
    """The ``nth`` line event in frames of code of lorahot's file ``name`` (``memo.py``)."""
    seen: list[int] = []

    def at(frame: FrameType, k: int) -> bool:
        if Path(frame.f_code.co_filename).name == name:
            seen.append(k)
        return len(seen) == nth

    return at


def _counted_memo() -> BoundedMemo[str, int]:
    """A memo full with three entries: the next miss evicts one."""
    memo: BoundedMemo[str, int] = BoundedMemo(
        max_bytes=3 * (100 + ENTRY_OVERHEAD), cost=lambda k, v: 100, max_entry=1000
    )
    for v, k in enumerate("abc"):
        memo.get(k, lambda v=v: v)
    return memo


@pytest.mark.parametrize("call", ["miss", "clear"])
def test_an_interrupted_change_of_a_memo_leaves_its_bytes_counted(call: str) -> None:
    """A memo (lorahot.memo, which a load's reads and checks fill) changed its total a statement
    apart from its entries: an interrupt in between left the total short of what the entries
    hold, for good, and the memo kept more than its budget. Interrupted at each line of a miss
    that evicts (or of clear), ``nbytes`` is what its entries cost, and the next miss keeps the
    budget."""
    nth = 1
    while True:
        memo = _counted_memo()
        run = functools.partial(memo.get, "d", lambda: 3) if call == "miss" else memo.clear
        hit, raised = interrupted_at(_in_file("memo.py", nth), run)
        if hit.function is None:
            break
        where = f"{call} interrupted at {hit.function}"
        assert isinstance(raised, KeyboardInterrupt), f"{where}: raised {raised!r}"
        assert memo.nbytes == sum(c for _, c in memo._entries.values()), where
        memo.get("e", lambda: 4)
        assert memo.nbytes == memo._total == sum(c for _, c in memo._entries.values()) <= memo.max_bytes, where
        nth += 1
    assert nth > 3, f"{call} ran {nth - 1} lines"


CACHE_CALLS: dict[str, Callable[[AdapterCache, list[PreparedAdapter]], object]] = {
    "put": lambda cache, entries: cache.put(entries[2]),  # evicts the first
    "discard": lambda cache, entries: cache.discard("k0"),
    "name": lambda cache, entries: cache.name("n1"),
    "unname": lambda cache, entries: cache.unname("k1"),  # a name with an entry: both go
    "budget": lambda cache, entries: setattr(cache, "budget_bytes", entries[1].nbytes),  # evicts
    "clear": lambda cache, entries: cache.clear(),
}


@pytest.mark.parametrize("call", list(CACHE_CALLS))
def test_an_interrupted_change_of_the_host_cache_leaves_its_bytes_counted(call: str) -> None:
    """The host cache (lorahot.runtime.cache) changed its entries' bytes, and its names' bytes,
    a statement apart from the entries and names: an interrupt (Ctrl-C in a preload) in
    between left the count off what they hold, for good, and the cache kept more than its
    budget (or less). Interrupted at each line of each change, ``nbytes`` is what its entries
    hold, and after the next put both counts are exact and within the budget."""
    runtime = lorahot.inject(_base(), TARGETS, max_rank=4, slots=2, extras=True)
    entries = [runtime.preload(ADAPTERS[a], key=f"k{i}") for i, a in enumerate(["a1", "a2", "a3"])]

    def cache() -> AdapterCache:
        made = AdapterCache(entries[0].nbytes + entries[1].nbytes)
        for entry in entries[:2]:
            made.put(entry)
        made.name("k1")
        return made

    nth = 1
    while True:
        held = cache()
        hit, raised = interrupted_at(_in_file("cache.py", nth), lambda held=held: CACHE_CALLS[call](held, entries))
        if hit.function is None:
            break
        where = f"{call} interrupted at {hit.function}"
        assert isinstance(raised, KeyboardInterrupt), f"{where}: raised {raised!r}"
        assert held.nbytes == sum(e.nbytes for e in held._entries.values()), where
        held.put(entries[0])
        assert held._total == held.nbytes == sum(e.nbytes for e in held._entries.values()) <= held.budget_bytes, where
        assert held._names_bytes == sum(held._names.values()), where
        nth += 1
    assert nth > 3, f"{call} ran {nth - 1} lines"


def _as_before_or_whole(model: nn.Module, raised: BaseException | None, before: dict[str, Any], where: str) -> None:
    """After an interrupted inject: the interrupt raised, and the model as ``before`` (modules,
    hooks, parameters and buffers bitwise), or, where it came after inject's last change,
    every target wrapped and eject giving ``before`` back."""
    assert isinstance(raised, KeyboardInterrupt), f"{where}: raised {raised!r}, not the interrupt"
    wrapped = [n for n in TARGETS if isinstance(model.get_submodule(n), lorahot.LoRALayer)]
    if wrapped:  # after its last change
        assert wrapped == TARGETS, f"{where}: left {wrapped} wrapped"
        lorahot.eject(model)
    assert not differences(model_state(model), before), f"{where}: left {differences(model_state(model), before)}"


@pytest.mark.parametrize("function", ["wrap_modules", "LoRALayer.attach"])
def test_an_inject_interrupted_while_it_puts_the_wrappers_in_place_leaves_the_model_as_it_was(function: str) -> None:
    """Each line event of inject's swap of the wrappers into the model (``wrap_modules``) and of
    each wrapper's hooks on its base module (``attach``): the model as before (modules, hooks,
    parameters and buffers bitwise), or, once every wrapper is in place, injected whole (eject
    gives the model before back bitwise), as for any point of inject. The swap was noted after it
    returned: an interrupt at that return left the last wrapper in place; an attach interrupted
    between its two hooks left one on the base module."""
    before = model_state(_base())
    nth = 1
    while True:
        model = _base()
        hit, raised = interrupted_at(_in(function, nth), lambda model=model: lorahot.inject(model, TARGETS, max_rank=4))
        if hit.function is None:
            break
        _as_before_or_whole(model, raised, before, f"inject interrupted at line event {nth} of {function}")
        nth += 1
    assert nth > 3, f"{function} ran {nth - 1} lines"


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_an_interrupted_inject_leaves_the_model_as_it_was(merged: bool) -> None:
    """inject interrupted at each point: the model as before it (its modules, hooks, parameters
    and buffers bitwise), or where the interrupt came after inject's last change, injected
    whole (every target wrapped, and eject gives the model before back bitwise); then inject
    goes through and serves an adapter as the float64 reference."""

    def inject(model: nn.Module) -> lorahot.LoraRuntime:
        return lorahot.inject(model, TARGETS, max_rank=4, slots=2, merged=merged, extras=True)

    before = model_state(_base())
    count, _ = lines_run(lambda: inject(_base()))
    for k in points(count, FAST_POINTS):
        model = _base()
        hit, raised = interrupted_at(k, lambda model=model: inject(model))
        if hit.function is None:
            continue
        _as_before_or_whole(
            model, raised, before, f"inject interrupted at line event {k} of {count}, in {hit.function}"
        )
        inject(model).load(ADAPTERS["a1"])
        torch.testing.assert_close(served(Rig(model, None, {})), reference(A1), rtol=1e-10, atol=1e-10)  # type: ignore[arg-type]
