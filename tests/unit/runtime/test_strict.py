"""``strict=False``: keys that cannot be placed are skipped and listed; the default refuses them.

The file is an SDXL-like kohya LoRA that carries both text encoders' keys, a LyCORIS T-LoRA key
and a foreign key; the model has only its "unet" injected. The oracle is a dense float64
reference of the placed modules only (``W x + b + s * B A x``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
from lorahot.cli import main
from tests.helpers import lora_pair

UNET = ["lora_unet_attn_to_q", "lora_unet_attn_to_k"]
TE = ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1"]
FOREIGN = ["lora_unet_attn_to_v.lambda_layer", "some_other_tool.weight_scale"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"attn": nn.ModuleDict({n: nn.Linear(8, 8) for n in ("to_q", "to_k", "to_v")})}).double()


def _file() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    out: dict[str, torch.Tensor] = {}
    for stem in UNET + TE:
        out |= lora_pair(stem, "lora_down", "lora_up")
        out[f"{stem}.alpha"] = torch.tensor(1.0)
    return out | {k: torch.randn(2, 2) for k in FOREIGN}


def _reference(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
    model, out = _model(), {}
    for name, layer in model["attn"].items():
        y = layer(x)
        stem = f"lora_unet_attn_{name}"
        if stem in UNET:
            a, b = tensors[f"{stem}.lora_down.weight"].double(), tensors[f"{stem}.lora_up.weight"].double()
            y = y + float(tensors[f"{stem}.alpha"]) / a.shape[0] * x @ a.T @ b.T
        out[name] = y
    return out


def _skipped_keys(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in tensors if not k.startswith(tuple(UNET))} | set(FOREIGN[:1])


def test_strict_default_refuses_and_lists_the_keys() -> None:
    model = _model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v"], max_rank=4)
    tensors = _file()
    with pytest.raises(lorahot.UnknownFormatError, match=r"lambda_layer[\s\S]*some_other_tool\.weight_scale"):
        runtime.load(tensors)
    del tensors["lora_unet_attn_to_v.lambda_layer"], tensors["some_other_tool.weight_scale"]
    with pytest.raises(
        lorahot.AdapterMismatchError, match=rf"{TE[0]}: matches no injected layer[\s\S]*{TE[1]}: matches no"
    ):
        runtime.load(tensors)
    assert runtime.info() is None  # nothing loaded


def test_strict_false_loads_the_rest_and_lists_what_it_skipped(tmp_path: Path) -> None:
    model = _model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v"], max_rank=4)
    tensors = _file()
    x = torch.randn(3, 8, dtype=torch.float64)
    want = _reference(tensors, x)
    for source in (tensors, _saved(tmp_path, tensors)):
        info = runtime.load(source, strict=False)
        assert set(info.ranks) == {"attn.to_q", "attn.to_k"}
        assert set(info.skipped) == _skipped_keys(tensors)
        with torch.no_grad():
            for name, layer in model["attn"].items():
                torch.testing.assert_close(layer(x), want[name], rtol=1e-12, atol=1e-12)
    adapter = lorahot.read_adapter(tensors, strict=False)
    assert set(adapter.skipped) == set(FOREIGN)  # the reader skips what no naming holds; load the rest


def test_strict_false_skips_a_module_whole_when_one_of_its_keys_is_refused() -> None:
    """A module whose DoRA scale (LyCORIS ``dora_scale``) or LoRA bias (``lora_up.bias``) is
    refused would, without it, compute another update: ``strict=False`` skips every key of such
    a module and loads the rest (it used to load the LoRA without its DoRA scale or bias)."""
    model = _model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v"], max_rank=4)
    torch.manual_seed(2)
    tensors = {**lora_pair(UNET[0], "lora_down", "lora_up"), f"{UNET[0]}.alpha": torch.tensor(1.0)}
    dora = {
        **lora_pair(UNET[1], "lora_down", "lora_up"),
        f"{UNET[1]}.dora_scale": torch.rand(8, 8) + 1,
    }  # neither one value per output channel nor one per input channel
    v = "lora_unet_attn_to_v"
    bias = {**lora_pair(v, "lora_down", "lora_up"), f"{v}.lora_up.bias": torch.randn(8)}
    info = runtime.load(tensors | dora | bias, strict=False)
    assert set(info.ranks) == {"attn.to_q"}
    assert set(info.skipped) == set(dora) | set(bias)
    x, base = torch.randn(3, 8, dtype=torch.float64), _model()["attn"]
    a, b = tensors[f"{UNET[0]}.lora_down.weight"].double(), tensors[f"{UNET[0]}.lora_up.weight"].double()
    with torch.no_grad():
        want = base["to_q"](x) + x @ a.T @ b.T / 2  # alpha 1, rank 2
        torch.testing.assert_close(model["attn"]["to_q"](x), want, rtol=1e-12, atol=1e-12)
        assert torch.equal(model["attn"]["to_k"](x), base["to_k"](x))
        assert torch.equal(model["attn"]["to_v"](x), base["to_v"](x))
    with pytest.raises(lorahot.UnknownFormatError, match=r"none of its 3 tensors is a loadable LoRA weight"):
        lorahot.read_adapter(dora, strict=False)


def _unbuildable(kind: str) -> dict[str, torch.Tensor]:
    """A LyCORIS module on ``attn.to_k`` that lorahot cannot build, holding a ``lora_down``."""
    g = torch.Generator().manual_seed(3)
    k = UNET[1]
    down = {f"{k}.lora_down.weight": torch.randn(2, 8, 1, 1, generator=g)}
    tucker = down | {f"{k}.lora_mid.weight": torch.randn(2, 2, 1, 1, generator=g), f"{k}.alpha": torch.tensor(1.0)}
    loha = {
        f"{k}.hada_w{i}_{ab}": torch.randn(*(8, 2) if ab == "a" else (2, 8), generator=g) for i in (1, 2) for ab in "ab"
    }
    return {
        "diff-dora": {f"{k}.diff": torch.randn(8, 8, generator=g), f"{k}.dora_scale": torch.rand(8, 1, generator=g)},
        "locon-tucker-no-up": tucker,
        "loha-and-lora-down": loha | {f"{k}.lora_down.weight": torch.randn(2, 8, generator=g)},
        "diff-and-lora-down": {f"{k}.diff": torch.randn(8, 8, generator=g), f"{k}.lora_down.weight": torch.randn(2, 8)},
    }[kind]


@pytest.mark.parametrize("kind", ["diff-dora", "locon-tucker-no-up", "loha-and-lora-down", "diff-and-lora-down"])
def test_strict_false_lists_every_key_of_a_lycoris_module_it_cannot_build(kind: str) -> None:
    """A LyCORIS or diff module that cannot be built (a diff with a ``dora_scale``, a Tucker
    LoCon without its ``lora_up``, LoHa factors or a diff beside a ``lora_down``) is refused by
    default; ``strict=False`` skips it and lists every one of its keys, its ``lora_down`` too
    (once dropped from the list while the module was skipped), and loads the rest."""
    model = _model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v"], max_rank=4, merged=True)
    torch.manual_seed(2)
    tensors = {**lora_pair(UNET[0], "lora_down", "lora_up"), f"{UNET[0]}.alpha": torch.tensor(1.0)}
    broken = _unbuildable(kind)
    with pytest.raises(lorahot.UnknownFormatError, match=rf"{UNET[1]} \({re.escape(next(iter(broken)))}"):
        runtime.load(tensors | broken)
    assert set(lorahot.read_adapter(tensors | broken, strict=False).skipped) == set(broken)
    info = runtime.load(tensors | broken, strict=False)
    assert set(info.ranks) == {"attn.to_q"} and set(info.skipped) == set(broken)
    x, base = torch.randn(3, 8, dtype=torch.float64), _model()["attn"]
    a, b = tensors[f"{UNET[0]}.lora_down.weight"].double(), tensors[f"{UNET[0]}.lora_up.weight"].double()
    with torch.no_grad():
        torch.testing.assert_close(
            model["attn"]["to_q"](x), base["to_q"](x) + x @ a.T @ b.T / 2, rtol=1e-12, atol=1e-12
        )
        assert torch.equal(model["attn"]["to_k"](x), base["to_k"](x))


def test_strict_false_through_preload_and_cache(tmp_path: Path) -> None:
    model = _model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v"], max_rank=4, slots=2)
    tensors = _file()
    path = _saved(tmp_path, tensors)
    prepared = runtime.preload(path, strict=False)
    assert set(prepared.plan.skipped) == _skipped_keys(tensors)
    info = runtime.load(path, strict=False, slot=1)  # from the host cache
    assert set(info.skipped) == _skipped_keys(tensors) and set(info.ranks) == {"attn.to_q", "attn.to_k"}
    with pytest.raises(lorahot.UnknownFormatError):
        runtime.load(path, slot=1)  # a strict load is another cache entry, and refuses


def test_strict_false_with_nothing_placeable_is_still_refused() -> None:
    runtime = lorahot.inject(_model(), ["to_q"], max_rank=4)
    only_te = lora_pair(TE[0], "lora_down", "lora_up")
    with pytest.raises(lorahot.AdapterMismatchError, match=r"no module of the adapter \(kohya naming\) maps onto"):
        runtime.load(only_te, strict=False)
    with pytest.raises(lorahot.UnknownFormatError, match=r"none of its 1 tensors is a loadable LoRA weight"):
        lorahot.read_adapter({"x.oft_blocks": torch.randn(2)}, strict=False)
    with pytest.raises(lorahot.UsageError, match=r"strict='no' must be"):
        runtime.load(only_te, strict="no")


def test_inspect_no_strict_lists_skipped_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _saved(tmp_path, _file())
    with pytest.raises(SystemExit, match="2"):
        main(["inspect", str(path)])
    assert "lambda_layer" in capsys.readouterr().err
    assert main(["inspect", str(path), "--no-strict", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert set(shown["skipped"]) == set(FOREIGN) and shown["modules"] == 4


def _saved(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / "sdxl_like.safetensors"
    save_file(tensors, str(path))
    return path


#: Keys of wild LoRA files that no loader turns into an update of the injected layers, which
#: strict=False skips: what the strict refusal says of each, and the kind it raises.
NOT_APPLIED = {
    "stray alpha": (
        {"lora_unet_attn_to_v.alpha": torch.tensor(2.0)},
        lorahot.AdapterMismatchError,
        r"lora_unet_attn_to_v\.alpha, no lora_down/lora_up weights \(an alpha without its factors changes no output",
    ),
    "down without up": (
        {"lora_te_text_model_embeddings_token_embedding.lora_down.weight": torch.randn(2, 8)},
        lorahot.AdapterMismatchError,
        r"lora_te_text_model_embeddings_token_embedding: has lora_down \(\S+\) but no lora_up",
    ),
    "embedding bundle": (
        {"bundle_emb.tok.string_to_param.*": torch.randn(2, 8), "emb_params": torch.randn(2, 8)},
        lorahot.UnknownFormatError,
        r"bundle_emb\.tok\.string_to_param\.\*: a textual-inversion embedding \(pivotal tuning\)[^\n]*"
        r"pipe\.load_textual_inversion[\s\S]*emb_params: a textual-inversion embedding",
    ),
    "a module the model lacks": (
        lora_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_down", "lora_up"),
        lorahot.AdapterMismatchError,
        r"lora_te2_text_model_encoder_layers_0_self_attn_q_proj: matches no injected layer",
    ),
}


@pytest.mark.parametrize("case", NOT_APPLIED)
def test_a_refusal_of_keys_strict_false_skips_says_so_and_strict_false_loads_the_rest(case: str) -> None:
    """A kohya file with keys besides its LoRA factors that change no injected layer's output
    (a stray .alpha, half a module, an embedding bundle, modules of a text encoder the model
    lacks) is refused by default naming the keys and what strict=False keeps, the model
    bitwise unchanged; strict=False loads the LoRA modules as the float64 reference computes
    them, as ComfyUI loads such a file (it warns of the keys and applies the rest)."""
    extra, error, said = NOT_APPLIED[case]
    model = _model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v"], max_rank=4)
    tensors = {k: v for k, v in _file().items() if k.startswith(tuple(UNET))} | extra
    before = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with pytest.raises(error, match=said) as refused:
        runtime.load(tensors)
    assert re.search(r"\nOr load the rest with strict=False\b[^\n]*\.$", str(refused.value)), str(refused.value)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert runtime.info() is None
    info = runtime.load(tensors, strict=False)
    assert set(info.skipped) == set(extra) and set(info.ranks) == {"attn.to_q", "attn.to_k"}
    x = torch.randn(3, 8, dtype=torch.float64)
    want = _reference(tensors, x)
    with torch.no_grad():
        for name, layer in model["attn"].items():
            torch.testing.assert_close(layer(x), want[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [True, False], ids=["with alpha", "without alpha"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_rank_0_module_is_refused_saying_why_and_strict_false_skips_it(alpha: bool, merged: bool) -> None:
    """A kohya module of rank 0 (``lora_down`` ``[0, in]``, ``lora_up`` ``[out, 0]``: pruned or
    resized files) was refused at load by shape alone (``expected (r, 8) with r >= 1``), with
    ``strict=False`` too, so the whole file could not be loaded. Its loaders disagree on it
    (sd-scripts divides by rank 0, ComfyUI adds zero without an .alpha and divides by zero with one,
    diffusers refuses r=0): the read refuses it naming its keys, shapes, why and the fix, nothing
    changed; ``strict=False`` skips exactly its keys and loads the rest at the float64 reference."""
    tensors = {k: v for k, v in _file().items() if k.startswith(tuple(UNET))}
    empty = {
        "lora_unet_attn_to_v.lora_down.weight": torch.zeros(0, 8),
        "lora_unet_attn_to_v.lora_up.weight": torch.zeros(8, 0),
    }
    empty |= {"lora_unet_attn_to_v.alpha": torch.tensor(4.0)} if alpha else {}
    model = _model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v"], max_rank=4, merged=merged)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.AdapterMismatchError) as caught:
        runtime.load(tensors | empty)
    text = str(caught.value)
    assert "1 LoRA module(s) of rank 0" in text, text
    assert (
        "lora_unet_attn_to_v: lora_unet_attn_to_v.lora_down.weight [0, 8], lora_unet_attn_to_v.lora_up.weight [8, 0]"
        in text
    )
    assert "kohya's sd-scripts scales it by alpha / 0" in text and "diffusers refuses it" in text, text
    assert "Delete its keys" in text and "strict=False" in text, text
    assert runtime.info() is None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.randn(3, 8, dtype=torch.float64)
    want = _reference(tensors, x)
    info = runtime.load(tensors | empty, strict=False)
    assert sorted(info.skipped) == sorted(empty) and set(info.ranks) == {"attn.to_q", "attn.to_k"}
    with torch.no_grad():
        for name, layer in model["attn"].items():
            torch.testing.assert_close(layer(x), want[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("call", ["load", "preload"])
def test_the_strict_refusal_counts_what_strict_false_loads_into_the_model(call: str, tmp_path: Path) -> None:
    """A load refused for keys strict=False skips says what strict=False does: the layers it
    loads and the keys it skips are those of the runtime's strict=False load (here 2 layers and
    8 keys: the two text encoders' modules, which no injected layer takes, skipped too). It
    counted the modules the reader keeps ("it reads 4 modules of the file and skips 2 keys"), a
    file or a mapping alike; read_adapter and inspect, with no model, still count those."""
    model = _model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v"], max_rank=4)
    tensors = _file()
    for source in (tensors, _saved(tmp_path, tensors)):
        with pytest.raises(lorahot.UnknownFormatError) as refused:
            getattr(runtime, call)(source)
        assert runtime.info() is None
        loaded = runtime.load(source, strict=False)
        assert (len(loaded.ranks), len(loaded.skipped)) == (2, 8)
        hint = str(refused.value).splitlines()[-1]
        assert hint.startswith(
            "Or load the rest with strict=False: it loads into 2 injected layers of the model and skips 8 keys ("
        ), hint
        runtime.unload()
    with pytest.raises(lorahot.UnknownFormatError, match=r"it reads 4 modules of the file and skips 2 keys \("):
        lorahot.read_adapter(tensors)
