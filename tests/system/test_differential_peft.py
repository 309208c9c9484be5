"""A differential run against PEFT: drawn models, drawn PEFT configs, drawn runtime calls.

Hypothesis draws a small float64 model mixing ``nn.Linear`` (with and without bias, one under a
digit name, ``layers.0``), a transformers ``Conv1D``, ``nn.Conv1d`` and ``nn.Conv2d`` (kernel 1,
3 or 3x1, stride, padding or ``"same"``, dilation) and ``nn.Embedding`` (with and without
``padding_idx``); two or three PEFT ``LoraConfig``s (rank, alpha, rsLoRA, DoRA, LoRA bias,
``rank_pattern`` / ``alpha_pattern`` keys from names and suffixes to wildcards, alternations,
anchors and near misses, target modules as names, suffixes or a regex, ``exclude_modules``,
``fan_in_fan_out``, ``init_lora_weights``) whose adapters get random non-zero weights
(magnitudes and LoRA biases included) and are saved with ``save_pretrained``; and a sequence of
calls on one injected runtime (merged or not, 1 to 3 slots): loads (by directory, file, mapping
with ``config=``, or :class:`lorahot.Adapter`) and stacks (an adapter twice included) into
slots, ``set_scale`` (one number or one per part, the active slot or a named one),
``activate`` (a slot, one slot per row, or every row on one slot), ``unload``, ``preload``, and
a file written again with other weights (slots keep what they copied, a later load reads it).

After every call the runtime's output is compared with PEFT's own model holding the same
adapters (``PeftModel.from_pretrained`` + ``load_adapter``, each version of a rewritten file
under its own name), the slot's parts active together (``base_model.set_adapter``), each at its
weight (``scaling = w * alpha / r``; an adapter stacked with itself at the sum), or the base
model for an empty slot; a per-row routing is compared row by row. The bound is 1e-10 relative
(max abs error over max abs output) in float64. PEFT's unmerged conv LoRA leaves out the conv's
dilation, so for a dilated kernel wider than 1 PEFT's merged weights (``merge_adapter``) are the
reference. A refusal with a typed lorahot error is allowed (a refusal is not a wrong number)
when it changed nothing: the output stays bitwise what it was; a file PEFT's own loader refuses
(overlapping ``rank_pattern`` keys, which ``save_pretrained`` writes sorted, so the first match
gives another rank than the tensors') must be refused. An :class:`lorahot.UnexpectedError` or
any other exception fails. After the last call ``eject`` gives back the base model (its
output and state dict bitwise). ``-s`` prints the refusals met and the calls compared.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import lorahot

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-10

#: The refusals seen, by error type and first lines (printed with ``-s``: a record of what the
#: drawn space meets), and the number of calls compared with PEFT.
REFUSALS: Counter[str] = Counter()
COMPARED: Counter[str] = Counter()

NAMES = ("emb", "layers.0", "layers.1", "blk.conv", "c1d", "img", "out")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The drawn model: which layers have a bias, the convolutions' shapes, the padding index."""

    padding_idx: int | None
    biases: tuple[bool, bool, bool]  # layers.0, layers.1, out
    conv: tuple[int, int, int | str, int, bool]  # kernel, stride, padding, dilation, bias
    img: tuple[int | tuple[int, int], int | tuple[int, int], int | str, int, bool]


class Mixed(nn.Module):
    """Tokens through an embedding, two Linears, a Conv1d and a transformers ``Conv1D``; an
    image through a Conv2d and a Linear over its channels; both flattened into one output."""

    def __init__(self, g: Geometry) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8, padding_idx=g.padding_idx)
        self.layers = nn.ModuleList([nn.Linear(8, 12, bias=g.biases[0]), nn.Linear(12, 12, bias=g.biases[1])])
        self.blk = nn.Module()
        k, s, p, d, b = g.conv
        self.blk.conv = nn.Conv1d(12, 6, k, stride=s, padding=p, dilation=d, bias=b)
        self.c1d = transformers.pytorch_utils.Conv1D(5, 6)
        k, s, p, d, b = g.img
        self.img = nn.Conv2d(3, 4, k, stride=s, padding=p, dilation=d, bias=b)
        self.out = nn.Linear(4, 3, bias=g.biases[2])

    def forward(self, ids: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.layers[1](self.layers[0](self.emb(ids)))  # (B, T, 12)
        h = self.blk.conv(h.transpose(1, 2))  # (B, 6, T')
        h = self.c1d(h.transpose(1, 2).contiguous())  # (B, T', 5): Conv1D views its input
        g = self.img(image)  # (B, 4, H', W')
        g = self.out(g.permute(0, 2, 3, 1))  # (B, H', W', 3)
        return torch.cat([h.flatten(1), g.flatten(1)], 1)


def _build(g: Geometry) -> Mixed:
    torch.manual_seed(0)
    model = Mixed(g).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


BATCH = 4


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (BATCH, 9), generator=gen)
    ids[:, 0] = 0  # the padding index, where one is drawn
    return ids, torch.randn(BATCH, 3, 7, 7, generator=gen, dtype=torch.float64)


def _has_bias(g: Geometry, name: str) -> bool:
    biases = {"emb": False, "layers.0": g.biases[0], "layers.1": g.biases[1], "blk.conv": g.conv[4], "c1d": True}
    return {**biases, "img": g.img[4], "out": g.biases[2]}[name]


def _dilated(g: Geometry) -> bool:
    """PEFT's unmerged conv LoRA leaves out the base conv's dilation (its A is built without
    it), so a dilated kernel wider than 1 fails there on shapes; PEFT's merged weights, which the
    base conv applies with its dilation, are the reference then, as they are lorahot's formula."""
    return any(k not in (1, (1, 1)) and d > 1 for k, _, _, d, _ in (g.conv, g.img))


# -- drawing ----------------------------------------------------------------------------------

_conv = st.tuples(st.sampled_from([1, 3]), st.integers(1, 2), st.integers(0, 2), st.integers(1, 2), st.booleans())
_same = st.tuples(st.sampled_from([1, 3]), st.just(1), st.just("same"), st.integers(1, 2), st.booleans())
_kernel2 = st.sampled_from([1, 3, (3, 1), (1, 3)])
_img = st.one_of(
    st.tuples(_kernel2, st.sampled_from([1, 2, (1, 2)]), st.integers(0, 2), st.integers(1, 2), st.booleans()),
    st.tuples(_kernel2, st.just(1), st.just("same"), st.integers(1, 2), st.booleans()),
)
_geometry = st.builds(
    Geometry, st.sampled_from([None, 0, 3]), st.tuples(st.booleans(), st.booleans(), st.booleans()),
    st.one_of(_conv, _same), _img,
)  # fmt: skip

#: How a config may name a module in target_modules (PEFT: the name, or a suffix after a dot).
_SHORT = {"emb": "emb", "layers.0": "0", "layers.1": "1", "blk.conv": "conv", "c1d": "c1d", "img": "img", "out": "out"}

#: rank_pattern / alpha_pattern keys: regexes PEFT matches as ``(.*\.)?(key)$`` from the start
#: of a module's name, the first matching key winning: names, suffixes, wildcards, alternations,
#: anchors, and near misses (a suffix not after a dot, a longer name) that must match nothing.
_KEYS = [
    "0", "1", "layers.0", r"layers\.1", r"layers\.\d", r"\d", "s.0", "rs.1", "conv", "blk.conv", "emb",
    "c1d", "img", "out", r"blk\..*", ".*o.*", "(img|out)", "c.*", "^blk.conv", "out$", "[ce].*", r"\w+",
    "lk.conv", "k.conv", "ou", "outs", "blk", "onv", ".mg", "model.layers.0", "base_model.model.out",
    r"model\..*", ".*layers.*", "layers", "img|out", "c|o.*", "0|conv", ".*1|emb", "", r"\bconv", r"c1d\Z",
    "(?:img)", r"[^.]+", "o(?=ut)", r"(\w)\w*", "layers.(0)",
]  # fmt: skip
_ALPHAS = [1, 2, 3.5, 8, 16, 0.25, 7.3]
#: PEFT scales by these too: 0 turns the update off (not DoRA's rescaling), < 0 flips its sign
_ODD_ALPHAS = [0, -4, -0.5]


@st.composite
def _config(draw: st.DrawFn, g: Geometry) -> dict:
    targets = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    style = draw(st.sampled_from(["short", "full", "regex"]))
    if style == "regex":
        target_modules: str | list[str] = "|".join(re.escape(n) for n in targets)
    else:
        target_modules = [_SHORT[n] if style == "short" else n for n in targets]
    keys = st.lists(st.sampled_from(_KEYS), unique=True, max_size=3)
    rank_pattern = {k: draw(st.integers(1, 5)) for k in draw(keys)}
    alpha_pattern = {k: draw(st.sampled_from(_ALPHAS + _ODD_ALPHAS)) for k in draw(keys)}
    dora = draw(st.integers(0, 4)) == 0
    # PEFT refuses a LoRA bias on an embedding or with DoRA; on a dilated model it is the merged
    # reference's, which PEFT cannot merge into a layer without a bias
    bias_ok = "emb" not in targets and not dora and (not _dilated(g) or all(_has_bias(g, n) for n in targets))
    bias = bias_ok and draw(st.sampled_from([False, False, True]))
    return {
        "r": draw(st.integers(1, 4)),
        "lora_alpha": draw(st.sampled_from(_ODD_ALPHAS if draw(st.integers(0, 19)) == 0 else _ALPHAS)),
        "use_rslora": draw(st.booleans()),
        "use_dora": dora,
        "lora_bias": bias,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": draw(st.booleans()),
        "init_lora_weights": draw(st.sampled_from([False, True] if bias else [False, True, "gaussian"])),
        "exclude_modules": draw(
            st.one_of(st.none(), st.lists(st.sampled_from([n for n in NAMES if n != targets[0]]), max_size=2))
        ),
    }


_weight = st.sampled_from([1.0, 0.5, -0.75, 0.0, 2.0, 1.3])

#: How a load names an adapter: its directory, its safetensors file (the config beside it), the
#: tensors as a mapping with the config passed as ``config=``, or an Adapter read beforehand.
_SOURCES = ["dir", "file", "mapping", "adapter"]


@st.composite
def _step(draw: st.DrawFn, adapters: int, slots: int) -> tuple:
    kind = draw(st.sampled_from(["load", "load", "stack", "scale", "activate", "route", "unload", "preload", "resave"]))
    slot = draw(st.integers(0, slots - 1))
    adapter = st.integers(0, adapters - 1)
    if kind == "load":
        how = draw(st.sampled_from(_SOURCES))
        return ("load", draw(adapter), slot, draw(st.one_of(_weight, st.lists(_weight, min_size=1, max_size=1))), how)
    if kind == "stack":
        parts = draw(st.lists(adapter, min_size=2, max_size=3, unique=draw(st.integers(0, 3)) > 0))
        return ("stack", parts, slot, [draw(_weight) for _ in parts], draw(st.sampled_from(_SOURCES)))
    if kind == "scale":
        target = draw(st.one_of(st.just(slot), st.none()))
        return ("scale", target, draw(st.one_of(_weight, st.lists(_weight, min_size=1, max_size=3))))
    if kind == "activate":
        return ("activate", draw(st.integers(-1, slots - 1)) if slots > 1 else slot)
    if kind == "route":
        rows = st.lists(st.integers(-1, slots - 1), min_size=BATCH, max_size=BATCH)
        return ("route", draw(st.one_of(rows, st.integers(-1, slots - 1).map(lambda k: [k] * BATCH))))
    if kind in ("preload", "resave"):
        return (kind, draw(adapter))
    return ("unload", draw(st.one_of(st.none(), st.just(slot))))


@st.composite
def _scenario(draw: st.DrawFn) -> tuple:
    g = draw(_geometry)
    configs = draw(st.lists(_config(g), min_size=2, max_size=3))
    merged = draw(st.booleans())
    slots = draw(st.sampled_from([1, 2, 2, 3]))
    first = ("load", draw(st.integers(0, len(configs) - 1)), 0, 1.0, "dir")
    steps = [first, *draw(st.lists(_step(len(configs), slots), min_size=3, max_size=10))]
    return g, configs, merged, slots, steps


# -- PEFT's side ------------------------------------------------------------------------------


def _save(base: nn.Module, config: dict, path: Path, seed: int) -> None:
    """A PEFT adapter with every LoRA tensor random (B, magnitudes and LoRA biases included)."""
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
                elif "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        model.save_pretrained(path)


class Oracle:
    """PEFT's model holding every adapter saved (each version of a rewritten file under its own
    name), computing what a slot of ``(name, weight)`` parts should."""

    def __init__(self, base: nn.Module, merge: bool) -> None:
        self.base, self.merge = base, merge
        self.model: nn.Module | None = None

    def add(self, name: str, path: Path) -> bool:
        """Loads the adapter at ``path`` as ``name``; False where PEFT cannot load its own file
        (overlapping rank_pattern keys: ``save_pretrained`` sorts them, and the first match
        then gives another rank than the tensors have)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if self.model is None:
                    fresh = copy.deepcopy(self.base)
                    self.model = peft.PeftModel.from_pretrained(fresh, path, adapter_name=name).eval()
                else:
                    self.model.load_adapter(path, adapter_name=name)
            except RuntimeError as e:
                if "size mismatch" not in str(e):
                    raise
                if self.model is not None and name in self.model.peft_config:
                    self.model.delete_adapter(name)
                return False
        self.layers = [m for m in self.model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
        known = dict(getattr(self, "scaling", {}))  # layer -> name -> alpha / r, as each adapter was loaded
        self.scaling = {m: {**known.get(m, {}), name: m.scaling[name]} for m in self.layers if name in m.scaling}
        self.scaling.update({m: known[m] for m in self.layers if m in known and m not in self.scaling})
        return True

    def __call__(self, parts: list[tuple[str, float]] | None, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
        with torch.no_grad():
            if not parts:
                return self.base(*x)
            weights: dict[str, float] = {}
            for name, w in parts:  # an adapter stacked with itself: its weights add (refused with DoRA)
                weights[name] = weights.get(name, 0.0) + w
            assert self.model is not None
            self.model.base_model.set_adapter(list(weights))
            for layer, scaling in self.scaling.items():
                layer.scaling.update(scaling)
                for name, w in weights.items():
                    if name in scaling:
                        layer.scaling[name] = scaling[name] * w
            if not self.merge:
                return self.model(*x)
            with warnings.catch_warnings():  # unmerge warns on the layers these adapters leave alone
                warnings.simplefilter("ignore")
                self.model.base_model.merge_adapter(list(weights))
                try:
                    return self.model(*x)
                finally:
                    self.model.base_model.unmerge_adapter()


# -- the run ----------------------------------------------------------------------------------


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


@dataclasses.dataclass
class Expected:
    """What the runtime should hold: each slot's parts ``(oracle name, weight)``, the active slot,
    the per-row routing in force, and the oracle name of each adapter file as it is now."""

    slots: list[list[tuple[str, float]] | None]
    current: list[str]
    active: int = 0
    routing: list[int] | None = None
    saves: int = 0
    refused: set[str] = dataclasses.field(default_factory=set)  # files PEFT cannot load


def _apply(runtime: lorahot.LoraRuntime, step: tuple, files: list[tuple[Path, dict]], state: Expected) -> None:
    """Makes ``step`` on the runtime and, where it succeeds, on the expected ``state``."""
    kind, slots = step[0], state.slots
    if kind == "load":
        _, i, slot, w, how = step
        source, options = _source(files[i][0], how)
        runtime.load(source, slot=slot, scale=w, **options)
        slots[slot] = [(state.current[i], w[0] if isinstance(w, list) else w)]
    elif kind == "stack":
        _, parts, slot, ws, how = step
        if how == "mapping":  # one config= for every part: the mappings of one file only
            how = "mapping" if len(set(parts)) == 1 else "dir"
        sources = [_source(files[i][0], how) for i in parts]
        runtime.load([source for source, _ in sources], slot=slot, scale=ws, **sources[0][1])
        slots[slot] = [(state.current[i], w) for i, w in zip(parts, ws, strict=True)]
    elif kind == "scale":
        _, slot, value = step
        runtime.set_scale(value, slot=slot)
        s = state.active if slot is None else slot
        held = slots[s] or []
        ws = value if isinstance(value, list) else [value] * len(held)
        slots[s] = [(name, w) for (name, _), w in zip(held, ws, strict=True)]
    elif kind == "activate":
        runtime.activate(step[1])
        state.active, state.routing = step[1], None
    elif kind == "route":
        runtime.activate(step[1])
        state.routing = step[1]
        if len(set(step[1])) == 1 and step[1][0] >= 0:  # runs as activate(k): k becomes the active slot
            state.active = step[1][0]
    elif kind == "preload":
        runtime.preload(str(files[step[1]][0]))
    elif kind == "unload":
        runtime.unload(step[1])
        for s in range(len(slots)) if step[1] is None else [step[1]]:
            slots[s] = None


def _source(path: Path, how: str) -> tuple[object, dict]:
    """Adapter ``path`` as a load names it ``how`` (see :data:`_SOURCES`), with the read options."""
    if how == "file":
        return str(path / "adapter_model.safetensors"), {}
    if how == "mapping":
        config = json.loads((path / "adapter_config.json").read_text())
        return load_file(path / "adapter_model.safetensors"), {"config": config}
    if how == "adapter":
        return lorahot.read_adapter(str(path)), {}
    return str(path), {}


def _expected(oracle: Oracle, state: Expected, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if state.routing is None:
        return oracle(state.slots[state.active], x)
    rows = [oracle(state.slots[s] if s >= 0 else None, x)[r] for r, s in enumerate(state.routing)]
    return torch.stack(rows)


def _resave(base: nn.Module, oracle: Oracle, files: list[tuple[Path, dict]], i: int, state: Expected) -> None:
    """Writes adapter ``i``'s file again with other weights (same config, same size): slots
    holding it keep what they copied, a later load must read the new file."""
    state.saves += 1
    path, config = files[i]
    _save(base, config, path, seed=100 + state.saves)
    state.current[i] = f"a{i}v{state.saves}"
    if not oracle.add(state.current[i], path):
        state.refused.add(state.current[i])


def _run(g: Geometry, configs: list[dict], merged: bool, slots: int, steps: list[tuple]) -> None:
    base = _build(g)
    x = _inputs()
    oracle = Oracle(base, merge=_dilated(g))
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, config in enumerate(configs):
            files.append((Path(tmp) / f"a{i}", config))
            _save(base, config, files[-1][0], seed=i)
        state = Expected([None] * slots, [f"a{i}" for i in range(len(configs))])
        state.refused = {f"a{i}" for i, (path, _) in enumerate(files) if not oracle.add(f"a{i}", path)}
        model = copy.deepcopy(base)
        runtime = lorahot.inject(model, list(NAMES), max_rank=16, slots=slots, merged=merged, extras=not merged)
        for n, step in enumerate(steps):
            if step[0] == "resave":
                _resave(base, oracle, files, step[1], state)
                continue
            with torch.no_grad():
                before = model(*x)
            try:
                _apply(runtime, step, files, state)
            except lorahot.UnexpectedError:
                raise
            except lorahot.LoraError as e:
                REFUSALS[f"{type(e).__name__}: {' / '.join(str(e).replace(tmp, '').splitlines()[:3])[:300]}"] += 1
                with torch.no_grad():
                    after = model(*x)
                assert torch.equal(after, before), f"step {n} {step} was refused but changed the output"
                continue
            held = {name for parts in state.slots for name, _ in parts or []}
            assert not held & state.refused, f"step {n} {step}: loaded a file PEFT's own loader refuses"
            with torch.no_grad():
                got = model(*x)
            want = _expected(oracle, state, x)
            rel = _rel(got, want)
            COMPARED[step[0]] += 1
            assert rel < RTOL, (
                f"step {n} {step}: relative error {rel:.3g} (max abs {float((got - want).abs().max()):.3g}); "
                f"state {state}; geometry {g}; configs {configs}; merged={merged}"
            )
        ejected = runtime.eject()
        with torch.no_grad():
            assert torch.equal(ejected(*x), base(*x)), "after eject the model is not the base model"
        for key, value in base.state_dict().items():
            assert torch.equal(ejected.state_dict()[key], value), f"after eject {key} is not the base's"


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(_scenario())
def _drawn(scenario: tuple) -> None:
    _run(*scenario)


def test_lorahot_matches_peft_after_every_call() -> None:
    REFUSALS.clear()
    COMPARED.clear()
    _drawn()
    print("compared with PEFT:", dict(COMPARED))
    for what, n in REFUSALS.most_common():
        print(f"refused {n}x: {what}")
    assert COMPARED["load"] + COMPARED["stack"] >= 20, "the drawn runs compared too few loads with PEFT"
    assert COMPARED["scale"] and COMPARED["route"] and COMPARED["unload"], COMPARED
