"""rank_pattern / alpha_pattern from files: PEFT's matching, in linear time, or a named refusal."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lorahot
from lorahot.io.config import AdapterConfig
from lorahot.io.patterns import MAX_PATTERNS
from tests.reliability_helpers import within

# module names as the tiny test models have them (25 characters, several dots)
NAMES = ["layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.0.mlp.down_proj"]


def _adapter_dir(tmp_path: Path, config: dict) -> Path:
    tensors = {}
    for name in NAMES:
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, 8)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(8, 4)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("key", ["((a|.)*)*#", "(.*)*(.*)*#"])
def test_pathological_pattern_completes_fast(tmp_path: Path, key: str) -> None:
    """Python's re needs ~2**25 steps per name for these keys (seconds to minutes); RE2 one pass."""
    directory = _adapter_dir(tmp_path, {"r": 4, "lora_alpha": 4, "alpha_pattern": {key: 1, "q_proj": 2}})
    start = time.perf_counter()
    adapter = within(10, lambda: lorahot.read_adapter(directory))
    assert time.perf_counter() - start < 5
    assert {k: m.alpha for k, m in adapter.modules.items()} == dict(zip(NAMES, (2.0, 4.0, 4.0)))


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("(?=q)q_proj", r"uses a lookahead or lookbehind, which RE2 cannot evaluate in linear time"),
        ("(?<=\\.)q_proj", r"uses a lookahead or lookbehind"),
        ("(?!q)q_proj", r"uses a negative lookahead or lookbehind"),
        ("(q)_\\1", r"uses a backreference"),
        ("(?P<x>q)(?P=x)", r"uses a backreference"),
        ("(q)?(?(1)a|b)", r"uses a conditional group"),
        ("q{4294967296}", r"is not a valid regex \(Python: the repetition number is too large\)"),
        ("q_pr[oj", r"is not a valid regex \(Python: unterminated character set at position 4 of the key\)"),
        ("*q_proj", r"is not a valid regex \(Python: nothing to repeat at position 0 of the key\)"),
        ("q(?i)_proj", r"global flags not at the start of the expression at position 1 of the key"),
        ("q{1001}", r"RE2: invalid repetition size: \{1001,1001\}"),
        ("(" * 5000 + "q" + ")" * 5000, r"is 10001 bytes long, more than the 1000 lorahot evaluates"),
        ("a)|(b", r"does not parse as a regex on its own \(unbalanced parenthesis"),
    ],
)
def test_unsupported_pattern_is_refused_naming_file_field_and_pattern(tmp_path: Path, key: str, why: str) -> None:
    directory = _adapter_dir(tmp_path, {"r": 4, "rank_pattern": {key: 2}})
    shown = re.escape(repr(key)[:40])
    with pytest.raises(
        lorahot.AdapterReadError,
        match=rf"adapter_config\.json: invalid adapter config: rank_pattern key {shown}.*{why}.*write each key as a "
        r"module name or an RE2-compatible regex\)\. Fix adapter_config\.json\.",
    ):
        within(10, lambda: lorahot.read_adapter(directory))


def test_the_same_patterns_in_config_argument_are_usage_errors() -> None:
    tensors = {
        "base_model.model.q_proj.lora_A.weight": torch.randn(4, 8),
        "base_model.model.q_proj.lora_B.weight": torch.randn(8, 4),
    }
    with pytest.raises(lorahot.UsageError, match=r"config=: rank_pattern key '\(\?=q\)' uses a lookahead"):
        lorahot.read_adapter(tensors, config={"rank_pattern": {"(?=q)": 2}})


def test_too_many_patterns_are_refused(tmp_path: Path) -> None:
    patterns = {f"layer_{i}": 2 for i in range(MAX_PATTERNS + 1)}
    with pytest.raises(lorahot.AdapterReadError, match=rf"rank_pattern has {MAX_PATTERNS + 1} entries, more than"):
        AdapterConfig.from_dict({"r": 4, "rank_pattern": patterns})
    # the limit holds for an adapter as a whole: diffusers metadata has one config per component
    meta = {
        f"c{c}.{field}": {f"layer_{c}_{i}": 2 for i in range(1500)}
        for c in range(2)
        for field in ("rank_pattern", "alpha_pattern")
    }
    save_file(
        {"base_model.model.x.lora_A.weight": torch.randn(2, 4), "base_model.model.x.lora_B.weight": torch.randn(4, 2)},
        tmp_path / "a.safetensors",
        metadata={"lora_adapter_metadata": json.dumps(meta)},
    )
    with pytest.raises(lorahot.AdapterReadError, match=r"its configs hold 6000 rank_pattern/alpha_pattern keys"):
        lorahot.read_adapter(tmp_path / "a.safetensors")


_KEYS = [
    "q_proj",
    r"layers\.0\..*",
    "v_proj|k_proj",
    ".*a.{3}",
    "b.c",
    "a$",
    "^b",
    "c\n",
    r"(?:x|.)\.q_proj",
    r"\bq",
    r"\Bc",
    r"\Ax",
    "(a|\n)$",
    "x\n$",
    r"b\Z",
    "(c|\n)\\Z",
    r"q_proj\Z|x$",
    r"[\\Z]a",
    r"\\Z",
]
#: keys that Python and RE2 both accept but read differently, as written: POSIX classes, {,n}
_DIALECT_KEYS = [
    r"layers\.[[:digit:]]\.self_attn\.q_proj",
    r"layers\.[01]{,1}\.self_attn\.q_proj",
    r"layers\.0{,}\.mlp\.down_proj",
    r"layers\.[^[:digit:]]\..*",
    r"layers\.[[:^digit:]]\..*",
    r"[[:alpha:]]+_proj",
    r"(?i:LAYERS\.\d\.SELF_ATTN)\.q_proj",
    r"layers\.\d+\.(?s:.)lf_attn\.v_proj",
    r"(?:mlp|self_attn)\.[a-z]+?_proj",
]
_PIECES = ["a", "b", "c", ".", "q_proj", "v_proj", "layers", "0", "#", "\n", "x"]


def test_matching_is_pythons_re_match_of_pefts_wrapper() -> None:
    """First key k (in order) with re.match(rf"(.*\\.)?({k})$", name): anchors, word boundaries,
    newlines (Python's $ before a final newline, .* stopping at one) included. (A guard on the
    RE2 rewrite: the Python implementation it replaced passes it by construction.)"""
    config = AdapterConfig.from_dict({"rank_pattern": {k: i + 1 for i, k in enumerate(_KEYS)}})
    rng = random.Random(0)
    for _ in range(5000):
        name = "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 12)))
        expected = next((i + 1 for i, k in enumerate(_KEYS) if re.match(rf"(.*\.)?({k})$", name)), None)
        assert config.rank_for(name) == expected, repr(name)


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@pytest.mark.parametrize("key", _DIALECT_KEYS)
def test_keys_read_differently_by_re2_keep_pythons_reading(key: str) -> None:
    """Each key is evaluated as Python's re reads it (PEFT), where RE2 would read the same text
    otherwise: ``[[:digit:]]`` is a set of ``[:digt`` then ``]`` in Python, a digit class in RE2;
    ``{,1}`` is a repeat in Python, literal text in RE2. Fails if a key reaches RE2 as written."""
    config = AdapterConfig.from_dict({"r": 4, "lora_alpha": 8, "alpha_pattern": {key: 32}})
    names = [*NAMES, "layers.[:].self_attn.q_proj", "layers.0{,1}.self_attn.q_proj", "layers..mlp.down_proj"]
    names += ["layers.00.mlp.down_proj", "layers.x.foo", "layers.:.foo", "layers.0.self_attn.q_proj", "b_proj"]
    for name in names:
        expected = 32.0 if re.match(rf"(.*\.)?({key})$", name) else 8.0
        assert config.alpha_for(name) == expected, (key, name)


_ATOMS = ["a", "b", ".", r"\.", r"\d", r"\w", "[ab]", "[^a]", "[a-c]", "[[:a]", "[[:digit:]]", "_", "0", "[.b]"]
_REPEATS = ["", "*", "+", "?", "{,1}", "{1,}", "{,}", "{2}", "{0,2}", "*?", "{,2}?", "{1"]


@st.composite
def _python_keys(draw: st.DrawFn) -> str:
    """Keys from pieces where the dialects part ways (sets, repeats, groups, alternation, flags)."""
    pieces = []
    for _ in range(draw(st.integers(1, 5))):
        atom = draw(st.sampled_from(_ATOMS))
        if draw(st.booleans()):
            inner = draw(st.sampled_from(_ATOMS))
            atom = draw(st.sampled_from([f"(?:{atom}{inner})", f"({atom}|{inner})", f"(?i:{atom}){inner}"]))
        pieces.append(atom + draw(st.sampled_from(_REPEATS)))
    return draw(st.sampled_from(["", "^", "(?s:.)"])) + "".join(pieces)


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@settings(max_examples=300, deadline=None)
@given(key=_python_keys(), names=st.lists(st.text(alphabet="ab._0:[]{},dA1", max_size=8), min_size=1, max_size=8))
def test_random_keys_match_as_pythons_re_match_of_pefts_wrapper(key: str, names: list[str]) -> None:
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error:
        return  # no valid key for PEFT: refused, as tested above
    config = AdapterConfig.from_dict({"r": 4, "rank_pattern": {key: 2}})
    for name in names:
        expected = 2 if re.match(rf"(.*\.)?({key})$", name) else 4
        assert config.rank_for(name) == expected, (key, name)


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@settings(max_examples=300, deadline=None)
@given(
    key=_python_keys(),
    end=st.sampled_from([r"\Z", r"\Z$", r"$\Z", "\n?\\Z", r"(?:\Z|a)", r"\Z|b", r"(?m:$)\Z", r"(?:a\Z)*"]),
    names=st.lists(st.text(alphabet="ab._0\nZ\\", max_size=8), min_size=1, max_size=8),
)
def test_keys_with_end_of_text_match_as_pythons_re_match_of_pefts_wrapper(key: str, end: str, names: list[str]) -> None:
    """Python's \\Z (the end of the whole name, not before a final newline as $) anywhere in a
    key: RE2's \\z where the name is read whole, nowhere where its final newline is cut off."""
    key += end
    try:
        re.compile(rf"(.*\.)?({key})$")
    except re.error:
        return
    config = AdapterConfig.from_dict({"r": 4, "rank_pattern": {key: 2}})
    for name in names:
        expected = 2 if re.match(rf"(.*\.)?({key})$", name) else 4
        assert config.rank_for(name) == expected, (key, name)


def test_many_patterns_and_long_names_stay_fast() -> None:
    """4,096 keys (diffusers writes one per module) over names with 500 dots: bounded work."""
    patterns = {f"down_blocks.{i % 50}.attentions.0.transformer_blocks.{i}.attn1.to_q": 2 for i in range(MAX_PATTERNS)}
    config = AdapterConfig.from_dict({"r": 4, "rank_pattern": patterns})
    start = time.perf_counter()
    for i in range(500):
        assert config.rank_for(f"unet.down_blocks.{i % 50}.attentions.0.transformer_blocks.{i}.attn1.to_q") == 2
        assert config.rank_for("a." * 500 + str(i)) == 4
    assert time.perf_counter() - start < 5
