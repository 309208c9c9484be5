"""lorahot against diffusers' own Flux.1 (and Flux.2) loaders as the oracle: adapters in the original
model's names (kohya, BFL/ComfyUI, xlabs, fal Kontext), whose fused modules lorahot splits onto a
diffusers-named ``FluxTransformer2DModel``.

Two kinds of checks:

- **Model outputs** on a tiny transformer from config: diffusers reads the file with
  ``FluxPipeline.lora_state_dict`` (its real conversion code) and loads it with
  ``load_lora_adapter``; lorahot injects and loads the same file; the outputs agree within fp32
  rounding. diffusers' kohya conversion hard-codes a single block's ``linear1`` sizes at the
  full model's (``3072, 3072, 3072, 12288``) and drops the ``.alpha`` of ``final_layer``
  modules, and its fal converter needs all 19 + 38 blocks at full width; so these files leave
  out ``linear1`` and the final layers' alphas, and fal has no model check.
- **Conversions at full Flux.1 size** (rank 2, so cheap): for every layer, diffusers' converted
  ``B @ A`` and lorahot's ``scale * B @ A`` applied to the same random probe agree. This covers
  ``linear1``'s four-way split (dense and block-sparse), kohya alphas and fal Kontext.

diffusers' kohya conversion names the modules outside the blocks without ``transformer.``, so
its loaders drop them (silently); the oracle adds the prefix to its converted keys and loads those.

diffusers has no Flux.1 conversion for BFL keys spelled ``.lora_A``/``.lora_B`` (it passes them
through unconverted), so that spelling is checked against diffusers on the same file respelled
``.lora_down``/``.lora_up``, which diffusers converts as ComfyUI's.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from safetensors.torch import save_file

import lorahot
from lorahot.resolve.keys import resolve_keys
from tests.diffusion_names import assert_same, diffusers_weights, linears, lorahot_weights, weights
from tests.helpers import assert_norm_deltas_fold

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

D, MLP, HEADS = 32, 128, 2  # tiny width: 2 heads of 16


#: every LoRA-able module of the original model: name -> (in, out), at width d and MLP width m
def original_modules(
    d: int, mlp: int, double: int = 1, single: int = 1, linear1: bool = True
) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for i in range(double):
        for s in ("img", "txt"):
            out |= {
                f"double_blocks.{i}.{s}_attn.qkv": (d, 3 * d),
                f"double_blocks.{i}.{s}_attn.proj": (d, d),
                f"double_blocks.{i}.{s}_mlp.0": (d, mlp),
                f"double_blocks.{i}.{s}_mlp.2": (mlp, d),
                f"double_blocks.{i}.{s}_mod.lin": (d, 6 * d),
            }
    for i in range(single):
        if linear1:
            out[f"single_blocks.{i}.linear1"] = (d, 3 * d + mlp)
        out |= {f"single_blocks.{i}.linear2": (d + mlp, d), f"single_blocks.{i}.modulation.lin": (d, 3 * d)}
    return out


OUTSIDE = {
    "img_in": (16, D),
    "txt_in": (D, D),
    "time_in.in_layer": (256, D),
    "time_in.out_layer": (D, D),
    "vector_in.in_layer": (D, D),
    "vector_in.out_layer": (D, D),
    "guidance_in.in_layer": (256, D),
    "guidance_in.out_layer": (D, D),
    "final_layer.linear": (D, 16),
    "final_layer.adaLN_modulation.1": (D, 2 * D),
}


def random_weights(
    modules: dict[str, tuple[int, int]], seed: int, sparse: tuple[str, ...] = ()
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]:
    """name -> (A [r, in], B [out, r], alpha or None), ranks 2-6, alphas != rank; the modules in
    ``sparse`` block-sparse (rank 2 per third of B's rows)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, (fan_in, fan_out)) in enumerate(modules.items()):
        r = 6 if name in sparse else 2 + i % 4
        a, b = torch.randn(r, fan_in, generator=g) * 0.2, torch.randn(fan_out, r, generator=g) * 0.2
        if name in sparse:
            mask = torch.block_diag(*[torch.ones(fan_out // 3, 2)] * 3)
            b = b * mask
        alpha = None if name.startswith("final_layer") else float(r) * (0.5 + i % 3)
        out[name] = (a, b, alpha)
    return out


def kohya_file(weights) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (a, b, alpha) in weights.items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = a, b
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def bfl_file(weights, spelling: tuple[str, str] = ("lora_down", "lora_up")) -> dict[str, torch.Tensor]:
    sd = {}
    for name, (a, b, alpha) in weights.items():
        key = "diffusion_model." + name
        sd[f"{key}.{spelling[0]}.weight"], sd[f"{key}.{spelling[1]}.weight"] = a, b
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def xlabs_file(seed: int) -> dict[str, torch.Tensor]:
    """xlabs' processor LoRAs on every attention of the tiny model (xlabs writes no alpha)."""
    shapes = {
        "double_blocks.0.processor.qkv_lora1": (D, 3 * D),
        "double_blocks.0.processor.qkv_lora2": (D, 3 * D),
        "double_blocks.0.processor.proj_lora1": (D, D),
        "double_blocks.0.processor.proj_lora2": (D, D),
        "single_blocks.0.processor.qkv_lora": (D, 3 * D),
        "single_blocks.0.processor.proj_lora": (D + MLP, D),  # diffusers maps it onto proj_out
    }
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (name, (fan_in, fan_out)) in enumerate(shapes.items()):
        r = 2 + i % 3
        sd[f"{name}.down.weight"] = torch.randn(r, fan_in, generator=g) * 0.2
        sd[f"{name}.up.weight"] = torch.randn(fan_out, r, generator=g) * 0.2
    return sd


def tiny_flux() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=D // HEADS,
        num_attention_heads=HEADS,
        joint_attention_dim=D,
        pooled_projection_dim=D,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def flux_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 12, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, D, generator=g),
        "pooled_projections": torch.randn(1, D, generator=g),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.randint(0, 8, (12, 3), generator=g).float(),
        "txt_ids": torch.zeros(5, 3),
    }


def _prefixed(key: str) -> str:
    """diffusers' kohya conversion names the modules outside the blocks (``x_embedder``,
    ``time_text_embed.*``, ``proj_out``, ``norm_out.linear``) without the ``transformer.`` it
    gives the others, so its own loaders drop them; the oracle puts it back."""
    return key if key.startswith("transformer.") else "transformer." + key


@torch.no_grad()
def diffusers_output(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    model = tiny_flux()
    state_dict, alphas = diffusers.FluxPipeline.lora_state_dict(dict(sd), return_alphas=True)
    state_dict = {_prefixed(k): v for k, v in state_dict.items()}
    model.load_lora_adapter(state_dict, network_alphas=alphas, prefix="transformer", adapter_name="oracle")
    return model(**flux_inputs(), return_dict=False)[0]


@torch.no_grad()
def lorahot_output(path: Path) -> tuple[torch.Tensor, torch.Tensor, lorahot.Adapter]:
    model = tiny_flux()
    base = model(**flux_inputs(), return_dict=False)[0]
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    runtime.load(path)
    return base, model(**flux_inputs(), return_dict=False)[0], lorahot.read_adapter(path)


def _check(sd: dict[str, torch.Tensor], oracle_sd: dict[str, torch.Tensor], tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "flux_lora.safetensors"
    save_file(sd, str(path))
    base, ours, adapter = lorahot_output(path)
    expected = diffusers_output(oracle_sd)
    assert adapter.format == fmt
    assert not torch.allclose(expected, base, rtol=1e-3, atol=1e-3)  # the adapter changes the output
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


MODEL_MODULES = {**original_modules(D, MLP, linear1=False), **OUTSIDE}
SPARSE = ("double_blocks.0.img_attn.qkv",)


def test_kohya_flux_matches_diffusers(tmp_path: Path) -> None:
    sd = kohya_file(random_weights(MODEL_MODULES, seed=2, sparse=SPARSE))
    _check(sd, sd, tmp_path, "flux-kohya")


def test_bfl_comfyui_lora_down_matches_diffusers(tmp_path: Path) -> None:
    sd = bfl_file(random_weights(MODEL_MODULES, seed=3, sparse=SPARSE))
    _check(sd, sd, tmp_path, "flux-bfl")


def test_bfl_lora_a_spelling_matches_diffusers_on_its_lora_down_twin(tmp_path: Path) -> None:
    weights = random_weights(MODEL_MODULES, seed=4)
    _check(bfl_file(weights, ("lora_A", "lora_B")), bfl_file(weights), tmp_path, "flux-bfl")


def test_xlabs_flux_matches_diffusers(tmp_path: Path) -> None:
    sd = xlabs_file(seed=5)
    _check(sd, sd, tmp_path, "flux-xlabs")


# Conversions at full Flux.1 size: every converted layer against diffusers' converter.

FULL_D, FULL_MLP = 3072, 12288


def _probe_deltas(state_dict: dict[str, torch.Tensor], probes: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' converted ``transformer.<name>.lora_A/B`` -> ``B @ (A @ probe)`` per name (scale folded in)."""
    out = {}
    for key, a in state_dict.items():
        if key.endswith(".lora_A.weight"):
            name = _prefixed(key)[len("transformer.") : -len(".lora_A.weight")]
            b = state_dict[key.replace(".lora_A.", ".lora_B.")]
            out[name] = b.double() @ (a.double() @ probes[a.shape[1]])
    return out


def _lorahot_deltas(
    adapter: lorahot.Adapter, names: list[str], probes: dict[int, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """lorahot's ``scale * B @ (A @ probe)`` per layer of a model with these ``names`` (the
    modules as ``load`` places them: fused ones split)."""
    placed = resolve_keys(adapter, names)
    return {k: m.scale * (m.B.double() @ (m.A.double() @ probes[m.A.shape[1]])) for k, m in placed.items()}


def _full_size_modules(blocks: tuple[int, int]) -> dict[str, tuple[int, int]]:
    modules = original_modules(FULL_D, FULL_MLP, *blocks)
    return modules | {"final_layer.linear": (FULL_D, 64)}


def _assert_same_deltas(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        scale = float(theirs[name].abs().max())  # diffusers folds alpha in fp32: rounding of that size
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "block-sparse"])
def test_kohya_full_size_linear1_split_matches_diffusers_conversion(sparse: bool) -> None:
    modules = {
        "double_blocks.0.img_attn.qkv": (FULL_D, 3 * FULL_D),
        "single_blocks.0.linear1": (FULL_D, 3 * FULL_D + FULL_MLP),
        "single_blocks.1.linear2": (FULL_D + FULL_MLP, FULL_D),
    }
    g = torch.Generator().manual_seed(6)
    sd: dict[str, torch.Tensor] = {}
    for i, (name, (fan_in, fan_out)) in enumerate(modules.items()):
        key, parts = "lora_unet_" + name.replace(".", "_"), 4 if name.endswith("linear1") else 3
        r = parts * 2 if sparse else 3
        b = torch.randn(fan_out, r, generator=g)
        if sparse and not name.endswith("linear2"):
            sizes = [FULL_D] * 3 + ([FULL_MLP] if parts == 4 else [])
            b = b * torch.block_diag(*[torch.ones(n, 2) for n in sizes])
        sd |= {f"{key}.lora_down.weight": torch.randn(r, fan_in, generator=g), f"{key}.lora_up.weight": b}
        sd[f"{key}.alpha"] = torch.tensor(float(r) * (1.5 + i))
    probes = {n: torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (FULL_D, FULL_D + FULL_MLP)}
    adapter = lorahot.read_adapter(dict(sd), prefix="lora_unet")
    theirs = _probe_deltas(diffusers.FluxPipeline.lora_state_dict(dict(sd)), probes)
    _assert_same_deltas(_lorahot_deltas(adapter, sorted(theirs), probes), theirs)
    if sparse:  # each part gets its own chunk of A: a third (a quarter) of the rank
        assert resolve_keys(adapter, sorted(theirs))["single_transformer_blocks.0.proj_mlp"].rank == 2


def test_fal_kontext_full_size_matches_diffusers_conversion() -> None:
    """fal's converter needs every block of Flux.1 (19 double, 38 single): rank 1 keeps it small."""
    g = torch.Generator().manual_seed(7)
    modules = _full_size_modules((19, 38))
    sd = {}
    for name, (fan_in, fan_out) in modules.items():
        sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(1, fan_in, generator=g)
        sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, 1, generator=g)
    probes = {n: torch.randn(n, 1, generator=g, dtype=torch.float64) for n in (FULL_D, FULL_MLP, FULL_D + FULL_MLP)}
    adapter = lorahot.read_adapter(dict(sd))
    assert adapter.format == "flux-fal"
    theirs = _probe_deltas(diffusers.FluxPipeline.lora_state_dict(dict(sd)), probes)
    _assert_same_deltas(_lorahot_deltas(adapter, sorted(theirs), probes), theirs)
    assert math.isclose(adapter.modules["double_blocks.0.img_attn.qkv"].scale, 1.0)


def test_compiled_swaps_across_flux_namings_match_diffusers_without_recompiling(tmp_path: Path) -> None:
    """One compiled transformer, adapters in three namings swapped in (their splits landing on
    the same layers at different ranks), each against diffusers' output: no recompile."""
    files = {
        "kohya": kohya_file(random_weights(MODEL_MODULES, seed=8, sparse=SPARSE)),
        "xlabs": xlabs_file(seed=9),
        "bfl": bfl_file(random_weights(MODEL_MODULES, seed=10), ("lora_A", "lora_B")),
    }
    oracles = {
        "kohya": files["kohya"],
        "xlabs": files["xlabs"],
        "bfl": bfl_file(random_weights(MODEL_MODULES, seed=10)),
    }
    model = tiny_flux()
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        base = compiled(**flux_inputs(), return_dict=False)[0]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for name in ["kohya", "xlabs", "bfl", "kohya"]:
                path = tmp_path / f"{name}.safetensors"
                save_file(files[name], str(path))
                runtime.load(path)
                out = compiled(**flux_inputs(), return_dict=False)[0]
                torch.testing.assert_close(out, diffusers_output(oracles[name]), rtol=1e-4, atol=1e-5)
            runtime.unload()
            assert torch.equal(compiled(**flux_inputs(), return_dict=False)[0], base)
    assert counter.frame_count == 1


def test_kohya_flux_file_with_text_encoder_keys_loads_the_transformer_with_prefix(tmp_path: Path) -> None:
    """sd-scripts files often carry CLIP modules (``lora_te1_``); ``prefix="lora_unet"`` takes the transformer's."""
    sd = kohya_file(random_weights(MODEL_MODULES, seed=11))
    clip = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    extra = {f"{clip}.lora_down.weight": torch.randn(2, 8), f"{clip}.lora_up.weight": torch.randn(8, 2)}
    path = tmp_path / "with_te.safetensors"
    save_file(sd | extra, str(path))
    model = tiny_flux()
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"{clip}: matches no injected layer"):
        runtime.load(path)
    runtime.load(path, prefix="lora_unet")
    with torch.no_grad():
        out = model(**flux_inputs(), return_dict=False)[0]
    torch.testing.assert_close(out, diffusers_output(sd), rtol=1e-4, atol=1e-5)


# Flux.2: the same original names, other diffusers names, linear1 kept fused.

FLUX2_MODULES = {
    **{
        f"double_blocks.0.{s}_{m}": shape
        for s in ("img", "txt")
        for m, shape in (("attn.qkv", (D, 3 * D)), ("attn.proj", (D, D)), ("mlp.0", (D, 6 * D)), ("mlp.2", (3 * D, D)))
    },
    "single_blocks.0.linear1": (D, 3 * D + 6 * D),
    "single_blocks.0.linear2": (D + 3 * D, D),
    "img_in": (16, D),
    "txt_in": (D, D),
    "time_in.in_layer": (D, D),
    "time_in.out_layer": (D, D),
    "guidance_in.in_layer": (D, D),
    "guidance_in.out_layer": (D, D),
    "single_stream_modulation.lin": (D, 3 * D),
    "double_stream_modulation_img.lin": (D, 6 * D),
    "double_stream_modulation_txt.lin": (D, 6 * D),
    "final_layer.linear": (D, 16),
}


def tiny_flux2() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=D // HEADS,
        num_attention_heads=HEADS,
        joint_attention_dim=D,
        timestep_guidance_channels=D,
        axes_dims_rope=(4, 4, 4, 4),
    ).eval()


def flux2_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 12, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, D, generator=g),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.randint(0, 8, (1, 12, 4), generator=g).float(),
        "txt_ids": torch.zeros(1, 5, 4),
    }


def test_flux2_bfl_matches_diffusers(tmp_path: Path) -> None:
    """diffusers' Flux.2 conversion takes no alphas (scale 1) and maps ``final_layer.adaLN_modulation.1``
    without the shift/scale swap its own checkpoint conversion makes; that module is left out."""
    weights = random_weights(FLUX2_MODULES, seed=12, sparse=SPARSE)
    sd = bfl_file({k: (a, b, None) for k, (a, b, _) in weights.items()}, ("lora_A", "lora_B"))
    path = tmp_path / "flux2.safetensors"
    save_file(sd, str(path))
    with torch.no_grad():
        oracle = tiny_flux2()
        converted = diffusers.Flux2Pipeline.lora_state_dict(dict(sd))
        oracle.load_lora_adapter(converted, prefix="transformer", adapter_name="oracle")
        expected = oracle(**flux2_inputs(), return_dict=False)[0]
        model = tiny_flux2()
        base = model(**flux2_inputs(), return_dict=False)[0]
        runtime = lorahot.inject(model, "all-linear", max_rank=8)
        runtime.load(path)
        ours = model(**flux2_inputs(), return_dict=False)[0]
    assert lorahot.read_adapter(path).format == "flux-bfl"
    assert not torch.allclose(expected, base, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def _tiny_flux2_double() -> torch.nn.Module:
    return tiny_flux2().double()


@pytest.mark.parametrize("rest", ["diffusers", "original"])
def test_flux2_sformer_blocks_land_on_transformer_blocks_as_diffusers_reads_them(rest: str) -> None:
    """Some Flux.2 exports name the double blocks ``diffusion_model.sformer_blocks.N`` (diffusers'
    ``transformer_blocks.N`` cut short) beside diffusers' single-block names or the original ones
    (``single_blocks.0.linear1``, ``img_in``); diffusers' Flux.2 conversion reads them as
    ``transformer_blocks.N``. They were refused as matching no injected layer; every layer now
    gets what diffusers' Flux.2 loader gives it, float64, read as ComfyUI or BFL naming."""
    make = _tiny_flux2_double
    model = make()
    names = linears(model, lambda n: n.startswith(("transformer_blocks.", "single_transformer_blocks.")))
    original = {"single_transformer_blocks.0.attn.to_qkv_mlp_proj": "single_blocks.0.linear1"}
    original |= {"single_transformer_blocks.0.attn.to_out": "single_blocks.0.linear2", "x_embedder": "img_in"}
    names += ["x_embedder"] if rest == "original" else []
    g = torch.Generator().manual_seed(21)
    sd = {}
    for i, name in enumerate(names):
        layer = model.get_submodule(name)
        key = name.replace("transformer_blocks.", "sformer_blocks.") if name.startswith("transformer_blocks.") else name
        key = "diffusion_model." + (original.get(key, key) if rest == "original" else key)
        sd[f"{key}.lora_A.weight"] = torch.randn(2 + i % 3, layer.in_features, generator=g, dtype=torch.float64)
        sd[f"{key}.lora_B.weight"] = torch.randn(layer.out_features, 2 + i % 3, generator=g, dtype=torch.float64)
    assert any(k.startswith("diffusion_model.sformer_blocks.0.") for k in sd)
    ours, fmt = lorahot_weights(make, sd, names)
    assert fmt == ("comfyui" if rest == "diffusers" else "flux-bfl")
    theirs = diffusers_weights(make, diffusers.Flux2Pipeline, sd, names)
    assert all(not torch.equal(theirs[n], w) for n, w in weights(make(), names).items())
    assert_same(ours, theirs)


def test_kohya_spelling_of_diffusers_names_under_lora_transformer_matches_diffusers() -> None:
    """Flux.1 files in the kohya spelling of diffusers' names under ``lora_transformer_``
    (``lora_transformer_transformer_blocks_0_attn_to_q``, ``lora_transformer_x_embedder``, with
    ``.alpha``; diffusers' "mixture" Flux conversion, which reads the attentions of the blocks and
    the modules outside them): read as kohya naming, every layer as diffusers' Flux loader gives
    it, float64."""

    def make() -> torch.nn.Module:
        return tiny_flux().double()

    model = make()
    names = linears(model, lambda n: ".attn." in n or not n.startswith(("transformer_blocks", "single_transformer")))
    g = torch.Generator().manual_seed(22)
    sd = {}
    for i, name in enumerate(names):
        layer, r, key = model.get_submodule(name), 2 + i % 3, "lora_transformer_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, r, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(r * (0.5 + i % 3), dtype=torch.float64)
    ours, fmt = lorahot_weights(make, sd, names)
    assert fmt == "kohya"
    theirs = diffusers_weights(make, diffusers.FluxPipeline, sd, names)
    assert all(not torch.equal(theirs[n], w) for n, w in weights(make(), names).items())
    assert_same(ours, theirs)


def test_flux2_kohya_matches_diffusers(tmp_path: Path) -> None:
    """sd-scripts' Flux.2 files: kohya module spellings, alphas folded as for Flux.1; diffusers'
    Flux.2 kohya conversion knows the blocks, img_in, txt_in, time_in and final_layer.linear."""
    known = {
        k: v for k, v in FLUX2_MODULES.items() if not k.startswith(("guidance_in", "single_stream", "double_stream"))
    }
    sd = kohya_file(random_weights(known, seed=13, sparse=SPARSE))
    path = tmp_path / "flux2_kohya.safetensors"
    save_file(sd, str(path))
    with torch.no_grad():
        oracle = tiny_flux2()
        oracle.load_lora_adapter(diffusers.Flux2Pipeline.lora_state_dict(dict(sd)), prefix="transformer")
        expected = oracle(**flux2_inputs(), return_dict=False)[0]
        model = tiny_flux2()
        runtime = lorahot.inject(model, "all-linear", max_rank=8)
        runtime.load(path)
        ours = model(**flux2_inputs(), return_dict=False)[0]
    assert lorahot.read_adapter(path).format == "flux-kohya"
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_diffusers_names_spelled_lora_down_match_diffusers(tmp_path: Path) -> None:
    """``transformer.<diffusers name>.lora_down.weight`` (kohya's roles under diffusers' prefix,
    which diffusers' Flux converter renames to lora_A / lora_B): refused before as an unknown
    naming."""
    g = torch.Generator().manual_seed(9)
    sd = {}
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k", "proj_out"):
        fan_in, fan_out = (
            tiny_flux().get_submodule(name).weight.shape[1],
            tiny_flux().get_submodule(name).weight.shape[0],
        )
        sd[f"transformer.{name}.lora_down.weight"] = torch.randn(2, fan_in, generator=g) * 0.3
        sd[f"transformer.{name}.lora_up.weight"] = torch.randn(fan_out, 2, generator=g) * 0.3
    _check(sd, sd, tmp_path, "diffusers")


def test_diffusers_named_flux_alphas_land_on_their_own_modules_only() -> None:
    """A Flux file in diffusers' names with ``.alpha`` keys: diffusers turns each alpha into an
    unanchored PEFT ``alpha_pattern``, so ``proj_out``'s alpha also lands on every
    ``single_transformer_blocks.N.proj_out``. lorahot gives each module its own alpha; the
    reference is each update built in float64 from the file."""
    layers = {n: m for n, m in tiny_flux().named_modules() if isinstance(m, torch.nn.Linear)}
    g = torch.Generator().manual_seed(30)
    sd = {}
    for n, m in layers.items():
        sd[f"transformer.{n}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3
        sd[f"transformer.{n}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
        sd[f"transformer.{n}.alpha"] = torch.tensor(16.0 if n == "proj_out" else 4.0)
    adapter = lorahot.read_adapter(sd)
    placed = resolve_keys(adapter, list(layers))
    assert adapter.format == "diffusers" and sorted(placed) == sorted(layers)
    assert "single_transformer_blocks.0.proj_out" in placed
    for n, m in placed.items():
        a, b = (sd[f"transformer.{n}.lora_{x}.weight"].double() for x in "AB")
        expected = float(sd[f"transformer.{n}.alpha"]) / 4 * b @ a
        torch.testing.assert_close(m.scale * m.B.double() @ m.A.double(), expected, rtol=1e-12, atol=1e-12, msg=n)


def _control_lora(naming: str) -> dict[str, torch.Tensor]:
    """A Flux Control LoRA as BFL's Canny/Depth files hold it: LoRA weights on every module,
    ``img_in``'s A twice as wide (the control image's latents beside the image's), and the
    blocks' query/key norm scales in full; or, as diffusers' control training saves it, LoRA
    weights in diffusers' names beside full ``attn.norm_q``/``norm_k`` weights."""
    g = torch.Generator().manual_seed(40)
    if naming == "diffusers":
        sd = {}
        for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):
            layer = tiny_flux().get_submodule(name)
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g)
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g)
        norms = ("transformer_blocks.0.attn.norm_q", "single_transformer_blocks.0.attn.norm_k")
        return sd | {f"transformer.{n}.weight": torch.rand(D // HEADS, generator=g) for n in norms}
    weights = random_weights(MODEL_MODULES | {"img_in": (2 * 16, D)}, seed=41)
    sd = {k.removeprefix("diffusion_model."): v for k, v in bfl_file(weights, ("lora_A", "lora_B")).items()}
    sd |= {
        f"double_blocks.0.{s}_attn.norm.{n}_norm.scale": torch.rand(D // HEADS)
        for s in ("img", "txt")
        for n in ("query", "key")
    }
    sd |= {f"single_blocks.0.norm.{n}_norm.scale": torch.rand(D // HEADS) for n in ("query", "key")}
    return {("diffusion_model." if naming == "diffusion_model." else "") + k: v for k, v in sd.items()}


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "strict=False"])
@pytest.mark.parametrize("naming", ["bfl", "diffusion_model.", "diffusers"])
def test_a_flux_control_lora_is_refused_whole_with_strict_false_too(naming: str, strict: bool) -> None:
    """A control LoRA's LoRA weights were trained with its norms and its widened ``x_embedder``:
    skipping those keys would load the rest onto a model it was not trained with. Every load of
    it is refused, naming the norm keys and diffusers' FluxControlPipeline, nothing changed."""
    sd = _control_lora(naming)
    model = tiny_flux()
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norm_key = next(k for k in sd if k.endswith(("_norm.scale", "norm_q.weight")))
    for call in (lambda: runtime.load(dict(sd), strict=strict), lambda: lorahot.read_adapter(dict(sd), strict=strict)):
        with pytest.raises(
            lorahot.UnknownFormatError, match=rf"(?s){re.escape(norm_key)}: .*Flux Control LoRA.*FluxControlPipeline"
        ):
            call()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def tiny_chroma() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=D // HEADS,
        num_attention_heads=HEADS,
        joint_attention_dim=D,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=D,
        approximator_layers=2,
    ).double()


#: Chroma's modules in its original names -> diffusers': the approximator's layers (MLPEmbedder's
#: in_layer / out_layer, PixArtAlphaTextProjection's linear_1 / linear_2) beside modules Flux has
CHROMA = {
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.layers.0.in_layer": "distilled_guidance_layer.layers.0.linear_1",
    "distilled_guidance_layer.layers.1.out_layer": "distilled_guidance_layer.layers.1.linear_2",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
    "double_blocks.0.img_attn.proj": "transformer_blocks.0.attn.to_out.0",
    "img_in": "x_embedder",
}


@pytest.mark.parametrize("naming", ["flux-bfl", "flux-kohya"])
def test_chroma_approximator_in_original_names_lands_on_diffusers_layers(naming: str) -> None:
    """A Chroma file in its original names with the approximator's ``in_layer`` / ``out_layer``:
    refused before as matching no injected layer. Each layer against diffusers loading the same
    factors in its own names (kohya without alpha: scale 1)."""
    g = torch.Generator().manual_seed(42)
    sd, oracle = {}, {}
    for i, (original, name) in enumerate(CHROMA.items()):
        layer = tiny_chroma().get_submodule(name)
        a = torch.randn(2 + i % 3, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(layer.out_features, 2 + i % 3, generator=g, dtype=torch.float64) * 0.3
        key = "diffusion_model." + original if naming == "flux-bfl" else "lora_unet_" + original.replace(".", "_")
        down, up = ("lora_A", "lora_B") if naming == "flux-bfl" else ("lora_down", "lora_up")
        sd |= {f"{key}.{down}.weight": a, f"{key}.{up}.weight": b}
        oracle |= {f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b}
    names = linears(tiny_chroma())
    ours, fmt = lorahot_weights(tiny_chroma, sd, names)
    model = tiny_chroma()
    model.load_lora_adapter(oracle, prefix="transformer", adapter_name="o")
    assert fmt == naming
    assert_same(ours, weights(model, names))


@pytest.mark.parametrize(
    ("prefix", "roles", "alpha", "naming"),
    [
        ("transformer.", ("lora_down", "lora_up"), True, "diffusers"),  # OneTrainer's Chroma files
        ("transformer.", ("lora_A", "lora_B"), False, "diffusers"),
        ("base_model.model.", ("lora_A", "lora_B"), False, "peft"),
        ("", ("lora_down", "lora_up"), True, "peft"),
    ],
    ids=["onetrainer", "diffusers", "peft", "bare"],
)
def test_chroma_approximator_in_original_names_beside_diffusers_names_loads_as_its_diffusers_twin(
    prefix: str, roles: tuple[str, str], alpha: bool, naming: str
) -> None:
    """OneTrainer writes Chroma's approximator in its original names (``in_layer`` /
    ``out_layer``) under ``transformer.``, beside diffusers' names for every other module, with
    ``.alpha``: refused before as matching no injected layer (closest ``linear_1``). Against
    diffusers' Chroma loader on the twin file in diffusers' names (alpha / r folded into B),
    float64, every layer; the same in PEFT naming, with and without its wrapper."""
    g = torch.Generator().manual_seed(7)
    sd, twin = {}, {}
    for i, (original, name) in enumerate(CHROMA.items()):
        key = original if original.startswith("distilled_guidance_layer.layers.") else name
        layer = tiny_chroma().get_submodule(name)
        rank = 2 + i % 3
        a = torch.randn(rank, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(layer.out_features, rank, generator=g, dtype=torch.float64) * 0.3
        sd |= {f"{prefix}{key}.{roles[0]}.weight": a, f"{prefix}{key}.{roles[1]}.weight": b}
        scale = (1.0 + i) / rank if alpha else 1.0
        if alpha:
            sd[f"{prefix}{key}.alpha"] = torch.tensor(1.0 + i)
        twin |= {f"transformer.{name}.lora_A.weight": a, f"transformer.{name}.lora_B.weight": b * scale}
    names = linears(tiny_chroma())
    ours, fmt = lorahot_weights(tiny_chroma, sd, names)
    assert fmt == naming
    assert_same(ours, diffusers_weights(tiny_chroma, diffusers.ChromaPipeline, twin, names))


def tiny_flux_fill(in_channels: int) -> torch.nn.Module:
    """:func:`tiny_flux` as Flux.1 Fill or a control model makes it: ``x_embedder`` takes the
    conditioning latents after the image's 16 (``in_channels`` in all), the output stays 16."""
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=D // HEADS,
        num_attention_heads=HEADS,
        joint_attention_dim=D,
        pooled_projection_dim=D,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()


class _FluxLoader(diffusers.loaders.FluxLoraLoaderMixin):
    """diffusers' Flux.1 pipelines' loader (``load_lora_weights``) over a transformer alone."""

    hf_device_map = None

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer, self.text_encoder = transformer, None

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.transformer}


@pytest.mark.parametrize("in_channels", [96, 32], ids=["fill", "control"])
def test_a_flux_lora_on_a_fill_or_control_model_pads_x_embedder_as_diffusers(in_channels: int) -> None:
    """A Flux.1-dev LoRA (``img_in``'s A ``[r, 16]``) on a model whose ``x_embedder`` takes
    ``in_channels``: refused before ('A has shape (4, 16), expected (r, 96)'). Now A's
    conditioning columns are zeros, as diffusers' FluxLoraLoaderMixin pads them: the outputs
    agree with diffusers loading the same file, and the conditioning input gets no update."""
    sd = kohya_file(random_weights(MODEL_MODULES, seed=2, sparse=SPARSE))
    g = torch.Generator().manual_seed(3)
    inputs = flux_inputs() | {"hidden_states": torch.randn(1, 12, in_channels, generator=g)}
    oracle = tiny_flux_fill(in_channels)
    converted = diffusers.FluxPipeline.lora_state_dict(dict(sd))
    _FluxLoader(oracle).load_lora_weights({_prefixed(k): v for k, v in converted.items()}, adapter_name="o")
    model = tiny_flux_fill(in_channels)
    with torch.no_grad():
        base = model(**inputs, return_dict=False)[0]
        runtime = lorahot.inject(model, "all-linear", max_rank=8)
        assert runtime.load(dict(sd)).ranks["x_embedder"] == 2
        ours, expected = (m(**inputs, return_dict=False)[0] for m in (model, oracle))
    assert not torch.allclose(ours, base, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    x_embedder = model.get_submodule("x_embedder")
    x = torch.zeros(3, in_channels, dtype=torch.float64)
    x[:, 16:] = torch.randn(3, in_channels - 16, generator=g, dtype=torch.float64)
    layer = tiny_flux_fill(in_channels).get_submodule("x_embedder")
    with torch.no_grad():  # the conditioning channels alone: the base layer's output
        torch.testing.assert_close(x_embedder(x.float()), layer(x.float()), rtol=0, atol=0)
    plan = lorahot.plan_targets(dict(sd), tiny_flux_fill(in_channels))
    assert plan.ranks["x_embedder"] == 2


def test_a_narrower_a_elsewhere_is_still_refused() -> None:
    """Padding is for a Flux.1 transformer's ``x_embedder`` only: a narrower A on its
    ``context_embedder``, or on Flux.2's ``x_embedder`` (diffusers' Flux.2 loader pads
    nothing), is an adapter of another model, refused with both shapes, nothing changed."""
    g = torch.Generator().manual_seed(4)
    cases = {
        (tiny_flux_fill, 96): "context_embedder",
        (lambda _: tiny_flux2(), 16): "x_embedder",
    }
    for (make, in_channels), name in cases.items():
        model = make(in_channels)
        layer = model.get_submodule(name)
        sd = {
            f"transformer.{name}.lora_A.weight": torch.randn(2, layer.in_features // 2, generator=g),
            f"transformer.{name}.lora_B.weight": torch.randn(layer.out_features, 2, generator=g),
        }
        runtime = lorahot.inject(model, "all-linear", max_rank=8)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        shape = rf"A has shape \(2, {layer.in_features // 2}\), expected \(r, {layer.in_features}\)"
        with pytest.raises(lorahot.AdapterMismatchError, match=rf"{name} \(.*\): {shape}"):
            runtime.load(dict(sd))
        with pytest.raises(lorahot.AdapterMismatchError, match=shape):
            lorahot.plan_targets(dict(sd), make(in_channels))
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


#: Flux's attention query/key norms (BFL's QKNorm, parameter ``scale``) -> diffusers' RMSNorm, as
#: diffusers' Flux conversions rename them (Flux.1 and Flux.2 alike)
FLUX_NORMS = {
    "double_blocks.0.img_attn.norm.query_norm": "transformer_blocks.0.attn.norm_q",
    "double_blocks.0.img_attn.norm.key_norm": "transformer_blocks.0.attn.norm_k",
    "double_blocks.0.txt_attn.norm.query_norm": "transformer_blocks.0.attn.norm_added_q",
    "double_blocks.0.txt_attn.norm.key_norm": "transformer_blocks.0.attn.norm_added_k",
    "single_blocks.0.norm.query_norm": "single_transformer_blocks.0.attn.norm_q",
    "single_blocks.0.norm.key_norm": "single_transformer_blocks.0.attn.norm_k",
}


@pytest.mark.parametrize("flux2", [False, True], ids=["flux1", "flux2"])
@pytest.mark.parametrize("spelling", ["comfyui", "bfl", "kohya"])
def test_flux_query_key_norm_deltas_fold_into_diffusers_norms_in_merged_mode(spelling: str, flux2: bool) -> None:
    """A ``.diff`` of Flux's query/key norms (ComfyUI keys it by the parameter:
    ``diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff``, which ComfyUI adds to
    that scale) was refused by name, or matched no layer, as the Flux namings placed no norm on
    diffusers' model. Now they are aliased as diffusers' conversion renames the scales
    (``attn.norm_q``, ``norm_added_k``, ...: one weight ``[head_dim]`` shared by the heads in both),
    ``plan_targets`` lists them, and the file folds: float64 ``W + s alpha / r B A`` and
    ``w + s diff`` at scales 1 and 0.5. A delta of a weightless norm (``img_norm1``,
    ``norm_final``) is refused by name, nothing changed."""
    g = torch.Generator().manual_seed(50)

    def key(name: str) -> str:
        if spelling == "kohya":
            return "lora_unet_" + name.replace(".", "_")
        return f"diffusion_model.{name}" + (".scale" if spelling == "comfyui" and name in FLUX_NORMS else "")

    with torch.no_grad():
        model = (tiny_flux2() if flux2 else tiny_flux()).double()
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        layer = model.get_submodule("transformer_blocks.0.attn.to_out.0")
        a = torch.randn(2, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(layer.out_features, 2, generator=g, dtype=torch.float64) * 0.3
        proj = key("double_blocks.0.img_attn.proj")
        sd = {f"{proj}.lora_down.weight": a, f"{proj}.lora_up.weight": b, f"{proj}.alpha": torch.tensor(3.0)}
        expected = {"transformer_blocks.0.attn.to_out.0.weight": 1.5 * b @ a}
        for name, norm in FLUX_NORMS.items():
            assert model.get_submodule(norm).weight.shape == (D // HEADS,)
            sd[f"{key(name)}.diff"] = torch.randn(D // HEADS, generator=g, dtype=torch.float64) * 0.1
            expected[f"{norm}.weight"] = sd[f"{key(name)}.diff"]
        runtime = assert_norm_deltas_fold(
            model, sd, FLUX_NORMS.values(), f"flux-{'kohya' if spelling == 'kohya' else 'bfl'}", pristine, expected
        )

        before = {k: v.clone() for k, v in model.state_dict().items()}
        for weightless in ("double_blocks.0.img_norm1", "final_layer.norm_final"):
            hostile = dict(sd) | {f"{key(weightless)}.diff": torch.zeros(D, dtype=torch.float64)}
            with pytest.raises(lorahot.UnknownFormatError, match=r"no weight or bias in Flux.*strict=False"):
                runtime.load(hostile)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_fused_kohya_key_that_lands_nowhere_is_named_as_the_file_spells_it() -> None:
    """A kohya ``img_attn_qkv`` of a block the model lacks: its parts were named by the keys the
    split gives them, ``lora_unet_transformer_blocks.7.attn.to_q``, half kohya prefix, half model
    path, each "part of" the half-dotted ``lora_unet_double_blocks.7.img_attn.qkv``. Now each part
    is named by the model path it is for, part of the file's key."""
    model = tiny_flux().double()
    dim = model.get_submodule("transformer_blocks.0.attn.to_q").in_features
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    stem = "lora_unet_double_blocks_7_img_attn_qkv"
    sd = {
        f"{stem}.lora_down.weight": torch.zeros(2, dim, dtype=torch.float64),
        f"{stem}.lora_up.weight": torch.zeros(3 * dim, 2, dtype=torch.float64),
    }
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=rf"\n  - transformer_blocks\.7\.attn\.to_q \(part of {stem}\): matches no injected layer \(closest: "
        r"transformer_blocks\.0\.attn\.to_q",
    ):
        runtime.load(sd)


#: Flux's modules outside the blocks -> diffusers' layers
OUTSIDE_LAYERS = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def _assert_outside_lands(sd: dict[str, torch.Tensor], weights: dict, merged: bool) -> None:
    """``sd``, a file of ``weights`` (Flux's modules outside the blocks), loaded on diffusers'
    Flux, gives the float64 reference ``W + s * alpha / r * B @ A`` (``B``'s halves swapped for
    ``norm_out.linear``: diffusers' ``(scale, shift)``) at scales 1 and 0.6."""
    base = tiny_flux().double()
    inputs = {k: v.double() for k, v in flux_inputs().items()}
    with torch.no_grad():
        base_out = base(**inputs, return_dict=False)[0]
        model = copy.deepcopy(base)
        runtime = lorahot.inject(model, "all-linear", max_rank=8, merged=merged)
        runtime.load(sd)
        for s in (1.0, 0.6):
            reference = copy.deepcopy(base)
            for name, (a, b, alpha) in weights.items():
                if name == "final_layer.adaLN_modulation.1":
                    b = torch.cat(b.chunk(2)[::-1])
                reference.get_submodule(OUTSIDE_LAYERS[name]).weight += s * alpha / a.shape[0] * b @ a
            runtime.set_scale(s)
            want = reference(**inputs, return_dict=False)[0]
            got = model(**inputs, return_dict=False)[0]
            assert not torch.allclose(want, base_out, rtol=1e-6, atol=0)
            err = float((got - want).abs().max() / want.abs().max())
            assert err < 1e-10, f"scale {s}: relative error {err:.2e}"


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer.", ""], ids=["comfyui", "transformer", "bare"])
@pytest.mark.parametrize("spelling", [("lora_A", "lora_B"), ("lora_down", "lora_up")], ids=["lora_A", "lora_down"])
def test_a_bfl_file_of_modules_outside_the_blocks_only_lands_as_with_a_block_key(
    spelling: tuple[str, str], prefix: str, merged: bool
) -> None:
    """A BFL file whose modules are all outside the blocks (a trainer that targets the final layer
    or the input projections) has no ``double_blocks.N.`` key to tell Flux apart: it reads as
    ComfyUI's naming (``diffusion_model.``), diffusers' (``transformer.``) or PEFT's (no prefix),
    where ``final_layer.*``, ``img_in``, ... were no layer of diffusers' model (refused) or the
    final adaLN's halves were left unswapped. Each module now lands on its diffusers layer as in
    the flux-bfl naming; the reference is ``W + s * alpha / r * B @ A`` in float64, ``B``'s
    halves swapped for ``norm_out.linear`` (diffusers' ``(scale, shift)``), at scales 1 and 0.6."""
    weights = random_weights(OUTSIDE, seed=50)
    weights = {
        n: (a.double(), b.double(), 1.5 * a.shape[0] if alpha is None else alpha)
        for n, (a, b, alpha) in weights.items()
    }
    sd = {prefix + k.removeprefix("diffusion_model."): v for k, v in bfl_file(weights, spelling).items()}
    _assert_outside_lands(sd, weights, merged)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize(
    "only", [None, ("final_layer.linear", "final_layer.adaLN_modulation.1", "time_in.in_layer")], ids=["all", "final"]
)
def test_a_kohya_file_of_modules_outside_the_blocks_only_lands_as_with_a_block_key(
    only: tuple[str, ...] | None, merged: bool
) -> None:
    """sd-scripts' spelling of the same file (``lora_unet_final_layer_linear``, ``lora_unet_img_in``,
    ...: no ``lora_unet_double_blocks_N_`` key for the flux-kohya marker) read as kohya naming,
    whose underscore names are no layer of diffusers' Flux (refused). It now reads as flux-kohya:
    each module lands on its diffusers layer, the final adaLN's halves swapped, with its
    ``.alpha``, against the float64 reference at scales 1 and 0.6, in a file with a name only Flux
    has (``time_in.in_layer``); the final layer's alone, SD3's, Lumina2's and HiDream's names too, is
    refused, the model bitwise unchanged."""
    weights = random_weights(OUTSIDE, seed=51)
    weights = {
        n: (a.double(), b.double(), 1.5 * a.shape[0] if alpha is None else alpha)
        for n, (a, b, alpha) in weights.items()
        if only is None or n in only
    }
    sd = kohya_file(weights)
    assert lorahot.read_adapter(sd).format == "flux-kohya"
    _assert_outside_lands(sd, weights, merged)
    if only is not None:
        final = kohya_file({n: w for n, w in weights.items() if n.startswith("final_layer.")})
        model = tiny_flux().double()
        runtime = lorahot.inject(model, "all-linear", max_rank=8, merged=merged)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(lorahot.AdapterMismatchError, match=r"lora_unet_final_layer_linear: matches no injected"):
            runtime.load(final)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


LINEAR1_PARTS = tuple(f"single_transformer_blocks.0.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))


def _comfyui_linear1(model: torch.nn.Module, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """ComfyUI's formula for ``single_blocks.N.linear1_qkv`` (comfy/lora.py maps it to
    ``(linear1.weight, (0, 0, 3 * hidden_size))``: ``linear1.weight.narrow(0, 0, 3 D) += ΔW``),
    in float64 on the original model's ``linear1``, the cat of diffusers' q, k, v and proj_mlp;
    returned as diffusers' four weights."""
    fused = torch.cat([model.get_submodule(n).weight for n in LINEAR1_PARTS]).clone()
    fused.narrow(0, 0, delta.shape[0]).add_(delta)
    sizes = [model.get_submodule(n).out_features for n in LINEAR1_PARTS]
    return dict(zip(LINEAR1_PARTS, fused.split(sizes)))


@pytest.mark.parametrize(
    "kind", ["lora_A", "lora_down-alpha", "kohya-alpha", "diff-merged"], ids=lambda k: k.replace("-", "/")
)
def test_comfyui_linear1_qkv_lands_on_q_k_v_as_comfyui_adds_it_to_linear1s_first_rows(kind: str) -> None:
    """ComfyUI reads ``diffusion_model.single_blocks.N.linear1_qkv`` (xlabs' single-block
    ``qkv_lora`` converted, and files made from it) as rows ``0 .. 3 D`` of ``linear1``, the MLP's
    rows untouched; lorahot refused it as matching no layer. It is split onto diffusers' to_q,
    to_k, to_v like a double block's qkv (a ``.diff`` by its rows in merged mode; the kohya
    spelling too), proj_mlp untouched, against that formula in float64."""
    g = torch.Generator().manual_seed(60)
    model = tiny_flux().double()
    dim, r = D, 2
    a = torch.randn(r, dim, generator=g, dtype=torch.float64)
    b = torch.randn(3 * dim, r, generator=g, dtype=torch.float64)
    key = (
        "lora_unet_single_blocks_0_linear1_qkv"
        if kind.startswith("kohya")
        else "diffusion_model.single_blocks.0.linear1_qkv"
    )
    if kind == "diff-merged":
        delta = torch.randn(3 * dim, dim, generator=g, dtype=torch.float64) * 0.1
        sd = {f"{key}.diff": delta}
    else:
        down, up = ("lora_A", "lora_B") if kind == "lora_A" else ("lora_down", "lora_up")
        sd = {f"{key}.{down}.weight": a, f"{key}.{up}.weight": b}
        alpha = 3.0 if kind.endswith("alpha") else float(r)  # ComfyUI: alpha / r, 1 without .alpha
        if kind.endswith("alpha"):
            sd[f"{key}.alpha"] = torch.tensor(alpha)
        delta = alpha / r * b @ a
    expected = _comfyui_linear1(model, delta)
    with torch.no_grad():
        runtime = lorahot.inject(model, "all-linear", max_rank=8, merged=kind == "diff-merged")
        info = runtime.load(sd)
        ours = weights(model, list(LINEAR1_PARTS))
    assert info.format == ("flux-kohya" if kind.startswith("kohya") else "flux-bfl")
    for name in LINEAR1_PARTS:
        bias = model.get_submodule(name).base_layer.bias
        adapted = (ours[name][:-1] - ours[name][-1]).T  # the probe's rows: W^T + bias, then the bias
        torch.testing.assert_close(adapted, expected[name], rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(ours[name][-1], bias, rtol=0, atol=0, msg=name)


def _original_single_block_model() -> torch.nn.Module:
    """A model in the original names, whose single block holds ``linear1`` (q, k, v and the MLP) as one layer."""
    torch.manual_seed(0)
    block = torch.nn.Module()
    block.linear1, block.linear2 = torch.nn.Linear(D, 3 * D + MLP), torch.nn.Linear(D + MLP, D)
    model = torch.nn.Module()
    model.single_blocks = torch.nn.ModuleList([block])
    return model.double()


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "strict=False"])
@pytest.mark.parametrize(
    "make", [_original_single_block_model, lambda: tiny_flux2().double()], ids=["original-names", "flux2"]
)
@pytest.mark.parametrize(
    "naming",
    [
        ("diffusion_model.single_blocks.0.linear1_qkv", "lora_A", "lora_B"),
        ("single_blocks.0.processor.qkv_lora", "down", "up"),
    ],
    ids=["bfl", "xlabs"],
)
def test_linear1_qkv_on_a_model_holding_linear1_whole_is_refused_naming_the_layer(
    make, strict: bool, naming: tuple[str, str, str]
) -> None:
    """On a model whose ``linear1`` is one layer (the original names; Flux.2's diffusers
    ``to_qkv_mlp_proj``), ``linear1_qkv`` is a part of that layer's rows, which lorahot cannot
    place (it updates a layer's every row): its parts were refused as three layers the model
    lacks, without saying why. Now it is refused naming the fused layer and the fix, with
    strict=False too (skipping it would load the rest of the file without it), every parameter
    bitwise unchanged; so is xlabs' single-block ``qkv_lora``, which ComfyUI reads as ``linear1_qkv``."""
    model = make()
    key, down, up = naming
    sd = {f"{key}.{down}.weight": torch.randn(2, D, dtype=torch.float64)}
    sd[f"{key}.{up}.weight"] = torch.randn(3 * D, 2, dtype=torch.float64)
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"96 output rows are the first rows of .*single_blocks\.0\.linear1'.*one layer with more rows",
    ):
        runtime.load(sd, strict=strict)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
