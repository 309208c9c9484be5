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
  shape of the tensors every rank holds whole, each arena's ``alpha / r`` per layer, the keys
  left out;
- ``values``: per part, the bits of those tensors (A of a column-parallel layer, B of a
  row-parallel one; A, B, a DoRA magnitude and a LoRA bias of an unsharded layer) at
  :data:`SAMPLES` fixed positions spread over each.

The values are sampled, not hashed whole: two different adapters differ at the sampled
positions unless they are equal nearly everywhere, and a digest of every element would read
the whole adapter again on each load. Not caught: files that differ between ranks only in
elements that are not sampled, or only in the slices each rank reads alone; that includes
adapters that share their A (LoRA-FA, or A from one initialization) and differ only in B,
where every target is column-parallel (q/k/v-only LoRA): B's rows are cut there.
"""

from __future__ import annotations

import hashlib
import struct
import weakref
from collections.abc import Sequence

import torch

from lorahot.adapter import LoraModule
from lorahot.layers import LoRALayer
from lorahot.runtime.plan import LoadPlan

__all__ = ["ASPECTS", "SAMPLES", "digest", "arguments", "plans"]

#: the aspects of a write the ranks compare, in the order they are reported
ASPECTS = ("arguments", "modules", "values")

#: the positions sampled from each factor every rank holds whole (at least 2: the first and last)
SAMPLES = 8


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
    """The ``modules`` and ``values`` aspects of the plans a write would apply (one per part)."""
    modules, values = bytearray(), bytearray()
    for plan in parts:
        m, v = _part(plan, layers)
        modules += m
        values += v
    return {"modules": bytes(modules), "values": bytes(values)}


def _part(plan: LoadPlan, layers: dict[str, LoRALayer]) -> tuple[bytes, bytes]:
    """One plan's ``modules`` and ``values`` bytes, remembered while the plan lives: a prepared
    adapter's plan is fingerprinted again at each load from the host cache (a 7B-shaped
    adapter's 448 factors took 8 ms on a 2-core CPU), and its tensors do not change."""
    key = (id(plan), id(layers))
    hit = _MEMO.get(key)
    if hit is not None and hit[0]() is plan:
        return hit[1], hit[2]
    modules, samples = bytearray(), list[bytes | torch.Tensor]()
    _encode(("part", len(plan.targets), tuple(sorted(plan.skipped))), modules)
    lines = []
    for name in sorted(plan.targets):
        module = plan.targets[name]
        whole = _whole(module, layers.get(name))
        shapes = [(what, str(t.dtype), tuple(t.shape)) for what, t in whole]
        # repr: exact for these str, int, bool and float values, and far cheaper than _encode per module
        lines.append(repr((name, int(plan.ranks.get(name, 0)), float(module.alpha), module.use_rslora, shapes)))
        samples.extend(_sampled(t) for _, t in whole)
    _encode("\n".join(lines), modules)
    for scales in plan.scales:  # each arena's alpha / r per layer, float64
        modules += scales.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    out = (bytes(modules), _joined(samples))
    _MEMO[key] = (weakref.ref(plan, lambda _, key=key: _MEMO.pop(key, None)), *out)  # type: ignore[misc]
    return out


#: (plan id, layers id) -> (the plan, its modules and values bytes), while the plan lives
_MEMO: dict[tuple[int, int], tuple[weakref.ref[LoadPlan], bytes, bytes]] = {}


def _whole(module: LoraModule, layer: LoRALayer | None) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a module that this rank writes whole (as every rank does): A of a
    column-parallel layer (B's rows are cut), B of a row-parallel one (A's columns are cut),
    and on an unsharded layer A, B and the extras (a DoRA magnitude, a LoRA bias; sharded
    layers refuse those)."""
    shard = None if layer is None else layer.spec.shard
    if shard is not None:
        return [("A", module.A)] if shard.dim == "out" else [("B", module.B)]
    extras = [(what, t) for what, t in (("magnitude", module.magnitude), ("bias", module.bias)) if t is not None]
    return [("A", module.A), ("B", module.B), *extras]


def _sampled(t: torch.Tensor) -> bytes | torch.Tensor:
    """The bytes of :data:`SAMPLES` elements of ``t`` at positions spread evenly over its
    elements (exact, whatever the dtype): as bytes for a tensor on the host (by NumPy, no tensor
    operation per position), else a uint8 tensor where ``t`` lives."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0 or flat.device.type == "meta":  # meta: values already in the arena (plan.forget_values)
        return b""
    rows = flat.view(torch.uint8).view(n, flat.element_size())
    positions = [(i * (n - 1)) // (SAMPLES - 1) for i in range(SAMPLES)]
    if rows.device.type == "cpu":
        return bytes(rows.numpy()[positions].tobytes())
    return rows[torch.tensor(positions, device=rows.device)].reshape(-1)


def _joined(samples: list[bytes | torch.Tensor]) -> bytes:
    """The sampled bytes, in order: one copy to the host per device for those not there."""
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(samples):
        if isinstance(s, torch.Tensor):
            by_device.setdefault(s.device, []).append(i)
    for indices in by_device.values():
        tensors = [samples[i] for i in indices]
        gathered = torch.cat(tensors).cpu()  # type: ignore[arg-type]  # tensors, by construction
        for i, part in zip(indices, gathered.split([t.numel() for t in tensors])):  # type: ignore[union-attr]
            samples[i] = part.numpy().tobytes()
    return b"".join(samples)  # type: ignore[arg-type]  # all bytes now


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
