"""Flux.2 LoKr files against diffusers' Flux.2 loader and LyCORIS' weight rule.

diffusers 0.42 reads two spellings of LoKr for ``Flux2Transformer2DModel``: ai-toolkit's, in the
original model's names (``diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1``, also under
PEFT's ``base_model.model.``), and LyCORIS' own wrapper over the diffusers model
(``lycoris_transformer_blocks_0_attn_to_q.lokr_w1``). Its loader bakes ``alpha / r`` into
``lokr_w1`` where a half is low-rank, and fuses the model's q/k/v projections before loading a
LoKr of the fused ``img_attn.qkv``/``txt_attn.qkv``. lorahot loads both in merged mode: the
first as ``flux-bfl``/``flux-fal`` naming, which cuts a fused module's ``ΔW`` by its rows onto
``to_q``/``to_k``/``to_v``, the second as kohya naming. The model's outputs are compared in
float64 with diffusers', and every layer's weight with the float64 LyCORIS rule
(``W + alpha / r * kron(w1, w2)``, scale 1 where both halves are whole).
"""

from __future__ import annotations

import pytest
import torch

import lorahot
from tests.diffusion_names import assert_same, linears, weights
from tests.system.test_parity_flux import FLUX2_MODULES, MLP, D, flux2_inputs, tiny_flux, tiny_flux2

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

#: the original module -> its diffusers layers (several where diffusers splits it), in row order
_PLACES = {
    "double_blocks.0.img_attn.qkv": ["transformer_blocks.0.attn.to_q", "to_k", "to_v"],
    "double_blocks.0.txt_attn.qkv": ["transformer_blocks.0.attn.add_q_proj", "add_k_proj", "add_v_proj"],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.txt_attn.proj": ["transformer_blocks.0.attn.to_add_out"],
    "double_blocks.0.img_mlp.0": ["transformer_blocks.0.ff.linear_in"],
    "double_blocks.0.img_mlp.2": ["transformer_blocks.0.ff.linear_out"],
    "double_blocks.0.txt_mlp.0": ["transformer_blocks.0.ff_context.linear_in"],
    "double_blocks.0.txt_mlp.2": ["transformer_blocks.0.ff_context.linear_out"],
    "single_blocks.0.linear1": ["single_transformer_blocks.0.attn.to_qkv_mlp_proj"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.attn.to_out"],
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_guidance_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_guidance_embed.timestep_embedder.linear_2"],
    "guidance_in.in_layer": ["time_guidance_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_guidance_embed.guidance_embedder.linear_2"],
    "single_stream_modulation.lin": ["single_stream_modulation.linear"],
    "double_stream_modulation_img.lin": ["double_stream_modulation_img.linear"],
    "double_stream_modulation_txt.lin": ["double_stream_modulation_txt.linear"],
    "final_layer.linear": ["proj_out"],
}


def _layers(module: str) -> list[str]:
    """The diffusers layers a module of the file lands on (a diffusers name lands on itself)."""
    if module not in _PLACES:
        return [module]
    first, *rest = _PLACES[module]
    return [first, *(first.rpartition(".")[0] + "." + r for r in rest)]


def _lokr(shape: tuple[int, int], low_rank: bool, g: torch.Generator, i: int) -> dict[str, torch.Tensor]:
    """A LoKr module of a ``(in, out)`` linear: ``w1`` 4 x 4, ``w2`` whole or of rank 2, ``.alpha``."""
    fan_in, out = shape
    f = {"lokr_w1": torch.randn(4, 4, generator=g, dtype=torch.float64)}
    if low_rank:
        f["lokr_w2_a"] = torch.randn(out // 4, 2, generator=g, dtype=torch.float64) * 0.3
        f["lokr_w2_b"] = torch.randn(2, fan_in // 4, generator=g, dtype=torch.float64) * 0.3
    else:
        f["lokr_w2"] = torch.randn(out // 4, fan_in // 4, generator=g, dtype=torch.float64) * 0.1
    f["alpha"] = torch.tensor(3.0 + i % 3, dtype=torch.float64)
    return f


#: the spellings in the original names (ai-toolkit's); the others name the diffusers model's modules
_ORIGINAL = ("diffusion_model.", "base_model.model.")


def _file(low_rank: bool, spelling: str) -> dict[str, dict[str, torch.Tensor]]:
    """module -> its LoKr factors: every module of ``_PLACES`` in the original names; for
    LyCORIS' wrapper, every linear of the diffusers model's blocks (the modules diffusers'
    LyCORIS conversion knows); in the diffusers names (SimpleTuner's, bare; under
    ``transformer.``, without ``.alpha``, which diffusers refuses there), every linear."""
    g = torch.Generator().manual_seed(21)
    if spelling in _ORIGINAL:
        return {m: _lokr(FLUX2_MODULES[m], low_rank, g, i) for i, m in enumerate(_PLACES)}
    model = _tiny()
    blocks = ("transformer_blocks.", "single_transformer_blocks.")
    names = linears(model, lambda n: spelling != "lycoris" or n.startswith(blocks))
    shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in names}
    modules = {n: _lokr(shape, low_rank, g, i) for i, (n, shape) in enumerate(shapes.items())}
    if spelling == "transformer.":
        modules = {n: {k: t for k, t in f.items() if k != "alpha"} for n, f in modules.items()}
    return modules


def _delta(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """LyCORIS' ``ΔW``: ``alpha / r * kron(w1, w2)`` (scale 1 where both halves are whole)."""
    if "lokr_w2" in f:
        return torch.kron(f["lokr_w1"], f["lokr_w2"])
    scale = float(f["alpha"]) / f["lokr_w2_b"].shape[0] if "alpha" in f else 1.0
    return scale * torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"])


def _tiny() -> torch.nn.Module:
    return tiny_flux2().double()


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in flux2_inputs().items()}
        return model(**inputs, return_dict=False)[0]


def _spelled(modules: dict[str, dict[str, torch.Tensor]], spelling: str) -> dict[str, torch.Tensor]:
    if spelling == "lycoris":  # LyCORIS' wrapper over the diffusers model: its names, _ for .
        return {f"lycoris_{m.replace('.', '_')}.{k}": t for m, f in modules.items() for k, t in f.items()}
    return {f"{spelling}{m}.{k}": t for m, f in modules.items() for k, t in f.items()}


def _reference(modules: dict[str, dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    out = weights(_tiny(), names)
    for m, f in modules.items():
        delta, start = _delta(f), 0
        for layer in _layers(m):
            if layer in out:
                rows = out[layer].shape[1]
                part = delta[start : start + rows]
                out[layer] = out[layer] + torch.cat([part.T, torch.zeros(1, rows, dtype=torch.float64)])
                start += rows
    return out


@pytest.mark.parametrize("low_rank", [False, True], ids=["whole", "w2-low-rank"])
@pytest.mark.parametrize(
    "spelling",
    ["diffusion_model.", "base_model.model.", "lycoris", "", "transformer."],
    ids=["bfl", "peft-wrapper", "lycoris", "bare", "transformer"],
)
def test_flux2_lokr_matches_diffusers_and_lycoris(spelling: str, low_rank: bool) -> None:
    """Each spelling diffusers' Flux.2 loader reads: the model's output as diffusers gives it
    (which fuses q/k/v to load a LoKr of the fused qkv; lorahot cuts its ``ΔW`` by rows), every
    layer as the float64 LyCORIS rule gives it. Before, the two ai-toolkit spellings were refused
    ('LyCORIS ... weights, which lorahot does not read in the Flux.1 namings'), and the diffusers
    names, bare or under ``transformer.``, as 'in kohya or ComfyUI naming'."""
    modules = _file(low_rank, spelling)
    sd = _spelled(modules, spelling)
    oracle = _tiny()
    oracle.load_lora_adapter(diffusers.Flux2Pipeline.lora_state_dict(dict(sd)), prefix="transformer")
    model = _tiny()
    base = _outputs(model)
    info = lorahot.inject(model, "all-linear", max_rank=8, merged=True).load(dict(sd))
    namings = {"diffusion_model.": "flux-bfl", "base_model.model.": "flux-fal", "lycoris": "kohya"}
    assert info.format == {**namings, "transformer.": "diffusers"}.get(spelling, "peft")
    expected = _outputs(oracle)
    assert not torch.allclose(expected, base, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(_outputs(model), expected, rtol=1e-9, atol=1e-10)
    names = linears(_tiny())
    assert_same(weights(model, names), _reference(modules, names))


def _flux1(device: str = "cpu") -> torch.nn.Module:
    return tiny_flux().double().to(device)


#: the devices of the device-generic tests (the CUDA case runs on a GPU machine only: ``-m gpu``)
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spelling", ["kohya", "bfl"])
def test_flux_namings_cut_lycoris_and_diff_modules_by_rows(spelling: str, device: str) -> None:
    """Flux.1 files in the original names with a LoHa on ``img_attn.qkv``, a LoKr on a single
    block's ``linear1`` (cut ``1 : 1 : 1 : 4`` onto ``to_q``, ``to_k``, ``to_v``, ``proj_mlp``) and
    on the final adaLN (its ``(shift, scale)`` rows swapped into ``norm_out.linear``'s ``(scale,
    shift)``, as for a LoRA), and a LoRA with a ``.diff_b`` on ``txt_attn.qkv`` (its bias cut with
    the rows): every layer's weight and bias as the float64 LyCORIS rule on the fused layer gives
    them. All four were refused ('LyCORIS ... which lorahot does not read in the Flux.1
    namings'). diffusers' Flux.1 loader reads none of them. An unmerged runtime refuses the
    LyCORIS modules, as any weight delta, saying merged=True; the LoRA with its ``.diff_b`` is a
    LoRA with a bias, which one injected with extras=True loads with the same weights and biases.
    On CUDA the deltas are built and cut on the device: the same float64 references hold."""
    g = torch.Generator().manual_seed(4)

    def rand(*shape: int, s: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    qkv = {"hada_w1_a": rand(3 * D, 2), "hada_w1_b": rand(2, D), "hada_w2_a": rand(3 * D, 2), "hada_w2_b": rand(2, D)}
    qkv["alpha"] = torch.tensor(1.0, dtype=torch.float64)
    linear1 = {"lokr_w1": rand(4, 4), "lokr_w2_a": rand((3 * D + MLP) // 4, 2), "lokr_w2_b": rand(2, D // 4)}
    linear1["alpha"] = torch.tensor(4.0, dtype=torch.float64)
    final = {"lokr_w1": rand(4, 4), "lokr_w2": rand(2 * D // 4, D // 4, s=0.1)}
    txt = {"lora_down.weight": rand(2, D), "lora_up.weight": rand(3 * D, 2), "diff_b": rand(3 * D)}
    modules = {
        "double_blocks.0.img_attn.qkv": qkv,
        "single_blocks.0.linear1": linear1,
        "final_layer.adaLN_modulation.1": final,
        "double_blocks.0.txt_attn.qkv": txt,
    }
    kohya = spelling == "kohya"
    spell = (lambda m: "lora_unet_" + m.replace(".", "_")) if kohya else (lambda m: f"diffusion_model.{m}")
    sd = {f"{spell(m)}.{k}": t for m, f in modules.items() for k, t in f.items()}
    model = _flux1(device)
    runtime = lorahot.inject(model, "all-linear", max_rank=8, merged=True)
    assert runtime.load(dict(sd)).format == f"flux-{spelling}"

    loha = 0.5 * (qkv["hada_w1_a"] @ qkv["hada_w1_b"]) * (qkv["hada_w2_a"] @ qkv["hada_w2_b"])  # alpha 1 / rank 2
    lokr = 2.0 * torch.kron(linear1["lokr_w1"], linear1["lokr_w2_a"] @ linear1["lokr_w2_b"])  # alpha 4 / rank 2
    adaln = torch.kron(final["lokr_w1"], final["lokr_w2"])  # both whole: scale 1
    lora = txt["lora_up.weight"] @ txt["lora_down.weight"]  # no alpha: alpha = rank
    blocks, single = "transformer_blocks.0.attn.", "single_transformer_blocks.0."
    expected = {  # layer -> (ΔW, Δbias)
        **{f"{blocks}{n}": (loha[j * D : (j + 1) * D], None) for j, n in enumerate(("to_q", "to_k", "to_v"))},
        **{f"{single}attn.{n}": (lokr[j * D : (j + 1) * D], None) for j, n in enumerate(("to_q", "to_k", "to_v"))},
        f"{single}proj_mlp": (lokr[3 * D :], None),
        "norm_out.linear": (torch.cat([adaln[D:], adaln[:D]]), None),
        **{
            f"{blocks}{n}": (lora[j * D : (j + 1) * D], txt["diff_b"][j * D : (j + 1) * D])
            for j, n in enumerate(("add_q_proj", "add_k_proj", "add_v_proj"))
        },
    }
    reference = weights(_flux1(), list(expected))
    for name, (delta, bias) in expected.items():  # each row of the probe's response carries the bias
        shift = torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
        reference[name] = reference[name] + shift + (0.0 if bias is None else bias)
    assert_same(weights(model, list(expected)), reference)

    with pytest.raises(lorahot.AdapterMismatchError, match=r"loads only in merged mode[\s\S]*merged=True"):
        lorahot.inject(_flux1(device), "all-linear", max_rank=8, extras=True).load(dict(sd))
    model = _flux1(device)
    txt_only = {k: t for k, t in sd.items() if "txt_attn" in k}
    lorahot.inject(model, "all-linear", max_rank=8, extras=True).load(txt_only)
    parts = [n for n in expected if n.split(".")[-1].startswith("add_")]
    assert_same(weights(model, parts), {n: reference[n] for n in parts})


@pytest.mark.parametrize("given", ["config=", "adapter_config.json", "metadata"])
def test_a_lora_config_over_lokr_factors_is_refused_and_nothing_changes(given: str, tmp_path) -> None:
    """LoKr factors in the model's names take their scale from their own ``.alpha`` (LyCORIS'
    ``alpha / r``) and their rank from their factors: a LoRA config's ``lora_alpha``/``r``, from
    ``config=``, an adapter_config.json or diffusers' ``lora_adapter_metadata``, was silently
    ignored (outputs equal to the load without it). diffusers cannot build its LoKr config from
    such metadata (TypeError); lorahot refuses each, naming the modules, the fields and where
    they came from, and leaves the runtime bitwise as it was."""
    import json

    from safetensors.torch import save_file

    spelling = "transformer." if given == "metadata" else ""  # diffusers' metadata names the component
    sd = _spelled(_file(True, spelling), spelling)
    fields = {"r": 4, "lora_alpha": 64}
    if given == "metadata":  # diffusers' loader with the same metadata
        fields = {f"transformer.{k}": v for k, v in fields.items()}
        with pytest.raises(TypeError, match="LoKrConfig"):
            _tiny().load_lora_adapter(dict(sd), prefix="transformer", metadata=fields)
    source, config = dict(sd), None
    if given == "config=":
        config = {"lora_alpha": 64}
    else:
        header = {"lora_adapter_metadata": json.dumps(fields)} if given == "metadata" else None
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "adapter_model.safetensors", header)
        if given == "adapter_config.json":
            (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **fields}))
        source = tmp_path
    model = _tiny()
    runtime = lorahot.inject(model, "all-linear", max_rank=8, merged=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    error = lorahot.UsageError if given == "config=" else lorahot.AdapterMismatchError
    where = {"config=": "config=", "adapter_config.json": "adapter_config.json", "metadata": "lora_adapter_metadata"}
    stated = "lora_alpha=64.0" if given == "config=" else "lora_alpha=64.0, r=4"
    with pytest.raises(
        error,
        match=rf"sets a rank or scale for LyCORIS or diff modules[\s\S]*  - {spelling}transformer_blocks\.0\.attn"
        rf"\.to_q: {stated} \(from {where[given]}[\s\S]*Drop those fields",
    ):
        runtime.load(source, config=config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
