"""``read_adapter`` sources: directories, files, mappings, adapters; and the config fields."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
from lorahot.adapter import WeightModule
from lorahot.errors import lines


def _peft(rank: int = 2) -> dict[str, torch.Tensor]:
    return {
        "base_model.model.proj.lora_A.weight": torch.randn(rank, 8),
        "base_model.model.proj.lora_B.weight": torch.randn(6, rank),
    }


def test_directory_file_and_mapping_agree(tmp_path: Path) -> None:
    save_file(_peft(), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 3, "target_modules": ["proj"]}))
    by_dir, by_file = lorahot.read_adapter(tmp_path), lorahot.read_adapter(tmp_path / "adapter_model.safetensors")
    for adapter in (by_dir, by_file):
        assert adapter.format == "peft" and adapter.modules["proj"].scale == 1.5
        assert adapter.config["target_modules"] == ["proj"]
    mapping = lorahot.read_adapter(dict(_peft()), config={"lora_alpha": 4, "use_rslora": True})
    assert mapping.source == "<mapping>" and mapping.modules["proj"].scale == pytest.approx(4 / 2**0.5)


def test_weight_name_and_subfolder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    save_file(_peft(), tmp_path / "sub" / "a.safetensors")
    save_file(_peft(4), tmp_path / "sub" / "b.safetensors")
    with pytest.raises(
        lorahot.SourceNotFoundError,
        match=r"several \.safetensors files \(a\.safetensors, b\.safetensors\); pass weight_name= "
        r"\(the CLI.s --weight-name\)",
    ):
        lorahot.read_adapter(tmp_path, subfolder="sub")
    assert lorahot.read_adapter(tmp_path, subfolder="sub", weight_name="b.safetensors").ranks == {"proj": 4}
    with pytest.raises(lorahot.SourceNotFoundError, match=r"weight_name='c\.safetensors' does not exist"):
        lorahot.read_adapter(tmp_path / "sub", weight_name="c.safetensors")


def test_missing_local_path(tmp_path: Path) -> None:
    with pytest.raises(lorahot.SourceNotFoundError, match=r"nope\.safetensors: no such file or directory"):
        lorahot.read_adapter(tmp_path / "nope.safetensors")


def test_adapter_objects_pass_through_and_take_key_options() -> None:
    adapter = lorahot.read_adapter(_peft())
    assert lorahot.read_adapter(adapter) is adapter
    renamed = lorahot.read_adapter(adapter, key_map={"proj": "head"})
    assert list(renamed.modules) == ["head"] and renamed.format == "peft"


def test_config_contradicting_tensors_is_named() -> None:
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"proj: config= says r=8, but base_model\.model\.proj\.lora_A\.weight has shape \(2, 8\) \(rank 2\)",
    ):
        lorahot.read_adapter(_peft(), config={"r": 8})


def test_config_over_a_file_s_config_is_blamed_with_it(tmp_path: Path) -> None:
    """``config=`` over adapter_config.json: the message blamed the file for the caller's r=8 and
    said to re-save the adapter; it names both and says to fix config= first."""
    save_file(_peft(), tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 3, "target_modules": ["proj"]}))
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"proj: adapter_config\.json with config= over it says r=8, but base_model\.model\.proj\.lora_A\.weight "
        r"has shape \(2, 8\) \(rank 2\)\nFix config= \(or re-save the adapter\) so tensors and config agree\.$",
    ):
        lorahot.read_adapter(tmp_path, config={"r": 8})
    with pytest.raises(lorahot.AdapterMismatchError, match=r"config= says r=8.*\nFix config= \(or re-save"):
        lorahot.read_adapter(_peft(), config={"r": 8})


def test_a_file_without_any_config_is_not_told_to_fix_config(tmp_path: Path) -> None:
    """A kohya file with half a module and no config anywhere: the refusal said "Fix config= (or
    re-save the adapter)" though no config= was given (the defaults were labelled as config=). It
    now says to re-save the file; with config= given it still names config= first."""
    half = {
        "lora_unet_a_proj_in.lora_down.weight": torch.randn(4, 8),
        "lora_unet_a_proj_in.lora_up.weight": torch.randn(8, 4),
        "lora_unet_b_proj_in.lora_down.weight": torch.randn(4, 8),
    }
    path = tmp_path / "half.safetensors"
    save_file(half, path)
    for source in (half, path):
        with pytest.raises(lorahot.AdapterMismatchError) as refused:
            lorahot.read_adapter(source)
        text = str(refused.value)
        assert "lora_unet_b_proj_in" in text and "config=" not in text.split("inconsistent adapter:")[1]
        assert "Re-save the adapter with both factors of every module." in text
    with pytest.raises(lorahot.AdapterMismatchError, match=r"\nFix config= \(or re-save the adapter\)"):
        lorahot.read_adapter(half, config={"lora_alpha": 4})


def test_fuse_argument_errors() -> None:
    with pytest.raises(lorahot.UsageError, match=r"fuse\['qkv'\] must list at least two parts"):
        lorahot.read_adapter(_peft(), fuse={"qkv": ["q"]})
    with pytest.raises(lorahot.UsageError, match=r"each part must be a name or \(name, out_features\)"):
        lorahot.read_adapter(_peft(), fuse={"qkv": ["q", 3]})
    # a module stacked twice into one layer, or into two, would add its delta twice
    with pytest.raises(lorahot.UsageError, match=r"^fuse\['qkv'\]: part 'q' is already a part of 'qkv'; each module"):
        lorahot.read_adapter(_peft(), fuse={"qkv": ["q", "k", "q"]})
    with pytest.raises(lorahot.UsageError, match=r"^fuse\['qk'\]: part 'k' is already a part of 'qkv'; each module"):
        lorahot.read_adapter(_peft(), fuse={"qkv": ["q", "k", "v"], "qk": ["k", "o"]})
    with pytest.raises(lorahot.UsageError, match=r"^fuse\['q'\]: part 'q' is itself a fused name; each module"):
        lorahot.read_adapter(_peft(), fuse={"q": ["q", "k"]})


@pytest.mark.parametrize(
    ("convert", "what"),
    [
        (lambda t: t.to("meta"), r"torch\.strided tensor on meta"),
        (lambda t: t.to_sparse(), r"torch\.sparse_coo tensor on cpu"),
        pytest.param(
            lambda t: torch.nested.as_nested_tensor([t, t]),  # its .shape raises
            r"nested tensor",
            marks=pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
        ),
    ],
)
def test_tensors_without_data_are_refused_when_read(convert, what: str) -> None:
    """read_adapter itself refuses them, naming the module (fuse, nbytes and inspect used to crash)."""
    tensors = {k: convert(v) for k, v in _peft().items()}
    with pytest.raises(
        lorahot.AdapterReadError,
        match=r"<mapping>: values that cannot be LoRA weights:\n  - proj \(base_model\.model\.proj\.lora_A\.weight, "
        rf"base_model\.model\.proj\.lora_B\.weight\): A is a {what}; LoRA weights must be dense tensors with data",
    ):
        lorahot.read_adapter(tensors)


def _fake(t: torch.Tensor) -> torch.Tensor:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(t.shape)


def _two(t: torch.Tensor) -> torch.Tensor:
    from torch.testing._internal.two_tensor import TwoTensor

    return TwoTensor(t.clone(), 2 * t)


@pytest.mark.parametrize(
    ("convert", "kind"),
    [(_fake, "FakeTensor"), (torch._to_functional_tensor, "Tensor"), (_two, "TwoTensor")],
    ids=["fake", "functional", "two_tensor"],
)
def test_tensor_subclasses_whose_values_are_not_in_their_storage_are_refused(convert, kind: str) -> None:
    """A fake, functional or wrapper subclass (DTensor, torchao's) value: its storage holds no
    values (or not the ones it stands for). Was: UnexpectedError from deep in the load (the fake
    and functional ones), or a TwoTensor loaded from one of its two tensors. Read and load refuse
    it naming the module and key, the model bitwise unchanged; nn.Parameter and plain subclasses
    hold their values and load as the plain tensor does."""
    tensors = {k: v.double() for k, v in _peft().items()}
    bad = {**tensors, "base_model.model.proj.lora_B.weight": convert(tensors["base_model.model.proj.lora_B.weight"])}
    what = (
        r"<mapping>: values that cannot be LoRA weights:\n  - proj \(base_model\.model\.proj\.lora_A\.weight, "
        rf"base_model\.model\.proj\.lora_B\.weight\): B is a {kind}, a tensor subclass whose values are not in its own "
        r"storage .*pass plain tensors \(DTensor\.full_tensor\(\), or dequantize\)"
    )
    with pytest.raises(lorahot.AdapterReadError, match=what):
        lorahot.read_adapter(bad)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(8, 6, dtype=torch.float64))
    runtime = lorahot.inject(model, ["proj"], max_rank=4)
    runtime.load(tensors)
    x = torch.randn(3, 8, dtype=torch.float64)
    want = model(x)
    a, b = tensors["base_model.model.proj.lora_A.weight"], tensors["base_model.model.proj.lora_B.weight"]
    torch.testing.assert_close(want, x @ (model.proj.weight + b @ a).T + model.proj.bias, rtol=1e-12, atol=1e-12)
    before = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with pytest.raises(lorahot.AdapterReadError, match=what):
        runtime.load(bad)
    assert all(torch.equal(v, before[k]) for k, v in [*model.named_parameters(), *model.named_buffers()])
    assert torch.equal(model(x), want)

    class Plain(torch.Tensor):
        pass

    for wrap in (nn.Parameter, lambda t: t.clone().as_subclass(Plain)):
        runtime.unload()
        runtime.load({k: wrap(v) for k, v in tensors.items()})
        assert torch.equal(model(x), want)


@pytest.mark.parametrize(
    ("alpha", "got"),
    [
        (torch.tensor(2.0 + 1.0j), r"got dtype torch\.complex64"),
        (torch.tensor(True), r"got dtype torch\.bool"),
        (torch.tensor(2.0, device="meta"), r"got a torch\.strided tensor on meta"),
        (torch.tensor([2.0]).to_sparse(), r"got a torch\.sparse_coo tensor on cpu"),
        (
            torch.tensor(0.0),
            r"got shape \(\) value \[0\.0\] \(sd-scripts, which trains and loads kohya files, reads an alpha of 0 as "
            r"alpha = rank, a scale of 1; ComfyUI and diffusers read it as a scale of 0",
        ),
        (torch.tensor(float("nan")), r"got shape \(\) value \[nan\]$"),
        (torch.tensor(float("-inf")), r"got shape \(\) value \[-inf\]$"),
    ],
)
def test_alpha_tensors_must_be_one_real_number(alpha: torch.Tensor, got: str) -> None:
    tensors = {"lora_unet_proj.lora_down.weight": torch.randn(2, 8), "lora_unet_proj.lora_up.weight": torch.randn(6, 2)}
    with pytest.raises(
        lorahot.AdapterReadError,
        match=r"(?m)lora_unet_proj\.alpha: alpha must be one finite number other than 0, " + got,
    ):
        lorahot.read_adapter(tensors | {"lora_unet_proj.alpha": alpha})


@pytest.mark.parametrize("merged", [False, True])
def test_a_negative_kohya_alpha_scales_by_alpha_over_rank_as_its_loaders_do(merged: bool) -> None:
    """sd-scripts (LoRAModule: alpha / lora_dim, 0 alone read as the rank), ComfyUI (alpha /
    rank as given) and diffusers (network alphas into PEFT's lora_alpha) all scale a LoRA with a
    negative ``.alpha`` by ``alpha / r``: so does lorahot, on a linear and a LoCon conv, against
    that formula in float64. Was: refused as not > 0."""
    g = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(8, 6), "conv": nn.Conv2d(3, 5, 3, padding=1)}).double()
    before = {name: m.weight.detach().clone() for name, m in model.items()}
    tensors = {
        "lora_unet_proj.lora_down.weight": torch.randn(2, 8, generator=g, dtype=torch.float64),
        "lora_unet_proj.lora_up.weight": torch.randn(6, 2, generator=g, dtype=torch.float64),
        "lora_unet_proj.alpha": torch.tensor(-3.0),
        "lora_unet_conv.lora_down.weight": torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64),
        "lora_unet_conv.lora_up.weight": torch.randn(5, 4, 1, 1, generator=g, dtype=torch.float64),
        "lora_unet_conv.alpha": torch.tensor(-0.5),
    }
    runtime = lorahot.inject(model, ["proj", "conv"], max_rank=4, merged=merged)
    info = runtime.load(tensors)
    assert info.format == "kohya"
    x, img = torch.randn(3, 8, dtype=torch.float64), torch.randn(1, 3, 4, 4, dtype=torch.float64)
    for name, rank, alpha in (("proj", 2, -3.0), ("conv", 4, -0.5)):
        down, up = tensors[f"lora_unet_{name}.lora_down.weight"], tensors[f"lora_unet_{name}.lora_up.weight"]
        delta = alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(before[name].shape)
        layer = nn.Linear(8, 6) if name == "proj" else nn.Conv2d(3, 5, 3, padding=1)
        layer = layer.double()
        with torch.no_grad():
            layer.weight.copy_(before[name] + delta)
            layer.bias.copy_(model[name].bias)
            got, want = (model[name](x), layer(x)) if name == "proj" else (model[name](img), layer(img))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def test_zero_element_tensors_with_huge_dims_are_refused_from_the_header(tmp_path: Path) -> None:
    header = {
        "base_model.model.proj.lora_A.weight": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}
    }
    raw = json.dumps(header).encode()
    (tmp_path / "a.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(
        lorahot.AdapterReadError,
        match=r"shape \[0, 1099511627776, 1099511627776\] has dimensions whose product exceeds",
    ):
        lorahot.read_adapter(tmp_path / "a.safetensors")


def test_fusing_parts_that_are_not_floating_point_is_a_read_error() -> None:
    tensors = {
        "base_model.model.attn.q.lora_A.weight": torch.randint(-3, 3, (2, 8), dtype=torch.int8),
        "base_model.model.attn.q.lora_B.weight": torch.randint(-3, 3, (8, 2), dtype=torch.int8),
        "base_model.model.attn.k.lora_A.weight": torch.randn(2, 8),
        "base_model.model.attn.k.lora_B.weight": torch.randn(8, 2),
    }
    with pytest.raises(lorahot.AdapterReadError, match=r"attn\.qk: part attn\.q is of dtype torch\.int8"):
        lorahot.read_adapter(tensors, fuse={"qk": ["q", "k"]})


@pytest.mark.parametrize(
    "modules",
    [
        {5: "x"},
        "not a dict",
        {"proj": ("A", "B")},
        {"proj": lorahot.LoraModule("proj", torch.ones(2, 8), torch.ones(6, 2), "2")},  # type: ignore[arg-type]
    ],
)
def test_malformed_adapter_objects_are_usage_errors(modules: object) -> None:
    with pytest.raises(
        lorahot.UsageError, match=r"Adapter\.modules must map module keys \(str\) to lorahot\.LoraModule"
    ):
        lorahot.read_adapter(lorahot.Adapter(modules, "peft", "<built>"), prefix="x")  # type: ignore[arg-type]


def test_running_out_of_memory_for_the_tensor_data_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lorahot.io.tensorfile as tensorfile

    save_file(_peft(), tmp_path / "adapter_model.safetensors")

    empty = torch.empty

    def no_memory(*args: object, **kwargs: object) -> torch.Tensor:
        if str(kwargs.get("device")) == "meta":  # the header's shapes (read first), no memory
            return empty(*args, **kwargs)  # type: ignore[call-overload,no-any-return]
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 112 bytes.")

    monkeypatch.setattr(tensorfile.torch, "empty", no_memory)
    with pytest.raises(lorahot.AdapterReadError, match=r"adapter_model\.safetensors: cannot allocate 112 bytes"):
        lorahot.read_adapter(tmp_path)


def test_data_larger_than_the_machines_memory_is_refused_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sparse file can claim terabytes of (zero) data for free; reading it would take hours."""
    import lorahot.io.tensorfile as tensorfile

    save_file(_peft(), tmp_path / "adapter_model.safetensors")
    monkeypatch.setattr(tensorfile, "_physical_memory", lambda: 100)
    with pytest.raises(lorahot.AdapterReadError, match=r"its tensor data is 112 bytes, more than this machine's 100"):
        lorahot.read_adapter(tmp_path)


def test_meta_device_reads_shapes_from_the_header_and_alpha_from_the_config(tmp_path: Path) -> None:
    """``device="meta"``: A and B are meta tensors of the file's shapes; a ``.alpha`` tensor is
    data, so it is not read (the config's alpha, else the rank, stands in)."""
    tensors = {
        "base_model.model.q.lora_A.weight": torch.randn(4, 8, dtype=torch.float16),
        "base_model.model.q.lora_B.weight": torch.randn(6, 4, dtype=torch.float16),
        "base_model.model.k.lora_A.weight": torch.randn(2, 8),
        "base_model.model.k.lora_B.weight": torch.randn(6, 2),
    }
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "rank_pattern": {"k": 2}}))
    adapter = lorahot.read_adapter(tmp_path, device="meta")
    q, k = adapter.modules["q"], adapter.modules["k"]
    assert q.A.device.type == "meta" and q.A.shape == (4, 8) and q.B.shape == (6, 4) and q.A.dtype == torch.float16
    assert (q.rank, k.rank, q.alpha, k.alpha) == (4, 2, 8.0, 8.0)
    kohya = {"lora_unet_q.lora_down.weight": torch.randn(3, 8), "lora_unet_q.lora_up.weight": torch.randn(6, 3)}
    (tmp_path / "kohya").mkdir()
    save_file({**kohya, "lora_unet_q.alpha": torch.tensor(1.5)}, tmp_path / "kohya" / "k.safetensors")
    read = lorahot.read_adapter(tmp_path / "kohya" / "k.safetensors", device="meta")
    assert next(iter(read.modules.values())).alpha == 3.0  # the rank: 1.5 is not read


# -- a file read again is assembled from its recipe -------------------------------------------

_QK = {
    "base_model.model.q.lora_A.weight": torch.randn(4, 8),
    "base_model.model.q.lora_B.weight": torch.randn(6, 4),
    "base_model.model.k.lora_A.weight": torch.randn(2, 8, dtype=torch.float16),
    "base_model.model.k.lora_B.weight": torch.randn(6, 2, dtype=torch.float16),
}
_DORA = {
    "base_model.model.x.lora_A.weight": torch.randn(2, 8),
    "base_model.model.x.lora_B.weight": torch.randn(8, 2),
    "base_model.model.x.lora_magnitude_vector": torch.ones(8),
    "base_model.model.x.lora_B.bias": torch.ones(8),
}
_KOHYA = {
    "lora_unet_q.lora_down.weight": torch.randn(3, 8),
    "lora_unet_q.lora_up.weight": torch.randn(6, 3),
    "lora_unet_q.alpha": torch.tensor(1.5),
}
_META = '{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"to_out.0": 2}}'
RECIPE_CASES = {
    "peft patterns rslora": (_QK, {"r": 4, "lora_alpha": 8, "rank_pattern": {"k": 2}, "use_rslora": True}, {}, True),
    "dora and lora bias": (_DORA, {"r": 2, "lora_alpha": 2, "use_dora": True, "lora_bias": True}, {}, True),
    "strict=False skips a key": (
        _QK | {"model.weird.tensor": torch.ones(2)},
        {"r": 4, "rank_pattern": {"k": 2}},
        {},
        False,
    ),
    "diffusers components": (
        {
            "unet.attn.to_q.lora_A.weight": torch.randn(4, 8),
            "unet.attn.to_q.lora_B.weight": torch.randn(8, 4),
            "unet.attn.to_out.0.lora_A.weight": torch.randn(2, 8),
            "unet.attn.to_out.0.lora_B.weight": torch.randn(8, 2),
        },
        None,
        {"lora_adapter_metadata": _META},
        True,
    ),
    "kohya alphas (values: no recipe)": (_KOHYA, None, {}, True),
}


def _contents(adapter: lorahot.Adapter) -> tuple:
    """Everything an adapter holds, tensors as their values."""

    def value(t: torch.Tensor | None) -> object:
        return None if t is None else (t.dtype, tuple(t.shape), t.tolist())

    modules = [
        (k, m.key, value(m.A), value(m.B), m.alpha, m.use_rslora, m.source_keys, value(m.magnitude), value(m.bias))
        for k, m in adapter.modules.items()
    ]
    return adapter.format, adapter.source, adapter.config, adapter.skipped, modules, adapter.weights


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_a_file_read_again_is_assembled_from_its_recipe_as_it_was_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """A read writes down the file's recipe and assembles the adapter from it; a second read
    assembles it again without working the file out: both are what the full read gives
    (modules, alphas, configs, skipped keys), and where the structure depends on the values
    (kohya's alpha tensors) every read works it out in full."""
    import lorahot.io.loader as loader

    tensors, config, metadata, strict = RECIPE_CASES[case]
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata=metadata or None)
    if config is not None:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with monkeypatch.context() as patch:
        patch.setattr(loader, "_recipe_key", lambda *args: None)  # no recipe: the full read
        full = _contents(lorahot.read_adapter(tmp_path, strict=strict))
    loader._RECIPES.clear()
    first = lorahot.read_adapter(tmp_path, strict=strict)
    calls: list[int] = []
    fully = loader._normalize_fully
    monkeypatch.setattr(loader, "_normalize_fully", lambda *args: calls.append(1) or fully(*args))
    second = lorahot.read_adapter(tmp_path, strict=strict)
    assert _contents(first) == full and _contents(second) == full
    assert calls == ([1] if case.startswith("kohya") else [])
    assert not any(m.A.data_ptr() == n.A.data_ptr() for m, n in zip(first.modules.values(), second.modules.values()))
    if case.startswith("strict"):
        assert second.skipped == ("model.weird.tensor",)


def test_a_recipe_holds_for_the_same_header_and_config_only(tmp_path: Path) -> None:
    """New values under the same header are read; a new config gives new alphas; a new rank
    (another header) gives new modules."""
    path = tmp_path / "adapter_model.safetensors"
    save_file(_peft(2), path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    assert lorahot.read_adapter(tmp_path).modules["proj"].scale == 2.0
    values = _peft(2)
    save_file(values, path)
    again = lorahot.read_adapter(tmp_path).modules["proj"]
    assert torch.equal(again.A, values["base_model.model.proj.lora_A.weight"]) and again.scale == 2.0
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 1}))
    assert lorahot.read_adapter(tmp_path).modules["proj"].scale == 0.5
    save_file(_peft(3), path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 3, "lora_alpha": 1}))
    assert lorahot.read_adapter(tmp_path).modules["proj"].rank == 3


def _dir(tmp_path: Path, tensors: dict[str, torch.Tensor], config: dict | None, header: dict | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    metadata = None if header is None else {"lora_adapter_metadata": json.dumps(header)}
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata=metadata)
    if config is not None:
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_config_without_lora_alpha_takes_peft_s_default_and_a_null_one_is_refused(tmp_path: Path) -> None:
    """PEFT's LoraConfig defaults lora_alpha to 8; alpha = rank holds only with no config."""
    assert lorahot.read_adapter(_dir(tmp_path, _peft(4), {"r": 4})).modules["proj"].scale == 2.0
    assert lorahot.read_adapter(_peft(4), config={"r": 4}).modules["proj"].scale == 2.0
    assert lorahot.read_adapter(_peft(4)).modules["proj"].scale == 1.0
    with pytest.raises(lorahot.AdapterReadError, match="lora_alpha is null"):
        lorahot.read_adapter(_dir(tmp_path / "null", _peft(4), {"r": 4, "lora_alpha": None}))
    with pytest.raises(lorahot.UsageError, match="lora_alpha is null"):
        lorahot.read_adapter(_peft(4), config={"r": 4, "lora_alpha": None})


class _Proj(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)


@pytest.mark.parametrize("pattern", [None, {"proj": 4}])
def test_a_null_r_is_refused_where_no_rank_pattern_gives_the_module_its_rank(
    pattern: dict | None, tmp_path: Path
) -> None:
    """PEFT builds a module of ``r: null`` with the rank its ``rank_pattern`` gives, and fails
    (``None <= 0``) without one; lorahot took the tensors' rank (scale alpha / 4) instead of
    refusing. With the pattern, both scale by lora_alpha / 4."""
    from peft import PeftModel

    config = {"peft_type": "LORA", "r": None, "lora_alpha": 8, "target_modules": ["proj"]}
    if pattern is not None:
        config["rank_pattern"] = pattern
    directory = _dir(tmp_path, _peft(4), config)
    if pattern is None:
        with pytest.raises(TypeError):
            PeftModel.from_pretrained(_Proj(), directory)
        for read in (lambda: lorahot.read_adapter(directory), lambda: lorahot.read_adapter(_peft(4), config=config)):
            with pytest.raises(lorahot.AdapterMismatchError, match=r"proj: .*says r=null and no rank_pattern key"):
                read()
        return
    peft_scale = PeftModel.from_pretrained(_Proj(), directory).base_model.model.proj.scaling["default"]
    assert lorahot.read_adapter(directory).modules["proj"].scale == peft_scale == 2.0
    assert lorahot.read_adapter(_peft(4), config=config).modules["proj"].scale == 2.0


def _oracle(source: str, directory: Path, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The scale and output of ``proj`` as PEFT (``adapter_config.json``) or diffusers
    (``lora_adapter_metadata``) load ``directory``'s adapter onto :class:`_Proj` in float64."""
    torch.manual_seed(0)
    if source == "adapter_config.json":
        from peft import PeftModel

        peft = PeftModel.from_pretrained(_Proj().double(), directory).base_model.model
        return peft.proj.scaling["default"], peft.proj(x)
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.loaders.peft import PeftAdapterMixin

    class Transformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
        def __init__(self) -> None:
            super().__init__()
            self.proj = _Proj().proj.double()

    model = Transformer()
    model.load_lora_adapter(str(directory), weight_name="adapter_model.safetensors", prefix="transformer")
    return model.proj.scaling["default_0"], model.proj(x)


@pytest.mark.parametrize("source", ["adapter_config.json", "lora_adapter_metadata"])
@pytest.mark.parametrize("rank", [8, 4])
@pytest.mark.parametrize(
    "fields_of",
    [
        lambda rank: {},
        lambda rank: {"lora_alpha": 16},
        lambda rank: {"lora_alpha": 16, "use_rslora": True},
        lambda rank: {"lora_alpha": 16, "alpha_pattern": {"proj": 4}, "rank_pattern": {"other": 2}},
        lambda rank: {"lora_alpha": 16, "rank_pattern": {"proj": rank}},
    ],
    ids=["bare", "alpha", "rslora", "other-patterns", "rank-pattern"],
)
def test_a_config_without_r_builds_each_module_at_peft_s_default_rank_as_peft_does(
    source: str, rank: int, fields_of: Callable[[int], dict], tmp_path: Path
) -> None:
    """PEFT and diffusers build a module that a config without ``r`` gives no rank_pattern key
    at LoraConfig's default r=8: a rank-8 module loads at lora_alpha / 8 (rsLoRA: / sqrt 8), any
    other rank fails to load (size mismatch). lorahot took the tensors' rank (scale lora_alpha / 4
    where PEFT raises); it now refuses such a module, naming it, its rank and PEFT's default,
    with the model bitwise unchanged, and matches PEFT's output in float64 where PEFT loads."""
    fields = fields_of(rank)
    config = {"peft_type": "LORA", "target_modules": ["proj"], **fields}
    torch.manual_seed(1)
    a, b = torch.randn(rank, 8, dtype=torch.float64), torch.randn(6, rank, dtype=torch.float64)
    if source == "adapter_config.json":
        directory = _dir(
            tmp_path, {"base_model.model.proj.lora_A.weight": a, "base_model.model.proj.lora_B.weight": b}, config
        )
    else:
        header = {f"transformer.{k}": v for k, v in config.items()}
        directory = _dir(
            tmp_path, {"transformer.proj.lora_A.weight": a, "transformer.proj.lora_B.weight": b}, None, header
        )
    torch.manual_seed(0)
    model = _Proj().double()
    runtime = lorahot.inject(model, ["proj"], max_rank=8)
    x = torch.randn(3, 8, dtype=torch.float64)
    if rank != 8 and "proj" not in fields.get("rank_pattern", {}):
        with pytest.raises(RuntimeError, match="size mismatch"):
            _oracle(source, directory, x)
        before = [(n, t.clone()) for n, t in [*model.named_parameters(), *model.named_buffers()]]
        with pytest.raises(
            lorahot.AdapterMismatchError,
            match=rf"adapter_model.safetensors: inconsistent adapter:\n  - (transformer\.)?proj: .*{source} .*states "
            r"no r and no rank_pattern key matches it, so PEFT builds its layer at its default r=8 and fails to load "
            r".*lora_A.weight of shape \(4, 8\) \(rank 4\) into it; set r to the adapter's rank \(4\), or give the "
            "module a rank_pattern key",
        ):
            runtime.load(directory)
        after = [*model.named_parameters(), *model.named_buffers()]
        assert len(after) == len(before)
        assert all(n == m and torch.equal(t, u) for (n, t), (m, u) in zip(before, after))
        return
    scale, want = _oracle(source, directory, x)
    name = "proj" if source == "adapter_config.json" else "transformer.proj"
    assert lorahot.read_adapter(directory).modules[name].scale == scale
    runtime.load(directory)
    torch.testing.assert_close(model.proj(x), want, rtol=1e-12, atol=1e-12)


def test_config_alone_without_r_leaves_the_rank_to_the_tensors_and_an_r_over_a_file_without_one_loads(
    tmp_path: Path,
) -> None:
    """``config=`` with no adapter config in the source is lorahot's own: the tensors give the
    rank. Over an adapter_config.json without ``r``, a ``config=`` stating it loads the adapter."""
    assert lorahot.read_adapter(_peft(4), config={"lora_alpha": 16}).modules["proj"].scale == 4.0
    directory = _dir(tmp_path, _peft(4), {"peft_type": "LORA", "lora_alpha": 16})
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"proj: adapter_config\.json with config= over it states no r"
    ):
        lorahot.read_adapter(directory, config={"use_rslora": False})
    assert lorahot.read_adapter(directory, config={"r": 4}).modules["proj"].scale == 4.0


_REWROTE = r"this initialization rewrote the base weights the adapter was trained over"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"init_lora_weights": "pissa_niter_4"}, rf'init_lora_weights="pissa_niter_4"; {_REWROTE}.*conversion='),
        ({"init_lora_weights": "olora"}, f'init_lora_weights="olora"; {_REWROTE}'),
        ({"init_lora_weights": "corda"}, f'init_lora_weights="corda"; {_REWROTE}'),
        ({"init_lora_weights": "loftq"}, f'init_lora_weights="loftq"; {_REWROTE}.*LoftQ.s quantized residual'),
        ({"init_lora_weights": "lora_ga"}, f'init_lora_weights="lora_ga"; {_REWROTE}'),
        ({"init_lora_weights": "astra"}, f'init_lora_weights="astra"; {_REWROTE}'),
        ({"init_lora_weights": "svd_init"}, r'init_lora_weights="svd_init"; an initialization lorahot does not know'),
        ({"kasa_config": {}}, None),
        ({"kasa_config": {"x": 1}}, "kasa_config=.*KaSA"),
    ],
)
def test_configs_whose_initialization_rewrote_the_base_are_refused(fields: dict, match: str | None) -> None:
    """LoRA-GA and ASTRA, like PiSSA, OLoRA and CorDA, subtract their initial B @ A from the base
    weights (PEFT's lora_ga_init, astra_init); an initialization lorahot does not know may too."""
    config = {"r": 2, "lora_alpha": 2, **fields}
    if match is None:  # an empty kasa_config is PEFT's "off"
        lorahot.read_adapter(_peft(), config=config)
        return
    with pytest.raises(lorahot.UnknownFormatError, match=match):
        lorahot.read_adapter(_peft(), config=config)
    if "init_lora_weights" in fields:  # onto the rewritten base saved with it, it is plain LoRA: config= says so
        assert lorahot.read_adapter(_peft(), config={**config, "init_lora_weights": True}).modules["proj"].scale == 1.0


@pytest.mark.parametrize("init", [True, False, None, "gaussian", "orthogonal", "eva", "mica", "nora"])
def test_initializations_that_leave_the_base_alone_load(init: object) -> None:
    adapter = lorahot.read_adapter(_peft(), config={"r": 2, "lora_alpha": 2, "init_lora_weights": init})
    assert adapter.modules["proj"].scale == 1.0


def test_use_dora_without_a_magnitude_vector_is_refused() -> None:
    with pytest.raises(lorahot.AdapterMismatchError, match=r"proj: config= says use_dora, but the file has no"):
        lorahot.read_adapter(_peft(), config={"r": 2, "lora_alpha": 2, "use_dora": True})


def test_a_magnitude_or_bias_needs_its_flag_where_there_is_a_config() -> None:
    """PEFT builds a module as its config says: without use_dora or lora_bias (false by
    default) it drops the file's magnitude or bias. Without a config the tensors decide."""
    dora = _peft() | {"base_model.model.proj.lora_magnitude_vector": torch.rand(6) + 1}
    biased = _peft() | {"base_model.model.proj.lora_B.bias": torch.randn(6)}
    assert lorahot.read_adapter(dora).modules["proj"].magnitude is not None
    assert lorahot.read_adapter(biased).modules["proj"].bias is not None
    for tensors, flag, what in ((dora, "use_dora", "DoRA magnitude"), (biased, "lora_bias", "LoRA bias")):
        with pytest.raises(lorahot.AdapterMismatchError, match=rf"proj: the file has its {what} .* not set {flag}"):
            lorahot.read_adapter(tensors, config={"r": 2})
        with pytest.raises(lorahot.AdapterMismatchError, match=rf"config= does not set {flag} to true, so PEFT"):
            lorahot.read_adapter(tensors, config={"r": 2, flag: False})
        assert lorahot.read_adapter(tensors, config={"r": 2, flag: True}).modules["proj"].rank == 2


@pytest.mark.parametrize("where", ["header", "file"])
def test_a_config_problem_names_where_the_config_came_from(tmp_path: Path, where: str) -> None:
    """A config in the safetensors header's metadata (no adapter_config.json) was blamed on
    adapter_config.json, whose fix pointed at a file that does not exist (an independent audit);
    one in adapter_config.json still names that file."""
    header, file = ({"r": "x"}, None) if where == "header" else (None, {"r": "x"})
    path = _dir(tmp_path, _peft(), file, header)
    name = "the lora_adapter_metadata in the safetensors header" if where == "header" else "adapter_config.json"
    with pytest.raises(lorahot.AdapterReadError, match=rf"{name}.*invalid adapter config: r must be an integer"):
        lorahot.read_adapter(path)
    header, file = (
        ({"r": 2, "lora_alpha": 2, "use_dora": True}, None)
        if where == "header"
        else (None, {"r": 2, "lora_alpha": 2, "use_dora": True})
    )
    path = _dir(tmp_path / "dora", _peft(), file, header)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"proj: {name} says use_dora, but the file has no"):
        lorahot.read_adapter(path)


def test_the_file_config_and_the_header_config_agree_or_the_adapter_is_refused(tmp_path: Path) -> None:
    config = {"r": 2, "lora_alpha": 16}
    with pytest.raises(lorahot.AdapterMismatchError, match=r"disagree: lora_alpha 16 against 4\. PEFT reads the first"):
        lorahot.read_adapter(_dir(tmp_path / "a", _peft(), config, {"r": 2, "lora_alpha": 4}))
    agreed = lorahot.read_adapter(_dir(tmp_path / "b", _peft(), config, {"lora_alpha": 16, "use_rslora": False}))
    assert agreed.modules["proj"].scale == 8.0


def test_a_component_header_config_agrees_with_the_file_config_or_the_adapter_is_refused(tmp_path: Path) -> None:
    """diffusers writes its metadata per component (``unet.lora_alpha``): a file config beside it
    that says otherwise was ignored for that component's modules, a silently other scale."""
    tensors = {"unet.proj.lora_A.weight": torch.randn(2, 8), "unet.proj.lora_B.weight": torch.randn(6, 2)}
    config = {"r": 2, "lora_alpha": 8}
    with pytest.raises(lorahot.AdapterMismatchError, match=r"disagree: lora_alpha 8 against unet\.lora_alpha 16"):
        lorahot.read_adapter(_dir(tmp_path / "a", tensors, config, {"unet.r": 2, "unet.lora_alpha": 16}))
    agreed = lorahot.read_adapter(_dir(tmp_path / "b", tensors, config, {"unet.r": 2, "unet.lora_alpha": 8}))
    assert agreed.modules["unet.proj"].scale == 4.0


def test_alpha_tensors_and_a_stated_alpha_agree_or_the_adapter_is_refused(tmp_path: Path) -> None:
    tensors = {
        "unet.proj.lora_A.weight": torch.randn(2, 8),
        "unet.proj.lora_B.weight": torch.randn(6, 2),
        "unet.proj.alpha": torch.tensor(8.0),
    }
    with pytest.raises(lorahot.AdapterMismatchError, match=r"its unet\.proj\.alpha is 8, but lora_adapter_metadata"):
        lorahot.read_adapter(_dir(tmp_path / "a", tensors, None, {"unet.r": 2, "unet.lora_alpha": 2}))
    agreed = lorahot.read_adapter(_dir(tmp_path / "b", tensors, None, {"unet.r": 2, "unet.lora_alpha": 8}))
    assert agreed.modules["unet.proj"].scale == 4.0


def test_a_peft_config_beside_kohya_weights_is_refused_unless_passed_on_purpose(tmp_path: Path) -> None:
    kohya = {"lora_unet_proj.lora_down.weight": torch.randn(2, 8), "lora_unet_proj.lora_up.weight": torch.randn(6, 2)}
    with pytest.raises(lorahot.AdapterMismatchError, match=r"kohya naming, whose loaders ignore the adapter_config"):
        lorahot.read_adapter(_dir(tmp_path, kohya, {"r": 2, "lora_alpha": 16}))
    assert lorahot.read_adapter(kohya, config={"lora_alpha": 16}).modules["lora_unet_proj"].scale == 8.0
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["proj"]}))
    assert lorahot.read_adapter(tmp_path).modules["lora_unet_proj"].scale == 1.0


@pytest.mark.parametrize("odd", ["\ud800", "\x00", "\x1b[31m"])
def test_error_messages_print_whatever_the_keys_hold(odd: str) -> None:
    """A key with a lone surrogate or control characters: the error names it escaped, so that
    printing it or writing it to a UTF-8 log does not raise in the caller's except block."""
    runtime = lorahot.inject(torch.nn.Sequential(torch.nn.Linear(8, 6)), ["0"], max_rank=4)
    tensors = {
        f"base_model.model.x{odd}.lora_A.weight": torch.randn(2, 8),
        f"base_model.model.x{odd}.lora_B.weight": torch.randn(6, 2),
    }
    with pytest.raises(lorahot.LoraError) as info:
        runtime.load(tensors)
    text = str(info.value)
    text.encode("utf-8")
    assert odd.encode("unicode_escape").decode("ascii") in text
    assert str(lorahot.AdapterMismatchError(lines("two", "lines"))) == "two\nlines"  # lines lorahot built
    assert (
        str(lorahot.AdapterMismatchError("two\nlines")) == "two\\nlines" and str(lorahot.UsageError("a\tb")) == "a\\tb"
    )


@pytest.mark.parametrize(
    ("tensors", "error", "message"),
    [
        (
            {
                "base_model.model.q.lora_A.weight": torch.tensor(1.0),
                "base_model.model.q.lora_B.weight": torch.ones(4, 2),
            },
            lorahot.AdapterMismatchError,
            r"q: base_model\.model\.q\.lora_A\.weight has shape \(\), but a LoRA A and B have at least two dimensions",
        ),
        (
            {"base_model.model.q.lora_A.weight": torch.ones(2, 4), "base_model.model.q.lora_B.weight": torch.ones(4)},
            lorahot.AdapterMismatchError,
            r"q: base_model\.model\.q\.lora_B\.weight has shape \(4,\), but a LoRA A and B have at least two",
        ),
        (
            {
                "lora_unet_q.hada_w1_a": torch.ones(4, 2),
                "lora_unet_q.hada_w1_b": torch.tensor(1.0),
                "lora_unet_q.hada_w2_a": torch.ones(4, 2),
                "lora_unet_q.hada_w2_b": torch.ones(2, 4),
            },
            lorahot.UnknownFormatError,
            r"lora_unet_q \(lora_unet_q\.hada_w1_b\): shape \(\), where this loha factor is a matrix",
        ),
    ],
    ids=["scalar-a", "vector-b", "scalar-loha-factor"],
)
def test_a_factor_with_too_few_dimensions_is_refused_at_read(
    tmp_path: Path, tensors: dict[str, torch.Tensor], error: type[Exception], message: str
) -> None:
    """A 0-d or 1-d LoRA factor in a file was read, and every later use of the module's rank
    (plan_targets, the CLI's inspect) crashed with an IndexError: the read refuses it, naming
    the key and its shape."""
    path = tmp_path / "adapter.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(error, match=message):
        lorahot.read_adapter(path)
    with pytest.raises(error, match=message):
        lorahot.plan_targets([path])


def _header_alpha_file(kind: str) -> dict[str, torch.Tensor]:
    """A module of ``kind`` on a [16, 16] layer ``lora_unet_0``, without its ``.alpha``."""
    g = torch.Generator().manual_seed(0)
    factors = {
        "lora": {"lora_down.weight": (2, 16), "lora_up.weight": (16, 2)},
        "loha": {"hada_w1_a": (16, 2), "hada_w1_b": (2, 16), "hada_w2_a": (16, 2), "hada_w2_b": (2, 16)},
        "oft": {"oft_blocks": (4, 4, 4)},
        "glora": {"a1.weight": (16, 2), "a2.weight": (2, 16), "b1.weight": (16, 2), "b2.weight": (2, 16)},
    }[kind]
    return {f"lora_unet_0.{k}": torch.randn(shape, generator=g) for k, shape in factors.items()}


@pytest.mark.parametrize("kind", ["lora", "loha", "oft", "glora"])
@pytest.mark.parametrize(
    ("alpha", "got"),
    [(torch.ones(3), r"got shape \(3,\)"), (torch.tensor(1 + 0j), r"got dtype torch\.complex64")],
    ids=["three-values", "complex"],
)
def test_an_alpha_the_header_refuses_is_refused_by_plan_targets_as_by_load(
    tmp_path: Path, kind: str, alpha: torch.Tensor, got: str
) -> None:
    """A ``.alpha`` of shape (3,) or of a complex dtype: the header alone refuses it, but
    plan_targets' header read skipped the alpha check and planned the file that every load then
    refused. The plan now checks an alpha's shape and dtype with the load's own check (its value
    stays a load-time check)."""
    path = tmp_path / "adapter.safetensors"
    save_file(_header_alpha_file(kind) | {"lora_unet_0.alpha": alpha}, str(path))
    message = r"lora_unet_0\.alpha: .*must be one finite number (>=? 0|other than 0), " + got
    with pytest.raises(lorahot.AdapterReadError, match=message):
        lorahot.plan_targets(path, nn.Sequential(nn.Linear(16, 16)))
    runtime = lorahot.inject(nn.Sequential(nn.Linear(16, 16)), ["0"], max_rank=4, merged=kind != "lora")
    with pytest.raises(lorahot.AdapterReadError, match=message):
        runtime.load(path)


def test_component_header_configs_over_bare_modules_are_refused_unless_settled(tmp_path: Path) -> None:
    """Header configs keyed by component over modules in the model's bare names were dropped (alpha =
    rank): several components' configs name no one component to pick, and LyCORIS factors take none;
    an adapter_config.json stating the same fields settles them (PEFT reads it)."""
    bare = {"proj.lora_A.weight": torch.randn(2, 8), "proj.lora_B.weight": torch.randn(6, 2)}
    both = {"unet.r": 2, "unet.lora_alpha": 8, "text_encoder.r": 2, "text_encoder.lora_alpha": 4}
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"for the components unet \(r=2, lora_alpha=8\); text_encoder \(r=2, lora_alpha=4\), but 1 of its "
        r"modules carry no component prefix \(e\.g\. proj\)[\s\S]*fields of the component this model is",
    ):
        lorahot.read_adapter(_dir(tmp_path / "a", bare, None, both))
    lokr = {"proj.lokr_w1": torch.randn(2, 2), "proj.lokr_w2": torch.randn(3, 4)}
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"component transformer \(lora_alpha=64\)[\s\S]*drop those fields"
    ):
        lorahot.read_adapter(_dir(tmp_path / "b", lokr, None, {"transformer.lora_alpha": 64}))
    settled = _dir(tmp_path / "c", bare, {"r": 2, "lora_alpha": 8}, {"transformer.r": 2, "transformer.lora_alpha": 8})
    assert lorahot.read_adapter(settled).modules["proj"].scale == 4.0


_HAND_BUILT_WEIGHTS = [
    ("unknown-kind", "bogus", {"x": torch.ones(2)}, None, r"WeightModule\.kind is 'bogus', not one of loha, lokr"),
    ("loha-missing-factors", "loha", {"hada_w1_a": torch.ones(6, 2)}, None, r"kind loha that lacks hada_w1_b, hada"),
    ("oft-without-blocks", "oft", {}, None, r"kind oft that lacks oft_blocks"),
    ("ia3-without-flag", "ia3", {"weight": torch.ones(6)}, None, r"kind ia3 that lacks on_input"),
    ("glora-missing", "glora", {"a1": torch.ones(8, 2)}, None, r"kind glora that lacks a2, b1, b2"),
    ("kohya-oft-without-alpha", "kohya-oft", {"oft_blocks": torch.zeros(2, 3, 3)}, None, r"lacks an alpha"),
    ("extra-factor", "oft", {"oft_blocks": torch.zeros(2, 3, 3), "hada_w1_a": torch.ones(6, 2)}, None,
     r"kind oft that has factors its kind has not: hada_w1_a"),
    ("nan-constraint", "oft", {"oft_blocks": torch.zeros(2, 3, 3)}, float("nan"), r"alpha is nan; it must be finite"),
    ("zero-alpha", "loha", {f"hada_w{i}_{s}": torch.ones(6 if s == "a" else 2, 2 if s == "a" else 8)
                            for i in (1, 2) for s in "ab"}, 0.0, r"alpha is 0; it must be finite and other than 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "factors", "alpha", "match"), [c[1:] for c in _HAND_BUILT_WEIGHTS], ids=[c[0] for c in _HAND_BUILT_WEIGHTS]
)
def test_a_hand_built_weight_module_of_no_buildable_kind_is_refused(
    kind: str, factors: dict[str, torch.Tensor], alpha: float | None, match: str
) -> None:
    """A hand-built ``WeightModule`` (an ``Adapter`` passed to ``load``) whose kind is unknown,
    lacks a factor its kind needs, holds another kind's, or has an alpha no reader makes, is a
    UsageError naming the module, before anything is written; merged mode built its ΔW and
    failed on the missing factor (an UnexpectedError KeyError) or folded a NaN constraint."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 6))
    w0 = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    module = WeightModule("0", kind, factors, alpha)
    adapter = lorahot.Adapter({}, "kohya", "<built>", weights={"0": module})
    with pytest.raises(lorahot.UsageError, match=rf"^<built>: not a usable lorahot\.Adapter:\n  - '0': [^\n]*{match}"):
        runtime.load(adapter)
    assert torch.equal(model[0].weight, w0) and runtime.info() is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("alpha", "rank"), [(1.0, 3), (1.0, 120)], ids=["alpha-over-r-1/3", "alpha-over-r-1/120"])
@pytest.mark.parametrize("mode", ["extras", "merged"])
def test_a_half_precision_diff_b_beside_a_lora_is_added_as_saved(
    dtype: torch.dtype, alpha: float, rank: int, mode: str
) -> None:
    """ComfyUI adds a LoRA's ``.diff_b`` to the bias as saved, unscaled by alpha / r; the runtime
    applies a LoRA bias at alpha / r, so the loader divides it by that. Divided in the file's
    half precision, a bias of 1/3 came back off by up to 0.3% of itself (bfloat16), and a float16
    value of 600 at 1/120 overflowed to inf (refused as a corrupt file)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    b0 = model[0].bias.detach().double().clone()
    g = torch.Generator().manual_seed(1)
    diff_b = (0.05 * torch.randn(24, generator=g)).to(dtype)
    diff_b[0] = 600.0
    tensors = {
        "diffusion_model.0.lora_down.weight": torch.zeros(rank, 16, dtype=dtype),
        "diffusion_model.0.lora_up.weight": torch.zeros(24, rank, dtype=dtype),
        "diffusion_model.0.alpha": torch.tensor(alpha),
        "diffusion_model.0.diff_b": diff_b,
    }
    runtime = lorahot.inject(model, ["0"], max_rank=128, **{mode: True})
    runtime.load(tensors)
    with torch.no_grad():
        bias = model(torch.zeros(1, 16))[0].double()
    torch.testing.assert_close(bias, b0 + diff_b.double(), rtol=2e-7, atol=1e-7)  # float32 rounding
