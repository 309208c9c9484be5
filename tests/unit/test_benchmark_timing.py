"""The benchmarks' timing helpers: what they call, in which order, and what they return."""

from __future__ import annotations

import time

import torch

from benchmarks.common import paired_ms


def test_paired_timing_takes_the_configurations_in_turn_with_each_setup_before_its_call() -> None:
    """Call by call, the order rotated each repeat, each setup right before its own call (a
    routing activated before the routed call, never before another configuration's)."""
    log: list[str] = []

    def turn(name: str, seconds: float) -> tuple[object, object]:
        return (lambda: log.append(f"setup {name}"), lambda: (log.append(name), time.sleep(seconds)))

    calls = {"a": turn("a", 0.002), "b": turn("b", 0.0), "c": (None, lambda: log.append("c"))}
    out = paired_ms(calls, torch.device("cpu"), repeat=4, warmup=1)  # type: ignore[arg-type]
    assert set(out) == {"a", "b", "c"}
    assert out["a"] >= 2.0 > out["b"]
    runs = [entry for entry in log if not entry.startswith("setup")]
    assert runs == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c", "b", "c", "a"]
    for i, entry in enumerate(log):
        if entry.startswith("setup "):
            assert log[i + 1] == entry.removeprefix("setup ")
