"""Module keys meet the injected layers: model-name matching, aliases, prefix= and key_map=, and
the errors for keys that do not map."""

from __future__ import annotations

import gc
import re
import time
import tracemalloc

import pytest
import torch
from torch import nn

import lorahot
from lorahot.resolve import resolve_keys
from lorahot.resolve.keys import COMPONENT_NAMES
from tests.helpers import TinyLM, lora_pair


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


def test_prefix_matches_whole_components_only() -> None:
    """prefix='text_encoder' used to take text_encoder_2's modules (prefix + '_'), silently."""
    _, runtime = _runtime()
    te2 = lora_pair("text_encoder_2.text_model.q_proj", "lora_A", "lora_B")
    with pytest.raises(
        lorahot.UsageError,
        match=r"prefix='text_encoder' matches no module key; keys start with text_encoder_2 \(a prefix matches whole "
        r"components, up to '\.'\)",
    ):
        runtime.load(te2, prefix="text_encoder")
    assert set(runtime.load(te2, prefix="text_encoder_2").ranks) == {"text_model.q_proj"}
    kohya = lora_pair("lora_te1_text_model_q_proj", "lora_down", "lora_up")
    with pytest.raises(lorahot.UsageError, match=r"prefix='lora_te' matches no module key; keys start with lora_te1 "):
        runtime.load(kohya, prefix="lora_te")
    for prefix in ("lora_te1", "lora_te1_"):
        assert set(runtime.load(kohya, prefix=prefix).ranks) == {"text_model.q_proj"}


def test_fuse_parts_are_found_by_the_namings_separator() -> None:
    tensors = lora_pair("base_model.model.attn.to_q", "lora_A", "lora_B") | lora_pair(
        "base_model.model.attn.to_k", "lora_A", "lora_B"
    )
    # 'to_q' ends in '_q', but in a dotted naming the part is the whole last component
    assert set(lorahot.read_adapter(tensors, fuse={"qk": ["q", ("k", 8)]}).modules) == {"attn.to_q", "attn.to_k"}
    assert set(lorahot.read_adapter(tensors, fuse={"to_qk": ["to_q", "to_k"]}).modules) == {"attn.to_qk"}


def test_ldm_names_with_indices_sd_does_not_have_map_nowhere() -> None:
    model = nn.ModuleDict(
        {
            "up_blocks": nn.ModuleList(
                [nn.ModuleDict({"attentions": nn.ModuleList([nn.ModuleDict({"proj_in": nn.Linear(8, 8)})])})]
            )
        }
    )
    runtime = lorahot.inject(model, ["proj_in"], max_rank=4)
    assert set(runtime.load(lora_pair("lora_unet_output_blocks_0_1_proj_in", "lora_down", "lora_up")).ranks) == {
        "up_blocks.0.attentions.0.proj_in"
    }
    for bad in ("lora_unet_output_blocks_0_7_proj_in", "lora_unet_input_blocks_1_5_proj_in"):
        with pytest.raises(lorahot.AdapterMismatchError, match=rf"{bad}: matches no injected layer"):
            runtime.load(lora_pair(bad, "lora_down", "lora_up"))


@pytest.mark.parametrize(
    ("key_map", "message"),
    [
        ({"(" * 5000 + ")" * 5000: "x"}, r"is not a valid regex \(maximum recursion depth"),
        ({"a{4294967296}": "x"}, r"is not a valid regex \(the repetition number is too large"),
        ({"(net)": r"\5"}, r"replacement '\\\\5' is not valid \(invalid group reference 5 at position 1\)"),
        ({"(net)": 5}, r"key_map entries must map str to str"),
        ({5: "x"}, r"key_map entries must map str to str"),
    ],
)
def test_bad_key_map_entries_are_usage_errors(key_map: dict, message: str) -> None:
    with pytest.raises(lorahot.UsageError, match=message):
        lorahot.read_adapter(lora_pair("base_model.model.net", "lora_A", "lora_B"), key_map=key_map)


def test_hostile_long_keys_do_not_pin_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmatched 1 KB keys: the lookup memo used to keep up to 65,536 of them, whatever their
    size; now each model's index keeps what fits its byte budget (256 KiB here)."""
    from lorahot.resolve import keys as resolve_module

    monkeypatch.setattr(resolve_module, "_LOOKUP_BYTES", 256 << 10)
    resolve_module._index.cache_clear()
    a, b = torch.zeros(1, 8), torch.zeros(1, 8)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        keys = [f"{i}.{'k' * 1000}" for i in range(3000)]
        adapter = lorahot.Adapter({k: lorahot.LoraModule(k, a, b, 1.0) for k in keys}, "peft", "<mapping>")
        with pytest.raises(lorahot.AdapterMismatchError, match=r"matches no injected layer"):
            resolve_keys(adapter, ["text_model.q_proj", "attn.to_q"])
        del keys, adapter
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        resolve_module._index.cache_clear()
    assert kept < 1 << 20, f"{kept / 2**20:.1f} MiB kept alive"  # unbounded: ~3.5 MiB


def test_many_unmatched_keys_against_many_layers_stay_fast() -> None:
    """Each suffix lookup used to scan every layer name: 20,000 keys x 1,000 layers took ~9 s."""
    names = [f"model.layers.{i // 7}.mlp.proj_{i % 7}" for i in range(1000)]
    a, b = torch.zeros(1, 1), torch.zeros(1, 1)
    for fmt, stem in (("peft", "x{}.y.z"), ("kohya", "lora_unet_x{}_y_z")):
        keys = [stem.format(i) for i in range(20_000)]
        adapter = lorahot.Adapter({k: lorahot.LoraModule(k, a, b, 1.0) for k in keys}, fmt, "<mapping>")
        start = time.perf_counter()
        with pytest.raises(lorahot.AdapterMismatchError, match=r"and 19980 more"):
            resolve_keys(adapter, names)
        assert time.perf_counter() - start < 3


def test_long_underscore_keys_without_digits_stay_fast() -> None:
    """The wrapper-dropping step tested every ``_`` of a key and rescanned the key each time,
    quadratic in its length: 3,600 kohya keys of about 1,000 characters (within every cap on
    files) took 35-48 s to refuse."""
    names = [f"model.layers.{i}.mlp.proj" for i in range(50)]
    a, b = torch.zeros(1, 1), torch.zeros(1, 1)
    keys = [f"lora_unet_{'a_' * 500}{i:x}".replace("0", "g").replace("1", "h") for i in range(3600)]
    adapter = lorahot.Adapter({k: lorahot.LoraModule(k, a, b, 1.0) for k in keys}, "kohya", "<mapping>")
    start = time.perf_counter()
    with pytest.raises(lorahot.AdapterMismatchError, match=r"and 3580 more"):
        resolve_keys(adapter, names)
    assert time.perf_counter() - start < 5


class _Flux(nn.Module):
    """Flux's two kinds of block, whose names one underscore form nests in the other
    (``single_transformer_blocks_0_attn_to_q`` ends with ``transformer_blocks_0_attn_to_q``)."""

    def __init__(self) -> None:
        super().__init__()
        attn = lambda: nn.ModuleDict({"attn": nn.ModuleDict({"to_q": nn.Linear(8, 8)})})  # noqa: E731
        self.transformer_blocks = nn.ModuleList([attn()])
        self.single_transformer_blocks = nn.ModuleList([attn()])


@pytest.mark.parametrize(
    ("injected", "key"),
    [
        ("transformer_blocks.0.attn.to_q", "lora_transformer_single_transformer_blocks_0_attn_to_q"),
        ("single_transformer_blocks.0.attn.to_q", "lora_transformer_transformer_blocks_0_attn_to_q"),
    ],
)
def test_a_key_naming_a_module_that_is_not_injected_lands_nowhere(injected: str, key: str) -> None:
    """The key names the other block's layer, which is not injected: it matches nothing (and
    strict=False skips it), where its underscore form also fit the injected layer (dropping
    ``single`` as a wrapper, or as a ``_``-suffix) and it was loaded there silently."""
    model = _Flux()
    runtime = lorahot.inject(model, [injected], max_rank=4)
    x = torch.randn(2, 8)
    layer = model.get_submodule(injected)
    before = layer(x)
    stray = lora_pair(key, "lora_down", "lora_up")
    with pytest.raises(lorahot.AdapterMismatchError, match=f"{key}: matches no injected layer"):
        runtime.load(stray)
    assert torch.equal(layer(x), before)
    own = lora_pair("lora_transformer_" + injected.replace(".", "_"), "lora_down", "lora_up")
    info = runtime.load(stray | own, strict=False)
    assert set(info.ranks) == {injected}
    assert set(info.skipped) == set(stray)


def test_keys_naming_other_modules_are_not_matched_by_the_resolver() -> None:
    """``resolve_keys`` with the model's other module paths: the key resolves onto the injected
    layer without them (the old guess) and onto nothing with them."""
    from lorahot.resolve.keys import outside

    model = _Flux()
    names = ["transformer_blocks.0.attn.to_q"]
    stray = lora_pair("lora_transformer_single_transformer_blocks_0_attn_to_q", "lora_down", "lora_up")
    adapter = lorahot.read_adapter(stray)
    assert list(resolve_keys(adapter, names)) == names
    others = outside([n for n, _ in model.named_modules()], names)
    assert "single_transformer_blocks.0.attn.to_q" in others
    assert names[0] not in others and "" not in others
    skipped: list[str] = []
    assert resolve_keys(adapter, names, skipped, others) == {}
    assert set(skipped) == set(stray)


def test_old_diffusers_text_encoder_keys_reach_a_model_without_their_wrapper_level() -> None:
    """diffusers' attention-processor naming (``...self_attn.to_q_lora.down``) of a text encoder
    with a ``text_model.`` level, on a transformers-5 CLIP without it: the aliases (``to_q`` ->
    ``q_proj``) apply to the suffix match too, which is what skips the missing level."""
    model = nn.ModuleDict(
        {
            "encoder": nn.ModuleDict(
                {
                    "layers": nn.ModuleList(
                        [
                            nn.ModuleDict(
                                {"self_attn": nn.ModuleDict({"q_proj": nn.Linear(8, 8), "out_proj": nn.Linear(8, 8)})}
                            )
                        ]
                    )
                }
            )
        }
    )
    runtime = lorahot.inject(model, ["q_proj", "out_proj"], max_rank=4)
    stem = "text_encoder.text_model.encoder.layers.0.self_attn"
    tensors = lora_pair(f"{stem}.to_q_lora", "down", "up") | lora_pair(f"{stem}.to_out_lora", "down", "up")
    assert set(runtime.load(tensors).ranks) == {
        "encoder.layers.0.self_attn.q_proj",
        "encoder.layers.0.self_attn.out_proj",
    }


def test_fuse_reaches_a_fused_layer_at_the_model_root() -> None:
    """Parts whose keys have no parent (``q_proj`` on the root module) fuse into the root's
    ``qkv_proj``: only keys under a parent were looked for."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"qkv_proj": nn.Linear(8, 24)})
    runtime = lorahot.inject(model, ["qkv_proj"], max_rank=8)
    tensors = lora_pair("base_model.model.q_proj", "lora_A", "lora_B") | lora_pair(
        "base_model.model.v_proj", "lora_A", "lora_B"
    )
    info = runtime.load(tensors, fuse={"qkv_proj": ["q_proj", ("k_proj", 8), "v_proj"]})
    assert info.ranks == {"qkv_proj": 4}
    x = torch.randn(3, 8)
    q, v = (
        tensors[f"base_model.model.{n}.lora_B.weight"] @ tensors[f"base_model.model.{n}.lora_A.weight"]
        for n in ("q_proj", "v_proj")
    )
    delta = torch.cat([x @ q.T, torch.zeros(3, 8), x @ v.T], 1)
    with torch.no_grad():
        torch.testing.assert_close(model["qkv_proj"](x), model["qkv_proj"].base_layer(x) + delta)


def test_fuse_keeps_a_float64_part_beside_a_float32_one() -> None:
    """Parts saved in different dtypes fuse in the widest of them: the fused A and B took the
    first part's dtype, so a float64 part beside a float32 one was rounded to float32 (about
    1e-8 off in a float64 model); now the fused layer computes each part's float64 update as
    its own layer would."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"qkv_proj": nn.Linear(8, 24)}).double()
    runtime = lorahot.inject(model, ["qkv_proj"], max_rank=8)
    g = torch.Generator().manual_seed(1)
    a_q, b_q = torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)  # float32
    a_v, b_v = (torch.randn(*shape, generator=g, dtype=torch.float64) / 3 for shape in ((2, 8), (8, 2)))
    tensors = {
        "base_model.model.q_proj.lora_A.weight": a_q,
        "base_model.model.q_proj.lora_B.weight": b_q,
        "base_model.model.v_proj.lora_A.weight": a_v,
        "base_model.model.v_proj.lora_B.weight": b_v,
    }
    runtime.load(tensors, fuse={"qkv_proj": ["q_proj", ("k_proj", 8), "v_proj"]})
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    delta = torch.cat(
        [x @ (b_q.double() @ a_q.double()).T, torch.zeros(3, 8, dtype=torch.float64), x @ (b_v @ a_v).T], 1
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model["qkv_proj"](x), model["qkv_proj"].base_layer(x) + delta, rtol=1e-13, atol=1e-13
        )


def _top_level_and_one_block() -> nn.Module:
    """Top-level layers with generic names beside a module and a block of the same model (a
    diffusers transformer's ``proj_in``, ``time_embedder.linear_1``, ``transformer_blocks.0``)."""
    block = nn.ModuleDict({"adaln_proj": nn.ModuleDict({"linear": nn.Linear(8, 8)})})
    return nn.ModuleDict(
        {
            "proj_in": nn.Linear(8, 8),
            "time_embedder": nn.ModuleDict({"linear_1": nn.Linear(8, 8)}),
            "transformer_blocks": nn.ModuleList([block]),
        }
    )


#: the MiniMax-H3 names below in each spelling: (stray key, a key of time_embedder.linear_1, A and B roles)
_DOTTED, _BARE, _KOHYA = ("lora_A", "lora_B"), ("lora_A", "lora_B"), ("lora_down", "lora_up")


@pytest.mark.parametrize(
    ("key", "own", "roles"),
    [
        # the model has time_embedder, whose layer is linear_1: proj_in under it names nothing
        ("diffusion_model.time_embedder.proj_in", "diffusion_model.time_embedder.linear_1", _DOTTED),
        ("time_embedder.proj_in", "time_embedder.linear_1", _BARE),
        ("lora_unet_time_embedder_proj_in", "lora_unet_time_embedder_linear_1", _KOHYA),
        # a module outside the blocks: not block 0's adaln_proj.linear
        ("lora_unet_final_layer_adaln_proj_linear", "lora_unet_time_embedder_linear_1", _KOHYA),
        # a pipeline component the model is not (no naming strips it): its modules, never the model's
        ("vae.proj_in", "time_embedder.linear_1", _BARE),
        ("image_encoder.time_embedder.linear_1", "time_embedder.linear_1", _BARE),
        ("audio_vae.transformer_blocks.0.adaln_proj.linear", "time_embedder.linear_1", _BARE),
    ],
)
def test_a_key_of_another_models_module_never_lands_on_a_layer_it_only_ends_like(
    key: str, own: str, roles: tuple[str, str]
) -> None:
    """Keys in another model's own names (MiniMax-H3's ``time_embedder.proj_in`` and
    ``final_layer.adaln_proj.linear``) match no layer: the levels a suffix match skips are
    wrappers, so a skipped level that names a module of the model (``time_embedder``) or holds
    a block index of the layer (``transformer_blocks.0``) is none. They landed on ``proj_in``
    and on block 0's ``adaln_proj.linear``, silently; strict=False skips them."""
    model = _top_level_and_one_block()
    runtime = lorahot.inject(model, ["proj_in", "linear_1", "linear"], max_rank=4)
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = {n: model.get_submodule(n)(x) for n in runtime.layers}
    stray = lora_pair(key, *roles)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"{key}: matches no injected layer"):
        runtime.load(stray)
    with torch.no_grad():
        assert all(torch.equal(model.get_submodule(n)(x), before[n]) for n in runtime.layers)
    info = runtime.load(stray | lora_pair(own, *roles), strict=False)
    assert set(info.ranks) == {"time_embedder.linear_1"} and set(info.skipped) == set(stray)
    component = key.partition(".")[0]
    if component in COMPONENT_NAMES:  # the refusal says where such a module belongs
        with pytest.raises(
            lorahot.AdapterMismatchError,
            match=rf"'{component}' is a pipeline component(.|\n)*'{component}': pipe\.{component}(.|\n)*"
            rf"prefix='{component}'",
        ):
            runtime.load(stray)


@pytest.mark.parametrize(
    ("layers", "placed"),
    [
        (["blocks.0.attn1.to_q", "blocks.0.ff.net.0.proj", "blocks.0.ff.net.2"], None),  # diffusers' Hunyuan-DiT
        (["transformer_blocks.0.ff.net.0.proj"], "transformer_blocks.0.ff.net.0.proj"),
    ],
    ids=["another model's blocks", "MiniMax-H3's blocks"],
)
def test_a_fused_module_s_part_never_lands_on_a_name_it_only_ends_like(layers: list[str], placed: str | None) -> None:
    """A kohya file of ``blocks_N_mlp_fc1`` modules alone reads as MiniMax-H3's musubi naming,
    whose ``mlp.fc1`` (a SwiGLU's ``[gate; value]``) lands on ``transformer_blocks.N.ff.net.0.proj``
    with its halves swapped. On a model whose blocks are ``blocks.N`` (diffusers' Hunyuan-DiT,
    whose ``mlp.fc1`` is no SwiGLU) the underscore lookup dropped ``transformer_`` from
    ``transformer_blocks`` as if it were a wrapper level and loaded the swapped halves there: a
    wrong output, silently. A key that spells its levels with dots drops whole levels only, so
    the module matches no layer there; on MiniMax-H3's own names it lands as before."""
    A, B = torch.randn(2, 12), torch.randn(8, 2)
    adapter = lorahot.read_adapter(
        {"lora_unet_blocks_0_mlp_fc1.lora_down.weight": A, "lora_unet_blocks_0_mlp_fc1.lora_up.weight": B}
    )
    assert adapter.format == "minimax-h3-musubi"
    if placed is None:
        with pytest.raises(lorahot.AdapterMismatchError, match=r"blocks_0_mlp_fc1.*matches no injected layer"):
            resolve_keys(adapter, layers)
        return
    module = resolve_keys(adapter, layers)[placed]
    assert torch.equal(module.B, torch.cat([B[4:], B[:4]]))


class _OwnNamesUnderAWrapper(nn.Module):
    """Modules named as Krea 2's and Lumina2's originals under a wrapper (``enc.first``,
    ``enc.layers.0.attention.out``), and at the root the diffusers layers PEFT naming aliases those
    names to (``img_in``, ``layers.0.attn.to_out.0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Module()
        self.enc.first = nn.Linear(4, 4)
        self.enc.layers = nn.ModuleList([nn.Module()])
        self.enc.layers[0].attention = nn.Module()
        self.enc.layers[0].attention.out = nn.Linear(4, 4)
        self.img_in = nn.Linear(4, 4)
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].attn = nn.Module()
        self.layers[0].attn.to_out = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize(
    ("key", "layer"), [("first", "enc.first"), ("layers.0.attention.out", "enc.layers.0.attention.out")]
)
def test_a_peft_key_that_names_a_layer_under_a_wrapper_keeps_it_over_an_alias(key: str, layer: str) -> None:
    """PEFT naming's aliases (Krea 2's ``first`` -> ``img_in``, Lumina2's ``attention.out`` ->
    ``attn.to_out.0``) stand for names that are no layer of the model. A PEFT key that is one, under
    a wrapper level the file leaves out, loads there, the float64 reference, and nothing else
    changes; the aliases took it first and placed it on the other layer, silently."""
    model, g = _OwnNamesUnderAWrapper(), torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    x = torch.randn(3, 4, generator=g)
    state = {f"base_model.model.{key}.lora_A.weight": a, f"base_model.model.{key}.lora_B.weight": b}
    _loads_on_only(model, runtime, state, layer, x, a, b)


def _loads_on_only(
    model: nn.Module,
    runtime: lorahot.LoraRuntime,
    state: dict[str, torch.Tensor],
    layer: str,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
) -> lorahot.AdapterInfo:
    """Loads ``state`` (one module, ``b @ a``) and checks that ``layer`` gives its float64 reference on
    ``x`` and every other injected layer what it gave before, bitwise; the load's info."""
    with torch.no_grad():
        before = {n: model.get_submodule(n)(x) for n in runtime.layers}
    info = runtime.load(state)
    with torch.no_grad():
        after = {n: model.get_submodule(n)(x) for n in runtime.layers}
        base = model.get_submodule(layer).base_layer
        want = x.double() @ (base.weight.double() + b.double() @ a.double()).T + base.bias.double()
    torch.testing.assert_close(after[layer].double(), want, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(after[n], before[n]) for n in runtime.layers if n != layer)
    return info


class _KreaShaped(nn.Module):
    """The diffusers-named layers PEFT naming aliases Krea 2's original names to: ``img_in`` and
    ``final_layer.linear`` (``first``, ``last.linear``, names any model may have), ``time_embed.linear_1``
    (``tmlp.0``) and ``transformer_blocks.0.attn.to_q`` (``blocks.0.attn.wq``), names only Krea 2 has."""

    def __init__(self) -> None:
        super().__init__()
        self.img_in = nn.Linear(4, 4)
        self.final_layer = nn.Module()
        self.final_layer.linear = nn.Linear(4, 4)
        self.time_embed = nn.Module()
        self.time_embed.linear_1 = nn.Linear(4, 4)
        self.transformer_blocks = nn.ModuleList([nn.Module()])
        self.transformer_blocks[0].attn = nn.Module()
        self.transformer_blocks[0].attn.to_q = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _peft(module: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"base_model.model.{module}.lora_A.weight": torch.randn(2, 4, generator=g),
        f"base_model.model.{module}.lora_B.weight": torch.randn(4, 2, generator=g),
    }


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize(("key", "layer"), [("first", "img_in"), ("last.linear", "final_layer.linear")])
def test_a_peft_file_takes_krea2_names_only_where_a_key_only_krea2_has_marks_it(key: str, layer: str) -> None:
    """PEFT naming took Krea 2's aliases in every file, so a PEFT file of another model whose module
    is ``first`` (or ``last.linear``), names any model may have, loaded onto ``img_in`` (or
    ``final_layer.linear``), silently: diffusers renames Krea 2's names in its Krea 2 loader alone.
    Such a file is refused naming the key (every parameter and buffer bitwise unchanged) and skipped
    with ``strict=False``, the rest loading; beside a key only Krea 2 has (``tmlp.0``,
    ``blocks.0.attn.wq``: AI-Toolkit's Krea 2 file) it lands on the diffusers layer at the float64
    reference."""
    model, g = _KreaShaped(), torch.Generator().manual_seed(3)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    lone = _peft(key, g)
    before = _state(model)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"  - {re.escape(key)}: matches no injected layer") as e:
        runtime.load(lone)
    assert "naming places it at" not in str(e.value)  # no alias of it taken
    assert all(torch.equal(t, before[n]) for n, t in _state(model).items()) and _state(model).keys() == before.keys()
    own = _peft("time_embed.linear_1", g)  # the model's own name: it loads, the stray is skipped
    info = runtime.load(lone | own, strict=False)
    assert set(info.skipped) == set(lone) and set(info.ranks) == {"time_embed.linear_1"}
    for marker, marked in (("tmlp.0", "time_embed.linear_1"), ("blocks.0.attn.wq", "transformer_blocks.0.attn.to_q")):
        tensors = lone | _peft(marker, g)
        runtime.load(tensors)
        x = torch.randn(3, 4, generator=g, dtype=torch.float64)
        for module, name in ((key, layer), (marker, marked)):
            a, b = (tensors[f"base_model.model.{module}.lora_{r}.weight"].double() for r in "AB")
            base = model.get_submodule(name).base_layer
            want = x @ (base.weight.double() + b @ a).T + base.bias.double()
            with torch.no_grad():
                got = model.get_submodule(name)(x.float()).double()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("roles", [("lora.down", "lora.up"), ("lora_linear_layer.down", "lora_linear_layer.up")])
def test_an_old_diffusers_key_that_names_a_layer_under_a_wrapper_keeps_it_over_an_alias(roles: tuple[str, str]) -> None:
    """The old diffusers naming's aliases (Lumina2's ``layers.0.attention.out`` -> ``attn.to_out.0``, read
    for ComfyUI's dotted roles on bare Lumina2 names) were tried before the key's own path under a
    wrapper level the file leaves out, so a key that is the model's own ``enc.layers.0.attention.out``
    went to ``layers.0.attn.to_out.0``, silently. A dotted key's own path now comes first: it loads there,
    the float64 reference, every other layer bitwise as before; where the model has no such layer the
    alias still places it."""
    key = "layers.0.attention.out"
    for model, layer in ((_OwnNamesUnderAWrapper(), "enc.layers.0.attention.out"), (None, "layers.0.attn.to_out.0")):
        if model is None:  # the alias where the key's own path is no layer of the model
            model = _OwnNamesUnderAWrapper()
            del model.enc.layers
        g = torch.Generator().manual_seed(4)
        a, b = torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g)
        runtime = lorahot.inject(model, "all-linear", max_rank=2)
        x = torch.randn(3, 4, generator=g)
        state = {f"{key}.{roles[0]}.weight": a, f"{key}.{roles[1]}.weight": b}
        info = _loads_on_only(model, runtime, state, layer, x, a, b)
        assert info.format == "diffusers-old" and set(info.ranks) == {layer}


class _FluxShaped(nn.Module):
    """The diffusers-named layers PEFT naming aliases Flux's original names to, and no layer of
    those names: ``x_embedder``, ``context_embedder`` and ``proj_out`` (``img_in``, ``txt_in``,
    ``final_layer.linear``: Qwen-Image's, HiDream's, any model's own names too) and
    ``time_text_embed.timestep_embedder.linear_1`` / ``text_embedder.linear_2`` (``time_in.in_layer``,
    ``vector_in.out_layer``: names of Flux's original model)."""

    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(4, 4)
        self.context_embedder = nn.Linear(4, 4)
        self.proj_out = nn.Linear(4, 4)
        self.time_text_embed = nn.Module()
        self.time_text_embed.timestep_embedder = nn.Module()
        self.time_text_embed.timestep_embedder.linear_1 = nn.Linear(4, 4)
        self.time_text_embed.text_embedder = nn.Module()
        self.time_text_embed.text_embedder.linear_2 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("head", ["base_model.model.", "", "transformer."], ids=["peft", "bare", "diffusers"])
@pytest.mark.parametrize(
    ("key", "layer"),
    [("img_in", "x_embedder"), ("txt_in", "context_embedder"), ("final_layer.linear", "proj_out")],
)
def test_a_file_takes_flux_names_only_where_a_key_only_flux_has_marks_it(key: str, layer: str, head: str) -> None:
    """PEFT and diffusers naming took Flux's original names (``img_in`` -> ``x_embedder``) in every
    file, so a PEFT or diffusers file of another model whose module is ``img_in`` (Qwen-Image's own
    name), ``txt_in`` or ``final_layer.linear`` loaded onto ``x_embedder`` (``context_embedder``,
    ``proj_out``) of a model without a layer of that name, silently: diffusers renames Flux's names
    under ``base_model.model.`` in its Flux.2 loader, and in its Flux.1 loader only in a file of
    Flux's blocks (fal's Kontext files; bare, BFL's control LoRAs), under ``transformer.`` never,
    nor in another model's loader. Such
    a file is refused naming the key (every parameter and buffer bitwise unchanged) and skipped
    with ``strict=False``, the rest loading; beside a key only Flux's original model has
    (``time_in.in_layer``, ``vector_in.out_layer``) it lands on the diffusers layer at the float64
    reference."""
    model, g = _FluxShaped(), torch.Generator().manual_seed(5)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)

    def peft(module: str) -> dict[str, torch.Tensor]:
        return {k.replace("base_model.model.", head): t for k, t in _peft(module, g).items()}

    lone = peft(key)
    before = _state(model)
    shown = ("transformer." if head == "transformer." else "") + key  # diffusers naming keeps its prefix
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"  - {re.escape(shown)}: matches no injected layer") as e:
        runtime.load(lone)
    assert not re.search(rf"places it at [^\n]*\b{re.escape(layer)}\b", str(e.value))  # Flux's alias not taken
    assert all(torch.equal(t, before[n]) for n, t in _state(model).items()) and _state(model).keys() == before.keys()
    own = peft("proj_out" if layer != "proj_out" else "x_embedder")  # a layer of the model's own: it loads
    info = runtime.load(lone | own, strict=False)
    assert set(info.skipped) == set(lone) and len(info.ranks) == 1
    marks = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1"}
    marks["vector_in.out_layer"] = "time_text_embed.text_embedder.linear_2"
    for marker, marked in marks.items():
        tensors = lone | peft(marker)
        runtime.load(tensors)
        x = torch.randn(3, 4, generator=g, dtype=torch.float64)
        for module, name in ((key, layer), (marker, marked)):
            a, b = (tensors[f"{head}{module}.lora_{r}.weight"].double() for r in "AB")
            base = model.get_submodule(name).base_layer
            want = x @ (base.weight.double() + b @ a).T + base.bias.double()
            with torch.no_grad():
                got = model.get_submodule(name)(x.float()).double()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["transformer.img_in", "transformer.layers.0.self_attn.q_pro"])
def test_a_key_under_an_injected_component_that_names_none_of_its_layers_says_so(key: str) -> None:
    """On a pipeline runtime, a key under a component's name that matches no layer of that component
    (``transformer.img_in``) was refused with "'transformer' is a pipeline component ... inject it", the
    component being injected. It is named as injected, with its closest layers; nothing changes."""
    transformer, encoder = TinyLM(layers=1), TinyLM(layers=1)
    runtime = lorahot.inject({"transformer": transformer, "text_encoder": encoder}, ["q_proj", "k_proj"], max_rank=4)
    before = {c: _state(m) for c, m in (("transformer", transformer), ("text_encoder", encoder))}
    with pytest.raises(lorahot.AdapterMismatchError) as e:
        runtime.load(lora_pair(key, "lora_A", "lora_B", fin=16, fout=16))
    text = str(e.value)
    assert f"{key}: matches no injected layer (closest: layers.0.self_attn." in text
    assert "'transformer' is injected in this runtime" in text and "is a pipeline component" not in text
    for component, model in (("transformer", transformer), ("text_encoder", encoder)):
        after = _state(model)
        assert after.keys() == before[component].keys()
        assert all(torch.equal(t, before[component][n]) for n, t in after.items())


def test_only_a_few_keys_under_an_injected_component_list_its_layers_however_far() -> None:
    """The nearest layers at any distance score every layer of the component in full: 20 such keys
    over 20,000 layers took 9 s to refuse (1.8 s with the cutoff alone). The first three keys list
    them, the rest keep the hint without the list, and nothing changes."""
    transformer, encoder = TinyLM(layers=1), TinyLM(layers=1)
    runtime = lorahot.inject({"transformer": transformer, "text_encoder": encoder}, ["q_proj"], max_rank=4)
    before = _state(transformer)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(5):
        tensors |= lora_pair(f"transformer.zz{i}.{'w' * 24}", "lora_A", "lora_B", fin=16, fout=16)
    with pytest.raises(lorahot.AdapterMismatchError) as e:
        runtime.load(tensors)
    lines = [line for line in str(e.value).splitlines() if ": matches no injected layer" in line]
    assert len(lines) == 5 and all("'transformer' is injected in this runtime" in line for line in lines)
    assert ["(closest: layers.0.self_attn.q_proj)" in line for line in lines] == [True] * 3 + [False] * 2
    after = _state(transformer)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())


def test_key_map_leaves_a_file_marked_by_its_own_keys() -> None:
    """A naming's file aliases (Krea 2's ``first`` -> ``img_in`` in PEFT naming) were judged on the keys
    after ``key_map=`` renamed them, so a Krea 2 file whose ``blocks.0.attn.wq`` was mapped to the model's
    name lost its mark and refused its ``first``. The mark is the file's own keys': with ``key_map`` on one
    key the file keeps its aliases for the others (the float64 reference); a file without a key only Krea
    2 has stays refused, whatever ``key_map`` renames one of its keys to, and nothing changes."""
    model, g = _KreaShaped(), torch.Generator().manual_seed(6)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    tensors = _peft("first", g) | _peft("blocks.0.attn.wq", g)
    info = runtime.load(tensors, key_map={"blocks.0.attn.wq": "transformer_blocks.0.attn.to_q"})
    assert set(info.ranks) == {"img_in", "transformer_blocks.0.attn.to_q"}
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for module, name in (("first", "img_in"), ("blocks.0.attn.wq", "transformer_blocks.0.attn.to_q")):
        a, b = (tensors[f"base_model.model.{module}.lora_{r}.weight"].double() for r in "AB")
        base = model.get_submodule(name).base_layer
        want = x @ (base.weight.double() + b @ a).T + base.bias.double()
        with torch.no_grad():
            got = model.get_submodule(name)(x.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    adapter = lorahot.read_adapter(tensors, key_map={"blocks.0.attn.wq": "transformer_blocks.0.attn.to_q"})
    assert set(runtime.load(adapter).ranks) == {"img_in", "transformer_blocks.0.attn.to_q"}  # read, then loaded
    runtime.unload()
    stray = _peft("first", g) | _peft("time_embed.linear_1", g)  # no key only Krea 2 has
    before = _state(model)
    for renamed in ("transformer_blocks.0.attn.to_q", "blocks.0.attn.wq"):
        with pytest.raises(lorahot.AdapterMismatchError, match=r"  - first: matches no injected layer"):
            runtime.load(stray, key_map={"time_embed.linear_1": renamed})
        assert (
            all(torch.equal(t, before[n]) for n, t in _state(model).items()) and _state(model).keys() == before.keys()
        )


class _FluxEmbedders(nn.Module):
    """The diffusers-named layers Flux's original ``img_in`` and ``vector_in.in_layer`` alias to."""

    def __init__(self) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(4, 4)
        self.time_text_embed = nn.Module()
        self.time_text_embed.text_embedder = nn.Module()
        self.time_text_embed.text_embedder.linear_1 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _diffusers(module: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {f"{module}.lora_{r}.weight": torch.randn(*s, generator=g) for r, s in (("A", (2, 4)), ("B", (4, 2)))}


def test_prefix_at_load_marks_a_read_adapter_by_that_components_own_keys() -> None:
    """``read_adapter(file, key_map=...)`` kept every key of the file as its file keys, and
    ``runtime.load(adapter, prefix='transformer')`` narrowed its modules only, so the text encoder's
    ``vector_in.in_layer`` (a name only Flux's original model has) marked the transformer's ``img_in`` as
    Flux's: it landed on ``x_embedder``, where ``runtime.load(file, prefix='transformer')`` refuses it as
    matching no layer. Both now judge the component's own keys: refused alike, nothing changed; with the
    mark under the prefix, both load Flux's names at the float64 reference."""
    model, g = _FluxEmbedders(), torch.Generator().manual_seed(7)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    key_map = {r"text_encoder\.(.+)": r"text_encoder.model.\1"}  # any rename: the read keeps the file's keys
    outside = _diffusers("transformer.img_in", g) | _diffusers("text_encoder.vector_in.in_layer", g)
    before = _state(model)
    for load in (
        lambda: runtime.load(outside, prefix="transformer"),
        lambda: runtime.load(lorahot.read_adapter(outside, key_map=key_map), prefix="transformer"),
    ):
        with pytest.raises(lorahot.AdapterMismatchError, match=r"  - img_in: matches no injected layer"):
            load()
        assert _state(model).keys() == before.keys()
        assert all(torch.equal(t, before[n]) for n, t in _state(model).items())
    inside = _diffusers("transformer.img_in", g) | _diffusers("transformer.vector_in.in_layer", g)
    inside |= _diffusers("text_encoder.img_in", g)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for adapter in (inside, lorahot.read_adapter(inside, key_map=key_map)):
        assert set(runtime.load(adapter, prefix="transformer").ranks) == {
            "x_embedder",
            "time_text_embed.text_embedder.linear_1",
        }
        for module, name in (
            ("img_in", "x_embedder"),
            ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ):
            a, b = (inside[f"transformer.{module}.lora_{r}.weight"].double() for r in "AB")
            base = model.get_submodule(name).base_layer
            want = x @ (base.weight.double() + b @ a).T + base.bias.double()
            with torch.no_grad():
                got = model.get_submodule(name)(x.float()).double()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        runtime.unload()
