"""Byte-level fuzzing of the adapter reader: mutate a valid file, load it, demand a clean outcome.

Hypothesis applies random mutations (bit flips, truncations, insertions, deletions, edits of
the header length and of the numbers, dtypes and names inside the JSON header) to a small
valid PEFT adapter. Loading the mutated file must either succeed or raise a specific
:class:`lorahot.LoraError`; any other exception, and :class:`lorahot.UnexpectedError` (the
safety net for a missing check), fails the test. After a failure every arena buffer and the
model output are bitwise unchanged; after a success the model output is bitwise what a fresh
runtime computes with the same file (no residue of the old adapter, no half-written slot), and
the other slot is untouched. A second fuzzer writes random ``adapter_config.json`` files
(regex-like pattern keys, odd values, odd JSON) beside a valid file: same demands, in bounded
time.
"""

from __future__ import annotations

import json
import re
import resource
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import lorahot
from tests.helpers import tiny_lm
from tests.reliability_helpers import (
    Q0,
    V1,
    VOCAB,
    assert_unchanged,
    build_rig,
    report,
    snapshot,
    valid_tensors,
    within,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Examples per run; the profile in conftest.py sets derandomize, so CI runs are repeatable.
FUZZ_EXAMPLES = 1000

_DTYPES = ["F16", "BF16", "I16", "U16", "F32", "F64", "I32", "BOOL", "U8", "F8_E4M3", "C64", "F128", ""]
_NUMBERS = [0, 1, 2, 3, 4, 15, 16, 17, 63, 64, 65, 2**31, 2**32 + 1, 2**62, 2**64 + 7, 10**30]

_pos = st.integers(min_value=0, max_value=2**20)  # taken modulo the current length
_mutation = st.one_of(
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("flip_header"), _pos, st.integers(0, 7)),
    st.tuples(st.just("truncate"), _pos),
    st.tuples(st.just("insert"), _pos, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _pos, st.integers(1, 16)),
    st.tuples(st.just("header_len"), st.sampled_from([0, 1, 7, 8, -1, +1, -8, +8, 2**32, 2**64 - 1])),
    st.tuples(st.just("number"), _pos, st.sampled_from(_NUMBERS), st.booleans()),
    st.tuples(st.just("dtype"), _pos, st.sampled_from(_DTYPES)),
    st.tuples(
        st.just("key"), _pos, st.sampled_from(["lora_A", "lora_B", "alpha", "q_proj", "k_proj", "", "lora_A.weight"])
    ),
)


def _header_span(blob: bytes) -> tuple[int, int]:
    n = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else 0
    return 8, min(len(blob), 8 + n)


def _edit_header(blob: bytes, fn, keep_len: bool) -> bytes:
    """Applies ``fn`` to the header text; rewrites the length prefix unless ``keep_len``."""
    start, end = _header_span(blob)
    text = blob[start:end].decode("latin-1")
    new = fn(text).encode("latin-1")
    head = blob[:8] if keep_len else struct.pack("<Q", len(new))
    return head + new + blob[end:]


def _sub_nth(pattern: str, text: str, i: int, repl: str) -> str:
    matches = list(re.finditer(pattern, text))
    if not matches:
        return text
    m = matches[i % len(matches)]
    return text[: m.start()] + repl + text[m.end() :]


def mutate(blob: bytes, op: tuple) -> bytes:
    kind, *args = op
    if not blob:
        return blob + bytes(args[-1]) if kind == "insert" else blob
    if kind == "flip":
        pos, bit = args[0] % len(blob), args[1]
        return blob[:pos] + bytes([blob[pos] ^ (1 << bit)]) + blob[pos + 1 :]
    if kind == "flip_header":
        start, end = _header_span(blob)
        pos = (start + args[0] % max(1, end - start)) % len(blob)
        return blob[:pos] + bytes([blob[pos] ^ (1 << args[1])]) + blob[pos + 1 :]
    if kind == "truncate":
        return blob[: args[0] % len(blob)]
    if kind == "insert":
        pos = args[0] % (len(blob) + 1)
        return blob[:pos] + args[1] + blob[pos:]
    if kind == "delete":
        pos = args[0] % len(blob)
        return blob[:pos] + blob[pos + args[1] :]
    if kind == "header_len":
        if len(blob) < 8:
            return blob
        v = args[0]
        n = struct.unpack("<Q", blob[:8])[0]
        new = n + v if v in (-1, 1, -8, 8) else v
        return struct.pack("<Q", new % 2**64) + blob[8:]
    if kind == "number":
        return _edit_header(blob, lambda t: _sub_nth(r"\d+", t, args[0], str(args[1])), keep_len=args[2])
    if kind == "dtype":
        return _edit_header(
            blob, lambda t: _sub_nth(r'"dtype":"[^"]*"', t, args[0], f'"dtype":"{args[1]}"'), keep_len=False
        )
    if kind == "key":
        return _edit_header(
            blob, lambda t: _sub_nth(r"lora_[AB]|q_proj|v_proj|weight", t, args[0], args[1]), keep_len=False
        )
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def base_blob() -> bytes:
    """A small valid PEFT adapter (rank 2, float16) for the rig's model: 4 tensors, ~1 KB."""
    model = tiny_lm(seed=0, vocab=VOCAB)
    return save({k: v.half().contiguous() for k, v in valid_tensors(model, 2, names=(Q0, V1)).items()})


def test_fuzz_mutated_files_load_or_raise_lora_error(
    tmp_path: Path, base_blob: bytes, request: pytest.FixtureRequest
) -> None:
    rig = build_rig(tmp_path / "rig")
    counts = {"examples": 0, "loaded": 0, "refused": 0}
    errors: dict[str, int] = {}
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops=st.lists(_mutation, min_size=1, max_size=4), slot=st.sampled_from([0, 1]))
    def run(ops: list[tuple], slot: int) -> None:
        blob = base_blob
        for op in ops:
            blob = mutate(blob, op)
        counts["examples"] += 1
        path = tmp_path / f"m{counts['examples']}" / "adapter_model.safetensors"
        path.parent.mkdir()
        path.write_bytes(blob)
        before = snapshot(rig)
        try:
            rig.runtime.load(path, slot=slot)
        except lorahot.UnexpectedError:
            raise  # a check is missing
        except lorahot.LoraError as exc:
            counts["refused"] += 1
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            assert_unchanged(rig, before)
            return
        counts["loaded"] += 1
        _assert_clean_swap(rig, before, path, slot, tmp_path / f"fresh{counts['examples']}")

    run()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 256, (
        f"peak RSS grew by {grown_mib:.0f} MiB while fuzzing: a mutated header made lorahot allocate"
    )
    assert counts["examples"] >= FUZZ_EXAMPLES // 2
    report(request.config, "fuzz", {**counts, "errors": errors, "peak_rss_growth_mib": round(grown_mib, 1)})


def _assert_clean_swap(rig, before, path: Path, slot: int, fresh_dir: Path) -> None:
    """A successful load wrote exactly the new adapter into ``slot`` and nothing else."""
    other = 1 - slot
    manager = rig.runtime.buffers
    for i, arena in enumerate(manager.arenas):
        for k, t in enumerate((arena.A, arena.B, arena.S)):
            assert torch.equal(t[other], before.buffers[3 * i + k][other]), "a load into one slot changed the other"
    fresh = build_rig(fresh_dir)
    fresh.runtime.unload()
    fresh.runtime.load(path, slot=0)
    rig.runtime.activate(slot)
    fresh.runtime.activate(0)
    assert torch.equal(rig.output(), fresh.output()), (
        "the swapped-in adapter differs from a clean load of the same file"
    )
    rig.runtime.activate(before.active)


# -- adapter_config.json ---------------------------------------------------------------------

CONFIG_EXAMPLES = 150

_REGEX = st.text(alphabet="()[]{}|*+?.\\^$:=<!-,#aq_proj019 \n", max_size=24)
_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(0, 9), max_size=3),
)
_FIELDS = [
    "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "target_modules", "modules_to_save",
    "target_parameters", "trainable_token_indices", "bias", "layer_replication",
]  # fmt: skip
_CONFIG = st.fixed_dictionaries(
    {},
    optional={
        "rank_pattern": st.dictionaries(_REGEX, _VALUE, max_size=4),
        "alpha_pattern": st.dictionaries(_REGEX, _VALUE, max_size=4),
        **dict.fromkeys(_FIELDS, _VALUE),
    },
)


def test_fuzz_configs_load_or_raise_a_specific_error(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    rig = build_rig(tmp_path / "rig")
    tensors = {k: v.contiguous() for k, v in valid_tensors(rig.model, 2, names=(Q0, V1)).items()}
    blob = save(tensors)
    errors: dict[str, int] = {}

    @settings(max_examples=CONFIG_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(config=_CONFIG, cut=st.one_of(st.none(), st.integers(0, 400)), nest=st.integers(0, 3))
    def run(config: dict, cut: int | None, nest: int) -> None:
        text = json.dumps(config)
        text = text if cut is None else text[:cut]  # truncated JSON
        text = "[" * (40 * nest) + text + "]" * (40 * nest) if nest else text  # nested (deeper than 64 at 2)
        directory = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        directory.mkdir()
        (directory / "adapter_model.safetensors").write_bytes(blob)
        (directory / "adapter_config.json").write_text(text)
        before = snapshot(rig)
        try:
            within(10, lambda: rig.runtime.load(directory, slot=1))
        except lorahot.UnexpectedError:
            raise  # a check is missing
        except lorahot.LoraError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            assert_unchanged(rig, before)

    run()
    report(request.config, "fuzz_configs", {"examples": CONFIG_EXAMPLES, "errors": errors})
