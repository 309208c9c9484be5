"""lorahot against diffusers' own Qwen-Image loader as the oracle, on a tiny diffusers
``QwenImageTransformer2DModel`` from config. Qwen-Image files outside diffusers use diffusers'
module names under ComfyUI's ``diffusion_model.`` (``.lora_A`` or ``.lora_down``) or in kohya's
underscore form (``lora_unet_transformer_blocks_0_attn_to_q``), with ``.alpha`` per module:
lorahot reads them with its ComfyUI and kohya namings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from tests.diffusion_names import (
    assert_same,
    diffusers_weights,
    linears,
    lorahot_weights,
    peft_default_adapter,
    weights,
)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

D = 16

#: module name -> (in, out)
MODULES = {
    **{f"transformer_blocks.0.attn.{n}": (D, D) for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj")},
    "transformer_blocks.0.attn.add_v_proj": (D, D),
    "transformer_blocks.0.attn.to_out.0": (D, D),
    "transformer_blocks.0.attn.to_add_out": (D, D),
    "transformer_blocks.0.img_mod.1": (D, 6 * D),
    "transformer_blocks.0.txt_mod.1": (D, 6 * D),
    "transformer_blocks.0.img_mlp.net.0.proj": (D, 4 * D),
    "transformer_blocks.0.img_mlp.net.2": (4 * D, D),
    "transformer_blocks.0.txt_mlp.net.0.proj": (D, 4 * D),
    "transformer_blocks.0.txt_mlp.net.2": (4 * D, D),
    "img_in": (16, D),
    "txt_in": (D, D),
    "norm_out.linear": (D, 2 * D),
    "proj_out": (D, 16),
}


def qwen_file(spelling: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    down, up = ("lora_A", "lora_B") if spelling.endswith("lora_A") else ("lora_down", "lora_up")
    sd = {}
    for i, (name, (fan_in, fan_out)) in enumerate(MODULES.items()):
        r = 2 + i % 3
        key = "lora_unet_" + name.replace(".", "_") if spelling == "kohya" else f"diffusion_model.{name}"
        key = name if spelling.startswith("bare") else key  # the model's names, no prefix at all
        key = f"transformer.{name}" if spelling.startswith("transformer.") else key
        sd[f"{key}.{down}.weight"] = torch.randn(r, fan_in, generator=g) * 0.3
        sd[f"{key}.{up}.weight"] = torch.randn(fan_out, r, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(float(r) * (0.5 + i % 3))
    return sd


def tiny_qwen() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=D,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def qwen_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 12, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, D, generator=g),
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long),
        "timestep": torch.tensor([0.5]),
        "img_shapes": [(1, 3, 4)],
    }


@pytest.mark.parametrize(
    ("spelling", "fmt"),
    [
        ("lora_A", "comfyui"),
        ("lora_down", "comfyui"),
        ("kohya", "kohya"),
        ("bare lora_A", "peft"),  # no prefix, with .alpha: refused before as an unknown naming
        ("bare lora_down", "peft"),
        # diffusers' names under transformer., with .alpha: diffusers' conversion leaves the prefix on
        # the module names and refuses the file (no target module found); its oracle loads it unprefixed
        ("transformer. lora_A", "diffusers"),
    ],
)
def test_qwen_image_matches_diffusers(spelling: str, fmt: str, tmp_path: Path) -> None:
    sd = qwen_file(spelling, seed=3)
    path = tmp_path / "qwen_lora.safetensors"
    save_file(sd, str(path))
    with torch.no_grad():
        oracle = tiny_qwen()
        theirs = {k.removeprefix("transformer."): v for k, v in sd.items()}
        oracle.load_lora_adapter(diffusers.QwenImagePipeline.lora_state_dict(theirs), prefix="transformer")
        expected = oracle(**qwen_inputs(), return_dict=False)[0]
        model = tiny_qwen()
        base = model(**qwen_inputs(), return_dict=False)[0]
        runtime = lorahot.inject(model, "all-linear", max_rank=8)
        runtime.load(path)
        ours = model(**qwen_inputs(), return_dict=False)[0]
    assert lorahot.read_adapter(path).format == fmt
    assert not torch.allclose(expected, base, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each Linear's ``[in + 1, out]`` response to the identity and to zero (weight and bias), float64."""
    out = {}
    for name, layer in model.named_modules():
        base = getattr(layer, "base_layer", layer)
        if isinstance(base, torch.nn.Linear) and not name.endswith("base_layer"):
            eye = torch.eye(base.in_features + 1, dtype=torch.float64)[:, : base.in_features]
            out[name] = layer(eye)
    return out


def _extracted_key(spelling: str, name: str) -> str:
    """Module ``name``'s key in a file of ComfyUI's LoRA extraction: ComfyUI's
    ``diffusion_model.<name>``, or its kohya spelling."""
    return "lora_unet_" + name.replace(".", "_") if spelling == "kohya" else f"diffusion_model.{name}"


def _extracted_lora(
    spelling: str, g: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """A float64 file as ComfyUI's LoRA extraction writes it for every module of ``MODULES``
    (``lora_down``/``lora_up`` of rank 2 to 4 and a ``.diff_b``, no ``.alpha``), drawn from ``g``,
    and each module's ``(A, B, bias delta)``."""
    sd, factors = {}, {}
    for i, (name, (fan_in, fan_out)) in enumerate(MODULES.items()):
        key = _extracted_key(spelling, name)
        a = torch.randn(2 + i % 3, fan_in, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(fan_out, 2 + i % 3, generator=g, dtype=torch.float64) * 0.3
        bias = torch.randn(fan_out, generator=g, dtype=torch.float64) * 0.3
        sd |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.diff_b": bias}
        factors[name] = (a, b, bias)
    return sd, factors


@pytest.mark.parametrize("spelling", ["comfyui", "kohya"])
def test_a_comfyui_extracted_lora_with_bias_deltas_applies_them_as_comfyui(spelling: str) -> None:
    """ComfyUI's LoRA extraction (its "Save LoRA" nodes, ``bias_diff`` on by default) writes a
    ``.diff_b`` beside every ``lora_up``/``lora_down`` pair of a layer with a bias, and no
    ``.alpha``; ComfyUI adds it to the bias at the LoRA's strength, unscaled by ``alpha / r``.
    Unmerged (extras=True) and merged, every layer's weight and bias are the float64 ``W + B A``
    and ``b + diff_b``. Outside the Wan naming these modules were refused unmerged, even with
    extras=True ('loads only in merged mode'); without extras the refusal names extras=True and
    changes nothing."""
    with torch.no_grad():
        model = tiny_qwen().double()
        sd, factors = _extracted_lora(spelling, torch.Generator().manual_seed(7))
        reference = {}
        for name, (a, b, bias) in factors.items():
            layer = model.get_submodule(name)
            reference[name] = (layer.weight + b @ a, layer.bias + bias)
        base = _linear_weights(model)
        for mode in ({"extras": True}, {"merged": True}):
            ours = tiny_qwen().double()
            assert lorahot.inject(ours, "all-linear", max_rank=8, **mode).load(dict(sd)).format == spelling
            got = _linear_weights(ours)
            for name, (weight, bias) in reference.items():
                expected = torch.cat([weight.T, torch.zeros(1, weight.shape[0], dtype=torch.float64)]) + bias
                torch.testing.assert_close(got[name], expected, rtol=1e-12, atol=1e-12, msg=name)
        plain = tiny_qwen().double()
        with pytest.raises(lorahot.AdapterMismatchError, match=r"extras=True"):
            lorahot.inject(plain, "all-linear", max_rank=8).load(dict(sd))
        assert all(torch.equal(v, base[k]) for k, v in _linear_weights(plain).items())


@pytest.mark.parametrize("spelling", ["comfyui", "kohya"])
def test_a_comfyui_extracted_lora_folds_its_norm_deltas_into_injected_norms(spelling: str) -> None:
    """ComfyUI's LoRA extraction also writes a ``.diff`` for every 1-D weight, the normalization
    layers' scales included (``txt_norm.diff``, ``attn.norm_q.diff``), which ComfyUI adds to the
    norm's weight at the LoRA's strength. They were refused by shape in every naming (so such a file
    loaded only with strict=False, without its norms). Planned against the model, the norms are
    targets and the whole file folds: ``W + s B A``, ``b + s diff_b`` and the norms' ``w + s diff``
    in float64 at scales 1 and 0.5. Injected without the norms, the refusal names each one and
    says to inject it, nothing changed; strict=False skips them and loads the rest."""
    with torch.no_grad():
        model = tiny_qwen().double()
        g = torch.Generator().manual_seed(9)
        sd, factors = _extracted_lora(spelling, g)
        reference = {name: (b @ a, bias) for name, (a, b, bias) in factors.items()}
        norms = {"txt_norm": 16, "transformer_blocks.0.attn.norm_q": 8}
        for name, size in norms.items():
            assert model.get_submodule(name).weight.shape == (size,)
            key = _extracted_key(spelling, name)
            sd[f"{key}.diff"] = torch.randn(size, generator=g, dtype=torch.float64) * 0.1
            reference[name] = (sd[f"{key}.diff"], None)
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        plan = lorahot.plan_targets(dict(sd), model)
        assert set(norms) <= set(plan.targets) and plan.inject_options()["merged"] is True
        runtime = lorahot.inject(model, plan.targets, **plan.inject_options())
        assert runtime.load(dict(sd)).format == spelling
        for s in (1.0, 0.5):
            runtime.set_scale(s)
            for name, (delta, bias) in reference.items():
                layer = model.get_submodule(name)
                torch.testing.assert_close(
                    layer.weight, pristine[f"{name}.weight"] + s * delta, rtol=1e-13, atol=1e-13, msg=name
                )
                if bias is not None:
                    torch.testing.assert_close(
                        layer.bias, pristine[f"{name}.bias"] + s * bias, rtol=1e-13, atol=1e-13, msg=name
                    )

        ours = tiny_qwen().double()
        base = _linear_weights(ours)
        runtime = lorahot.inject(ours, "all-linear", max_rank=8, merged=True)
        with pytest.raises(lorahot.AdapterMismatchError) as refused:
            runtime.load(dict(sd))
        for name, size in norms.items():
            key = _extracted_key(spelling, name)
            assert f"{key}: matches no injected layer" in str(refused.value)
            assert f"it is a normalization layer's weight delta (shape ({size},))" in str(refused.value)
        assert "add that norm to targets" in str(refused.value) and "strict=False" in str(refused.value)
        assert all(torch.equal(v, base[k]) for k, v in _linear_weights(ours).items())
        info = runtime.load(dict(sd), strict=False)
        assert info.format == spelling
        got = _linear_weights(ours)
        for name, (delta, bias) in reference.items():
            if name in norms:
                continue
            layer = tiny_qwen().double().get_submodule(name)
            weight = layer.weight + delta
            expected = torch.cat([weight.T, torch.zeros(1, weight.shape[0], dtype=torch.float64)]) + layer.bias + bias
            torch.testing.assert_close(got[name], expected, rtol=1e-12, atol=1e-12, msg=name)


def _qwen_file64(names: list[str], alpha: bool) -> dict[str, torch.Tensor]:
    """``diffusion_model.<name>.lora_down``/``lora_up`` (float64, ranks 2-4), with ``.alpha`` where asked."""
    model, g, sd = tiny_qwen(), torch.Generator().manual_seed(4), {}
    for i, name in enumerate(names):
        layer, r = model.get_submodule(name), 2 + i % 3
        sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(r, layer.in_features, generator=g).double() * 0.3
        sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(layer.out_features, r, generator=g).double() * 0.3
        if alpha:
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(r * (0.5 + i % 3), dtype=torch.float64)
    return sd


@pytest.mark.parametrize("alpha", [False, True], ids=["no-alpha", "alpha"])
@pytest.mark.parametrize(("spelling", "fmt"), [("comfyui", "comfyui"), ("bare", "peft"), ("kohya", "kohya")])
def test_peft_adapter_name_after_kohya_roles_matches_diffusers(spelling: str, fmt: str, alpha: bool) -> None:
    """``<module>.lora_down.default.weight`` / ``.lora_up.default.weight`` (PEFT's adapter name
    kept by a rename of its lora_A/lora_B to kohya's roles), under ``diffusion_model.``, bare or
    kohya-spelled: diffusers' Qwen-Image loader drops ``default.``; every layer equal to it and to
    the file without the adapter name, in float64. They were refused as a file that mixes namings."""

    def make() -> torch.nn.Module:
        return tiny_qwen().double()

    names = linears(make())
    plain = _qwen_file64(names, alpha)
    sd = peft_default_adapter(plain, spelling)
    assert any(k.endswith(".lora_down.default.weight") for k in sd)
    ours, found = lorahot_weights(make, sd, names)
    assert found == fmt
    assert_same(ours, diffusers_weights(make, diffusers.QwenImagePipeline, sd, names))
    assert_same(ours, lorahot_weights(make, plain, names)[0])
    base = weights(make(), names)
    assert all(not torch.equal(ours[n], base[n]) for n in names)
    other = {k.replace(".default.", ".other."): v for k, v in sd.items()}  # no loader drops another name
    with pytest.raises(lorahot.UnknownFormatError, match=r"lora_down\.other\.weight"):
        lorahot_weights(make, other, names)
