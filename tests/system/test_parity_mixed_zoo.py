"""Mixed batches and stacks on model families and layer kinds the other parity tests do not
route: GPT-2's Conv1D (``fan_in_fan_out``), Phi-3's fused ``qkv_proj``/``gate_up_proj``, BERT
with token type ids and padded attention masks, Qwen2, OPT (whose MLP sees its tokens flattened
to ``[B * T, d]``), SD3's transformer with its conv patch embed, and a UNet. Three adapters of
different ranks, alphas and targets (rank and alpha patterns, rsLoRA, LoRA bias, DoRA) per row
against PEFT's ``adapter_names=`` forward (or PEFT row by row, where PEFT refuses the batch:
flattened tokens, DoRA), base rows bitwise; stacks at weights that include negative ones and 0
against PEFT's multiple active adapters, merged and unmerged, re-weighted, with a part left out,
routed beside a single adapter and emptied mid-way. All in float64."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import lorahot
from tests.helpers import TINY_DECODER

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

V = TINY_DECODER["vocab_size"]
#: the adapters' names as PEFT's adapter_names takes them, one per row ("__base__": no adapter)
ROWS = ["a", "__base__", "c", "b", "a", "c"]


def _ids(rows: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """Left-padded token ids: rows 0 and 3 start with 3 and 5 padding positions."""
    ids = torch.randint(3, V, (rows, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[3 % rows, :5] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(config)


def _phi3() -> torch.nn.Module:
    config = transformers.Phi3Config(**{**TINY_DECODER, "max_position_embeddings": 64, "pad_token_id": 0})
    return transformers.Phi3ForCausalLM(config)


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4
    )
    return transformers.BertModel(config)


def _qwen2() -> torch.nn.Module:
    config = transformers.Qwen2Config(**{**TINY_DECODER, "max_position_embeddings": 64})
    return transformers.Qwen2ForCausalLM(config)


def _opt() -> torch.nn.Module:
    config = transformers.OPTConfig(
        vocab_size=V,
        hidden_size=32,
        ffn_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    )
    return transformers.OPTForCausalLM(config)


def _sd3() -> torch.nn.Module:
    diffusers = pytest.importorskip("diffusers")
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=16,
    )


def _text_with_types(rows: int) -> dict[str, torch.Tensor]:
    x = _ids(rows)
    types = torch.zeros_like(x["input_ids"])
    types[:, 5:] = 1
    return {**x, "token_type_ids": types}


def _sd3_inputs(rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return {
        "hidden_states": torch.randn(rows, 4, 8, 8, generator=g, dtype=torch.float64),
        "encoder_hidden_states": torch.randn(rows, 5, 16, generator=g, dtype=torch.float64),
        "pooled_projections": torch.randn(rows, 12, generator=g, dtype=torch.float64),
        "timestep": torch.arange(rows) * 97 + 3,
    }


#: name -> (model builder, inputs of ``rows`` rows, the three adapters' LoraConfig fields, the targets)
ROUTED: dict[str, tuple[Callable[[], torch.nn.Module], Callable[[int], dict], dict[str, dict[str, Any]], list[str]]] = {
    "gpt2-conv1d": (
        _gpt2,
        _ids,
        {
            "a": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True},
            "b": {
                "r": 8,
                "lora_alpha": 4,
                "target_modules": ["c_attn", "c_proj", "c_fc"],
                "fan_in_fan_out": True,
                "rank_pattern": {"c_fc": 2},
                "alpha_pattern": {"c_proj": 16},
            },
            "c": {"r": 2, "lora_alpha": 6, "target_modules": ["c_fc", "wte"], "use_rslora": True},
        },
        ["c_attn", "c_proj", "c_fc", "wte"],
    ),
    "phi3-fused-lora-bias": (
        _phi3,
        _ids,
        {
            "a": {"r": 4, "lora_alpha": 8, "target_modules": ["qkv_proj"]},
            "b": {
                "r": 8,
                "lora_alpha": 4,
                "target_modules": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                "rank_pattern": {"gate_up_proj": 2},
                "lora_bias": True,
            },
            "c": {"r": 2, "lora_alpha": 6, "target_modules": ["gate_up_proj"], "use_rslora": True},
        },
        ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    ),
    "bert-token-types-padding": (
        _bert,
        _text_with_types,
        {
            "a": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
            "b": {
                "r": 8,
                "lora_alpha": 4,
                "target_modules": ["query", "key", "value", "dense"],
                "alpha_pattern": {"key": 1},
            },
            "c": {"r": 2, "lora_alpha": 6, "target_modules": ["word_embeddings", "dense"], "use_rslora": True},
        },
        ["query", "key", "value", "dense", "word_embeddings"],
    ),
    "qwen2-lora-bias": (
        _qwen2,
        _ids,
        {
            "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj"], "lora_bias": True},
            "b": {"r": 8, "lora_alpha": 4, "target_modules": "all-linear", "rank_pattern": {"k_proj": 3}},
            "c": {"r": 2, "lora_alpha": 6, "target_modules": ["embed_tokens", "down_proj"], "use_rslora": True},
        },
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"],
    ),
}

#: models whose batch PEFT's adapter_names refuses (OPT's MLP sees [B * T, d]; DoRA): PEFT row by row
ROW_BY_ROW: dict[
    str, tuple[Callable[[], torch.nn.Module], Callable[[int], dict], dict[str, dict[str, Any]], list[str]]
] = {
    "opt-flattened-tokens": (
        _opt,
        _ids,
        {
            "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "project_in", "project_out"]},
            "b": {"r": 8, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "fc1", "fc2"], "use_dora": True},
            "c": {"r": 2, "lora_alpha": 6, "target_modules": ["fc1"], "use_rslora": True},
        },
        ["q_proj", "k_proj", "v_proj", "fc1", "fc2", "project_in", "project_out"],
    ),
    "sd3-conv-patch-embed": (
        _sd3,
        _sd3_inputs,
        {
            "a": {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "add_k_proj", "pos_embed.proj"]},
            "b": {
                "r": 8,
                "lora_alpha": 4,
                "target_modules": ["to_k", "to_out.0", "ff.net.2", "context_embedder", "linear_1", "norm1.linear"],
                "use_dora": True,
            },
            "c": {
                "r": 2,
                "lora_alpha": 6,
                "target_modules": ["pos_embed.proj", "proj_out", "norm_out.linear", "to_add_out"],
                "use_rslora": True,
                "lora_bias": True,
            },
        },
        [
            "to_q",
            "to_k",
            "to_out.0",
            "add_k_proj",
            "pos_embed.proj",
            "ff.net.2",
            "context_embedder",
            "linear_1",
            "norm1.linear",
            "proj_out",
            "norm_out.linear",
            "to_add_out",
        ],
    ),
}


def _save(base: torch.nn.Module, path: Path, seed: int, **config: Any) -> Path:
    """A PEFT LoRA with random A, B (and LoRA bias) large enough to matter, saved to ``path``."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path, save_embedding_layers=False)
    return path


def _floats(out: object) -> list[torch.Tensor]:
    """The floating-point tensors of a model's output (logits, hidden states, samples)."""
    found, todo = [], [out]
    while todo:
        item = todo.pop(0)
        if isinstance(item, torch.Tensor):
            found += [item] if item.is_floating_point() else []
        elif hasattr(item, "to_tuple"):
            todo += list(item.to_tuple())
        elif isinstance(item, (list, tuple)):
            todo += list(item)
    return found


def _saved_with_oracle(
    tmp_path: Path, build: Callable[[], torch.nn.Module], configs: dict[str, dict]
) -> tuple[torch.nn.Module, dict[str, Path], Any]:
    """The float64 base model, each adapter of ``configs`` saved under its name (seeded by its
    place), and PEFT holding them all by name, the first active."""
    torch.manual_seed(0)
    base = build().double().eval()
    paths = {name: _save(base, tmp_path / name, seed, **cfg) for seed, (name, cfg) in enumerate(configs.items())}
    first, *rest = paths
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths[first], adapter_name=first).eval()
    for name in rest:
        oracle.load_adapter(paths[name], adapter_name=name)
    return base, paths, oracle


def _setup(
    tmp_path: Path, build: Callable[[], torch.nn.Module], configs: dict[str, dict], targets: list[str]
) -> tuple[torch.nn.Module, Any, torch.nn.Module, lorahot.LoraRuntime]:
    """The float64 base model, PEFT holding the adapters by name, and lorahot with one per slot."""
    base, paths, oracle = _saved_with_oracle(tmp_path, build, configs)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, targets, max_rank=8, slots=3, extras=True, dtype=torch.float64)
    for slot, name in enumerate(configs):
        runtime.load(paths[name], slot=slot)
    runtime.activate([{"a": 0, "b": 1, "c": 2}.get(r, -1) for r in ROWS])
    return base, oracle, model, runtime


def _row_by_row(oracle: Any, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """PEFT's outputs with each row run alone, its adapter active (none for ``__base__``)."""
    outs = []
    for i, name in enumerate(ROWS):
        row = {k: v[i : i + 1] for k, v in inputs.items()}
        with torch.no_grad():
            if name == "__base__":
                with oracle.disable_adapter():
                    outs.append(_floats(oracle(**row)))
            else:
                oracle.set_adapter(name)
                outs.append(_floats(oracle(**row)))
    return _rows_together(outs)


def _rows_together(outs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-row outputs (each a list of one-row tensors) put back together as one batch's."""
    return [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]


def _assert_rows(got: list[torch.Tensor], want: list[torch.Tensor], plain: list[torch.Tensor]) -> None:
    """Each batched output's rows are the oracle's (float64 rounding) and change the base's; the
    base rows are the base model's bitwise."""
    batched = [(a, b, p) for a, b, p in zip(got, want, plain, strict=True) if b.shape[:1] == (len(ROWS),)]
    assert batched
    for a, b, p in batched:
        for i, name in enumerate(ROWS):
            assert float((a[i] - b[i]).norm() / b[i].norm()) < 1e-12, (i, name)
            if name == "__base__":
                assert torch.equal(a[i], p[i])
            else:
                assert float((b[i] - p[i]).norm() / p[i].norm()) > 1e-4, (i, name)  # the adapter matters


@pytest.mark.parametrize("name", list(ROUTED))
def test_a_routing_over_three_adapters_matches_peft_adapter_names(tmp_path: Path, name: str) -> None:
    build, inputs, configs, targets = ROUTED[name]
    base, oracle, model, _ = _setup(tmp_path, build, configs, targets)
    x = inputs(len(ROWS))
    with torch.no_grad():
        want = _floats(oracle(**x, adapter_names=ROWS))
        got, plain = _floats(model(**x)), _floats(base(**x))
    _assert_rows(got, want, plain)


@pytest.mark.parametrize("name", list(ROW_BY_ROW))
def test_a_routing_over_three_adapters_matches_peft_row_by_row(tmp_path: Path, name: str) -> None:
    """OPT's MLP sees its tokens flattened (``[B * T, d]``, which PEFT's adapter_names refuses)
    and DoRA does not run under adapter_names: each row against PEFT run on it alone."""
    build, inputs, configs, targets = ROW_BY_ROW[name]
    base, oracle, model, runtime = _setup(tmp_path, build, configs, targets)
    x = inputs(len(ROWS))
    with torch.no_grad():
        got, plain = _floats(model(**x)), _floats(base(**x))
    _assert_rows(got, _row_by_row(oracle, x), plain)
    runtime.unload(2)  # an emptied routed slot: its rows compute the base output at once
    with torch.no_grad():
        after = _floats(model(**x))
    for a, g, p in zip(after, got, plain, strict=True):
        for i, name in enumerate(ROWS):
            assert torch.equal(a[i], p[i] if name in ("c", "__base__") else g[i]), (i, name)


def _weighted(oracle: Any, names: list[str], weights: list[float]) -> None:
    """PEFT with ``names`` active together, each at its weight (diffusers' set_adapters)."""
    oracle.base_model.set_adapter(names)
    for module in oracle.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name, w in zip(names, weights, strict=True):
                if name in module.scaling:
                    module.set_scale(name, w)


def _peft(oracle: Any, x: dict[str, torch.Tensor], names: list[str], weights: list[float]) -> list[torch.Tensor]:
    with torch.no_grad():
        if not names:
            with oracle.disable_adapter():
                return _floats(oracle(**x))
        _weighted(oracle, names, weights)
        return _floats(oracle(**x))


def _close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want, strict=True):
        assert float((a - b).norm() / b.norm()) < 1e-12


STACKED = {
    "gpt2-conv1d": (
        _gpt2,
        ROUTED["gpt2-conv1d"][2],
        ["c_attn", "c_proj", "c_fc", "wte"],
        False,
    ),
    "bert-dora-part": (
        _bert,
        {
            "a": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "word_embeddings"]},
            "b": {
                "r": 8,
                "lora_alpha": 4,
                "target_modules": ["key", "dense"],
                "alpha_pattern": {"key": 1},
                "use_dora": True,
            },
        },
        ["query", "key", "value", "dense", "word_embeddings"],
        True,
    ),
}


@pytest.mark.parametrize(
    ("name", "merged"), [("gpt2-conv1d", False), ("bert-dora-part", False), ("bert-dora-part", True)]
)
def test_a_stack_at_negative_and_zero_weights_matches_peft_multiple_active_adapters(
    tmp_path: Path, name: str, merged: bool
) -> None:
    """Loaded, re-weighted (a list, then one number), and loaded again without its first part;
    unmerged also routed beside a single adapter and a base row, re-weighted while routed, and
    emptied while routed (its rows then bitwise the base model's)."""
    build, configs, targets, _ = STACKED[name]
    base, saved, oracle = _saved_with_oracle(tmp_path, build, configs)
    names, paths = list(saved), list(saved.values())
    model = copy.deepcopy(base)
    plan = lorahot.plan_targets(paths, model, stacked=True)
    runtime = lorahot.inject(
        model, targets, max_rank=plan.max_rank, slots=2, extras=True, merged=merged, dtype=torch.float64
    )
    x = _ids(4)
    first, second = [0.8, -0.5, 0.0][: len(names)], [-1.5, 0.0, 2.0][: len(names)]
    runtime.load(paths, scale=first, slot=0)
    with torch.no_grad():
        _close(_floats(model(**x)), _peft(oracle, x, names, first))
        runtime.set_scale(second, slot=0)
        _close(_floats(model(**x)), _peft(oracle, x, names, second))
        runtime.set_scale(0.7, slot=0)
        _close(_floats(model(**x)), _peft(oracle, x, names, [0.7] * len(names)))
        runtime.load(paths[1:], scale=second[1:], slot=0)  # the first part left out
        _close(_floats(model(**x)), _peft(oracle, x, names[1:], second[1:]))
    if merged:
        return
    runtime.load(paths, scale=first, slot=0)
    runtime.load(paths[0], scale=0.5, slot=1)
    runtime.activate([0, 1, -1, 0])
    rows = [(names, first), (names[:1], [0.5]), ([], []), (names, first)]

    def expected(rows: list[tuple[list[str], list[float]]]) -> list[torch.Tensor]:
        return _rows_together(
            [_peft(oracle, {k: v[i : i + 1] for k, v in x.items()}, *row) for i, row in enumerate(rows)]
        )

    with torch.no_grad():
        plain = _floats(base(**x))
        _close(_floats(model(**x)), expected(rows))
        runtime.set_scale(second, slot=0)
        _close(_floats(model(**x)), expected([(names, second), *rows[1:3], (names, second)]))
        runtime.unload(0)
        emptied = _floats(model(**x))
    for a, p in zip(emptied, plain, strict=True):
        assert torch.equal(a[0], p[0]) and torch.equal(a[3], p[3]) and torch.equal(a[2], p[2])
