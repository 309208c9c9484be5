"""A differential run of the key-mapping loader against diffusers' own converters and loaders.

Hypothesis draws an adapter file for a tiny float64 model and writes it in one of the namings
found in the wild; the same file is loaded by lorahot (``inject`` + ``load``, unmerged and merged)
and by diffusers (``pipe.load_lora_weights``, or ``lora_state_dict`` + ``load_lora_adapter`` for a
transformer), and both are compared with a float64 reference built by hand from the file: each
module's ``W + s * alpha / r * B @ A`` written into a copy of the base model, a weight-decomposed
module's (``dora_scale``) ``m * V / ||V||`` per output row, ``V`` that weight, and a fused
module's update cut by rows onto diffusers' layers.

The models and what is drawn:

- a tiny SDXL pipeline (UNet and both CLIP text encoders): kohya names (``lora_unet_``,
  ``lora_te1_``, ``lora_te2_``) with or without ``.alpha``, with or without ``dora_scale``; the
  diffusers names (``unet.`` / ``text_encoder.`` / ``text_encoder_2.``) in ``lora_A``/``lora_B``
  or ``lora_down``/``lora_up`` spelling, with or without ``.alpha`` network alphas; text-encoder
  modules present or not;
- a tiny Flux.1 transformer: BFL names (``diffusion_model.double_blocks.0.img_attn.qkv``, fused
  q/k/v split onto diffusers' layers) in either spelling (a BFL file of modules outside the
  blocks only reads as ComfyUI's naming, placed alike), kohya's Flux names
  (``lora_unet_double_blocks_0_img_attn_qkv``; of the outer modules alone too, still
  ``flux-kohya``), and diffusers' names under ``transformer.``;
- a tiny SD3 transformer: its original names (``joint_blocks.0.x_block.attn.qkv``, fused q/k/v
  split, the final and last context adaLN halves swapped) under ``diffusion_model.``,
  ``transformer.`` or no prefix, or in sd-scripts' spelling; half of the files hold only the
  modules outside the blocks (read as ComfyUI's, diffusers' or PEFT's naming, ``sd3-kohya``, or
  ``flux-kohya`` for the final layer alone), against the reference only (diffusers' SD3 LoRA
  loader converts no original names);
- in every file: a random subset of the modules, random ranks and alphas, and each tensor in
  float16, bfloat16 or float32.

diffusers is the oracle where it reads the file as its trainer meant it (as documented in the
README, lorahot follows sd-scripts where they disagree): kohya alphas that differ between
attention modules, where diffusers' converter keys the alpha by the old processor name, and
files it does not convert (BFL ``lora_A``/``lora_B``, kohya Flux ``linear1`` at a width other
than the full model's) are checked against the reference alone. Every comparison is in float64:
the file's half-precision values are exact in it, so the bound is float64 rounding (1e-10
relative). After the load both runtimes are re-weighted (``set_scale`` against diffusers'
``set_adapters(weights=...)``) and compared again; a weight-decomposed module takes scale 1
only, which lorahot refuses with a typed error and no change.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorahot
from tests.helpers import tiny_clip, tiny_unet
from tests.system.test_parity_flux import flux_inputs, tiny_flux
from tests.system.test_parity_sd3 import original_parts, sd3_inputs, tiny_sd3_from

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-10
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Examples per test, as many as the conftest profile draws (which derandomizes);
#: ``LORAHOT_DIFFERENTIAL_EXAMPLES`` (with ``HYPOTHESIS_PROFILE=dev`` for fresh draws) searches
#: further.
EXAMPLES = int(os.environ.get("LORAHOT_DIFFERENTIAL_EXAMPLES", "25"))

#: What the drawn space met (printed with ``-s``): comparisons made, and with which oracle.
SEEN: Counter[str] = Counter()


@dataclasses.dataclass(frozen=True)
class Part:
    """One drawn module of a file: where it lands, its factors as the file holds them (A
    ``[r, in, *k]``, B ``[out, r, *1]``), its ``.alpha`` (None: the file has none) and its
    ``dora_scale`` (None: plain LoRA)."""

    component: str
    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    dora: torch.Tensor | None = None


# -- the SDXL pipeline ---------------------------------------------------------------------

SDXL = ("unet", "text_encoder", "text_encoder_2")


def _sdxl() -> diffusers.StableDiffusionXLPipeline:
    unet = tiny_unet(cross_attention_dim=32).double()
    te, te2 = tiny_clip().double(), tiny_clip(with_projection=True).double()
    return diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=None, tokenizer_2=None, unet=unet, scheduler=None
    )


@pytest.fixture(scope="module")
def sdxl() -> diffusers.StableDiffusionXLPipeline:
    return _sdxl()


def _sdxl_layers(pipe) -> dict[tuple[str, str], nn.Module]:
    """Every Linear and Conv2d of the UNet and every Linear of the text encoders' layers."""
    out = {}
    for c in SDXL:
        for name, mod in getattr(pipe, c).named_modules():
            if isinstance(mod, nn.Linear | nn.Conv2d) and (c == "unet" or ".layers." in name):
                out[(c, name)] = mod
    return out


def _sdxl_run(pipe) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[0, 5, 9, 3, 1]])
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    context = torch.randn(1, 5, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return {
            "unet": pipe.unet(sample, 7, encoder_hidden_states=context).sample,
            "text_encoder": pipe.text_encoder(ids)[0],
            "text_encoder_2": pipe.text_encoder_2(ids)[0],
        }


# -- drawing a file ------------------------------------------------------------------------


def _draw_parts(draw, layers: dict[tuple[str, str], nn.Module], *, alphas: str, dora: bool) -> list[Part]:
    """A random non-empty subset of ``layers``, each with a random rank, dtype and alpha:
    ``alphas`` is ``"none"``, ``"one"`` (one value for the whole file) or ``"each"``."""
    keys = sorted(layers)
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=min(8, len(keys)), unique=True))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    one = draw(st.sampled_from([0.5, 1.0, 3.0, 8.0]))
    parts = []
    for component, name in sorted(chosen):
        layer = layers[(component, name)]
        rank = draw(st.integers(1, 4))
        dtype = draw(st.sampled_from(DTYPES))
        if isinstance(layer, nn.Conv2d):
            k = tuple(layer.kernel_size)
            a_shape, b_shape = (rank, layer.in_channels, *k), (layer.out_channels, rank, 1, 1)
        else:
            a_shape, b_shape = (rank, layer.in_features), (layer.out_features, rank)
        fan_in = a_shape[1] * (a_shape[2] * a_shape[3] if len(a_shape) == 4 else 1)
        down = (torch.randn(a_shape, generator=g, dtype=torch.float64) / fan_in**0.5).to(dtype)
        up = (torch.randn(b_shape, generator=g, dtype=torch.float64) * 0.5).to(dtype)
        alpha = {"none": None, "one": one, "each": draw(st.sampled_from([0.5, 1.0, 2.0, 3.0, 8.0]))}[alphas]
        magnitude = None
        if dora and isinstance(layer, nn.Linear):
            norm = layer.weight.detach().norm(dim=1, keepdim=True)
            magnitude = (norm * (1 + 0.3 * torch.rand(norm.shape, generator=g, dtype=torch.float64))).to(dtype)
        parts.append(Part(component, name, down, up, alpha, magnitude))
    return parts


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_file(parts: list[Part]) -> dict[str, torch.Tensor]:
    sd = {}
    for p in parts:
        stem = KOHYA_PREFIX[p.component] + p.name.replace(".", "_")
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = p.down, p.up
        if p.alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(p.alpha)
        if p.dora is not None:
            sd[f"{stem}.dora_scale"] = p.dora
    return sd


def diffusers_file(parts: list[Part], spelling: tuple[str, str] = ("lora_A", "lora_B")) -> dict[str, torch.Tensor]:
    sd = {}
    for p in parts:
        stem = f"{p.component}.{p.name}"
        sd[f"{stem}.{spelling[0]}.weight"], sd[f"{stem}.{spelling[1]}.weight"] = p.down, p.up
        if p.alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(p.alpha)
    return sd


# -- the reference -------------------------------------------------------------------------


@torch.no_grad()
def reference_model(base, parts: list[Part], scale: float):
    """A copy of ``base`` (a pipeline or a model) with each part written into its layer's weight
    in float64: ``W + s * alpha / r * B @ A``, then ``m * V / ||V||`` per output row where the
    part has a ``dora_scale``."""
    model = copy.deepcopy(base)
    for p in parts:
        root = getattr(model, p.component) if p.component else model
        layer = root.get_submodule(p.name)
        w = layer.weight
        rank = p.down.shape[0]
        alpha = rank if p.alpha is None else p.alpha
        delta = (p.up.double().flatten(1) @ p.down.double().flatten(1)).reshape(w.shape)
        v = w.double() + scale * (alpha / rank) * delta
        if p.dora is not None:
            norm = v.flatten(1).norm(dim=1).reshape(-1, *(1,) * (v.dim() - 1))
            v = p.dora.double().reshape(norm.shape) * v / norm
        w.copy_(v)
    return model


def _rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(float((got[c] - want[c]).abs().max() / want[c].abs().max()) for c in want)


def _targets(parts_space: dict[tuple[str, str], nn.Module], components: tuple[str, ...]) -> dict[str, str]:
    """Per component, a regex of every drawable layer: the layers a file leaves out stay at base."""
    out = {}
    for c in components:
        names = sorted(n for comp, n in parts_space if comp == c)
        out[c] = "|".join(re.escape(n) for n in names)
    return out


def _sdxl_file(draw, pipe):
    naming = draw(st.sampled_from(["kohya", "diffusers", "diffusers-down"]))
    layers = _sdxl_layers(pipe)
    if not draw(st.booleans()):  # text-encoder modules present or not
        layers = {k: v for k, v in layers.items() if k[0] == "unet"}
    alphas = draw(st.sampled_from(["none", "one", "each"]))
    dora = naming == "kohya" and draw(st.booleans())
    parts = _draw_parts(draw, layers, alphas=alphas, dora=dora)
    if naming == "kohya":
        sd = kohya_file(parts)
    else:
        sd = diffusers_file(parts, ("lora_A", "lora_B") if naming == "diffusers" else ("lora_down", "lora_up"))
    return naming, alphas, parts, sd


def _diffusers_sdxl(pipe, sd, scales):
    oracle = copy.deepcopy(pipe)
    oracle.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name="drawn")
    outs = []
    for s in scales:
        oracle.set_adapters(["drawn"], adapter_weights=[s])
        outs.append(_sdxl_run(oracle))
    return outs


def _lorahot_outputs(model, targets, run, sd, scales, merged, extras):
    """lorahot's outputs (``run`` of a copy of ``model`` injected at ``targets``) with ``sd``
    loaded, at each of ``scales``, and what the load reported."""
    ours = copy.deepcopy(model)
    runtime = lorahot.inject(ours, targets, max_rank=8, merged=merged, extras=extras)
    info = runtime.load({k: v.clone() for k, v in sd.items()})
    outs = []
    for s in scales:
        runtime.set_scale(s)
        outs.append(run(ours))
    return info, outs


def _lorahot_sdxl(pipe, sd, scales, merged, extras):
    return _lorahot_outputs(pipe, _targets(_sdxl_layers(pipe), SDXL), _sdxl_run, sd, scales, merged, extras)


# -- the Flux.1 transformer ----------------------------------------------------------------


def _flux():
    return tiny_flux().double()


def _flux_run(model) -> dict[str, torch.Tensor]:
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in flux_inputs().items()}
    with torch.no_grad():
        return {"transformer": model(**inputs, return_dict=False)[0]}


#: each original Flux.1 module -> the diffusers layers its rows go to, in order (the last one
#: takes the remaining rows), and whether its two halves are swapped (diffusers' norm_out is
#: ``(scale, shift)`` where the original final layer is ``(shift, scale)``).
def flux_table(double: int = 1, single: int = 1) -> dict[str, tuple[tuple[str, ...], bool]]:
    t: dict[str, tuple[tuple[str, ...], bool]] = {}
    for i in range(double):
        b = f"transformer_blocks.{i}"
        t |= {
            f"double_blocks.{i}.img_attn.qkv": ((f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"), False),
            f"double_blocks.{i}.txt_attn.qkv": (
                (f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"),
                False,
            ),
            f"double_blocks.{i}.img_attn.proj": ((f"{b}.attn.to_out.0",), False),
            f"double_blocks.{i}.txt_attn.proj": ((f"{b}.attn.to_add_out",), False),
            f"double_blocks.{i}.img_mlp.0": ((f"{b}.ff.net.0.proj",), False),
            f"double_blocks.{i}.img_mlp.2": ((f"{b}.ff.net.2",), False),
            f"double_blocks.{i}.txt_mlp.0": ((f"{b}.ff_context.net.0.proj",), False),
            f"double_blocks.{i}.txt_mlp.2": ((f"{b}.ff_context.net.2",), False),
            f"double_blocks.{i}.img_mod.lin": ((f"{b}.norm1.linear",), False),
            f"double_blocks.{i}.txt_mod.lin": ((f"{b}.norm1_context.linear",), False),
        }
    for i in range(single):
        b = f"single_transformer_blocks.{i}"
        t |= {
            f"single_blocks.{i}.linear1": (
                (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"),
                False,
            ),
            f"single_blocks.{i}.linear2": ((f"{b}.proj_out",), False),
            f"single_blocks.{i}.modulation.lin": ((f"{b}.norm.linear",), False),
        }
    e = "time_text_embed"
    return t | {
        "img_in": (("x_embedder",), False),
        "txt_in": (("context_embedder",), False),
        "time_in.in_layer": ((f"{e}.timestep_embedder.linear_1",), False),
        "time_in.out_layer": ((f"{e}.timestep_embedder.linear_2",), False),
        "vector_in.in_layer": ((f"{e}.text_embedder.linear_1",), False),
        "vector_in.out_layer": ((f"{e}.text_embedder.linear_2",), False),
        "guidance_in.in_layer": ((f"{e}.guidance_embedder.linear_1",), False),
        "guidance_in.out_layer": ((f"{e}.guidance_embedder.linear_2",), False),
        "final_layer.linear": (("proj_out",), False),
        "final_layer.adaLN_modulation.1": (("norm_out.linear",), True),
    }


class _Fused(nn.Module):
    """Stands for an original fused module in the drawing: its layers' rows stacked."""

    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.in_features = layers[0].in_features
        self.out_features = sum(m.out_features for m in layers)
        self.weight = torch.cat([m.weight.detach() for m in layers])


def _flux_original_layers(model) -> dict[tuple[str, str], nn.Module]:
    return {
        ("", name): _Fused([model.get_submodule(t) for t in targets]) for name, (targets, _) in flux_table().items()
    }


def _flux_diffusers_layers(model) -> dict[tuple[str, str], nn.Module]:
    return {("", n): m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def flux_original_parts(parts: list[Part], model) -> list[Part]:
    """The parts of a file in original names as parts on diffusers' layers: each fused part's
    factors cut by B's rows (``B @ A`` of a row block is that block's update), halves swapped."""
    table = flux_table()
    out = []
    for p in parts:
        targets, swap = table[p.name]
        up = p.up
        if swap:
            up = torch.cat(up.chunk(2)[::-1])
        sizes = [model.get_submodule(t).out_features for t in targets]
        for target, rows in zip(targets, up.split(sizes), strict=True):
            out.append(Part("", target, p.down, rows, p.alpha if p.alpha is not None else float(p.down.shape[0])))
    return out


def flux_original_file(parts: list[Part], naming: str, spelling: tuple[str, str]) -> dict[str, torch.Tensor]:
    sd = {}
    for p in parts:
        stem = "diffusion_model." + p.name if naming == "flux-bfl" else "lora_unet_" + p.name.replace(".", "_")
        sd[f"{stem}.{spelling[0]}.weight"], sd[f"{stem}.{spelling[1]}.weight"] = p.down, p.up
        if p.alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(p.alpha)
        if p.dora is not None:
            sd[f"{stem}.dora_scale"] = p.dora
    return sd


def _flux_file(draw, model):
    naming = draw(st.sampled_from(["flux-bfl", "flux-kohya", "diffusers"]))
    alphas = draw(st.sampled_from(["none", "one", "each"]))
    if naming == "diffusers":
        parts = _draw_parts(draw, _flux_diffusers_layers(model), alphas=alphas, dora=False)
        spelling = draw(st.sampled_from([("lora_A", "lora_B"), ("lora_down", "lora_up")]))
        sd = {f"transformer.{k}": v for k, v in diffusers_file(parts, spelling).items()}
        sd = {k.replace("transformer..", "transformer."): v for k, v in sd.items()}
        return naming, alphas, parts, sd
    spelling = ("lora_down", "lora_up")
    if naming == "flux-bfl":
        spelling = draw(st.sampled_from([("lora_A", "lora_B"), ("lora_down", "lora_up")]))
    parts = _draw_parts(draw, _flux_original_layers(model), alphas=alphas, dora=False)
    sd = flux_original_file(parts, naming, spelling)
    if naming == "flux-bfl" and not any(p.name.startswith(("double_blocks.", "single_blocks.")) for p in parts):
        # no name tells Flux apart: a BFL file reads as ComfyUI's naming, which places Flux's
        # names as the flux-bfl naming does (sd-scripts' spelling of them stays flux-kohya)
        naming = "comfyui"
    return naming, alphas, flux_original_parts(parts, model), sd


def _diffusers_flux(model, sd, scales):
    oracle = copy.deepcopy(model)
    state, alphas = diffusers.FluxPipeline.lora_state_dict({k: v.clone() for k, v in sd.items()}, return_alphas=True)
    state = {k if k.startswith("transformer.") else "transformer." + k: v for k, v in state.items()}
    oracle.load_lora_adapter(state, network_alphas=alphas, prefix="transformer", adapter_name="drawn")
    outs = []
    for s in scales:
        oracle.set_adapters(["drawn"], weights=[s])
        outs.append(_flux_run(oracle))
    return outs


def _lorahot_flux(model, sd, scales, merged, extras):
    return _lorahot_outputs(model, "all-linear", _flux_run, sd, scales, merged, extras)


# -- the runs ------------------------------------------------------------------------------


def _upcast(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same values in float64 (exact): diffusers' converters fold alphas into the factors in
    the file's dtype, which would round a half-precision file; the oracle is fed this copy."""
    return {k: v.double() for k, v in sd.items()}


def _compare(name: str, runs: list[dict[str, torch.Tensor]], refs: list[dict[str, torch.Tensor]], scales) -> None:
    for s, got, want in zip(scales, runs, refs, strict=True):
        for c in want:
            err = float((got[c] - want[c]).abs().max() / want[c].abs().max())
            assert err < RTOL, f"{name} at scale {s}, {c}: relative error {err:.2e}"


def _differential(naming, parts, sd, base, run, load_lorahot, load_diffusers, oracle: bool) -> None:
    """lorahot (unmerged, merged) against the float64 reference at scales 1 and 0.6, and
    diffusers against it where ``oracle``; the base output must move."""
    dora = any(p.dora is not None for p in parts)
    scales = [1.0] if dora else [1.0, 0.6]
    refs = [run(reference_model(base, parts, s)) for s in scales]
    base_out = run(base)
    assert any(not torch.allclose(refs[0][c], base_out[c], rtol=1e-6, atol=0) for c in base_out)
    if oracle:
        try:
            theirs = load_diffusers(base, _upcast(sd), scales)
        except (ValueError, KeyError, IndexError, AssertionError, RuntimeError) as e:  # diffusers refuses
            SEEN[f"{naming}: diffusers refuses ({type(e).__name__})"] += 1
        else:
            _compare(f"diffusers on {naming}", theirs, refs, scales)
            SEEN[f"{naming}: diffusers agrees"] += 1
    for merged in (False, True):
        info, runs = load_lorahot(base, sd, scales, merged, dora)
        assert info.format == naming
        _compare(f"lorahot {'merged' if merged else 'unmerged'} on {naming}", runs, refs, scales)
        SEEN[f"{naming}: reference"] += 1
    if dora:  # a weight-decomposed module takes scale 1 only: refused, nothing changed
        ours = copy.deepcopy(base)
        runtime = lorahot.inject(ours, *_inject_args(base), max_rank=8, extras=True)
        runtime.load(sd)
        before = run(ours)
        with pytest.raises(lorahot.UsageError, match="at scale 1 only"):
            runtime.set_scale(0.6)
        assert all(torch.equal(before[c], v) for c, v in run(ours).items())
        SEEN[f"{naming}: dora_scale refuses set_scale(0.6)"] += 1


def _inject_args(base) -> tuple:
    if isinstance(base, diffusers.StableDiffusionXLPipeline):
        return (_targets(_sdxl_layers(base), SDXL),)
    return ("all-linear",)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_sdxl_files_load_as_the_reference_and_diffusers_compute(sdxl, data) -> None:
    """kohya and diffusers namings on the SDXL pipeline. diffusers is the oracle for kohya files
    without ``dora_scale`` (it drops them) whose alphas are absent or one value (it keys an
    attention module's alpha by the old processor name, so per-module alphas reach the wrong
    layers) and that carry UNet keys (a text-encoder-only ``lora_te1_`` file it cannot
    classify), and for diffusers-named files without ``.alpha`` in ``lora_A``/``lora_B`` (it
    refuses ``.alpha`` and ``lora_down`` there)."""
    naming, alphas, parts, sd = _sdxl_file(data.draw, sdxl)
    if naming == "kohya":
        oracle = alphas != "each" and all(p.dora is None for p in parts) and any(p.component == "unet" for p in parts)
    else:
        oracle = naming == "diffusers" and alphas == "none"
    fmt = "diffusers" if naming.startswith("diffusers") else naming
    _differential(fmt, parts, sd, sdxl, _sdxl_run, _lorahot_sdxl, _diffusers_sdxl, oracle)


@pytest.fixture(scope="module")
def flux():
    return _flux()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_flux_files_load_as_the_reference_and_diffusers_compute(flux, data) -> None:
    """BFL, kohya and diffusers namings on the Flux.1 transformer. diffusers is the oracle for
    the original names in ``lora_down``/``lora_up`` without ``single_blocks.N.linear1`` (its
    converter hard-codes the full model's split sizes) and without ``.alpha`` on a final-layer
    module (it drops those), and for diffusers names in ``lora_A``/``lora_B`` without
    ``.alpha``. A file of ``img_in``, ``txt_in`` or ``final_layer.*`` without a name only Flux has
    (a block module, an embedder's ``in_layer``/``out_layer``) is refused, the model unchanged."""
    naming, alphas, parts, sd = _flux_file(data.draw, flux)
    if naming != "diffusers" and not any("double_blocks" in k or "single_blocks" in k for k in sd):
        SEEN[f"flux {naming}: outer modules only"] += 1
    if naming == "diffusers":
        oracle = alphas == "none" and any(k.endswith(".lora_A.weight") for k in sd)
    else:
        oracle = (
            not any(".lora_A." in k for k in sd)
            and not any("linear1" in k for k in sd)
            and not any("final_layer" in k and k.endswith(".alpha") for k in sd)
        )
    aliased = any(re.search(r"(?:^|[._])(?:img_in|txt_in|final_layer[._]\w+?)\.", k) for k in sd)
    own = r"(?:^|[._])(?:(?:double|single)_blocks[._]\d|(?:time|vector|guidance)_in[._](?:in|out)_layer)"
    if naming != "diffusers" and aliased and not any(re.search(own, k) for k in sd):
        # img_in, txt_in, final_layer.* alone: Qwen-Image's, SD3's, Lumina2's, HiDream's names too
        _assert_refused_unchanged(flux, sd, f"flux {naming}: refused, no key only Flux has")
        return
    _differential(naming, parts, sd, flux, _flux_run, _lorahot_flux, _diffusers_flux, oracle)


def _assert_refused_unchanged(model, sd, seen: str) -> None:
    """``sd``, a file of original names outside the blocks of which no key is a name only its model
    has, is refused as matching no injected layer, the model bitwise unchanged."""
    SEEN[seen] += 1
    model = copy.deepcopy(model)
    runtime = lorahot.inject(
        model, [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)], max_rank=8
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.AdapterMismatchError, match=r"matches no injected layer"):
        runtime.load(sd)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- the SD3 transformer -------------------------------------------------------------------


def _sd3_run(model) -> dict[str, torch.Tensor]:
    inputs = {k: v.double() for k, v in sd3_inputs().items()}
    with torch.no_grad():
        return {"transformer": model(**inputs, return_dict=False)[0]}


def sd3_table() -> dict[str, tuple[tuple[str, ...], bool]]:
    """Each original SD3 module -> the diffusers layers its rows go to, and whether its halves are
    swapped: the final layer's adaLN and the last (pre-only) context block's, ``(shift, scale)``
    in the original, ``(scale, shift)`` in diffusers."""
    swapped = ("final_layer.adaLN_modulation.1", "joint_blocks.1.context_block.adaLN_modulation.1")
    return {name: (tuple(targets), name in swapped) for name, targets in original_parts(dual=False).items()}


def _sd3_original_layers(model) -> dict[tuple[str, str], nn.Module]:
    out: dict[tuple[str, str], nn.Module] = {}
    for name, (targets, _) in sd3_table().items():
        layers = [model.get_submodule(t) for t in targets]
        out[("", name)] = layers[0] if len(layers) == 1 else _Fused(layers)
    return out


def _sd3_file(draw, model):
    """SD3's original names, in sd-scripts' spelling (``sd3-kohya``) or dotted under ComfyUI's,
    diffusers' or no prefix (``sd3`` with a block key; with none, such a file reads as ComfyUI's,
    diffusers' or PEFT's naming, or, in sd-scripts' spelling, as ``flux-kohya`` where it holds the
    final layer alone, which places it alike)."""
    naming = draw(st.sampled_from(["comfyui", "diffusers", "peft", "kohya"]))
    alphas = draw(st.sampled_from(["none", "one", "each"]))
    layers = _sd3_original_layers(model)
    if draw(st.booleans()):  # a file of the modules outside the blocks alone
        layers = {k: v for k, v in layers.items() if not k[1].startswith("joint_blocks.")}
    parts = _draw_parts(draw, layers, alphas=alphas, dora=False)
    spelling = ("lora_down", "lora_up")
    if naming != "kohya":
        spelling = draw(st.sampled_from([("lora_A", "lora_B"), ("lora_down", "lora_up")]))
    head = {"comfyui": "diffusion_model.", "diffusers": "transformer.", "peft": "", "kohya": "lora_unet_"}[naming]
    sd = {}
    for p in parts:
        stem = head + (p.name.replace(".", "_") if naming == "kohya" else p.name)
        sd[f"{stem}.{spelling[0]}.weight"], sd[f"{stem}.{spelling[1]}.weight"] = p.down, p.up
        if p.alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(p.alpha)
    blocks = any(p.name.startswith("joint_blocks.") for p in parts)
    if naming == "kohya":
        final = all(p.name.startswith("final_layer.") for p in parts)
        fmt = "sd3-kohya" if blocks or not final else "flux-kohya"
    else:
        fmt = "sd3" if blocks else naming
    table = sd3_table()
    placed = []
    for p in parts:
        targets, swap = table[p.name]
        up = torch.cat(p.up.chunk(2)[::-1]) if swap else p.up
        sizes = [model.get_submodule(t).weight.shape[0] for t in targets]
        alpha = p.alpha if p.alpha is not None else float(p.down.shape[0])
        placed += [Part("", t, p.down, rows, alpha) for t, rows in zip(targets, up.split(sizes), strict=True)]
    return fmt, placed, sd


def _lorahot_sd3(model, sd, scales, merged, extras):
    """As :func:`_lorahot_flux`, with the patch-embedding conv (``pos_embed.proj``) among the targets."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return _lorahot_outputs(model, names, _sd3_run, sd, scales, merged, extras)


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3_from(dual=False).double()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_sd3_files_load_as_the_reference_computes(sd3, data) -> None:
    """SD3's original names (with or without a block key; outer-only files included) on the SD3
    transformer, against the float64 reference alone: diffusers' SD3 LoRA loader converts no
    original names (its checkpoint conversion, which the parity tests take as the oracle, reads
    whole checkpoints). An outer-only file is SD3's only with a ``y_embedder.mlp.N`` key; without one
    it is refused, the model unchanged."""
    naming, parts, sd = _sd3_file(data.draw, sd3)
    if not any("joint_blocks" in k for k in sd):
        SEEN[f"sd3 {naming}: outer modules only"] += 1
    aliased = any(
        re.search(r"(?:^|[._])(?:x_embedder[._]proj|t_embedder[._]mlp[._]\d|final_layer[._]\w+?)\.", k) for k in sd
    )
    marked = any(re.search(r"(?:^|[._])(?:y_embedder|joint_blocks)[._]", k) for k in sd)
    if aliased and not marked:
        # no key only SD3 has (x_embedder.proj, t_embedder.*, final_layer.*: DiT's, Lumina2's, Cosmos's names
        # too): no naming takes SD3's aliases, the file is refused, nothing changed
        _assert_refused_unchanged(sd3, sd, f"sd3 {naming}: refused, no key only SD3 has")
        return
    _differential(naming, parts, sd, sd3, _sd3_run, _lorahot_sd3, _diffusers_flux, oracle=False)


def teardown_module() -> None:
    for line, n in sorted(SEEN.items()):
        print(f"{n:4d}  {line}")
