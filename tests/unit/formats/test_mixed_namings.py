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

import functools
import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from lorahot.adapter import Adapter, LoraModule
from lorahot.formats import FORMATS, KeyFormat, ModelNames, format_named, read_as
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


def _blocks_of(fmt: KeyFormat) -> dict[str, torch.Tensor]:
    """A file of ``fmt`` alone with more modules than a stray: each of its example modules at
    block indices 0, 1 and 2 (where it has one), as far as ``fmt`` alone reads them."""
    tensors: dict[str, torch.Tensor] = {}
    for example in _EXAMPLES[fmt.name]:
        if re.search(r"hada_|lokr_", example):
            continue
        for i in range(3):
            candidate = {**tensors, **_module(re.sub(r"(?<=[._])0(?=[._])", str(i), example, count=1), len(tensors))}
            try:
                if lorahot.read_adapter(dict(candidate)).format == fmt.name:
                    tensors = candidate
            except lorahot.LoraError:
                continue
    return tensors


#: the namings whose keys tell them apart (a marker), each with a file of its own (6 keys at least)
_MARKED = [f for f in FORMATS if f.marker and len(_blocks_of(f)) >= 6]


@pytest.mark.parametrize("own", _MARKED, ids=lambda f: f.name)
def test_a_stray_key_of_another_naming_never_decides_the_naming_of_the_file(own: KeyFormat) -> None:
    """Detection took the first naming whose marker some key matched and whose rules read every
    key, so one key of another naming decided how a whole file was read: a krea2-kohya file with a
    MiniMax-H3 key was read as minimax-h3 (its keys by MiniMax-H3's rules, refused in MiniMax-H3's
    terms, or placed by them). Now the naming most keys are of wins, and the keys of another naming
    are refused naming them, how many, their naming and what the rest was read as; strict=False
    skips exactly them and keeps every module of the file's own naming. Pairs of namings that
    place each other's keys their own way (a shared vocabulary) are left to the placement test."""
    tensors = _blocks_of(own)
    mine = {k for f in FORMATS if f.name == own.name for k in tensors if f.claims(k) == 2}
    for other in _MARKED:
        if other.name == own.name or any(other.claims(k) == 2 for k in tensors if k in mine):
            continue
        extra = _module(_EXAMPLES[other.name][0], 7)
        if set(extra) & set(tensors) or any(f.claims(k) == 2 for f in FORMATS if f.name == own.name for k in extra):
            continue
        where = f"{own.name} + {next(iter(extra))}"
        with pytest.raises(lorahot.UnknownFormatError) as caught:
            lorahot.read_adapter({**tensors, **extra})
        text = str(caught.value)
        assert f"2 of its {len(tensors) + 2} keys are of another naming" in text, (where, text)
        assert f"read as {own.name} naming" in text and other.name in text, (where, text)
        assert all(repr(k) in text for k in extra) and "strict=False" in text, (where, text)
        adapter = lorahot.read_adapter({**tensors, **extra}, strict=False)
        assert adapter.format == own.name and sorted(adapter.skipped) == sorted(extra), where
        kept = {k for m in (*adapter.modules.values(), *adapter.weights.values()) for k in m.source_keys}
        assert kept == set(tensors), where


def test_a_krea2_kohya_file_with_a_minimax_key_is_refused_naming_it_and_loads_without_it() -> None:
    """The reported file: Krea 2 modules in kohya spelling and one MiniMax-H3 module (musubi's or
    the original spelling), on a model of diffusers' Krea 2 names. A load is refused naming the
    MiniMax key and krea2-kohya, every parameter bitwise unchanged; strict=False loads the Krea 2
    modules at the float64 reference and lists the MiniMax keys as skipped."""
    krea = {}
    for i in range(3):
        krea |= _module(f"lora_unet_blocks_{i}_attn_wq.lora_down.weight", i)
    for stray in (
        "lora_unet_blocks_0_attn_qkv_proj.lora_down.weight",
        "diffusion_model.blocks.0.attn.qkv_proj.lora_A.weight",
    ):
        extra = _module(stray, 9)
        torch.manual_seed(0)
        model = torch.nn.ModuleDict(
            {
                "transformer_blocks": torch.nn.ModuleList(
                    torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"to_q": torch.nn.Linear(12, 84)})})
                    for _ in range(3)
                )
            }
        ).double()
        runtime = lorahot.inject(model, ["to_q"], max_rank=4)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(
            lorahot.UnknownFormatError,
            match=rf"(?s)2 of its 8 keys.*minimax-h3.*read as krea2-kohya naming.*{re.escape(stray)}",
        ):
            runtime.load({**krea, **extra})
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        x = torch.randn(5, 12, dtype=torch.float64)
        want = []
        for i, block in enumerate(model["transformer_blocks"]):
            a, b = (
                krea[f"lora_unet_blocks_{i}_attn_wq.lora_down.weight"],
                krea[f"lora_unet_blocks_{i}_attn_wq.lora_up.weight"],
            )
            want.append(block["attn"]["to_q"](x) + x @ a.double().T @ b.double().T)  # alpha = rank
        info = runtime.load({**krea, **extra}, strict=False)
        assert info.format == "krea2-kohya" and sorted(info.skipped) == sorted(extra)
        with torch.no_grad():
            for block, expected in zip(model["transformer_blocks"], want, strict=True):
                torch.testing.assert_close(block["attn"]["to_q"](x), expected, rtol=1e-12, atol=1e-12)


#: a module of each naming without a marker (its rules read any model's names), ``{i}`` its block
_UNMARKED = {
    "peft": "base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight",
    "kohya": "lora_unet_down_blocks_{i}_attentions_0_proj_in.lora_down.weight",
    "diffusers": "unet.down_blocks.{i}.attentions.0.proj_in.lora_A.weight",
    "comfyui": "diffusion_model.input_blocks.{i}.1.transformer_blocks.0.attn1.to_q.lora_A.weight",
}


#: files of unmarked namings whose blocks a marked naming's :attr:`KeyFormat.shared` took for its
#: own model's by their block prefix alone (``transformer_blocks.N.``, ``layers.N.``), so one key of
#: that naming decided the file: Flux.1's, SD3's, HunyuanVideo's and Qwen-Image's diffusers-named
#: double blocks (``attn.to_q``, ``attn.add_k_proj``, ``ff_context``, ``img_mlp``), a llama-style
#: ``layers.N.self_attn`` (OmniGen), each under the prefixes and spellings its naming takes
_OTHER_MODELS = (
    ("diffusers", "transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight"),
    ("diffusers", "transformer.transformer_blocks.{i}.ff_context.net.0.proj.lora_A.weight"),
    ("comfyui", "diffusion_model.transformer_blocks.{i}.img_mlp.net.0.proj.lora_A.weight"),
    ("peft", "transformer_blocks.{i}.attn.add_k_proj.lora_A.weight"),
    ("kohya", "lora_unet_transformer_blocks_{i}_attn_to_q.lora_down.weight"),
    ("kohya", "lora_transformer_transformer_blocks_{i}_norm1_context_linear.lora_down.weight"),
    ("comfyui", "diffusion_model.layers.{i}.self_attn.qkv_proj.lora_A.weight"),
    # ComfyUI's .lora.down spelling, which the old diffusers naming's marker took for its own
    ("comfyui", "diffusion_model.transformer_blocks.{i}.attn.to_q.lora.down.weight"),
    ("kohya", "lora_unet_layers_{i}_mlp_gate_up_proj.lora_down.weight"),
)


@pytest.mark.parametrize(("naming", "template"), [*_UNMARKED.items(), *_OTHER_MODELS])
def test_a_file_of_an_unmarked_naming_with_a_key_of_a_marked_one_is_read_as_the_unmarked_one(
    naming: str, template: str
) -> None:
    """The vote counted only the keys marked namings take, so a file of PEFT, kohya, diffusers or
    ComfyUI modules with one module of a marked naming was read as that naming: three PEFT
    ``model.layers.N.self_attn.q_proj`` modules and a Wan ``diffusion_model.blocks.0.self_attn.q``
    as ``wan`` (an adapter_config.json beside it refused in Wan's terms), three kohya SD modules
    and a Krea 2 ``lora_unet_blocks_0_attn_wq`` as ``krea2-kohya``. A marked naming now takes a
    file only where it takes more keys than the rest, which the naming of those keys alone reads:
    for files of 3 to 6 modules in any key order with a module of every marked naming's examples,
    the file is read as its own naming, the marked module refused naming its keys, its naming and
    what the rest was read as, and ``strict=False`` skips exactly it and keeps every other key.
    A key whose marker is absent, or that only a naming of modules outside the blocks takes
    (``lora_unet_final_layer_linear``, other models' names too), is the file's naming's to read.
    The same for files of other models' blocks (:data:`_OTHER_MODELS`): a Flux.1 diffusers file of
    double blocks and one LTX-2 ``transformer.patchify_proj`` was read as ``ltx2``, whose
    ``shared`` blocks were any ``transformer_blocks.N``; now only the modules LTX-2's blocks have."""
    refused = 0
    for n, seed in ((3, 0), (4, 1), (6, 2)):
        base: dict[str, torch.Tensor] = {}
        for i in range(n):
            base |= _module(template.format(i=i), i)
        assert lorahot.read_adapter(dict(base)).format == naming
        order = random.Random(seed)
        for other in FORMATS:
            for example in _EXAMPLES[other.name] if other.marker else ():
                extra = _module(example, 9)
                if re.search(r"hada_|lokr_", example) or set(extra) & set(base):
                    continue
                mixed = list({**base, **extra}.items())
                order.shuffle(mixed)
                where = f"{template} x {n} + {example}"
                try:
                    adapter = lorahot.read_adapter(dict(mixed))
                except lorahot.UnknownFormatError as caught:
                    text = str(caught)
                    assert f"2 of its {len(mixed)} keys are of another naming" in text, (where, text)
                    assert f"read as {naming} naming" in text and other.name in text, (where, text)
                    assert all(repr(k) in text for k in extra) and "strict=False" in text, (where, text)
                    refused += 1
                    adapter = lorahot.read_adapter(dict(mixed), strict=False)
                    assert adapter.format == naming and sorted(adapter.skipped) == sorted(extra), where
                    kept = {k for m in adapter.modules.values() for k in m.source_keys}
                    assert kept == set(base), where
                else:
                    if adapter.format != naming:  # the marked naming's marker is absent: it takes no key
                        assert not re.search(other.marker, example), where
                        continue
                    kept = {k for m in adapter.modules.values() for k in m.source_keys}
                    assert kept == set(base) | set(extra), where
                    assert not re.search(other.marker, example) or other.outside, where
    assert refused >= 3 * 20, refused


def _q_projs(n: int, path: str) -> torch.nn.Module:
    """``n`` blocks, each a float64 Linear(12, 84) at ``path`` (``{i}`` its index), as nested ModuleDicts."""
    torch.manual_seed(0)
    root = torch.nn.ModuleDict()
    for i in range(n):
        node = root
        parts = path.format(i=i).split(".")
        for part in parts[:-1]:
            if part not in node:
                node[part] = torch.nn.ModuleDict()
            node = node[part]
        node[parts[-1]] = torch.nn.Linear(12, 84)
    return root.double()


@pytest.mark.parametrize(
    ("naming", "template", "path", "stray"),
    [
        (
            "peft",
            _UNMARKED["peft"],
            "model.layers.{i}.self_attn.q_proj",
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight",
        ),
        (
            "kohya",
            _UNMARKED["kohya"],
            "down_blocks.{i}.attentions.0.proj_in",
            "lora_unet_blocks_0_attn_wq.lora_down.weight",
        ),
        (
            "diffusers",
            "transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight",
            "transformer_blocks.{i}.attn.to_q",
            "transformer.patchify_proj.lora_A.weight",
        ),
        (
            "comfyui",
            "diffusion_model.transformer_blocks.{i}.attn.to_q.lora_A.weight",
            "transformer_blocks.{i}.attn.to_q",
            "diffusion_model.transformer_blocks.0.attn.processor.to_k_lora.down.weight",
        ),
        (
            "comfyui",
            "diffusion_model.transformer_blocks.{i}.attn.to_q.lora.down.weight",
            "transformer_blocks.{i}.attn.to_q",
            "diffusion_model.blocks.0.self_attn.q.lora_A.weight",
        ),
    ],
    ids=["peft+wan", "kohya+krea2", "flux-diffusers+ltx2", "comfyui+diffusers-old", "comfyui-lora.down+wan"],
)
def test_a_stray_marked_module_is_refused_and_the_file_loads_in_its_own_naming(
    naming: str, template: str, path: str, stray: str, tmp_path: Path
) -> None:
    """The reported files: three PEFT modules (with PEFT's adapter_config.json: r 2, lora_alpha 4)
    and a Wan module, three kohya SD modules (``.alpha`` 1) and a Krea 2 module; three Flux.1
    double-block modules in diffusers naming and an LTX-2 ``patchify_proj`` (was read as ``ltx2``:
    its ``shared`` blocks were any ``transformer_blocks.N``); three ComfyUI modules and one of the
    old diffusers processor spelling (was read as ``diffusers-old``, whose ``to_q`` -> ``q_proj``
    fallback aliases claimed every ComfyUI ``to_q``); three ComfyUI modules in its ``.lora.down``
    spelling and a Wan module (was read as ``diffusers-old``, whose marker took ComfyUI's spelling
    for its own, the ComfyUI prefix then left on every module). A load is refused naming the stray keys,
    their naming and the naming the rest was read as, every parameter and buffer bitwise
    unchanged; ``strict=False`` loads the file in its own naming (PEFT's scale from its config) at
    the float64 reference and lists exactly the stray keys as skipped."""
    sd: dict[str, torch.Tensor] = {}
    for i in range(3):
        key = template.format(i=i)
        sd |= _module(key, i)
        if naming == "kohya":
            sd[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(1.0)
    extra = _module(stray, 9)
    save_file({**sd, **extra}, str(tmp_path / "adapter_model.safetensors"))
    scale = {"peft": 2.0, "kohya": 0.5}.get(naming, 1.0)  # lora_alpha / r from the config, .alpha / r, or 1
    if naming == "peft":
        (tmp_path / "adapter_config.json").write_text(
            json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
        )
    model = _q_projs(3, path)
    runtime = lorahot.inject(model, [path.rpartition(".")[2]], max_rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        lorahot.UnknownFormatError,
        match=rf"(?s)2 of its {len(sd) + 2} keys.*read as {naming} naming.*{re.escape(stray)}",
    ):
        runtime.load(tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.randn(5, 12, dtype=torch.float64)
    want = []
    for i in range(3):
        layer = model.get_submodule(path.format(i=i))
        key = template.format(i=i)
        a, b = sd[key].double(), sd[_up(key)].double()
        with torch.no_grad():
            want.append(layer(x) + scale * x @ a.T @ b.T)
    info = runtime.load(tmp_path, strict=False)
    assert info.format == naming and sorted(info.skipped) == sorted(extra)
    with torch.no_grad():
        for i, expected in enumerate(want):
            torch.testing.assert_close(model.get_submodule(path.format(i=i))(x), expected, rtol=1e-12, atol=1e-12)


#: diffusers models whose own modules outside the blocks carry names that a marked naming's alias
#: places on its model (PixArt's and Allegro's ``adaln_single``, LTX-2's; Krea 2's ``img_in`` and
#: ``final_layer.linear``, Flux's; HunyuanVideo's ``x_embedder.proj``, SD3's; Bria Fibo 2's
#: ``t_embedder.mlp.0``, Hunyuan-DiT's; Qwen-Image's ``txt_in``, Flux's), or whose blocks a naming
#: of another prefix aliases (Z-Image's ``transformer.layers.N.feed_forward.w1``, which the lumina2
#: naming reads under ``diffusion_model.`` only)
_OWN_NAMES_MODELS = (
    "PixArtTransformer2DModel",
    "AllegroTransformer3DModel",
    "Krea2Transformer2DModel",
    "Ideogram4Transformer2DModel",
    "BriaFibo2Transformer2DModel",
    "PRXTransformer2DModel",
    "QwenImageTransformer2DModel",
    "HunyuanVideoTransformer3DModel",
    "HunyuanImageTransformer2DModel",
    "ZImageTransformer2DModel",
    "MiniMaxH3Transformer3DModel",  # its transformer_blocks.N.adaln_proj.linear, which an alias of blocks.N took
)


@functools.cache
def _model_names(model_class: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The module paths of the model's default configuration (built on the meta device) and those
    of its Linear and Conv2d modules, or None where this diffusers has no such model. Built once
    for the tests of both lists (read only: tuples)."""
    diffusers = pytest.importorskip("diffusers")
    cls = getattr(diffusers, model_class, None)
    if cls is None:
        return None
    with torch.device("meta"):
        model = cls()
    linear = tuple(n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))
    return tuple(n for n, _ in model.named_modules()), linear


def _diffusers_file(model_class: str) -> list[str]:
    """The keys of a diffusers-named file (``transformer.<module>``) of every Linear and Conv2d of
    the model's default configuration, its first two blocks of each list."""
    names = _model_names(model_class)
    if names is None:
        pytest.skip(f"needs a diffusers with {model_class}")
    keys = []
    for name in names[1]:
        if not re.search(r"\.(?:[2-9]|\d\d+)\.", name):
            keys += [f"transformer.{name}.lora_A.weight", f"transformer.{name}.lora_B.weight"]
    return keys


@pytest.mark.parametrize("model_class", _OWN_NAMES_MODELS)
def test_a_models_own_names_that_a_marked_naming_aliases_are_never_its_strays(model_class: str) -> None:
    """A marked naming's aliases of names other models have for their own modules voted for it:
    a PixArt file in diffusers naming with one LTX-2 ``transformer.patchify_proj`` was read as
    ``ltx2`` (PixArt's ``adaln_single`` modules, which LTX-2's naming aliases to ``time_embed``,
    counted as LTX-2's), or as ``diffusers`` with PixArt's own ``adaln_single`` modules among the
    strays, which ``strict=False`` then skipped; a Krea 2 file's ``img_in``/``final_layer.linear`` so
    with one Flux key, a HunyuanVideo file's ``x_embedder.proj`` with one SD3 key, a Z-Image file's
    ``transformer.layers.N.feed_forward.w1`` with one Lumina2 ``diffusion_model.`` key (a prefix that
    naming requires). Such a key is the naming's own only where its marker matches it. For every
    marked naming's example module beside a file of all the model's modules: the file reads as
    diffusers naming, the example's keys its only strays (refused naming them, skipped with
    ``strict=False``, every module of the model kept), or none where diffusers naming reads them."""
    base = _diffusers_file(model_class)
    assert read_as(base) == (format_named("diffusers"), ())
    for other in FORMATS:
        for example in _EXAMPLES[other.name] if other.marker else ():
            extra = list(_module(example, 9))
            if re.search(r"hada_|lokr_", example) or set(extra) & set(base):
                continue
            fmt, strays = read_as(base + extra)
            where = f"{model_class} + {example}: {fmt and fmt.name}"
            # PEFT's bare or base_model.model. names: a key diffusers naming cannot read, PEFT's reads the whole file
            assert fmt is not None and fmt.name in ("diffusers", "peft"), where
            assert set(strays) <= set(extra), (where, sorted(set(strays) - set(extra))[:4])


def _paths(model_class: str) -> ModelNames:
    """The module paths of the model's default configuration."""
    names = _model_names(model_class)
    assert names is not None
    return ModelNames.of(names[0])


#: a diffusers model whose own names are another naming's original ones, which that naming marks
#: and aliases (Wan-Animate-2's ``blocks.N.ffn.0``, ``text_embedding.0``, ``head.head``: Wan's)
_ORIGINAL_NAMED = "WanAnimate2Transformer3DModel"


def test_the_reported_mixed_wan_file_reads_as_diffusers_on_a_model_of_those_names() -> None:
    """Wan's original names beside diffusers' Wan names under ``transformer.``: read alone, the
    original names are the wan naming's (strays of the diffusers file); read for a model whose
    own modules they name, they are that model's names, and no key is a stray."""
    modules = ("text_embedding.0", "blocks.0.attn1.to_q", "blocks.1.attn1.to_q", "blocks.0.ffn.0")
    keys = [f"transformer.{m}{s}" for m in modules for s in (".lora_A.weight", ".lora_B.weight")]
    fmt, strays = read_as(keys)
    assert fmt is not None and fmt.name == "diffusers" and len(strays) == 4
    names = ModelNames.of(p for m in modules for p in (m, m.rpartition(".")[0]))
    assert read_as(keys, names) == (format_named("diffusers"), ())


@pytest.mark.parametrize("model_class", [*_OWN_NAMES_MODELS, _ORIGINAL_NAMED])
def test_a_models_own_module_names_are_never_strays_of_a_file_read_for_it(model_class: str) -> None:
    """A marked naming's marker and aliases outvoted the model's own names: a diffusers file of
    Wan-Animate-2 (its ``blocks.N.ffn.0`` and ``text_embedding.0`` are Wan's original names,
    which the wan naming marks and aliases) read as diffusers with those modules among its strays,
    refused or skipped by ``strict=False``. Read for the model (its module paths), a key naming one
    of its modules votes for no naming: the file of all its modules is diffusers' with no stray,
    and beside every marked naming's example module, only the example's keys are strays."""
    base = _diffusers_file(model_class)
    names = _paths(model_class)
    assert read_as(base, names) == (format_named("diffusers"), ())
    for other in FORMATS:
        for example in _EXAMPLES[other.name] if other.marker else ():
            extra = list(_module(example, 9))
            if re.search(r"hada_|lokr_", example) or set(extra) & set(base):
                continue
            fmt, strays = read_as(base + extra, names)
            where = f"{model_class} + {example}: {fmt and fmt.name}"
            assert fmt is not None and fmt.name in ("diffusers", "peft"), where
            assert set(strays) <= set(extra), (where, sorted(set(strays) - set(extra))[:4])


@pytest.mark.parametrize("head", ["diffusion_model.", "transformer.", ""], ids=["comfyui", "transformer", "bare"])
def test_sd3s_context_embedder_beside_one_block_key_is_an_sd3_file(head: str) -> None:
    """``context_embedder``, SD3's original name and diffusers' alike, beside one joint block module was
    read as ComfyUI's, diffusers' or PEFT's naming, its one block module a stray of the sd3 naming,
    so the file was refused as mixed (one key of each). It is an sd3 file: both modules land on
    diffusers' SD3 layers at the float64 reference, the context block's adaLN on ``norm1_context``."""
    model = torch.nn.Module()
    model.context_embedder = torch.nn.Linear(4, 4)
    model.transformer_blocks = torch.nn.ModuleList([torch.nn.Module()])
    model.transformer_blocks[0].norm1_context = torch.nn.Module()
    model.transformer_blocks[0].norm1_context.linear = torch.nn.Linear(4, 24)  # 6 rows per input: no swap
    g = torch.Generator().manual_seed(0)
    sd, placed_on = {}, {}
    for module, layer in (
        ("context_embedder", model.context_embedder),
        ("joint_blocks.0.context_block.adaLN_modulation.1", model.transformer_blocks[0].norm1_context.linear),
    ):
        a, b = torch.randn(2, 4, generator=g), torch.randn(layer.out_features, 2, generator=g)
        sd |= {f"{head}{module}.lora_A.weight": a, f"{head}{module}.lora_B.weight": b}
        placed_on[module] = (a, b)
    assert lorahot.read_adapter(sd).format == "sd3"
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    assert runtime.load(sd).format == "sd3"
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for name, (a, b) in zip(("context_embedder", "transformer_blocks.0.norm1_context.linear"), placed_on.values()):
        base = model.get_submodule(name).base_layer
        want = x @ (base.weight.double() + b.double() @ a.double()).T + base.bias.double()
        with torch.no_grad():
            got = model.get_submodule(name)(x.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
