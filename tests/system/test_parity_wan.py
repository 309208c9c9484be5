"""lorahot against diffusers' own Wan loader as the oracle: an adapter in the original Wan
names (``diffusion_model.blocks.0.self_attn.q.lora_A.weight``, and the ``.lora_down`` spelling),
on a tiny diffusers ``WanTransformer3DModel`` from config.

diffusers' Wan conversion folds ``.alpha`` into the block modules only (an alpha anywhere else
is an error there), so the test gives alphas to the block modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from tests.diffusion_names import assert_same, diffusers_weights, linears, lorahot_weights, weights
from tests.helpers import assert_norm_deltas_fold

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

D, FFN = 16, 32

#: original module name -> (in, out), and whether it carries an alpha
MODULES = {
    **{f"blocks.0.{a}.{o}": (D, D, True) for a in ("self_attn", "cross_attn") for o in "qkvo"},
    "blocks.0.ffn.0": (D, FFN, True),
    "blocks.0.ffn.2": (FFN, D, True),
    "time_projection.1": (D, 6 * D, False),
    "head.head": (D, 16, False),
    "text_embedding.0": (D, D, False),
    "text_embedding.2": (D, D, False),
    "time_embedding.0": (D, D, False),
    "time_embedding.2": (D, D, False),
}


def wan_file(spelling: tuple[str, str], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (name, (fan_in, fan_out, alpha)) in enumerate(MODULES.items()):
        r = 2 + i % 3
        key = f"diffusion_model.{name}"
        sd[f"{key}.{spelling[0]}.weight"] = torch.randn(r, fan_in, generator=g) * 0.3
        sd[f"{key}.{spelling[1]}.weight"] = torch.randn(fan_out, r, generator=g) * 0.3
        if alpha:
            sd[f"{key}.alpha"] = torch.tensor(float(r) * (0.5 + i % 3))
    return sd


def tiny_wan(**config: object) -> torch.nn.Module:
    """A one-block Wan transformer of width ``D``; ``config`` adds to or overrides its arguments."""
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        **{
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": D // 2,
            "in_channels": 4,
            "out_channels": 4,
            "text_dim": D,
            "freq_dim": D,
            "ffn_dim": FFN,
            "num_layers": 1,
            "rope_max_seq_len": 32,
            **config,
        }
    ).eval()


def wan_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 2, 4, 4, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, D, generator=g),
    }


@pytest.mark.parametrize("head", ["", "model."], ids=["diffusion_model", "model.diffusion_model"])
@pytest.mark.parametrize("spelling", [("lora_A", "lora_B"), ("lora_down", "lora_up")], ids=["lora_A", "lora_down"])
def test_wan_matches_diffusers(spelling: tuple[str, str], head: str, tmp_path: Path) -> None:
    """``model.diffusion_model.`` (ComfyUI's checkpoint prefix, which flux-bfl, HunyuanVideo and
    ComfyUI naming took) read as ComfyUI naming, whose keys for Wan's names match no layer; diffusers
    reads only ``diffusion_model.``, so its oracle loads the file without ``model.``."""
    sd = wan_file(spelling, seed=2)
    path = tmp_path / "wan_lora.safetensors"
    save_file({head + k: v for k, v in sd.items()}, str(path))
    with torch.no_grad():
        oracle = tiny_wan()
        oracle.load_lora_adapter(diffusers.WanPipeline.lora_state_dict(dict(sd)), prefix="transformer")
        expected = oracle(**wan_inputs(), return_dict=False)[0]
        model = tiny_wan()
        base = model(**wan_inputs(), return_dict=False)[0]
        runtime = lorahot.inject(model, "all-linear", max_rank=8)
        runtime.load(path)
        ours = model(**wan_inputs(), return_dict=False)[0]
    assert lorahot.read_adapter(path).format == "wan"
    assert not torch.allclose(expected, base, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


#: an image-to-video model's modules beyond MODULES: original name -> (in, out)
I2V_MODULES = {
    "blocks.0.cross_attn.k_img": (D, D),
    "blocks.0.cross_attn.v_img": (D, D),
    "img_emb.proj.1": (12, 12),
    "img_emb.proj.3": (12, D),
}


def _tiny_wan_i2v() -> torch.nn.Module:
    return tiny_wan(image_dim=12, added_kv_proj_dim=D).double()


@pytest.mark.parametrize("naming", ["wan", "wan-musubi"])
def test_wan_image_to_video_modules_match_diffusers(naming: str) -> None:
    """An image-to-video Wan's own modules (the cross-attention's ``k_img``/``v_img``, the image
    embedder's ``img_emb.proj.1``/``.3``) beside the text-to-video ones, with ``.alpha`` on the
    block modules; musubi-tuner's spelling of the blocks (all of them, as diffusers' musubi
    conversion needs): every layer as diffusers' Wan loader gives it, float64."""
    model = _tiny_wan_i2v()
    modules = {k: v[:2] for k, v in MODULES.items()} | I2V_MODULES
    if naming == "wan-musubi":
        modules = {k: v for k, v in modules.items() if k.startswith("blocks.")}
    g = torch.Generator().manual_seed(23)
    sd = {}
    for i, (name, (fan_in, fan_out)) in enumerate(modules.items()):
        r = 2 + i % 3
        key = "lora_unet_" + name.replace(".", "_") if naming == "wan-musubi" else f"diffusion_model.{name}"
        down, up = "lora_down", "lora_up"
        sd[f"{key}.{down}.weight"] = torch.randn(r, fan_in, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.{up}.weight"] = torch.randn(fan_out, r, generator=g, dtype=torch.float64) * 0.3
        if name.startswith("blocks."):
            sd[f"{key}.alpha"] = torch.tensor(r * (0.5 + i % 3), dtype=torch.float64)
    names = linears(model, lambda n: "attn" in n or "ffn" in n or "embedder" in n or n == "proj_out")
    ours, fmt = lorahot_weights(_tiny_wan_i2v, sd, names)
    assert fmt == naming
    theirs = diffusers_weights(_tiny_wan_i2v, diffusers.WanPipeline, sd, names)
    changed = [n for n, w in weights(_tiny_wan_i2v(), names).items() if not torch.equal(theirs[n], w)]
    assert {"blocks.0.attn2.add_k_proj", "blocks.0.attn2.add_v_proj"} <= set(changed)
    assert ("condition_embedder.image_embedder.ff.net.2" in changed) == (naming == "wan")
    assert_same(ours, theirs)


def test_wan_musubi_matches_diffusers(tmp_path: Path) -> None:
    """musubi-tuner's kohya spelling; diffusers' musubi conversion wants q, k, v, o of both
    attentions and both FFN layers of every block, each with an alpha."""
    g = torch.Generator().manual_seed(4)
    sd = {}
    for i, (name, (fan_in, fan_out, _)) in enumerate(MODULES.items()):
        if not name.startswith("blocks."):
            continue
        r, key = 2 + i % 3, "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(r, fan_in, generator=g) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn(fan_out, r, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(float(r) * (0.5 + i % 3))
    path = tmp_path / "wan_musubi.safetensors"
    save_file(sd, str(path))
    with torch.no_grad():
        oracle = tiny_wan()
        oracle.load_lora_adapter(diffusers.WanPipeline.lora_state_dict(dict(sd)), prefix="transformer")
        expected = oracle(**wan_inputs(), return_dict=False)[0]
        model = tiny_wan()
        runtime = lorahot.inject(model, "all-linear", max_rank=8)
        runtime.load(path)
        ours = model(**wan_inputs(), return_dict=False)[0]
    assert lorahot.read_adapter(path).format == "wan-musubi"
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("head", "infix"),
    [("", ".default"), ("pipe.dit.", ".default"), ("", ""), ("transformer.", ""), ("net.", "")],
    ids=["bare", "pipe.dit", "no-default", "transformer", "net"],
)
def test_wan_diffsynth_files_match_diffusers_on_their_diffusion_model_twin(head: str, infix: str) -> None:
    """DiffSynth-Studio saves its Wan LoRAs in the original names with no prefix (some under
    ``pipe.dit.``) and PEFT's adapter name, ``blocks.0.self_attn.q.lora_A.default.weight``, with no
    ``.alpha`` (alpha = rank); ComfyUI's Wan loaders read them as the same names under
    ``diffusion_model.``. Every layer's weight as diffusers' Wan loader gives it for that twin,
    float64. These files were refused ('matches no injected layer': read as PEFT names); so were
    musubi-tuner's (``--diffusers_prefix transformer``: ``transformer.`` + the original names, read as
    diffusers naming) and the same names under ``net.``, the other prefix trainers write."""
    twin = {k: v.double() for k, v in wan_file(("lora_A", "lora_B"), seed=6).items() if not k.endswith(".alpha")}
    sd = {
        head
        + k.removeprefix("diffusion_model.")
        .replace(".lora_A.", f".lora_A{infix}.")
        .replace(".lora_B.", f".lora_B{infix}."): v
        for k, v in twin.items()
    }
    make = lambda: tiny_wan().double()  # noqa: E731
    names = linears(make())
    ours, naming = lorahot_weights(make, sd, names)
    assert naming == "wan"
    assert_same(ours, diffusers_weights(make, diffusers.WanPipeline, twin, names))


@pytest.mark.parametrize("mode", [{"extras": True}, {"merged": True}], ids=["extras", "merged"])
def test_wan_diff_b_is_a_bias_at_the_adapter_weight_as_diffusers_applies_it(mode: dict, tmp_path: Path) -> None:
    """CausVid / lightx2v files carry ``.diff_b`` beside the LoRA of each module: diffusers loads
    it as ``lora_B.bias`` of A and B it pre-scales by ``alpha / r``, so the bias moves the output
    by ``weight * diff_b`` whatever the alpha. lorahot refused these files in every mode."""
    sd = wan_file(("lora_down", "lora_up"), seed=5)
    g = torch.Generator().manual_seed(6)
    for name, (_, fan_out, _) in MODULES.items():
        if name.startswith("blocks."):
            sd[f"diffusion_model.{name}.diff_b"] = torch.randn(fan_out, generator=g) * 0.3
    path = tmp_path / "wan_diff_b.safetensors"
    save_file(sd, str(path))
    with torch.no_grad():
        oracle = tiny_wan()
        oracle.load_lora_adapter(
            diffusers.WanPipeline.lora_state_dict(dict(sd)), prefix="transformer", adapter_name="a"
        )
        expected = oracle(**wan_inputs(), return_dict=False)[0]
        oracle.set_adapters(["a"], weights=[0.5])
        halved = oracle(**wan_inputs(), return_dict=False)[0]
        model = tiny_wan()
        runtime = lorahot.inject(model, "all-linear", max_rank=8, **mode)
        runtime.load(path)
        ours = model(**wan_inputs(), return_dict=False)[0]
        runtime.set_scale(0.5)
        ours_halved = model(**wan_inputs(), return_dict=False)[0]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_halved, halved, rtol=1e-4, atol=1e-5)


def _diff_b_file(seed: int) -> dict[str, torch.Tensor]:
    """A CausVid / lightx2v-style file in float64: a LoRA with a ``.diff_b`` beside it on every block module."""
    sd = wan_file(("lora_down", "lora_up"), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, (_, fan_out, _) in MODULES.items():
        if name.startswith("blocks."):
            sd[f"diffusion_model.{name}.diff_b"] = torch.randn(fan_out, generator=g) * 0.3
    return {k: v.double() for k, v in sd.items()}


def test_a_stack_of_two_wan_files_with_diff_b_adds_both_biases_as_diffusers(tmp_path: Path) -> None:
    """Two files that each carry a ``.diff_b`` beside their LoRAs, stacked (as ComfyUI users stack a
    CausVid LoRA with a style LoRA; ComfyUI adds every patch's bias): merged, the output is diffusers'
    with both adapters active at each part's weight, float64, at [1, 0.5], after set_scale([0.7, -1])
    and at [0, 1]; unload puts every weight and bias back bitwise. Unmerged the same, each layer's two
    biases summed at the weights (refused before: 'an unmerged layer holds one'). Merged mode refused
    these stacks ('a layer holds one')."""
    files = [_diff_b_file(seed) for seed in (5, 9)]
    paths = [tmp_path / f"wan_diff_b_{k}.safetensors" for k in range(2)]
    for sd, path in zip(files, paths):
        save_file(sd, str(path))
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in wan_inputs().items()}
    with torch.no_grad():
        oracle = tiny_wan().double()
        for k, sd in enumerate(files):
            state = diffusers.WanPipeline.lora_state_dict(dict(sd))
            oracle.load_lora_adapter(state, prefix="transformer", adapter_name=f"part{k}")
        for options in ({"merged": True}, {"extras": True}):
            model = tiny_wan().double()
            base = {k: v.clone() for k, v in model.state_dict().items()}
            runtime = lorahot.inject(model, "all-linear", max_rank=16, **options)
            runtime.load(paths, scale=[1.0, 0.5])
            for weights in ([1.0, 0.5], [0.7, -1.0], [0.0, 1.0]):
                runtime.set_scale(weights)
                oracle.set_adapters(["part0", "part1"], weights=weights)
                expected = oracle(**inputs, return_dict=False)[0]
                torch.testing.assert_close(model(**inputs, return_dict=False)[0], expected, rtol=1e-12, atol=1e-12)
            if options.get("merged"):
                runtime.unload()
                assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())


def test_wan_diff_b_without_extras_names_the_flag(tmp_path: Path) -> None:
    sd = wan_file(("lora_A", "lora_B"), seed=7)
    sd["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.randn(D)
    model = tiny_wan()
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    with pytest.raises(lorahot.LoraError, match="extras=True"):
        runtime.load(sd)


def _lightx2v_file(seed: int) -> dict[str, torch.Tensor]:
    """A lightx2v-style distill file: LoRA and ``.diff_b`` on the blocks, the head as a full
    ``.diff`` with its ``.diff_b``, an embedder's ``.diff_b`` alone, and the zero deltas of
    normalization layers and of the block's modulation (``diff_m``) these files also carry."""
    sd = wan_file(("lora_down", "lora_up"), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, (_, fan_out, _) in MODULES.items():
        if name.startswith("blocks."):
            sd[f"diffusion_model.{name}.diff_b"] = torch.randn(fan_out, generator=g) * 0.3
    for key in [k for k in sd if k.startswith(("diffusion_model.head.head.", "diffusion_model.time_projection."))]:
        del sd[key]
    sd["diffusion_model.head.head.diff"] = torch.randn(16, D, generator=g) * 0.3
    sd["diffusion_model.head.head.diff_b"] = torch.randn(16, generator=g) * 0.3
    sd["diffusion_model.time_projection.1.diff_b"] = torch.randn(6 * D, generator=g) * 0.3
    sd["diffusion_model.blocks.0.norm3.diff"] = torch.zeros(D)
    sd["diffusion_model.blocks.0.norm3.diff_b"] = torch.zeros(D)
    sd["diffusion_model.blocks.0.self_attn.norm_q.diff"] = torch.zeros(D)
    sd["diffusion_model.blocks.0.diff_m"] = torch.zeros(1, 6, D)
    return sd


def test_wan_lightx2v_diffs_load_in_merged_mode_as_diffusers_applies_them() -> None:
    """lightx2v's distill files add full ``.diff`` deltas (the head, which diffusers loads as a
    LoRA of B = I) and zero deltas of norms and modulations (which diffusers drops) to a LoRA
    with ``.diff_b``: lorahot refused them in every mode (a ``diff_m`` key even read the file as
    ComfyUI naming). The head's diff now folds in merged mode; the modulation delta is refused by
    name, the norms' deltas as landing on no injected layer, and both are skipped with
    ``strict=False``; with the norms among the targets (``plan_targets``) their zeros fold and the
    output is the same. diffusers drops the lone ``.diff_b`` of ``time_projection`` (its weight
    carries no LoRA; ComfyUI applies it, as lorahot does), so the oracle adds it to that layer's
    bias itself."""
    sd = _lightx2v_file(seed=8)
    lone = sd["diffusion_model.time_projection.1.diff_b"]
    with torch.no_grad():
        oracle = tiny_wan()
        mine = {k: v.clone() for k, v in sd.items()}  # diffusers scales cross-attention A and B in place
        oracle.load_lora_adapter(diffusers.WanPipeline.lora_state_dict(mine), prefix="transformer", adapter_name="a")
        oracle.condition_embedder.time_proj.bias += lone
        expected = oracle(**wan_inputs(), return_dict=False)[0]
        oracle.set_adapters(["a"], weights=[0.5])
        oracle.condition_embedder.time_proj.bias -= lone / 2
        halved = oracle(**wan_inputs(), return_dict=False)[0]
        model = tiny_wan()
        runtime = lorahot.inject(model, "all-linear", max_rank=8, merged=True)
        with pytest.raises(lorahot.LoraError, match=r"diff_m: a delta of a block's modulation.*strict=False"):
            runtime.load(sd)
        info = runtime.load(sd, strict=False)
        ours = model(**wan_inputs(), return_dict=False)[0]
        runtime.set_scale(0.5)
        ours_halved = model(**wan_inputs(), return_dict=False)[0]
        with_norms = tiny_wan()
        plan = lorahot.plan_targets(sd, with_norms, strict=False)
        assert {"blocks.0.norm2", "blocks.0.attn1.norm_q"} <= set(plan.targets)
        normed = lorahot.inject(with_norms, plan.targets, **plan.inject_options()).load(sd, strict=False)
        ours_normed = with_norms(**wan_inputs(), return_dict=False)[0]
    assert info.format == normed.format == "wan"
    assert sorted(info.skipped) == sorted(k for k in sd if ".norm" in k or k.endswith(".diff_m"))
    assert normed.skipped == ("diffusion_model.blocks.0.diff_m",)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_halved, halved, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_normed, expected, rtol=1e-4, atol=1e-5)


def test_wan_full_diff_unmerged_names_merged_mode() -> None:
    sd = _lightx2v_file(seed=9)
    runtime = lorahot.inject(tiny_wan(), "all-linear", max_rank=8, extras=True)
    with pytest.raises(lorahot.LoraError, match=r"(?s)proj_out \(diff: diffusion_model\.head\.head\.diff.*merged=True"):
        runtime.load(sd, strict=False)


def _lora_and_diff_file(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A Wan file whose block modules carry a LoRA and a ``.diff_b``, two of them a ``.diff`` too;
    and those diffs by diffusers layer name (``diff``, ``diff_b``)."""
    sd = wan_file(("lora_down", "lora_up"), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, (_, fan_out, _) in MODULES.items():
        if name.startswith("blocks."):
            sd[f"diffusion_model.{name}.diff_b"] = torch.randn(fan_out, generator=g) * 0.3
    diffs = {}
    for name, layer in (("blocks.0.self_attn.q", "blocks.0.attn1.to_q"), ("blocks.0.ffn.0", "blocks.0.ffn.net.0.proj")):
        fan_in, fan_out, _ = MODULES[name]
        sd[f"diffusion_model.{name}.diff"] = torch.randn(fan_out, fan_in, generator=g) * 0.3
        diffs[layer] = (sd[f"diffusion_model.{name}.diff"], sd[f"diffusion_model.{name}.diff_b"])
    return sd, diffs


def test_wan_lora_and_diff_on_one_module_fold_both_in_merged_mode() -> None:
    """A module with a LoRA and a ``.diff`` was refused as mixing kinds; ComfyUI applies both,
    ``W + s * (diff + alpha / r * B @ A)`` and ``b + s * diff_b``. The float64 reference: the same
    file without the diffs (its LoRA and ``.diff_b`` checked against diffusers above), then each
    diff and its ``diff_b`` added by hand; at scale 0.5 every update halves."""
    sd, diffs = _lora_and_diff_file(seed=20)
    with torch.no_grad():
        reference = tiny_wan().double()
        lorahot.inject(reference, "all-linear", max_rank=8, merged=True).load(
            {k: v for k, v in sd.items() if not k.endswith(".diff")}
        )
        model = tiny_wan().double()
        base = {k: v.clone() for k, v in model.state_dict().items()}
        for layer, (diff, diff_b) in diffs.items():  # the diff's bias exactly (the LoRA bias path rounds it)
            reference.get_submodule(layer).weight += diff.double()
            reference.get_submodule(layer).bias.copy_(base[f"{layer}.bias"] + diff_b.double())
        runtime = lorahot.inject(model, "all-linear", max_rank=8, merged=True)
        info = runtime.load(sd)
        full = {k: v.clone() for k, v in model.state_dict().items()}
        runtime.set_scale(0.5)
        halved = model.state_dict()
    assert info.format == "wan"
    expected = reference.state_dict()
    for layer in diffs:
        assert not torch.equal(full[f"{layer}.weight"], base[f"{layer}.weight"])
    for key, value in expected.items():
        torch.testing.assert_close(full[key], value, rtol=1e-12, atol=1e-12, msg=key)
        torch.testing.assert_close(halved[key], (base[key] + full[key]) / 2, rtol=1e-12, atol=1e-12, msg=key)


def test_a_diff_with_a_lora_reports_the_loras_rank() -> None:
    """A module with a LoRA and a ``.diff`` reported rank 0 (``load``'s info, ``runtime.info()``,
    ``lorahot inspect``, whose alpha column then read 0 for a LoRA without ``.alpha``): it has
    its LoRA pair's rank, as the same file without the diffs reports; the diff's factor on its
    ``ΔW`` stays 1 (the pair's ``alpha / r`` is inside it)."""
    from lorahot.cli import summarize

    sd, diffs = _lora_and_diff_file(seed=24)
    without = {k: v for k, v in sd.items() if not k.endswith(".diff")}
    runtime = lorahot.inject(tiny_wan(), "all-linear", max_rank=8, merged=True)
    expected = runtime.load(without).ranks
    info = runtime.load(sd)
    assert set(diffs) <= set(info.ranks) and info.ranks == expected == runtime.info().ranks
    del sd["diffusion_model.blocks.0.ffn.0.alpha"]  # alpha = r without one, as for the LoRA alone
    rows = {r["module"]: r for r in summarize(lorahot.read_adapter(sd))["table"]}
    q, ffn = rows["diffusion_model.blocks.0.self_attn.q"], rows["diffusion_model.blocks.0.ffn.0"]
    assert (q["kind"], q["rank"], q["alpha"], q["scale"]) == ("diff", 2, 1.0, 1.0)
    assert (ffn["kind"], ffn["rank"], ffn["alpha"], ffn["scale"]) == ("diff", 4, 4.0, 1.0)


def test_wan_lora_and_diff_unmerged_names_merged_mode_and_the_keys() -> None:
    sd, _ = _lora_and_diff_file(seed=21)
    model = tiny_wan()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = lorahot.inject(model, "all-linear", max_rank=8, extras=True)
    with pytest.raises(
        lorahot.LoraError,
        match=r"(?s)blocks\.0\.attn1\.to_q \(diff: .*q\.lora_down\.weight.*self_attn\.q\.diff\b.*merged=True",
    ):
        runtime.load(sd)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "lora" not in k)


@pytest.mark.parametrize(
    ("key", "shape", "why"),
    [
        ("blocks.0.self_attn.q.diff", (D, D + 1), r"makes a \[16, 16\] update where .*q\.diff has shape \(16, 17\)"),
        ("blocks.0.self_attn.q.lora_up.weight", (D, 5), r"not the two factors of one rank"),
    ],
)
def test_wan_lora_and_diff_that_disagree_are_refused_by_module(key: str, shape: tuple, why: str) -> None:
    sd, _ = _lora_and_diff_file(seed=22)
    sd[f"diffusion_model.{key}"] = torch.randn(shape)
    with pytest.raises(lorahot.LoraError, match=rf"(?s)diffusion_model\.blocks\.0\.self_attn\.q \(.*{why}"):
        lorahot.read_adapter(sd)


def test_wan_alphas_outside_the_blocks_apply_as_in_the_blocks(tmp_path: Path) -> None:
    """diffusers' Wan conversion reads ``.alpha`` in the blocks only and refuses a file with one
    anywhere else (``head.head.alpha`` is left over: ``state_dict should be empty``). lorahot
    applies every module's ``alpha / r``; the oracle is diffusers on the same file with those
    alphas folded into B."""
    sd = wan_file(("lora_A", "lora_B"), seed=23)
    folded = dict(sd)
    for i, (name, (_, _, in_blocks)) in enumerate(MODULES.items()):
        if not in_blocks:
            b = sd[f"diffusion_model.{name}.lora_B.weight"]
            alpha = float(b.shape[1]) * (0.25 + i % 3)
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
            folded[f"diffusion_model.{name}.lora_B.weight"] = b * (alpha / b.shape[1])
    path = tmp_path / "wan_alphas.safetensors"
    save_file(sd, str(path))
    with torch.no_grad():
        oracle = tiny_wan()
        oracle.load_lora_adapter(diffusers.WanPipeline.lora_state_dict(folded), prefix="transformer")
        expected = oracle(**wan_inputs(), return_dict=False)[0]
        model = tiny_wan()
        runtime = lorahot.inject(model, "all-linear", max_rank=8)
        runtime.load(path)
        ours = model(**wan_inputs(), return_dict=False)[0]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def _loha(key: str, fan_in: int, fan_out: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {"hada_w1_a": (fan_out, 2), "hada_w1_b": (2, fan_in), "hada_w2_a": (fan_out, 2), "hada_w2_b": (2, fan_in)}
    sd = {f"{key}.{f}": torch.randn(*s, generator=g, dtype=torch.float64) * 0.3 for f, s in shapes.items()}
    return sd | {f"{key}.alpha": torch.tensor(3.0, dtype=torch.float64)}


@pytest.mark.parametrize("naming", ["wan", "wan-musubi"])
def test_wan_lycoris_in_the_original_names_merges_as_in_comfyui_naming(naming: str) -> None:
    """LoHa modules in Wan's original names (``diffusion_model.blocks.0.self_attn.q.hada_w1_a``, or
    musubi's ``lora_unet_blocks_0_self_attn_q``) were refused as 'LyCORIS ... in kohya or ComfyUI
    naming' where the same factors under diffusers' names (ComfyUI naming) loaded: they merge as
    LyCORIS computes them, ``alpha / r * (w1_a @ w1_b) * (w2_a @ w2_b)``, float64."""
    g = torch.Generator().manual_seed(9)
    modules = {
        "blocks.0.self_attn.q": ("blocks.0.attn1.to_q", D, D),
        "blocks.0.ffn.0": ("blocks.0.ffn.net.0.proj", D, FFN),
    }
    sd: dict[str, torch.Tensor] = {}
    for name, (_, fan_in, fan_out) in modules.items():
        key = f"diffusion_model.{name}" if naming == "wan" else "lora_unet_" + name.replace(".", "_")
        sd |= _loha(key, fan_in, fan_out, g)
    model = tiny_wan().double()
    base = {layer: model.get_submodule(layer).weight.detach().clone() for layer, _, _ in modules.values()}
    info = lorahot.inject(model, "all-linear", max_rank=8, merged=True).load(dict(sd))
    assert info.format == naming
    for name, (layer, _, _) in modules.items():
        key = f"diffusion_model.{name}" if naming == "wan" else "lora_unet_" + name.replace(".", "_")
        w1 = sd[f"{key}.hada_w1_a"] @ sd[f"{key}.hada_w1_b"]
        w2 = sd[f"{key}.hada_w2_a"] @ sd[f"{key}.hada_w2_b"]
        want = base[layer] + 3.0 / 2 * w1 * w2
        torch.testing.assert_close(model.get_submodule(layer).weight, want, rtol=1e-12, atol=1e-12, msg=layer)


def _tiny_vace() -> torch.nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.WanVACETransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=D // 2,
            in_channels=4,
            out_channels=4,
            text_dim=D,
            freq_dim=D,
            ffn_dim=FFN,
            num_layers=2,
            vace_layers=[0],
            vace_in_channels=8,
        )
        .double()
        .eval()
    )


#: a VACE block's modules in the original names -> diffusers' (as its Wan checkpoint conversion renames them)
_VACE_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.k": "attn2.to_k",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    "before_proj": "proj_in",
    "after_proj": "proj_out",
}


@pytest.mark.parametrize("naming", ["wan", "wan-musubi"])
def test_wan_vace_blocks_land_on_diffusers_vace_layers(naming: str) -> None:
    """A Wan VACE LoRA (ComfyUI's and musubi-tuner's spellings of the original names) adapts the
    ``vace_blocks`` too, whose ``before_proj``/``after_proj`` diffusers' checkpoint conversion
    renames ``proj_in``/``proj_out``: each layer of both block kinds as the float64 reference of
    those names gives it. ``before_proj``/``after_proj`` matched no layer (and a file of VACE
    blocks alone was no Wan file); diffusers' Wan LoRA conversion refuses ``vace_blocks`` keys."""
    model = _tiny_vace()
    g = torch.Generator().manual_seed(8)
    places = {f"{b}.0.{o}": f"{b}.0.{t}" for b in ("blocks", "vace_blocks") for o, t in _VACE_BLOCK.items()}
    places = {o: t for o, t in places.items() if not o.startswith("blocks.0.") or "_proj" not in o}
    factors = {}
    for i, (original, layer) in enumerate(places.items()):
        linear = model.get_submodule(layer)
        r = 2 + i % 3
        a = torch.randn(r, linear.in_features, generator=g, dtype=torch.float64) * 0.3
        factors[original] = (a, torch.randn(linear.out_features, r, generator=g, dtype=torch.float64) * 0.3, 1.5 * r)
    spell = (lambda m: f"diffusion_model.{m}") if naming == "wan" else (lambda m: "lora_unet_" + m.replace(".", "_"))
    down, up = ("lora_A", "lora_B") if naming == "wan" else ("lora_down", "lora_up")
    sd = {}
    for original, (a, b, alpha) in factors.items():
        key = spell(original)
        sd |= {f"{key}.{down}.weight": a, f"{key}.{up}.weight": b, f"{key}.alpha": torch.tensor(alpha)}
    names = list(places.values())
    reference = weights(_tiny_vace(), names)
    for original, (a, b, alpha) in factors.items():
        delta = alpha / a.shape[0] * b @ a
        reference[places[original]] += torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
    ours, fmt = lorahot_weights(_tiny_vace, sd, names)
    assert fmt == naming
    assert_same(ours, reference)
    vace_only = {k: v for k, v in sd.items() if "vace_blocks" in k}
    assert lorahot.read_adapter(vace_only).format == naming
    projections = {k: v for k, v in vace_only.items() if "before_proj" in k or "after_proj" in k}
    assert len(projections) == 6, projections.keys()  # before_proj and after_proj alone: a Wan VACE file too
    names = ["vace_blocks.0.proj_in", "vace_blocks.0.proj_out"]
    ours, fmt = lorahot_weights(_tiny_vace, projections, names)
    assert fmt == naming
    assert_same(ours, {n: reference[n] for n in names})
    with pytest.raises(  # on a Wan model without VACE blocks: the refusal names the VACE layer
        lorahot.AdapterMismatchError,
        match=rf"before_proj: matches no injected layer.*; the {naming} naming places it at vace_blocks\.0\.proj_in, ",
    ):
        lorahot_weights(tiny_wan, projections, names)


def _wan22() -> Any:
    """A tiny Wan 2.2 pipeline in float64: two transformers of one config (their weights apart)
    and a tiny UMT5 text encoder; no VAE, tokenizer or scheduler (nothing here runs them)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.UMT5Config(vocab_size=32, d_model=D, d_kv=8, d_ff=FFN, num_layers=1, num_heads=2)
    encoder = transformers.UMT5EncoderModel(config).double().eval()
    high, low = tiny_wan().double(), tiny_wan().double()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in low.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return diffusers.WanPipeline(
        tokenizer=None, text_encoder=encoder, vae=None, scheduler=None, transformer=high, transformer_2=low,
        boundary_ratio=0.875,
    )  # fmt: skip


def test_wan22_low_noise_file_goes_to_transformer_2_as_diffusers_load_into_transformer_2(tmp_path: Path) -> None:
    """Wan 2.2 LoRAs come as a high-noise and a low-noise file, both in the plain Wan naming;
    diffusers loads the second with ``load_lora_weights(..., load_into_transformer_2=True)``.
    ``denoiser="transformer_2"`` does the same: every layer of both transformers as diffusers
    leaves it, float64, alone or stacked with the high-noise file in one slot; the component a
    file does not go to (and the text encoder) stays bitwise its base."""
    high = {k: v.double() for k, v in wan_file(("lora_A", "lora_B"), seed=7).items()}
    low = {k: v.double() for k, v in wan_file(("lora_down", "lora_up"), seed=8).items()}
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("high", "low")}
    save_file(high, str(paths["high"]))
    save_file(low, str(paths["low"]))
    ids = torch.tensor([[1, 5, 7, 2]])
    base, oracle, pipe = _wan22(), _wan22(), _wan22()
    oracle.load_lora_weights({k: v.clone() for k, v in high.items()}, adapter_name="high")
    oracle.load_lora_weights({k: v.clone() for k, v in low.items()}, adapter_name="low", load_into_transformer_2=True)
    names = linears(tiny_wan())
    expected = {c: weights(getattr(oracle, c), names) for c in ("transformer", "transformer_2")}
    unchanged = {c: weights(getattr(base, c), names) for c in ("transformer", "transformer_2")}
    with torch.no_grad():
        encoded = base.text_encoder(ids).last_hidden_state
    runtime = lorahot.inject(pipe, "all-linear", max_rank=8)
    info = runtime.load(paths["low"], denoiser="transformer_2")
    assert info.components["transformer"] == 0 and info.components["transformer_2"] == len(names)
    assert_same(weights(pipe.transformer_2, names), expected["transformer_2"])
    ours = weights(pipe.transformer, names)
    assert all(torch.equal(ours[n], unchanged["transformer"][n]) for n in names)
    assert not torch.equal(unchanged["transformer_2"][names[0]], expected["transformer_2"][names[0]])
    runtime.load([paths["high"], paths["low"]], denoiser=[None, "transformer_2"])
    for c in ("transformer", "transformer_2"):
        assert_same(weights(getattr(pipe, c), names), expected[c])
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids).last_hidden_state, encoded)


@pytest.mark.parametrize("names", ["original", "diffusers"])
def test_wan22_file_of_both_transformers_goes_to_each_as_diffusers_loads_the_two_files(names: str) -> None:
    """ai-toolkit saves a Wan 2.2 LoRA of both transformers as one file, ``transformer_1.`` (high
    noise) and ``transformer_2.`` (low noise) in front of each half's names. Such a file was refused
    (``transformer_1.`` named no component; read as PEFT names, the halves matched no layer): on a
    pipeline runtime each half now goes to its transformer, every layer of both as diffusers leaves
    them after loading the two halves as separate files (the second with
    ``load_into_transformer_2=True``), float64; the text encoder stays bitwise its base. A runtime
    without a ``transformer_2`` refuses the low-noise half, naming it, rather than loading it into
    its one transformer."""
    high = {k: v.double() for k, v in wan_file(("lora_A", "lora_B"), seed=7).items() if not k.endswith(".alpha")}
    low = {k: v.double() for k, v in wan_file(("lora_A", "lora_B"), seed=8).items() if not k.endswith(".alpha")}
    oracle = _wan22()
    oracle.load_lora_weights({k: v.clone() for k, v in high.items()}, adapter_name="high")
    oracle.load_lora_weights({k: v.clone() for k, v in low.items()}, adapter_name="low", load_into_transformer_2=True)
    model_names = linears(tiny_wan())
    expected = {c: weights(getattr(oracle, c), model_names) for c in ("transformer", "transformer_2")}
    if names == "diffusers":  # the names diffusers' Wan loader gives the same modules
        state = diffusers.WanPipeline.lora_state_dict
        high = {k.removeprefix("transformer."): v for k, v in state({k: v.clone() for k, v in high.items()}).items()}
        low = {k.removeprefix("transformer."): v for k, v in state({k: v.clone() for k, v in low.items()}).items()}
    strip = "diffusion_model."
    sd = {f"transformer_1.{k.removeprefix(strip)}": v for k, v in high.items()}
    sd |= {f"transformer_2.{k.removeprefix(strip)}": v for k, v in low.items()}
    pipe = _wan22()
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        encoded = pipe.text_encoder(ids).last_hidden_state
    info = lorahot.inject(pipe, "all-linear", max_rank=8).load(sd)
    assert info.format == ("wan" if names == "original" else "peft")
    assert info.components["transformer"] == info.components["transformer_2"] == len(model_names)
    for c in ("transformer", "transformer_2"):
        assert_same(weights(getattr(pipe, c), model_names), expected[c])
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids).last_hidden_state, encoded)
    one = {"transformer": tiny_wan().double()}  # a runtime without the low-noise transformer
    before = weights(one["transformer"], model_names)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"prefix 'transformer_2\.' .* go to transformer_2, which was"
    ):
        lorahot.inject(one, "all-linear", max_rank=8).load(sd)
    assert all(torch.equal(v, before[n]) for n, v in weights(one["transformer"], model_names).items())


def tiny_wan_i2v() -> torch.nn.Module:
    """:func:`tiny_wan` with Wan 2.1 I2V's image inputs: the image embedder's LayerNorms and the
    cross-attention's ``norm_added_k`` (Wan's ``img_emb.proj.0``/``.4``, ``cross_attn.norm_k_img``)."""
    return tiny_wan(image_dim=12, added_kv_proj_dim=D)


#: Wan's norms with a weight -> (diffusers' norm, size, has a bias), as diffusers' Wan conversion renames them
WAN_NORMS = {
    "blocks.0.norm3": ("blocks.0.norm2", D, True),
    "blocks.0.self_attn.norm_q": ("blocks.0.attn1.norm_q", D, False),
    "blocks.0.self_attn.norm_k": ("blocks.0.attn1.norm_k", D, False),
    "blocks.0.cross_attn.norm_q": ("blocks.0.attn2.norm_q", D, False),
    "blocks.0.cross_attn.norm_k": ("blocks.0.attn2.norm_k", D, False),
    "blocks.0.cross_attn.norm_k_img": ("blocks.0.attn2.norm_added_k", D, False),
    "img_emb.proj.0": ("condition_embedder.image_embedder.norm1", 12, True),
    "img_emb.proj.4": ("condition_embedder.image_embedder.norm2", D, True),
}


@pytest.mark.parametrize("naming", ["wan", "wan-musubi"])
def test_wan_norm_deltas_fold_into_diffusers_norms_in_merged_mode(naming: str) -> None:
    """ComfyUI's LoRA extraction writes a ``.diff`` (and ``.diff_b``) for every norm with a weight,
    which ComfyUI adds to that norm; the Wan namings refused them by name (``norm3.diff``), as they
    placed no norm on diffusers' model, and Wan's ``blocks.N.norm3`` is diffusers' ``norm2`` (its
    ``norm3`` is the weightless feed-forward norm, which hid the alias). Now ``plan_targets`` lists
    diffusers' norms and the file folds: float64 ``W + s alpha / r B A`` and ``w + s diff``,
    ``b + s diff_b`` at scales 1 and 0.5. The deltas of Wan's weightless norms (a block's
    ``norm1``/``norm2``: its ``norm2`` would name diffusers' cross-attention norm) are refused by
    name, nothing changed."""
    g = torch.Generator().manual_seed(30)

    def key(name: str) -> str:
        return f"lora_unet_{name.replace('.', '_')}" if naming == "wan-musubi" else f"diffusion_model.{name}"

    sd: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        model = tiny_wan_i2v().double()
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        for name, layer in (
            ("blocks.0.self_attn.q", "blocks.0.attn1.to_q"),
            ("time_projection.1", "condition_embedder.time_proj"),
        ):
            fan_out, fan_in = model.get_submodule(layer).weight.shape
            a = torch.randn(2, fan_in, generator=g, dtype=torch.float64) * 0.3
            b = torch.randn(fan_out, 2, generator=g, dtype=torch.float64) * 0.3
            sd |= {
                f"{key(name)}.lora_down.weight": a,
                f"{key(name)}.lora_up.weight": b,
                f"{key(name)}.alpha": torch.tensor(3.0),
            }
            expected[f"{layer}.weight"] = 1.5 * b @ a
        for name, (norm, size, bias) in WAN_NORMS.items():
            assert model.get_submodule(norm).weight.shape == (size,)
            sd[f"{key(name)}.diff"] = torch.randn(size, generator=g, dtype=torch.float64) * 0.1
            expected[f"{norm}.weight"] = sd[f"{key(name)}.diff"]
            if bias:
                sd[f"{key(name)}.diff_b"] = torch.randn(size, generator=g, dtype=torch.float64) * 0.1
                expected[f"{norm}.bias"] = sd[f"{key(name)}.diff_b"]
        runtime = assert_norm_deltas_fold(model, sd, {n for n, _, _ in WAN_NORMS.values()}, naming, pristine, expected)

        before = {k: v.clone() for k, v in model.state_dict().items()}
        for weightless in ("blocks.0.norm1", "blocks.0.norm2"):
            hostile = dict(sd) | {f"{key(weightless)}.diff": torch.zeros(D, dtype=torch.float64)}
            with pytest.raises(lorahot.UnknownFormatError, match=r"no weight or bias in Wan.*strict=False"):
                runtime.load(hostile)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("naming", ["wan", "wan-musubi"])
def test_a_norm_delta_whose_alias_is_not_injected_is_not_taken_for_diffusers_weightless_norm(naming: str) -> None:
    """Wan's ``blocks.0.norm3`` is diffusers' ``norm2``, and diffusers' own ``norm3`` has no
    weight: with ``norm2`` not injected, its delta is told to add that norm to targets, never
    refused as a delta of a weightless norm (which a key naming only such a norm is)."""
    model = tiny_wan_i2v().double()
    runtime = lorahot.inject(model, ["to_q"], max_rank=4, merged=True)
    stem = "lora_unet_blocks_0_norm3" if naming == "wan-musubi" else "diffusion_model.blocks.0.norm3"
    head = "lora_unet_blocks_0_self_attn_q" if naming == "wan-musubi" else "diffusion_model.blocks.0.self_attn.q"
    sd = {
        f"{head}.lora_down.weight": torch.zeros(2, D, dtype=torch.float64),
        f"{head}.lora_up.weight": torch.zeros(D, 2, dtype=torch.float64),
        f"{stem}.diff": torch.zeros(D, dtype=torch.float64),
    }
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"norm3: matches no injected layer.* add that norm to targets"
    ):
        runtime.load(sd)


def _tiny_wan_animate_2() -> torch.nn.Module:
    """A two-block diffusers ``WanAnimate2Transformer3DModel``, float64: its own module names are
    Wan's original ones (``text_embedding.0``, ``blocks.N.ffn.0``, ``head.head``), which the
    ``wan`` naming aliases to ``WanTransformer3DModel``'s, but for its attention's (``to_q``)."""
    torch.manual_seed(0)
    return diffusers.WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2),
        in_dim=4,
        dim=D,
        ffn_dim=FFN,
        freq_dim=D,
        text_dim=D,
        out_dim=4,
        num_heads=2,
        num_layers=2,
        use_img_emb=False,
    ).double()


@pytest.mark.parametrize("which", ["every-linear", "reported"])
def test_a_models_own_names_that_wan_aliases_are_no_strays_of_its_diffusers_file(which: str) -> None:
    """A diffusers (PEFT-named, ``transformer.``) file of diffusers' Wan-Animate-2, whose module
    names are Wan's original ones but for the attention's (``blocks.N.self_attn.to_q``): its
    ``text_embedding.0`` and ``blocks.N.ffn.0`` modules, which the ``wan`` naming marks and
    aliases, were voted that naming's and refused as strays of the file's diffusers naming (or
    skipped by strict=False), though they name the model's own modules. Detection now knows the
    model a load is for, and its own module names vote for no naming: the whole file loads as
    diffusers' own loader loads it (``load_lora_adapter``), in float64."""
    model = _tiny_wan_animate_2()
    names = linears(model)
    if which == "reported":
        names = ["text_embedding.0", "blocks.0.self_attn.to_q", "blocks.1.self_attn.to_q", "blocks.0.ffn.0"]
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name in names:
        layer = model.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g, dtype=torch.float64)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g, dtype=torch.float64)
    oracle = _tiny_wan_animate_2()
    oracle.load_lora_adapter({k: v.clone() for k, v in sd.items()}, prefix="transformer")
    theirs = weights(oracle, names)
    assert not torch.allclose(theirs[names[0]], weights(_tiny_wan_animate_2(), names[:1])[names[0]])
    ours, naming = lorahot_weights(_tiny_wan_animate_2, sd, names)
    assert naming == "diffusers"
    assert_same(ours, theirs)
