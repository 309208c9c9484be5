"""What a write would put on this rank of a tensor-parallel model, as digests the ranks compare.

Every rank of a sharded model runs ``load`` itself, on its own slice of the adapter. Each
rank's checks can pass while the ranks were given different things: another file on one
node, a file rewritten between two ranks' reads, another ``slot`` or ``scale`` on one rank.
The sharded layers then add up the partial products of two different adapters, a wrong output
and no error. So before a write, besides whether its checks passed, each rank reports
digests of what it is about to write (:class:`lorahot.runtime.agreement.Agreement` compares
them), one per aspect, so that a refusal can say which one differs:

- ``arguments``: the slot, the weights (scales), whether a list was given, a preload's key;
- ``modules``: per part of the stack, each target layer's name, rank, alpha and the dtype and
  shape of the factors every rank holds whole, each arena's ``alpha / r`` per layer, the keys
  left out;
- ``values``: per part, values of each target's factors that every rank holds whole (A of a
  column-parallel layer, B of a row-parallel one, both of an unsharded layer), at
  :data:`SAMPLES` fixed positions spread over each factor.

The values are sampled, not hashed whole: two different adapters differ at the sampled
positions unless they are equal nearly everywhere, and a digest of every element would read
the whole adapter again on each load. A file that differs between ranks only in elements
that are not sampled, or only in the slices each rank reads alone, is not caught.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

import torch

from lorahot.layers import LoRALayer
from lorahot.runtime.plan import LoadPlan

__all__ = ["ASPECTS", "SAMPLES", "digest", "arguments", "plans"]

#: the aspects of a write the ranks compare, in the order they are reported
ASPECTS = ("arguments", "modules", "values")

#: the positions sampled from each factor every rank holds whole
SAMPLES = 8


def digest(data: bytes) -> int:
    """A signed 64-bit digest of ``data`` (what one rank sends for one aspect)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def arguments(*values: object) -> bytes:
    """The call's arguments (ints, floats, strs, bools, None and sequences of them), exactly:
    floats by their bits, not their printing."""
    out = bytearray()
    for value in values:
        _encode(value, out)
    return bytes(out)


def plans(parts: Sequence[LoadPlan], layers: dict[str, LoRALayer]) -> dict[str, bytes]:
    """The ``modules`` and ``values`` aspects of the plans a write would apply (one per part)."""
    modules, samples = bytearray(), list[torch.Tensor]()
    for plan in parts:
        _encode(("part", len(plan.targets), tuple(sorted(plan.skipped))), modules)
        for name in sorted(plan.targets):
            module = plan.targets[name]
            whole = tuple(_whole_factors(module.A, module.B, layers.get(name)))
            shapes = tuple((str(t.dtype), tuple(t.shape)) for t in whole)
            _encode((name, int(plan.ranks.get(name, 0)), float(module.alpha), module.use_rslora, shapes), modules)
            samples.extend(_sampled(t) for t in whole)
        for scales in plan.scales:  # each arena's alpha / r per layer, float64
            modules += scales.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return {"modules": bytes(modules), "values": _values(samples)}


def _whole_factors(a: torch.Tensor, b: torch.Tensor, layer: LoRALayer | None) -> Iterable[torch.Tensor]:
    """The factors of a module that this rank holds whole (as every rank does)."""
    shard = None if layer is None else layer.spec.shard
    if shard is None:
        return (a, b)
    return (a,) if shard.dim == "out" else (b,)  # column-parallel: B's rows are cut; row-parallel: A's columns


def _sampled(t: torch.Tensor) -> torch.Tensor:
    """:data:`SAMPLES` values of ``t`` at positions spread evenly over its elements, float64,
    where ``t`` lives (an empty tensor gives none)."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return flat.new_empty(0, dtype=torch.float64)
    index = (torch.arange(SAMPLES, device=flat.device) * (n - 1)) // max(SAMPLES - 1, 1)
    return flat[index].to(torch.float64)


def _values(samples: list[torch.Tensor]) -> bytes:
    """The sampled values as bytes, in order: one copy to the host per device."""
    if not samples:
        return b""
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(samples):
        by_device.setdefault(s.device, []).append(i)
    host: list[torch.Tensor | None] = [None] * len(samples)
    for indices in by_device.values():
        gathered = torch.cat([samples[i] for i in indices]).cpu()
        sizes = [samples[i].numel() for i in indices]
        for i, part in zip(indices, gathered.split(sizes)):
            host[i] = part
    return b"".join(part.numpy().tobytes() for part in host if part is not None)


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
    elif isinstance(value, (tuple, list)):
        out += b"L" + struct.pack("<I", len(value))
        for item in value:
            _encode(item, out)
    else:
        text = repr(value).encode("utf-8", "surrogatepass")
        out += b"R" + struct.pack("<I", len(text)) + text
