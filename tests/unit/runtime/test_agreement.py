"""lorahot.runtime.agreement: what a rank says when another rank's check failed."""

from __future__ import annotations

from typing import Any

import pytest

import lorahot
from lorahot.errors import format_problems, lines, one_line
from lorahot.runtime.agreement import Agreement


def _failing_on_rank_1(mesh: Any, monkeypatch: pytest.MonkeyPatch, kind: str, message: str) -> Agreement:
    """An agreement over ``mesh`` whose gather reports that rank 1 failed with ``kind: message``
    (one process holds one rank: the other rank's report is what the all-gather would bring)."""
    agreement = Agreement(mesh)
    monkeypatch.setattr(agreement, "_failures", lambda error, digests: ([(1, kind, message)], []))
    return agreement


def test_another_ranks_refusal_keeps_its_lines_and_its_type(one_rank: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lorahot refusal of several lines (a list and its fix) reaches the other ranks with the
    same lines, each as that rank wrote it, after the line naming the rank."""
    name = "layers.0\n  - fake"
    theirs = str(lorahot.AdapterMismatchError(lines(format_problems("a.safetensors: does not fit:", [name]), "Fix.")))
    agreement = _failing_on_rank_1(one_rank, monkeypatch, "AdapterMismatchError", theirs)
    with pytest.raises(lorahot.AdapterMismatchError) as raised:
        agreement.run(lambda: None, "load")
    head, *rest = str(raised.value).splitlines()
    assert head.startswith("load failed on rank 1 of 1, so no rank changed anything") and head.endswith(
        "Rank 1: a.safetensors: does not fit:"
    )
    assert rest == [f"  - {one_line(name)}", "Fix."]


def test_another_ranks_unexpected_error_is_one_line(one_rank: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception lorahot did not raise (its text is not lorahot's) shows on one line."""
    agreement = _failing_on_rank_1(one_rank, monkeypatch, "RuntimeError", "boom\n  - fake\x1b[2J")
    with pytest.raises(lorahot.UnexpectedError) as raised:
        agreement.run(lambda: None, "load")
    assert str(raised.value).endswith("Rank 1: boom\\n  - fake\\x1b[2J")


def test_a_rank_interrupted_in_its_checks_tells_the_others_first(
    one_rank: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt in this rank's checks takes part in the ranks' gather (reporting it)
    before it goes on: the other ranks would otherwise wait for this one in the collective."""
    agreement = Agreement(one_rank)
    reported: list[BaseException | None] = []
    monkeypatch.setattr(agreement, "_failures", lambda error, digests: (reported.append(error), ([], []))[1])

    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        agreement.run(interrupted, "load")
    assert len(reported) == 1 and isinstance(reported[0], KeyboardInterrupt)


def test_another_rank_interrupted_in_its_checks_is_a_usage_error_naming_it(
    one_rank: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    agreement = _failing_on_rank_1(one_rank, monkeypatch, "KeyboardInterrupt", "")
    message = (
        r"^activate was interrupted \(KeyboardInterrupt\) on rank 1 of 1 during its checks, so no rank changed "
        r"anything \(this rank passed every check\)\. Call activate again on every rank\.$"
    )
    with pytest.raises(lorahot.UsageError, match=message):
        agreement.run(lambda: None, "activate")
