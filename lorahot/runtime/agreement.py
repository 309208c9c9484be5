"""Every rank of a tensor-parallel model decides together whether an operation goes ahead.

On a sharded model each rank runs ``load`` (and ``set_scale``, ``preload``, ``activate``,
``unload``) itself, on its own part of the adapter; a check can fail on one rank only (its slice holds a NaN, its file
changed, it ran out of memory), and the checks can pass everywhere while the ranks were given
different things (another file on one node, another slot, scale or routing). Before the first write
each rank therefore reports whether its checks passed and digests of what it would write
(:mod:`lorahot.runtime.fingerprint`), in one all-gather over the model's process group. If the
digests differ, none writes and every rank raises a UsageError naming what differs. If any
rank failed, none writes: the failed ranks raise their own error, the others an error of the same
lorahot type naming the rank and its message (gathered only then), so every rank stays
bitwise as it was. A write can still fail on one rank after every check passed (out of
memory): the ranks then agree again, after writing (:meth:`Agreement.settle`), and where any
rank's write failed every rank empties the slot, so that no rank serves another adapter than
the rest. Every rank must make the same calls in the same order, as with any collective.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from lorahot.errors import LoraError, UnexpectedError, UsageError, lines
from lorahot.layers import LoRALayer
from lorahot.layers.base_guards import is_dtensor
from lorahot.layers.sharded import ShardedLoRALinear
from lorahot.layers.styled import StyledLoRAEmbedding
from lorahot.runtime.fingerprint import ASPECTS, SUMS, digest
from lorahot.runtime.targets import fsdp_owner_on_path

__all__ = ["Agreement"]

_T = TypeVar("_T")


class Agreement:
    """The process group of a sharded runtime's layers, and :meth:`run` over it."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()
        self.ranks = mesh.size()
        self.rank = mesh.get_local_rank()
        kind = mesh.device_type
        self.device = torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)

    @classmethod
    def of(cls, layers: dict[str, LoRALayer], model: nn.Module | None = None) -> Agreement | None:
        """The agreement over the mesh of ``layers``' tensor-parallel layers; where none is, over
        the mesh of ``model``'s tensor-parallel weights (:func:`_model_mesh`): LoRA on layers
        the model keeps whole on every rank (an ``lm_head`` the plan leaves out) must be the same
        on every rank too, or the ranks compute different outputs from the same input. None
        when there is neither.

        Raises:
            UsageError: the sharded layers live on different meshes.
        """
        meshes: dict[int, tuple[str, Any]] = {}
        for name, layer in layers.items():
            if isinstance(layer, (ShardedLoRALinear, StyledLoRAEmbedding)):
                meshes.setdefault(id(layer.mesh), (name, layer.mesh))
        if len(meshes) > 1:
            (first, a), (second, b) = list(meshes.values())[:2]
            if a != b:
                raise UsageError(
                    f"{first} and {second} are sharded over different device meshes ({a} and {b}); lorahot keeps one "
                    "runtime's ranks in step over one mesh. Inject each tensor-parallel group separately."
                )
        if not meshes:
            mesh = None if model is None else _model_mesh(model)
            return None if mesh is None else cls(mesh)
        return cls(next(iter(meshes.values()))[1])

    def run(
        self, check: Callable[[], _T], what: str, fingerprint: Callable[[_T], dict[str, bytes]] | None = None
    ) -> _T:
        """``check()`` on every rank; its result if it passed on every rank and, with
        ``fingerprint``, every rank's fingerprint of that result (what it would write, by aspect
        of :data:`lorahot.runtime.fingerprint.ASPECTS`) is the same; else raises.

        Raises:
            LoraError: ``check``'s own error on a rank where it failed; on the others an error
                of the same type naming the failed rank and its message (a :class:`UsageError`
                where that rank was interrupted: the call was not made there). Any other
                exception of ``check`` is re-raised on its rank after the agreement, an
                interrupt (``KeyboardInterrupt``, ``SystemExit``) too: the rank takes part in
                the agreement first, so that no other rank waits for it in the collective.
            UsageError: every check passed, but the ranks would write different things (on
                every rank, naming the aspect and the ranks that differ from rank 0).
        """
        prints: dict[str, bytes] = {}
        try:
            result, error = check(), None
            prints = fingerprint(result) if fingerprint is not None else {}
            digests = _digests(prints)
        except BaseException as exc:  # an interrupt too: reported, then it goes on
            result, error, digests = None, exc, [0] * len(ASPECTS)
        failures, rows = self._failures(error, digests)
        if error is not None:
            raise error
        if failures:
            rank, kind, message = failures[0]
            if kind in _INTERRUPTS:
                raise UsageError(
                    f"{what} was interrupted ({kind}) on rank {rank} of {self.ranks} during its checks, so no rank "
                    f"changed anything (this rank passed every check). Call {what} again on every rank."
                )
            cls = _error_type(kind)
            # a lorahot refusal's line breaks are its own (its names escaped on its rank): kept
            first, *rest = message.split("\n") if cls is not UnexpectedError else [message]
            raise cls(
                lines(
                    f"{what} failed on rank {rank} of {self.ranks}, so no rank changed anything (this rank passed "
                    f"every check). Rank {rank}: {first}",
                    *rest,
                )
            )
        differing = [_split(aspect, [row[i] for row in rows]) for i, aspect in enumerate(ASPECTS)]
        if differing[_VALUES] and not differing[_MODULES]:  # the same tensors: which ones differ, from which files
            differing[_VALUES] += self._differing_tensors(prints)
        differing = [text for text in differing if text]
        if differing:
            raise UsageError(
                f"{what} would leave the ranks of this tensor-parallel model holding different adapters, so no rank "
                f"changed anything (every rank passed its checks): {'; '.join(differing)}. Every rank must {what} "
                "the same adapter (the same files, unchanged between the ranks' reads) with the same slot, scale and "
                "options."
            )
        return result  # type: ignore[return-value]  # set when no error

    def settle(
        self, error: BaseException | None, touched: bool, marks: Sequence[bool] = ()
    ) -> tuple[list[tuple[int, str, str]], bool, dict[int, list[int]]]:
        """After a write: ``(rank, error type, message)`` of every rank whose write failed
        (``error`` this rank's, or None), whether any rank wrote anything (``touched`` this
        rank's), and every rank's ``marks`` (as many on every rank: an unload's slots that
        rank could not empty) as the indices marked, by rank (the ranks that marked any). One
        all-reduce of the flags; the messages only when some rank failed."""
        import torch.distributed as dist

        flags = torch.zeros(2 + self.ranks * len(marks), dtype=torch.int32)
        flags[0], flags[1] = int(error is not None), int(touched)
        flags[2 + self.rank * len(marks) : 2 + (self.rank + 1) * len(marks)] = torch.tensor(
            [int(m) for m in marks], dtype=torch.int32
        )
        flags = flags.to(self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        failed, wrote, *rest = (int(v) for v in flags.tolist())
        marked = {
            rank: [i for i, m in enumerate(rest[rank * len(marks) : (rank + 1) * len(marks)]) if m]
            for rank in range(self.ranks)
        }
        marked = {rank: indices for rank, indices in marked.items() if indices}
        return (self._messages(error) if failed else []), bool(wrote), marked

    def _failures(
        self, error: BaseException | None, digests: list[int]
    ) -> tuple[list[tuple[int, str, str]], list[list[int]]]:
        """``(rank, error type, message)`` of every rank whose check failed, and every rank's
        digests: one all-gather of a flag and the digests; the messages are gathered only when
        some rank failed (:meth:`_messages`)."""
        import torch.distributed as dist

        mine = torch.tensor([0 if error is None else 1, *digests], dtype=torch.int64, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.ranks)]
        dist.all_gather(everyone, mine, group=self.group)
        rows = [[int(v) for v in row.tolist()] for row in everyone]
        if not any(row[0] for row in rows):
            return [], [row[1:] for row in rows]
        return self._messages(error), []

    def _messages(self, error: BaseException | None) -> list[tuple[int, str, str]]:
        """Every failed rank's ``(rank, error type, message)``, gathered as UTF-8 JSON in byte
        tensors (nothing is unpickled); every rank calls it together."""
        mine = b"" if error is None else json.dumps([self.rank, type(error).__name__, str(error)]).encode()
        out = []
        for got in self._gather(mine):
            if got:
                rank, kind, message = json.loads(got.decode())
                out.append((int(rank), str(kind), str(message)))
        return out

    def _differing_tensors(self, prints: dict[str, bytes]) -> str:
        """Where the ranks' ``values`` differ while their modules agree (the same tensors, in
        the same order): the first few tensors whose sums differ, each with the file every rank
        read it from and its keys there (``"; first in layers.0.q_proj's A, which rank 0 read
        from a.safetensors (keys ...) and rank 1 from b.safetensors (keys ...)"``). Two gathers, made
        only then; every rank calls it together and builds the same text."""
        sums = [
            [got[k : k + _TENSOR_BYTES] for k in range(0, len(got), _TENSOR_BYTES)]
            for got in self._gather(prints.get("values", b""))
        ]
        count = min(len(s) for s in sums)
        differ = [k for k in range(count) if any(s[k] != sums[0][k] for s in sums)]
        labels = json.loads(prints.get("tensors", b"[]").decode())
        shown = differ[:_SHOWN]
        mine = json.dumps([labels[k] if k < len(labels) else None for k in shown]).encode()
        everyone = [json.loads(got.decode()) for got in self._gather(mine)]
        texts = []
        for j in range(len(shown)):
            read = [row[j] for row in everyone]
            first = next((label for label in read if label is not None), None)
            if first is None:
                continue
            by_file: dict[tuple[str, tuple[str, ...]], list[int]] = {}
            for rank, label in enumerate(read):
                where = ("<unknown>", ()) if label is None else (str(label[0]), tuple(map(str, label[3])))
                by_file.setdefault(where, []).append(rank)
            ranks = [
                f"{_which(g)} {'read from' if i == 0 else 'from'} {file} (keys {', '.join(keys)})"
                for i, ((file, keys), g) in enumerate(by_file.items())
            ]
            texts.append(f"{first[1]}'s {first[2]}, which {' and '.join(ranks)}")
        if not texts:
            return ""
        more = f"; and {len(differ) - len(shown)} more tensors" if len(differ) > len(shown) else ""
        return f"; first in {'; in '.join(texts)}{more}"

    def _gather(self, mine: bytes) -> list[bytes]:
        """Every rank's ``mine`` (of any length), by rank, in two all-gathers of byte tensors
        (nothing is unpickled); every rank calls it together."""
        import torch.distributed as dist

        size = torch.tensor([len(mine)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.ranks)]
        dist.all_gather(sizes, size, group=self.group)
        longest = max(int(n.item()) for n in sizes)
        data = torch.zeros(longest, dtype=torch.uint8)
        data[: len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8) if mine else data[:0]
        data = data.to(self.device)
        everyone = [torch.empty_like(data) for _ in range(self.ranks)]
        dist.all_gather(everyone, data, group=self.group)
        return [bytes(got[: int(n.item())].cpu().numpy().tobytes()) for n, got in zip(sizes, everyone)]


#: what a rank interrupted during its checks reports (its own goes on as it is)
_INTERRUPTS = ("KeyboardInterrupt", "SystemExit")

#: how a refusal names each aspect of :mod:`lorahot.runtime.fingerprint`
_ASPECT_TEXT = {
    "arguments": "call's arguments (slot and scale, or a preload's key)",
    "modules": "adapter's modules (target layers, ranks, alphas, the whole shapes of their factors)",
    "values": "adapter's values (the whole content of every factor, each rank's slices included)",
}

#: the positions of the ``modules`` and ``values`` aspects in :data:`ASPECTS`
_MODULES, _VALUES = ASPECTS.index("modules"), ASPECTS.index("values")

#: the bytes of one tensor's sums in the ``values`` aspect (:func:`lorahot.runtime.fingerprint.checksums`)
_TENSOR_BYTES = 8 * SUMS

#: the differing tensors a refusal names (the rest are counted)
_SHOWN = 3


def _model_mesh(model: nn.Module) -> Any | None:
    """The 1-D device mesh of ``model``'s tensor-parallel weights (a module's own ``weight``
    a DTensor, no FSDP module on its path: FSDP's ranks are data-parallel), where they all
    share one; else None (no such weight, or a mesh of several dimensions, or several meshes)."""
    meshes: list[Any] = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if is_dtensor(weight) and fsdp_owner_on_path(model, name) is None:
            mesh = weight.device_mesh
            if not any(mesh == m for m in meshes):
                meshes.append(mesh)
    return meshes[0] if len(meshes) == 1 and meshes[0].ndim == 1 else None


def _which(ranks: list[int]) -> str:
    """``"rank 1"``, ``"ranks 0, 2"``."""
    return f"{'ranks' if len(ranks) > 1 else 'rank'} {', '.join(map(str, ranks))}"


def _split(aspect: str, digests: list[int]) -> str:
    """How the ranks split over one aspect (``"the call's arguments (...) differ: ranks 0, 2
    hold one, rank 1 holds another"``), or "" where they all agree."""
    groups: dict[int, list[int]] = {}
    for rank, d in enumerate(digests):
        groups.setdefault(d, []).append(rank)
    if len(groups) == 1:
        return ""
    held = [
        f"{'ranks' if len(g) > 1 else 'rank'} {', '.join(map(str, g))} {'hold' if len(g) > 1 else 'holds'} "
        f"{'one' if i == 0 else 'another'}"
        for i, g in enumerate(groups.values())
    ]
    return f"the {_ASPECT_TEXT[aspect]} differ: {', '.join(held)}"


def _digests(aspects: dict[str, bytes]) -> list[int]:
    """One digest per aspect of :data:`~lorahot.runtime.fingerprint.ASPECTS` (0 where absent)."""
    return [digest(aspects[a]) if a in aspects else 0 for a in ASPECTS]


def _error_type(name: str) -> type[LoraError]:
    """The lorahot error class called ``name`` (what another rank raised), else
    :class:`UnexpectedError`."""
    pending: list[type[LoraError]] = [LoraError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return cls
        pending += cls.__subclasses__()
    return UnexpectedError
