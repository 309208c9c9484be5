"""``plan_targets``: one inject covers a known set of adapters, planned from headers only.

PEFT writes the Llama adapters (``save_pretrained``), diffusers' converter the kohya file;
PEFT's own models are the output oracle.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
import lorahot.io.tensorfile as tensorfile
from lorahot.io.safety import check_safetensors
from tests.helpers import TINY_DECODER, tiny_llama, tiny_unet

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402 - after the importorskip


def _peft_adapter(base: nn.Module, path: Path, seed: int, **config) -> nn.Module:
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(path)
    return model.eval()


def _logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, TINY_DECODER["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def two_llama_adapters(tmp_path_factory):
    """A tiny Llama and two PEFT adapters on disjoint modules with different ranks (one with a
    rank_pattern), with PEFT's models as oracles."""
    root = tmp_path_factory.mktemp("union")
    base = tiny_llama()
    a = _peft_adapter(
        base, root / "a", 1, r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.v_proj": 12}
    )
    b = _peft_adapter(base, root / "b", 2, r=6, lora_alpha=3, target_modules=["k_proj", "o_proj", "down_proj"])
    return base, (root / "a", a), (root / "b", b)


def test_union_of_two_peft_adapters_injects_once_and_loads_both(two_llama_adapters) -> None:
    base, (path_a, peft_a), (path_b, peft_b) = two_llama_adapters
    model = copy.deepcopy(base)
    plan = lorahot.plan_targets([path_a, path_b], model)
    layers = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj")]
    layers += [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.v_proj", "self_attn.o_proj")]
    layers += [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert sorted(plan.targets) == sorted(layers)
    assert plan.max_rank == 12  # the rank_pattern entry, not r
    assert plan.ranks["model.layers.1.self_attn.v_proj"] == 12
    assert plan.ranks["model.layers.0.self_attn.v_proj"] == 4
    assert plan.ranks["model.layers.0.mlp.down_proj"] == 6
    assert plan.sources == (str(path_a / "adapter_model.safetensors"), str(path_b / "adapter_model.safetensors"))

    runtime = lorahot.inject(model, plan.targets, max_rank=plan.max_rank, slots=2)
    runtime.load(path_a, slot=0)
    runtime.load(path_b, slot=1)
    runtime.activate(0)
    assert _rel(_logits(model), _logits(peft_a)) < 1e-5
    runtime.activate(1)
    assert _rel(_logits(model), _logits(peft_b)) < 1e-5


def test_without_a_model_the_plan_names_file_paths_inject_accepts(two_llama_adapters) -> None:
    base, (path_a, _), (path_b, peft_b) = two_llama_adapters
    plan = lorahot.plan_targets([path_a, path_b])
    assert "model.layers.1.self_attn.v_proj" in plan.targets  # base_model.model. stripped
    assert plan.max_rank == 12
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, plan.targets, max_rank=plan.max_rank)
    assert sorted(runtime.layers) == sorted(lorahot.plan_targets([path_a, path_b], base).targets)
    runtime.load(path_b)
    assert _rel(_logits(model), _logits(peft_b)) < 1e-5


def test_stacked_plans_the_sum_of_the_ranks_a_stack_loads_into_each_target(two_llama_adapters) -> None:
    """Adapters loaded together into one slot take each their own rows: ``stacked=True`` sums
    their ranks per target (here the same adapter twice, at half weight each: itself)."""
    base, (path_a, peft_a), (path_b, _) = two_llama_adapters
    model = copy.deepcopy(base)
    plan = lorahot.plan_targets([path_a, path_a, path_b], model, stacked=True)
    assert plan.max_rank == 24 and plan.ranks["model.layers.0.self_attn.q_proj"] == 8
    assert plan.ranks["model.layers.0.mlp.down_proj"] == 6
    assert lorahot.plan_targets([path_a, path_a], stacked=True).max_rank == 24  # from the files alone too
    runtime = lorahot.inject(model, plan.targets, max_rank=plan.max_rank)
    runtime.load([path_a, path_a], scale=0.5)
    assert _rel(_logits(model), _logits(peft_a)) < 1e-5
    with pytest.raises(lorahot.UsageError, match=r"^stacked='yes' must be True or False\.$"):
        lorahot.plan_targets([path_a], stacked="yes")  # type: ignore[arg-type]


def test_one_source_is_a_list_of_one(two_llama_adapters) -> None:
    _, (path_a, _), _ = two_llama_adapters
    assert lorahot.plan_targets(path_a).max_rank == 12


def test_stack_sums_the_ranks_where_adapters_share_a_module(tmp_path: Path, two_llama_adapters) -> None:
    base, (path_a, _), (path_b, _) = two_llama_adapters
    c = _peft_adapter(base, tmp_path / "c", 3, r=8, target_modules=["v_proj", "down_proj"])
    del c
    plan = lorahot.plan_targets([path_a, path_b, tmp_path / "c"], base, stacked=True)
    assert plan.stacked and not lorahot.plan_targets([path_a, tmp_path / "c"], base).stacked
    assert plan.ranks["model.layers.1.self_attn.v_proj"] == 12 + 8  # a's rank_pattern entry plus c's
    assert plan.ranks["model.layers.0.self_attn.v_proj"] == 4 + 8
    assert plan.ranks["model.layers.0.mlp.down_proj"] == 6 + 8  # b's plus c's
    assert plan.ranks["model.layers.0.self_attn.q_proj"] == 4  # a alone
    assert plan.max_rank == 20
    assert lorahot.plan_targets([path_a, path_b, tmp_path / "c"], stacked=True).max_rank == 20  # from files alone
    assert lorahot.plan_targets([path_a, path_b, tmp_path / "c"], base).max_rank == 12  # one at a time: the largest
    assert plan.inject_options() == {"max_rank": 20}  # plain LoRA: no extras, not merged-only
    with pytest.raises(lorahot.UsageError, match=r"stacked='yes' must be True or False"):
        lorahot.plan_targets(path_a, stacked="yes")


_TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _to_q_lora(rank: int, kohya: bool, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA on the tiny UNet's first ``to_q`` (16 -> 16), named as kohya or diffusers name it."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rank, 16, generator=g), torch.randn(16, rank, generator=g)
    if kohya:
        key = "lora_unet_" + _TO_Q.replace(".", "_")
        return {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(float(rank))}
    return {f"unet.{_TO_Q}.lora_A.weight": a, f"unet.{_TO_Q}.lora_B.weight": b}


def test_a_stack_of_two_namings_is_planned_per_layer_with_the_model_and_refused_without() -> None:
    """A kohya and a diffusers file of the same layer are one layer's two parts: with the model
    the plan sums them (and the stack loads); without it the names cannot be known to be one
    layer, and the plan says to pass the model rather than count each naming apart (8 where the
    load needs 12)."""
    parts = [_to_q_lora(4, True, 1), _to_q_lora(8, False, 2)]
    model = tiny_unet()
    plan = lorahot.plan_targets(parts, model, stacked=True)
    assert plan.max_rank == 12 and plan.ranks == {_TO_Q: 12}
    lorahot.inject(model, plan.targets, max_rank=plan.max_rank).load(parts)
    for order in (parts, parts[::-1]):
        with pytest.raises(
            lorahot.UsageError,
            match=r"(?s)^plan_targets\(\.\.\., stacked=True\) without a model: the adapters name modules in different "
            r"namings:(?=.*\n  - kohya: '<mapping>'\n)(?=.*\n  - module paths: '<mapping>'\n).*Pass the model: "
            r"lorahot\.plan_targets\(sources, model, stacked=True\)\.$",
        ):
            lorahot.plan_targets(order, stacked=True)
    assert lorahot.plan_targets(parts, tiny_unet()).max_rank == 8  # not stacked: the largest
    assert lorahot.plan_targets([parts[1], parts[1]], stacked=True).max_rank == 16  # one naming: summed


def test_without_a_model_only_module_path_namings_plan_and_the_rest_asks_for_the_model() -> None:
    """Without a model, ``plan.targets`` are the files' own module paths. A kohya file's are
    underscore forms (``down_blocks_0_..._to_q``), an original model's are another layout:
    ``inject`` matches none of them, so the plan (stacked or not) is refused with the fix,
    where it returned targets that injected nothing; PEFT and diffusers files plan as before."""
    kohya, diffusers = _to_q_lora(4, True, 1), _to_q_lora(8, False, 2)
    bfl = {"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, 16)} | {
        "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(16, 2)
    }
    for sources, naming in (([diffusers, kohya], "kohya"), ([bfl], "flux-bfl")):
        for stacked in (False, True) if naming != "kohya" else (False,):
            with pytest.raises(
                lorahot.UsageError,
                match=r"^plan_targets without a model: these adapters do not name their modules by the model's module "
                rf"paths:\n  - '<mapping>': {naming} naming\nOnly the model tells which of its modules their names are "
                r".*Pass the model: lorahot\.plan_targets\(sources, model\) \(or the pipeline\), which plans its "
                r"module names, max_rank and inject options\.$",
            ):
                lorahot.plan_targets(sources, stacked=stacked)
    plan = lorahot.plan_targets([diffusers])
    assert plan.targets == [_TO_Q] and plan.max_rank == 8
    lorahot.inject(tiny_unet(), plan.targets, max_rank=plan.max_rank).load(diffusers)
    assert lorahot.plan_targets([kohya], tiny_unet()).targets == [_TO_Q]


def test_a_stack_planned_without_a_model_counts_each_component_of_a_path_apart() -> None:
    """A diffusers SDXL file names the two text encoders' layers by one path under
    ``text_encoder.`` and ``text_encoder_2.``: two layers, each taking the file's rank once,
    not their sum."""
    path = "text_model.encoder.layers.0.self_attn.q_proj"
    file = {
        f"{te}.{path}.{role}.weight": torch.randn(*shape)
        for te in ("text_encoder", "text_encoder_2")
        for role, shape in (("lora_A", (4, 16)), ("lora_B", (16, 4)))
    }
    assert lorahot.plan_targets([file], stacked=True).ranks == {path: 4}
    assert lorahot.plan_targets([file, file], stacked=True).ranks == {path: 8}


# -- headers only ---------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the file behind a descriptor through /proc")
def test_plans_from_the_header_without_reading_tensor_data(tmp_path: Path, two_llama_adapters, monkeypatch) -> None:
    """The data section is overwritten with garbage, and every read past the header fails."""
    base, (path_a, _), _ = two_llama_adapters
    work = tmp_path / "a"
    work.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (work / name).write_bytes((path_a / name).read_bytes())
    file = work / "adapter_model.safetensors"
    header = check_safetensors(file)
    with open(file, "r+b") as f:  # NaN bytes everywhere after the header
        f.seek(header.data_start)
        f.write(b"\xff" * header.data_size)

    def no_data(*args, **kwargs):
        raise AssertionError("plan_targets read tensor data")

    real_pread = os.pread
    reads: list[tuple[int, int]] = []  # (offset, size) of every read of the weights file

    def pread(fd: int, n: int, offset: int) -> bytes:
        if Path(os.readlink(f"/proc/self/fd/{fd}")) == file.resolve():
            reads.append((offset, n))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(tensorfile, "_read_into", no_data)
    monkeypatch.setattr(os, "preadv", no_data)
    monkeypatch.setattr(os, "pread", pread)
    plan = lorahot.plan_targets([work], base)
    assert plan.max_rank == 12
    assert reads == [(0, 8), (8, header.data_start - 8)]  # the length, then the header: nothing after


def test_kohya_alpha_values_are_not_read(tmp_path: Path) -> None:
    """A kohya ``.alpha`` is tensor data too: plan_targets never reads it, so a garbage alpha
    (which load refuses) still plans."""
    lin = nn.Sequential()
    lin.add_module("proj", nn.Linear(8, 8))
    tensors = {
        "lora_unet_proj.lora_down.weight": torch.randn(3, 8),
        "lora_unet_proj.lora_up.weight": torch.randn(8, 3),
        "lora_unet_proj.alpha": torch.tensor(float("nan")),
    }
    save_file(tensors, tmp_path / "k.safetensors")
    plan = lorahot.plan_targets([tmp_path / "k.safetensors"], lin)
    assert plan.targets == ["proj"] and plan.max_rank == 3
    with pytest.raises(lorahot.AdapterReadError, match="alpha"):
        lorahot.read_adapter(tmp_path / "k.safetensors")


# -- diffusion: kohya and diffusers files on a UNet -------------------------------------------


def _unet() -> nn.Module:
    return tiny_unet()


def _unet_lora(base: nn.Module, seed: int, **config) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    oracle = copy.deepcopy(base)
    oracle.add_adapter(peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    state = {f"unet.{k}": v.detach().clone() for k, v in peft.get_peft_model_state_dict(oracle).items()}
    return oracle, state


def _run_unet(model: nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return model(
            torch.randn(2, 4, 8, 8, generator=g), 7, encoder_hidden_states=torch.randn(2, 5, 16, generator=g)
        ).sample


def test_kohya_and_diffusers_files_on_a_unet(tmp_path: Path) -> None:
    base = _unet()
    cfg_d = {"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_v", "conv1"], "rank_pattern": {"conv1": 2}}
    oracle_d, state_d = _unet_lora(base, 1, **cfg_d)
    meta = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in cfg_d.items()})}
    save_file(state_d, tmp_path / "d.safetensors", metadata=meta)
    oracle_k, state_k = _unet_lora(base, 2, r=8, lora_alpha=8, target_modules=["to_k", "to_out.0", "conv2"])
    kohya = convert_state_dict_to_kohya(state_k)
    kohya = {k: torch.tensor(8.0) if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}
    save_file(kohya, tmp_path / "k.safetensors")

    model = copy.deepcopy(base)
    plan = lorahot.plan_targets([tmp_path / "d.safetensors", tmp_path / "k.safetensors"], model)
    names = {n for n, m in model.named_modules()}
    assert set(plan.targets) <= names
    assert {t.rsplit(".", 1)[-1] for t in plan.targets} == {"to_q", "to_v", "to_k", "0", "conv1", "conv2"}
    assert plan.max_rank == 8
    assert all(plan.ranks[t] == 2 for t in plan.targets if t.endswith("conv1"))

    runtime = lorahot.inject(model, plan.targets, max_rank=plan.max_rank, slots=2)
    runtime.load(tmp_path / "d.safetensors", slot=0)
    runtime.load(tmp_path / "k.safetensors", slot=1)
    runtime.activate(0)
    assert _rel(_run_unet(model), _run_unet(oracle_d)) < 1e-5
    runtime.activate(1)
    assert _rel(_run_unet(model), _run_unet(oracle_k)) < 1e-5


def test_grouped_conv_rounds_max_rank_up_to_its_groups(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Flatten(), nn.Linear(8, 4))
    tensors = {
        "0.lora_A.weight": torch.randn(8, 8, 3, 3),
        "0.lora_B.weight": torch.randn(8, 2, 1, 1),  # rank 8, groups 4
        "2.lora_A.weight": torch.randn(10, 8),
        "2.lora_B.weight": torch.randn(4, 10),
    }
    plan = lorahot.plan_targets([tensors], model)
    assert plan.max_rank == 12  # 10, up to a multiple of 4
    lorahot.inject(model, plan.targets, max_rank=plan.max_rank).load(tensors)


# -- typed errors ---------------------------------------------------------------------------


def test_bad_sources_raise_the_readers_errors(tmp_path: Path, two_llama_adapters) -> None:
    _, (path_a, _), _ = two_llama_adapters
    with pytest.raises(lorahot.SourceNotFoundError):
        lorahot.plan_targets([path_a, tmp_path / "missing.safetensors"])
    (tmp_path / "x.bin").write_bytes(b"\x80\x02")
    with pytest.raises(lorahot.AdapterReadError, match="pickle"):
        lorahot.plan_targets([tmp_path / "x.bin"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(lorahot.AdapterReadError):
        lorahot.plan_targets([tmp_path / "bad.safetensors"])
    with pytest.raises(lorahot.UsageError, match="empty"):
        lorahot.plan_targets([])
    with pytest.raises(lorahot.UsageError, match="device"):
        lorahot.plan_targets([path_a], device="cpu")
    with pytest.raises(lorahot.UsageError, match=r"nn\.Module"):
        lorahot.plan_targets([path_a], model="llama")


def test_a_rank_inject_would_refuse_is_refused_at_plan_time_without_a_model(tmp_path: Path) -> None:
    """A module whose A is ``[2**40, 0]`` (no bytes): without a model the plan said max_rank
    2**40, which inject then refused as absurd (an independent audit); the plan refuses it,
    naming the module, as it does with a model and as load does."""
    header = {
        "base_model.model.layers.0.q_proj.lora_A.weight": {"dtype": "F32", "shape": [2**40, 0], "data_offsets": [0, 0]},
        "base_model.model.layers.0.q_proj.lora_B.weight": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "rank.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"ranks above 65536.*\n  - layers\.0\.q_proj: rank 1099511627776"
    ):
        lorahot.plan_targets(path)


def test_planned_targets_wrap_exactly_the_planned_modules(tmp_path: Path) -> None:
    """An adapter on a model's top-level ``proj_out`` only (Flux, SD3 and HunyuanVideo also have
    one in every block): ``inject`` matched the planned names as PEFT's target_modules, as name
    suffixes, so it also wrapped every block's ``proj_out`` (an independent audit: 38 extra
    layers on Flux, each with buffers at max_rank). Planned against a model the names are now
    matched exactly; a plain list still matches as suffixes."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj_out = nn.Linear(8, 8)

    model = nn.Module()
    model.blocks = nn.ModuleList([Block(), Block()])
    model.proj_out = nn.Linear(8, 4)
    save_file(
        {"proj_out.lora_A.weight": torch.randn(2, 8), "proj_out.lora_B.weight": torch.randn(4, 2)},
        tmp_path / "a.safetensors",
    )
    plan = lorahot.plan_targets(tmp_path / "a.safetensors", copy.deepcopy(model))
    assert plan.targets == ["proj_out"] and isinstance(plan.targets, lorahot.runtime.targets.ExactNames)
    runtime = lorahot.inject(copy.deepcopy(model), plan.targets, **plan.inject_options())
    assert list(runtime.layers) == ["proj_out"]
    runtime.load(tmp_path / "a.safetensors")
    assert len(lorahot.inject(model, ["proj_out"], max_rank=2).layers) == 3  # PEFT's semantics for a list


def test_a_plan_no_runtime_can_load_is_refused_at_plan_time(tmp_path: Path) -> None:
    """Two plans load refused only after inject (an independent audit): a full diff with a
    bias diff on a layer without a bias, and a LoHa (merged mode only) planned with a LoRA bias
    on a layer without a bias (which merged mode cannot fold). plan_targets refuses both,
    naming the layer."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.ModuleDict({"lin": nn.Linear(8, 8, bias=False), "lin2": nn.Linear(8, 8)})

    g = torch.Generator().manual_seed(0)
    save_file(
        {"lora_unet_lin.diff": torch.randn(8, 8, generator=g), "lora_unet_lin.diff_b": torch.randn(8, generator=g)},
        tmp_path / "diff.safetensors",
    )
    with pytest.raises(lorahot.AdapterMismatchError, match=r"lin: a bias diff \(diff_b\) for a layer without a bias"):
        lorahot.plan_targets(tmp_path / "diff.safetensors", model())
    loha = {
        f"lora_unet_lin2.hada_w{i}_{s}": torch.randn(*((8, 2) if s == "a" else (2, 8)), generator=g)
        for i in (1, 2)
        for s in "ab"
    }
    save_file(loha, tmp_path / "loha.safetensors")
    bias = tmp_path / "bias"
    bias.mkdir()
    save_file(
        {
            "base_model.model.lin.lora_A.weight": torch.randn(2, 8, generator=g),
            "base_model.model.lin.lora_B.weight": torch.randn(8, 2, generator=g),
            "base_model.model.lin.lora_B.bias": torch.randn(8, generator=g),
        },
        bias / "adapter_model.safetensors",
    )
    (bias / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "lora_bias": True}))
    assert lorahot.plan_targets(bias, model()).extras  # alone: unmerged with extras=True
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"bias.*: lin: a LoRA bias \(lora_bias\) on a layer without a bias"
    ):
        lorahot.plan_targets([tmp_path / "loha.safetensors", bias], model())


def _layer_refusal_model() -> nn.Module:
    """A grouped conv, a plain linear and a linear with a forward pre-hook (float64)."""
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"grouped": nn.Conv2d(4, 8, 3, padding=1, groups=2), "lin": nn.Linear(16, 24), "hooked": nn.Linear(16, 24)}
    ).double()
    model["hooked"].register_forward_pre_hook(lambda module, args: None)
    return model


def _layer_refusal_parts(case: str) -> tuple[list[dict[str, torch.Tensor]], str, dict]:
    """``(sources, what plan_targets and load say, the inject options the plan gave before)``."""
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def peft(name: str, rank: int, fan_in: tuple[int, ...], out: int, **extra: torch.Tensor) -> dict:
        keys = {
            "lora_A.weight": r(rank, *fan_in),
            "lora_B.weight": r(out, rank // (2 if len(fan_in) > 1 else 1), *(1,) * (len(fan_in) - 1)),
        }
        return {f"base_model.model.{name}.{k}": v for k, v in (keys | extra).items()}

    magnitude = {"lora_magnitude_vector": r(8).abs() + 0.5}
    loha = {f"lora_unet_lin.hada_w{i}_{s}": r(*((24, 2) if s == "a" else (2, 16))) for i in (1, 2) for s in "ab"}
    grouped_lora = peft("grouped", 2, (4, 3, 3), 8)
    cases = {
        "lora-on-a-grouped-conv-beside-a-loha": (
            [loha, grouped_lora],
            r"grouped: a conv with groups=2 cannot hold a LoRA merged.*while another module needs merged mode",
            {"max_rank": 2, "merged": True},
        ),
        "dora-on-a-grouped-conv": (
            [peft("grouped", 2, (4, 3, 3), 8, **magnitude)],
            r"grouped \(.*lora_magnitude_vector\): DoRA on a conv with groups=2 is not supported",
            {"max_rank": 2, "extras": True},
        ),
        "dora-under-a-forward-pre-hook": (
            [peft("hooked", 2, (16,), 24, lora_magnitude_vector=r(24).abs() + 0.5)],
            r"hooked \(.*\): Linear has forward pre-hooks, which run before each call and may rewrite the weight",
            {"max_rank": 2, "extras": True},
        ),
        "dora-and-lora-bias-on-one-module": (
            [peft("lin", 2, (16,), 24, lora_magnitude_vector=r(24).abs() + 0.5, **{"lora_B.bias": r(24)})],
            r"lin \(.*\): both a DoRA magnitude and a LoRA bias, which PEFT refuses to combine",
            {"max_rank": 2, "extras": True},
        ),
    }
    return cases[case]


@pytest.mark.parametrize(
    "case",
    [
        "lora-on-a-grouped-conv-beside-a-loha",
        "dora-on-a-grouped-conv",
        "dora-under-a-forward-pre-hook",
        "dora-and-lora-bias-on-one-module",
    ],
)
@pytest.mark.parametrize("stacked", [False, True], ids=["union", "stacked"])
def test_a_plan_whose_layers_refuse_what_its_adapters_carry_is_refused_as_load_refuses_it(
    case: str, stacked: bool
) -> None:
    """plan_targets with a model checked keys and shapes but not what the layer itself refuses
    at load: a LoRA on a grouped conv beside a module that needs merged mode (merged mode
    cannot fold it there), DoRA on a grouped conv or on a base with forward pre-hooks, a DoRA
    magnitude beside a LoRA bias. The plan gave inject options under which the load then
    failed; now the plan is refused with the load's own reason, and the model is untouched."""
    sources, reason, planned_before = _layer_refusal_parts(case)
    model = _layer_refusal_model()
    before = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with pytest.raises(lorahot.AdapterMismatchError, match=reason):
        lorahot.plan_targets(sources, model, stacked=stacked)
    assert all(torch.equal(v, before[k]) for k, v in [*model.named_parameters(), *model.named_buffers()])
    targets = sorted({k.split(".")[2] if k.startswith("base_model") else "lin" for s in sources for k in s})
    runtime = lorahot.inject(model, targets, **planned_before)  # what the plan said before
    before = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with pytest.raises(lorahot.AdapterMismatchError, match=reason.split(".*while")[0]):  # (the plan's says why)
        runtime.load(sources if stacked else sources[-1])
    assert all(torch.equal(v, before[k]) for k, v in [*model.named_parameters(), *model.named_buffers()])


def test_a_lora_on_a_grouped_conv_plans_and_loads_unmerged_without_modules_that_need_merged_mode() -> None:
    """The negative control of the grouped-conv case: without the LoHa the plan is unmerged and
    the LoRA loads at the float64 reference, and the LoHa alone plans merged and loads."""
    sources, _, _ = _layer_refusal_parts("lora-on-a-grouped-conv-beside-a-loha")
    loha, lora = sources
    model = _layer_refusal_model()
    plan = lorahot.plan_targets([lora], model)
    assert plan.inject_options() == {"max_rank": 2}
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want = model["grouped"](x).detach()
    a, b = lora["base_model.model.grouped.lora_A.weight"], lora["base_model.model.grouped.lora_B.weight"]
    want = want + torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a, padding=1), b, groups=2)
    lorahot.inject(model, plan.targets, **plan.inject_options()).load(lora, config={"r": 2, "lora_alpha": 2})
    torch.testing.assert_close(model["grouped"](x), want, rtol=1e-12, atol=1e-12)
    plan = lorahot.plan_targets([loha], _layer_refusal_model())
    assert plan.inject_options() == {"max_rank": 1, "merged": True}
    lorahot.inject(fresh := _layer_refusal_model(), plan.targets, **plan.inject_options()).load(loha)
    assert not torch.equal(fresh["lin"].weight, _layer_refusal_model()["lin"].weight)


def _merged_refusing_model(how: str) -> nn.Module:
    """Linears ``a``, ``b`` and ``lin`` (float64) where merged mode refuses ``a``: its weight tied
    to ``b``'s, or a strided slice of a larger tensor (not dense in memory)."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8), "lin": nn.Linear(8, 6)}).double()
    if how == "tied":
        model["b"].weight = model["a"].weight
    else:
        model["a"].weight = nn.Parameter(torch.stack([model["a"].weight.detach()] * 2, -1)[..., 0])
    return model


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("tied", r"a: its weight is tied to (text_encoder\.)?b \((text_encoder\.)?b\.weight shares its memory\)"),
        ("strided", r"a: merged mode rewrites the weight in place and needs its elements dense in memory"),
    ],
    ids=["tied", "strided"],
)
@pytest.mark.parametrize("several", [False, True], ids=["model", "components"])
def test_a_plan_that_needs_merged_mode_onto_a_target_merged_inject_refuses_is_refused(
    how: str, reason: str, several: bool
) -> None:
    """A full diff (merged mode only) planned beside a LoRA on a linear merged mode refuses at
    inject (a weight tied to another module's, a weight not dense in memory): the plan said
    merged=True and inject then refused the targets, while unmerged the diff is refused, so
    no runtime loads the set. plan_targets now refuses it with inject's reason, naming the
    source that needs merged mode; the model is untouched. Without the diff it plans unmerged
    and loads at the float64 reference."""
    g = torch.Generator().manual_seed(2)
    diff = {"lora_unet_lin.diff": torch.randn(6, 8, generator=g, dtype=torch.float64)}
    a, b = torch.randn(2, 8, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64)
    prefix = "lora_te_a" if several else "lora_unet_a"
    lora = {f"{prefix}.lora_down.weight": a, f"{prefix}.lora_up.weight": b}

    def model() -> nn.Module | dict[str, nn.Module]:
        return (
            {"text_encoder": _merged_refusing_model(how), "unet": _merged_refusing_model("")}
            if several
            else (_merged_refusing_model(how))
        )

    target = model()
    modules = target.values() if isinstance(target, dict) else [target]
    before = [{k: v.clone() for k, v in [*m.named_parameters(), *m.named_buffers()]} for m in modules]
    refused = ("text_encoder\\." if several else "") + reason
    with pytest.raises(
        lorahot.AdapterMismatchError, match=rf"<mapping>: modules that load only in merged mode[\s\S]*{refused}"
    ):
        lorahot.plan_targets([diff, lora], target)
    for m, state in zip(modules, before):
        assert all(torch.equal(v, state[k]) for k, v in [*m.named_parameters(), *m.named_buffers()])
    plan = lorahot.plan_targets([lora], target := model())
    assert plan.inject_options() == {"max_rank": 2}
    lorahot.inject(target, plan.targets, **plan.inject_options()).load(lora)
    layer = target["text_encoder"]["a"] if several else target["a"]
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    want = _merged_refusing_model(how)["a"](x) + x @ a.T @ b.T
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_config_rank_disagreeing_with_the_header_is_refused(tmp_path: Path, two_llama_adapters) -> None:
    _, (path_a, _), _ = two_llama_adapters
    work = tmp_path / "a"
    work.mkdir()
    (work / "adapter_model.safetensors").write_bytes((path_a / "adapter_model.safetensors").read_bytes())
    config = json.loads((path_a / "adapter_config.json").read_text())
    config["rank_pattern"] = {}
    (work / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lorahot.AdapterMismatchError, match="says r=4"):
        lorahot.plan_targets([work])


def test_keys_and_shapes_that_do_not_fit_the_model_are_refused(two_llama_adapters) -> None:
    base, (path_a, _), _ = two_llama_adapters
    stranger = {"blocks.0.attn.lora_A.weight": torch.randn(2, 32), "blocks.0.attn.lora_B.weight": torch.randn(32, 2)}
    with pytest.raises(lorahot.AdapterMismatchError, match=r"blocks\.0\.attn: matches no injected layer"):
        lorahot.plan_targets([path_a, stranger], base)
    wide = {
        "model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 40),
        "model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 2),
    }
    with pytest.raises(lorahot.AdapterMismatchError, match=r"A has shape \(2, 40\)"):
        lorahot.plan_targets([wide], base)
    skipped = lorahot.plan_targets([path_a, stranger], base, strict=False)
    assert skipped.skipped == ("blocks.0.attn.lora_A.weight", "blocks.0.attn.lora_B.weight")
    assert skipped.max_rank == 12


def test_flux_fused_modules_plan_onto_their_parts(tmp_path: Path) -> None:
    """Flux's fused ``qkv`` splits onto to_q/to_k/to_v from shapes alone; a block-diagonal B
    (unknowable without its values) is counted at the full rank, an upper bound."""
    from tests.system.test_parity_flux import MODEL_MODULES, SPARSE, kohya_file, random_weights, tiny_flux

    path = tmp_path / "flux.safetensors"
    save_file(kohya_file(random_weights(MODEL_MODULES, 3, sparse=SPARSE)), str(path))
    model = tiny_flux()
    plan = lorahot.plan_targets([path], model)
    runtime = lorahot.inject(model, plan.targets, max_rank=plan.max_rank)
    info = runtime.load(path)
    assert sorted(info.ranks) == sorted(plan.targets)
    assert all(info.ranks[t] <= plan.ranks[t] for t in plan.targets)
    assert plan.max_rank == 6  # the sparse qkv's 6; loaded, each of its parts has rank 2


# -- several models: a pipeline ---------------------------------------------------------------


def test_pipeline_plan_routes_each_file_to_its_components(tmp_path: Path) -> None:
    """A diffusers file on the UNet and both text encoders and a kohya UNet-only file of a larger
    rank, planned against the whole tiny SDXL pipeline: the plan is keyed by component, both
    files load into ``inject(pipe, plan.targets, ...)``, and the outputs are those of an inject
    with the targets written out."""
    from tests.system import test_parity_pipeline as sdxl

    pipe = sdxl._pipeline()
    both = sdxl._diffusers_file(pipe, ["unet", "text_encoder", "text_encoder_2"], seed=1)
    save_file(both, tmp_path / "d.safetensors")
    unet_only = sdxl._kohya_file(pipe, ["unet"], seed=2)
    unet_only = {k: v.contiguous() for k, v in unet_only.items()}
    save_file(unet_only, tmp_path / "k.safetensors")
    files = [tmp_path / "d.safetensors", tmp_path / "k.safetensors"]

    plan = lorahot.plan_targets(files, model=pipe)
    assert isinstance(plan.targets, dict)
    assert set(plan.targets) == {"unet", "text_encoder", "text_encoder_2"}
    for component, names in plan.targets.items():
        modules = dict(getattr(pipe, component).named_modules())
        assert names and all(n in modules for n in names)
        assert {n.rsplit(".", 1)[-1] for n in names} <= {"to_q", "to_k", "to_v", "0", "q_proj", "k_proj"} | {
            "v_proj",
            "out_proj",
            "fc1",
            "fc2",
        }
    assert plan.max_rank == sdxl.RANK
    assert all(k.split(".", 1)[0] in plan.targets for k in plan.ranks)

    outputs = []
    for targets, max_rank in ((plan.targets, plan.max_rank), (sdxl.TARGETS, sdxl.RANK)):
        model = copy.deepcopy(pipe)
        runtime = lorahot.inject(model, targets, max_rank=max_rank, slots=2)
        runtime.load(files[0], slot=0)
        runtime.load(files[1], slot=1)
        got = []
        for slot in (0, 1):
            runtime.activate(slot)
            got.append(sdxl._run(model))
        outputs.append(got)
    base = sdxl._run(pipe)
    for planned, explicit in zip(*outputs):
        for c in planned:
            torch.testing.assert_close(planned[c], explicit[c], rtol=0, atol=0)
    assert not torch.equal(outputs[0][0]["text_encoder"], base["text_encoder"])
    assert not torch.equal(outputs[0][1]["unet"], base["unet"])


def test_components_dict_plan_and_routing_errors(tmp_path: Path) -> None:
    """A dict of components plans as a pipeline does; a file with modules for a component the
    dict lacks is refused as ``load`` refuses it, and skipped with ``strict=False``."""
    from tests.system import test_parity_pipeline as sdxl

    pipe = sdxl._pipeline()
    save_file(sdxl._diffusers_file(pipe, ["unet", "text_encoder"], seed=3), tmp_path / "d.safetensors")
    models = {"unet": pipe.unet, "text_encoder_2": pipe.text_encoder_2}
    with pytest.raises(lorahot.AdapterMismatchError, match="text_encoder"):
        lorahot.plan_targets([tmp_path / "d.safetensors"], model=models)
    plan = lorahot.plan_targets([tmp_path / "d.safetensors"], model=models, strict=False)
    assert list(plan.targets) == ["unet"]
    assert plan.skipped and all(k.startswith("text_encoder.") for k in plan.skipped)
    with pytest.raises(lorahot.UsageError, match="components"):
        lorahot.plan_targets([tmp_path / "d.safetensors"], model=42)


def test_plan_says_which_inject_options_the_adapters_need() -> None:
    g = torch.Generator().manual_seed(0)
    loha = {
        f"lora_unet_proj.hada_w{i}_{ab}": torch.randn(shape, generator=g)
        for i in (1, 2)
        for ab, shape in (("a", (8, 2)), ("b", (2, 8)))
    }
    plan = lorahot.plan_targets(loha, nn.ModuleDict({"proj": nn.Linear(8, 8)}))
    assert plan.merged_only and not plan.extras
    assert plan.inject_options() == {"max_rank": 1, "merged": True}


def test_a_model_plan_checks_lycoris_factor_shapes_as_load_does() -> None:
    model = nn.Sequential(nn.Linear(16, 24))
    fits = {"lora_unet_0.lokr_w1": torch.randn(4, 4), "lora_unet_0.lokr_w2": torch.randn(6, 4)}  # (24, 16)
    plan = lorahot.plan_targets(fits, model=model)
    assert plan.targets == ["0"] and plan.merged_only
    wrong = {"lora_unet_0.lokr_w1": torch.randn(2, 2), "lora_unet_0.lokr_w2": torch.randn(5, 5)}  # (10, 10)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"make a weight of shape \(10, 10\), expected \(24, 16\)"):
        lorahot.plan_targets(wrong, model=model)
    runtime = lorahot.inject(model, ["0"], max_rank=1, merged=True)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"make a weight of shape \(10, 10\), expected \(24, 16\)"):
        runtime.load(wrong)  # as load says
    runtime.load(fits)


def _weight_decomposed_stacks() -> dict[str, list[dict[str, torch.Tensor]]]:
    """Stacks that share a layer with a module that must be alone there, beside one that does
    not (each part's name is ``lora_unet_<layer>`` in kohya naming)."""
    g = torch.Generator().manual_seed(6)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3

    plain0 = {"lora_unet_0.lora_down.weight": r(2, 16), "lora_unet_0.lora_up.weight": r(24, 2)}
    plain1 = {"lora_unet_1.lora_down.weight": r(2, 24), "lora_unet_1.lora_up.weight": r(12, 2)}
    dora0 = {"lora_unet_0.lora_down.weight": r(3, 16), "lora_unet_0.lora_up.weight": r(24, 3)}
    dora0["lora_unet_0.dora_scale"] = r(24, 1).abs() + 0.5
    loha0 = {f"lora_unet_0.hada_w{i}_{ab}": r(24, 2) if ab == "a" else r(2, 16) for i in (1, 2) for ab in "ab"}
    loha0["lora_unet_0.dora_scale"] = r(24, 1).abs() + 0.5
    return {
        "dora-scale-and-lora": [dora0, plain0],
        "loha-dora-scale-and-lora": [plain0, loha0],
        "fits": [dora0, plain1],
    }


@pytest.mark.parametrize("stack", ["dora-scale-and-lora", "loha-dora-scale-and-lora", "fits"])
def test_stacked_plans_refuse_what_a_stack_load_refuses_on_a_shared_layer(stack: str) -> None:
    """``plan_targets(stacked=True)`` promises a plan the stack loads with; a DoRA module (a
    kohya ``dora_scale``) or a LyCORIS module with weight decomposition must be alone on its
    layer, which the load refuses, naming the layer and the parts: the plan now refuses the same
    stack with the same words (it planned it, the load of the plan then failing). A stack whose
    DoRA part is alone on its layer is planned and loads."""
    parts = _weight_decomposed_stacks()[stack]

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 12)).double()

    runtime = lorahot.inject(model(), ["0", "1"], max_rank=8, merged=True)
    if stack == "fits":
        plan = lorahot.plan_targets(parts, model(), stacked=True)
        assert plan.ranks == {"0": 3, "1": 2} and plan.extras
        runtime.load(parts)
        return
    shared = (
        r"0 \(lora_unet_0\..*\): part \d of the stack \(<mapping>\) has "
        r"(DoRA \(a magnitude vector\)|a LoHa module with weight decomposition)"
    )
    with pytest.raises(lorahot.AdapterMismatchError, match=shared):
        runtime.load(parts)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"{shared}[\s\S]*\nLoad an adapter with DoRA .* alone"):
        lorahot.plan_targets(parts, model(), stacked=True)
    assert lorahot.plan_targets(parts, model()).ranks["0"] == (3 if stack.startswith("dora") else 2)  # one at a time


@pytest.mark.parametrize("bias", [True, False], ids=["layer-bias", "no-layer-bias"])
def test_stacked_plans_of_several_lora_biases_on_one_layer_load_unmerged(bias: bool) -> None:
    """Two parts with a LoRA bias on one layer load unmerged, which sums them at the parts' weights,
    whether or not the layer has a bias of its own: ``plan_targets(stacked=True)`` plans
    ``extras=True``, not merged mode (it said ``merged=True``, and refused them on a layer without a
    bias), and the runtime it plans computes PEFT's sum of the two adapters (float64). With a base
    bias, merged mode loads the plan's targets too."""
    g = torch.Generator().manual_seed(0)
    parts = [
        {
            "0.lora_A.weight": torch.randn(2, 16, generator=g, dtype=torch.float64),
            "0.lora_B.weight": torch.randn(24, 2, generator=g, dtype=torch.float64),
            "0.lora_B.bias": torch.randn(24, generator=g, dtype=torch.float64),
        }
        for _ in range(2)
    ]

    def model() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(16, 24, bias=bias)).double()

    plan = lorahot.plan_targets(parts, model(), stacked=True)
    assert plan.ranks == {"0": 4} and plan.extras and not plan.merged_only
    assert plan.inject_options() == {"max_rank": 4, "extras": True}
    served = model()
    lorahot.inject(served, plan.targets, **plan.inject_options()).load(parts, scale=[1.5, -0.5])
    x = torch.randn(3, 16, dtype=torch.float64)
    want = model()(x) + sum(
        w * (x @ p["0.lora_A.weight"].T @ p["0.lora_B.weight"].T + p["0.lora_B.bias"])
        for p, w in zip(parts, (1.5, -0.5))
    )
    with torch.no_grad():
        torch.testing.assert_close(served(x), want, rtol=1e-12, atol=1e-12)
    if bias:
        lorahot.inject(model(), plan.targets, max_rank=plan.max_rank, merged=True).load(parts)


def test_a_stacked_plan_that_needs_merged_mode_refuses_a_lora_bias_on_a_layer_without_a_bias() -> None:
    """A diff part needs merged mode, which cannot fold a LoRA bias into the bias-less layer ``1``: no
    one runtime loads that stack, which the plan says by name. Without the diff, the same LoRA biases
    (two on layer ``0``, one on layer ``1``) plan unmerged and load."""
    g = torch.Generator().manual_seed(0)

    def lora(layer: str, fan_in: int, fan_out: int) -> dict[str, torch.Tensor]:
        return {
            f"{layer}.lora_A.weight": torch.randn(2, fan_in, generator=g, dtype=torch.float64),
            f"{layer}.lora_B.weight": torch.randn(fan_out, 2, generator=g, dtype=torch.float64),
            f"{layer}.lora_B.bias": torch.randn(fan_out, generator=g, dtype=torch.float64),
        }

    parts = [lora("0", 16, 24), lora("0", 16, 24), lora("1", 24, 12)]
    diff = {"lora_unet_0.diff": torch.randn(24, 16, generator=g, dtype=torch.float64)}

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 12, bias=False)).double()

    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"  - <mapping>: 1: a LoRA bias \(lora_bias\) on a layer without a bias, which merged mode cannot "
        r"fold, while another module needs merged mode \(LyCORIS kinds or full diffs\)",
    ):
        lorahot.plan_targets([*parts, diff], model(), stacked=True)
    for kwargs in ({"extras": True}, {"merged": True}):  # what the plan says: neither runtime loads it
        with pytest.raises(lorahot.AdapterMismatchError):
            lorahot.inject(model(), ["0", "1"], max_rank=4, **kwargs).load([*parts, diff])
    plan = lorahot.plan_targets(parts, model(), stacked=True)
    assert plan.inject_options() == {"max_rank": 4, "extras": True}
    lorahot.inject(model(), plan.targets, **plan.inject_options()).load(parts)


def _peft_part(prefix: str, layer: str, rank: int, seed: int, **extra: bool) -> dict[str, torch.Tensor]:
    """A LoRA of ``layer`` (16 -> 24) under ``prefix`` (PEFT's ``base_model.model.``, diffusers'
    ``unet.``), with a LoRA bias or a DoRA magnitude where ``extra`` says."""
    g = torch.Generator().manual_seed(seed)
    key = f"{prefix}{layer}"
    out = {
        f"{key}.lora_A.weight": torch.randn(rank, 16, generator=g),
        f"{key}.lora_B.weight": torch.randn(24, rank, generator=g),
    }
    if extra.get("bias"):
        out[f"{key}.lora_B.bias"] = torch.randn(24, generator=g)
    if extra.get("dora"):
        out[f"{key}.lora_magnitude_vector"] = torch.rand(24, generator=g) + 0.5
    return out


#: stacks whose plan needs no model (their names are the model's module paths), and what both
#: plans say: the same ranks, or the same refusal of a layer the parts share
_DETERMINABLE_STACKS = {
    "peft-and-diffusers-on-one-layer": ([("base_model.model.", "0", 2, {}), ("unet.", "0", 3, {})], None),
    "two-lora-biases-on-one-layer": (
        [("base_model.model.", "0", 2, {"bias": True}), ("", "0", 2, {"bias": True})],
        None,
    ),
    "dora-alone-on-its-layer": (
        [("base_model.model.", "0", 2, {"dora": True}), ("base_model.model.", "1", 4, {})],
        None,
    ),
    "dora-on-a-shared-layer": (
        [("base_model.model.", "0", 2, {"dora": True}), ("unet.", "0", 4, {})],
        r"  - 0 \(base_model\.model\.0\.lora_A\.weight.*\): part 0 of the stack \(<mapping>\) has DoRA "
        r"\(a magnitude vector\) on a "
        r"layer parts 0, 1 all load into[\s\S]*\nLoad an adapter with DoRA",
    ),
}


@pytest.mark.parametrize("stack", list(_DETERMINABLE_STACKS))
def test_a_stack_planned_without_a_model_agrees_with_its_plan_against_the_model(stack: str) -> None:
    """Where the files' names are the model's module paths, ``plan_targets(stacked=True)``
    without the model says what it says with it: PEFT's ``base_model.model.``, diffusers'
    ``unet.`` and no prefix name one layer, whose ranks add up (they were counted apart, the
    largest taken: max_rank 3 where the stack needs 5, which its load then refused); a DoRA part
    on a layer another part loads into is refused, naming both (it was planned); several LoRA
    biases on one layer plan ``extras=True`` in both."""
    spec, refusal = _DETERMINABLE_STACKS[stack]
    parts = [_peft_part(prefix, layer, rank, seed, **extra) for seed, (prefix, layer, rank, extra) in enumerate(spec)]

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 24), nn.Linear(16, 24))

    if refusal is not None:
        for against in (None, model()):
            with pytest.raises(lorahot.AdapterMismatchError, match=refusal):
                lorahot.plan_targets(parts, against, stacked=True)
        return
    alone, planned = lorahot.plan_targets(parts, stacked=True), lorahot.plan_targets(parts, model(), stacked=True)
    assert (alone.ranks, alone.max_rank, alone.extras, alone.merged_only) == (
        planned.ranks,
        planned.max_rank,
        planned.extras,
        planned.merged_only,
    )
    assert alone.inject_options() == planned.inject_options() and sorted(alone.targets) == sorted(planned.targets)
    lorahot.inject(model(), alone.targets, **alone.inject_options()).load(parts)  # the plan loads the stack
