"""A differential run against lycoris-lora: drawn models, drawn LyCORIS networks, drawn calls.

Hypothesis draws a small float64 model (a Linear with or without a bias; after it a LayerNorm,
a LayerNorm without a bias or a GroupNorm; a Conv2d of kernel 1, 3, 1x3 or 3x1 with a stride,
padding, dilation and bias or not) and two LyCORIS networks over it, each built by lycoris-lora's
own ``LycorisNetwork`` as ``create_lycoris`` builds it: an algorithm (LoRA/LoCon, LoHa, LoKr,
full, diagonal OFT, BOFT, (IA)^3, GLoRA) and its options (``linear_dim``/``linear_alpha`` and
``conv_dim``/``conv_alpha``, which LyCORIS gives a conv of kernel 1 the linear ones, LoKr's
``factor``, ``decompose_both``, ``full_matrix``, ``use_tucker``, ``use_scalar``, ``rs_lora``,
weight decomposition on the output or input channels, ``train_norm``; ``bypass_mode`` off).
Every parameter is random and non-zero, and ``save_weights`` writes each network's file.

One runtime (merged, then unmerged, two slots) loads the first, rescales it to a drawn
``set_scale`` (LyCORIS' multiplier), loads the second into the other slot and rescales it there
inactive, activates it, activates the first again, swaps the second into the first's slot and
the first back, loads both as a stack into the second slot at drawn weights, and unloads. After
every call its output is compared with lycoris-lora's forward of the same network at the same
multiplier (a stack: each layer adds each network's delta, as LyCORIS chains the wrappers of a
layer), float64, within 1e-10 of the largest output; after the unload with the base model
bitwise (merged: every weight bitwise too). A typed refusal is allowed only where the README
says the kind, the scale or the stack is refused, and then the output is bitwise what it was;
the refusals met are printed with ``-s``.

The oracle is LyCORIS' eval forward, under what its file says where the two differ (as in
``test_parity_lycoris_drawn.py``): a LoKr with both halves whole reads at scale 1 (its file
holds no rank). LyCORIS builds an OFT's rotation through ``.float().inverse()``; here that
``float()`` keeps float64, so the oracle is LyCORIS' own formula in float64.
"""

from __future__ import annotations

import copy
import logging
import re
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import lorahot

lycoris = pytest.importorskip("lycoris")
from lycoris import LycorisNetwork  # noqa: E402 - after the importorskip

from tests.helpers import lycoris_targets  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-10
ALGOS = ("lora", "loha", "lokr", "full", "diag-oft", "boft", "ia3", "glora")
#: what the README says lorahot refuses, by the words of the refusal: (error, pattern)
SCALE_ONE_ONLY = (lorahot.UsageError, r"Load it at scale 1")
MERGED_ONLY = (lorahot.AdapterMismatchError, r"merged=True")
#: a norm's deltas on an unmerged runtime, where inject takes no norm as a target
#: a GLoRA whose rank is its layer's input and output size, which ComfyUI reads in another layout
AMBIGUOUS_GLORA = (lorahot.AdapterMismatchError, r"the references disagree on its weight")
#: LyCORIS' ``b_norm`` of a norm without a bias (LyCORIS' own forward fails on it: ``None.to``)
NO_BIAS = (lorahot.AdapterMismatchError, r"diff_b\) for layers without a bias[\s\S]*- norm")
NO_NORM_TARGET = (lorahot.AdapterMismatchError, r"do not map onto the injected layers[\s\S]*norm")
#: refusals met (printed with ``-s``) and calls compared
REFUSALS: Counter[str] = Counter()
COMPARED: Counter[str] = Counter()


@dataclass(frozen=True)
class Geometry:
    fan_in: int
    hidden: int
    lin_bias: bool
    channels: tuple[int, int]
    kernel: int | tuple[int, int]
    stride: int
    padding: int
    dilation: int
    conv_bias: bool
    norm: str  # "layer", "layer-nobias" or "group"


class Net(nn.Module):
    """A Linear and a LayerNorm over features, a Conv2d over an image; both flattened."""

    def __init__(self, g: Geometry) -> None:
        super().__init__()
        self.lin = nn.Linear(g.fan_in, g.hidden, bias=g.lin_bias)
        norms = {
            "layer": lambda: nn.LayerNorm(g.hidden),
            "layer-nobias": lambda: nn.LayerNorm(g.hidden, bias=False),
            "group": lambda: nn.GroupNorm(1, g.hidden),
        }
        self.norm = norms[g.norm]()
        self.conv = nn.Conv2d(*g.channels, g.kernel, g.stride, g.padding, g.dilation, bias=g.conv_bias)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.norm(self.lin(x)).flatten(1), self.conv(image).flatten(1)], 1)


@dataclass(frozen=True)
class Network:
    algo: str
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 1

    @property
    def wd(self) -> bool:
        return bool(self.options.get("weight_decompose"))


@st.composite
def geometries(draw: st.DrawFn) -> Geometry:
    sizes = st.sampled_from([1, 2, 3, 4, 5, 6, 8, 12])
    return Geometry(
        draw(sizes),
        draw(sizes),
        draw(st.booleans()),
        (draw(sizes), draw(sizes)),
        draw(st.sampled_from([1, 3, 3, (1, 3), (3, 1)])),
        draw(st.sampled_from([1, 2])),
        draw(st.sampled_from([0, 1])),
        draw(st.sampled_from([1, 1, 2])),
        draw(st.booleans()),
        draw(st.sampled_from(["layer", "layer-nobias", "group"])),
    )


@st.composite
def networks(draw: st.DrawFn, seed: int) -> Network:
    algo = draw(st.sampled_from(ALGOS))
    options: dict[str, Any] = {
        "lora_dim": draw(st.integers(1, 6)),
        "alpha": draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),  # 0: LyCORIS takes the rank
        "conv_lora_dim": draw(st.integers(1, 6)),
        "conv_alpha": draw(st.sampled_from([0.0, 1.0, 4.0])),
        "train_norm": draw(st.booleans()),
    }
    if algo in ("lora", "loha", "lokr"):
        options |= {
            "use_tucker": draw(st.booleans()),
            "use_scalar": draw(st.booleans()),
            "rs_lora": draw(st.booleans()),
        }
        if draw(st.booleans()):
            options |= {"weight_decompose": True, "wd_on_out": draw(st.booleans())}
    if algo == "lokr":
        options |= {
            "factor": draw(st.sampled_from([-1, 2, 3, 4])),
            "decompose_both": draw(st.booleans()),
            "full_matrix": draw(st.booleans()),
        }
    if algo in ("diag-oft", "boft"):
        options |= {"constraint": draw(st.sampled_from([0.0, 0.1])), "rescaled": draw(st.booleans())}
    if algo == "ia3":
        options["train_on_input"] = draw(st.booleans())
    if algo == "glora":
        options["use_scalar"] = draw(st.booleans())
    return Network(algo, options, seed)


@contextmanager
def _float64() -> Iterator[None]:
    """LyCORIS builds its parameters in the default dtype: float64 here, nothing rounded."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@contextmanager
def _float_keeps_float64() -> Iterator[None]:
    """``Tensor.float()`` of a float64 tensor stays float64 (LyCORIS' OFT inverts in float32)."""
    original = torch.Tensor.float

    def keep(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = keep  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.float = original  # type: ignore[method-assign]


def _lycoris(spec: Network, model: nn.Module) -> LycorisNetwork:
    """LyCORIS' network over ``model``, every parameter random; ``None`` where LyCORIS builds none."""
    with lycoris_targets(["Linear", "Conv2d", "LayerNorm", "GroupNorm"]):
        network = LycorisNetwork(model, 1.0, network_module=spec.algo, **spec.options)
    network.apply_to()
    network.double()
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            centre = 1.0 if name.endswith("dora_scale") else 0.0  # a magnitude near the norms
            p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    for module in network.loras:
        if spec.algo == "lokr" and getattr(module, "use_w1", False) and getattr(module, "use_w2", False):
            module.scale = 1.0  # both halves whole: the file holds no rank, scale 1
    return network.eval()


def _inputs(g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, g.fan_in, generator=gen, dtype=torch.float64)
    return x, torch.randn(3, g.channels[0], 6, 5, generator=gen, dtype=torch.float64)


class Oracle:
    """LyCORIS' forward of one network at a multiplier."""

    def __init__(self, spec: Network, base: nn.Module, folder: Path, name: str) -> None:
        self.spec = spec
        self.model = copy.deepcopy(base)
        self.network = _lycoris(spec, self.model)
        self.path = folder / f"{name}.safetensors"
        self.network.save_weights(str(self.path), torch.float64, None)
        self.names = sorted(m.lora_name.removeprefix("lycoris_") for m in self.network.loras)
        self.rotation = spec.algo in ("diag-oft", "boft")

    def __call__(self, multiplier: float, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        self.network.set_multiplier(multiplier)
        with torch.no_grad(), _float_keeps_float64():
            return self.model(*inputs)

    def refusal(self, merged: bool, scale: float) -> list[tuple[type[Exception], str]]:
        """The refusals the README promises for this network at ``scale`` (any one may come)."""
        why = []
        if self.spec.algo == "glora" and any(
            m.lora_dim == m.a2.weight.shape[1] == m.b1.weight.shape[0] for m in self.network.loras if hasattr(m, "a2")
        ):
            why.append(AMBIGUOUS_GLORA)
        if not merged and "norm" in self.names:
            why.append(NO_NORM_TARGET)
        if merged and "norm" in self.names and self.model.norm.bias is None:
            why.append(NO_BIAS)
        if not merged and (self.spec.algo != "lora" or self._unmerged_blocked()):
            why.append(MERGED_ONLY)
        if scale != 1 and (self.rotation or self.spec.wd):
            why.append(SCALE_ONE_ONLY)
        return why

    def _unmerged_blocked(self) -> bool:
        """A LoCon module lorahot loads only merged: a Tucker core, a per-input decomposition."""
        for module in self.network.loras:
            if getattr(module, "tucker", False):
                return True
            if getattr(module, "wd", False) and not module.wd_on_out and module.org_weight.shape[:2] != (1, 1):
                return True
        return False


class Summed(nn.Module):
    """A layer computing its base output plus each network's delta on it, as LyCORIS chains the
    wrappers of one layer (``full`` takes the weight off its layer and chains with none)."""

    def __init__(self, base: nn.Module, *wrapped: nn.Module) -> None:
        super().__init__()
        self.base, self.wrapped = base, nn.ModuleList(wrapped)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + sum(w(x) - y for w in self.wrapped)


class StackOracle:
    """LyCORIS' forward of both networks on one model, each at its own multiplier: every layer
    adds each network's delta to its base output."""

    def __init__(self, parts: tuple[Oracle, Oracle], base: nn.Module) -> None:
        self.parts = parts
        self.model = copy.deepcopy(base)
        for name in ("lin", "norm", "conv"):
            wrapped = [getattr(o.model, name) for o in parts]
            setattr(self.model, name, Summed(getattr(self.model, name), *wrapped))

    def __call__(self, weights: tuple[float, float], inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        for o, w in zip(self.parts, weights, strict=True):
            o.network.set_multiplier(w)
        with torch.no_grad(), _float_keeps_float64():
            return self.model(*inputs)

    def refusal(self, merged: bool, weights: tuple[float, float]) -> list[tuple[type[Exception], str]]:
        """Each part's own refusals, and a kind that takes no share of a layer on a shared one."""
        why = [r for o, w in zip(self.parts, weights, strict=True) for r in o.refusal(merged, w)]
        shared = set(self.parts[0].names) & set(self.parts[1].names)
        alone = [o for o in self.parts if o.spec.algo in ("diag-oft", "boft", "ia3", "glora") or o.spec.wd]
        if shared and alone:
            why.append((lorahot.AdapterMismatchError, r"does not fit together in one slot"))
        return why


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff = float((got - want).abs().max())
    tol = RTOL * max(1.0, float(want.abs().max()))
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} (tolerance {tol:.3g})"


def _call(action: Any, refusal: list[tuple[type[Exception], str]], what: str, before: torch.Tensor, out: Any) -> bool:
    """Runs ``action``; True where it went through, False where it was refused as expected
    (the output bitwise ``before``)."""
    try:
        action()
    except lorahot.LoraError as e:
        first = " | ".join(str(e).splitlines()[:2]).split(".safetensors: ")[-1]
        REFUSALS[f"{what}: {type(e).__name__}: {first[:120]}"] += 1
        expected = any(isinstance(e, t) and re.search(p, str(e)) for t, p in refusal)
        assert expected, f"{what}: unexpected refusal {type(e).__name__}: {e}"
        assert torch.equal(out(), before), f"{what}: the refusal changed the output"
        return False
    assert not refusal, f"{what}: went through where the README says it is refused"
    return True


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    g=geometries(),
    first=networks(seed=1),
    second=networks(seed=7),
    scale=st.sampled_from([0.5, -1.0, 1.75]),
    weights=st.tuples(*[st.sampled_from([1.0, 0.5, -1.0, 1.75])] * 2),
)
def test_drawn_lycoris_networks_load_swap_and_rescale_as_lycoris_computes(
    g: Geometry, first: Network, second: Network, scale: float, weights: tuple[float, float]
) -> None:
    logging.disable(logging.WARNING)  # LyCORIS logs each network it builds
    try:
        with _float64(), tempfile.TemporaryDirectory() as folder:
            _check(g, first, second, scale, weights, Path(folder))
    finally:
        logging.disable(logging.NOTSET)


def _check(
    g: Geometry, first: Network, second: Network, scale: float, weights: tuple[float, float], folder: Path
) -> None:
    torch.manual_seed(0)
    base = Net(g).double().eval()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.5)
    inputs = _inputs(g)
    try:
        a, b = Oracle(first, base, folder, "a"), Oracle(second, base, folder, "b")
        ab = StackOracle((a, b), base)
    except (ValueError, AssertionError, RuntimeError):  # LyCORIS builds no such module (BOFT sizes)
        assume(False)
    assume(a.names and b.names)
    with torch.no_grad():
        base_out = base(*inputs)
    for merged in (True, False):
        _run(base, inputs, base_out, a, b, ab, scale, weights, merged)


def _run(
    base: nn.Module,
    inputs: tuple[torch.Tensor, torch.Tensor],
    base_out: torch.Tensor,
    a: Oracle,
    b: Oracle,
    ab: StackOracle,
    scale: float,
    weights: tuple[float, float],
    merged: bool,
) -> None:
    model = copy.deepcopy(base)
    targets = ["lin", "conv", "norm"] if merged else ["lin", "conv"]
    runtime = lorahot.inject(model, targets, max_rank=32, merged=merged, extras=not merged, slots=2)
    mode = "merged" if merged else "unmerged"

    def out() -> torch.Tensor:
        with torch.no_grad():
            return model(*inputs)

    scales: dict[int, Any] = {0: 1.0, 1: 1.0}
    held: dict[int, Oracle | StackOracle | None] = {0: None, 1: None}
    active = 0

    def expect(slot: int) -> torch.Tensor:
        o = held[slot]
        return base_out if o is None else o(scales[slot], inputs)

    def check(what: str) -> None:
        got = out()
        stacked = "[a, b]" in what or isinstance(held[active], StackOracle)
        COMPARED[f"{mode} {what.split(' ')[0]}{' stack' if stacked else ''}"] += 1
        if held[active] is None:
            assert torch.equal(got, base_out), f"{mode} {what}: not bitwise the base"
        else:
            _close(got, expect(active), f"{mode} {what} ({a.spec}, {b.spec})")

    def load(o: Oracle, slot: int) -> None:
        before = out()
        if _call(lambda: runtime.load(o.path, slot=slot), o.refusal(merged, 1.0), f"{mode} load", before, out):
            held[slot], scales[slot] = o, 1.0
        check(f"load {o.path.stem} into slot {slot}")

    def load_stack(slot: int) -> None:
        before = out()
        paths = [a.path, b.path]
        if _call(lambda: runtime.load(paths, slot=slot), ab.refusal(merged, (1.0, 1.0)), f"{mode} stack", before, out):
            held[slot], scales[slot] = ab, (1.0, 1.0)
        check(f"load [a, b] into slot {slot}")

    def set_scale(value: Any, slot: int) -> None:
        o = held[slot]
        if o is None:
            return
        before = out()
        refusal = o.refusal(merged, value)  # type: ignore[arg-type]
        call = list(value) if isinstance(value, tuple) else value
        if _call(lambda: runtime.set_scale(call, slot=slot), refusal, f"{mode} set_scale", before, out):
            scales[slot] = value
        check(f"set_scale({value}) of slot {slot}")

    def activate(slot: int) -> None:
        nonlocal active
        runtime.activate(slot)
        active = slot
        check(f"activate({slot})")

    load(a, 0)
    set_scale(scale, 0)
    load(b, 1)
    set_scale(scale, 1)  # the inactive slot
    activate(1)
    activate(0)
    load(b, 0)
    load(a, 0)
    set_scale(scale, 0)
    load_stack(1)
    activate(1)
    if held[1] is ab:
        set_scale(weights, 1)
    runtime.unload()
    held[0] = held[1] = None
    check("unload")
    if merged:
        for (name, p), q in zip(model.state_dict().items(), base.state_dict().values(), strict=True):
            assert torch.equal(p, q), f"merged unload: {name} not bitwise the base"


def teardown_module() -> None:
    print(f"\ncompared: {dict(COMPARED)}")
    for line, n in REFUSALS.most_common():
        print(f"{n:5d}  {line}")
