"""BoundedMemo: an LRU bounded by the bytes its entries keep alive, not by their count."""

from __future__ import annotations

import pytest

from lorahot.memo import ENTRY_OVERHEAD, BoundedMemo, digest, str_bytes


def test_budget_evicts_least_recently_used() -> None:
    memo: BoundedMemo[str, int] = BoundedMemo(
        max_bytes=3 * (100 + ENTRY_OVERHEAD), cost=lambda k, v: 100, max_entry=1000
    )
    for k in "abc":
        assert memo.get(k, lambda k=k: ord(k)) == ord(k)
    memo.get("a", lambda: -1)  # a hit: "a" becomes the most recent
    memo.get("d", lambda: ord("d"))  # over budget: "b", the least recent, goes
    assert len(memo) == 3 and memo.nbytes <= memo.max_bytes
    assert memo.get("b", lambda: -2) == -2  # recomputed
    assert memo.get("a", lambda: -3) in (ord("a"), -3)


def test_large_entries_and_failures_are_not_stored() -> None:
    memo: BoundedMemo[str, object] = BoundedMemo(
        max_bytes=10_000, cost=lambda k, v: 5_000 if k == "big" else 10, max_entry=1_000
    )
    memo.get("big", lambda: "x")
    assert len(memo) == 0

    def fail() -> object:
        raise ValueError("rejected")

    with pytest.raises(ValueError):
        memo.get("bad", fail)
    assert len(memo) == 0
    assert memo.get("none", lambda: None) is None
    assert memo.get("none", lambda: "recomputed") is None  # None is a memoized value too


def test_str_bytes_and_digest() -> None:
    assert str_bytes("a" * 1000) < str_bytes("\U0001f600" * 1000)  # astral strings take 4 bytes a character
    assert digest(["a", "bc"]) != digest(["ab", "c"]) and digest(["a\0"]) != digest(["a", ""])
    assert len(digest(["\ud800"])) == 32  # lone surrogates digest too
