"""One runtime over several models: inject a dict of components or a pipeline-like object,
route each module of a file to its component by prefix (tiny purpose-built components)."""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lorahot
from lorahot import AdapterMismatchError, UsageError
from lorahot.resolve.components import route


def _encoder() -> nn.Module:
    return nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"q_proj": nn.Linear(8, 8)}) for _ in range(2)])})


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "unet": nn.ModuleDict({"to_q": nn.Linear(8, 8), "conv": nn.Linear(8, 8)}),
        "text_encoder": _encoder(),
        "text_encoder_2": _encoder(),
    }


def _run(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    out = {}
    with torch.no_grad():
        for c, m in models.items():
            if c == "unet":
                out[c] = m["conv"](m["to_q"](x))
            else:
                out[c] = m["layers"][1]["q_proj"](m["layers"][0]["q_proj"](x))
    return out


def _lora(keys: list[str], seed: int = 1, rank: int = 2, kohya: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k in keys:
        down, up = ("lora_down", "lora_up") if kohya else ("lora_A", "lora_B")
        out[f"{k}.{down}.weight"] = torch.randn(rank, 8, generator=g)
        out[f"{k}.{up}.weight"] = torch.randn(8, rank, generator=g)
    return out


FULL = ["unet.to_q", "text_encoder.layers.0.q_proj", "text_encoder_2.layers.1.q_proj"]
TARGETS = {"unet": ["to_q"], "text_encoder": ["q_proj"], "text_encoder_2": ["q_proj"]}


def test_dict_of_models_one_runtime_named_by_component() -> None:
    models = _models()
    runtime = lorahot.inject(models, TARGETS, max_rank=4)
    assert list(runtime.layers) == [
        "unet.to_q",
        "text_encoder.layers.0.q_proj",
        "text_encoder.layers.1.q_proj",
        "text_encoder_2.layers.0.q_proj",
        "text_encoder_2.layers.1.q_proj",
    ]
    assert isinstance(models["unet"]["to_q"], lorahot.LoRALinear)  # the user's module, wrapped in place
    info = runtime.load(_lora(FULL))
    assert info.components == {"unet": 1, "text_encoder": 1, "text_encoder_2": 1}
    assert set(info.ranks) == set(FULL)


def test_text_encoder_prefix_never_takes_text_encoder_2() -> None:
    models = _models()
    base = _run(models)
    runtime = lorahot.inject(models, "q_proj|.*\\.q_proj|to_q", max_rank=4)
    info = runtime.load(_lora(["text_encoder.layers.0.q_proj"]))
    assert info.components == {"unet": 0, "text_encoder": 1, "text_encoder_2": 0}
    out = _run(models)
    assert not torch.equal(out["text_encoder"], base["text_encoder"])
    assert torch.equal(out["text_encoder_2"], base["text_encoder_2"])
    assert torch.equal(out["unet"], base["unet"])


@pytest.mark.parametrize(
    ("key", "component"),
    [
        ("lora_te_layers_0_q_proj", "text_encoder"),
        ("lora_te1_layers_0_q_proj", "text_encoder"),
        ("lora_te2_layers_0_q_proj", "text_encoder_2"),
        ("lora_unet_to_q", "unet"),
    ],
)
def test_kohya_prefixes_route_to_their_component(key: str, component: str) -> None:
    runtime = lorahot.inject(_models(), TARGETS, max_rank=4)
    info = runtime.load(_lora([key], kohya=True))
    assert info.components[component] == 1
    assert sum(info.components.values()) == 1


def test_flux_prefixes_route_to_the_transformer() -> None:
    assert route("lora_unet_double_blocks_0_img_attn_qkv", ("transformer", "text_encoder")) == (
        "transformer",
        "lora_unet_",
    )
    assert route("diffusion_model.double_blocks.0.img_attn.qkv", ("transformer",)) == (
        "transformer",
        "diffusion_model.",
    )
    assert route("lora_unet_x", ("unet", "transformer")) == ("unet", "lora_unet_")
    assert route("down_blocks.0.to_q", ("unet",)) == ("unet", "")  # no prefix: the denoiser, as diffusers
    models = {"transformer": nn.ModuleDict({"to_q": nn.Linear(8, 8)})}
    runtime = lorahot.inject(models, ["to_q"], max_rank=4)
    assert runtime.load(_lora(["lora_unet_to_q"], kohya=True)).components == {"transformer": 1}


def test_pixart_unet_base_model_model_goes_to_the_denoiser_whatever_it_is_called() -> None:
    """PixArt's old PEFT reference script saves the transformer's modules under
    ``unet.base_model.model.`` (ComfyUI maps them onto PixArt's transformer); a pipeline runtime
    of a transformer refused them as modules of a ``unet`` it lacks. They go to the denoiser:
    ``transformer`` there, ``unet`` where there is one; float64 ``W + B @ A``."""
    assert route("unet.base_model.model.blocks.0.to_q", ("transformer", "text_encoder")) == (
        "transformer",
        "unet.base_model.model.",
    )
    assert route("unet.base_model.model.to_q", ("unet",)) == ("unet", "unet.base_model.model.")
    assert route("unet.to_q", ("transformer",)) == (None, "unet.")  # a unet's own prefix still names it
    torch.manual_seed(0)
    models = {"transformer": nn.ModuleDict({"to_q": nn.Linear(8, 8)}).double(), "text_encoder": _encoder().double()}
    before = models["transformer"]["to_q"].weight.detach().clone()
    sd = {k: v.double() for k, v in _lora(["unet.base_model.model.to_q"]).items()}
    info = lorahot.inject(models, {"transformer": ["to_q"], "text_encoder": ["q_proj"]}, max_rank=4).load(sd)
    assert info.components == {"transformer": 1, "text_encoder": 0}
    x = torch.randn(3, 8, dtype=torch.float64)
    update = sd["unet.base_model.model.to_q.lora_B.weight"] @ sd["unet.base_model.model.to_q.lora_A.weight"]
    with torch.no_grad():
        expected = x @ (before + update).T + models["transformer"]["to_q"].base_layer.bias
        torch.testing.assert_close(models["transformer"]["to_q"](x), expected, rtol=1e-12, atol=1e-12)


class _Pipe:
    """Duck-typed like a diffusers pipeline: a ``components`` dict of anything."""

    def __init__(self, models: dict[str, nn.Module]) -> None:
        self.components = {**models, "vae": nn.Conv2d(1, 1, 1), "tokenizer": object(), "scheduler": None}


def test_pipeline_like_object_takes_its_matched_module_components() -> None:
    models = _models()
    runtime = lorahot.inject(_Pipe(models), ["q_proj", "to_q"], max_rank=4)
    assert runtime.components == ("unet", "text_encoder", "text_encoder_2")  # no vae: nothing matched there
    assert runtime.load(_lora(FULL)).components == {"unet": 1, "text_encoder": 1, "text_encoder_2": 1}
    lorahot.eject(_Pipe(models))
    assert type(models["unet"]["to_q"]) is nn.Linear


def test_a_component_the_file_does_not_touch_returns_to_base_bitwise() -> None:
    models = _models()
    base = _run(models)
    runtime = lorahot.inject(models, TARGETS, max_rank=4)
    runtime.load(_lora(FULL))
    runtime.load(_lora(["unet.to_q"], seed=2))
    out = _run(models)
    assert not torch.equal(out["unet"], base["unet"])
    for c in ("text_encoder", "text_encoder_2"):
        assert torch.equal(out[c], base[c])


def test_failed_load_changes_no_component() -> None:
    models = _models()
    runtime = lorahot.inject(models, TARGETS, max_rank=4)
    runtime.load(_lora(FULL))
    before = _run(models)
    bad = _lora(["unet.to_q", "text_encoder.layers.0.q_proj"], seed=3)
    bad["text_encoder_2.layers.0.q_proj.lora_A.weight"] = torch.randn(2, 5)  # wrong in_features
    bad["text_encoder_2.layers.0.q_proj.lora_B.weight"] = torch.randn(8, 2)
    with pytest.raises(AdapterMismatchError, match=r"text_encoder_2\.layers\.0\.q_proj"):
        runtime.load(bad)
    after = _run(models)
    assert all(torch.equal(before[c], after[c]) for c in before)


def test_a_stack_routes_each_part_to_its_components() -> None:
    """A unet + text-encoder file stacked with a unet-only file: the unet's to_q adds both
    parts (each at its weight), the text encoders only the first; a part for a component
    that is not injected is refused with nothing changed, or skipped with strict=False."""
    models = _models()
    base = _run(models)
    runtime = lorahot.inject(
        {"unet": models["unet"], "text_encoder": models["text_encoder"]}, ["to_q", "q_proj"], max_rank=4
    )
    full, unet_only = _lora(FULL[:2], seed=1), _lora(["unet.to_q"], seed=2)
    info = runtime.load([full, unet_only], scale=[0.5, 2.0])
    assert info.components == {"unet": 1, "text_encoder": 1}
    assert [p.components for p in info.parts] == [{"unet": 1, "text_encoder": 1}, {"unet": 1, "text_encoder": 0}]
    assert info.ranks == {"unet.to_q": 4, "text_encoder.layers.0.q_proj": 2}

    def delta(source: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        return source[f"{key}.lora_B.weight"] @ source[f"{key}.lora_A.weight"]  # alpha = rank: scale 1

    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    to_q, conv = models["unet"]["to_q"].base_layer, models["unet"]["conv"]
    w = to_q.weight + 0.5 * delta(full, "unet.to_q") + 2.0 * delta(unet_only, "unet.to_q")
    te = models["text_encoder"]["layers"]
    w_te = te[0]["q_proj"].base_layer.weight + 0.5 * delta(full, "text_encoder.layers.0.q_proj")
    out = _run(models)
    with torch.no_grad():
        torch.testing.assert_close(out["unet"], conv(x @ w.T + to_q.bias))
        h = x @ w_te.T + te[0]["q_proj"].base_layer.bias
        torch.testing.assert_close(out["text_encoder"], te[1]["q_proj"](h))
    assert torch.equal(out["text_encoder_2"], base["text_encoder_2"])  # never injected
    with pytest.raises(AdapterMismatchError, match=r"text_encoder_2, which was not injected"):
        runtime.load([unet_only, _lora(FULL)])
    after = _run(models)
    assert all(torch.equal(out[c], after[c]) for c in out)
    info = runtime.load([unet_only, _lora(FULL)], strict=False)
    assert info.parts[1].skipped == info.skipped and all(k.startswith("text_encoder_2.") for k in info.skipped)


def test_prefix_for_a_component_not_injected() -> None:
    models = _models()
    runtime = lorahot.inject(
        {"unet": models["unet"], "text_encoder": models["text_encoder"]}, ["to_q", "q_proj"], max_rank=4
    )
    source = _lora(FULL)
    with pytest.raises(
        AdapterMismatchError,
        match=r"prefix 'text_encoder_2\.' \(e\.g\. text_encoder_2\.layers\.1\.q_proj\) go to text_encoder_2, which "
        r"was not injected(.|\n)*Inject the missing component too(.|\n)*strict=False",
    ):
        runtime.load(source)
    info = runtime.load(source, strict=False)
    assert info.components == {"unet": 1, "text_encoder": 1}
    assert set(info.skipped) == {k for k in source if k.startswith("text_encoder_2.")}


@pytest.mark.parametrize("component", ["vae", "image_encoder", "text_encoder_4", "audio_vae"])
def test_a_file_prefix_naming_a_pipeline_component_never_goes_to_the_denoiser(component: str) -> None:
    """``vae.to_q`` (a component no naming strips) on a runtime of a unet and text encoders
    went to the denoiser, whose lookup dropped the unnumbered ``vae`` as a wrapper level: it
    loaded into the unet's ``to_q``, silently. Now it is refused naming the component, nothing
    changed; strict=False skips it; a runtime holding that component takes it there."""
    models = _models()
    runtime = lorahot.inject(models, TARGETS, max_rank=4)
    base = _run(models)
    sd = _lora([f"{component}.to_q", "text_encoder.layers.0.q_proj"])
    with pytest.raises(
        AdapterMismatchError,
        match=rf"prefix '{component}\.' \(e\.g\. {component}\.to_q\) go to {component}, which was not injected"
        rf"(.|\n)*lorahot\.inject\(\{{\.\.\., '{component}': pipe\.{component}\}}",
    ):
        runtime.load(sd)
    assert all(torch.equal(out, base[c]) for c, out in _run(models).items())
    info = runtime.load(sd, strict=False)
    assert info.components == {"unet": 0, "text_encoder": 1, "text_encoder_2": 0}
    assert set(info.skipped) == {k for k in sd if k.startswith(component + ".")}
    assert torch.equal(_run(models)["unet"], base["unet"])
    held = {"unet": _models()["unet"], component: nn.ModuleDict({"to_q": nn.Linear(8, 8)})}
    info = lorahot.inject(held, ["to_q"], max_rank=4).load(_lora([f"{component}.to_q"]))
    assert info.components == {"unet": 0, component: 1}


def _twins() -> dict[str, nn.Module]:
    """A denoiser and a second component with the same module paths (a ControlNet's down blocks
    are the UNet's; Wan 2.2's transformer_2 is its transformer's twin), float64."""
    torch.manual_seed(0)
    block = lambda: nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_v": nn.Linear(8, 8)}).double()  # noqa: E731
    return {"unet": block(), "controlnet": block(), "transformer_2": block()}


def _twin_outputs(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        return {c: m["to_v"](m["to_q"](x)) for c, m in models.items()}


@pytest.mark.parametrize("component", ["controlnet", "transformer_2"])
def test_a_prefix_naming_a_component_of_the_runtime_goes_to_it(component: str) -> None:
    """A module whose prefix is one of the runtime's component names loads into that component,
    never into the denoiser whose paths it shares; diffusers' controlnet./prior. name no
    denoiser either: without that component they are refused, nothing changed."""
    models = _twins()
    base = _twin_outputs(models)
    sd = {k: v.double() for k, v in _lora([f"{component}.to_q", f"{component}.to_v"], seed=4).items()}
    runtime = lorahot.inject(models, ["to_q", "to_v"], max_rank=4)
    info = runtime.load(sd)
    assert info.components == {"unet": 0, "controlnet": 0, "transformer_2": 0, component: 2}
    out = _twin_outputs(models)
    reference = {c: copy.deepcopy(m) for c, m in _twins().items()}
    with torch.no_grad():
        for name in ("to_q", "to_v"):
            a, b = sd[f"{component}.{name}.lora_A.weight"], sd[f"{component}.{name}.lora_B.weight"]
            reference[component][name].weight += b @ a
    expected = _twin_outputs(reference)
    for c in models:
        assert torch.allclose(out[c], expected[c], rtol=0, atol=1e-12), c
    assert torch.equal(out["unet"], base["unet"])

    assert route("controlnet.down_blocks.0.to_q", ("unet",)) == (None, "controlnet.")
    assert route("prior.down_blocks.0.to_q", ("unet",)) == (None, "prior.")
    assert route("model.diffusion_model.x", ("unet", "model")) == ("unet", "model.diffusion_model.")  # longer prefix
    unet = _twins()["unet"]
    unet_only = lorahot.inject({"unet": unet}, ["to_q", "to_v"], max_rank=4)
    unet_only.load({k: v.double() for k, v in _lora(["unet.to_q"], seed=6).items()})
    before = _twin_outputs({"unet": unet})
    cn = {k: v.double() for k, v in _lora(["controlnet.to_q"], seed=4).items()}
    with pytest.raises(
        AdapterMismatchError,
        match=r"prefix 'controlnet\.'(.|\n)*go to controlnet, which was not injected(.|\n)*"
        r"lorahot\.inject\(\{\.\.\., 'controlnet': pipe\.controlnet\}",
    ):
        unet_only.load(cn)
    assert torch.equal(_twin_outputs({"unet": unet})["unet"], before["unet"])


def test_the_fix_for_a_missing_component_names_that_component() -> None:
    runtime = lorahot.inject({"text_encoder": _encoder()}, ["q_proj"], max_rank=4)
    with pytest.raises(AdapterMismatchError, match=r"lorahot\.inject\(\{\.\.\., 'unet': pipe\.unet\}, \.\.\.\)"):
        runtime.load(_lora(["unet.to_q"]))
    with pytest.raises(AdapterMismatchError, match=r"\{\.\.\., 'unet': pipe\.unet\} or \{\.\.\., 'transformer': "):
        runtime.load(_lora(["to_q"]))


def test_key_matching_no_layer_of_its_component_names_the_component() -> None:
    runtime = lorahot.inject(_models(), TARGETS, max_rank=4)
    with pytest.raises(
        AdapterMismatchError, match=r"\[text_encoder\] (.|\n)*text_encoder\.layers\.7\.q_proj: matches no"
    ):
        runtime.load(_lora(["text_encoder.layers.7.q_proj"]))


def test_targets_dict_naming_an_unknown_component() -> None:
    with pytest.raises(UsageError, match=r"targets names component 'vae'; the components are unet, text_encoder"):
        lorahot.inject(_models(), {"vae": ["to_q"]}, max_rank=4)
    with pytest.raises(UsageError, match=r"targets is empty and names no component; the components are unet, text_"):
        lorahot.inject(_models(), {}, max_rank=4)  # read 'targets names component nothing'


def test_named_component_without_a_match() -> None:
    models = _models()
    with pytest.raises(UsageError, match=r"component 'unet': targets=\['q_proj'\] matched no module.*its own targets"):
        lorahot.inject(models, ["q_proj"], max_rank=4)
    assert all(type(m) is nn.Linear for c in models.values() for m in c.modules() if isinstance(m, nn.Linear))
    with pytest.raises(UsageError, match=r"component 'text_encoder': targets=\['nope'\] matched no module"):
        lorahot.inject(models, {"unet": ["to_q"], "text_encoder": ["nope"]}, max_rank=4)


def test_targets_dict_injects_only_its_components() -> None:
    models = _models()
    runtime = lorahot.inject(models, {"text_encoder_2": ["q_proj"]}, max_rank=4)
    assert runtime.components == ("text_encoder_2",)
    assert type(models["unet"]["to_q"]) is nn.Linear


def test_bad_component_dicts() -> None:
    with pytest.raises(UsageError, match=r"must map non-empty names to torch\.nn\.Modules"):
        lorahot.inject({"unet": "not a module"}, ["to_q"], max_rank=4)
    with pytest.raises(UsageError, match=r"^model must be a torch\.nn\.Module, got str\.$"):
        lorahot.inject("model", ["to_q"], max_rank=4)


def test_eject_restores_every_component() -> None:
    models = _models()
    base = _run(models)
    runtime = lorahot.inject(models, TARGETS, max_rank=4)
    runtime.load(_lora(FULL))
    runtime.eject()
    assert all(type(m) is nn.Linear for c in models.values() for m in c.modules() if isinstance(m, nn.Linear))
    out = _run(models)
    assert all(torch.equal(base[c], out[c]) for c in base)
    with pytest.raises(UsageError, match="ejected"):
        runtime.load(_lora(FULL))


def test_module_dict_is_still_one_model() -> None:
    model = nn.ModuleDict(_models())
    runtime = lorahot.inject(model, ["to_q"], max_rank=4)
    assert runtime.components == ()
    assert runtime.load(_lora(["to_q"])).components == {}


def test_prefix_option_is_refused_on_a_component_runtime() -> None:
    runtime = lorahot.inject(_models(), TARGETS, max_rank=4)
    with pytest.raises(UsageError, match=r"prefix='text_encoder': this runtime serves components unet, text_encoder"):
        runtime.load(_lora(FULL), prefix="text_encoder")


def test_preload_routes_like_load() -> None:
    models = _models()
    runtime = lorahot.inject(models, TARGETS, max_rank=4)
    runtime.load(_lora(FULL))
    want = _run(models)
    runtime.unload()
    prepared = runtime.preload(_lora(FULL))
    assert runtime.load(prepared).components == {"unet": 1, "text_encoder": 1, "text_encoder_2": 1}
    got = _run(models)
    assert all(torch.equal(want[c], got[c]) for c in want)


@pytest.mark.parametrize("merged", [False, True])
def test_slots_and_merged_mode_span_every_component(merged: bool) -> None:
    models = _models()
    base = _run(models)
    runtime = lorahot.inject(models, TARGETS, max_rank=4, slots=2, merged=merged)
    runtime.load(_lora(FULL), slot=0)
    runtime.load(_lora(["unet.to_q"], seed=2), slot=1)
    full = _run(models)
    runtime.activate(1)
    unet_only = _run(models)
    assert not torch.equal(unet_only["unet"], full["unet"])
    assert all(torch.equal(unet_only[c], base[c]) for c in ("text_encoder", "text_encoder_2"))
    runtime.activate(0)
    assert all(torch.equal(full[c], out) for c, out in _run(models).items())
    runtime.eject()
    assert all(torch.equal(base[c], out) for c, out in _run(models).items())


class _AttributePipe:
    """Like a diffusers pipeline: each component an attribute, ``components`` read from them."""

    def __init__(self, models: dict[str, nn.Module]) -> None:
        self.names = list(models)
        self.__dict__.update(models)

    @property
    def components(self) -> dict[str, nn.Module]:
        return {n: getattr(self, n) for n in self.names if getattr(self, n, None) is not None}


@pytest.mark.parametrize("change", ["replaced", "removed"])
def test_a_component_replaced_or_removed_after_inject_is_refused_and_a_compiled_one_is_the_same(change: str) -> None:
    """A pipeline whose ``unet`` is replaced (or whose text encoder is removed) after inject no
    longer calls the modules holding the LoRA layers: before, a load went through and the
    pipeline ran its new UNet without the adapter (max abs diff 0 from base). Now every call
    that writes or activates is refused, nothing changed; a component compiled since
    (``torch.compile``'s wrapper of the injected module) is the same; eject still works."""
    models = _models()
    pipe = _AttributePipe(models)
    runtime = lorahot.inject(pipe, TARGETS, max_rank=4, slots=2)
    runtime.load(_lora(FULL), slot=0)
    pipe.unet = torch.compile(models["unet"])  # compiled: the same component
    runtime.load(_lora(FULL, seed=3), slot=1)
    before = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
    if change == "replaced":
        pipe.unet, name = nn.ModuleDict({"to_q": nn.Linear(8, 8), "conv": nn.Linear(8, 8)}), "unet"
    else:
        pipe.text_encoder_2, name = None, "text_encoder_2"
    for call in (
        lambda: runtime.load(_lora(FULL)),
        lambda: runtime.activate(1),
        lambda: runtime.set_scale(0.5),
        lambda: runtime.unload(0),
    ):
        with pytest.raises(UsageError, match=rf"component '{name}' of the pipeline was {change}.*runtime\.eject\(\)"):
            call()
    assert all(
        torch.equal(t, u) for t, u in zip(before, (t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)))
    )
    assert runtime.active_slot == 0
    runtime.eject()
    assert type(models["unet"]["to_q"]) is nn.Linear


class _Unet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_q(x)


def _to_q_reference(unet: nn.Module, sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The float64 output of the injected ``unet.to_q`` with the LoRA of ``sd`` (PEFT names under
    ``unet.``), from the base layer's weight and the factors."""
    a, b = sd["unet.to_q.lora_A.weight"].double(), sd["unet.to_q.lora_B.weight"].double()
    layer = unet.to_q.base_layer
    return x.double() @ layer.weight.double().T + layer.bias.double() + x.double() @ a.T @ b.T


def test_a_component_compiled_before_inject_is_the_same_component() -> None:
    """``pipe.unet = torch.compile(pipe.unet)`` before inject: the pipeline holds the compiled
    wrapper, whose ``_orig_mod`` inject wraps in place. Every load was refused as if the
    component had been replaced (the check compared the wrapper with its own module); now it
    loads, computes the adapter through the compiled wrapper and the plain module alike, and a
    component replaced after inject is still refused."""
    torch.manual_seed(0)
    unet = _Unet()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = unet(x)
    pipe = _AttributePipe({"unet": torch.compile(unet, backend="eager"), "text_encoder": _encoder()})
    runtime = lorahot.inject(pipe, ["to_q", "q_proj"], max_rank=4)
    sd = _lora(["unet.to_q", "text_encoder.layers.0.q_proj"])
    assert runtime.load(sd).components == {"unet": 1, "text_encoder": 1}
    expected = _to_q_reference(unet, sd, x)
    with torch.no_grad():
        compiled, plain = pipe.unet(x), unet(x)
    assert torch.allclose(compiled.double(), expected, rtol=0, atol=1e-5) and torch.equal(compiled, plain)
    runtime.unload()
    with torch.no_grad():
        assert torch.equal(pipe.unet(x), base)
    pipe.unet = unet  # the module compiled before inject, uncompiled: the same component
    runtime.load(sd)
    pipe.unet = _Unet()
    with pytest.raises(UsageError, match=r"component 'unet' of the pipeline was replaced"):
        runtime.load(sd)


def _two_denoisers() -> dict[str, nn.Module]:
    """A Wan 2.2-like pipeline in float64: two transformers of the same module paths and a
    text encoder."""
    torch.manual_seed(0)
    block = lambda: nn.ModuleDict({"to_q": nn.Linear(8, 8), "to_k": nn.Linear(8, 8)})  # noqa: E731
    models = {"transformer": block(), "transformer_2": block(), "text_encoder": _encoder()}
    return {c: m.double() for c, m in models.items()}


def _denoised(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        return {c: models[c]["to_k"](models[c]["to_q"](x)) for c in ("transformer", "transformer_2")}


def _denoiser_reference(models: dict[str, nn.Module], parts: dict[str, list[tuple[dict, str, float]]]) -> dict:
    """Each transformer's output with the LoRAs ``parts[component]`` (file, key prefix, weight)
    added to its own base weights, densely in float64 (alpha = rank: scale 1)."""
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = {}
    for c in ("transformer", "transformer_2"):
        h = x
        for layer in ("to_q", "to_k"):
            base = models[c][layer]
            base = getattr(base, "base_layer", base)
            w = base.weight.clone()
            for file, head, weight in parts.get(c, []):
                if f"{head}{layer}.lora_A.weight" in file:
                    w += weight * file[f"{head}{layer}.lora_B.weight"] @ file[f"{head}{layer}.lora_A.weight"]
            h = h @ w.T + base.bias
        out[c] = h.detach()
    return out


@pytest.mark.parametrize("head", ["transformer.", "diffusion_model.", ""], ids=["diffusers", "bfl", "bare"])
def test_denoiser_sends_a_files_denoiser_modules_to_the_component_named(head: str) -> None:
    """A Wan 2.2 pipeline's two transformers take a high-noise and a low-noise file, both in
    the naming of the one transformer they were trained for: ``denoiser=`` names the component
    that takes a file's denoiser modules (diffusers' ``load_into_transformer_2=True``), for one
    adapter, for each part of a stack, through preload and the host cache, and in a plan."""
    models = _two_denoisers()
    base = _denoised(models)
    runtime = lorahot.inject(models, ["to_q", "to_k", "q_proj"], max_rank=4)
    high = {k: v.double() for k, v in _lora([f"{head}to_q", f"{head}to_k"], seed=1).items()}
    low = {k: v.double() for k, v in _lora([f"{head}to_q"], seed=2).items()}
    info = runtime.load(low, denoiser="transformer_2")
    assert info.components == {"transformer": 0, "transformer_2": 1, "text_encoder": 0}
    out = _denoised(models)
    assert torch.equal(out["transformer"], base["transformer"])  # the other transformer: bitwise base
    want = _denoiser_reference(models, {"transformer_2": [(low, head, 1.0)]})
    torch.testing.assert_close(out["transformer_2"], want["transformer_2"], rtol=1e-12, atol=1e-12)
    info = runtime.load([high, low], scale=[0.5, 2.0], denoiser=[None, "transformer_2"])
    assert [p.components["transformer_2"] for p in info.parts] == [0, 1] and info.components["transformer"] == 2
    want = _denoiser_reference(models, {"transformer": [(high, head, 0.5)], "transformer_2": [(low, head, 2.0)]})
    out = _denoised(models)
    for c in want:
        torch.testing.assert_close(out[c], want[c], rtol=1e-12, atol=1e-12)
    both = runtime.load([high, high], denoiser=["transformer", "transformer_2"])  # one file into both
    assert both.components == {"transformer": 2, "transformer_2": 2, "text_encoder": 0}
    prepared = runtime.preload(low, denoiser="transformer_2")  # the prepared adapter keeps its routing
    assert runtime.load([runtime.preload(high), prepared], scale=[0.5, 2.0]).components["transformer_2"] == 1
    assert all(torch.equal(out[c], v) for c, v in _denoised(models).items())
    plan = lorahot.plan_targets([high, low], _two_denoisers(), stacked=True, denoiser=[None, "transformer_2"])
    assert plan.targets == {"transformer": ["to_q", "to_k"], "transformer_2": ["to_q"]}


def test_denoiser_keys_the_host_cache_and_the_plans_of_a_file_read_again(tmp_path) -> None:
    """The same file loaded into one transformer, then into the other: neither the host cache
    nor the plan kept for the file's structure hands back the first routing."""
    from safetensors.torch import save_file

    models = _two_denoisers()
    base = _denoised(models)
    runtime = lorahot.inject(models, ["to_q", "to_k", "q_proj"], max_rank=4)
    save_file({k: v.double() for k, v in _lora(["diffusion_model.to_q"], seed=2).items()}, str(tmp_path / "a.st"))
    path = tmp_path / "a.st"
    runtime.preload(path)
    for _ in range(2):
        assert runtime.load(path).components["transformer"] == 1
        assert runtime.load(path, denoiser="transformer_2").components == {
            "transformer": 0,
            "transformer_2": 1,
            "text_encoder": 0,
        }
        assert torch.equal(_denoised(models)["transformer"], base["transformer"])


def test_denoiser_misuse_is_refused_before_anything_changes() -> None:
    models = _two_denoisers()
    runtime = lorahot.inject(models, ["to_q", "to_k", "q_proj"], max_rank=4)
    low = {k: v.double() for k, v in _lora(["transformer.to_q"], seed=2).items()}
    runtime.load(low)
    runtime.preload(low, key="low-noise", denoiser="transformer_2")
    before = _denoised(models)
    components = "transformer, transformer_2, text_encoder"
    calls = [
        (lambda: runtime.load(low, denoiser="transformer_3"),
         rf"^denoiser='transformer_3' is no component of this runtime, whose components are {components}\. Name "
         r"the one that takes the file's denoiser modules .*denoiser='transformer_2'"),
        (lambda: runtime.load(low, denoiser=2),
         rf"^denoiser=2 must be a component name \(a str\) or None, not int; the components are {components}\.$"),
        (lambda: runtime.load([low, low], denoiser=["transformer_2"]),
         r"^denoiser has 1 entry but the load has 2 parts; pass one component name \(or None\) per part"),
        (lambda: runtime.load([low, low], denoiser=[None, "vae"]), r"^denoiser\[1\]='vae' is no component"),
        (lambda: runtime.load(runtime.preload(low), denoiser="transformer_2"),
         r"^read options \(denoiser\) do not apply to a PreparedAdapter, which was read already; pass them to "
         r"preload instead\.$"),
        # naming the runtime's own denoiser is no default to fall back on: the prepared routing
        # (transformer_2) would load where the caller said it should not
        (lambda: runtime.load(runtime.preload(low, denoiser="transformer_2"), denoiser="transformer"),
         r"^read options \(denoiser\) do not apply to a PreparedAdapter, which was read already"),
        (lambda: runtime.load([low, "low-noise"], denoiser=[None, "transformer"]),
         r"^part 1 of the stack: read options \(denoiser\) do not apply to 'low-noise', a key given to preload"),
        (lambda: runtime.preload(low, denoiser="unet"), r"^denoiser='unet' is no component"),
        (lambda: runtime.prefetch(low, denoiser="unet"), r"^denoiser='unet' is no component"),
        (lambda: lorahot.plan_targets(low, denoiser="transformer_2"),
         r"^denoiser='transformer_2' picks a component of several models, and the plan has no model: pass the "
         r"pipeline"),
        (lambda: lorahot.inject(nn.Sequential(nn.Linear(8, 8)), "0", max_rank=2).load(low, denoiser="transformer_2"),
         r"^denoiser='transformer_2': this runtime serves one model, which takes every module of a file"),
    ]  # fmt: skip
    for call, message in calls:
        with pytest.raises(UsageError, match=message):
            call()
        assert all(torch.equal(v, _denoised(models)[c]) for c, v in before.items())
    assert route("transformer.to_q", ("transformer", "transformer_2"), "transformer_2") == (
        "transformer_2",
        "transformer.",
    )
    assert route("transformer_2.to_q", ("transformer", "transformer_2"), "transformer") == (
        "transformer_2",
        "transformer_2.",
    )
    assert route("text_encoder.q", ("transformer", "text_encoder"), "transformer_2") == (
        "text_encoder",
        "text_encoder.",
    )
    assert route("lora_unet_to_q", ("transformer_2",), "transformer_2") == ("transformer_2", "lora_unet_")


@pytest.mark.parametrize("kind", [_Unet, lambda: nn.Sequential(OrderedDict(to_q=nn.Linear(8, 8)))], ids=["own", "nn"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_component_compiled_twice_is_the_same_component(when: str, kind: Callable[[], nn.Module]) -> None:
    """``pipe.unet = torch.compile(pipe.unet)`` on a component already compiled gives a
    function compiling the module's ``forward`` (not an ``OptimizedModule``; for a ``torch.nn``
    class, through a frame torch wraps around it), and compiling ``pipe.unet.forward`` does too.
    The check unwrapped one ``_orig_mod`` only, so every load was refused as 'replaced by another
    function' although the pipeline ran the LoRA (and inject skipped such a component); now every
    level is looked through, the adapter computed through the function matches a float64
    reference, and a caller's own function calling another module is still refused."""
    torch.manual_seed(0)
    unet = kind()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    pipe = _AttributePipe({"unet": torch.compile(unet, backend="eager"), "text_encoder": _encoder()})
    if when == "before":
        pipe.unet = torch.compile(pipe.unet, backend="eager")
    runtime = lorahot.inject(pipe, ["to_q", "q_proj"], max_rank=4)
    if when == "after":
        pipe.unet = torch.compile(pipe.unet, backend="eager")
    sd = _lora(["unet.to_q", "text_encoder.layers.0.q_proj"])
    assert runtime.load(sd).components == {"unet": 1, "text_encoder": 1}
    expected = _to_q_reference(unet, sd, x)
    with torch.no_grad():
        assert torch.allclose(pipe.unet(x).double(), expected, rtol=0, atol=1e-5)
    pipe.unet = torch.compile(unet.forward, backend="eager")  # a compiled forward: the same component
    runtime.load(sd)
    other = kind()
    for replacement in (lambda t: other(t), torch.compile(other, backend="eager"), other.forward):
        pipe.unet = replacement
        with pytest.raises(UsageError, match=r"component 'unet' of the pipeline was replaced by another"):
            runtime.load(sd)


def _roles_pipeline() -> dict[str, nn.Module]:
    """A transformer, a denoiser under a name of its own, and components that are no denoiser,
    each with a ``to_q`` a bare denoiser key fits: a text encoder and an image encoder by their
    pipeline names, a decoder language model and an autoencoder by their modules only."""
    torch.manual_seed(0)

    def with_q(**more: nn.Module) -> nn.Module:
        return nn.ModuleDict({"to_q": nn.Linear(8, 8), **more}).double()

    lm = nn.ModuleDict({"self_attn": nn.ModuleDict({"o_proj": nn.Linear(8, 8)})})
    vae = nn.ModuleDict({"conv_in": nn.Conv2d(3, 8, 3)})
    return {
        "transformer": with_q(),
        "dit": with_q(),
        "text_encoder": with_q(),
        "image_encoder": with_q(),
        "llm": with_q(layers=nn.ModuleList([lm])),
        "autoencoder": with_q(encoder=vae),
    }


_ROLES = [
    ("text_encoder", "a text encoder"),
    ("image_encoder", "an image encoder"),
    ("llm", r"a language model \(a text encoder\)"),
    ("autoencoder", "a VAE"),
]
_DENOISER_CALLS: dict[str, Callable[[lorahot.LoraRuntime, dict, dict, str], object]] = {
    "load": lambda rt, models, file, c: rt.load(file, denoiser=c),
    "load_stack": lambda rt, models, file, c: rt.load([file, file], denoiser=["dit", c]),
    "preload": lambda rt, models, file, c: rt.preload(file, denoiser=c),
    "prefetch": lambda rt, models, file, c: rt.prefetch(file, denoiser=c),
    "plan_targets": lambda rt, models, file, c: lorahot.plan_targets(file, models, denoiser=c),
}


@pytest.mark.parametrize("call", list(_DENOISER_CALLS), ids=list(_DENOISER_CALLS))
@pytest.mark.parametrize(("component", "role"), _ROLES, ids=[c for c, _ in _ROLES])
def test_denoiser_refuses_a_component_that_is_no_denoiser(call: str, component: str, role: str) -> None:
    """``denoiser=`` naming a text encoder, an image encoder or a VAE sent the file's denoiser
    modules there, and a bare key that fit one of its layers loaded into it silently. Each
    entry point refuses it, naming what the component is and the runtime's denoiser components
    (a denoiser of any name among them), before anything changes; the denoisers load."""
    models = _roles_pipeline()
    runtime = lorahot.inject(models, ["to_q"], max_rank=4)
    file = {k: v.double() for k, v in _lora(["to_q"], seed=3).items()}
    x = torch.randn(2, 8, dtype=torch.float64)
    before = {c: m["to_q"](x).detach() for c, m in models.items()}
    with pytest.raises(UsageError) as raised:
        _DENOISER_CALLS[call](runtime, models, file, component)
    where = "denoiser[1]" if call == "load_stack" else "denoiser"
    assert raised.match(
        rf"^{re.escape(where)}='{component}' is {role}, not a denoiser; denoiser= names the component that takes "
        r"the file's denoiser modules \(.*\)\. This runtime's denoisers: transformer, dit\. Pass one of those\.$"
    )
    assert all(torch.equal(m["to_q"](x), before[c]) for c, m in models.items())
    assert runtime.cache.keys() == [] and runtime.info(0) is None
    runtime.load(file, denoiser="dit")
    changed = {c for c, m in models.items() if not torch.equal(m["to_q"](x), before[c])}
    assert changed == {"dit"}
