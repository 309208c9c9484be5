"""One process per configuration: prepared all at once, timed one at a time.

Compiling is mostly single-threaded host work, so configurations that would take minutes each
in one process can be prepared side by side; timing them side by side would measure their
contention, so the parent asks one worker at a time while the others wait on their pipe.

A worker is a function ``prepare(*args, note) -> (ready_payload, handlers)`` at the top level of
an importable module (the processes are spawned: it is pickled by reference). It builds and
checks its configuration, may call ``note(**fields)`` to tell the parent where it is (the latest
note is kept in :attr:`Workers.notes`), and returns what the parent gets as its "ready" payload
and ``{request: function}``: each request the parent sends (``"time"``, ...) is answered with
the function's result, until ``"stop"``. An exception anywhere comes back as its traceback.

    with Workers("rows", {name: (prepare, (arg, ...)) for name in names}) as pool:
        pool.wait_ready(deadline=...)            # {name: ready payload}; late ones are killed
        pool.rounds(names, 3, on_answer=..., on_round=...)
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

Prepare = Callable[..., tuple[Any, dict[str, Callable[[], Any]]]]


class WorkerFailed(RuntimeError):
    """A worker failed, died or missed the deadline (raised only by a ``strict`` pool)."""


@dataclass
class Failure:
    kind: str  # "error" (traceback in message), "died", "late" (killed at the deadline)
    message: str
    after_s: float  # seconds since the pool started


def _main(prepare: Prepare, args: tuple[Any, ...], conn: Connection) -> None:
    """The worker process: prepare, send "ready", answer requests until "stop"."""
    try:
        ready, handlers = prepare(*args, lambda **fields: conn.send(("note", fields)))
        conn.send(("ready", ready))
        while (request := conn.recv()) != "stop":
            conn.send(("answer", handlers[request]()))
    except BaseException:
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(("error", traceback.format_exc()))


class Workers:
    """Spawns one worker per name at once. ``strict``: the first failure raises
    :class:`WorkerFailed` (with the worker's traceback); otherwise it is recorded in
    :attr:`failed`, printed, and that worker is left out from then on. Leaving the ``with``
    block stops the workers, killing those still alive ``join_s`` seconds later."""

    def __init__(
        self, label: str, specs: dict[str, tuple[Prepare, tuple[Any, ...]]], strict: bool = False, join_s: float = 30.0
    ) -> None:
        self.label = label
        self.join_s = join_s
        self.strict = strict
        self.names = list(specs)
        self.ready: dict[str, Any] = {}
        self.failed: dict[str, Failure] = {}
        self.notes: dict[str, dict[str, Any]] = {}
        self.started = time.perf_counter()
        ctx = mp.get_context("spawn")
        self._procs: dict[str, Any] = {}
        self._conns: dict[str, Connection] = {}
        for name, (prepare, args) in specs.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_main, args=(prepare, args, child), daemon=True, name=f"{label}-{name}")
            proc.start()
            child.close()  # the parent's copy: a dead worker then reads as EOF
            self._procs[name], self._conns[name] = proc, parent

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(self.join_s)

    def live(self, names: list[str] | None = None) -> list[str]:
        """The ready workers not failed since, in the order of ``names`` (default: all)."""
        return [n for n in (names or self.names) if n in self.ready and n not in self.failed]

    def wait_ready(
        self, deadline: float | None = None, on_ready: Callable[[str, Any], None] | None = None
    ) -> dict[str, Any]:
        """Collects the ready payloads as they come (``on_ready`` for each). ``deadline``, a
        ``time.perf_counter()`` value: the workers not ready by then are killed and recorded as
        ``late``. Returns ``{name: payload}`` of the ready ones."""
        pending = [n for n in self.names if n not in self.ready and n not in self.failed]
        while pending:
            got = self._next(pending, deadline)
            if got is None:
                for name in pending:
                    self.fail(
                        name, "late", f"not ready by the deadline ({self._since():.0f} s after the workers started)"
                    )
                break
            name, kind, payload = got
            pending.remove(name)
            if kind == "ready":
                self.ready[name] = payload
                if on_ready is not None:
                    on_ready(name, payload)
            else:
                self._failure(name, kind, payload, "ready")
        return {n: self.ready[n] for n in self.names if n in self.ready}

    def request(self, name: str, what: str, deadline: float | None = None) -> Any:
        """Sends ``what`` to one worker and returns its answer; None if it failed (or did not
        answer by ``deadline``: then it is killed)."""
        try:
            self._conns[name].send(what)
        except (BrokenPipeError, OSError):
            self.fail(name, "died", f"died before {what!r} (exit code {self._procs[name].exitcode})")
            return None
        got = self._next([name], deadline)
        if got is None:
            self.fail(name, "late", f"no answer to {what!r} by the deadline")
            return None
        _, kind, payload = got
        if kind == "answer":
            return payload
        self._failure(name, kind, payload, what)
        return None

    def rounds(
        self,
        names: list[str],
        count: int,
        on_answer: Callable[[str, Any], None],
        on_round: Callable[[int], None] = lambda i: None,
        what: str = "time",
        deadline: float | None = None,
    ) -> int:
        """``count`` interleaved rounds: each live worker of ``names`` in turn answers ``what``
        while the others wait. With a deadline, a round that would end after it (by the
        previous round's durations) is not started. Returns the rounds done."""
        took: dict[str, float] = {}
        for i in range(count):
            live = self.live(names)
            if not live:
                return i
            if deadline is not None and i and time.perf_counter() + sum(took.get(n, 0.0) for n in live) > deadline:
                print(f"[{self.label}] no time for round {i + 1} before the deadline", flush=True)
                return i
            for name in live:
                t = time.perf_counter()
                answer = self.request(name, what, deadline)
                took[name] = time.perf_counter() - t
                if name not in self.failed:
                    on_answer(name, answer)
            on_round(i)
        return count

    def close(self, join_s: float = 30.0) -> None:
        """Asks every worker to stop; kills those still alive after ``join_s`` seconds."""
        for conn in self._conns.values():
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send("stop")
        end = time.perf_counter() + join_s
        for proc in self._procs.values():
            proc.join(timeout=max(0.0, end - time.perf_counter()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self._conns.values():
            conn.close()

    # --- internals ------------------------------------------------------------------------

    def _since(self) -> float:
        return time.perf_counter() - self.started

    def _next(self, names: list[str], deadline: float | None) -> tuple[str, str, Any] | None:
        """The next message other than a note from one of ``names``: ``(name, kind, payload)``,
        kind "died" if its process ended without one; None once ``deadline`` has passed."""
        while True:
            for name in names:
                conn, proc = self._conns[name], self._procs[name]
                while conn.poll():
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        proc.join(timeout=5)
                        return name, "died", proc.exitcode
                    if kind != "note":
                        return name, kind, payload
                    self.notes[name] = payload
                if not proc.is_alive() and not conn.poll():
                    return name, "died", proc.exitcode
            left = 1.0 if deadline is None else deadline - time.perf_counter()
            if left <= 0:
                return None
            wait([self._conns[n] for n in names] + [self._procs[n].sentinel for n in names], timeout=min(left, 1.0))

    def _failure(self, name: str, kind: str, payload: Any, during: str) -> None:
        if kind == "error":
            self.fail(name, "error", f"failed ({during}):\n{payload}")
        elif kind == "died":
            self.fail(name, "died", f"died ({during}; exit code {payload})")
        else:
            self.fail(name, "error", f"sent {kind!r} ({during})")

    def fail(self, name: str, kind: str, message: str) -> None:
        """Records a failure of ``kind`` and kills the worker (``strict``: raises)."""
        proc = self._procs[name]
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
        self.failed[name] = Failure(kind, message, round(self._since(), 1))
        text = f"{self.label} worker {name} {message}"
        if self.strict:
            raise WorkerFailed(text)
        print(f"[{text}]", flush=True)
