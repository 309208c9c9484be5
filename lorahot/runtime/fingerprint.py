"""What a write would put on this rank of a tensor-parallel model, as digests the ranks compare.

Every rank of a sharded model runs ``load`` itself, on its own slice of the adapter. Each
rank's checks can pass while the ranks were given different things: another file on one
node, a file rewritten between two ranks' reads, another ``slot`` or ``scale`` on one rank.
The sharded layers then add up the partial products of two different adapters, a wrong output
and no error. So before a write, besides whether its checks passed, each rank reports
digests of what it is about to write (:class:`lorahot.runtime.agreement.Agreement` compares
them), one per aspect, so that a refusal can say which one differs:

- ``arguments``: the slot and the weights (scales) of a load or ``set_scale``, a preload's key,
  the slot or per-row routing of ``activate``, the slots ``unload`` empties;
- ``modules``: per part of the stack, each target layer's name, rank, alpha and the dtype and
  whole shape of every factor, each arena's ``alpha / r`` per layer, the keys left out;
- ``values``: per part, checksums of the whole content of every factor (A, B, a DoRA magnitude
  and a LoRA bias of an unsharded layer; A and B of a sharded one, the factor each rank holds a
  slice of as read whole): :data:`SUMS` int64 sums per tensor (:func:`checksums`);
- ``tensors`` (no aspect: named in a refusal only): per tensor summed, the file it came from,
  its layer, which factor it is and the file's keys of its module, as JSON.

The sums see every byte: a single element changed anywhere, or two elements swapped, changes
them. That includes the factors the ranks of a sharded layer each hold a slice of (B's rows of
a column-parallel layer, A's columns of a row-parallel one): every rank reads them whole and
sums them before cutting its slice (:func:`lorahot.runtime.sharding.cut_factors`, kept in
:attr:`~lorahot.runtime.plan.LoadPlan.cut`), so files that differ only where one rank reads
(adapters that share their A and differ in B, on q/k/v-only LoRA where every target is
column-parallel) are refused too. The sums are computed where the tensors are (the arena's
device for a load), in one batched pass per tensor shape, and only on a tensor-parallel model
(:class:`~lorahot.runtime.agreement.Agreement`); a single-device load never computes them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lorahot.adapter import LoraModule
from lorahot.layers import LoRALayer

if TYPE_CHECKING:  # the plan's module imports this one (its cut factors are summed here)
    from lorahot.runtime.plan import LoadPlan

__all__ = ["ASPECTS", "SUMS", "checksums", "digest", "arguments", "plans"]

#: the aspects of a write the ranks compare, in the order they are reported
ASPECTS = ("arguments", "modules", "values")

#: the int64 sums of each tensor every rank holds whole (:func:`checksums`)
SUMS = 3

#: the words of a first-level block of :func:`checksums` (its sums stay within int32)
_BLOCK = 16

#: the blocks in 2**16 words: :func:`checksums` weighs a word by its position's low and high 16 bits
_BLOCKS_IN_PERIOD = (1 << 16) // _BLOCK

#: the most words :func:`checksums` sums at once (16 MB as int32, as much again in products)
_CHUNK = 1 << 22


def digest(data: bytes) -> int:
    """A signed 64-bit digest of ``data`` (what one rank sends for one aspect)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def arguments(*values: object) -> bytes:
    """The call's arguments (ints, floats, strs, bools, None, integer tensors and sequences of
    them), exactly: floats by their bits, not their printing."""
    out = bytearray()
    for value in values:
        _encode(value, out)
    return bytes(out)


def plans(parts: Sequence[LoadPlan], layers: dict[str, LoRALayer]) -> dict[str, bytes]:
    """The ``modules`` and ``values`` aspects of the plans a write would apply (one per part),
    and the ``tensors`` the values sum (JSON: ``[file, layer, factor, [keys]]`` each)."""
    modules, values, tensors = bytearray(), bytearray(), list[bytes]()
    for plan in parts:
        m, v, t = _part(plan, layers)
        modules += m
        values += v
        if t:
            tensors.append(t)
    return {"modules": bytes(modules), "values": bytes(values), "tensors": b"[" + b",".join(tensors) + b"]"}


def _part(plan: LoadPlan, layers: dict[str, LoRALayer]) -> tuple[bytes, bytes, bytes]:
    """One plan's ``modules``, ``values`` and ``tensors`` bytes (the last a JSON list's items),
    remembered while the plan lives: a prepared adapter's plan is fingerprinted again at each
    load from the host cache, and its tensors do not change."""
    key = (id(plan), id(layers))
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is plan:
        return hit[1], hit[2], hit[3]
    modules, summed, labels = bytearray(), list[torch.Tensor](), list[object]()
    rows: list[int | torch.Tensor] = []  # per factor, in label order: its index in summed, or its sums
    _encode(("part", len(plan.targets), tuple(sorted(plan.skipped))), modules)
    lines = []
    for name in sorted(plan.targets):
        module = plan.targets[name]
        whole = _whole(module, layers.get(name))
        shapes = [(what, str(t.dtype), tuple(t.shape)) for what, t in whole]
        cut = plan.cut.get(name)
        if cut is not None:  # summed whole before this rank's slice was cut
            shapes.append((cut.factor, str(cut.dtype), cut.shape))
        # repr: exact for these str, int, bool and float values, and far cheaper than _encode per module
        lines.append(repr((name, int(plan.ranks.get(name, 0)), float(module.alpha), module.use_rslora, shapes)))
        rows += range(len(summed), len(summed) + len(whole))
        summed.extend(t for _, t in whole)
        if cut is not None:
            rows.append(cut.sums)
        keys = list(module.source_keys or (module.key,))
        labels.extend([plan.source, name, what, keys] for what, *_ in shapes)
    _encode("\n".join(lines), modules)
    for scales in plan.scales:  # each arena's alpha / r per layer, float64
        modules += scales.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    computed = checksums(summed)
    values = torch.stack([computed[r] if isinstance(r, int) else r for r in rows]) if rows else computed
    out = (bytes(modules), values.numpy().tobytes(), json.dumps(labels).encode()[1:-1])
    _MEMO[key] = (weakref.ref(plan, lambda _, key=key: _MEMO.pop(key, None)), *out)  # type: ignore[misc]
    return out


#: (plan id, layers id) -> (the plan, its modules and values bytes), while the plan lives
_MEMO: dict[tuple[int, int], tuple[weakref.ref[LoadPlan], bytes, bytes, bytes]] = {}


def _whole(module: LoraModule, layer: LoRALayer | None) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a module that this rank writes whole (as every rank does): A of a
    column-parallel layer (B's rows are cut: its whole is summed in the plan's
    :attr:`~lorahot.runtime.plan.LoadPlan.cut`), B of a row-parallel one (A's columns are cut),
    and on an unsharded layer A, B and the extras (a DoRA magnitude, a LoRA bias; sharded
    layers refuse those)."""
    shard = None if layer is None else layer.spec.shard
    if shard is not None:
        return [("A", module.A)] if shard.dim == "out" else [("B", module.B)]
    extras = [(what, t) for what, t in (("magnitude", module.magnitude), ("bias", module.bias)) if t is not None]
    return [("A", module.A), ("B", module.B), *extras]


def checksums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sums of the whole content of each tensor, ``[len(tensors), SUMS]`` int64 on the host.

    A tensor's bytes are read as int16 words ``w`` (int8 where it has an odd number of bytes)
    at positions ``i = 0, 1, ...``; its sums are ``sum(w)``, ``sum(w * (i % 2**16 + 1))`` and
    ``sum(w * (i // 2**16 % 2**16 + 1))``, exact in int64 up to 2**31 words: any one word changed
    moves the first; two different words swapped move the second, or, where their distance is a
    multiple of 2**16 words, the third. A meta tensor (values already in the arena,
    :func:`lorahot.runtime.plan.forget_values`) and an empty one sum to zeros. Computed where
    the tensors are, with integer operations only (the same bits on every device), in blocks of
    :data:`_BLOCK` words summed in int32 first; one batched pass per word count, one copy to
    the host per device."""
    out = torch.zeros(len(tensors), SUMS, dtype=torch.int64)
    words: dict[int, torch.Tensor] = {}
    groups: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
    for k, t in enumerate(tensors):
        flat = t.detach().reshape(-1)
        if flat.numel() == 0 or flat.device.type == "meta":
            continue
        words[k] = flat.view(torch.int8) if flat.numel() * flat.element_size() % 2 else flat.view(torch.int16)
        groups.setdefault((flat.device, words[k].dtype, words[k].numel()), []).append(k)
    found: dict[torch.device, list[tuple[list[int], torch.Tensor]]] = {}
    with torch.no_grad():
        for (device, _, n), ks in groups.items():
            blocks = -(-n // _BLOCK)
            within = torch.arange(1, _BLOCK + 1, dtype=torch.int32, device=device)  # [BLOCK]
            b = torch.arange(blocks, dtype=torch.int64, device=device)
            low = b % _BLOCKS_IN_PERIOD * _BLOCK  # [blocks]: the block's first position % 2**16
            high = b // _BLOCKS_IN_PERIOD % (1 << 16) + 1  # [blocks]: its position // 2**16 % 2**16 + 1
            step = max(1, _CHUNK // (blocks * _BLOCK))
            for s in range(0, len(ks), step):
                chunk = ks[s : s + step]
                make = torch.zeros if n % _BLOCK else torch.empty  # padded with zero words, which add nothing
                w = make(len(chunk), blocks * _BLOCK, dtype=torch.int32, device=device)
                for row, k in enumerate(chunk):
                    w[row, :n].copy_(words[k])  # widened, exactly
                w = w.view(len(chunk), blocks, _BLOCK)
                plain = w.sum(-1, dtype=torch.int32)  # [m, blocks], |.| < 2**20
                weighted = (w * within).sum(-1, dtype=torch.int32)  # < 2**23
                plain64 = plain.to(torch.int64)
                sums = torch.stack(
                    [plain64.sum(1), (plain64 * low + weighted).sum(1), (plain64 * high).sum(1)], dim=1
                )  # [m, SUMS]
                found.setdefault(device, []).append((chunk, sums))
        for items in found.values():
            gathered = torch.cat([sums for _, sums in items]).cpu()
            out[[k for chunk, _ in items for k in chunk]] = gathered
    return out


def _encode(value: object, out: bytearray) -> None:
    """Appends an unambiguous encoding of ``value`` (type-tagged, lengths given)."""
    if value is None:
        out += b"N"
    elif isinstance(value, bool):
        out += b"T" if value else b"F"
    elif isinstance(value, int):
        text = str(value).encode()
        out += b"I" + struct.pack("<I", len(text)) + text
    elif isinstance(value, float):
        out += b"D" + struct.pack("<d", value)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        out += b"S" + struct.pack("<I", len(data)) + data
    elif isinstance(value, torch.Tensor):  # a host integer tensor (a routing): its int64 bytes, not one int at a time
        data = value.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
        out += b"X" + struct.pack("<Q", len(data)) + data
    elif isinstance(value, (tuple, list)):
        out += b"L" + struct.pack("<I", len(value))
        for item in value:
            _encode(item, out)
    else:
        text = repr(value).encode("utf-8", "surrogatepass")
        out += b"R" + struct.pack("<I", len(text)) + text
