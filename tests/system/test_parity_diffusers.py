"""lorahot against PEFT-on-diffusers as the oracle: one UNet LoRA (attention and resnet
convs) written in every naming lorahot reads, each loading to PEFT's eager output.

Namings and where they come from:
- diffusers (PEFT roles, ``unet.`` prefix, ``lora_adapter_metadata``): diffusers'
  ``save_lora_weights``.
- kohya: diffusers' ``convert_state_dict_to_kohya``. It writes ``alpha = rank`` (it drops
  ``lora_alpha``), so the test writes PEFT's alpha into each ``.alpha``.
- old diffusers (``.lora.down``/``.lora.up`` + network alphas): diffusers'
  ``convert_state_dict_to_diffusers``.
- old attention processors (``processor.to_q_lora.down``): no converter writes it; built here
  from diffusers' ``UNET_TO_DIFFUSERS`` table, read backwards.
- kohya and ComfyUI with LDM block names (``input_blocks.4.1``): no converter writes them;
  built here from the LDM block table in ``_ldm_name`` (the inverse of diffusers'
  ``_maybe_map_sgm_blocks_to_diffusers`` and ``_convert_unet_lora_key``).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from tests.helpers import tiny_unet

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers.utils.state_dict_utils import (  # noqa: E402 - after the importorskip
    UNET_TO_DIFFUSERS,
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
ALPHA = 8.0
PER_BLOCK = 2


@pytest.fixture(scope="module")
def unet():
    """``(base, oracle, peft_state_dict, config)``: a tiny UNet and PEFT's LoRA on it."""
    base = tiny_unet(layers_per_block=PER_BLOCK)
    config = peft.LoraConfig(
        r=4, lora_alpha=ALPHA, target_modules=TARGETS, rank_pattern={"conv2": 2}, init_lora_weights=False
    )
    oracle = copy.deepcopy(base)
    oracle.add_adapter(config)
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    state = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(oracle).items()}
    return base, oracle, state, config


def _run(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model(
            torch.randn(2, 4, 8, 8, generator=g), 7, encoder_hidden_states=torch.randn(2, 5, 16, generator=g)
        ).sample


def _check(unet, source, expected_format: str, **kwargs) -> None:
    base, oracle, state, _ = unet
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=4)
    info = runtime.load(source, **kwargs)
    assert info.format == expected_format
    assert len(info.ranks) == len(state) // 2 == len(runtime.layers)
    out, want = _run(model), _run(oracle)
    assert float((out - want).norm() / want.norm()) < 1e-5
    assert float((want - _run(base)).norm() / want.norm()) > 1e-3


def _modules(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".lora_", 1)[0] for k in state})


def test_diffusers_naming_with_metadata(tmp_path: Path, unet) -> None:
    _, _, state, config = unet
    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    StableDiffusionLoraLoaderMixin.save_lora_weights(tmp_path, unet_lora_layers=state, unet_lora_adapter_metadata=meta)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    _check(unet, tmp_path, "diffusers")


def test_diffusers_naming_without_metadata_needs_alphas(tmp_path: Path, unet) -> None:
    """Without metadata, diffusers reads alpha = rank; network alphas give the real one."""
    _, _, state, _ = unet
    tensors = {f"unet.{k}": v for k, v in state.items()}
    tensors |= {f"unet.{m}.alpha": torch.tensor(ALPHA) for m in _modules(state)}
    _check(unet, tensors, "diffusers")


def test_kohya_from_diffusers_converter(tmp_path: Path, unet) -> None:
    _, _, state, _ = unet
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    assert all(k.startswith("lora_unet_") for k in kohya)
    kohya = {k: torch.tensor(ALPHA) if k.endswith(".alpha") else v for k, v in kohya.items()}
    save_file(kohya, tmp_path / "kohya.safetensors")
    _check(unet, tmp_path / "kohya.safetensors", "kohya")


def test_kohya_without_alpha_means_alpha_equals_rank(unet) -> None:
    _, _, state, _ = unet
    kohya = {
        k: v
        for k, v in convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()}).items()
        if not k.endswith(".alpha")
    }
    adapter = lorahot.read_adapter(kohya)
    assert {m.alpha for m in adapter.modules.values()} == {4.0, 2.0}
    assert {m.scale for m in adapter.modules.values()} == {1.0}


def test_old_diffusers_from_diffusers_converter(unet) -> None:
    _, _, state, _ = unet
    old = convert_state_dict_to_diffusers({f"unet.{k}": v for k, v in state.items()})
    assert any(".to_q.lora.down.weight" in k for k in old)
    old |= {f"unet.{m}.alpha": torch.tensor(ALPHA) for m in _modules(state)}
    _check(unet, old, "diffusers-old")


def test_old_attention_processor_naming(unet) -> None:
    _, _, state, _ = unet
    backwards = {
        peft_name: old
        for old, peft_name in UNET_TO_DIFFUSERS.items()
        if old.endswith((".down", ".up")) and "_lora" in old
    }
    tensors = {}
    for key, value in state.items():
        module, role = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        head, last = (
            module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[: -len(".to_out.0")], "to_out.0")
        )
        peft_tail = f".{last}.{role}"
        if peft_tail in backwards:  # ".to_q.lora_A" -> ".to_q_lora.down", under the processor
            tensors[f"{head}.processor{backwards[peft_tail]}.weight"] = value
        else:
            tensors[f"{module}.lora.{'down' if role == 'lora_A' else 'up'}.weight"] = value
        tensors[f"{module}.alpha"] = torch.tensor(ALPHA)
    assert any(".processor.to_out_lora.up.weight" in k for k in tensors)
    _check(unet, tensors, "diffusers-old")


# diffusers name -> LDM name, for layers_per_block = PER_BLOCK (the inverse of lorahot's table,
# written out independently from the SD UNet layout).
_RESNET = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _ldm_name(name: str) -> str:
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        i = 1 + int(m[1]) * (PER_BLOCK + 1) + int(m[3])
        return f"input_blocks.{i}.{0 if m[2] == 'resnets' else 1}.{_inner(m[2], m[4])}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        i = int(m[1]) * (PER_BLOCK + 1) + int(m[3])
        return f"output_blocks.{i}.{0 if m[2] == 'resnets' else 1}.{_inner(m[2], m[4])}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
    if m:
        j = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(m[1], m[2])]
        return f"middle_block.{j}.{_inner(m[1], m[3])}"
    raise AssertionError(name)


def _inner(kind: str, rest: str) -> str:
    return _RESNET.get(rest, rest) if kind == "resnets" else rest


def test_kohya_with_ldm_block_names(unet) -> None:
    _, _, state, _ = unet
    tensors = {}
    for module in _modules(state):
        stem = "lora_unet_" + _ldm_name(module).replace(".", "_")
        tensors[f"{stem}.lora_down.weight"] = state[f"{module}.lora_A.weight"]
        tensors[f"{stem}.lora_up.weight"] = state[f"{module}.lora_B.weight"]
        tensors[f"{stem}.alpha"] = torch.tensor(ALPHA)
    assert any(k.startswith("lora_unet_input_blocks_2_1_transformer_blocks_0_attn1_to_q") for k in tensors)
    _check(unet, tensors, "kohya")


def test_comfyui_with_ldm_block_names(unet) -> None:
    _, _, state, _ = unet
    tensors = {}
    for module in _modules(state):
        stem = "diffusion_model." + _ldm_name(module)
        tensors[f"{stem}.lora.down.weight"] = state[f"{module}.lora_A.weight"]
        tensors[f"{stem}.lora.up.weight"] = state[f"{module}.lora_B.weight"]
        tensors[f"{stem}.alpha"] = torch.tensor(ALPHA)
    _check(unet, tensors, "comfyui")


def test_comfyui_with_diffusers_names(unet) -> None:
    _, _, state, _ = unet
    tensors = {f"diffusion_model.{k}": v for k, v in state.items()}
    tensors |= {f"diffusion_model.{m}.alpha": torch.tensor(ALPHA) for m in _modules(state)}
    _check(unet, tensors, "comfyui")


@pytest.mark.parametrize("alphas", ["per module", "some missing"])
def test_kohya_alphas_are_each_modules_own_as_sd_scripts_reads_them(unet, alphas: str) -> None:
    """Where diffusers and sd-scripts disagree on a kohya file, lorahot follows sd-scripts: each
    module's update is ``alpha / r * up @ down`` with its own ``.alpha``, and alpha = rank where
    the module has none. diffusers names an attention module's alpha after its old processor key
    (``...attn1.processor.to_q_lora.down.weight.alpha``), which matches no layer, so with alphas
    that differ attention layers get the most common one; and it gives a module without
    ``.alpha`` the most common alpha too. The reference: each module's update built in float64
    from the file."""
    base, _, state, _ = unet
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    modules = sorted(k[: -len(".alpha")] for k in kohya if k.endswith(".alpha"))
    for i, module in enumerate(modules):
        kohya.pop(f"{module}.alpha")
        if alphas == "per module":
            kohya[f"{module}.alpha"] = torch.tensor(8.0 if "attn" not in module else float(1 + i % 2))
        elif i % 3:
            kohya[f"{module}.alpha"] = torch.tensor(8.0)
    model = copy.deepcopy(base).double()
    layers = dict(model.named_modules())
    names = {"lora_unet_" + n.replace(".", "_"): n for n in layers}
    names = {m: names[m] for m in modules}
    before = {m: layers[n].weight.detach().clone() for m, n in names.items()}
    runtime = lorahot.inject(model, TARGETS, max_rank=4, merged=True)
    runtime.load(kohya)
    for module, name in names.items():
        down, up = kohya[f"{module}.lora_down.weight"].double(), kohya[f"{module}.lora_up.weight"].double()
        r = down.shape[0]
        alpha = float(kohya[f"{module}.alpha"]) if f"{module}.alpha" in kohya else r
        delta = (alpha / r) * (up.flatten(1) @ down.flatten(1)).reshape(before[module].shape)
        torch.testing.assert_close(layers[name].weight - before[module], delta, rtol=1e-12, atol=1e-12, msg=name)
