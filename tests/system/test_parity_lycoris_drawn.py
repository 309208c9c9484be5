"""Drawn LyCORIS networks against lycoris-lora as the oracle.

Hypothesis draws an algorithm (LoRA/LoCon, LoHa, LoKr, full, DyLoRA, diagonal OFT, BOFT, (IA)^3,
GLoRA, and T-LoRA, which lorahot refuses), its options (ranks and alphas, ``factor``,
``decompose_both``, ``use_tucker``, ``use_scalar``, weight decomposition on the output or the
input channels, dropouts, ``bypass_mode``, ``full_matrix``, ``unbalanced_factorization``,
``rs_lora``; OFT's and BOFT's ``constraint`` and ``rescaled``; (IA)^3's ``train_on_input``), one layer (a Linear with or
without bias, a Conv1d, Conv2d or Conv3d with a kernel of 1 or 3, a stride, padding and dilation) and its
sizes. The network is built with LyCORIS' own
``LycorisNetwork`` over the layer, every parameter is randomized (not LyCORIS' zero init),
and ``save_weights`` writes the file, under LyCORIS' own ``lycoris_`` names, kohya's
``lora_unet_`` or ComfyUI's ``diffusion_model.``. lorahot loads it merged and unmerged: each
load computes LyCORIS' eval forward (float64, within 1e-9 of its largest output) or is
refused, typed, naming the kind and the fix ((IA)^3 loads in LyCORIS' and kohya's names, not in
ComfyUI's, where ``<module>.weight`` names a model weight).

The oracle is LyCORIS' forward at the drawn network multiplier (0, 0.5, 1, 1.7, 2 or -1: lorahot's
``scale=``, or ``set_scale`` after a load at 1; a module with weight decomposition, an OFT or a
BOFT is refused at any scale but 1, every parameter and buffer bitwise unchanged), and for LoRA/LoCon and full diffs
also its weight delta (``get_diff_weight``) against the merged weight. Where LyCORIS' forward
computes what its own file does not say (the file is what lorahot, ComfyUI and LyCORIS' own
loader read), the oracle follows the file: a DyLoRA's forward draws a random rank at each call
(its file is a LoRA at its full rank, ``alpha / r``; a conv's ``lora_up`` saved flat), a LoKr
with both halves whole under ``rs_lora`` trains at ``sqrt(r)`` (its file holds no rank:
LyCORIS' loader and ComfyUI apply it at 1), and ``bypass_mode`` drops the conv's dilation and
the weight decomposition whose ``dora_scale`` the file carries (the rebuild forward, which
merging computes, keeps both). LyCORIS' ``merge_to`` of a LoHa or LoKr applies ``alpha / r``
twice (its forward once), so it is no oracle there. LyCORIS computes an OFT's or BOFT's
rotation in float32 whatever its dtype (``.float().inverse()``, which its float64 forward cannot
multiply with), so their oracle is its forward on a float32 copy, within 1e-5 of the largest
output; a multiplier other than 1 is refused for them (LyCORIS and ComfyUI scale them
differently).
"""

from __future__ import annotations

import copy
import logging
import tempfile
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

#: the kinds lorahot loads (LoRA/LoCon and DyLoRA as plain LoRA, the others in merged mode)
LOADED = ("lora", "loha", "lokr", "full", "dylora", "diag-oft", "boft", "ia3", "glora")
#: the kinds that rotate the base weight: merged mode at scale 1 only, LyCORIS' forward in float32
ROTATIONS = ("diag-oft", "boft")
#: the kinds lorahot refuses, and the words its refusal names them by
REFUSED = {
    "tlora": r"T-LoRA[\s\S]*use a LoRA",
}
#: (IA)^3 in ComfyUI's naming, where ``<module>.weight`` is a model weight's name (ComfyUI loads none)
REFUSED_IA3 = r"\(IA\)\^3 weights[\s\S]*lorahot loads them in kohya naming"
SIZES = (1, 2, 3, 5, 7, 8, 12, 13, 16, 24, 32)


@dataclass(frozen=True)
class Layer:
    kind: str  # "linear", "conv1d", "conv2d" or "conv3d"
    fan_in: int
    fan_out: int
    kernel: tuple[int, ...] = ()
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    bias: bool = True

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        if self.kind == "linear":
            return nn.Linear(self.fan_in, self.fan_out, bias=self.bias)
        conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[self.kind]
        k = self.kernel[0] if self.kind == "conv1d" else self.kernel
        return conv(self.fan_in, self.fan_out, k, self.stride, self.padding, self.dilation, bias=self.bias)

    def input(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(2)
        spatial = {"linear": (), "conv1d": (9,), "conv2d": (7, 8), "conv3d": (5, 5, 6)}[self.kind]
        return torch.randn(3, self.fan_in, *spatial, generator=g, dtype=torch.float64)


@dataclass(frozen=True)
class Case:
    algo: str
    layer: Layer
    dim: int
    alpha: float
    options: dict[str, Any] = field(default_factory=dict)
    naming: str = "lycoris"
    multiplier: float = 1.0  # LyCORIS' network multiplier, lorahot's load(scale=) or set_scale
    set_scale: bool = False  # the multiplier given by set_scale after a load at scale 1, not load(scale=)


@st.composite
def layers(draw: st.DrawFn) -> Layer:
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "conv3d"]))
    fan_in, fan_out = draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))
    bias = draw(st.booleans())
    if kind == "linear":
        return Layer(kind, fan_in, fan_out, bias=bias)
    k = draw(st.sampled_from([1, 3]))
    if kind == "conv3d":
        kernel = draw(st.sampled_from([(k, k, k), (1, k, k), (k, 1, 1)]))
    else:
        kernel = (k,) if kind == "conv1d" else draw(st.sampled_from([(k, k), (k, 1), (1, k)]))
    stride, dilation = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    padding = draw(st.sampled_from([0, 1]))
    return Layer(kind, fan_in, fan_out, kernel, stride, padding, dilation, bias)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    algo = draw(st.sampled_from([*LOADED, *LOADED, *REFUSED]))
    layer = draw(layers())
    dim = draw(st.integers(1, 8))
    alpha = draw(st.sampled_from([0.0, 0.5, 1.0, 3.0, 7.5]))  # 0: LyCORIS takes the rank
    options: dict[str, Any] = {}
    if draw(st.booleans()):
        options |= {"rank_dropout": 0.5, "module_dropout": 0.5, "dropout": 0.5}  # train-time only
    if algo in ("lora", "loha", "lokr"):
        options |= {
            "use_tucker": draw(st.booleans()),
            "use_scalar": draw(st.booleans()),
            "rs_lora": draw(st.booleans()),
            "bypass_mode": draw(st.booleans()),
        }
        if draw(st.booleans()):
            options |= {"weight_decompose": True, "wd_on_out": draw(st.booleans())}
    if algo == "lokr":
        options |= {
            "factor": draw(st.sampled_from([-1, 2, 3, 4, 8])),
            "decompose_both": draw(st.booleans()),
            "full_matrix": draw(st.booleans()),
            "unbalanced_factorization": draw(st.booleans()),
        }
    if algo == "dylora":
        options["block_size"] = draw(st.sampled_from([b for b in (1, 2, 4) if dim % b == 0]))
    if algo in ("diag-oft", "boft"):
        options |= {"constraint": draw(st.sampled_from([0.0, 0.1])), "rescaled": draw(st.booleans())}
    if algo == "ia3":
        options["train_on_input"] = draw(st.booleans())
    if algo == "glora":
        options |= {"use_scalar": draw(st.booleans()), "bypass_mode": draw(st.booleans())}
    naming = draw(st.sampled_from(["lycoris", "kohya", "comfyui"]))
    multiplier = draw(st.sampled_from([1.0, 1.0, 0.5, -1.0, 2.0, 0.0, 1.7]))
    return Case(algo, layer, dim, alpha, options, naming, multiplier, draw(st.booleans()))


@contextmanager
def _float64() -> Iterator[None]:
    """LyCORIS builds its parameters and alpha buffers in the default dtype: float64 here, so
    nothing is rounded to float32 on the way to the file."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _network(case: Case, model: nn.Module) -> LycorisNetwork:
    """LyCORIS' network over ``model``'s one layer, every parameter randomized."""
    with lycoris_targets(["Linear", "Conv1d", "Conv2d", "Conv3d"]):
        network = LycorisNetwork(
            model,
            1.0,
            lora_dim=case.dim,
            conv_lora_dim=case.dim,
            alpha=case.alpha,
            conv_alpha=case.alpha,
            network_module=case.algo,
            **case.options,
        )
    assert len(network.loras) == 1
    network.apply_to()
    network.double()  # dora_scale is made in float32, and LyCORIS computes the decomposition in its dtype
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in network.named_parameters():
            centre = 1.0 if name.endswith("dora_scale") else 0.0  # a magnitude, near the norms' scale
            p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    network.set_multiplier(case.multiplier)
    return network.eval()


def _oracle(case: Case, network: LycorisNetwork, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LyCORIS' eval forward, under what its file says (see the module docstring)."""
    (module,) = network.loras
    if case.algo == "dylora":  # the file: a LoRA at its full rank, alpha / r
        up, down = (module.state_dict()[k] for k in ("lora_up.weight", "lora_down.weight"))
        layer = copy.deepcopy(model[0])
        with torch.no_grad():
            delta = float(module.alpha) / case.dim * (up.flatten(1) @ down.flatten(1))
            layer.weight += case.multiplier * delta.reshape(layer.weight.shape)
        return _plain(layer, x)
    if case.algo == "lokr" and module.use_w1 and module.use_w2:
        module.scale = 1.0  # both halves whole: no rank, scale 1 (rs_lora trains at sqrt(r))
    if module.bypass_mode and (case.layer.dilation > 1 or getattr(module, "wd", False)):
        module.bypass_mode = False  # the bypass forward drops the dilation and the decomposition
    with torch.no_grad():
        return model(x)


def _plain(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s own torch forward (not LyCORIS' replacement)."""
    with torch.no_grad():
        return type(layer).forward(layer, x)


def _saved(network: LycorisNetwork, naming: str, folder: Path) -> Path:
    """``save_weights`` in float64, under the drawn naming."""
    path = folder / "lycoris.safetensors"
    network.save_weights(str(path), torch.float64, None)
    if naming == "lycoris":
        return path
    from safetensors.torch import load_file, save_file

    prefix = {"kohya": "lora_unet_0", "comfyui": "diffusion_model.0"}[naming]
    tensors = {prefix + k.removeprefix("lycoris_0"): v for k, v in load_file(path).items()}
    save_file(tensors, path)
    return path


def _loads_unmerged(case: Case) -> bool:
    """Whether lorahot loads the kind unmerged: a LoRA/LoCon (DyLoRA's file is one), without a
    Tucker core, and with its weight decomposition, if any, per output channel (DoRA)."""
    if case.algo == "dylora":
        return True
    if case.algo != "lora":
        return False
    tucker = case.options.get("use_tucker") and case.layer.kernel and any(k != 1 for k in case.layer.kernel)
    per_input = case.options.get("weight_decompose") and not case.options.get("wd_on_out", True)
    per_input = per_input and (case.layer.fan_in, case.layer.fan_out) != (1, 1)  # one weight norm either way
    return not tucker and not per_input


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_a_drawn_lycoris_network_loads_as_lycoris_computes_or_is_refused(case: Case) -> None:
    logging.disable(logging.WARNING)  # LyCORIS logs each network it builds
    try:
        _check(case)
    finally:
        logging.disable(logging.NOTSET)


def _check(case: Case) -> None:
    x = case.layer.input()
    with _float64(), tempfile.TemporaryDirectory() as folder:
        base = nn.Sequential(case.layer.build()).double()
        oracle_model = copy.deepcopy(base)
        try:
            network = _network(case, oracle_model)
        except (ValueError, AssertionError):  # LyCORIS builds no such module at these sizes (BOFT)
            assume(False)
        path = _saved(network, case.naming, Path(folder))
        with torch.no_grad():
            base_out = base(x)
        if case.algo in REFUSED:
            _check_refused(REFUSED[case.algo], base, path, x, base_out)
            return
        if case.algo == "ia3" and case.naming == "comfyui":
            _check_refused(REFUSED_IA3, base, path, x, base_out)
            return
        if case.algo == "glora" and case.dim == case.layer.fan_in == case.layer.fan_out:
            _check_ambiguous_glora(base, path, x, base_out)
            return
        if case.algo in ROTATIONS:
            _check_rotation(case, network, oracle_model, base, path, x, base_out)
            return
        want = _oracle(case, network, oracle_model, x)
        tol = 1e-9 * max(1.0, float(want.abs().max()))
        for merged in (True, False):
            model = copy.deepcopy(base)
            runtime = lorahot.inject(model, ["0"], max_rank=32, merged=merged, extras=not merged)
            if (merged or _loads_unmerged(case)) and case.multiplier != 1 and case.options.get("weight_decompose"):
                _check_scale_refused(
                    case, runtime, model, path, r"LyCORIS weight decomposition[\s\S]*Load it at scale 1"
                )
            elif merged or _loads_unmerged(case):
                _load_at(case, runtime, path)
                with torch.no_grad():
                    got = model(x)
                diff = float((got - want).abs().max())
                assert diff <= tol, f"{case}: {'merged' if merged else 'unmerged'} max abs diff {diff:.3g}"
                if merged:
                    _check_merged_weight(case, network, base, model)
            else:
                with pytest.raises(lorahot.AdapterMismatchError, match=r"loads only in merged mode[\s\S]*merged=True"):
                    runtime.load(path)
                with torch.no_grad():
                    assert torch.equal(model(x), base_out)


def _check_merged_weight(case: Case, network: LycorisNetwork, base: nn.Module, model: nn.Module) -> None:
    """The merged weight (and bias) against LyCORIS' own weight delta, where it is what its
    forward computes: LoRA/LoCon without weight decomposition, full diffs."""
    (module,) = network.loras
    if case.algo not in ("lora", "full") or case.options.get("weight_decompose"):
        return
    with torch.no_grad():
        delta, delta_b = module.get_diff_weight(multiplier=case.multiplier)
        w0 = base[0].weight
        torch.testing.assert_close(model[0].weight, w0 + delta.reshape(w0.shape), rtol=0, atol=1e-12)
        if delta_b is not None:
            torch.testing.assert_close(model[0].bias, base[0].bias + delta_b, rtol=0, atol=1e-12)


def _check_rotation(
    case: Case,
    network: LycorisNetwork,
    oracle_model: nn.Module,
    base: nn.Module,
    path: Path,
    x: torch.Tensor,
    base_out: torch.Tensor,
) -> None:
    """An OFT or BOFT: merged at scale 1 as LyCORIS' float32 forward computes, refused at
    another scale and unmerged, nothing changed."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # LyCORIS' rotation is a float32 computation
    try:
        network.float()
        with torch.no_grad():
            want = oracle_model.float()(x.float()).double()
    finally:
        torch.set_default_dtype(before)
    tol = 1e-5 * max(1.0, float(want.abs().max()))
    for merged in (True, False):
        model = copy.deepcopy(base)
        runtime = lorahot.inject(model, ["0"], max_rank=32, merged=merged, extras=not merged)
        if not merged:
            with pytest.raises(lorahot.AdapterMismatchError, match=r"loads only in merged mode[\s\S]*merged=True"):
                runtime.load(path)
        elif case.multiplier != 1:
            _check_scale_refused(case, runtime, model, path, r"LyCORIS (oft|boft) module[\s\S]*Load it at scale 1")
            continue
        else:
            runtime.load(path)
            with torch.no_grad():
                diff = float((model(x) - want).abs().max())
            assert diff <= tol, f"{case}: merged max abs diff {diff:.3g}"
            continue
        with torch.no_grad():
            assert torch.equal(model(x), base_out)


def _load_at(case: Case, runtime: lorahot.LoraRuntime, path: Path) -> None:
    """Loads the file at the drawn multiplier: ``load(scale=)``, or a load at 1 and ``set_scale``."""
    if case.set_scale:
        runtime.load(path)
        runtime.set_scale(case.multiplier)
    else:
        runtime.load(path, scale=case.multiplier)


def _check_scale_refused(case: Case, runtime: lorahot.LoraRuntime, model: nn.Module, path: Path, why: str) -> None:
    """A module that loads at scale 1 only: the drawn multiplier is refused (``load(scale=)``, or
    ``set_scale`` after a load at 1), every parameter and buffer bitwise as before the call."""
    if case.set_scale:
        runtime.load(path)
    before = {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with pytest.raises(lorahot.UsageError, match=why):
        if case.set_scale:
            runtime.set_scale(case.multiplier)
        else:
            runtime.load(path, scale=case.multiplier)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def _check_ambiguous_glora(base: nn.Module, path: Path, x: torch.Tensor, base_out: torch.Tensor) -> None:
    """A GLoRA whose rank equals the layer's input and output size: ComfyUI reads it as the older
    layout, LyCORIS as its own, so lorahot refuses it, merged or not."""
    for merged in (True, False):
        model = copy.deepcopy(base)
        runtime = lorahot.inject(model, ["0"], max_rank=32, merged=merged, extras=not merged)
        with pytest.raises(lorahot.AdapterMismatchError, match=r"the references disagree on its weight"):
            runtime.load(path)
        with torch.no_grad():
            assert torch.equal(model(x), base_out)


def _check_refused(why: str, base: nn.Module, path: Path, x: torch.Tensor, base_out: torch.Tensor) -> None:
    for merged in (True, False):
        model = copy.deepcopy(base)
        runtime = lorahot.inject(model, ["0"], max_rank=32, merged=merged, extras=not merged)
        with pytest.raises(lorahot.UnknownFormatError, match=why):
            runtime.load(path)
        with torch.no_grad():
            assert torch.equal(model(x), base_out)
