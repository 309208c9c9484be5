"""LTX-Video and Z-Image files in the models' own module names, against diffusers' loaders.

Neither family has a naming of its own in lorahot: their files that spell the model's module
names (``diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight`` for LTX-Video,
``diffusion_model.layers.0.attention.to_q.lora_down.weight`` for Z-Image) load through the
ComfyUI and Lumina2 namings. Each layer's adapted weight is compared in float64 with the one
diffusers' pipeline loader gives (``lora_state_dict``, then ``load_lora_adapter``), read by
probing the layer with the identity.

One known difference: lorahot reads a ``.alpha`` as ``alpha / rank`` (as ComfyUI does) where
diffusers' LTX conversion leaves it unread. Z-Image's original ``attention.out`` is renamed to
``attention.to_out.0`` by both."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lorahot
from tests.diffusion_names import assert_same as _assert_same
from tests.diffusion_names import diffusers_weights as _diffusers
from tests.diffusion_names import linears as _linears
from tests.diffusion_names import lorahot_weights as _lorahot
from tests.diffusion_names import peft_default_adapter
from tests.diffusion_names import weights as _weights

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(
    not all(
        hasattr(diffusers, n) for n in ("LTXVideoTransformer3DModel", "ZImageTransformer2DModel", "ZImagePipeline")
    ),
    reason="needs a diffusers with LTX-Video and Z-Image",
)


def _tiny_ltx() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            caption_channels=16,
        )
        .double()
        .eval()
    )


def _tiny_zimage() -> nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.ZImageTransformer2DModel(
            in_channels=4,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=16,
            axes_dims=[4, 6, 6],
            axes_lens=[64, 32, 32],
        )
        .double()
        .eval()
    )


def _file(
    model: nn.Module, names: list[str], down: str, up: str, alpha: bool, rename: Callable[[str], str] = str
) -> dict[str, torch.Tensor]:
    """``diffusion_model.<name>.<down|up>.weight`` for each layer, ranks 2-4, with ``.alpha``
    (unequal to the rank) where asked."""
    g = torch.Generator().manual_seed(2)
    sd = {}
    for i, name in enumerate(names):
        layer, r, key = model.get_submodule(name), 2 + i % 3, f"diffusion_model.{rename(name)}"
        sd[f"{key}.{down}.weight"] = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.{up}.weight"] = torch.randn(layer.out_features, r, generator=g, dtype=torch.float64) * 0.3
        if alpha:
            sd[f"{key}.alpha"] = torch.tensor(r * (0.5 + i % 3), dtype=torch.float64)
    return sd


def _reference(make: Callable[[], nn.Module], sd: dict[str, torch.Tensor], names: list[str], down: str, up: str):
    """Each layer's float64 weight plus ``alpha / r * B @ A`` (alpha = r where the file has none)."""
    model = make()
    out = _weights(model, names)
    for name in names:
        key = f"diffusion_model.{name}"
        a, b = sd[f"{key}.{down}.weight"], sd[f"{key}.{up}.weight"]
        scale = float(sd[f"{key}.alpha"]) / a.shape[0] if f"{key}.alpha" in sd else 1.0
        out[name] = out[name] + torch.cat([(scale * b @ a).T, torch.zeros(1, b.shape[0], dtype=torch.float64)])
    return out


@pytest.mark.parametrize(("down", "up"), [("lora_A", "lora_B"), ("lora_down", "lora_up")])
def test_ltx_video_in_its_own_names_matches_diffusers(down: str, up: str) -> None:
    """``lora_A``/``lora_B``: diffusers' loader and the float64 reference. ``lora_down``/``lora_up``:
    the reference only (diffusers 0.42's LTX loader raises an IndexError on that spelling)."""
    names = _linears(_tiny_ltx(), lambda n: n.startswith("transformer_blocks."))
    sd = _file(_tiny_ltx(), names, down, up, alpha=False)
    ours, fmt = _lorahot(_tiny_ltx, sd, names)
    assert fmt == "comfyui"
    _assert_same(ours, _reference(_tiny_ltx, sd, names, down, up))
    if down == "lora_A":
        _assert_same(ours, _diffusers(_tiny_ltx, diffusers.LTXPipeline, sd, names))


def test_ltx_video_alphas_are_read_where_diffusers_leaves_them() -> None:
    """With ``.alpha`` keys lorahot follows the float64 reference at ``alpha / r``. diffusers'
    LTX conversion (0.42) keeps scale 1: its weights equal the file read without the alphas
    (a later diffusers that reads them would equal lorahot's; either passes)."""
    names = _linears(_tiny_ltx(), lambda n: n.startswith("transformer_blocks."))
    sd = _file(_tiny_ltx(), names, "lora_A", "lora_B", alpha=True)
    ours, _ = _lorahot(_tiny_ltx, sd, names)
    _assert_same(ours, _reference(_tiny_ltx, sd, names, "lora_A", "lora_B"))
    theirs = _diffusers(_tiny_ltx, diffusers.LTXPipeline, sd, names)
    unread = _reference(_tiny_ltx, {k: v for k, v in sd.items() if not k.endswith(".alpha")}, names, "lora_A", "lora_B")
    assert any(all(torch.allclose(theirs[n], w[n], rtol=1e-9, atol=1e-12) for n in names) for w in (unread, ours))
    assert not all(torch.allclose(ours[n], unread[n], rtol=1e-6, atol=1e-9) for n in names)  # the alphas matter


def test_z_image_in_its_own_names_matches_diffusers() -> None:
    names = _linears(_tiny_zimage(), lambda n: "layers" in n or "refiner" in n)
    sd = _file(_tiny_zimage(), names, "lora_down", "lora_up", alpha=True)
    ours, fmt = _lorahot(_tiny_zimage, sd, names)
    assert fmt == "lumina2"
    _assert_same(ours, _diffusers(_tiny_zimage, diffusers.ZImagePipeline, sd, names))
    _assert_same(ours, _reference(_tiny_zimage, sd, names, "lora_down", "lora_up"))


def test_z_image_original_attention_out_spelling_matches_diffusers() -> None:
    """``attention.out`` (Z-Image's original name of ``attention.to_out.0``, which diffusers'
    conversion renames in ``lora_down``/``lora_up`` files) lands on the output projection."""
    names = _linears(_tiny_zimage(), lambda n: "layers" in n or "refiner" in n)
    sd = _file(_tiny_zimage(), names, "lora_down", "lora_up", alpha=True, rename=lambda n: n.replace("to_out.0", "out"))
    assert any(".attention.out." in k for k in sd)
    ours, fmt = _lorahot(_tiny_zimage, sd, names)
    assert fmt == "lumina2"
    _assert_same(ours, _diffusers(_tiny_zimage, diffusers.ZImagePipeline, sd, names))
    renamed = {k.replace(".attention.out.", ".attention.to_out.0."): v for k, v in sd.items()}
    _assert_same(ours, _reference(_tiny_zimage, renamed, names, "lora_down", "lora_up"))


@pytest.mark.parametrize("alpha", [False, True], ids=["no-alpha", "alpha"])
@pytest.mark.parametrize(("spelling", "fmt"), [("comfyui", "lumina2"), ("bare", "peft"), ("kohya", "lumina2-kohya")])
def test_z_image_peft_adapter_name_after_kohya_roles_matches_diffusers(spelling: str, fmt: str, alpha: bool) -> None:
    """``<module>.lora_down.default.weight`` / ``.lora_up.default.weight`` (PEFT's adapter name
    kept by a rename of its lora_A/lora_B to kohya's roles), under ``diffusion_model.``, bare or
    kohya-spelled: diffusers' Z-Image loader drops ``default.``; every layer equal to it and to the
    float64 reference. They were refused as a file that mixes namings."""
    names = _linears(_tiny_zimage(), lambda n: "layers" in n or "refiner" in n)
    plain = _file(_tiny_zimage(), names, "lora_down", "lora_up", alpha=alpha)
    sd = peft_default_adapter(plain, spelling)
    assert any(k.endswith(".lora_up.default.weight") for k in sd)
    ours, found = _lorahot(_tiny_zimage, sd, names)
    assert found == fmt
    _assert_same(ours, _diffusers(_tiny_zimage, diffusers.ZImagePipeline, sd, names))
    _assert_same(ours, _reference(_tiny_zimage, plain, names, "lora_down", "lora_up"))


def _lokr_file(model: nn.Module, names: list[str], low_rank: bool) -> dict[str, torch.Tensor]:
    """ai-toolkit's Z-Image LoKr (``diffusion_model.<name>.lokr_w1``, ``lokr_w2`` whole or as
    ``lokr_w2_a @ lokr_w2_b`` of rank 2, with ``.alpha``) for each layer: ``kron(w1, w2)``, ``w1``
    of 4 or 5 rows and columns, whichever divides the layer."""
    g = torch.Generator().manual_seed(6)
    sd = {}
    for i, name in enumerate(names):
        layer, key = model.get_submodule(name), f"diffusion_model.{name}"
        o1, i1 = (next(f for f in (4, 5) if n % f == 0) for n in (layer.out_features, layer.in_features))
        o2, i2 = layer.out_features // o1, layer.in_features // i1
        sd[f"{key}.lokr_w1"] = torch.randn(o1, i1, generator=g, dtype=torch.float64)
        if low_rank:
            sd[f"{key}.lokr_w2_a"] = torch.randn(o2, 2, generator=g, dtype=torch.float64) * 0.3
            sd[f"{key}.lokr_w2_b"] = torch.randn(2, i2, generator=g, dtype=torch.float64) * 0.3
        else:
            sd[f"{key}.lokr_w2"] = torch.randn(o2, i2, generator=g, dtype=torch.float64) * 0.1
        sd[f"{key}.alpha"] = torch.tensor(3.0 + i, dtype=torch.float64)
    return sd


@pytest.mark.parametrize(("head", "fmt"), [("diffusion_model.", "lumina2"), ("transformer.", "diffusers")])
@pytest.mark.parametrize("low_rank", [False, True], ids=["whole", "w2-low-rank"])
def test_z_image_lokr_in_its_own_names_matches_diffusers(low_rank: bool, head: str, fmt: str) -> None:
    """diffusers' Z-Image loader reads ai-toolkit's LoKr files (``alpha / r`` where a half is
    low-rank, scale 1 where both are whole, as LyCORIS). A file with a ``feed_forward.w1`` module
    reads as Lumina2 naming, which refused the LyCORIS factors ('in kohya or ComfyUI naming') where
    the same file without it, ComfyUI naming, loaded; it loads in merged mode, every layer as
    diffusers' loader and the float64 LyCORIS rule give it. The same factors under diffusers'
    ``transformer.`` with their ``.alpha`` (which ComfyUI reads for a diffusers-named model, and
    diffusers refuses) read as diffusers naming, which refused them ('in kohya or ComfyUI
    naming') where the same file without its alphas, PEFT naming, loaded; they load the same."""
    names = _linears(_tiny_zimage(), lambda n: n.startswith("layers.0.") or "refiner" in n)
    sd = _lokr_file(_tiny_zimage(), names, low_rank)
    model = _tiny_zimage()
    spelled = {head + k.removeprefix("diffusion_model."): v for k, v in sd.items()}
    info = lorahot.inject(model, "all-linear", max_rank=8, merged=True).load(spelled)
    assert info.format == fmt
    ours = _weights(model, names)
    reference = _weights(_tiny_zimage(), names)
    for name in names:
        key = f"diffusion_model.{name}"
        w2 = sd[f"{key}.lokr_w2_a"] @ sd[f"{key}.lokr_w2_b"] if low_rank else sd[f"{key}.lokr_w2"]
        scale = float(sd[f"{key}.alpha"]) / 2 if low_rank else 1.0
        delta = scale * torch.kron(sd[f"{key}.lokr_w1"], w2)
        reference[name] = reference[name] + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
    _assert_same(ours, reference)
    _assert_same(ours, _diffusers(_tiny_zimage, diffusers.ZImagePipeline, sd, names))


def test_a_lycoris_module_on_a_fused_qkv_is_cut_by_the_rows_of_its_delta() -> None:
    """Lumina2 naming splits a LoRA on ``attention.qkv`` by B's rows, and a LoKr there by the rows
    of its ``ΔW`` (``kron(w1, w2)``, which has no per-part factors): Z-Image's ``to_q``, ``to_k``
    and ``to_v`` each get their third, as LyCORIS computes the fused layer's update. It was refused
    ('lorahot splits LoRA modules only'); diffusers' Z-Image loader leaves such a module out. Rows
    that do not split 1 : 1 : 1 are refused naming both shapes, with strict=False too, and nothing
    is written."""
    names = ["layers.0.feed_forward.w1"]
    sd = _lokr_file(_tiny_zimage(), names, low_rank=False)
    qkv = {"diffusion_model.layers.0.attention.qkv.lokr_w1": torch.randn(4, 4, dtype=torch.float64)}
    qkv["diffusion_model.layers.0.attention.qkv.lokr_w2"] = torch.randn(24, 8, dtype=torch.float64)
    model = _tiny_zimage()
    parts = [f"layers.0.attention.{n}" for n in ("to_q", "to_k", "to_v")]
    reference = _weights(_tiny_zimage(), parts)
    runtime = lorahot.inject(model, "all-linear", max_rank=8, merged=True)
    wrong = {k: v[:-1] if k.endswith("w2") else v for k, v in qkv.items()}  # 92 rows
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(
            lorahot.AdapterMismatchError,
            match=r"attention\.qkv \(.*\) -> .*to_q, .*to_k, .*to_v: its ΔW has 92 rows; its rows split in the "
            r"ratio 1:1:1, which needs a positive multiple of 3 rows",
        ):
            runtime.load(sd | wrong, strict=strict)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    runtime.load(sd | qkv)
    delta = torch.kron(*qkv.values())  # [96, 32]
    for j, name in enumerate(parts):
        part = delta[32 * j : 32 * (j + 1)]
        reference[name] = reference[name] + torch.cat([part.T, torch.zeros(1, 32, dtype=torch.float64)])
    _assert_same(_weights(model, parts), reference)


def test_z_image_kohya_spelling_of_the_original_names_matches_diffusers() -> None:
    """sd-scripts-style files of Z-Image's original names (``lora_unet_layers_0_attention_out``,
    with ``.alpha``), which diffusers' Z-Image loader renames onto ``attention.to_out.0``: read as
    ``lumina2-kohya``, every layer as diffusers' loader gives it (they read as plain kohya, and
    ``attention_out`` matched no layer). A fused ``attention_qkv`` is cut 1 : 1 : 1 onto
    ``to_q``/``to_k``/``to_v`` as the dotted naming cuts it (diffusers' loader leaves the
    ``lora_down`` spelling of it uncut, and so unloaded)."""
    names = _linears(_tiny_zimage(), lambda n: "layers" in n or "refiner" in n)
    sd = _file(_tiny_zimage(), names, "lora_down", "lora_up", alpha=True, rename=lambda n: n.replace("to_out.0", "out"))
    kohya = {}
    for key, value in sd.items():
        m = re.fullmatch(r"diffusion_model\.(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        assert m is not None
        kohya[f"lora_unet_{m[1].replace('.', '_')}.{m[2]}"] = value
    assert "lora_unet_layers_0_attention_out.lora_down.weight" in kohya
    ours, fmt = _lorahot(_tiny_zimage, kohya, names)
    assert fmt == "lumina2-kohya"
    _assert_same(ours, _diffusers(_tiny_zimage, diffusers.ZImagePipeline, kohya, names))
    layer = _tiny_zimage().get_submodule("layers.0.attention.to_q")
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, layer.in_features, generator=g, dtype=torch.float64)
    b = torch.randn(3 * layer.out_features, 3, generator=g, dtype=torch.float64)
    fused = {
        "lora_unet_layers_0_attention_qkv.lora_down.weight": a,
        "lora_unet_layers_0_attention_qkv.lora_up.weight": b,
    }
    qkv = [f"layers.0.attention.to_{p}" for p in "qkv"]
    ours, fmt = _lorahot(_tiny_zimage, fused, qkv)
    reference = _weights(_tiny_zimage(), qkv)
    for j, name in enumerate(qkv):
        delta = b[j * layer.out_features : (j + 1) * layer.out_features] @ a
        reference[name] = reference[name] + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
    assert fmt == "lumina2-kohya"
    _assert_same(ours, reference)


def _pair(key: str, rows: int, seed: int, down: str = "lora_A", up: str = "lora_B") -> dict[str, torch.Tensor]:
    """A rank-2 LoRA module ``key`` on a Z-Image projection of 32 inputs and ``rows`` outputs."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{key}.{down}.weight": torch.randn(2, 32, generator=g, dtype=torch.float64),
        f"{key}.{up}.weight": torch.randn(rows, 2, generator=g, dtype=torch.float64),
    }


#: Z-Image files with one module under two spellings: a prefixed and a bare name, two prefixes,
#: the fused qkv and its to_q, the original attention.out and diffusers' to_out.0, kohya's and
#: ComfyUI's spelling (the module on the layer first, the one refused second)
_DUPLICATES = [
    ("prefix+bare", "diffusion_model.layers.0.attention.to_q", 32, "layers.0.attention.to_q"),
    ("prefix+transformer", "diffusion_model.layers.0.attention.to_q", 32, "transformer.layers.0.attention.to_q"),
    ("fused+part", "diffusion_model.layers.0.attention.qkv", 96, "diffusion_model.layers.0.attention.to_q"),
    ("out+to_out", "diffusion_model.layers.0.attention.out", 32, "diffusion_model.layers.0.attention.to_out.0"),
    ("kohya+comfyui", "lora_unet_layers_0_attention_to_q", 32, "diffusion_model.layers.0.attention.to_q"),
]


@pytest.mark.parametrize(("case", "first", "rows", "second"), _DUPLICATES, ids=[c[0] for c in _DUPLICATES])
def test_a_z_image_file_with_one_module_under_two_spellings_is_refused_naming_both(
    case: str, first: str, rows: int, second: str
) -> None:
    """Z-Image files from the wild ("Anime-Z") carry one module under two spellings. ComfyUI keeps
    one of two keys it maps onto the same weight (its patch dict is keyed by the weight) and adds a
    part of the fused qkv to the whole (a slice's patch is another entry), so no one reading
    stands: lorahot refuses the file naming both keys, with a hint that says so (it gave the
    generic 'inject those modules' one), every parameter and buffer bitwise unchanged, strict=False
    too. Loaded as two parts of a stack, the fused qkv and its to_q add up on to_q as ComfyUI adds
    them (float64)."""
    kohya = first.startswith("lora_unet_")
    one = _pair(first, rows, 1, *(("lora_down", "lora_up") if kohya else ()))
    two = _pair(second, 32, 2)
    model = _tiny_zimage()
    names = ["layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_out.0"]
    if case == "fused+part":
        names.append("layers.0.attention.to_v")
    runtime = lorahot.inject(model, names, max_rank=8, merged=True)
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    for strict in (True, False):
        with pytest.raises(
            lorahot.AdapterMismatchError,
            match=rf"(?s){re.escape(second)}: lands on layers\.0\.attention\.to_(q|out\.0), which [^\n]*"
            rf"{re.escape(first if not case.startswith('fused') else 'diffusion_model.layers.0.attention.qkv')}[^\n]*"
            r" already fills\nThe file holds two modules for each of those layers.*ComfyUI keeps one of two keys.*"
            r"adds a part of a fused weight to the whole",
        ):
            runtime.load(one | two, strict=strict)
        after = model.state_dict(keep_vars=True)
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    if case == "fused+part":  # as a stack: both on to_q, as ComfyUI adds them
        runtime.load([one, two])
        a1, b1 = one[f"{first}.lora_A.weight"], one[f"{first}.lora_B.weight"]
        a2, b2 = two[f"{second}.lora_A.weight"], two[f"{second}.lora_B.weight"]
        w0 = _weights(_tiny_zimage(), ["layers.0.attention.to_q"])["layers.0.attention.to_q"]
        want = w0 + torch.cat([(b1[:32] @ a1 + b2 @ a2).T, torch.zeros(1, 32, dtype=torch.float64)])
        _assert_same(_weights(model, ["layers.0.attention.to_q"]), {"layers.0.attention.to_q": want})


def _anime_z(layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A Z-Image file as sd-scripts-style trainers write it ("Anime-Z"): kohya's module names with
    ComfyUI's dotted roles (``lora_unet_layers_0_attention_to_q.lora.down.weight``) and ``.alpha``;
    the attention as ``to_q``/``to_k``/``to_v``/``to_out_0`` (``split``), with the original output
    ``attention_out`` (``original``), or as the original fused ``attention_qkv`` and ``attention_out``
    (``fused``), beside the feed-forward and adaLN modules of every block; the layers it adapts."""
    model = _tiny_zimage()
    names = _linears(model, lambda n: "layers" in n or "refiner" in n)
    g = torch.Generator().manual_seed(8)
    sd, done = {}, set()
    for i, name in enumerate(names):
        layer, r = model.get_submodule(name), 2 + i % 3
        module = name
        if layout != "split":
            module = module.replace("attention.to_out.0", "attention.out")
        if layout == "fused" and re.search(r"\.attention\.to_[qkv]$", name):
            module = re.sub(r"to_[qkv]$", "qkv", name)
            if module in done:
                continue
            done.add(module)
        rows = 3 * layer.out_features if module.endswith(".qkv") else layer.out_features
        key = "lora_unet_" + module.replace(".", "_")
        sd[f"{key}.lora.down.weight"] = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.lora.up.weight"] = torch.randn(rows, r, generator=g, dtype=torch.float64) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(r * (0.5 + i % 3), dtype=torch.float64)
    return sd, names


def _anime_z_reference(sd: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Each layer's float64 weight plus ``alpha / r * B @ A`` of its module; a fused ``qkv``'s B
    cut in three equal row blocks onto ``to_q``, ``to_k``, ``to_v`` (Z-Image has as many key-value
    heads as query heads); ``attention.out`` on ``to_out.0``."""
    out = _weights(_tiny_zimage(), names)
    for name in names:
        key = "lora_unet_" + name.replace(".", "_")
        part = None
        if f"{key}.lora.down.weight" not in sd:
            fused = re.sub(r"_to_([qkv])$", "_qkv", key)
            key, part = (fused, "qkv".index(name[-1])) if fused in {k.split(".")[0] for k in sd} else (key, None)
            key = key if part is not None else key.replace("_to_out_0", "_out")
        a, b = sd[f"{key}.lora.down.weight"], sd[f"{key}.lora.up.weight"]
        if part is not None:
            b = b.chunk(3)[part]
        delta = float(sd[f"{key}.alpha"]) / a.shape[0] * b @ a
        out[name] = out[name] + torch.cat([delta.T, torch.zeros(1, delta.shape[0], dtype=torch.float64)])
    return out


@pytest.mark.parametrize("layout", ["split", "original", "fused"])
def test_z_image_kohya_names_in_comfyui_dotted_roles_match_diffusers(layout: str) -> None:
    """Z-Image "Anime-Z" files spell kohya's module names with ComfyUI's dotted roles
    (``lora_unet_layers_0_attention_to_q.lora.down.weight``, ``.alpha``), which ComfyUI reads for
    any module key and diffusers' Z-Image loader converts (its kohya conversion splits the name at
    every ``_``, ``attention.to.q``, then reads ``to.q`` as ``to_q``, a bare ``out`` as ``to_out.0``
    and cuts a fused ``qkv`` 1 : 1 : 1). lorahot refused them as a file mixing namings (the dotted
    roles read as diffusers-old naming, the alphas as lumina2-kohya). Every layer equal in float64
    to diffusers' loader and to the reference (``alpha / r``)."""
    sd, names = _anime_z(layout)
    ours, fmt = _lorahot(_tiny_zimage, sd, names)
    assert fmt == "lumina2-kohya"
    _assert_same(ours, _diffusers(_tiny_zimage, diffusers.ZImagePipeline, sd, names))
    _assert_same(ours, _anime_z_reference(sd, names))


def test_z_image_projections_as_diffusers_splits_their_kohya_names_match_diffusers() -> None:
    """The same modules as diffusers' Z-Image conversion spells them after splitting kohya's names
    at every ``_``: ``diffusion_model.layers.0.attention.to.q.lora.down.weight`` with its
    ``.alpha`` under ``attention.to_q`` (and a file of the attention alone, which no other key tells
    apart). The factors and the alpha are one module, as diffusers pairs them (lorahot refused the
    alphas as modules without factors); every layer equal to diffusers' loader and the reference."""
    sd, names = _anime_z("split")
    dotted = {}
    for name in names:
        key, module = "lora_unet_" + name.replace(".", "_"), "diffusion_model." + name
        factors = re.sub(r"\.to_([qkv])$", r".to.\1", module)
        dotted[f"{factors}.lora.down.weight"] = sd[f"{key}.lora.down.weight"]
        dotted[f"{factors}.lora.up.weight"] = sd[f"{key}.lora.up.weight"]
        dotted[f"{module}.alpha"] = sd[f"{key}.alpha"]
    assert "diffusion_model.layers.0.attention.to.q.lora.down.weight" in dotted
    assert "diffusion_model.layers.0.attention.to_q.alpha" in dotted
    assert "diffusion_model.noise_refiner.0.feed_forward.w1.alpha" in dotted
    reference = _anime_z_reference(sd, names)
    for part in (dotted, {k: v for k, v in dotted.items() if ".attention." in k}):
        kept = [n for n in names if ".attention." in n] if len(part) < len(dotted) else names
        ours, fmt = _lorahot(_tiny_zimage, part, kept)
        assert fmt == "lumina2"
        _assert_same(ours, _diffusers(_tiny_zimage, diffusers.ZImagePipeline, part, kept))
        _assert_same(ours, {n: reference[n] for n in kept})


def test_an_anime_z_file_with_each_projection_twice_is_refused_naming_both() -> None:
    """An "Anime-Z" file carries the attention twice, ``attention_qkv`` beside ``attention_to_q``
    (``to_k``, ``to_v``) and ``attention_out`` beside ``attention_to_out_0``: diffusers' Z-Image
    loader drops ``qkv`` and ``out``, ComfyUI adds ``to_q`` to its slice of ``qkv``; lorahot refuses
    the file naming both keys, strict=False too, every parameter and buffer bitwise unchanged."""
    split, _ = _anime_z("split")
    fused, _ = _anime_z("fused")
    both = {**split, **{k: v for k, v in fused.items() if "_attention_qkv." in k or "_attention_out." in k}}
    model = _tiny_zimage()
    runtime = lorahot.inject(model, "all-linear", max_rank=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(
            lorahot.AdapterMismatchError,
            match=r"(?s)lands on layers\.0\.attention\.to_q, which .*attention_qkv.* already fills.*"
            r"The file holds two modules for each of those layers",
        ):
            runtime.load(dict(both), strict=strict)
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
