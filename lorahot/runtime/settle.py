"""The ranks' agreement before a runtime's writes, and the settling of a write that failed.

On a tensor-parallel model every rank checks a call itself and the ranks agree that it goes
ahead before the first write (:mod:`lorahot.runtime.agreement`); a write can still fail on one
rank after that (out of memory, a device fault, an interrupt). :class:`Settlement` runs a
call's checks under that agreement (:meth:`Settlement.agreed`), runs its writes
(:meth:`Settlement.written`) and then lets every rank learn how the others' went
(:meth:`Settlement.settled`): where any rank's failed, every rank empties the slot and raises
a :class:`~lorahot.errors.WriteError`, so that no rank serves another adapter than the rest.
Off a tensor-parallel model, the same steps empty a slot whose write failed. The runtime
passes what emptying needs with each call, so that nothing here refers back to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeVar

from lorahot.errors import WriteError, one_line
from lorahot.runtime.agreement import Agreement
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.merge import Merger

__all__ = ["LiveFault", "OtherRankFailed", "Settlement", "Unsettled", "described", "said", "which_ranks"]

_T = TypeVar("_T")

#: empties every one of the slots it is given (:meth:`LoraRuntime._empty_all
#: <lorahot.runtime.lora_runtime.LoraRuntime._empty_all>`); returns the first failure and the
#: slots it could not empty
EmptyAll = Callable[[list[int]], tuple[object, list[int]]]


class OtherRankFailed(RuntimeError):
    """On a tensor-parallel model, what a rank whose own write went through reports when
    another rank's failed (:meth:`Settlement.written`)."""


class Unsettled(OtherRankFailed):
    """The ranks could not tell each other how their part went (:meth:`Settlement.settled`):
    the other ranks' outcome is unknown."""


class LiveFault(Exception):
    """:meth:`LoraRuntime._make_live <lorahot.runtime.lora_runtime.LoraRuntime._make_live>`
    failed or was interrupted (``fault``, its cause): ``live`` is the slot the live region holds
    whole after it (the one active before, copied back), or None where copying that back failed
    too and the region may hold a mix of two slots."""

    def __init__(self, fault: BaseException, live: int | None) -> None:
        super().__init__(f"{type(fault).__name__}: {fault}")
        self.fault, self.live = fault, live


class Settlement:
    """A runtime's ranks (``agreement``, None off a tensor-parallel model) agreeing before its
    writes into ``buffers`` and settling them after."""

    def __init__(self, agreement: Agreement | None, buffers: BufferManager) -> None:
        self.agreement = agreement
        self.buffers = buffers
        self.lost = False  # the last settling collective failed (:meth:`settled`): no second round after it

    @property
    def rank(self) -> int | None:
        """This rank, or None off a tensor-parallel model."""
        return None if self.agreement is None else self.agreement.rank

    def agreed(self, check: Callable[[], _T], what: str, writes: Callable[[_T], dict[str, bytes]]) -> _T:
        """``check()``, and on a tensor-parallel model every rank's agreement that it passed
        everywhere and that every rank would write the same (``writes``: the result's
        fingerprint, :mod:`lorahot.runtime.fingerprint`) before anything is written (see
        :mod:`lorahot.runtime.agreement`)."""
        if self.agreement is None:
            return check()
        return self.agreement.run(check, what, writes)

    def written(self, what: str, slot: int, write: Callable[[], _T], empty_all: EmptyAll, merger: Merger | None) -> _T:
        """``write()``, run once every check has passed (on every rank); if it fails,
        :meth:`failed_write`. On a tensor-parallel model every rank then learns how the others'
        writes went (:meth:`lorahot.runtime.agreement.Agreement.settle`): where any rank's
        failed, every rank empties the slot and raises :class:`WriteError`, so that no rank
        serves another adapter than the rest. An interrupted rank (KeyboardInterrupt, SystemExit)
        takes part too, reporting it, before its interrupt goes on: the others would otherwise
        wait for it in the collective."""
        self.buffers.touched = False
        result: _T | None = None
        error: BaseException | None = None
        try:
            result = write()
        except BaseException as exc:  # an interrupt too: no half-written slot is left, then it goes on
            error = exc
        error, _ = self.settled(f"writing slot {slot}", error, write=True)
        if error is not None:
            self.failed_write(what, slot, error, empty_all, merger)
        return result  # type: ignore[return-value]  # set when no error

    def settled(
        self, doing: str, error: BaseException | None, write: bool = False, stuck: Sequence[int] = ()
    ) -> tuple[BaseException | None, dict[int, list[int]]]:
        """After this rank's part of a call (``doing``, its writes when ``write``): this rank's
        ``error`` (a fault or an interrupt, or None), or on a tensor-parallel model where
        another rank's failed, an :class:`OtherRankFailed` naming that rank
        (:meth:`lorahot.runtime.agreement.Agreement.settle`); and, by rank, the slots each rank
        reports ``stuck`` (an unload's slots it could not empty; this rank's alone off a
        tensor-parallel model, or where the ranks could not tell each other). Where a rank
        failed after writing, ``buffers.touched`` becomes true on every rank, so that every
        rank empties the slot. Where the process group itself fails, the other ranks' outcome
        is unknown: that is the error (after this rank's own)."""
        agreement = self.agreement
        own_stuck = {0 if agreement is None else agreement.rank: list(stuck)} if stuck else {}
        if agreement is None:
            return error, own_stuck
        own = error.fault if isinstance(error, LiveFault) else error
        self.lost = False
        try:
            failures, touched, marked = agreement.settle(
                own, write and self.buffers.touched, [s in stuck for s in range(self.buffers.slots)]
            )
        except Exception as exc:  # the collective failed (a rank gone, the group timed out)
            self.lost = True  # no second collective after this one: it would wait for the group's timeout again
            return error or Unsettled(
                f"the ranks could not tell each other how {doing} went ({described(exc)}), so another rank may hold "
                "another adapter"
            ), own_stuck
        if failures and write:
            self.buffers.touched = touched  # a rank wrote: every rank empties the slot
        if not failures or error is not None:
            return error, marked
        rank, kind, message = failures[0]
        how = "was interrupted" if kind in ("KeyboardInterrupt", "SystemExit") else "failed"
        told = f"{kind}: {message.strip().splitlines()[0][:300]}" if message.strip() else kind
        return OtherRankFailed(f"rank {rank} of {agreement.ranks} {how} while {doing} ({told})"), marked

    def settled_again(self, doing: str, stuck: list[int]) -> dict[int, list[int]] | None:
        """After a call's ranks settled a failure (:meth:`settled`) and each then emptied or put
        back what it wrote (``doing``): by rank, the slots each could not (``stuck``); None off a
        tensor-parallel model, or where the ranks could not tell each other (then, or in the
        first round): this rank's alone is known."""
        if self.agreement is None or self.lost:
            return None
        unknown, marked = self.settled(doing, None, stuck=stuck)
        return None if isinstance(unknown, Unsettled) else marked

    def failed_write(
        self, what: str, slot: int, exc: BaseException, empty_all: EmptyAll, merger: Merger | None
    ) -> NoReturn:
        """A write that failed after every check passed (out of memory, a device fault) or was
        interrupted: the slot is emptied (``empty_all``), as by ``unload``, so that no mix of two
        adapters serves, and a :class:`WriteError` says so; an interrupt then goes on as it is. A
        failure before the first write (staging its data: out of device memory) changed nothing:
        an interrupt goes on as it is, and a failure is a :class:`WriteError` that says nothing
        changed. Where emptying fails too, the :class:`WriteError` (an interrupt's too) says the
        slot may hold parts of two adapters; in merged mode, ``merger`` then records the merged
        weights as they are."""
        if not self.buffers.touched:
            if not isinstance(exc, Exception):
                raise exc
            raise WriteError(
                f"LoraRuntime.{what}: {described(exc)}, while staging slot {slot}'s data before its first write. "
                f"Nothing was changed; slot {slot} holds what it held. Where the device ran out of memory, free some "
                f"(or load a smaller adapter, or inject with a smaller max_rank); then {what} it again."
            ) from exc
        _, stuck = empty_all([slot])
        if stuck and merger is not None:  # the merged weights hold lorahot's own partial rewrite, not an edit
            with contextlib.suppress(Exception):
                merger.record_all()
        me = 0 if self.agreement is None else self.agreement.rank
        settled = self.settled_again(f"emptying slot {slot}", stuck)  # every rank tells whether it emptied it
        marked = {me: stuck} if settled is None else settled
        every = "" if settled is None else " on every rank"
        if not any(marked.values()):
            if not isinstance(exc, Exception):
                raise exc
            state = (
                f"slot {slot} was emptied (unloaded){every}, so that it holds no mix of two adapters; {what} it again"
            )
        else:
            where = "" if self.agreement is None else f" on {which_ranks([r for r, m in marked.items() if m], me)}"
            state = (
                f"emptying slot {slot} failed too{where}, so it may hold parts of two adapters there, though no "
                f"adapter is named there{every}: call runtime.unload({slot}){every}"
            )
        if isinstance(exc, OtherRankFailed):
            happened = f"{said(exc)}, after every check had passed"
        else:
            happened = f"{type(exc).__name__} while writing slot {slot} after every check had passed: {said(exc)}"
        raise WriteError(f"LoraRuntime.{what}: {happened}. {state}.") from exc


def which_ranks(ranks: list[int], me: int) -> str:
    """``"this rank"``, ``"rank 1"`` or ``"ranks 0, 1"``."""
    if ranks == [me]:
        return "this rank"
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def said(exc: BaseException) -> str:
    """``exc``'s message's first line, cut to 300 characters, as one line of a message."""
    text = str(exc).strip()
    return one_line(text.splitlines()[0][:300]) if text else "(no message)"


def described(exc: BaseException) -> str:
    """``exc`` in one line of a message: its type and its message's first line."""
    if isinstance(exc, OtherRankFailed):  # names the rank and its error itself
        return said(exc)
    return f"{type(exc).__name__}: {said(exc)}"
