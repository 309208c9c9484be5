"""Files that mix namings: one naming's keys with a key another naming's marker recognises.

Detection picks one naming per file (the first of ``FORMATS`` whose marker is present and whose
rules read every key), so a stray key of another naming can decide the naming of the whole file.
For every naming X and every example key of every other naming Y (``KeyFormat.example`` and the
keys of ``test_flux_namings_and_the_others_are_told_apart``), a file of X's example modules plus
Y's key, on a model of the layers X places its modules at, either resolves with every one of X's
modules on the layer, with the tensors, that X's own naming gives it alone (the placement the
parity tests check against PEFT, diffusers and ComfyUI), or is refused with a typed error; with
``strict=False`` the modules it places are X's placements still (a stray that lands nowhere is
skipped). Never one of X's modules placed by another naming's aliases, splits or re-orders.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lorahot
from lorahot.adapter import Adapter, LoraModule
from lorahot.formats import FORMATS, KeyFormat, format_named
from lorahot.resolve.keys import resolve_all
from lorahot.resolve.split import placed

_TOLD_APART = Path(__file__).with_name("test_formats.py").read_text()
#: naming -> its example keys (A keys), its own example first
_EXAMPLES: dict[str, list[str]] = {f.name: [f.example] for f in FORMATS}
#: the modules whose names several namings' markers share, each placed its own naming's way (a
#: split, a re-order, an alias): what a stray key of another naming must not re-place
_SHARED = (
    ("diffusion_model.blocks.0.mlp.fc1.lora_A.weight", "minimax-h3"),
    ("blocks.0.attn.out_proj.lora_A.weight", "minimax-h3"),
    ("diffusion_model.token_refiner.blocks.0.attn.qkv_proj.lora_A.weight", "minimax-h3"),
    ("lora_unet_blocks_0_mlp_fc1.lora_down.weight", "minimax-h3-musubi"),
    ("base_model.model.blocks.0.mlp.fc1.lora_A.weight", "hunyuan-dit"),
    ("base_model.model.blocks.0.attn2.kv_proj.lora_A.weight", "hunyuan-dit"),
    ("base_model.model.final_layer.adaLN_modulation.1.lora_A.weight", "hunyuan-dit"),
    ("lora_unet_blocks_0_mlp_fc1.lora_down.weight", "hunyuan-dit-kohya"),
    ("lora_unet_blocks_0_attn2_kv_proj.lora_down.weight", "hunyuan-dit-kohya"),
    ("diffusion_model.single_blocks.0.linear1.lora_A.weight", "flux-bfl"),
    ("diffusion_model.single_blocks.1.linear1_qkv.lora_A.weight", "flux-bfl"),
    ("diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight", "flux-bfl"),
    ("lora_unet_single_blocks_1_linear1_qkv.lora_down.weight", "flux-kohya"),
    ("diffusion_model.blocks.0.ffn.0.lora_A.weight", "wan"),
    ("diffusion_model.blocks.0.cross_attn.k.lora_A.weight", "wan"),
    ("diffusion_model.layers.0.feed_forward.w1.lora_A.weight", "lumina2"),
    ("diffusion_model.video_embeddings_connector.transformer_1d_blocks.0.attn1.to_q.lora_A.weight", "ltx2"),
    ("lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight", "sd3-kohya"),
    ("lora_unet_final_layer_adaLN_modulation_1.lora_down.weight", "sd3-kohya"),
)
for _key, _name in (*re.findall(r'\("([^"]+)", "([a-z0-9-]+)"\)', _TOLD_APART), *_SHARED):
    if _name in _EXAMPLES and _key not in _EXAMPLES[_name]:
        _EXAMPLES[_name].append(_key)


def _up(key: str) -> str:
    return key.replace("lora_A", "lora_B").replace("lora_down", "lora_up").replace(".down.", ".up.")


def _module(key: str, seed: int) -> dict[str, torch.Tensor]:
    """One LoRA module's A and B (rank 2, 12 inputs, 84 outputs: every split's shares divide it)."""
    g = torch.Generator().manual_seed(seed)
    return {key: torch.randn(2, 12, generator=g), _up(key): torch.randn(84, 2, generator=g)}


def _layers(fmt: KeyFormat, adapter: Adapter) -> list[str]:
    """The model layers ``fmt`` names for ``adapter``'s modules: each key without its component
    prefix, through the naming's first alias, or cut into its split's parts."""
    names = []
    for key, module in adapter.modules.items():
        bare = next((key[len(p) :] for p in fmt.prefixes if key.startswith(p)), key)
        aliased = [re.sub(p, r, c) for c in (key, bare) for p, r in fmt.aliases if re.search(p, c)]
        parts = placed(key, module, fmt.splits, [])
        if aliased:
            names.append(aliased[0])
        elif parts and parts[0] is not module:
            names += [next((p.key[len(x) :] for x in fmt.prefixes if p.key.startswith(x)), p.key) for p in parts]
        else:
            names.append(bare)
    return sorted(set(names))


def _file_of(fmt: KeyFormat) -> tuple[dict[str, torch.Tensor], list[str], dict[str, LoraModule]]:
    """X's example modules that X alone reads and places together, the model's layers for them,
    and where X places each."""
    tensors: dict[str, torch.Tensor] = {}
    for key in _EXAMPLES[fmt.name]:
        if re.search(r"hada_|lokr_", key):
            continue
        candidate = {**tensors, **_module(key, len(tensors))}
        try:
            adapter = lorahot.read_adapter(candidate)
            if adapter.format == fmt.name:
                resolve_all(adapter, _layers(fmt, adapter))
                tensors = candidate
        except lorahot.LoraError:
            continue
    adapter = lorahot.read_adapter(dict(tensors))
    layers = _layers(fmt, adapter)
    return tensors, layers, resolve_all(adapter, layers)[0]


@pytest.mark.parametrize("own", FORMATS, ids=lambda f: f.name)
def test_a_stray_key_of_another_naming_never_places_a_module_by_the_wrong_rules(own: KeyFormat) -> None:
    tensors, layers, reference = _file_of(own)
    assert tensors and {m.source_keys[0] for m in reference.values()} <= set(tensors)
    for other in FORMATS:
        for stray in _EXAMPLES[other.name] if other is not own else ():
            extra = _module(stray, 7)
            if set(extra) & set(tensors):
                continue
            for strict in (True, False):
                skipped: list[str] | None = None if strict else []
                try:
                    adapter = lorahot.read_adapter({**tensors, **extra}, strict=strict)
                    got = resolve_all(adapter, layers, skipped)[0]
                except (lorahot.UnknownFormatError, lorahot.AdapterMismatchError):
                    continue
                where = f"{own.name} + {stray} (strict={strict}, read as {adapter.format})"
                for layer, module in got.items():
                    if set(module.source_keys) <= set(tensors):
                        ref = reference.get(layer)
                        assert ref is not None and ref.source_keys == module.source_keys, where
                        assert torch.equal(module.A, ref.A) and torch.equal(module.B, ref.B), where
                        assert module.alpha == ref.alpha, where
                    elif strict:  # the stray landed: only by the file's own naming, as X alone reads it
                        assert adapter.format == own.name or format_named(adapter.format).rules == own.rules, where
