"""Read options and sources of the caller's own types (``config=``, ``key_map=``, ``fuse=``,
``split=``, a mapping of tensors, a hand-built Adapter's names): read once as plain data, so
that nothing of the caller's runs while lorahot parses them, or later."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import lorahot
from tests.reliability_helpers import Q0, assert_unchanged, build_rig, snapshot, valid_tensors, write_valid


class _RaisingItems(dict):
    """A dict whose reads raise (a lazy mapping over a store that failed, say)."""

    def items(self) -> Any:
        raise RuntimeError("store offline")

    def get(self, *args: Any) -> Any:
        raise RuntimeError("store offline")

    def __iter__(self) -> Any:
        raise RuntimeError("store offline")


class _RaisingStr(str):
    """A str whose comparisons and case changes raise."""

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparing")

    __hash__ = str.__hash__

    def lower(self) -> str:  # type: ignore[override]
        raise RuntimeError("no lower")

    def upper(self) -> str:  # type: ignore[override]
        raise RuntimeError("no upper")

    def encode(self, *args: Any, **kwargs: Any) -> bytes:  # type: ignore[override]
        raise RuntimeError("no encode")


class _RaisingInt(int):
    """An int whose comparisons raise."""

    def __lt__(self, other: object) -> bool:
        raise RuntimeError("no comparing")

    __le__ = __gt__ = __ge__ = __lt__  # type: ignore[assignment]


def _calls(rig: Any, source: Any) -> list[Callable[[dict[str, Any]], Any]]:
    return [
        lambda kw: lorahot.read_adapter(source, **kw),
        lambda kw: lorahot.plan_targets(source, **kw),
        lambda kw: rig.runtime.load(source, slot=1, **kw),
        lambda kw: rig.runtime.preload(source, **kw),
        lambda kw: rig.runtime.prefetch(source, **kw).result(timeout=60),
    ]


@pytest.mark.parametrize("option", ["config", "key_map", "fuse", "split"])
def test_an_option_whose_reading_raises_is_a_usage_error_naming_it(option: str, tmp_path: Path) -> None:
    rig = build_rig(tmp_path / "rig")
    source = write_valid(tmp_path / "a", rig.model, {Q0: 4}, alpha=8.0)
    before = snapshot(rig)
    nested = {"config": {"rank_pattern": _RaisingItems(q_proj=4)}}  # a nested mapping is read as well
    for value in (_RaisingItems(q_proj="x"), nested.get(option, _RaisingItems(x=1))):
        for call in _calls(rig, source):
            with pytest.raises(lorahot.UsageError, match=rf"{option}=.* cannot be read \(RuntimeError raised"):
                call({option: value})
            assert_unchanged(rig, before)


def test_strings_and_ints_of_the_caller_s_types_read_as_their_values(tmp_path: Path) -> None:
    """Their overrides (comparisons, ``lower``, ``encode``) are never called: the options read
    as the plain values would, giving the same scale."""
    rig = build_rig(tmp_path / "rig")
    source = write_valid(tmp_path / "a", rig.model, {Q0: 4}, alpha=8.0)
    hostile = {
        _RaisingStr("lora_alpha"): 12,
        "r": _RaisingInt(4),
        "peft_type": _RaisingStr("LORA"),
        "init_lora_weights": _RaisingStr("gaussian"),
        "rank_pattern": {_RaisingStr("q_proj"): _RaisingInt(4)},
        "target_modules": [_RaisingStr("q_proj")],
    }
    want = lorahot.read_adapter(source, config={"lora_alpha": 12, "r": 4, "rank_pattern": {"q_proj": 4}})
    key_map = {_RaisingStr("^layers"): _RaisingStr("layers")}
    for call in _calls(rig, source):
        got = call({"config": hostile, "key_map": key_map})
        if isinstance(got, lorahot.Adapter):
            assert got.modules[Q0].scale == want.modules[Q0].scale == 3.0


@pytest.mark.parametrize("form", ["mapping", "adapter"])
def test_names_of_the_caller_s_str_type_leave_no_trace_in_later_reads(form: str, tmp_path: Path) -> None:
    """lorahot's memos keep the key and module names they are given: a kept str subclass ran its
    ``__eq__`` in every later read of the same names (a plain dict's too), each an
    UnexpectedError. Such names now read as their plain values, and later reads are unharmed."""
    rig = build_rig(tmp_path / "rig")
    tensors = valid_tensors(rig.model, 4, seed=11)
    if form == "mapping":
        hostile: Any = {_RaisingStr(k): v for k, v in tensors.items()}
    else:
        adapter = lorahot.read_adapter(dict(tensors))
        modules = {
            _RaisingStr(k): dataclasses.replace(
                m, key=_RaisingStr(m.key), source_keys=tuple(map(_RaisingStr, m.source_keys))
            )
            for k, m in adapter.modules.items()
        }
        hostile = dataclasses.replace(adapter, modules=modules)
    calls = _calls(rig, hostile)
    for call in calls:
        call({})
    for call in _calls(rig, dict(tensors)):
        call({})
    assert lorahot.read_adapter(dict(tensors)).modules[Q0].scale == 1.0
