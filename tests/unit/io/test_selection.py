"""target_modules / exclude_modules / layers_to_transform: the modules PEFT builds a layer for.

PEFT's ``from_pretrained`` loads a file's weights only into the modules its config selects and
drops the others without an error; lorahot refuses a module the config leaves out, where it
computed it."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import peft
import pytest
import torch
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists
from safetensors.torch import save_file

import lorahot
from lorahot.io.config import AdapterConfig
from lorahot.io.selection import ModuleSelection
from tests.helpers import tiny_lm, token_ids
from tests.reliability_helpers import within

Q0, V1 = "layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj"

#: config fields that keep q_proj of layer 0 and leave out v_proj of layer 1, as PEFT reads them
_LEAVE_OUT_V1 = {
    "target_modules list": ({"target_modules": ["q_proj"]}, r"target_modules \['q_proj'\] does not name it"),
    "target_modules regex": ({"target_modules": r".*\.q_proj"}, r"target_modules '.\*\\\\.q_proj' does not match"),
    "exclude_modules list": (
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]},
        r"exclude_modules \['v_proj'\] lists it",
    ),
    "exclude_modules regex": (
        {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r"layers\.1\..*"},
        r"exclude_modules 'layers\\\\.1\\\\..\*' matches it",
    ),
    "layers_to_transform": (
        {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0], "layers_pattern": "layers"},
        r"its layer index 1 is not in layers_to_transform \[0\]",
    ),
}


def _peft_dir(tmp_path: Path, fields: dict[str, Any]) -> tuple[Path, dict[str, torch.Tensor]]:
    """A PEFT adapter (rank 2, alpha 4) on q_proj of layer 0 and v_proj of layer 1 of the tiny
    model, saved by PEFT, with ``fields`` written over its adapter_config.json."""
    model = peft.get_peft_model(
        tiny_lm(seed=0, vocab=32),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], layers_to_transform=None),
    )
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, p in model.named_parameters():
        if "lora_" in name and any(n in name for n in (Q0, V1)):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
            tensors[name] = p
    state = peft.get_peft_model_state_dict(model)
    directory = tmp_path / "adapter"
    directory.mkdir()
    save_file(
        {k: v.contiguous() for k, v in state.items() if any(n in k for n in (Q0, V1))},
        directory / "adapter_model.safetensors",
    )
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], **fields}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory, state


def _reference(x: torch.Tensor, state: dict[str, torch.Tensor], keep: tuple[str, ...]) -> torch.Tensor:
    """The tiny model in float64 with the LoRA of the ``keep`` modules alone folded in (scale 2)."""
    model = tiny_lm(seed=0, vocab=32).double()
    with torch.no_grad():
        for name in keep:
            a = state[f"base_model.model.{name}.lora_A.weight"].double()
            b = state[f"base_model.model.{name}.lora_B.weight"].double()
            model.get_submodule(name).weight += 2.0 * b @ a
        return model(x)


def _loads_every_module_as_peft(directory: Path, state: dict[str, torch.Tensor]) -> None:
    """lorahot loads both modules of ``directory``'s file: PEFT's from_pretrained output, and the
    float64 reference with both LoRAs folded in."""
    x = token_ids((2, 5), 32, seed=0)
    with torch.no_grad():
        oracle = peft.PeftModel.from_pretrained(tiny_lm(seed=0, vocab=32), directory)(x)
    model = tiny_lm(seed=0, vocab=32)
    lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4).load(directory)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x).double(), _reference(x, state, (Q0, V1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", sorted(_LEAVE_OUT_V1))
def test_a_module_the_peft_config_leaves_out_is_refused_where_peft_drops_its_weights(tmp_path: Path, case: str) -> None:
    fields, why = _LEAVE_OUT_V1[case]
    directory, state = _peft_dir(tmp_path, fields)
    x = token_ids((2, 5), 32, seed=0)
    with torch.no_grad():
        oracle = peft.PeftModel.from_pretrained(tiny_lm(seed=0, vocab=32), directory)(x)
    want = _reference(x, state, (Q0,))  # PEFT: layer 0's q_proj only, layer 1's v_proj dropped
    torch.testing.assert_close(oracle.double(), want, rtol=1e-5, atol=1e-5)
    assert (want - _reference(x, state, (Q0, V1))).abs().max() > 0.1  # what loading v_proj computes

    model = tiny_lm(seed=0, vocab=32)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4)
    before = {k: v.clone() for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
    with torch.no_grad():
        base_out = model(x)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=rf"(?s){V1}: adapter_config.json's {why}.*drops its weights"
    ):
        runtime.load(directory)
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), base_out)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"{V1}: adapter_config.json's {why}"):
        lorahot.read_adapter(directory)

    # the file's weights all loaded, on the caller's word
    runtime.load(directory, config=dict.fromkeys(fields))
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), _reference(x, state, (Q0, V1)), rtol=1e-5, atol=1e-5)


def test_a_config_that_selects_every_module_of_its_file_loads_as_peft(tmp_path: Path) -> None:
    directory, state = _peft_dir(
        tmp_path,
        {
            "target_modules": ["q_proj", "v_proj"],
            "exclude_modules": ["k_proj"],
            "layers_to_transform": [0, 1],
            "layers_pattern": "layers",
        },
    )
    _loads_every_module_as_peft(directory, state)


def test_keys_without_pefts_wrapper_and_header_configs_are_not_selected(tmp_path: Path) -> None:
    """Keys without ``base_model.model.`` (which from_pretrained loads nowhere) and the configs of
    diffusers' ``lora_adapter_metadata`` (whose loaders build the modules of the file's keys) keep
    every module."""
    a, b = torch.randn(2, 16), torch.randn(16, 2)
    bare = {f"{V1}.lora_A.weight": a, f"{V1}.lora_B.weight": b}
    save_file(bare, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}))
    assert lorahot.read_adapter(tmp_path).ranks == {V1: 2}
    meta = json.dumps({"r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]})
    (tmp_path / "header").mkdir()
    path = tmp_path / "header" / "lora.safetensors"
    save_file({f"base_model.model.{k}": v for k, v in bare.items()}, path, metadata={"lora_adapter_metadata": meta})
    assert lorahot.read_adapter(path).ranks == {V1: 2}


#: module names of LLMs and diffusion models, MoE experts among them
_NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.12.mlp.experts.3.up_proj",
    "model.decoder.layers.1.fc1",
    "transformer.h.2.attn.c_attn",
    "layers.0.self_attn.q_proj",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "q_proj",
    "lm_head",
]
_CONFIGS = [
    {"target_modules": ["q_proj", "up_proj"]},
    {"target_modules": ["self_attn.q_proj", "fc1"], "exclude_modules": ["model.decoder.layers.1.fc1"]},
    {"target_modules": r".*(q_proj|to_q)"},
    {"target_modules": r"model\..*", "exclude_modules": r".*experts.*"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0, 12]},
    {
        "target_modules": ["q_proj", "up_proj", "fc1"],
        "layers_to_transform": 1,
        "layers_pattern": ["decoder.layers", "h"],
    },
    {"target_modules": ["c_attn", "to_q"], "layers_to_transform": [2, 0], "layers_pattern": "h"},
    {"target_modules": ["q_proj"], "exclude_modules": "model.*"},
    {"target_modules": "all-linear", "exclude_modules": ["lm_head"]},
]


@pytest.mark.parametrize("fields", _CONFIGS, ids=json.dumps)
def test_the_selection_is_pefts_check_target_module_exists(fields: dict[str, Any]) -> None:
    config = peft.LoraConfig(r=2, **copy.deepcopy(fields))
    selection = AdapterConfig.from_dict({"r": 2, **fields}).selection
    assert selection is not None
    for name in _NAMES:
        found = check_target_module_exists(config, name)
        if fields["target_modules"] == "all-linear":  # PEFT expands it against the model: every module here
            found = not isinstance(found, _ExcludedModule)
        peft_builds = bool(found) and not isinstance(found, _ExcludedModule)
        assert (selection.leaves_out(name) is None) == peft_builds, (name, selection.leaves_out(name))


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"exclude_modules": 3}, r"exclude_modules must be a string or a list of strings, got 3"),
        ({"layers_to_transform": "0"}, r"layers_to_transform must be an integer or a list of integers, got '0'"),
        ({"layers_to_transform": [True]}, r"layers_to_transform must be an integer or a list of integers"),
        ({"layers_to_transform": [0], "layers_pattern": "lay(ers|x)"}, r"layers_pattern must be a module name"),
        ({"target_modules": "q_pr(oj"}, r"target_modules 'q_pr\(oj' is not a valid regex"),
        ({"exclude_modules": "q_pr[oj"}, r"exclude_modules 'q_pr\[oj' is not a valid regex"),
    ],
)
def test_a_selection_peft_refuses_or_lorahot_cannot_evaluate_is_an_adapter_read_error(
    tmp_path: Path, fields: dict[str, Any], problem: str
) -> None:
    directory, _ = _peft_dir(tmp_path, fields)
    with pytest.raises(lorahot.AdapterReadError, match=rf"adapter_config.json: invalid adapter config: {problem}"):
        lorahot.read_adapter(directory)


@pytest.mark.parametrize("key", ["((a|.)*)*#", "(.*)*(.*)*#"])
def test_a_pathological_target_regex_completes_fast(tmp_path: Path, key: str) -> None:
    """Python's re.fullmatch needs ~2**25 steps per name for these; RE2 one pass."""
    directory, _ = _peft_dir(tmp_path, {"target_modules": key})
    start = time.perf_counter()
    with pytest.raises(lorahot.AdapterMismatchError, match="does not match it"):
        within(10, lambda: lorahot.read_adapter(directory))
    assert time.perf_counter() - start < 5
    assert ModuleSelection.parse({"target_modules": key}, []) is not None


@pytest.mark.parametrize("key", [r"^(?!.*vision).*(q_proj|v_proj)", r".*(?<!vision_tower)\.(q_proj|v_proj)"])
def test_a_peft_config_regex_with_a_lookaround_loads_its_file_as_peft(tmp_path: Path, key: str) -> None:
    """PEFT's configs carry lookarounds (to leave a vision tower out), which RE2 cannot run and
    Python's engine would run in exponential time on a hostile one: such a field is not checked,
    and the file's modules load, as PEFT loads the file it saved. A first version of the
    selection refused them as an invalid config, where every earlier version loaded them."""
    directory, state = _peft_dir(tmp_path, {"target_modules": key})
    _loads_every_module_as_peft(directory, state)


@pytest.mark.parametrize("pattern", ["layers", ["layers", "h"]], ids=json.dumps)
def test_an_empty_layers_to_transform_beside_a_layers_pattern_loads_every_module_as_peft(
    tmp_path: Path, pattern: str | list[str]
) -> None:
    """PEFT refuses a ``layers_pattern`` only where ``layers_to_transform`` is None; an empty
    list selects by no layer index, so PEFT builds every module and loads the whole file. A
    first version of the selection refused such a config as 'layers_pattern is set without
    layers_to_transform', where every earlier version, and PEFT, loaded it."""
    directory, state = _peft_dir(tmp_path, {"layers_to_transform": [], "layers_pattern": pattern})
    x = token_ids((2, 5), 32, seed=0)
    with torch.no_grad():
        oracle = peft.PeftModel.from_pretrained(tiny_lm(seed=0, vocab=32), directory)(x)
    want = _reference(x, state, (Q0, V1))
    torch.testing.assert_close(oracle.double(), want, rtol=1e-5, atol=1e-5)
    model = tiny_lm(seed=0, vocab=32)
    lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4).load(directory)
    with torch.no_grad():
        torch.testing.assert_close(model(x), oracle, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "fields",
    [
        {"layers_pattern": "layers"},
        {"layers_pattern": ["layers", "h"], "layers_to_transform": None},
        {"target_modules": r".*\.(q_proj|v_proj)", "layers_to_transform": [0]},
        {"target_modules": r".*\.(q_proj|v_proj)", "layers_to_transform": [1], "layers_pattern": "layers"},
    ],
    ids=["pattern alone", "patterns, null indexes", "regex with indexes", "regex with indexes and pattern"],
)
def test_layer_fields_peft_reads_nowhere_load_every_selected_module(tmp_path: Path, fields: dict[str, Any]) -> None:
    """PEFT 0.21's LoraConfig refuses a layers_pattern without layers_to_transform, and either
    beside a str target_modules, but earlier versions saved such configs, and its selection
    (check_target_module_exists) reads neither field there: every module the names or the
    regex select is built. A first version of the selection refused these configs, which loaded
    before; they now load every module, at the float64 reference."""
    directory, state = _peft_dir(tmp_path, fields)
    selects = SimpleNamespace(
        exclude_modules=None,
        modules_to_save=None,
        target_parameters=None,
        target_modules=fields.get("target_modules", ["q_proj", "v_proj"]),
        layers_to_transform=fields.get("layers_to_transform"),
        layers_pattern=fields.get("layers_pattern"),
    )
    assert all(check_target_module_exists(selects, name) for name in (Q0, V1))  # PEFT's selection: both
    x = token_ids((2, 5), 32, seed=0)
    model = tiny_lm(seed=0, vocab=32)
    lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4).load(directory)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), _reference(x, state, (Q0, V1)), rtol=1e-5, atol=1e-5)
