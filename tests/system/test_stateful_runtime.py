"""A stateful model check of the runtime: random sequences of loads (single adapters from
mappings, PEFT directories, prepared entries and preload keys; stacks; files rewritten after a
preload), activations (whole batch and per row, as lists, tensors and arrays), unloads,
re-weightings, cache operations (discard, clear, a smaller budget), batches of other sizes and
refused calls, against an independent float64 model of what each slot holds.

The model is an Embedding, a grouped Conv2d and two Linears of other widths; adapters carry
random ranks per layer (some past ``max_rank``), alphas, and on a third of them DoRA magnitudes
or LoRA biases; kohya-named adapters of weight kinds (LoHa, LoKr, a diff with its diff_b) load
alone or stacked with them on the same layers (merged mode folds them in; unmerged refuses them).
After every step the model's output equals the dense reference: each row with the slot it
computes with, each layer ``f * (W0 + sum_i w_i * alpha_i / r_i * B_i @ A_i) + sum_m w_m ΔW_m``
and bias ``b0 + f * sum_i w_i * alpha_i / r_i * lora_bias_i + sum_m w_m diff_b_m`` (``f`` the
DoRA factor ``m / ||W0 + s B A||``, else 1, on a layer no other part loads into); what the
runtime reports (``info``, ``active_slot``, ``routing``, ``nbytes``) equals the model's
bookkeeping; every refused call raised the expected :class:`lorahot.LoraError` and left the
adapter buffers, the bookkeeping, the cache keys, the model's state dict and its output bitwise
as they were. At the end of every run ``eject`` gives back the base model bitwise, and every
call after it is refused. Unmerged (the library path and the wide layers), merged, float64 and
float32, eager and compiled (``eager``/``aot_eager``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from safetensors.torch import save_file
from torch import nn

import lorahot
from lorahot.runtime import wide
from tests.helpers import PREFIX, dense_delta_weight, peft_keys, random_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, EMB, CH, HID, OUT = 11, 6, 8, 9, 4
ROWS, SIDE = 4, 3  # the batch: ids [ROWS, SIDE, SIDE]
LAYERS = ("embed", "conv", "fc1", "fc2")
MAX_RANK = 6


class Net(nn.Module):
    """``embed`` -> ``conv`` (3x3, bias, grouped or not) -> ``fc1`` (bias) -> ``fc2`` (no bias); every row
    (image) computes alone, so a per-row reference is the whole-batch one row by row."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMB)
        self.conv = nn.Conv2d(EMB, CH, 3, padding=1, groups=groups)
        self.fc1 = nn.Linear(CH, HID)
        self.fc2 = nn.Linear(HID, OUT, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, H, W) -> (B, H, W, OUT)
        h = self.embed(ids).permute(0, 3, 1, 2)  # (B, C, H, W)
        h = F.silu(self.conv(h)).permute(0, 2, 3, 1)  # (B, H, W, CH)
        return self.fc2(F.gelu(self.fc1(h)))


Weights = dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # name -> (weight, bias), float64


def _reference(weights: Weights, ids: torch.Tensor) -> torch.Tensor:
    """The model's output in float64 with each layer's (adapted) weight and bias."""
    h = F.embedding(ids, weights["embed"][0]).permute(0, 3, 1, 2)
    h = F.silu(F.conv2d(h, *weights["conv"], padding=1)).permute(0, 2, 3, 1)
    return F.linear(F.gelu(F.linear(h, *weights["fc1"])), *weights["fc2"])


def _ungrouped(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight ``[out, in / g, k, k]`` as the block-diagonal ``[out, in, k, k]``
    of a conv with groups=1."""
    out, per = w.shape[0] // groups, w.shape[1]
    full = w.new_zeros(w.shape[0], per * groups, *w.shape[2:])
    for j in range(groups):
        full[j * out : (j + 1) * out, j * per : (j + 1) * per] = w[j * out : (j + 1) * out]
    return full


# -- adapters ---------------------------------------------------------------------------------------------------


DORA_LAYERS, BIAS_LAYERS = ("fc1", "fc2"), ("conv", "fc1", "fc2")


@dataclass(frozen=True)
class Spec:
    """An adapter: its rank per layer, its ``lora_alpha``, the seed of its weights, and the
    layers where it carries a DoRA magnitude (PEFT ``use_dora``) or a LoRA bias (``lora_B.bias``)."""

    ranks: tuple[tuple[str, int], ...]
    alpha: float
    seed: int
    dora: tuple[str, ...] = ()
    bias: tuple[str, ...] = ()
    #: a LyCORIS/kohya adapter instead (merged mode only): per layer a weight kind (LoHa, LoKr, a
    #: diff with its diff_b where the layer has a bias), ``ranks`` then empty
    kinds: tuple[tuple[str, str], ...] = ()

    @property
    def extras(self) -> bool:
        return bool(self.dora or self.bias)

    @property
    def layers(self) -> set[str]:
        return {n for n, _ in self.ranks} | {n for n, _ in self.kinds}


@dataclass
class Made:
    """A spec's tensors (PEFT names) and, float64 per layer: its dense ``alpha / r * B @ A``,
    ``alpha / r * lora_bias`` and DoRA magnitude."""

    tensors: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor]
    ranks: dict[str, int]
    bias: dict[str, torch.Tensor]
    magnitude: dict[str, torch.Tensor]


@st.composite
def _specs(draw: st.DrawFn) -> Spec:
    ranks = draw(
        st.lists(
            st.tuples(st.sampled_from(LAYERS), st.integers(1, MAX_RANK)),
            min_size=1,
            max_size=4,
            unique_by=lambda t: t[0],
        )
    )
    ranks = [(n, -(-r // 2) * 2 if n == "conv" else r) for n, r in ranks]  # whole groups on a grouped conv
    names = [n for n, _ in ranks]
    on = draw(st.sampled_from([0, 0, 1]))  # extras on a third of the adapters
    # use_dora is the whole adapter's: a magnitude on every layer it loads into
    dora = names if on and set(names) <= set(DORA_LAYERS) and draw(st.booleans()) else []
    bias = [n for n in BIAS_LAYERS if n in names and on and draw(st.booleans())]
    alpha = draw(st.sampled_from([1.0, 2.0, 3.0, 0.5]))
    return Spec(tuple(ranks), alpha, draw(st.integers(0, 2**16)), tuple(dora), tuple(bias))


_SPEC = _specs()
#: the weight kinds merged mode folds into the base weights; ``embed`` takes none of them here
WEIGHT_KINDS, WEIGHT_LAYERS = ("loha", "lokr", "diff"), ("conv", "fc1", "fc2")
_WEIGHT_SPEC = st.builds(
    lambda kinds, seed: Spec((), 1.0, seed, kinds=tuple(kinds)),
    st.lists(
        st.tuples(st.sampled_from(WEIGHT_LAYERS), st.sampled_from(WEIGHT_KINDS)),
        min_size=1,
        max_size=3,
        unique_by=lambda t: t[0],
    ),
    st.integers(0, 2**16),
)
_BIG_SPEC = st.builds(  # a rank past max_rank somewhere
    Spec,
    st.tuples(st.tuples(st.sampled_from(LAYERS), st.integers(MAX_RANK + 1, MAX_RANK + 3))).map(tuple),
    st.just(2.0),
    st.integers(0, 2**16),
)
#: none that takes a scale below float32's normal range (refused: tests/unit/runtime/test_plan.py)
_WEIGHT = st.sampled_from([1.0, 0.5, -1.25, 0.0, 2.0, 3.5]) | st.floats(-4, 4, allow_nan=False, width=32).filter(
    lambda w: w == 0 or abs(w) >= 1e-30
)


@dataclass
class Part:
    made: Made
    weight: float

    @property
    def ranks(self) -> dict[str, int]:
        return self.made.ranks


def _adapted(base: dict[str, torch.Tensor], parts: list[Part]) -> Weights:
    """Each layer's weight and bias with ``parts`` applied as PEFT computes them:
    ``f * (W0 + sum s B A) , f * sum s lora_bias + b0`` with ``f = m / ||W0 + s B A||`` per output
    row on a DoRA layer (one part there), else 1; a weight kind's ``ΔW`` and ``diff_b`` add as
    ``B A`` and ``lora_bias`` do (never under a DoRA factor: no other part shares its layer)."""
    out: Weights = {}
    for name in LAYERS:
        w, b = base[f"{name}.weight"], base.get(f"{name}.bias")
        lora_bias = None
        for p in parts:
            if name in p.made.dense:
                w = w + p.weight * p.made.dense[name]
            if name in p.made.bias:
                lora_bias = p.weight * p.made.bias[name] + (0 if lora_bias is None else lora_bias)
        f = None
        for p in parts:
            if name in p.made.magnitude:
                f = p.made.magnitude[name] / w.norm(dim=1)  # [out]
                w = f[:, None] * w
        if lora_bias is not None:
            lora_bias = lora_bias if f is None else f * lora_bias
            b = lora_bias if b is None else b + lora_bias
        out[name] = (w, b)
    return out


@dataclass
class Slot:
    parts: list[Part]
    stacked: bool  # loaded as a list: info.scale is a tuple

    def ranks(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.parts:
            for name, r in p.ranks.items():
                out[name] = out.get(name, 0) + r
        return out


def _flags(spec: Spec) -> dict[str, bool]:
    """The PEFT config entries that say the tensors carry DoRA magnitudes or LoRA biases."""
    return {"use_dora": bool(spec.dora), "lora_bias": bool(spec.bias)}


# -- the machine ------------------------------------------------------------------------------------------------


class RuntimeMachine(RuleBasedStateMachine):
    """Subclassed once per configuration (the class attributes below, :data:`CONFIGS`)."""

    SLOTS = 3
    MERGED = False
    DTYPE = torch.float64
    EXTRAS = True  # inject(..., extras=True): DoRA magnitudes and LoRA biases load unmerged
    COMPILE: str | None = None  # a torch.compile backend the model runs under
    GROUPS = 2  # the conv's (merged mode refuses a grouped conv: its LoRA mixes the groups)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Net(self.GROUPS).to(self.DTYPE)
        self.pristine = copy.deepcopy(self.model)
        self.base = {k: v.detach().double().clone() for k, v in self.model.state_dict().items()}
        self.base["conv.weight"] = _ungrouped(self.base["conv.weight"], self.GROUPS)
        self.runtime = lorahot.inject(
            self.model, list(LAYERS), max_rank=MAX_RANK, slots=self.SLOTS, merged=self.MERGED, extras=self.EXTRAS
        )
        self.nbytes = self.runtime.nbytes
        self.forward = self.model if self.COMPILE is None else torch.compile(self.model, backend=self.COMPILE)
        self.ejected = False
        self.gone: set[str] = set()  # preload keys whose entry the cache no longer holds
        self.ids = torch.randint(0, VOCAB, (ROWS, SIDE, SIDE), generator=torch.Generator().manual_seed(1))
        self.tmp = Path(tempfile.mkdtemp(prefix="lorahot-stateful-"))
        self.files = 0
        self.paths: dict[Path, Spec] = {}  # PEFT directories written, and what each holds now
        self.slots: list[Slot | None] = [None] * self.SLOTS
        self.active = 0
        self.routing: tuple[int, ...] | None = None
        self.base_only = False  # merged: every row at -1, the base weights until the next activate
        self.keys: dict[str, Spec] = {}  # preload keys -> what they name
        self.prepared: list[tuple[Any, Spec]] = []
        self.made: dict[Spec, Made] = {}

    def teardown(self) -> None:
        try:
            self._eject()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _make(self, spec: Spec) -> Made:
        if spec not in self.made:
            gen = torch.Generator().manual_seed(spec.seed)
            made = Made({}, {}, {}, {}, {})
            for name, kind in spec.kinds:
                self._make_weight_kind(made, name, kind, gen)
            for name, rank in spec.ranks:
                module = self.runtime.layers[name].base_layer
                a, b = random_lora(module, rank, gen, self.DTYPE)
                ka, kb = peft_keys(module, name)
                made.tensors[ka], made.tensors[kb] = a, b
                made.dense[name] = spec.alpha / rank * dense_delta_weight(module, a, b)
                made.ranks[name] = rank
                rows = b.shape[0]
                if name in spec.bias:
                    bias = (torch.randn(rows, generator=gen, dtype=torch.float64) * 0.3).to(self.DTYPE)
                    made.tensors[f"{PREFIX}{name}.lora_B.bias"] = bias
                    made.bias[name] = spec.alpha / rank * bias.double()
                if name in spec.dora:
                    norm = self.base[f"{name}.weight"].norm(dim=1)
                    m = (norm * (0.5 + torch.rand(rows, generator=gen, dtype=torch.float64))).to(self.DTYPE)
                    made.tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = m
                    made.magnitude[name] = m.double()
            self.made[spec] = made
        return self.made[spec]

    def _make_weight_kind(self, made: Made, name: str, kind: str, gen: torch.Generator) -> None:
        """A LyCORIS/kohya module of ``kind`` on layer ``name`` (kohya names): its tensors, and its
        float64 ``ΔW`` (in ``dense``), ``diff_b`` (in ``bias``) and rank as ``info`` reports it."""
        weight = self.base[f"{name}.weight"]
        out, flat = weight.shape[0], weight[0].numel()

        def r(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.3).to(self.DTYPE)

        f: dict[str, torch.Tensor]
        if kind == "loha":
            f = {"hada_w1_a": r(out, 2), "hada_w1_b": r(2, flat), "hada_w2_a": r(out, 2), "hada_w2_b": r(2, flat)}
            f["alpha"] = torch.tensor(3.0)
            d = f64(f["hada_w1_a"]) @ f64(f["hada_w1_b"]) * (f64(f["hada_w2_a"]) @ f64(f["hada_w2_b"])) * 1.5
            made.ranks[name] = 2
        elif kind == "lokr":
            rows = 1 if out % 2 else 2
            f = {"lokr_w1": r(rows, 1), "lokr_w2": r(out // rows, flat)}
            d = torch.kron(f64(f["lokr_w1"]), f64(f["lokr_w2"]))
            made.ranks[name] = 0
        else:
            f = {"diff": r(*weight.shape)}
            d = f64(f["diff"])
            if f"{name}.bias" in self.base:
                f["diff_b"] = r(out)
                made.bias[name] = f64(f["diff_b"])
            made.ranks[name] = 0
        made.tensors.update({f"lora_unet_{name}.{k}": v for k, v in f.items()})
        made.dense[name] = d.reshape(weight.shape)

    def _source(self, spec: Spec, via: str) -> tuple[Any, dict[str, Any]]:
        """``spec`` as ``load`` takes it: a mapping (alpha in ``config``) or a PEFT directory (a
        kohya file for weight kinds)."""
        made = self._make(spec)
        if spec.kinds:
            if via == "mapping":
                return dict(made.tensors), {}
            self.files += 1
            path = self.tmp / f"w{self.files}.safetensors"
            save_file({k: v.contiguous() for k, v in made.tensors.items()}, str(path))
            return path, {}
        if via == "mapping":
            return dict(made.tensors), {"config": {"lora_alpha": spec.alpha, **_flags(spec)}}
        self.files += 1
        directory = self.tmp / f"a{self.files}"
        directory.mkdir()
        self._write(directory, spec)
        return directory, {}

    def _write(self, directory: Path, spec: Spec) -> None:
        made = self._make(spec)
        save_file({k: v.contiguous() for k, v in made.tensors.items()}, str(directory / "adapter_model.safetensors"))
        ranks = dict(spec.ranks)
        first = next(iter(ranks.values()))
        config = {"peft_type": "LORA", "r": first, "lora_alpha": spec.alpha, "rank_pattern": ranks, **_flags(spec)}
        (directory / "adapter_config.json").write_text(json.dumps(config))
        self.paths[directory] = spec

    def _part(self, spec: Spec, weight: float) -> Part:
        return Part(self._make(spec), weight)

    def _row_slots(self) -> list[int | None]:
        """The slot each row computes with (None: the base model)."""
        if self.MERGED and self.base_only:
            return [None] * ROWS
        if self.routing is None:
            return [self.active] * ROWS
        return [None if s < 0 else s for s in self.routing]

    def _output(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.forward(self.ids if ids is None else ids)

    def _expected(self) -> torch.Tensor:
        rows = []
        for i, s in enumerate(self._row_slots()):
            rows.append(_reference(self._weights(s), self.ids[i : i + 1]))
        return torch.cat(rows)

    def _weights(self, slot: int | None) -> Weights:
        held = None if slot is None else self.slots[slot]
        return _adapted(self.base, [] if held is None else held.parts)

    def _observe(self) -> dict[str, Any]:
        rt = self.runtime
        return {
            "buffers": [t.detach().clone() for a in rt.buffers.arenas for t in (a.A, a.B, a.S, a.E)],
            "state": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "infos": [rt.info(s) for s in range(self.SLOTS)],
            "active": rt.active_slot,
            "routing": rt.routing,
            "keys": rt.cache.keys(),
            "nbytes": rt.nbytes,
            "output": self._output(),
        }

    def _refused(self, call: Callable[[], object], error: type[lorahot.LoraError] = lorahot.LoraError) -> None:
        """``call`` raises ``error`` (never UnexpectedError) and changes nothing, bitwise."""
        before = self._observe()
        with pytest.raises(error) as raised:
            call()
        assert not isinstance(raised.value, lorahot.UnexpectedError), raised.value
        after = self._observe()
        for key, was in before.items():
            now = after[key]
            if key == "buffers":
                assert all(torch.equal(x, y) for x, y in zip(was, now)), (
                    f"a refused call changed a buffer: {raised.value}"
                )
            elif key == "state":
                assert all(torch.equal(was[k], now[k]) for k in was), f"a refused call changed a weight: {raised.value}"
            elif key == "output":
                assert torch.equal(was, now), f"a refused call changed the output: {raised.value}"
            else:
                assert was == now, f"a refused call changed {key}: {was!r} -> {now!r} ({raised.value})"

    def _loaded(self, slot: int, parts: list[Part], stacked: bool) -> None:
        self.slots[slot] = Slot(parts, stacked)

    def _problem(self, specs: list[Spec]) -> type[lorahot.LoraError] | None:
        """The error a load of ``specs`` (one adapter, or a stack) must raise, if any."""
        if any(s.extras for s in specs) and not (self.EXTRAS or self.MERGED):
            return lorahot.AdapterMismatchError  # DoRA and LoRA biases need extras=True unmerged
        if any(set(s.dora) & set(s.bias) for s in specs):
            return lorahot.AdapterMismatchError  # a DoRA magnitude and a LoRA bias on one module: PEFT refuses both
        if self.MERGED and any("fc2" in s.bias for s in specs):
            return lorahot.AdapterMismatchError  # merged folds a LoRA bias into a base bias fc2 lacks
        if not self.MERGED and any(s.kinds for s in specs):
            return lorahot.LoraError  # LyCORIS kinds and diffs load in merged mode only
        for name in LAYERS:
            touching = [s for s in specs if name in s.layers]
            if sum(dict(s.ranks).get(name, 0) for s in touching) > MAX_RANK:
                return lorahot.AdapterMismatchError
            if len(touching) > 1 and any(name in s.dora for s in touching):
                return lorahot.AdapterMismatchError  # DoRA on a layer another part loads into
        return None

    # -- loads -----------------------------------------------------------------------------------------------

    @rule(
        spec=_SPEC,
        slot=st.integers(0, 2),
        weight=_WEIGHT,
        via=st.sampled_from(["mapping", "file"]),
    )
    def load_one(self, spec: Spec, slot: int, weight: float, via: str) -> None:
        slot %= self.SLOTS
        source, options = self._source(spec, via)
        error = self._problem([spec])
        if error is not None:
            self._refused(lambda: self.runtime.load(source, slot=slot, scale=weight, **options), error)
            return
        self.runtime.load(source, slot=slot, scale=weight, **options)
        self._loaded(slot, [self._part(spec, weight)], stacked=False)

    @rule(
        specs=st.lists(_SPEC | _WEIGHT_SPEC, min_size=1, max_size=3).filter(lambda s: any(p.kinds for p in s)),
        slot=st.integers(0, 2),
        data=st.data(),
    )
    def load_weight_kinds(self, specs: list[Spec], slot: int, data: st.DataObject) -> None:
        """LyCORIS/kohya weight kinds alone or stacked with PEFT LoRAs (DoRA, LoRA biases) on the
        same layers: merged mode folds them into the base weights; unmerged refuses them."""
        slot %= self.SLOTS
        weights = [data.draw(_WEIGHT, label="weight") for _ in specs]
        sources = []
        for spec in specs:
            source, options = self._source(spec, data.draw(st.sampled_from(["mapping", "file"]), label="via"))
            sources.append(lorahot.read_adapter(source, **options) if options else source)
        one = len(specs) == 1 and data.draw(st.booleans(), label="one adapter")
        call = (lambda: self.runtime.load(sources[0], slot=slot, scale=weights[0])) if one else None
        error = self._problem(specs)
        if error is not None:
            self._refused(call or (lambda: self.runtime.load(sources, slot=slot, scale=weights)), error)
            return
        if call is not None:
            call()
        else:
            self.runtime.load(sources, slot=slot, scale=weights)
        self._loaded(slot, [self._part(s, w) for s, w in zip(specs, weights)], stacked=not one)

    @rule(specs=st.lists(_SPEC, min_size=1, max_size=3), slot=st.integers(0, 2), data=st.data())
    def load_stack(self, specs: list[Spec], slot: int, data: st.DataObject) -> None:
        slot %= self.SLOTS
        one = data.draw(st.booleans(), label="one weight for all")
        weights = [data.draw(_WEIGHT, label="weight")] * len(specs) if one else [data.draw(_WEIGHT) for _ in specs]
        sources = []
        for spec in specs:
            via = data.draw(st.sampled_from(["mapping", "file", "prepared", "key"]), label="via")
            if via in ("mapping", "file") or self._problem([spec]) is not None:  # (preload would refuse it)
                source, options = self._source(spec, via)
                if options:  # a stack's parts share read options: give the mapping as a read Adapter
                    source = lorahot.read_adapter(source, **options)
            elif via == "prepared":
                source = self.runtime.preload(*self._preloadable(spec))
                self.prepared.append((source, spec))
            else:
                self.files += 1
                key = f"part{self.files}"
                self.runtime.preload(*self._preloadable(spec), key=key)
                self._named(key, spec)
                source = key
            sources.append(source)
        gone = [s for s in sources if isinstance(s, str) and s not in self.runtime.cache]  # evicted meanwhile
        for key in gone:
            self.keys.pop(key, None)
            self.gone.add(key)
        scale = weights[0] if one and data.draw(st.booleans(), label="as a number") else weights
        error = lorahot.UsageError if gone else self._problem(specs)
        if error is not None:
            self._refused(lambda: self.runtime.load(sources, slot=slot, scale=scale), error)
            return
        self.runtime.load(sources, slot=slot, scale=scale)
        self._loaded(slot, [self._part(s, w) for s, w in zip(specs, weights)], stacked=True)

    def _preloadable(self, spec: Spec) -> tuple[Any]:
        source, options = self._source(spec, "mapping")
        return (lorahot.read_adapter(source, **options),)

    @rule(spec=_SPEC, key=st.sampled_from(["x", "y", "z"]), via=st.sampled_from(["mapping", "file"]))
    def preload_key(self, spec: Spec, key: str, via: str) -> None:
        source, options = self._source(spec, via)
        if options:
            source = lorahot.read_adapter(source, **options)
        error = self._problem([spec])
        if error is not None:
            self._refused(lambda: self.runtime.preload(source, key=key), error)
            return
        self.runtime.preload(source, key=key)
        self._named(key, spec)

    def _named(self, key: str, spec: Spec) -> bool:
        """Notes what a preload under ``key`` named: kept, unless larger than the cache."""
        if key in self.runtime.cache:
            self.keys[key] = spec
            self.gone.discard(key)
            return True
        self.keys.pop(key, None)
        self.gone.add(key)
        return False

    @rule(slot=st.integers(0, 2), weight=_WEIGHT, data=st.data())
    def load_key(self, slot: int, weight: float, data: st.DataObject) -> None:
        slot %= self.SLOTS
        if not self.keys:
            return
        key = data.draw(st.sampled_from(sorted(self.keys)), label="key")
        self.runtime.load(key, slot=slot, scale=weight)
        self._loaded(slot, [self._part(self.keys[key], weight)], stacked=False)

    @rule(slot=st.integers(0, 2), weight=_WEIGHT, data=st.data())
    def load_prepared(self, slot: int, weight: float, data: st.DataObject) -> None:
        slot %= self.SLOTS
        if not self.prepared:
            return
        prepared, spec = data.draw(st.sampled_from(self.prepared), label="prepared")
        self.runtime.load(prepared, slot=slot, scale=weight)
        self._loaded(slot, [self._part(spec, weight)], stacked=False)

    @rule(key=st.sampled_from(["x", "y", "z", "all"]))
    def discard_key(self, key: str) -> None:
        if key == "all":
            self.runtime.cache.clear()
            self.gone |= set(self.keys)
            self.keys.clear()
            return
        self.runtime.cache.discard(key)
        if key in self.keys:
            del self.keys[key]
            self._refused(lambda: self.runtime.load(key), lorahot.UsageError)

    @rule(spec=_SPEC, slot=st.integers(0, 2), data=st.data())
    def rewrite_file(self, spec: Spec, slot: int, data: st.DataObject) -> None:
        """A file preloaded, then written again (its mtime moved): a load by its path reads the
        new adapter, not the cached one."""
        if not self.paths:
            return
        directory = data.draw(st.sampled_from(sorted(self.paths)), label="directory")
        if data.draw(st.booleans(), label="preload first") and self._problem([self.paths[directory]]) is None:
            self.runtime.preload(directory)
        self._write(directory, spec)
        for f in directory.iterdir():
            stat = f.stat()
            os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9 * self.files))
        self.files += 1
        slot %= self.SLOTS
        error = self._problem([spec])
        if error is not None:
            self._refused(lambda: self.runtime.load(directory, slot=slot), error)
            return
        self.runtime.load(directory, slot=slot)
        self._loaded(slot, [self._part(spec, 1.0)], stacked=False)

    # -- activations, unloads, weights -----------------------------------------------------------------------

    @rule(slot=st.integers(0, 2))
    def activate(self, slot: int) -> None:
        slot %= self.SLOTS
        self.runtime.activate(slot)
        self.active, self.routing, self.base_only = slot, None, False

    @rule(
        rows=st.lists(st.integers(-1, 2), min_size=ROWS, max_size=ROWS),
        kind=st.sampled_from(["list", "tensor", "array"]),
    )
    def route(self, rows: list[int], kind: str) -> None:
        rows = [s if s < self.SLOTS else -1 for s in rows]
        given: Any = {"list": rows, "tensor": torch.tensor(rows), "array": np.array(rows)}[kind]
        empty = [s for s in rows if s >= 0 and self.slots[s] is None]
        one = len(set(rows)) == 1 and rows[0] >= 0
        if empty:
            self._refused(lambda: self.runtime.activate(given), lorahot.UsageError)
            return
        if self.MERGED and len(set(rows)) > 1:
            self._refused(lambda: self.runtime.activate(given), lorahot.UsageError)
            return
        self.runtime.activate(given)
        self.routing = tuple(rows)
        if one:
            self.active, self.base_only = rows[0], False
        elif self.MERGED:  # every row at -1
            self.base_only = True

    @rule(slot=st.one_of(st.none(), st.integers(0, 2)))
    def unload(self, slot: int | None) -> None:
        if slot is None:
            self.runtime.unload()
            self.slots = [None] * self.SLOTS
            return
        slot %= self.SLOTS
        self.runtime.unload(slot)
        self.slots[slot] = None

    @rule(slot=st.one_of(st.none(), st.integers(0, 2)), data=st.data())
    def set_scale(self, slot: int | None, data: st.DataObject) -> None:
        s = self.active if slot is None else slot % self.SLOTS
        slot = None if slot is None else s
        held = self.slots[s]
        if held is None:
            self._refused(lambda: self.runtime.set_scale(1.0, slot=slot), lorahot.UsageError)
            return
        if data.draw(st.booleans(), label="a list"):
            weights = [data.draw(_WEIGHT, label="weight") for _ in held.parts]
            self.runtime.set_scale(weights, slot=slot)
        else:
            weights = [data.draw(_WEIGHT, label="weight")] * len(held.parts)
            self.runtime.set_scale(weights[0], slot=slot)
        for p, w in zip(held.parts, weights):
            p.weight = w

    @rule(name=st.sampled_from(["conv", "fc1", "fc2"]), data=st.data())
    def edit_a_merged_weight(self, name: str, data: st.DataObject) -> None:
        """A user's write into a merged weight is caught by the next call that would rewrite it
        (refused, nothing changed); written back bitwise, the runtime serves again: lorahot's
        own writes are never taken for an edit."""
        if not self.MERGED:
            return
        weight = getattr(self.model, name).weight
        at = data.draw(st.integers(0, weight.numel() - 1), label="element")
        with torch.no_grad():
            was = weight.view(-1)[at].clone()
            weight.view(-1)[at] += 1.0
        self._refused(lambda: self.runtime.activate(self.active), lorahot.UsageError)
        with torch.no_grad():
            weight.view(-1)[at] = was

    # -- refused calls ---------------------------------------------------------------------------------------

    @rule(spec=_BIG_SPEC, slot=st.integers(0, 2), via=st.sampled_from(["mapping", "file"]))
    def load_too_large(self, spec: Spec, slot: int, via: str) -> None:
        source, options = self._source(spec, via)
        self._refused(
            lambda: self.runtime.load(source, slot=slot % self.SLOTS, **options), lorahot.AdapterMismatchError
        )

    @rule(
        spec=_SPEC,
        slot=st.integers(0, 2),
        damage=st.sampled_from(["a-in", "b-out", "rank", "nan", "dtype", "conv-groups"]),
    )
    def load_bad_shape(self, spec: Spec, slot: int, damage: str) -> None:
        made = self._make(spec)
        tensors = dict(made.tensors)
        ka = sorted(k for k in tensors if k.endswith(("lora_A.weight", "lora_embedding_A")))[0]
        kb = ka.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
        a, b = tensors[ka], tensors[kb]
        if damage == "a-in":
            tensors[ka] = torch.cat([a, a[:, :1]], dim=1)
        elif damage == "b-out":
            tensors[kb] = torch.cat([b, b[:1]], dim=0)
        elif damage == "rank":
            tensors[kb] = torch.cat([b, b[:, :1]], dim=1)
        elif damage == "conv-groups" and self.GROUPS == 2:  # a rank the conv's groups do not divide
            module = self.runtime.layers["conv"].base_layer
            a, b = random_lora(module, 3, torch.Generator().manual_seed(spec.seed), self.DTYPE)
            tensors = dict(zip(peft_keys(module, "conv"), (a, b.expand(-1, 3, -1, -1).contiguous())))
        elif damage == "nan":
            tensors[ka] = a.clone()
            tensors[ka].view(-1)[0] = float("nan")
        else:
            tensors[ka] = a.to(torch.int32)
        self._refused(lambda: self.runtime.load(tensors, slot=slot % self.SLOTS))

    @rule(
        op=st.sampled_from(["load", "activate", "unload", "set_scale"]),
        slot=st.sampled_from([3, -1, -2, 1.5, "0", None, True, 2**70]),
    )
    def bad_slot(self, op: str, slot: Any) -> None:
        if isinstance(slot, int) and not isinstance(slot, bool) and 0 <= slot < self.SLOTS:
            return
        if slot is None and op in ("unload", "set_scale"):
            return  # None is the active slot / every slot there
        tensors = dict(self._make(Spec((("fc1", 2),), 1.0, 0)).tensors)
        calls = {
            "load": lambda: self.runtime.load(tensors, slot=slot),
            "activate": lambda: self.runtime.activate(slot),
            "unload": lambda: self.runtime.unload(slot),
            "set_scale": lambda: self.runtime.set_scale(1.0, slot=slot),
        }
        self._refused(calls[op], lorahot.UsageError)

    @rule(value=st.sampled_from([float("nan"), float("inf"), "x", None, [1.0] * 5, [], 1e40]))
    def bad_scale(self, value: Any) -> None:
        if self.slots[self.active] is None or (value == 1e40 and self.DTYPE is torch.float64):
            return  # (1e40 fits float64 buffers)
        self._refused(lambda: self.runtime.set_scale(value), lorahot.UsageError)

    @rule(value=st.sampled_from([float("nan"), "x", [1.0, 2.0, 3.0, 4.0]]), slot=st.integers(0, 2))
    def bad_load_scale(self, value: Any, slot: int) -> None:
        tensors = dict(self._make(Spec((("fc1", 2),), 1.0, 0)).tensors)
        self._refused(lambda: self.runtime.load(tensors, slot=slot % self.SLOTS, scale=value), lorahot.UsageError)

    @rule(
        rows=st.sampled_from(
            [
                [],
                [0, 1, 5, 0],
                [-2, 0, 0, 0],
                [0.5, 0, 0, 0],
                "0101",
                torch.tensor([0.0, 1.0, 0.0, 1.0]),
                torch.zeros(2, 2, dtype=torch.long),
            ]
        )
    )
    def bad_routing(self, rows: Any) -> None:
        self._refused(lambda: self.runtime.activate(rows), lorahot.UsageError)

    @rule()
    def load_unknown_key(self) -> None:
        self._refused(lambda: self.runtime.load("never-preloaded-key"), lorahot.SourceNotFoundError)

    @rule(spec=_SPEC, slot=st.integers(0, 2), weight=_WEIGHT, background=st.booleans())
    def load_preloaded_file(self, spec: Spec, slot: int, weight: float, background: bool) -> None:
        """A file preloaded (or prefetched) by its path, then loaded by the same path."""
        slot %= self.SLOTS
        path, _ = self._source(spec, "file")
        error = self._problem([spec])
        if error is not None:
            self._refused(lambda: self.runtime.preload(path), error)
            return
        if background:
            self.runtime.prefetch(path).result(timeout=60)
        else:
            self.runtime.preload(path)
        self.runtime.load(path, slot=slot, scale=weight)
        self._loaded(slot, [self._part(spec, weight)], stacked=False)

    @rule(budget=st.sampled_from([0, 1, 2_000, 6_000, 2**31]))
    def cache_budget(self, budget: int) -> None:
        """A smaller cache evicts at once; a key whose entry went is refused from then on."""
        self.runtime.cache.budget_bytes = budget
        kept = set(self.runtime.cache.keys())
        for key in [k for k in self.keys if k not in kept]:
            del self.keys[key]
            self.gone.add(key)

    @rule(data=st.data())
    def load_gone_key(self, data: st.DataObject) -> None:
        if not self.gone:
            return
        key = data.draw(st.sampled_from(sorted(self.gone)), label="gone key")
        self._refused(lambda: self.runtime.load(key), lorahot.UsageError)

    @rule(rows=st.sampled_from([1, 2, 3, 6, 8]))
    def other_batch(self, rows: int) -> None:
        """A batch of another size: computed with the whole batch's slot (merged: the weights in
        force), or, under an unmerged per-row routing (every row at -1 included; one slot for
        every row runs as the whole batch), refused from the forward, nothing changed."""
        ids = torch.randint(0, VOCAB, (rows, SIDE, SIDE), generator=torch.Generator().manual_seed(rows))
        slots = self._row_slots()
        one = self.routing is None or (len(set(self.routing)) == 1 and self.routing[0] >= 0)
        if not (self.MERGED or one):
            self._refused(lambda: self._output(ids), lorahot.UsageError)
            return
        got = self._output(ids).double()
        self._close(got, _reference(self._weights(slots[0]), ids))

    def _eject(self) -> None:
        """After any sequence: the base model back, bitwise; every call after it is refused."""
        self.runtime.eject()
        self.ejected = True
        assert all(type(m) is type(p) for m, p in zip(self.model.modules(), self.pristine.modules()))
        want = self.pristine.state_dict()
        for k, v in self.model.state_dict().items():
            assert torch.equal(v, want[k]), f"eject left {k} changed"
        with torch.no_grad():
            assert torch.equal(self.model(self.ids), self.pristine(self.ids))
        tensors = dict(self._make(Spec((("fc1", 2),), 1.0, 0)).tensors)
        for call in (
            lambda: self.runtime.load(tensors),
            lambda: self.runtime.activate(0),
            lambda: self.runtime.activate([0, -1, 0, -1]),
            lambda: self.runtime.unload(),
            lambda: self.runtime.set_scale(1.0),
            lambda: self.runtime.preload(tensors),
            lambda: self.runtime.info(),
            lambda: self.runtime.nbytes,
            lambda: self.runtime.eject(),
        ):
            with pytest.raises(lorahot.UsageError):
                call()

    # -- what is checked after every step --------------------------------------------------------------------

    def _close(self, got: torch.Tensor, want: torch.Tensor) -> None:
        tol = 1e-10 if self.DTYPE is torch.float64 else 2e-5 * (1 + want.abs().max().item())
        diff = (got - want).abs().max().item()
        assert diff <= tol, f"max abs diff {diff:.3e} (tolerance {tol:.1e}); rows use slots {self._row_slots()}"

    @invariant()
    def output_matches_reference(self) -> None:
        if not self.ejected:
            self._close(self._output().double(), self._expected())

    @invariant()
    def bookkeeping_matches(self) -> None:
        if self.ejected:
            return
        rt = self.runtime
        assert rt.nbytes == self.nbytes, "the runtime's storage grew after inject"
        assert rt.info() == rt.info(self.active)
        kept = set(rt.cache.keys())  # any preload may evict another entry
        for key in [k for k in self.keys if k not in kept]:
            del self.keys[key]
            self.gone.add(key)
        assert rt.active_slot == self.active
        assert rt.routing == self.routing
        for s, held in enumerate(self.slots):
            info = rt.info(s)
            if held is None:
                assert info is None, f"slot {s} should be empty: {info}"
                continue
            assert info is not None, f"slot {s} should hold {len(held.parts)} part(s)"
            weights = tuple(p.weight for p in held.parts)
            assert info.scale == (weights if held.stacked else weights[0]), (s, info.scale, weights)
            assert dict(info.ranks) == held.ranks(), (s, info.ranks, held.ranks())


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.double()


def _machine(name: str, **config: Any) -> type[RuntimeMachine]:
    return type(name, (RuntimeMachine,), config)


CONFIGS = {
    "unmerged-float64": {},
    "plain-float64": {"EXTRAS": False},  # DoRA and LoRA biases refused
    "wide-float32": {"WIDE": True, "DTYPE": torch.float32},
    "merged-float64": {"MERGED": True, "GROUPS": 1},
    "compiled-float64": {"COMPILE": "eager"},
    "unmerged-float32": {"DTYPE": torch.float32},
    "wide-float64": {"WIDE": True},
    "merged-float32": {"MERGED": True, "GROUPS": 1, "DTYPE": torch.float32},
    "compiled-merged-float32": {"MERGED": True, "GROUPS": 1, "DTYPE": torch.float32, "COMPILE": "aot_eager"},
}
#: ten sequences of up to 20 calls per configuration (the nine took 68 worker-seconds of a cold make
#: test at fifteen); the nine run in about 16 s; the last four are marked slow
SLOW = list(CONFIGS)[5:]


@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CONFIGS])
def test_any_sequence_of_runtime_calls_matches_the_model(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options = dict(CONFIGS[config])
    if options.pop("WIDE", False):  # the CUDA one-GEMM layers (weight beside s * B, A beneath) on the CPU
        monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    # offline: the key load_unknown_key reads as a Hub repo id is refused from the local cache at
    # once, never sent to the Hub (a request per call, 0.1 s each with no network, more with one)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pytest.importorskip("huggingface_hub.constants"), "HF_HUB_OFFLINE", True)
    machine = _machine(f"Runtime_{config.replace('-', '_')}", **options)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=10, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
