"""Mixed batches against two oracles: PEFT's ``adapter_names=`` forward on a tiny Llama with
three adapters of different ranks and targets, and each row run alone with its slot active on
a conv model (plain LoRA, DoRA and LoRA bias)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import lorahot
from tests.helpers import ConvEmbed, make_adapter, tiny_llama, tiny_unet

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


#: Three adapters: different ranks, targets (attention only, everything, MLP and embedding) and alphas.
ADAPTERS = {
    "a": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "b": {
        "r": 8,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {"k_proj": 2},
    },
    "c": {"r": 2, "lora_alpha": 6, "target_modules": ["up_proj", "down_proj", "embed_tokens"]},
}
#: The same three in float64 with what else a PEFT LoraConfig carries per adapter: rsLoRA (its
#: scale ``alpha / sqrt(r)``), a LoRA bias on layers without a bias of their own, an alpha
#: pattern, and the embedding and the LM head among the targets.
CONFIGURED = {
    "a": {**ADAPTERS["a"], "use_rslora": True, "lora_bias": True},
    "b": {
        **ADAPTERS["b"],
        "target_modules": [*ADAPTERS["b"]["target_modules"], "lm_head"],
        "alpha_pattern": {"o_proj": 3},
    },
    "c": {**ADAPTERS["c"], "use_rslora": True},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]


def _save(base: torch.nn.Module, path: Path, seed: int, **config) -> Path:
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path, save_embedding_layers=False)
    return path


@pytest.mark.parametrize(
    ("adapters", "dtype", "tolerance"),
    [(ADAPTERS, torch.float32, 1e-5), (CONFIGURED, torch.float64, 1e-12)],
    ids=["float32", "float64-rslora-lora-bias-lm-head"],
)
def test_mixed_batch_matches_peft_adapter_names_per_row(
    tmp_path: Path, adapters: dict, dtype: torch.dtype, tolerance: float
) -> None:
    base = tiny_llama().to(dtype)
    paths = {name: _save(base, tmp_path / name, seed, **cfg) for seed, (name, cfg) in enumerate(adapters.items())}
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths["a"], adapter_name="a").eval()
    for name in ("b", "c"):
        oracle.load_adapter(paths[name], adapter_name=name)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=8, slots=3, extras=True, dtype=dtype)
    for slot, name in enumerate(adapters):
        runtime.load(paths[name], slot=slot)
    ids = torch.randint(0, 64, (6, 9), generator=torch.Generator().manual_seed(1))
    names = ["a", "__base__", "c", "b", "a", "c"]
    runtime.activate([{"a": 0, "b": 1, "c": 2}.get(n, -1) for n in names])
    with torch.no_grad():
        got = model(input_ids=ids).logits
        want = oracle(input_ids=ids, adapter_names=names).logits
        plain = base(input_ids=ids).logits
    for i in range(len(names)):
        err = float((got[i] - want[i]).norm() / want[i].norm())
        assert err < tolerance, (i, names[i], err)
        if names[i] != "__base__":
            assert float((want[i] - plain[i]).norm() / plain[i].norm()) > 1e-3  # the adapter matters
    assert torch.equal(got[1], plain[1])  # the base row: bitwise the base model


def test_conv_model_rows_equal_each_row_alone_with_dora_and_lora_bias(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = ConvEmbed().double().eval()
    configs = [
        {"r": 4, "lora_alpha": 6, "target_modules": ["embed", "conv", "head"]},
        {"r": 2, "lora_alpha": 3, "target_modules": ["conv", "head"], "use_dora": True},
        {"r": 3, "lora_alpha": 2, "target_modules": ["conv", "head"], "lora_bias": True},
    ]
    paths = [_save(base, tmp_path / str(k), 10 + k, **cfg) for k, cfg in enumerate(configs)]
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["embed", "conv", "head"], max_rank=4, slots=3, extras=True)
    for slot, path in enumerate(paths):
        runtime.load(path, slot=slot, scale=0.5 + slot)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (5, 7), generator=g)
    pixels = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64)
    route = [2, 0, -1, 1, 2]
    runtime.activate(route)
    with torch.no_grad():
        mixed = model(ids, pixels)
        plain = base(ids, pixels)
        for i, slot in enumerate(route):
            runtime.activate(slot if slot >= 0 else 0)
            if slot < 0:
                runtime.set_scale(0.0, slot=0)
            alone = model(ids[i : i + 1], pixels[i : i + 1])
            if slot < 0:
                runtime.set_scale(0.5, slot=0)
                assert torch.equal(mixed[i], plain[i])  # the base row: bitwise the base model
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-12, atol=1e-12)


def _xlnet() -> torch.nn.Module:
    config = transformers.XLNetConfig(vocab_size=64, d_model=16, n_layer=2, n_head=2, d_inner=32)
    return transformers.XLNetLMHeadModel(config)


def _fsmt() -> torch.nn.Module:
    config = transformers.FSMTConfig(
        langs=["en", "de"],
        src_vocab_size=64,
        tgt_vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    return transformers.FSMTForConditionalGeneration(config)


@pytest.mark.parametrize("build", [_xlnet, _fsmt], ids=["xlnet", "fsmt"])
def test_a_sequence_first_transformers_model_refuses_a_routing_its_shapes_would_take(build) -> None:
    """XLNet and FSMT run their layers on ``[T, B, d]``: three rows of three tokens fit a
    routing of 3 by every layer's shape, and each row took the slots of time steps (max abs
    diff 0.24 for XLNet, 3.2 for FSMT against each row run alone with its slot, float64). The
    routing is refused at activate, naming the layers, and the outputs stay bitwise."""
    torch.manual_seed(0)
    model = build().double().eval()
    runtime = lorahot.inject(model, "all-linear", max_rank=4, slots=2, dtype=torch.float64)
    for slot in range(2):
        runtime.load(
            make_adapter(model, dict.fromkeys(runtime.layers, 2), seed=slot, dtype=torch.float64)[0], slot=slot
        )
    ids = torch.randint(2, 64, (3, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids, decoder_input_ids=ids) if build is _fsmt else model(input_ids=ids)
    with pytest.raises(
        lorahot.UsageError, match=r"slot 0, whose adapter has weights on layers that see .*sequence-first"
    ):
        runtime.activate([0, 1, -1])
    assert runtime.routing is None
    with torch.no_grad():
        after = model(input_ids=ids, decoder_input_ids=ids) if build is _fsmt else model(input_ids=ids)
    assert torch.equal(after.logits, before.logits)


@pytest.mark.parametrize(
    ("options", "repeat"),
    [
        ({"do_sample": False}, 1),
        ({"do_sample": True}, 1),
        ({"do_sample": False, "num_beams": 3, "num_return_sequences": 2}, 3),
        ({"do_sample": True, "num_return_sequences": 2}, 2),
        ({"do_sample": False, "cache_implementation": "static"}, 1),
        ({"do_sample": False, "use_cache": False}, 1),
    ],
    ids=["greedy", "sample", "beams", "sample-sequences", "static-cache", "no-cache"],
)
def test_generate_with_a_routing_matches_peft_adapter_names(tmp_path: Path, options: dict, repeat: int) -> None:
    """``generate()`` on left-padded prompts under a routing (each entry repeated ``k`` times
    where the batch is expanded to ``k`` rows per prompt: beams, returned sequences) gives
    PEFT's ``generate(adapter_names=...)`` tokens and scores (float64). Beam search reorders
    beams within each prompt's group, so the routing holds at every step."""
    base = tiny_llama(max_position_embeddings=64).double()
    base.generation_config.pad_token_id = 1
    paths = {name: _save(base, tmp_path / name, seed, **ADAPTERS[name]) for seed, name in enumerate(("a", "c"))}
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths["a"], adapter_name="a").eval()
    oracle.load_adapter(paths["c"], adapter_name="c")
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, TARGETS, max_rank=8, slots=2, dtype=torch.float64)
    runtime.load(paths["a"], slot=0)
    runtime.load(paths["c"], slot=1)
    ids = torch.randint(2, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = mask[2, :1] = 0
    ids[mask == 0] = 1
    names = ["c", "__base__", "a"]
    runtime.activate([s for s in (1, -1, 0) for _ in range(repeat)])
    beams = "num_beams" in options
    given = names if beams else [n for n in names for _ in range(repeat)]  # PEFT repeats them for beams only
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "return_dict_in_generate": True, "output_scores": True}
    with torch.no_grad():
        torch.manual_seed(5)
        got = model.generate(ids, **kwargs, **options)
        torch.manual_seed(5)
        want = oracle.generate(input_ids=ids, adapter_names=given, **kwargs, **options)
    assert torch.equal(got.sequences, want.sequences)
    for mine, theirs in zip(got.scores, want.scores):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("guidance", [5.0, 1.0], ids=["guided", "unguided"])
def test_a_pipeline_with_guidance_and_images_per_prompt_routes_as_expanded(guidance: float) -> None:
    """A diffusers pipeline repeats each prompt's rows in place for ``num_images_per_prompt=k``
    and, with guidance, doubles the batch (``[uncond; cond]``): routed ``r + r`` with ``r``
    each prompt's slot repeated ``k`` times (``r`` alone unguided), every image equals its
    prompt run alone with its slot active, the unconditional rows on that slot too (float64)."""
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet(cross_attention_dim=16).double()
    pipe = diffusers.StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    runtime = lorahot.inject(unet, ["to_q", "to_k", "to_v", "to_out.0", "conv1"], max_rank=4, slots=2)
    for slot in range(2):
        runtime.load(
            make_adapter(unet, dict.fromkeys(runtime.layers, 2 + slot), seed=slot, dtype=torch.float64)[0], slot=slot
        )
    g = torch.Generator().manual_seed(0)
    prompts, k, slots = 2, 2, [1, 0]
    embeds, negative = (torch.randn(prompts, 5, 16, generator=g, dtype=torch.float64) for _ in range(2))
    latents = torch.randn(prompts * k, 4, 8, 8, generator=g, dtype=torch.float64)

    def images(rows: slice, per_prompt: int, latent_rows: slice) -> torch.Tensor:
        with torch.no_grad():
            return pipe(
                prompt_embeds=embeds[rows],
                negative_prompt_embeds=negative[rows],
                latents=latents[latent_rows],
                num_images_per_prompt=per_prompt,
                num_inference_steps=2,
                guidance_scale=guidance,
                output_type="latent",
                height=8,
                width=8,
            ).images

    r = [s for s in slots for _ in range(k)]
    runtime.activate(r + r if guidance > 1 else r)
    got = images(slice(None), k, slice(None))
    for j in range(prompts * k):
        runtime.activate(slots[j // k])
        alone = images(slice(j // k, j // k + 1), 1, slice(j, j + 1))
        torch.testing.assert_close(got[j : j + 1], alone, rtol=1e-10, atol=1e-10)


class _Labelled(torch.nn.Module):
    """Token ids ``[B, T]``, plus a 1-D lookup every row adds: its class label (``labels [B]``, one
    id per row, as a class-conditional DiT's) or its positions (``arange(T)``, every row's,
    as nanoGPT's ``wpe``)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.extra, self.head = torch.nn.Embedding(32, 8), torch.nn.Embedding(16, 8), torch.nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        lookup = self.extra(extra)  # [B, 8] per row, or [T, 8] every row shares
        out: torch.Tensor = self.head(self.wte(ids) + (lookup[:, None] if extra.shape[0] != ids.shape[1] else lookup))
        return out


@pytest.mark.parametrize("kind", ["class labels", "positions with T == B"])
def test_1d_ids_of_the_batch_s_length_take_one_row_s_slot_each_as_peft_adapter_names_does(
    tmp_path: Path, kind: str
) -> None:
    """An embedding's 1-D ids ``[B]`` under a routing of ``B`` rows are read one id per row, as
    class labels are: each row equals it run alone with its slot, and PEFT's ``adapter_names=``.
    Positions every row shares, ``arange(T)`` with ``T == B``, have that shape too: position
    ``t`` takes row ``t``'s slot, as in PEFT's mixed batch (README, "What the shapes cannot
    show"; ``T != B`` is refused)."""
    torch.manual_seed(0)
    base = _Labelled().double().eval()
    config = {"r": 2, "lora_alpha": 2, "target_modules": ["extra", "head"]}
    paths = {name: _save(base, tmp_path / name, seed, **config) for seed, name in enumerate("ab")}
    oracle = peft.PeftModel.from_pretrained(copy.deepcopy(base), paths["a"], adapter_name="a").eval()
    oracle.load_adapter(paths["b"], adapter_name="b")
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["extra", "head"], max_rank=2, slots=2)
    for slot, name in enumerate("ab"):
        runtime.load(paths[name], slot=slot)
    ids = torch.randint(0, 32, (3, 3 if kind != "class labels" else 5), generator=torch.Generator().manual_seed(1))
    extra = torch.tensor([7, 2, 7]) if kind == "class labels" else torch.arange(3)
    runtime.activate([1, 0, -1])
    with torch.no_grad():
        got = model(ids, extra)
        torch.testing.assert_close(
            got, oracle(ids, extra, adapter_names=["b", "a", "__base__"]), rtol=1e-12, atol=1e-12
        )
        for i, slot in enumerate([1, 0]):
            runtime.activate(slot)
            alone = model(ids[i : i + 1], extra[i : i + 1] if kind == "class labels" else extra)
            off = float((got[i : i + 1] - alone).abs().max())
            assert off < 1e-12 if kind == "class labels" else off > 0.1, (i, off)
        runtime.activate([1, 0])
        with pytest.raises(lorahot.UsageError, match=r"^extra \(LoRAEmbedding.*its input \(3,\) does not fit"):
            model(ids[:2], extra)  # T != B: refused, not split
