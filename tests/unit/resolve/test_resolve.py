"""Module keys meet the injected layers: model-name matching, aliases, prefix= and key_map=, and
the errors for keys that do not map."""

from __future__ import annotations

import pytest
from torch import nn

import lorahot
from tests.helpers import lora_pair


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text_model = nn.ModuleDict({"q_proj": nn.Linear(8, 8), "k_proj": nn.Linear(8, 8)})
        self.attn = nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_out": nn.ModuleList([nn.Linear(8, 8)])})


def _runtime() -> tuple[nn.Module, lorahot.LoraRuntime]:
    model = _Blocks()
    return model, lorahot.inject(model, ["q_proj", "k_proj", "to_q", "to_out.0"], max_rank=4)


def test_kohya_text_encoder_and_aliases_map_through_model_names() -> None:
    _, runtime = _runtime()
    tensors = lora_pair("lora_te1_text_model_q_proj", "lora_down", "lora_up") | lora_pair(
        "lora_unet_attn_to_out_0", "lora_down", "lora_up"
    )
    assert set(runtime.load(tensors).ranks) == {"text_model.q_proj", "attn.to_out.0"}
    old = lora_pair("text_encoder.text_model.to_k_lora", "down", "up") | lora_pair(
        "unet.attn.processor.to_out_lora", "down", "up"
    )
    info = runtime.load(old)
    assert info.format == "diffusers-old" and set(info.ranks) == {"text_model.k_proj", "attn.to_out.0"}


def test_unmappable_keys_are_listed_with_closest_names() -> None:
    _, runtime = _runtime()
    tensors = lora_pair("lora_unet_attn_to_qq", "lora_down", "lora_up") | lora_pair(
        "lora_unet_nowhere_at_all", "lora_down", "lora_up"
    )
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"\(kohya naming\) that do not map onto the injected layers:\n"
        r"  - lora_unet_attn_to_qq: matches no injected layer \(closest: attn\.to_q[,)][\s\S]*"
        r"  - lora_unet_nowhere_at_all: matches no injected layer[\s\S]*Inject those modules \(targets=\.\.\.\)",
    ):
        runtime.load(tensors)


def test_ambiguous_underscore_name_lists_candidates() -> None:
    model = nn.ModuleDict({"a_b": nn.ModuleDict({"c": nn.Linear(8, 8)}), "a": nn.ModuleDict({"b_c": nn.Linear(8, 8)})})
    runtime = lorahot.inject(model, ["a_b.c", "a.b_c"], max_rank=4)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"lora_unet_a_b_c: ambiguous, matches a\.b_c, a_b\.c; pass key_map="
    ):
        runtime.load(lora_pair("lora_unet_a_b_c", "lora_down", "lora_up"))
    assert set(
        runtime.load(lora_pair("lora_unet_a_b_c", "lora_down", "lora_up"), key_map={r"lora_unet_a_b_c": "a_b.c"}).ranks
    ) == {"a_b.c"}


def test_prefix_selects_one_component() -> None:
    _, runtime = _runtime()
    tensors = lora_pair("unet.attn.to_q", "lora_A", "lora_B") | lora_pair(
        "text_encoder.text_model.q_proj", "lora_A", "lora_B", fin=4
    )
    assert set(runtime.load(tensors, prefix="unet").ranks) == {"attn.to_q"}
    with pytest.raises(
        lorahot.UsageError, match=r"prefix='vae' matches no module key; keys start with text_encoder, unet"
    ):
        runtime.load(tensors, prefix="vae")


def test_key_map_renames_with_groups() -> None:
    _, runtime = _runtime()
    tensors = lora_pair("net.blocks.attn_q", "lora_A", "lora_B")
    assert set(runtime.load(tensors, key_map={r"net\.blocks\.attn_(\w)": r"attn.to_\1"}).ranks) == {"attn.to_q"}
    with pytest.raises(lorahot.UsageError, match=r"key_map entry '\(' is not a valid regex"):
        runtime.load(tensors, key_map={"(": "x"})
