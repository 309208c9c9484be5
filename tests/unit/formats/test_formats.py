"""Format detection from key names, features each naming refuses, and config metadata per component."""

from __future__ import annotations

import gc
import json
import re
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
from lorahot.formats import FORMATS, KeyFormat, detect
from lorahot.formats.table import _taking
from lorahot.io.config import INERT
from tests.helpers import lora_pair


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_each_format_detects_its_own_example(fmt) -> None:
    example = fmt.example
    a_role = {"kohya": "lora_down", "diffusers-old": "processor.to_q_lora.down"}.get(fmt.name)
    keys = [example, example.replace("lora_A", "lora_B").replace("lora_down", "lora_up").replace(".down.", ".up.")]
    assert a_role is None or a_role in example
    assert detect(keys) is fmt


def test_locon_conv_kernel_in_down_and_1x1_up() -> None:
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1))
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    down, up = torch.randn(4, 3, 3, 3), torch.randn(6, 4, 1, 1)
    x = torch.randn(1, 3, 5, 5)
    base = model(x)
    runtime.load(
        {"lora_unet_0.lora_down.weight": down, "lora_unet_0.lora_up.weight": up, "lora_unet_0.alpha": torch.tensor(2.0)}
    )
    delta = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up) * 0.5
    torch.testing.assert_close(model(x), base + delta, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (
            {"lora_unet_attn_to_q.dora_scale": torch.ones(5, 1)},
            lorahot.UnknownFormatError,
            r"dora_scale has shape \(5, 1\), expected \(8, 1\) \(one magnitude per output channel.* or \(1, 8\)",
        ),
        (
            {"lora_unet_attn_to_q.lora_magnitude_vector": torch.ones(8)},
            lorahot.UnknownFormatError,
            r"lora_magnitude_vector: DoRA magnitude vector in PEFT's spelling[\s\S]*dora_scale",
        ),
        (
            {"lora_unet_attn_to_q.lora_up.bias": torch.ones(8)},
            lorahot.UnknownFormatError,
            r"lora_up\.bias: LoRA bias \(PEFT lora_bias=True\): loaded in PEFT and diffusers namings only",
        ),
        (
            {"lora_unet_attn_to_q.hada_w1_a": torch.ones(8, 2)},
            lorahot.UnknownFormatError,
            r"lora_unet_attn_to_q \(.*hada_w1_a.*\): lacks hada_w1_b, hada_w2_a, hada_w2_b",
        ),
        (
            {"lora_unet_attn_to_q.oft_diag": torch.ones(8, 2)},
            lorahot.UnknownFormatError,
            r"oft_diag: OFT weights in another spelling than LyCORIS' oft_blocks",
        ),
        (
            {"attn.to_k.oft_blocks": torch.ones(4, 2, 2), "attn.to_k.rescale": torch.ones(8, 1)},
            lorahot.UnknownFormatError,
            r"oft_blocks: LyCORIS OFT/BOFT weights: lorahot loads them[\s\S]*rescale: LyCORIS OFT/BOFT weights[\s\S]*"
            r"kohya or ComfyUI naming",
        ),
        (
            {"lora_unet_attn_to_k.on_input": torch.tensor(0)},
            lorahot.UnknownFormatError,
            r"lora_unet_attn_to_k \(lora_unet_attn_to_k\.on_input\): lacks weight",
        ),
        (
            {"lora_unet_attn_to_k.a1.weight": torch.ones(8, 2), "lora_unet_attn_to_k.bm.weight": torch.ones(8, 8)},
            lorahot.UnknownFormatError,
            r"lora_unet_attn_to_k \(.*a1\.weight.*\): lacks a2, b1, b2",
        ),
        (
            {
                "lora_unet_attn_to_k.lambda_layer": torch.ones(1, 2),
                "lora_unet_attn_to_k.q_layer.weight": torch.ones(2, 8),
            },
            lorahot.UnknownFormatError,
            r"lambda_layer: LyCORIS T-LoRA[\s\S]*q_layer\.weight: LyCORIS T-LoRA",
        ),
        (
            {"lora_unet_attn_to_q.alpha": torch.tensor(float("inf"))},
            lorahot.AdapterReadError,
            r"lora_unet_attn_to_q\.alpha: alpha must be one finite number other than 0, got shape \(\) value \[inf\]",
        ),
    ],
)
def test_refused_features_are_named(extra, error, message) -> None:
    with pytest.raises(error, match=message):
        lorahot.read_adapter(lora_pair("lora_unet_attn_to_q", "lora_down", "lora_up") | extra)


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_k": nn.Linear(8, 8)})


#: a LoRA on attn.to_q in each naming's spelling, and the stem of attn.to_k in it
_SPELLINGS = {
    "kohya": (lora_pair("lora_unet_attn_to_q", "lora_down", "lora_up"), "lora_unet_attn_to_k"),
    "comfyui": (lora_pair("diffusion_model.attn.to_q", "lora_A", "lora_B"), "diffusion_model.attn.to_k"),
    "diffusers": (lora_pair("transformer.attn.to_q", "lora_A", "lora_B"), "transformer.attn.to_k"),
    "peft": (lora_pair("attn.to_q", "lora_A", "lora_B"), "attn.to_k"),
}


@pytest.mark.parametrize("naming", sorted(_SPELLINGS))
@pytest.mark.parametrize(
    ("role", "tensor", "why"),
    [
        ("reshape_weight", torch.tensor([8, 16]), r"a reshape of the model's weight \(ComfyUI's reshape_weight"),
        ("set_weight", torch.ones(8, 8), r"a replacement weight \(ComfyUI's set_weight"),
    ],
)
def test_comfyui_weight_reshapes_and_replacements_are_refused_whole(
    naming: str, role: str, tensor: torch.Tensor, why: str
) -> None:
    """ComfyUI's ``<module>.reshape_weight`` (the layer zero-padded to a wider shape before its
    LoRA is added) and ``<module>.set_weight`` (the layer's weight replaced) make the file one for
    another model than this one: refused by name with why, in every naming, with strict=False
    too, every parameter bitwise unchanged. They were refused as 'not a LoRA key' of the naming,
    and skipped with strict=False while the file's LoRA weights loaded."""
    lora, stem = _SPELLINGS[naming]
    sd = lora | {f"{stem}.{role}": tensor}
    model = _TwoLinears()
    runtime = lorahot.inject(model, ["to_q", "to_k"], max_rank=4, merged=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(
            lorahot.UnknownFormatError, match=rf"{re.escape(stem)}\.{role}: {why}(.|\n)*strict=False too"
        ):
            runtime.load(dict(sd), strict=strict)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lycoris_norm_deltas_read_as_a_diff_module_and_are_refused_where_no_lycoris_is_read() -> None:
    """LyCORIS' ``train_norm`` saves ``<norm>.w_norm`` / ``<norm>.b_norm``: read as that module's
    ``diff`` / ``diff_b`` (merged mode folds them into an injected norm), as ComfyUI reads them; a
    naming that reads no LyCORIS names them and says where they load."""
    norm = {"lora_unet_norm.w_norm": torch.full((8,), 2.0), "lora_unet_norm.b_norm": torch.full((8,), 3.0)}
    adapter = lorahot.read_adapter(lora_pair("lora_unet_attn_to_q", "lora_down", "lora_up") | norm)
    module = adapter.weights["lora_unet_norm"]
    assert (module.kind, module.scale, sorted(module.factors)) == ("diff", 1.0, ["diff", "diff_b"])
    assert torch.equal(module.factors["diff"], norm["lora_unet_norm.w_norm"])
    assert torch.equal(module.factors["diff_b"], norm["lora_unet_norm.b_norm"])
    peft = lora_pair("base_model.model.attn.to_q", "lora_A", "lora_B") | {"base_model.model.norm.w_norm": torch.ones(8)}
    with pytest.raises(
        lorahot.UnknownFormatError,
        match=r"norm\.w_norm: LyCORIS norm-layer deltas \(w_norm, b_norm\): lorahot loads them in kohya or ComfyUI "
        r"naming, into norms injected with merged=True",
    ):
        lorahot.read_adapter(peft)


def test_dora_and_lora_bias_read_in_peft_naming() -> None:
    tensors = lora_pair("base_model.model.x", "lora_A", "lora_B")
    tensors |= {
        "base_model.model.x.lora_magnitude_vector": torch.ones(8),
        "base_model.model.x.lora_B.bias": torch.ones(8),
    }
    adapter = lorahot.read_adapter(tensors, config={"use_dora": True, "lora_bias": True})
    module = adapter.modules["x"]
    assert module.magnitude is not None and module.bias is not None


def test_unknown_naming_names_the_keys() -> None:
    with pytest.raises(lorahot.UnknownFormatError, match=r"model\.weird\.tensor: not a LoRA key of the peft naming"):
        lorahot.read_adapter(
            lora_pair("base_model.model.x", "lora_A", "lora_B") | {"model.weird.tensor": torch.ones(2)}
        )


def test_diffusers_metadata_rank_pattern(tmp_path: Path) -> None:
    tensors = lora_pair("unet.attn.to_q", "lora_A", "lora_B", rank=4) | lora_pair(
        "unet.attn.to_out.0", "lora_A", "lora_B", rank=2
    )
    meta = '{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"to_out.0": 2}, "unet.alpha_pattern": {"to_out.0": 1}}'  # noqa: E501
    save_file(tensors, tmp_path / "pytorch_lora_weights.safetensors", metadata={"lora_adapter_metadata": meta})
    adapter = lorahot.read_adapter(tmp_path)
    assert {k: m.scale for k, m in adapter.modules.items()} == {"unet.attn.to_q": 2.0, "unet.attn.to_out.0": 0.5}
    save_file(tensors, tmp_path / "bad.safetensors", metadata={"lora_adapter_metadata": '{"unet.r": 3}'})
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"unet\.attn\.to_q: lora_adapter_metadata \(unet\) says r=3, but unet\.attn\.to_q\.lora_A\.weight has shape \(4, 8\)",  # noqa: E501
    ):
        lorahot.read_adapter(tmp_path / "bad.safetensors")


def test_hostile_long_keys_do_not_pin_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Distinct 1 KB keys: the parse memos used to keep 65,536 entries per method, whatever their
    size. Now each keeps what fits its byte budget (1 MiB each here, to keep the test quick)."""
    from lorahot import formats
    from lorahot.formats import table
    from lorahot.memo import BoundedMemo

    for module, name in ((table, "_CLASSIFIED"), (formats, "_DETECTED")):
        memo = getattr(module, name)
        monkeypatch.setattr(module, name, BoundedMemo(1 << 20, memo._cost))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for batch in range(2):
            keys = [f"base_model.model.{batch}_{i}_{'x' * 980}.lora_A.weight" for i in range(2500)]
            assert detect(keys) is not None
            del keys
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 6 << 20, f"{kept / 2**20:.1f} MiB kept alive"  # unbounded: ~25 MiB


# -- features lorahot refuses, by config field and by key ------------------------------------

_PAIR = lora_pair("base_model.model.layers.0.q_proj", "lora_A", "lora_B")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"target_parameters": ["experts.gate_up_proj"]}, r'target_parameters=\["experts\.gate_up_proj"\]; LoRA on'),
        ({"modules_to_save": ["score"]}, r'modules_to_save=\["score"\]; full copies of these modules'),
        ({"trainable_token_indices": [1, 2]}, r"trainable_token_indices=\[1, 2\]; trainable tokens"),
        ({"alora_invocation_tokens": [5]}, r"alora_invocation_tokens=\[5\]; activated LoRA"),
        ({"layer_replication": [[0, 2]]}, r"layer_replication=\[\[0, 2\]\]; layer replication"),
        ({"use_qalora": True}, r"use_qalora=true; QA-LoRA"),
        ({"bias": "all"}, r'bias="all"; biases of the base model were trained'),
        ({"use_bdlora": {"target_modules_bd_a": ["q"], "nblocks": 2}}, r"use_bdlora=.*; BD-LoRA"),
        ({"arrow_config": {"top_k": 3}}, r"arrow_config=.*; Arrow"),
        ({"peft_type": "VERA"}, r'peft_type="VERA"; this is not a LoRA adapter \(PEFT.s peft_type LORA\)'),
        # AdaLoRA's rank_pattern (a mask per module) is no LoRA rank_pattern: the type is named, not the field
        ({"peft_type": "ADALORA", "rank_pattern": {"q": [True, False]}}, r'peft_type="ADALORA"; this is not a LoRA'),
        ({"enable_lora": [True, False, True]}, r"enable_lora=\[true, false, true\]; a config field lorahot does not"),
        ({"lora_parameters": {"scale": 20.0}}, r'lora_parameters=\{"scale": 20\.0\}; a config field lorahot does'),
    ],
)
def test_config_features_are_named(tmp_path: Path, config: dict, message: str) -> None:
    save_file(_PAIR, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, **config}))
    with pytest.raises(
        lorahot.UnknownFormatError,
        match=r"the adapter config turns on features lorahot does not load:\n  - adapter_config\.json: " + message,
    ):
        lorahot.read_adapter(tmp_path)


def test_unset_feature_fields_are_fine() -> None:
    """A guard against refusing too much: PEFT writes these defaults into every config."""
    defaults = {
        "modules_to_save": None, "trainable_token_indices": None, "target_parameters": [], "bias": "none",
        "use_qalora": False, "layer_replication": None, "alora_invocation_tokens": None, "lora_bias": False,
        "use_bdlora": None, "arrow_config": None, "peft_type": "LORA", "a_newer_field": None, "another": False,
        "init_lora_weights": True,
    }  # fmt: skip
    assert lorahot.read_adapter(_PAIR, config={"r": 2, **defaults}).ranks == {"layers.0.q_proj": 2}


@pytest.mark.parametrize("name", sorted(INERT))
def test_fields_that_do_not_change_the_computation_load_when_set(name: str) -> None:
    config = {"r": 2, "peft_type": "lora", name: {"x": 1} if name.endswith("_config") else ["x"]}
    assert lorahot.read_adapter(_PAIR, config=config).ranks == {"layers.0.q_proj": 2}


def test_an_unknown_field_set_to_null_by_config_loads(tmp_path: Path) -> None:
    save_file(_PAIR, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_scale_mode": "log"}))
    with pytest.raises(lorahot.UnknownFormatError, match=r'lora_scale_mode="log"; a config field lorahot does not'):
        lorahot.read_adapter(tmp_path)
    assert lorahot.read_adapter(tmp_path, config={"lora_scale_mode": None}).ranks == {"layers.0.q_proj": 2}


def test_features_in_diffusers_metadata_are_named_by_component(tmp_path: Path) -> None:
    meta = json.dumps({"unet.r": 2, "text_encoder.r": 2, "text_encoder.modules_to_save": ["final_layer_norm"]})
    tensors = lora_pair("unet.attn.to_q", "lora_A", "lora_B") | lora_pair("text_encoder.q_proj", "lora_A", "lora_B")
    save_file(tensors, tmp_path / "lora.safetensors", metadata={"lora_adapter_metadata": meta})
    with pytest.raises(
        lorahot.UnknownFormatError, match=r"lora_adapter_metadata \(text_encoder\): modules_to_save=\[\"final_layer"
    ):
        lorahot.read_adapter(tmp_path / "lora.safetensors")


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            "base_model.model.embed_tokens.token_adapter.trainable_tokens_delta",
            r"trainable tokens \(PEFT trainable_token_indices\)",
        ),
        ("base_model.model.experts.base_layer.lora_A.weight", r"LoRA on parameters such as MoE experts"),
        ("base_model.model.score.modules_to_save.default.weight", r"a full module copy \(PEFT modules_to_save\)"),
        ("base_model.model.score.weight", r"full weights of module 'base_model\.model\.score', not LoRA weights"),
        ("base_model.model.layers.0.q_proj.bias", r"full weights of module 'base_model\.model\.layers\.0\.q_proj'"),
    ],
)
def test_feature_keys_are_named_without_a_config(key: str, message: str) -> None:
    with pytest.raises(lorahot.UnknownFormatError, match=re.escape(key) + ": " + message):
        lorahot.read_adapter(_PAIR | {key: torch.ones(2, 8)})


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(4, 8, 16))  # (experts, in, out)
        self.down_proj = nn.Parameter(torch.randn(4, 16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.gate_up_proj[0] @ self.down_proj[0]


class _Tiny(nn.Module):
    """Enough of a transformers model for PEFT to save embeddings: get_input/output_embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 8)
        self.q_proj = nn.Linear(8, 8)
        self.experts = _Experts()
        self.score = nn.Linear(8, 3)
        self.lm_head = nn.Linear(8, 32, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.q_proj(self.embed_tokens(ids)))


@pytest.mark.parametrize(
    ("config", "with_config", "without_config"),
    [
        (
            {"target_modules": ["q_proj"], "modules_to_save": ["score"]},
            r'modules_to_save=\["score"\]; full copies',
            r"score\.weight: full weights of module 'base_model\.model\.score'",
        ),
        (
            {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [1, 2]}},
            r'trainable_token_indices=\{"embed_tokens": \[1, 2\]\}; trainable tokens',
            r"trainable_tokens_delta: trainable tokens \(PEFT trainable_token_indices\)",
        ),
        (
            {"target_modules": [], "target_parameters": ["experts.gate_up_proj"]},
            r'target_parameters=\["experts\.gate_up_proj"\]; LoRA on parameters',
            None,  # one parameter per module: its keys look like plain LoRA (the runtime finds no such layer)
        ),
        (
            {"target_modules": [], "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]},
            r"target_parameters=.*; LoRA on parameters",
            r"base_layer\.lora_A\.weight: LoRA on parameters such as MoE experts \(PEFT target_parameters\)",
        ),
    ],
)
def test_peft_saved_features_are_refused_with_and_without_their_config(
    tmp_path: Path, config: dict, with_config: str, without_config: str | None
) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    peft.get_peft_model(_Tiny(), peft.LoraConfig(r=2, **config)).save_pretrained(tmp_path)
    with pytest.raises(lorahot.UnknownFormatError, match=with_config):
        lorahot.read_adapter(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    if without_config is not None:
        with pytest.raises(lorahot.UnknownFormatError, match=without_config):
            lorahot.read_adapter(tmp_path)


def test_peft_embedding_base_layer_copies_are_carried(tmp_path: Path) -> None:
    """PEFT saves embed_tokens/lm_head base weights beside their LoRA (save_embedding_layers)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = _Tiny()
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens", "lm_head"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path, save_embedding_layers=True)
    adapter = lorahot.read_adapter(tmp_path)
    embed, head, q = (adapter.modules[k] for k in ("embed_tokens", "lm_head", "q_proj"))
    assert torch.equal(embed.base_weight, model.embed_tokens.base_layer.weight)
    assert torch.equal(head.base_weight, model.lm_head.base_layer.weight)
    assert q.base_weight is None
    assert "base_model.model.embed_tokens.base_layer.weight" in embed.source_keys
    renamed = lorahot.read_adapter(adapter, key_map={"lm_head": "output"}).modules["output"]
    assert renamed.base_weight is head.base_weight and renamed.source_keys == head.source_keys
    parts = {
        "blk.q": lorahot.LoraModule("blk.q", q.A, q.B, 2.0, base_weight=torch.zeros(8, 8)),
        "blk.k": lorahot.LoraModule("blk.k", q.A, q.B, 2.0),
    }
    with pytest.raises(lorahot.AdapterMismatchError, match=r"carry a base-layer weight copy, which cannot be fused"):
        lorahot.read_adapter(lorahot.Adapter(parts, "peft", "<mapping>"), fuse={"qk": ["q", "k"]})


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "flux-kohya"),
        ("lora_unet_single_blocks_3_linear1.lora_down.weight", "flux-kohya"),
        ("lora_unet_double_blocks_0_img_mlp_0.lora_down.weight", "flux-kohya"),
        ("lora_unet_single_blocks_0_modulation_lin.lora_down.weight", "flux-kohya"),
        ("lora_unet_double_blocks_0_img_mlp_fc1.lora_down.weight", "hunyuan-video-musubi"),
        ("lora_unet_double_blocks_2_txt_mod_linear.lora_down.weight", "hunyuan-video-musubi"),
        ("lora_unet_single_blocks_0_modulation_linear.lora_down.weight", "hunyuan-video-musubi"),
        ("lora_unet_txt_in_individual_token_refiner_blocks_0_self_attn_qkv.lora_down.weight", "hunyuan-video-musubi"),
        ("lora_unet_time_in_mlp_0.lora_down.weight", "hunyuan-video-musubi"),
        ("lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight", "kohya"),
        ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "kohya"),
        ("diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight", "flux-bfl"),
        ("double_blocks.0.img_attn.qkv.lora_A.weight", "flux-bfl"),
        ("diffusion_model.input_blocks.4.1.proj_in.lora_A.weight", "comfyui"),
        ("double_blocks.0.processor.qkv_lora1.down.weight", "flux-xlabs"),
        ("single_blocks.1.processor.proj_lora.down.weight", "flux-xlabs"),
        ("unet.mid_block.attentions.0.processor.to_q_lora.down.weight", "diffusers-old"),
        ("base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight", "flux-fal"),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "peft"),
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "diffusers"),
        ("diffusion_model.blocks.0.self_attn.q.lora_A.weight", "wan"),
        ("diffusion_model.blocks.3.ffn.0.lora_down.weight", "wan"),
        ("diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight", "comfyui"),
        ("diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight", "hunyuan-video"),
        ("transformer.double_blocks.1.txt_mlp.fc2.lora_A.weight", "hunyuan-video"),
        ("single_blocks.0.modulation.linear.lora_A.weight", "hunyuan-video"),
        ("txt_in.individual_token_refiner.blocks.0.self_attn_qkv.lora_A.weight", "hunyuan-video"),
        ("diffusion_model.time_in.mlp.0.lora_A.weight", "hunyuan-video"),
        ("diffusion_model.single_blocks.0.modulation.lin.lora_A.weight", "flux-bfl"),
        ("diffusion_model.layers.0.attention.qkv.lora_A.weight", "lumina2"),
        ("diffusion_model.noise_refiner.1.feed_forward.w2.lora_down.weight", "lumina2"),
        ("diffusion_model.layers.0.attn.to_q.lora_A.weight", "comfyui"),
        ("diffusion_model.adaln_single.linear.lora_A.weight", "ltx2"),
        ("diffusion_model.av_ca_a2v_gate_adaln_single.linear.lora_down.weight", "ltx2"),
        ("diffusion_model.transformer_blocks.0.audio_attn1.to_q.lora_A.weight", "comfyui"),
        ("diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight", "anima"),
        ("diffusion_model.blocks.2.adaln_modulation_mlp.1.lora_down.weight", "anima"),
        ("diffusion_model.blocks.0.self_attn.o.lora_A.weight", "wan"),
        ("diffusion_model.double_stream_blocks.0.block.attn1.to_q.lora_A.weight", "comfyui"),
        ("diffusion_model.single_blocks.0.q_proj.lora_A.weight", "flux3"),
        ("diffusion_model.content_mode_blocks.image.0.mlp_in.lora_down.weight", "flux3"),
        ("diffusion_model.single_blocks.0.linear1.lora_A.weight", "flux-bfl"),
        ("diffusion_model.blocks.0.attn.wq.lora_A.weight", "krea2"),
        ("base_model.model.txtfusion.refiner_blocks.0.mlp.gate.lora_A.weight", "peft"),
        ("diffusion_model.blocks.0.mlp.up.hada_w1_a", "krea2"),
        ("base_model.model.blocks.0.attn.to_q.lora_A.weight", "peft"),
        ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", "sd3-kohya"),
        ("diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight", "sd3"),
        ("transformer.joint_blocks.0.context_block.mlp.fc1.lora_A.weight", "sd3"),
        ("joint_blocks.0.x_block.attn.qkv.lora_A.weight", "sd3"),
        ("joint_blocks.1.context_block.adaLN_modulation.1.lora_down.weight", "sd3"),
        ("base_model.model.joint_blocks.0.x_block.attn.qkv.lora_A.weight", "peft"),
        ("transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight", "diffusers"),
        ("transformer_blocks.0.attn.to_q.lora_A.weight", "peft"),
        ("transformer.joint_transformer_blocks.0.attn.to_q.lora_A.weight", "diffusers"),
        # the original names in trainers' other spellings, and the diffusers names beside them
        ("lora_unet_blocks_0_attn_wq.lora_down.weight", "krea2-kohya"),
        ("lora_transformer_txtfusion_refiner_blocks_0_mlp_gate.lora_down.weight", "krea2-kohya"),
        ("blocks.0.attn.wq.lora_down.weight", "krea2"),
        ("lora_unet_single_blocks_0_q_proj.lora_down.weight", "flux3-kohya"),
        ("lora_unet_content_mode_blocks_image_0_mlp_in.lora_down.weight", "flux3-kohya"),
        ("transformer.single_blocks.0.q_proj.lora_A.weight", "flux3"),
        ("lora_unet_patchify_proj.lora_down.weight", "ltx2-kohya"),
        ("patchify_proj.lora_A.weight", "ltx2"),
        ("transformer.prompt_adaln_single.linear.lora_A.weight", "ltx2"),
        ("transformer.adaln_single.linear.lora_A.weight", "diffusers"),  # PixArt's own name
        ("adaln_single.linear.lora_A.weight", "peft"),
        ("lora_transformer_adaln_single_linear.lora_down.weight", "kohya"),
        ("net.blocks.0.self_attn.q_proj.lora_A.weight", "anima"),
        ("blocks.1.mlp.layer2.lora_down.weight", "anima"),
        ("transformer.blocks.0.self_attn.q.lora_A.weight", "wan"),
        ("transformer.blocks.0.attn1.to_q.lora_A.weight", "diffusers"),  # diffusers' Wan names
        ("transformer.blocks.0.ffn.net.0.proj.lora_A.weight", "diffusers"),
        ("transformer.blocks.0.attn.qkv_proj.lora_A.weight", "minimax-h3"),
        ("layers.0.feed_forward.w1.lora_A.weight", "peft"),  # Z-Image's own names: lumina2 keeps its prefixes
        ("transformer.layers.0.attention.to_q.lora_A.weight", "diffusers"),
    ],
)
def test_flux_namings_and_the_others_are_told_apart(key: str, name: str) -> None:
    up = key.replace("lora_A", "lora_B").replace("lora_down", "lora_up").replace(".down.", ".up.")
    fmt = detect([key, up])
    assert fmt is not None and fmt.name == name


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f.example.startswith("diffusion_model.")], ids=lambda f: f.name)
def test_namings_under_diffusion_model_take_model_diffusion_model_alike(fmt: KeyFormat) -> None:
    """ComfyUI also saves the transformer's keys under ``model.diffusion_model.``: Wan, Lumina2,
    LTX-2, Anima, Flux.3 and Krea 2 files so spelled read as ComfyUI naming, whose keys for the
    original names match no layer (flux-bfl, HunyuanVideo and ComfyUI naming took them)."""
    up = fmt.example.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
    keys = ["model." + fmt.example, "model." + up]
    found = detect(keys)
    assert found is not None and found.name == fmt.name
    module = found.parse(keys[0])
    assert module is not None and found.strip_prefix(module[0]) == fmt.strip_prefix(fmt.parse(fmt.example)[0])


def test_a_lora_key_spelled_as_another_naming_is_not_called_full_weights() -> None:
    """A key ending in a LoRA role this naming does not spell (``lora.up``, diffusers-old's) ends
    in ``.weight`` too: it was explained as a full module weight (modules_to_save)."""
    from lorahot.formats import format_named

    why = format_named("peft").explain("base_model.model.blocks.0.to_q.lora.up.weight")
    assert "a LoRA lora.up key that the peft naming does not spell this way" in why
    assert "full weights" not in why
    assert "full weights" in format_named("peft").explain("base_model.model.blocks.0.to_q.weight")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "lora_unet_double_blocks_0_img_norm1.diff",
            r"img_norm1\.diff: a delta of a normalization layer that has no weight or bias in Flux[\s\S]*"
            r"strict=False to skip it",
        ),
        (
            "lora_unet_final_layer_norm_final.diff_b",
            r"norm_final\.diff_b: a delta of a normalization layer that has no weight or bias in Flux[\s\S]*"
            r"strict=False to skip it",
        ),
    ],
)
def test_flux_kohya_refuses_deltas_in_its_own_words(extra: str, message: str) -> None:
    """A norm's ``.diff`` in a ``flux-kohya`` file was refused as 'lorahot loads them in kohya or
    ComfyUI naming', which the file already is. The delta of a norm without a weight (Flux's
    ``img_norm1``, ``norm_final``) says why it is not read and that ``strict=False`` skips it,
    which is what happens. (A module's ``.diff_b``, LyCORIS factors and the query/key norms'
    deltas are read, in merged mode: ``test_parity_flux2_lokr.py``,
    ``test_flux_query_key_norm_deltas_fold_into_diffusers_norms_in_merged_mode``.)"""
    tensors = lora_pair("lora_unet_double_blocks_0_img_attn_proj", "lora_down", "lora_up")
    tensors |= lora_pair("lora_unet_double_blocks_0_txt_attn_proj", "lora_down", "lora_up")
    tensors[extra] = torch.ones(8)
    with pytest.raises(lorahot.UnknownFormatError, match=message) as refused:
        lorahot.read_adapter(dict(tensors))
    assert "kohya or ComfyUI naming" not in str(refused.value)
    adapter = lorahot.read_adapter(dict(tensors), strict=False)
    assert adapter.format == "flux-kohya"
    assert set(adapter.skipped) == {extra}
    assert len(adapter.modules) == 2


@pytest.mark.parametrize(
    ("naming", "module", "other"),
    [
        ("sd3-kohya", "lora_unet_joint_blocks_0_x_block_attn_proj", "lora_unet_joint_blocks_0_x_block_mlp_fc1"),
        ("sd3", "diffusion_model.joint_blocks.0.x_block.attn.proj", "diffusion_model.joint_blocks.0.x_block.mlp.fc1"),
        ("flux-kohya", "lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_0_txt_attn_proj"),
        ("flux-bfl", "diffusion_model.double_blocks.0.img_attn.proj", "diffusion_model.double_blocks.0.txt_attn.proj"),
    ],
)
def test_a_dora_scale_in_a_naming_that_does_not_read_it_is_refused_in_its_own_words(
    naming: str, module: str, other: str
) -> None:
    """A ``dora_scale`` in a naming without LyCORIS rules (SD3's and Flux.1's, kohya-spelled or
    dotted) was refused as 'loaded ... as the dora_scale of a LyCORIS module in kohya or ComfyUI
    naming', which a ``sd3-kohya`` or ``flux-kohya`` file already is. The message says this
    naming does not read it and that ``strict=False`` skips the module, which is what happens."""
    down, up = ("lora_down", "lora_up") if "kohya" in naming else ("lora_A", "lora_B")
    tensors = lora_pair(module, down, up) | lora_pair(other, down, up)
    tensors[f"{module}.dora_scale"] = torch.ones(8, 1)
    with pytest.raises(
        lorahot.UnknownFormatError,
        match=rf"\({naming} naming\):\n  - {re.escape(module)}\.dora_scale: DoRA magnitude \(weight decomposition\), "
        r"which this naming does not read: .* load with strict=False to skip the module",
    ) as refused:
        lorahot.read_adapter(dict(tensors))
    assert "kohya or ComfyUI naming" not in str(refused.value)
    adapter = lorahot.read_adapter(dict(tensors), strict=False)
    assert adapter.format == naming and len(adapter.modules) == 1
    assert set(adapter.skipped) == {f"{module}.dora_scale", f"{module}.{down}.weight", f"{module}.{up}.weight"}


def test_a_refused_config_reads_as_sentences_on_one_line(tmp_path: Path) -> None:
    """``lorahot inspect`` prints an error on one line: each refused config's entry ends its
    sentence, so the fix that follows does not run into it."""
    save_file(_PAIR, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "peft_type": "LOHA"}))
    with pytest.raises(lorahot.UnknownFormatError) as refused:
        lorahot.read_adapter(tmp_path)
    assert "computes something else from its weights. lorahot loads plain LoRA" in " ".join(str(refused.value).split())


#: every naming with aliases, and each as a file that takes every set of its file aliases reads it
_ALIASED = [
    *(f for f in FORMATS if f.aliases),
    *(_taking(f, f.file_aliases) for f in FORMATS if f.file_aliases),
]


@pytest.mark.parametrize("fmt", _ALIASED, ids=lambda f: f.name + ("+file" if f not in FORMATS else ""))
def test_the_alias_prefilter_keeps_exactly_the_aliases_that_match(fmt: KeyFormat) -> None:
    """``alias_hits`` rejects a name no alias renames with one search of the aliases'
    alternation (PEFT naming has about a hundred; 20,000 unmatched keys took 0.2 s more when
    Krea 2's joined it): for names each alias matches (drawn from its own pattern, inside longer
    keys too) and names none does, it gives the aliases a search of each one gives, in order."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from lorahot.formats.table import alias_hits, any_alias

    assert any_alias(fmt.aliases) is not None
    drawn = st.one_of(
        *(st.from_regex(p, fullmatch=False) for p, _ in fmt.aliases),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.0123456789", max_size=60),
    )

    # the profile's example count (25 in make test), not 150 of its own: drawn per naming, each
    # example a key from one of its aliases' own patterns or none of them
    @settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(prefix=st.sampled_from(["", "base_model.model.", "x."]), name=drawn)
    def check(prefix: str, name: str) -> None:
        key = prefix + name
        assert alias_hits(fmt.aliases, key) == [(p, r) for p, r in fmt.aliases if re.search(p, key)]

    check()


def test_the_alias_prefilter_is_off_where_an_alternation_could_change_a_pattern() -> None:
    from lorahot.formats.table import alias_hits, any_alias

    backref = ((r"(a)\1$", "x"), (r"b$", "y"))
    assert any_alias(backref) is None and alias_hits(backref, "zaa") == [backref[0]]
    assert any_alias(((r"(?P<n>a)$", "x"),)) is None
    assert alias_hits(((r"^q$", "x"), (r"k$", "y")), "kk") == [(r"k$", "y")]


_KREA2_OWN = (
    *("blocks.3.attn.wq", "blocks.0.attn.gate", "blocks.12.mlp.up", "txtfusion.layerwise_blocks.0.attn.wo"),
    *("txtfusion.refiner_blocks.1.mlp.down", "tmlp.0", "tmlp.2", "tproj.1", "txtmlp.1", "txtmlp.3"),
    "txtfusion.projector",
)
_NOT_KREA2 = (
    *("first", "last.linear", "img_in", "blocks.0.attn.to_q", "blocks.0.attn.qkv", "enc.blocks.0.attn.wq"),
    *("blocks.0.attn.wq.x", "tmlp.1", "layers.0.attention.wq", "txtfusion", "model.tmlp.0"),
)


def test_peft_naming_takes_krea2_names_only_for_a_file_one_of_whose_keys_only_krea2_has() -> None:
    """PEFT naming took Krea 2's aliases (``first`` -> ``img_in``) in every file, where diffusers takes
    them in its Krea 2 loader alone. A file takes them where one of its module keys is a name only
    Krea 2 has (a block module, ``tmlp``, ``tproj``, ``txtmlp``, ``txtfusion``), under PEFT's prefix or
    not; never by ``first`` or ``last.linear`` (any model's), nor by another model's names."""
    from lorahot.formats import krea2, peft
    from lorahot.formats.table import alias_hits

    plain = peft.FORMAT.for_file(_NOT_KREA2)
    assert plain is peft.FORMAT and not alias_hits(plain.aliases, "first")
    for own in _KREA2_OWN:
        for key in (own, "base_model.model." + own):
            taken = peft.FORMAT.for_file(["first", key])
            assert taken is not peft.FORMAT and taken.name == "peft", key
            assert taken.aliases == (*peft.FORMAT.aliases, *krea2.MODULE_ALIASES)
            assert taken is peft.FORMAT.for_file([key]), key  # one format per set: lookups memoized per format
            assert [re.sub(p, r, "first") for p, r in alias_hits(taken.aliases, "first")] == ["img_in"]


_FLUX_OWN = (
    *("double_blocks.0.img_attn.proj", "single_blocks.3.linear2", "double_blocks.1.txt_mod.lin", "sformer_blocks.0.x"),
    *("time_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer", "distilled_guidance_layer.layers.2.out_layer"),
    *("single_stream_modulation.lin", "double_stream_modulation_txt.lin", "transformer.time_in.out_layer"),
)
_NOT_FLUX = (
    *("img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1", "x_embedder", "time_in.mlp.0"),
    *("transformer_blocks.0.attn.to_q", "double_blocks", "time_in.in_layer.x", "my_time_in.in_layer"),
)


def test_peft_naming_takes_flux_names_only_for_a_file_one_of_whose_keys_only_flux_has() -> None:
    """PEFT (and diffusers) naming took Flux's original names (``img_in`` -> ``x_embedder``) in every file, where
    diffusers renames them only in its Flux loaders, for a Flux file. A file takes them where one of
    its module keys is a name only Flux's original model has (a block module, an embedder's
    ``in_layer`` / ``out_layer``, Flux.2's modulations), under PEFT's prefix or not; never by
    ``img_in``, ``txt_in`` or ``final_layer.*`` (Qwen-Image's, HiDream's own names), nor by another
    model's names."""
    from lorahot.formats import diffusers, flux, krea2, peft, sd3
    from lorahot.formats.table import alias_hits

    plain = peft.FORMAT.for_file(_NOT_FLUX)
    assert plain is peft.FORMAT and not alias_hits(plain.aliases, "img_in")
    for own in _FLUX_OWN:
        for key in (own, "base_model.model." + own):
            taken = peft.FORMAT.for_file(["img_in", key])
            assert taken is not peft.FORMAT and taken.name == "peft", key
            assert taken.aliases == (*peft.FORMAT.aliases, *flux.ALIASES), key
            assert taken is peft.FORMAT.for_file([key]), key  # one format per set: lookups memoized per format
            assert [re.sub(p, r, "img_in") for p, r in alias_hits(taken.aliases, "img_in")] == ["x_embedder"]
    both = peft.FORMAT.for_file(["time_in.in_layer", "tmlp.0"])  # a file both mark takes both, in their order
    assert both.aliases == (*peft.FORMAT.aliases, *flux.ALIASES, *krea2.MODULE_ALIASES)
    # diffusers naming alike, under its component prefix
    assert diffusers.FORMAT.for_file([f"transformer.{k}" for k in _NOT_FLUX]) is diffusers.FORMAT
    taken = diffusers.FORMAT.for_file(["transformer.img_in", "transformer.time_in.in_layer"])
    assert taken.aliases == (*diffusers.FORMAT.aliases, *flux.ALIASES)
    # SD3's final_layer.linear -> proj_out (Flux's alias too) in a file that is SD3's
    taken = peft.FORMAT.for_file(["final_layer.linear", "base_model.model.y_embedder.mlp.2"])
    assert taken.aliases == (*peft.FORMAT.aliases, *sd3.FILE_ALIASES.aliases)
    assert [re.sub(p, r, "final_layer.linear") for p, r in alias_hits(taken.aliases, "final_layer.linear")] == [
        "proj_out"
    ]


#: module keys that mark a file as SD3's (names only its original model has), and as the Lumina
#: models' (Lumina2's original and diffusers names, Z-Image's, Ideogram 4's)
_SD3_OWN = (
    "y_embedder.mlp.0",
    "y_embedder.mlp.2",
    "joint_blocks.0.x_block.attn.qkv",
    "joint_blocks.3.context_block.mlp.fc1",
)
_LUMINA_OWN = (
    *("cap_embedder.1", "cap_embedder.0", "noise_refiner.0.attention.qkv", "context_refiner.1.feed_forward.w2"),
    *("layers.0.attention.qkv", "layers.2.attention.out", "layers.0.attention.o", "layers.1.adaLN_modulation.1"),
    *("layers.0.feed_forward.linear_1", "time_caption_embed.timestep_embedder.linear_1"),
)
#: module keys that mark neither: names other models have too (DiT's, PixArt's, Hunyuan-DiT's, Cosmos's,
#: Llama's originals), or that only contain one of the marks
_NOT_SD3_OR_LUMINA = (
    *(
        "x_embedder.proj",
        "t_embedder.mlp.0",
        "t_embedder.mlp.2",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
    ),
    *("context_embedder", "x_embedder", "y_embedder.y_proj.fc1", "y_embedder.mlp.1", "my_y_embedder.mlp.0"),
    *("layers.0.feed_forward.w1", "layers.0.attention.wq", "layers.0.adaLN_modulation.0", "cap_embedder.2"),
    *("transformer_blocks.0.attn.to_q", "joint_blocks.0.attn", "xcap_embedder.1", "pos_embed.proj"),
)


@pytest.mark.parametrize("naming", ["peft", "diffusers", "comfyui"])
def test_a_naming_takes_sd3_and_lumina2_outside_names_only_for_a_file_of_that_model(naming: str) -> None:
    """PEFT, diffusers and ComfyUI naming took SD3's and Lumina2's original names outside the blocks
    (``t_embedder.mlp.0`` -> ``time_text_embed.timestep_embedder.linear_1`` / ``time_caption_embed...``,
    ``x_embedder.proj`` -> ``pos_embed.proj``, ``final_layer.linear`` -> ``norm_out.linear_2``) in every
    file, and ComfyUI naming Flux's too, where no diffusers loader renames them (its SD3 loader converts
    nothing, its Lumina2 loader refuses them). A file takes each set where one of its module keys, under
    the naming's prefix, is a name only that model has; never by the names they share with DiT, PixArt,
    Cosmos or Llama."""
    from lorahot.formats import comfyui, diffusers, flux, lumina2, peft, sd3
    from lorahot.formats.table import alias_hits

    fmt = {"peft": peft.FORMAT, "diffusers": diffusers.FORMAT, "comfyui": comfyui.FORMAT}[naming]
    head = {"peft": "base_model.model.", "diffusers": "transformer.", "comfyui": "diffusion_model."}[naming]
    plain = fmt.for_file([head + k for k in _NOT_SD3_OR_LUMINA])
    assert plain is fmt
    for name in ("t_embedder.mlp.0", "x_embedder.proj", "final_layer.linear", "cap_embedder.1", "img_in"):
        assert not alias_hits(plain.aliases, name), name
    for own, taken_set in [
        *((k, sd3.FILE_ALIASES) for k in _SD3_OWN),
        *((k, lumina2.FILE_ALIASES) for k in _LUMINA_OWN),
    ]:
        taken = fmt.for_file([head + "t_embedder.mlp.0", head + own])
        assert taken.aliases == (*fmt.aliases, *taken_set.aliases), own
        assert taken is fmt.for_file([head + own]), own
    hits = {
        s.model: [
            re.sub(p, r, "t_embedder.mlp.0") for p, r in alias_hits(fmt.for_file([m]).aliases, "t_embedder.mlp.0")
        ]
        for s, m in ((sd3.FILE_ALIASES, "y_embedder.mlp.0"), (lumina2.FILE_ALIASES, "cap_embedder.1"))
    }
    assert hits == {
        "SD3": ["time_text_embed.timestep_embedder.linear_1"],
        "Lumina2": ["time_caption_embed.timestep_embedder.linear_1"],
    }
    if naming == "comfyui":  # Flux's names, as in the other two, only in a file that is Flux's
        taken = fmt.for_file([head + "img_in", head + "time_in.in_layer"])
        assert taken.aliases == (*fmt.aliases, *flux.ALIASES)


def test_a_models_paths_are_searched_for_its_mark_once_not_on_every_load() -> None:
    """A set taken by the model's own layers (``FileAliases.model_marker``) searches the model's
    paths once per model: each load resolves against the same paths, and the search over a large
    model's (20,000 paths: 12 ms) is not repeated per swap. The answer stays per model."""
    from lorahot.formats import flux
    from lorahot.formats.table import _model_has

    other = [f"blocks.{i}.attn.proj_{j}" for i in range(400) for j in range(50)]
    flux2 = [*other, "double_stream_modulation_img.linear"]
    names = ["blocks.0.attn.proj_0"]
    _model_has.cache_clear()
    assert not flux.ON_FLUX2.takes(names, other)
    assert flux.ON_FLUX2.takes(names, flux2)
    for _ in range(5):
        assert not flux.ON_FLUX2.takes(names, list(other))
        assert flux.ON_FLUX2.takes(names, list(flux2))
    info = _model_has.cache_info()
    assert (info.misses, info.hits) == (2, 10)
