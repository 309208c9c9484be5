"""lorahot.errors: the message helpers every check uses to show a caller's or a file's value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorahot
from lorahot.errors import (
    MAX_KEY_CHARS,
    UsageError,
    cut,
    format_problems,
    lines,
    message,
    name_problem,
    one_line,
    shown,
)
from tests.helpers import make_adapter, model_reference, save_peft, tiny_lm, token_ids


class _BrokenRepr:
    def __repr__(self) -> str:
        raise RuntimeError("broken")


class _NotAString:
    def __repr__(self) -> str:
        return 3  # type: ignore[return-value]


def test_a_value_shows_as_its_repr_cut_to_the_limit() -> None:
    assert shown(1.5) == "1.5"
    assert shown("slot") == "'slot'"
    assert shown("x" * 100, 20) == "'" + "x" * 16 + "..."
    assert len(shown(list(range(1000)), 60)) == 60


def test_an_object_whose_repr_raises_or_lies_shows_as_its_type() -> None:
    assert shown(_BrokenRepr()) == "<_BrokenRepr object>"
    assert shown(_NotAString()) == "<_NotAString object>"
    assert shown([0, _BrokenRepr()]).startswith("[0, <_BrokenRepr instance at 0x")


def test_a_long_container_shows_its_first_entries_only() -> None:
    """Forty entries at most, each cut: the message does not hold the whole list's repr, even
    when the limit is large enough for it."""
    text = shown([7] * 10**6, 10**7)
    assert text.startswith("[7, 7") and text.endswith("...]") and text.count("7") == 40
    assert len(shown({"k": "v" * 1000}, 10**4)) < 220  # the entry cut in its middle


def test_a_message_with_a_shown_value_is_printable() -> None:
    assert str(UsageError(f"key={shown(chr(7) + 'a')} is wrong")) == "key='\\x07a' is wrong"


#: every character str.splitlines breaks a line at, the other controls, and the bidi overrides and isolates
_BREAKING = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\t\x00\x1b\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


@pytest.mark.parametrize("char", list(_BREAKING), ids=[ascii(c) for c in _BREAKING])
def test_a_name_in_a_message_is_one_line_whatever_it_holds(char: str) -> None:
    name = f"lora_unet_0{char}  - fake"
    escaped = f"lora_unet_0{char.encode('unicode_escape').decode('ascii')}  - fake"
    assert one_line(name) == escaped and cut(name) == escaped and shown(name) == f"'{escaped}'"
    text = str(UsageError(lines(format_problems(f"{name}: title", [f"{name}: problem", "other"]), "Fix it.")))
    assert text.splitlines() == [f"{escaped}: title", f"  - {escaped}: problem", "  - other", "Fix it."]
    assert str(UsageError(f"layer {name}: wrong")) == f"layer {escaped}: wrong"  # a message lorahot did not build
    assert name_problem(name) is not None and name_problem("lora_unet_0") is None


def test_a_repr_with_line_breaks_shows_as_one_line() -> None:
    class _Lines:
        def __repr__(self) -> str:
            return "a\n  - b"

    assert shown(_Lines()) == "a\\n  - b"


def test_a_name_over_the_limit_is_refused() -> None:
    assert name_problem("x" * MAX_KEY_CHARS) is None
    assert name_problem("x" * (MAX_KEY_CHARS + 1)) == f"is 1025 characters long, more than {MAX_KEY_CHARS}"


def test_only_lines_lorahot_built_keep_their_breaks() -> None:
    """A message is one line unless :func:`lines` built it: a name that reaches a message by an
    f-string, a ``+`` after a list, or a refusal nested in another adds no line."""
    name = "layers.0\n  - fake\tq\x1b[2J\r\x00"
    listed = format_problems("title:", ["a", "b"])
    assert str(UsageError(listed + f" after {name}")).splitlines() == [
        "title:",
        "  - a",
        "  - b" + one_line(f" after {name}"),
    ]
    assert str(UsageError(f"{name}: " + listed)).splitlines()[0] == one_line(f"{name}: ") + "title:"
    inner = UsageError(lines(listed, f"fix {name}"))
    outer = UsageError(lines("part 1: " + message(inner), "more"))
    assert str(outer).splitlines() == ["part 1: title:", "  - a", "  - b", one_line(f"fix {name}"), "more"]
    assert str(UsageError(f"{inner}")) == one_line(str(inner))  # a refusal's text in an f-string: one line
    plain = "layers.0.self_attn.q_proj (x) [y] 'z' \\ ~"
    assert str(UsageError(f"{plain}: wrong")) == f"{plain}: wrong"  # a printable name as it is


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_public_calls_run_with_the_cpu_as_torch_s_default_device(tmp_path: Path, device: str) -> None:
    """``torch.set_default_device`` (gpt-fast's ``"cuda"``; here ``"meta"``, the only other device on a
    CPU box) moved the host buffer a load reads the file into to that device, and every load,
    ``preload`` and ``read_adapter`` failed (an ``UnexpectedError`` on ``buf.numpy()``). Each public
    call runs with the CPU as the default device: its results are those of a call without it."""
    model = tiny_lm()
    names = ["layers.0.self_attn.q_proj", "layers.1.mlp.up_proj", "embed_tokens"]
    tensors, ab = make_adapter(model, dict.fromkeys(names, 4), seed=1)
    path = save_peft(tmp_path / "a", tensors, r=4, lora_alpha=8)
    runtime = lorahot.inject(model, ["q_proj", "up_proj", "embed_tokens"], max_rank=8, slots=2)
    ids = token_ids((2, 5), 32, seed=3)
    torch.set_default_device(device)
    try:
        read = lorahot.read_adapter(path)
        runtime.preload(path)
        runtime.load(path, slot=1)
        runtime.activate(1)
        runtime.set_scale(0.5)
    finally:
        torch.set_default_device(None)
    assert all(m.A.device.type == m.B.device.type == "cpu" for m in read.modules.values())
    with torch.no_grad():
        out = model(ids)
    want = model_reference(tiny_lm(), ids, {n: (a, b, 1.0) for n, (a, b) in ab.items()})
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
