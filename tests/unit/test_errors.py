"""lorahot.errors: the message helpers every check uses to show a caller's or a file's value."""

from __future__ import annotations

from lorahot.errors import UsageError, shown


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
