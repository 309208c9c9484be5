"""Stacked adapters against PEFT and diffusers as oracles: several adapters active together,
each at its own weight, each with its own per-module rank and alpha.

- PEFT on a tiny Llama: two adapters saved by ``save_pretrained`` (rank and alpha patterns,
  rsLoRA, different target sets), loaded into one ``PeftModel`` and made active together
  (``base_model.set_adapter(["a", "b"])``), each weighted by every layer's
  ``set_scale(adapter, w)``: PEFT's multi-adapter forward, ``sum_a w_a * alpha_a/r_a * B_a A_a x``
  (not ``add_weighted_adapter``, which merges them into one).
- diffusers on a tiny UNet: two adapters added with ``add_adapter`` and weighted with
  ``set_adapters(["a", "b"], weights=[w_a, w_b])``; lorahot reads the first as diffusers saves it
  (``save_lora_weights`` with its config in ``lora_adapter_metadata``: rank pattern and rsLoRA)
  and the second as kohya (``convert_state_dict_to_kohya``, with PEFT's per-module alphas written
  into each ``.alpha``), attention only.

Outputs agree within float32 rounding (relative error < 1e-5), before and after re-weighting.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from tests.helpers import tiny_llama, tiny_unet

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402 - after the importorskip

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _weigh(model: torch.nn.Module, weights: dict[str, float]) -> None:
    """PEFT's own per-adapter weight: ``scaling = w * alpha / r`` on every LoRA layer."""
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name, w in weights.items():
                module.set_scale(name, w)


# -- PEFT, tiny Llama ------------------------------------------------------------------------

#: a: attention and MLP, rank and alpha patterns; b: attention only (q, v, o), rsLoRA, another rank
CONFIG_A = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "rank_pattern": {"q_proj": 6, r"layers\.1\.mlp\.down_proj": 2},
    "alpha_pattern": {"v_proj": 3.0, "up_proj": 20},
}
CONFIG_B = {"r": 2, "lora_alpha": 5, "target_modules": ["q_proj", "v_proj", "o_proj"], "use_rslora": True}


def _saved(base: torch.nn.Module, path: Path, seed: int, config: dict) -> Path:
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_stack_matches_peft_multiple_active_adapters(tmp_path: Path) -> None:
    base = tiny_llama()
    a, b = _saved(base, tmp_path / "a", 3, CONFIG_A), _saved(base, tmp_path / "b", 4, CONFIG_B)
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(base), a, adapter_name="a").eval()
    oracle.load_adapter(b, adapter_name="b")
    oracle.base_model.set_adapter(["a", "b"])
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, CONFIG_A["target_modules"], max_rank=8)  # q_proj: 6 + 2
    info = runtime.load([a, b], scale=[0.8, -1.3])
    assert info.ranks["model.layers.0.self_attn.q_proj"] == 8 and info.ranks["model.layers.0.self_attn.k_proj"] == 4
    assert [p.scale for p in info.parts] == [0.8, -1.3] and info.scale == (0.8, -1.3)
    _weigh(oracle, {"a": 0.8, "b": -1.3})
    want = _logits(oracle)
    assert _rel(_logits(model), want) < RTOL
    alone = copy.deepcopy(base)
    lorahot.inject(alone, CONFIG_A["target_modules"], max_rank=8).load(a, scale=0.8)
    assert _rel(_logits(alone), want) > 1e-3  # b does change the output
    for weights in ([0.25, 2.0], [0.0, 1.0], [1.5, 0.0]):
        runtime.set_scale(weights)
        _weigh(oracle, dict(zip("ab", weights)))
        assert _rel(_logits(model), _logits(oracle)) < RTOL, weights


#: three adapters with a LoRA bias (``lora_B.bias``) each, on shared layers without a base bias
BIASED = [
    CONFIG_A | {"lora_bias": True},
    CONFIG_B | {"lora_bias": True},
    {"r": 3, "lora_alpha": 2.0, "target_modules": ["q_proj", "up_proj"], "lora_bias": True},
]


@pytest.mark.parametrize("n", [2, 3])
def test_stacked_lora_biases_on_one_layer_match_peft_multiple_active_adapters(tmp_path: Path, n: int) -> None:
    """Unmerged, adapters that each carry a LoRA bias on the same layers (q_proj: all of them),
    stacked at their weights, give PEFT's forward with them all active, each ``lora_B`` with its bias
    at ``w * alpha / r``: ``sum_a w_a * alpha_a / r_a * (B_a A_a x + c_a)``; after set_scale too.
    (``add_weighted_adapter`` cannot combine LoRA biases.) These stacks were refused unmerged."""
    base = tiny_llama()
    paths = [_saved(base, tmp_path / f"p{k}", 10 + k, config) for k, config in enumerate(BIASED[:n])]
    names = [f"p{k}" for k in range(n)]
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[0], adapter_name=names[0]).eval()
    for name, path in zip(names[1:], paths[1:]):
        oracle.load_adapter(path, adapter_name=name)
    oracle.base_model.set_adapter(names)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, CONFIG_A["target_modules"], max_rank=12, extras=True)  # q_proj: 6 + 2 + 3
    for weights in ([0.8, -1.3, 0.5], [0.0, 1.0, 2.0], [1.5, 0.25, -0.75]):
        if runtime.info() is None:
            runtime.load(paths, scale=weights[:n])
        else:
            runtime.set_scale(weights[:n])
        _weigh(oracle, dict(zip(names, weights)))
        assert _rel(_logits(model), _logits(oracle)) < RTOL, weights


# -- diffusers, tiny UNet ---------------------------------------------------------------------

UNET_A = {"r": 4, "lora_alpha": 8.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]}
UNET_A |= {"rank_pattern": {"conv2": 2}, "use_rslora": True}
UNET_B = {"r": 3, "lora_alpha": 6.0, "target_modules": ["to_q", "to_v", "to_out.0"]}
UNET_B |= {"alpha_pattern": {"to_v": 1.5, "to_out.0": 9.0}}


@pytest.fixture(scope="module")
def unet():
    """``(base, oracle, {name: (state, config)})``: a tiny UNet with adapters a and b added."""
    base = tiny_unet()
    oracle = copy.deepcopy(base)
    adapters = {}
    for name, fields in (("a", UNET_A), ("b", UNET_B)):
        config = peft.LoraConfig(init_lora_weights=False, **fields)
        oracle.add_adapter(config, adapter_name=name)
        with torch.no_grad():
            for key, p in oracle.named_parameters():
                if f"lora_B.{name}." in key:
                    p.normal_(0, 0.3)
        state = peft.get_peft_model_state_dict(oracle, adapter_name=name)
        adapters[name] = ({k: v.detach().clone() for k, v in state.items()}, config)
    return base, oracle, adapters


def _sample(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model(
            torch.randn(2, 4, 8, 8, generator=g), 7, encoder_hidden_states=torch.randn(2, 5, 16, generator=g)
        ).sample


def _diffusers_file(path: Path, state: dict[str, torch.Tensor], config) -> Path:
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    meta = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(path, unet_lora_layers=state, unet_lora_adapter_metadata=meta)
    return path


def _kohya_file(path: Path, state: dict[str, torch.Tensor], oracle: torch.nn.Module, adapter: str) -> Path:
    """diffusers' kohya conversion, with each module's PEFT alpha in its ``.alpha``."""
    alphas = {
        "lora_unet_" + name.replace(".", "_"): module.lora_alpha[adapter]
        for name, module in oracle.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer) and adapter in module.lora_alpha
    }
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    kohya = {k: torch.tensor(alphas[k[: -len(".alpha")]]) if k.endswith(".alpha") else v for k, v in kohya.items()}
    assert len({float(v) for k, v in kohya.items() if k.endswith(".alpha")}) == 3  # per-module alphas differ
    save_file(kohya, path)
    return path


def test_stack_matches_diffusers_set_adapters(tmp_path: Path, unet) -> None:
    base, oracle, adapters = unet
    a = _diffusers_file(tmp_path / "a", *adapters["a"])
    b = _kohya_file(tmp_path / "b.safetensors", adapters["b"][0], oracle, "b")
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, UNET_A["target_modules"], max_rank=8)
    info = runtime.load([a, b], scale=[0.7, 1.6])
    assert info.format == "diffusers+kohya" and [p.format for p in info.parts] == ["diffusers", "kohya"]
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    conv2 = "down_blocks.0.resnets.0.conv2"
    assert (info.ranks[to_q], info.ranks[conv2]) == (4 + 3, 2)  # conv2: only a, at its pattern's rank
    oracle.set_adapters(["a", "b"], weights=[0.7, 1.6])
    assert _rel(_sample(model), _sample(oracle)) < RTOL
    assert _rel(_sample(model), _sample(base)) > 1e-3
    for weights in ([-0.4, 0.9], [1.0, 1.0]):
        runtime.set_scale(weights)
        oracle.set_adapters(["a", "b"], weights=weights)
        assert _rel(_sample(model), _sample(oracle)) < RTOL, weights
