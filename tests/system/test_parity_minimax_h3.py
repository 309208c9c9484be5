"""MiniMax-H3 files in the original module names against diffusers' MiniMax-H3 loader.

diffusers 0.42 converts MiniMax-H3 LoRAs trained on the original names (ai-toolkit's under
``diffusion_model.``, the reference implementation's and ComfyUI's bare, musubi-tuner's
``lora_unet_``, DiffSynth-Studio's with PEFT's ``.default.``) onto ``MiniMaxH3Transformer3DModel``:
``attn.qkv_proj`` cut into thirds, ``mlp.fc1``'s halves swapped (``[gate; value]`` -> SwiGLU's
``[value; gate]``), ``.alpha`` as ``alpha / r``, and a header ``alpha`` entry as every module's
alpha where the file has no ``.alpha`` tensor. Each layer's adapted weight is compared in float64
with the one diffusers' loader gives (``lora_state_dict``, then ``load_lora_adapter``), read by
probing the layer with the identity, and with a float64 reference of the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
from tests.diffusion_names import assert_same, diffusers_weights, linears, lorahot_weights, weights
from tests.helpers import assert_norm_deltas_fold

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(
    not hasattr(diffusers, "MiniMaxH3Transformer3DModel"), reason="needs a diffusers with MiniMax-H3"
)

#: every LoRA-able module of the original model at the tiny size below: name -> (in, out)
MODULES = {
    **{
        f"{block}.{m}": shape
        for block in ("blocks.0", "token_refiner.blocks.0")
        for m, shape in (("attn.qkv_proj", (16, 48)), ("attn.out_proj", (16, 16)), ("mlp.fc1", (16, 64)))
    },
    "blocks.0.mlp.fc2": (32, 16),
    "token_refiner.blocks.0.mlp.fc2": (32, 16),
    "blocks.0.adaln_proj.linear": (8, 288),
    "video_patch_proj": (16, 16),
    "audio_patch_proj": (4, 16),
    "condition_proj": (8, 16),
    "time_embedder.proj_in": (8, 16),
    "time_embedder.proj_out": (16, 8),
    "final_layer.adaln_proj.linear": (8, 32),
    "final_layer.video_out": (16, 16),
    "final_layer.audio_out": (16, 4),
}

#: original module -> its diffusers layers, in row order (several where the module is fused)
_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
PLACES = {
    "blocks.0.attn.qkv_proj": [f"transformer_blocks.0.{n}" for n in _QKV],
    "token_refiner.blocks.0.attn.qkv_proj": [f"token_refiner.refiner_blocks.0.{n}" for n in _QKV],
    "blocks.0.attn.out_proj": ["transformer_blocks.0.attn.to_out.0"],
    "token_refiner.blocks.0.attn.out_proj": ["token_refiner.refiner_blocks.0.attn.to_out.0"],
    "blocks.0.mlp.fc1": ["transformer_blocks.0.ff.net.0.proj"],
    "token_refiner.blocks.0.mlp.fc1": ["token_refiner.refiner_blocks.0.ff.net.0.proj"],
    "blocks.0.mlp.fc2": ["transformer_blocks.0.ff.net.2"],
    "token_refiner.blocks.0.mlp.fc2": ["token_refiner.refiner_blocks.0.ff.net.2"],
    "blocks.0.adaln_proj.linear": ["transformer_blocks.0.adaln_proj.linear"],
    "video_patch_proj": ["proj_in"],
    "audio_patch_proj": ["audio_proj_in"],
    "condition_proj": ["context_embedder"],
    "time_embedder.proj_in": ["time_embedder.linear_1"],
    "time_embedder.proj_out": ["time_embedder.linear_2"],
    "final_layer.adaln_proj.linear": ["norm_out.linear"],
    "final_layer.video_out": ["proj_out"],
    "final_layer.audio_out": ["audio_proj_out"],
}


def tiny_minimax_h3() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.MiniMaxH3Transformer3DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            hidden_size=16,
            num_layers=1,
            num_refiner_layers=1,
            ffn_dim=32,
            in_channels=4,
            audio_in_channels=4,
            patch_size=(1, 2, 2),
            text_dim=8,
            freq_dim=8,
            time_embed_hidden_dim=16,
            time_embed_dim=8,
        )
        .double()
        .eval()
    )


#: original module -> ``(A, B, alpha)``
Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float | None]]


def _factors(alpha: bool, seed: int = 3) -> Factors:
    """original module -> ``(A, B, alpha)``, ranks 2-4, alphas unequal to the rank where asked."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (m, (fan_in, rows)) in enumerate(MODULES.items()):
        r = 2 + i % 3
        a = torch.randn(r, fan_in, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(rows, r, generator=g, dtype=torch.float64) * 0.3
        out[m] = (a, b, r * (0.5 + i % 3) if alpha else None)
    return out


def _spelled(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]], spelling: str
) -> dict[str, torch.Tensor]:
    """The file: ``diffusion_model.`` + lora_A/lora_B, bare lora_down/lora_up, musubi-tuner's
    ``lora_unet_`` (``_`` for ``.``), or DiffSynth-Studio's ``.lora_A.default.weight``."""
    down, up, name = {
        "diffusion_model": ("lora_A.weight", "lora_B.weight", lambda m: f"diffusion_model.{m}"),
        "bare": ("lora_down.weight", "lora_up.weight", lambda m: m),
        "musubi": ("lora_down.weight", "lora_up.weight", lambda m: "lora_unet_" + m.replace(".", "_")),
        "diffsynth": ("lora_A.default.weight", "lora_B.default.weight", lambda m: m),
    }[spelling]
    sd = {}
    for m, (a, b, alpha) in factors.items():
        sd |= {f"{name(m)}.{down}": a.clone(), f"{name(m)}.{up}": b.clone()}
        if alpha is not None:
            sd[f"{name(m)}.alpha"] = torch.tensor(alpha, dtype=torch.float64)
    return sd


def _reference(factors: Factors, names: list[str], alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Each layer's float64 weight plus its rows of ``alpha / r * B @ A`` (``alpha`` where the
    module has none, else the rank), ``mlp.fc1``'s halves swapped."""
    out = weights(tiny_minimax_h3(), names)
    for m, (a, b, own) in factors.items():
        delta = ((own or alpha or a.shape[0]) / a.shape[0]) * b @ a
        if m.endswith("mlp.fc1"):
            delta = torch.cat(delta.chunk(2)[::-1])
        start = 0
        for layer in PLACES[m]:
            rows = out[layer].shape[1]
            part = delta[start : start + rows]
            out[layer] = out[layer] + torch.cat([part.T, torch.zeros(1, rows, dtype=torch.float64)])
            start += rows
    return out


@pytest.mark.parametrize(
    ("spelling", "alpha", "naming"),
    [
        ("diffusion_model", False, "minimax-h3"),
        ("bare", True, "minimax-h3"),
        ("musubi", True, "minimax-h3-musubi"),
    ],
)
def test_minimax_h3_matches_diffusers(spelling: str, alpha: bool, naming: str) -> None:
    """Every module of the original model, in each spelling diffusers converts: each layer as
    diffusers' MiniMax-H3 loader and the float64 reference give it. Refused before (the keys
    matched no injected layer)."""
    factors = _factors(alpha)
    sd = _spelled(factors, spelling)
    names = linears(tiny_minimax_h3())
    ours, fmt = lorahot_weights(tiny_minimax_h3, sd, names)
    assert fmt == naming
    loader = diffusers.loaders.lora_pipeline.MiniMaxH3LoraLoaderMixin
    assert_same(ours, diffusers_weights(tiny_minimax_h3, loader, sd, names))
    assert_same(ours, _reference(factors, names))


def tiny_minimax_h3_heads_of(head_dim: int, heads: int = 2) -> Callable[[], nn.Module]:
    """A maker of the tiny model at attention head size ``head_dim`` (width ``heads * head_dim``)."""
    width = heads * head_dim

    def make() -> nn.Module:
        torch.manual_seed(0)
        return (
            diffusers.MiniMaxH3Transformer3DModel(
                num_attention_heads=heads,
                attention_head_dim=head_dim,
                hidden_size=width,
                num_layers=1,
                num_refiner_layers=1,
                ffn_dim=32,
                in_channels=4,
                audio_in_channels=4,
                patch_size=(1, 2, 2),
                text_dim=8,
                freq_dim=8,
                time_embed_hidden_dim=16,
                time_embed_dim=8,
            )
            .double()
            .eval()
        )

    return make


def _diffsynth_qkv(width: int, seed: int = 4) -> Factors:
    """DiffSynth-Studio's qkv_proj modules at ``width``: ``(A [r, width], B [3 width, r], None)``."""
    g = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for m, r in (("blocks.0.attn.qkv_proj", 3), ("token_refiner.blocks.0.attn.qkv_proj", 2)):
        a = torch.randn(r, width, generator=g, dtype=torch.float64) * 0.3
        out[m] = (a, torch.randn(3 * width, r, generator=g, dtype=torch.float64) * 0.3, None)
    return out


def _gathered(factors: Factors, head_dim: int) -> Factors:
    """The qkv_proj modules with B's rows gathered from ``[head h: q, k, v]`` (``head_dim`` rows
    each) into ``[q; k; v]``: the float64 reference of the de-interleave."""
    out = dict(factors)
    for m, (a, b, alpha) in factors.items():
        if m.endswith("qkv_proj"):
            heads = b.shape[0] // (3 * head_dim)
            rows = [b[(h * 3 + j) * head_dim : (h * 3 + j + 1) * head_dim] for j in range(3) for h in range(heads)]
            out[m] = (a, torch.cat(rows), alpha)
    return out


def test_diffsynth_files_match_diffusers_at_its_head_size() -> None:
    """DiffSynth-Studio's files (PEFT's ``.default.`` over the original names) train the raw
    checkpoint's ``qkv_proj``, whose rows interleave q, k and v per head; diffusers gathers them
    at a head size of 128, which every released MiniMax-H3 has. On a tiny model of head size 128
    (2 heads), every layer lorahot loads equals diffusers' loader and the float64 reference of
    the de-interleave. The module was refused before ('DiffSynth-Studio's LoRA ...')."""
    make = tiny_minimax_h3_heads_of(128)
    factors = _diffsynth_qkv(256)
    sd = _spelled(factors, "diffsynth")
    names = [n for n in linears(make()) if ".attn.to_" in n]
    ours, fmt = lorahot_weights(make, sd, names)
    assert fmt == "minimax-h3-diffsynth"
    loader = diffusers.loaders.lora_pipeline.MiniMaxH3LoraLoaderMixin
    assert_same(ours, diffusers_weights(make, loader, sd, names))
    reference = _reference_at(make, _gathered(factors, 128), names)
    assert_same(ours, reference)
    plain = _reference_at(make, factors, names)  # cut as q, then k, then v: another update
    assert not torch.allclose(plain["transformer_blocks.0.attn.to_k"], reference["transformer_blocks.0.attn.to_k"])


def _reference_at(make: Callable[[], nn.Module], factors: Factors, names: list[str]) -> dict[str, torch.Tensor]:
    """:func:`_reference` on the model ``make`` builds."""
    out = weights(make(), names)
    for m, (a, b, own) in factors.items():
        delta = ((own or a.shape[0]) / a.shape[0]) * b @ a
        start = 0
        for layer in PLACES[m]:
            rows = out[layer].shape[1]
            out[layer] = out[layer] + torch.cat(
                [delta[start : start + rows].T, torch.zeros(1, rows, dtype=torch.float64)]
            )
            start += rows
    return out


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_diffsynth_files_gather_qkv_at_the_models_own_head_size(merged: bool) -> None:
    """At a head size of 8 (the tiny model's), where diffusers' 128 refuses the file, every module
    of a DiffSynth file loads: the qkv_proj rows gathered per head of 8, the rest as in any file
    of these names, each layer at the float64 reference."""
    factors = _factors(alpha=False)
    sd = _spelled(factors, "diffsynth")
    names = linears(tiny_minimax_h3())
    model = tiny_minimax_h3()
    info = lorahot.inject(model, "all-linear", max_rank=8, merged=merged).load(dict(sd))
    assert info.format == "minimax-h3-diffsynth"
    assert_same(weights(model, names), _reference(_gathered(factors, 8), names))


def test_diffsynth_qkv_is_refused_where_the_model_states_no_head_size_and_nothing_changes() -> None:
    """A model whose attention modules state no head size (no ``head_dim``) leaves the
    interleave ambiguous: refused naming the module, its rows, the parts and the fix, before
    anything is written (every layer bitwise as before, a LoRA loaded earlier kept)."""
    model = tiny_minimax_h3()
    for block in (model.transformer_blocks[0], model.token_refiner.refiner_blocks[0]):
        del block.attn.head_dim
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    names = linears(tiny_minimax_h3())
    runtime.load(_spelled(_factors(alpha=True, seed=6), "bare"))
    before = weights(model, names)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"blocks\.0\.attn\.qkv_proj \(.*lora_A\.default\.weight.*\) -> .*attn\.to_q, .*attn\.to_v: its 48 rows "
        r"interleave 3 parts of 16 rows per attention head, and the model states none for the modules holding the "
        r"parts \(an integer head_dim attribute\)[\s\S]*Inject a model whose attention modules state their head_dim",
    ):
        runtime.load(_spelled(_factors(alpha=False), "diffsynth"))
    after = weights(model, names)
    assert all(torch.equal(after[n], before[n]) for n in names)


def test_a_diffsynth_qkv_in_a_file_of_mixed_spellings_is_refused_by_name() -> None:
    """A DiffSynth ``.default.`` qkv_proj beside modules in another spelling reads as
    minimax-h3 naming, whose qkv_proj is not interleaved: refused by name, saying how to load it."""
    factors = _factors(alpha=False)
    sd = _spelled({"blocks.0.attn.qkv_proj": factors["blocks.0.attn.qkv_proj"]}, "diffsynth")
    sd |= _spelled({"blocks.0.mlp.fc2": factors["blocks.0.mlp.fc2"]}, "bare")
    with pytest.raises(
        lorahot.UnknownFormatError,
        match=r"\(minimax-h3 naming\):\n  - blocks\.0\.attn\.qkv_proj\.lora_A\.default\.weight: DiffSynth-Studio's "
        r"LoRA .* in a file whose other keys are not all of that spelling",
    ):
        lorahot.read_adapter(sd)


@pytest.mark.parametrize(
    "with_tensors", [False, True, None], ids=["header-alpha", "alpha-tensors-win", "some-alpha-tensors"]
)
def test_a_header_alpha_is_every_modules_alpha_as_diffusers_reads_it(tmp_path: Path, with_tensors: bool | None) -> None:
    """lightx2v's MiniMax-H3 files record their network alpha as ``alpha`` in the safetensors
    header, with no ``.alpha`` tensor; diffusers' loader scales every module by ``alpha / r``,
    and so does lorahot (read at alpha = rank, scale 1, the file would differ by ``1 - alpha / r``
    of each update). Where the file has ``.alpha`` tensors the entry is ignored, by both, also
    where only some modules have one (``None``): the others take alpha = rank, as diffusers, and
    ComfyUI, musubi-tuner and DiffSynth-Studio, which never read the entry, all compute them. A
    header entry that is no number > 0 is refused naming it (diffusers ignores it)."""
    factors = _factors(alpha=with_tensors is not False)
    if with_tensors is None:  # every other module without its .alpha
        factors = {m: (a, b, alpha if i % 2 else None) for i, (m, (a, b, alpha)) in enumerate(factors.items())}
    sd = _spelled(factors, "diffusion_model")
    path = tmp_path / "h3.safetensors"
    save_file(sd, str(path), metadata={"alpha": "7.0"})
    names = linears(tiny_minimax_h3())
    model = tiny_minimax_h3()
    assert lorahot.inject(model, "all-linear", max_rank=8).load(path).format == "minimax-h3"
    ours = weights(model, names)
    loader = diffusers.loaders.lora_pipeline.MiniMaxH3LoraLoaderMixin
    state, metadata = loader.lora_state_dict(str(path), return_lora_metadata=True)
    oracle = tiny_minimax_h3()
    oracle.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    assert_same(ours, weights(oracle, names))
    assert_same(ours, _reference(factors, names, alpha=7.0 if with_tensors is False else None))
    save_file(sd, str(path), metadata={"alpha": "seven"})
    if with_tensors is False:
        with pytest.raises(lorahot.AdapterReadError, match=r"the 'alpha' entry of its safetensors header.* 'seven'"):
            lorahot.read_adapter(path)


@pytest.mark.parametrize("spelling", ["diffusion_model", "bare", "musubi"])
def test_a_header_alpha_beside_lycoris_modules_is_refused_and_nothing_changes(tmp_path: Path, spelling: str) -> None:
    """A header ``alpha`` in a file without ``.alpha`` tensors that holds LyCORIS modules: diffusers
    reads the entry for LoRA modules but loads no LyCORIS module of the naming, ComfyUI and
    musubi-tuner ignore it (every module at scale 1): no loader defines the file. Refused naming
    the modules and the entry's value, the model untouched; read at the header's alpha for the LoRA
    module and scale 1 for the LoHa before."""
    factors = _factors(alpha=False)
    sd = _spelled({"blocks.0.mlp.fc2": factors["blocks.0.mlp.fc2"]}, spelling)
    loha = {
        "diffusion_model": "diffusion_model.blocks.0.attn.out_proj",
        "bare": "blocks.0.attn.out_proj",
        "musubi": "lora_unet_blocks_0_attn_out_proj",
    }[spelling]
    shown = re.escape(loha).replace("_", "[._]")  # musubi's module is named in its dotted form
    g = torch.Generator().manual_seed(1)
    sd |= {
        f"{loha}.hada_{w}": torch.randn(
            16 if w.endswith("a") else 2, 2 if w.endswith("a") else 16, generator=g, dtype=torch.float64
        )
        for w in ("w1_a", "w1_b", "w2_a", "w2_b")
    }
    path = tmp_path / "h3.safetensors"
    save_file(sd, str(path), metadata={"alpha": "8.0"})
    model = tiny_minimax_h3()
    names = linears(model)
    runtime = lorahot.inject(model, "all-linear", max_rank=8, merged=True)
    runtime.load(_spelled(_factors(alpha=True, seed=6), "bare"))
    before = weights(model, names)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=rf"h3\.safetensors: the 'alpha' entry of its safetensors header records alpha '8\.0'.* holds LyCORIS "
        rf"modules without \.alpha:\n  - {shown} \(loha\)\nNo loader defines that entry for them"
        r"[\s\S]*Write each module's alpha as its \.alpha tensor",
    ):
        runtime.load(path)
    after = weights(model, names)
    assert all(torch.equal(after[n], before[n]) for n in names)


#: the original norms (all RMSNorms with a weight) -> (diffusers' norm, size), as diffusers'
#: MiniMax-H3 conversion renames them
MINIMAX_H3_NORMS = {
    "blocks.0.norm1": ("transformer_blocks.0.norm1", 16),
    "blocks.0.norm2": ("transformer_blocks.0.norm2", 16),
    "blocks.0.attn.q_norm": ("transformer_blocks.0.attn.norm_q", 8),
    "blocks.0.attn.k_norm": ("transformer_blocks.0.attn.norm_k", 8),
    "token_refiner.blocks.0.norm1": ("token_refiner.refiner_blocks.0.norm1", 16),
    "token_refiner.blocks.0.attn.k_norm": ("token_refiner.refiner_blocks.0.attn.norm_k", 8),
    "token_refiner.final_norm": ("token_refiner.final_norm", 16),
    "final_layer.norm": ("norm_out.norm", 16),
}


@pytest.mark.parametrize("spelling", ["diffusion_model", "musubi"])
def test_minimax_h3_norm_deltas_fold_into_diffusers_norms_in_merged_mode(spelling: str) -> None:
    """A ``.diff`` of a norm in the original names (``blocks.0.attn.q_norm``, ``final_layer.norm``,
    as ComfyUI's LoRA extraction writes one for every norm with a weight) matched no injected layer
    (musubi's spelling refused every ``.diff``, pointing to kohya naming). Now they are aliased as
    diffusers' conversion renames them, ``plan_targets`` lists the norms and the file folds: float64
    ``W + s alpha / r B A`` and ``w + s diff`` at scales 1 and 0.5."""
    g = torch.Generator().manual_seed(71)
    with torch.no_grad():
        model = tiny_minimax_h3()
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        a = torch.randn(2, 16, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(16, 2, generator=g, dtype=torch.float64) * 0.3
        sd = _spelled({"blocks.0.attn.out_proj": (a, b, 3.0)}, spelling)
        expected = {"transformer_blocks.0.attn.to_out.0.weight": 1.5 * b @ a}
        stem = "diffusion_model.{}" if spelling == "diffusion_model" else "lora_unet_{}"
        for name, (norm, size) in MINIMAX_H3_NORMS.items():
            assert model.get_submodule(norm).weight.shape == (size,)
            key = stem.format(name if spelling == "diffusion_model" else name.replace(".", "_"))
            sd[f"{key}.diff"] = torch.randn(size, generator=g, dtype=torch.float64) * 0.1
            expected[f"{norm}.weight"] = sd[f"{key}.diff"]
        assert_norm_deltas_fold(
            model,
            sd,
            {norm for norm, _ in MINIMAX_H3_NORMS.values()},
            "minimax-h3" if spelling == "diffusion_model" else "minimax-h3-musubi",
            pristine,
            expected,
        )
