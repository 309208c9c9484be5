"""Untrusted JSON and headers: one parser with size and depth caps; a header memo within a byte budget."""

from __future__ import annotations

import gc
import json
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lorahot
from lorahot.io import safety
from lorahot.io.safety import MAX_JSON_DEPTH, check_safetensors, parse_json


def _parse(text: str | bytes) -> object:
    return parse_json(text, "f.json", "adapter config", "Fix it.", 1 << 20)


def test_nesting_is_capped_before_the_recursive_parser() -> None:
    assert _parse("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None
    for opener, closer in (("[", "]"), ('{"a":', "}")):
        deep = opener * (MAX_JSON_DEPTH + 1) + "1" + closer * (MAX_JSON_DEPTH + 1)
        with pytest.raises(
            lorahot.AdapterReadError,
            match=r"f\.json: the adapter config is not valid JSON \(nested too deep: 65 levels",
        ):
            _parse(deep)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}',  # brackets in a string
        '{"a": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}',  # after escaped "
        '{"a\\\\": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}',  # after \\\\
        '["\\u00e9[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "é]]]]]]"]',
    ],
)
def test_brackets_inside_strings_are_not_nesting(text: str) -> None:
    assert _parse(text) == json.loads(text)


def test_size_cap_and_invalid_json() -> None:
    with pytest.raises(lorahot.AdapterReadError, match=r"f\.json: the adapter config is 11 bytes, more than the 10"):
        parse_json(b'{"r": 1234}', "f.json", "adapter config", "Fix it.", 10)
    with pytest.raises(lorahot.AdapterReadError, match=r"not valid JSON \(duplicate key 'r'\)\. Fix it\."):
        _parse('{"r": 1, "r": 2}')
    with pytest.raises(lorahot.AdapterReadError, match=r"not valid JSON \(Exceeds the limit"):
        _parse('{"r": ' + "9" * 5000 + "}")  # int() of 5000 digits raises ValueError


def _file_with_header(path: Path, metadata_chars: int) -> Path:
    save_file({"x": torch.zeros(2)}, path, metadata={"notes": "m" * metadata_chars})
    return path


def test_checked_headers_are_memoized_within_a_byte_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """12 files with 3.5 MiB headers used to stay alive (bytes and parse) in a 64-entry cache:
    ~84 MiB. Now an entry is charged its estimated size; the memo never exceeds its budget."""
    paths = [_file_with_header(tmp_path / f"{i}.safetensors", 7 << 19) for i in range(12)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for path in paths:
            assert check_safetensors(path).metadata["notes"][:1] == "m"
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < safety.HEADER_MEMO_BYTES, f"{kept / 2**20:.0f} MiB kept alive"
    assert safety._HEADERS.nbytes <= safety.HEADER_MEMO_BYTES


def test_a_normal_header_is_parsed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _file_with_header(tmp_path / "a.safetensors", 100)
    check_safetensors(path)
    calls = []
    monkeypatch.setattr(safety, "parse_json", lambda *a: calls.append(a) or {})
    assert check_safetensors(path).entries["x"] == ("F32", (2,), 0, 8)
    assert not calls


def test_rejected_headers_are_not_kept(tmp_path: Path) -> None:
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)  # 8 data bytes, not 16
    n = len(safety._HEADERS)
    with pytest.raises(lorahot.AdapterReadError, match=r"past the end of the file"):
        check_safetensors(path)
    assert len(safety._HEADERS) == n


def _reference_depth(text: str) -> int:
    """Nesting depth by a plain character loop over valid JSON."""
    depth = best = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            best = max(best, depth)
        elif c in "]}":
            depth -= 1
    return best


_TEXT = st.text(alphabet='[]{}"\\ab\u00e9', max_size=6)
_JSON = st.recursive(
    st.none() | st.integers() | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(value=_JSON)
def test_the_depth_scan_agrees_with_a_character_loop(value: object) -> None:
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False)):
        assert safety._max_depth(text.encode()) == _reference_depth(text), text


def test_a_file_that_shrinks_while_read_is_named_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The size is taken before the header is read: a file truncated in between gets a
    message about the bytes found, not the stale size."""
    path = tmp_path / "a.safetensors"
    save_file({"x": torch.ones(4)}, path)
    monkeypatch.setattr(safety, "_pread", lambda fd, n, offset, p: b"\x01\x02")  # truncated to 2 bytes meanwhile
    with pytest.raises(lorahot.AdapterReadError, match=r": 2 bytes, too short .* or it shrank while lorahot read it\)"):
        safety.check_safetensors(path)


def test_a_tensor_placed_past_the_end_is_the_one_named(tmp_path: Path) -> None:
    """``a`` moved past the end of the data: the tiling check found the gap its move left before
    ``b`` and named ``b``, an innocent key (an independent audit); the tensor that ends past the
    file is named first."""
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [10**6, 10**6 + 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "moved.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(
        lorahot.AdapterReadError, match=r"tensor 'a' at bytes \[1000000, 1000008\).*past the end of the file"
    ):
        check_safetensors(path)
