"""A corpus of broken and hostile adapters: each raises the right :class:`lorahot.LoraError`.

Every case starts from a runtime with two slots, a valid adapter in each (slot 0 active), and
tries the bad adapter three ways: ``load`` into the active slot, ``load`` into the other slot,
and ``preload``. Each must raise the case's error type with a message naming the problem, and
afterwards every arena buffer (A, B, S of every region), the slot bookkeeping, the host cache
and the model output must be bitwise what they were.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save, save_file

import lorahot
from lorahot import AdapterMismatchError, AdapterReadError, SourceNotFoundError, UnknownFormatError, UsageError
from lorahot.io import safety
from tests.reliability_helpers import (
    HANG_S,
    MAX_RANK,
    Q0,
    V1,
    Rig,
    assemble,
    assert_unchanged,
    build_rig,
    entry,
    report,
    snapshot,
    split,
    valid_tensors,
    within,
    write_valid,
)

P = "base_model.model."
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Case:
    """One bad adapter: how to build it, the error it must raise, a regex its message matches."""

    id: str
    build: Callable[[Path, Rig], tuple[Any, dict[str, Any]]]
    error: type[lorahot.LoraError]
    match: str
    marks: tuple[Any, ...] = ()


CASES: list[Case] = []


def case(id: str, error: type[lorahot.LoraError], match: str, *marks: Any) -> Callable:
    def register(build: Callable[[Path, Rig], tuple[Any, dict[str, Any]]]) -> Callable:
        CASES.append(Case(id, build, error, match, marks))
        return build

    return register


# -- helpers ---------------------------------------------------------------------------------


def _file(tmp: Path, blob: bytes, name: str = "adapter_model.safetensors") -> tuple[Path, dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_bytes(blob)
    return tmp / name, {}


def _valid_blob(rig: Rig, rank: int = 4) -> bytes:
    return save({k: v.contiguous() for k, v in valid_tensors(rig.model, rank).items()})


def _tensors_dir(
    tmp: Path, tensors: dict[str, torch.Tensor], config: dict | str | bytes | None = None
) -> tuple[Path, dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"))
    if config is not None:
        raw = config if isinstance(config, (str, bytes)) else json.dumps(config)
        (tmp / "adapter_config.json").write_bytes(raw.encode() if isinstance(raw, str) else raw)
    return tmp, {}


def _replace(
    rig: Rig, key_suffix: str, fn: Callable[[torch.Tensor], torch.Tensor], rank: int = 4
) -> dict[str, torch.Tensor]:
    tensors = valid_tensors(rig.model, rank)
    key = next(k for k in tensors if k.endswith(key_suffix))
    tensors[key] = fn(tensors[key])
    return tensors


# -- file damage -----------------------------------------------------------------------------


@case("truncated_data", AdapterReadError, "truncated")
def _(tmp, rig):
    blob = _valid_blob(rig)
    return _file(tmp, blob[: len(blob) - 100])


@case("truncated_in_header", AdapterReadError, "truncated")
def _(tmp, rig):
    return _file(tmp, _valid_blob(rig)[:40])


@case("corrupted_header_bytes", AdapterReadError, "not valid JSON")
def _(tmp, rig):
    blob = bytearray(_valid_blob(rig))
    blob[9:25] = b"\xff" * 16
    return _file(tmp, bytes(blob))


@case("header_not_an_object", AdapterReadError, "not an object")
def _(tmp, rig):
    return _file(tmp, assemble([1, 2, 3]))


@case("absurd_header_length", AdapterReadError, "header declares 9223372036854775807 bytes")
def _(tmp, rig):
    return _file(tmp, struct.pack("<Q", 2**63 - 1) + b"{}")


@case("absurd_tensor_size", AdapterReadError, "needs 70368744177664 bytes")
def _(tmp, rig):
    # 2**22 x 2**22 float32 = 64 TiB declared, with offsets claiming only 64 bytes
    return _file(
        tmp,
        assemble(
            {P + Q0 + ".lora_A.weight": {"dtype": "F32", "shape": [2**22, 2**22], "data_offsets": [0, 64]}}, b"\0" * 64
        ),
    )


@case("absurd_offsets_past_end", AdapterReadError, "past the end of the file")
def _(tmp, rig):
    header = {P + Q0 + ".lora_A.weight": entry("F32", [2**20, 2**20], 0)}
    return _file(tmp, assemble(header, b"\0" * 64))


@case("overlapping_tensors", AdapterReadError, "overlaps")
def _(tmp, rig):
    header = {P + Q0 + ".lora_A.weight": entry("F32", [4, 16], 0), P + Q0 + ".lora_B.weight": entry("F32", [16, 4], 0)}
    return _file(tmp, assemble(header, b"\0" * 256))


@case("gap_between_tensors", AdapterReadError, "gap")
def _(tmp, rig):
    header = {
        P + Q0 + ".lora_A.weight": entry("F32", [4, 16], 0),
        P + Q0 + ".lora_B.weight": entry("F32", [16, 4], 512),
    }
    return _file(tmp, assemble(header, b"\0" * 768))


@case("empty_file", AdapterReadError, "too short")
def _(tmp, rig):
    return _file(tmp, b"")


@case("huge_metadata", AdapterReadError, "__metadata__ holds")
def _(tmp, rig):
    header, data = split(_valid_blob(rig))
    header["__metadata__"] = {"ss_tag_frequency": "x" * (safety.MAX_METADATA_BYTES + 1)}
    return _file(tmp, assemble(header, data))


@case("header_over_cap", AdapterReadError, "more than the")
def _(tmp, rig):
    header, data = split(_valid_blob(rig))
    header["__metadata__"] = {f"k{i}": "y" * 1000 for i in range(safety.MAX_HEADER_BYTES // 1000 + 10)}
    return _file(tmp, assemble(header, data))


@case("metadata_not_strings", AdapterReadError, "__metadata__ must map strings to strings")
def _(tmp, rig):
    header, data = split(_valid_blob(rig))
    header["__metadata__"] = {"r": 8}
    return _file(tmp, assemble(header, data))


@case("duplicate_header_key", AdapterReadError, "duplicate key")
def _(tmp, rig):
    header, data = split(_valid_blob(rig))
    k, v = next(iter(header.items()))
    text = json.dumps(header)[:-1] + f", {json.dumps(k)}: {json.dumps(v)}}}"
    return _file(tmp, assemble(text, data))


@case("unknown_dtype", AdapterReadError, "unsupported dtype 'F128'")
def _(tmp, rig):
    header, data = split(_valid_blob(rig))
    next(iter(e for k, e in header.items() if k != "__metadata__"))["dtype"] = "F128"
    return _file(tmp, assemble(header, data))


@case("no_tensors", UnknownFormatError, "holds no tensors")
def _(tmp, rig):
    return _file(tmp, assemble({}))


# -- bad tensors -----------------------------------------------------------------------------


@case(
    "int_dtype",
    AdapterReadError,
    r"A has dtype torch\.int32; LoRA weights must be float16, bfloat16, float32 or float64",
)
def _(tmp, rig):
    return _tensors_dir(tmp, _replace(rig, "q_proj.lora_A.weight", lambda t: (t * 100).to(torch.int32)))


@case("bool_dtype", AdapterReadError, r"B has dtype torch\.bool")
def _(tmp, rig):
    return _tensors_dir(tmp, _replace(rig, "v_proj.lora_B.weight", lambda t: t > 0))


@case("float8_nan_values", AdapterReadError, r"NaN or Inf in LoRA weights of:\n  - layers\.0\.self_attn\.q_proj")
def _(tmp, rig):  # a float8 file is read widened to float32 (lorahot.io.dtypes.widened): its NaN stays one
    def nan_float8(t: torch.Tensor) -> torch.Tensor:
        return t.index_fill(1, torch.tensor([3]), float("nan")).to(torch.float8_e4m3fn)

    return _tensors_dir(tmp, _replace(rig, "q_proj.lora_A.weight", nan_float8))


@case("complex_dtype", AdapterReadError, r"B has dtype torch\.complex64")
def _(tmp, rig):
    return _tensors_dir(tmp, _replace(rig, "q_proj.lora_B.weight", lambda t: t.to(torch.complex64)))


@case(
    "meta_tensors_in_mapping",
    AdapterReadError,
    r"A is a torch\.strided tensor on meta; LoRA weights must be dense tensors with data",
)
def _(tmp, rig):
    return {k: torch.empty_like(v, device="meta") for k, v in valid_tensors(rig.model, 4).items()}, {}


@case("sparse_tensors_in_mapping", AdapterReadError, r"is a torch\.sparse_coo tensor")
def _(tmp, rig):
    return {k: v.to_sparse() for k, v in valid_tensors(rig.model, 4).items()}, {}


@case(
    "values_overflow_arena_dtype",
    AdapterReadError,
    r"LoRA weights or updates out of the LoRA buffers' range:\n(  - .*\n)+Inject with dtype=torch\.float64",
)
def _(tmp, rig):
    return _tensors_dir(tmp, {k: v.double() * 1e300 for k, v in valid_tensors(rig.model, 4).items()})


@case("nan_values", AdapterReadError, r"NaN or Inf in LoRA weights of:\n  - layers\.0\.self_attn\.q_proj")
def _(tmp, rig):
    return _tensors_dir(
        tmp, _replace(rig, "q_proj.lora_A.weight", lambda t: t.index_fill(1, torch.tensor([3]), float("nan")))
    )


@case("inf_values", AdapterReadError, r"NaN or Inf in LoRA weights of:\n  - layers\.1\.self_attn\.v_proj")
def _(tmp, rig):
    return _tensors_dir(
        tmp, _replace(rig, "v_proj.lora_B.weight", lambda t: t.index_fill(0, torch.tensor([0]), float("-inf")))
    )


@case("one_d_tensor", AdapterMismatchError, r"lora_A\.weight has shape \(64,\), but a LoRA A and B have at least two")
def _(tmp, rig):
    return _tensors_dir(tmp, _replace(rig, "q_proj.lora_A.weight", lambda t: t.flatten()))


@case("six_d_tensor", AdapterMismatchError, r"A has shape \(4, 16, 1, 1, 1, 1\), expected \(r, 16\)")
def _(tmp, rig):
    return _tensors_dir(tmp, _replace(rig, "q_proj.lora_A.weight", lambda t: t.reshape(4, 16, 1, 1, 1, 1)))


@case(
    "zero_rank_tensors",
    AdapterMismatchError,
    r"1 LoRA module\(s\) of rank 0:\n  - layers\.0\.self_attn\.q_proj: .*lora_A\.weight \[0, 16\]",
)
def _(tmp, rig):
    tensors = valid_tensors(rig.model, 4)
    tensors[P + Q0 + ".lora_A.weight"] = torch.zeros(0, 16)
    tensors[P + Q0 + ".lora_B.weight"] = torch.zeros(16, 0)
    return _tensors_dir(tmp, tensors)


@case("zero_length_in_features", AdapterMismatchError, r"A has shape \(4, 0\), expected \(r, 16\)")
def _(tmp, rig):
    return _tensors_dir(tmp, _replace(rig, "q_proj.lora_A.weight", lambda t: t[:, :0]))


@case("wrong_in_features", AdapterMismatchError, r"A has shape \(4, 15\), expected \(r, 16\)")
def _(tmp, rig):
    return _tensors_dir(tmp, _replace(rig, "q_proj.lora_A.weight", lambda t: t[:, :15]))


@case("wrong_out_features", AdapterMismatchError, r"B has shape \(17, 4\), expected \(16, 4\)")
def _(tmp, rig):
    return _tensors_dir(tmp, _replace(rig, "q_proj.lora_B.weight", lambda t: torch.cat([t, t[:1]])))


@case("a_b_rank_disagree", AdapterMismatchError, r"B has shape \(16, 3\), expected \(16, 4\) for rank 4")
def _(tmp, rig):
    return _tensors_dir(tmp, _replace(rig, "v_proj.lora_B.weight", lambda t: t[:, :3]))


# -- structure -------------------------------------------------------------------------------


@case("rank_over_max_rank", AdapterMismatchError, rf"rank 16 > max_rank {MAX_RANK}; inject with max_rank >= 16")
def _(tmp, rig):
    return _tensors_dir(tmp, valid_tensors(rig.model, 16))


@case("lora_A_without_lora_B", AdapterMismatchError, r"layers\.1\.self_attn\.v_proj.*lora_B")
def _(tmp, rig):
    tensors = valid_tensors(rig.model, 4)
    del tensors[P + V1 + ".lora_B.weight"]
    return _tensors_dir(tmp, tensors)


@case(
    "module_not_injected",
    AdapterMismatchError,
    r"layers\.0\.self_attn\.k_proj: matches no injected layer \(closest: .*q_proj",
)
def _(tmp, rig):
    tensors = valid_tensors(rig.model, 4)
    tensors[P + "layers.0.self_attn.k_proj.lora_A.weight"] = tensors[P + Q0 + ".lora_A.weight"].clone()
    tensors[P + "layers.0.self_attn.k_proj.lora_B.weight"] = tensors[P + Q0 + ".lora_B.weight"].clone()
    return _tensors_dir(tmp, tensors)


@case("module_of_another_model", AdapterMismatchError, r"transformer\.h\.0\.attn\.c_attn: matches no injected layer")
def _(tmp, rig):
    return _tensors_dir(
        tmp,
        {
            P + "transformer.h.0.attn.c_attn.lora_A.weight": torch.randn(4, 16),
            P + "transformer.h.0.attn.c_attn.lora_B.weight": torch.randn(48, 4),
        },
    )


@case("two_keys_one_module", AdapterMismatchError, r"lands on layers\.0\.self_attn\.q_proj, which .* already fills")
def _(tmp, rig):
    tensors = valid_tensors(rig.model, 4)
    tensors[P + "0.self_attn.q_proj.lora_A.weight"] = tensors[P + Q0 + ".lora_A.weight"].clone()
    tensors[P + "0.self_attn.q_proj.lora_B.weight"] = tensors[P + Q0 + ".lora_B.weight"].clone()
    return _tensors_dir(tmp, tensors)


@case("two_tensors_one_role", UnknownFormatError, r"a second A for module")
def _(tmp, rig):
    tensors = valid_tensors(rig.model, 4)
    tensors[P + Q0 + ".lora_A.default.weight"] = tensors[P + Q0 + ".lora_A.weight"].clone()
    return _tensors_dir(tmp, tensors)


@case(
    "short_name_without_its_block",  # no block index: it lands in no block, not one of every block
    AdapterMismatchError,
    r"self_attn\.q_proj: matches no injected layer \(closest: layers\.\d\.self_attn\.q_proj",
)
def _(tmp, rig):
    return _tensors_dir(
        tmp,
        {"self_attn.q_proj.lora_A.weight": torch.randn(4, 16), "self_attn.q_proj.lora_B.weight": torch.randn(16, 4)},
    )


@case("unknown_naming", UnknownFormatError, r"foo\.bar\.weight")
def _(tmp, rig):
    return _tensors_dir(tmp, {"foo.bar.weight": torch.randn(4, 16), "foo.baz.weight": torch.randn(16, 4)})


@case("dora_magnitude_wrong_length", AdapterMismatchError, r"DoRA magnitude vector has shape \(17,\), expected 16")
def _(tmp, rig):
    tensors = valid_tensors(rig.model, 4)
    tensors[P + Q0 + ".lora_magnitude_vector"] = torch.ones(17)
    return _tensors_dir(tmp, tensors)


@case("dora_magnitude_nan", AdapterReadError, r"DoRA magnitude has largest \|value\| nan")
def _(tmp, rig):
    tensors = valid_tensors(rig.model, 4)
    tensors[P + Q0 + ".lora_magnitude_vector"] = torch.full((16,), float("nan"))
    return _tensors_dir(tmp, tensors)


@case("lora_bias_inf", AdapterReadError, r"LoRA bias has largest \|value\| inf")
def _(tmp, rig):
    tensors = valid_tensors(rig.model, 4)
    tensors[P + Q0 + ".lora_B.bias"] = torch.full((16,), float("inf"))
    return _tensors_dir(tmp, tensors)


# -- alpha -----------------------------------------------------------------------------------


def _config_case(id: str, error: type, match: str, config: Any, *marks: Any) -> None:
    case(id, error, match, *marks)(lambda tmp, rig: _tensors_dir(tmp, valid_tensors(rig.model, 4), config))


_config_case(
    "alpha_nan", AdapterReadError, r"lora_alpha must be a finite number, got nan", '{"r": 4, "lora_alpha": NaN}'
)
_config_case(
    "alpha_inf", AdapterReadError, r"lora_alpha must be a finite number, got inf", '{"r": 4, "lora_alpha": Infinity}'
)
_config_case(
    "alpha_pattern_minus_inf",
    AdapterReadError,
    r"alpha_pattern\['q_proj'\] must be a finite number, got -inf",
    '{"r": 4, "alpha_pattern": {"q_proj": -Infinity}}',
)


def _kohya(rig: Rig, alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    a, b = valid_tensors(rig.model, 4, names=(Q0,)).values()
    stem = "lora_unet_" + Q0.replace(".", "_")
    return {f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b, f"{stem}.alpha": alpha}


@case(
    "kohya_alpha_wrong_shape",
    AdapterReadError,
    r"q_proj\.alpha: alpha must be one finite number other than 0, got shape \(2, 2\)",
)
def _(tmp, rig):
    return _tensors_dir(tmp, _kohya(rig, torch.ones(2, 2)))


@case("kohya_alpha_zero", AdapterReadError, r"alpha")
def _(tmp, rig):
    return _tensors_dir(tmp, _kohya(rig, torch.tensor(0.0)))


@case("kohya_alpha_nan", AdapterReadError, r"alpha")
def _(tmp, rig):
    return _tensors_dir(tmp, _kohya(rig, torch.tensor(float("nan"))))


# -- adapter_config.json ---------------------------------------------------------------------


_config_case(
    "config_malformed_json",
    AdapterReadError,
    r"adapter_config\.json: the adapter config is not valid JSON",
    '{"r": 4, "lora_alpha": ',
)
_config_case("config_not_object", AdapterReadError, r"must be a JSON object, got list", "[4, 8]")
_config_case("config_not_utf8", AdapterReadError, r"not valid JSON", b'{"r": 4, "x": "\xff\xfe"}')
_config_case("config_nested_too_deep", AdapterReadError, r"nested too deep", "[" * 100_000 + "]" * 100_000)
_config_case(
    "config_huge",
    AdapterReadError,
    r"more than the 1048576 lorahot reads",
    json.dumps({"r": 4, "notes": "z" * (2 << 20)}),
)
_config_case("config_rank_negative", AdapterReadError, r"r must be an integer in 1\.\.65536, got -4", {"r": -4})
_config_case(
    "config_rank_absurd", AdapterReadError, r"r must be an integer in 1\.\.65536, got 1000000000000", {"r": 10**12}
)
_config_case("config_rank_string", AdapterReadError, r"r must be an integer .* got '4'", {"r": "4"})
_config_case(
    "config_flag_not_bool",
    AdapterReadError,
    r"use_rslora must be true or false, got 'yes'",
    {"r": 4, "use_rslora": "yes"},
)
_config_case(
    "config_contradicts_rank",
    AdapterMismatchError,
    r"adapter_config\.json says r=8, but .* has shape \(4, 16\)",
    {"r": 8, "lora_alpha": 8},
)
_config_case(
    "config_pattern_contradicts_rank", AdapterMismatchError, r"says r=2", {"r": 4, "rank_pattern": {"v_proj": 2}}
)


# -- sources ---------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the file at ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _pickle_file(tmp: Path, name: str) -> tuple[Path, dict]:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_bytes(pickle.dumps({"payload": _Payload(tmp / "PWNED")}))
    return tmp / name, {}


@case("pickle_bin_file", AdapterReadError, r"\.bin files are pickles, and lorahot never unpickles")
def _(tmp, rig):
    return _pickle_file(tmp, "adapter_model.bin")


@case("pickle_pt_file", AdapterReadError, r"never unpickles")
def _(tmp, rig):
    return _pickle_file(tmp, "lora.pt")


@case("pickle_named_safetensors", AdapterReadError, r"not a valid safetensors file")
def _(tmp, rig):
    return _pickle_file(tmp, "adapter_model.safetensors")


@case("torch_save_named_safetensors", AdapterReadError, r"not a valid safetensors file")
def _(tmp, rig):
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(valid_tensors(rig.model, 4), tmp / "adapter_model.safetensors")
    return tmp / "adapter_model.safetensors", {}


@case("directory_of_pickles", AdapterReadError, r"holds only pickle checkpoints \(adapter_model\.bin\)")
def _(tmp, rig):
    _pickle_file(tmp, "adapter_model.bin")
    return tmp, {}


@case("directory_without_adapter", SourceNotFoundError, r"no adapter weights found")
def _(tmp, rig):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "README.md").write_text("not an adapter")
    return tmp, {}


@case("missing_path", SourceNotFoundError, r"no such file or directory")
def _(tmp, rig):
    return tmp / "does-not-exist", {}


@case("weight_name_missing", SourceNotFoundError, r"weight_name='nope\.safetensors' does not exist")
def _(tmp, rig):
    _tensors_dir(tmp, valid_tensors(rig.model, 4))
    return tmp, {"weight_name": "nope.safetensors"}


@case("malformed_hub_id_double_slash", SourceNotFoundError, r"org//name")
def _(tmp, rig):
    return "org//name", {}


@case("malformed_hub_id_too_many_parts", SourceNotFoundError, r"a/b/c/d/e")
def _(tmp, rig):
    return "a/b/c/d/e", {}


@case("malformed_hub_id_bad_chars", SourceNotFoundError, r"org/na me\?x")
def _(tmp, rig):
    return "org/na me?x", {}


def _outside(tmp: Path, rig: Rig) -> Path:
    """A valid adapter beside (not inside) ``tmp / "repo"``, which traversal would reach."""
    write_valid(tmp / "outside", rig.model, {Q0: 4})
    (tmp / "repo").mkdir(parents=True, exist_ok=True)
    write_valid(tmp / "repo" / "sub", rig.model, {Q0: 4})
    return tmp / "repo"


@case("traversal_weight_name", SourceNotFoundError, r"\.\./outside")
def _(tmp, rig):
    return _outside(tmp, rig), {"weight_name": "../outside/adapter_model.safetensors"}


@case("traversal_weight_name_absolute", SourceNotFoundError, r"weight_name")
def _(tmp, rig):
    repo = _outside(tmp, rig)
    return repo, {"weight_name": str((tmp / "outside" / "adapter_model.safetensors").resolve())}


@case("traversal_subfolder", SourceNotFoundError, r"\.\./outside")
def _(tmp, rig):
    return _outside(tmp, rig), {"subfolder": "../outside"}


@case("traversal_hub_subfolder", SourceNotFoundError, r"\.\./\.\./etc")
def _(tmp, rig):
    return "org/name", {"subfolder": "../../etc"}


@case("mapping_of_non_tensors", AdapterReadError, r"not str -> torch\.Tensor")
def _(tmp, rig):
    return {P + Q0 + ".lora_A.weight": [[1.0] * 16] * 4, P + Q0 + ".lora_B.weight": "x"}, {}


# -- not regular files, unusable paths -------------------------------------------------------


@case(
    "fifo_as_weight_file",
    AdapterReadError,
    r"adapter_model\.safetensors: the safetensors file is a FIFO \(named pipe\), not a regular file",
)
def _(tmp, rig):
    tmp.mkdir(parents=True, exist_ok=True)
    os.mkfifo(tmp / "adapter_model.safetensors")  # open() on it would wait for a writer forever
    return tmp, {}


@case("fifo_as_config", AdapterReadError, r"adapter_config\.json: the adapter config is a FIFO \(named pipe\)")
def _(tmp, rig):
    _tensors_dir(tmp, valid_tensors(rig.model, 4))
    os.mkfifo(tmp / "adapter_config.json")
    return tmp, {}


@case("fifo_as_source", SourceNotFoundError, r"lora\.safetensors: is a FIFO \(named pipe\), not an adapter file")
def _(tmp, rig):
    tmp.mkdir(parents=True, exist_ok=True)
    os.mkfifo(tmp / "lora.safetensors")
    return tmp / "lora.safetensors", {}


@case("directory_named_like_weights", AdapterReadError, r"safetensors file is a directory, not a regular file")
def _(tmp, rig):
    (tmp / "adapter_model.safetensors").mkdir(parents=True)
    return tmp, {}


@case("config_dangling_symlink", AdapterReadError, r"adapter_config\.json: is a dangling symlink")
def _(tmp, rig):
    _tensors_dir(tmp, valid_tensors(rig.model, 4))
    (tmp / "adapter_config.json").symlink_to(tmp / "gone.json")
    return tmp, {}


@case("path_name_too_long", SourceNotFoundError, r"cannot open the adapter path \(File name too long\)")
def _(tmp, rig):
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp / ("a" * 300 + ".safetensors"), {}  # a name over NAME_MAX (255)


@case("empty_source_string", UsageError, r"source='' is empty")
def _(tmp, rig):
    return "", {}


@case("tensor_key_too_long", AdapterReadError, r"tensor key 'x+\.\.\. is 5000 characters long, more than 1024")
def _(tmp, rig):
    return _tensors_dir(tmp, {**valid_tensors(rig.model, 4), "x" * 5000: torch.zeros(1)})


@case(
    "zero_element_tensor_with_huge_dims",
    AdapterReadError,
    r"shape \[0, 9223372036854775808\] has dimensions whose product exceeds",
)
def _(tmp, rig):
    header, data = split(_valid_blob(rig))
    header[P + Q0 + ".lora_A.weight"] = {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}
    header[P + Q0 + ".lora_B.weight"] = {"dtype": "F32", "shape": [16, 0], "data_offsets": [0, 0]}
    return _file(tmp, assemble(header, data))


# -- regexes from the file (rank_pattern / alpha_pattern) -----------------------------------


@case("rank_pattern_catastrophic_backtracking", AdapterMismatchError, r"adapter_config\.json says r=8")
def _(tmp, rig):
    # Python's re needs ~2**25 steps per module name for this key; RE2 one pass. It matches no
    # module, so r=8 applies and contradicts the rank-4 tensors: the load must get that far, fast.
    return _tensors_dir(tmp, valid_tensors(rig.model, 4), {"r": 8, "rank_pattern": {"((a|.)*)*#": 2}})


@case(
    "rank_pattern_lookahead",
    AdapterReadError,
    r"adapter_config\.json: invalid adapter config: rank_pattern key '\(\?=q\)q_proj' uses a lookahead or "
    r"lookbehind, which RE2 cannot evaluate in linear time \(write each key as a module name",
)
def _(tmp, rig):
    return _tensors_dir(tmp, valid_tensors(rig.model, 4), {"r": 4, "rank_pattern": {"(?=q)q_proj": 2}})


@case("rank_pattern_backreference", AdapterReadError, r"rank_pattern key '\(q\)\\\\1' uses a backreference")
def _(tmp, rig):
    return _tensors_dir(tmp, valid_tensors(rig.model, 4), {"r": 4, "rank_pattern": {r"(q)\1": 2}})


@case(
    "alpha_pattern_huge_repetition",
    AdapterReadError,
    r"alpha_pattern key 'q\{4294967296\}' is not a valid regex \(Python: the repetition number is too large\)",
)
def _(tmp, rig):
    return _tensors_dir(tmp, valid_tensors(rig.model, 4), {"r": 4, "alpha_pattern": {"q{4294967296}": 2}})


@case("rank_pattern_deep_nesting", AdapterReadError, r"rank_pattern key '\(\(\(.* is 10001 bytes long, more than")
def _(tmp, rig):
    return _tensors_dir(tmp, valid_tensors(rig.model, 4), {"r": 4, "rank_pattern": {"(" * 5000 + "q" + ")" * 5000: 2}})


# -- JSON inside the safetensors header --------------------------------------------------------


@case(
    "adapter_metadata_nested_too_deep",
    AdapterReadError,
    r"lora_adapter_metadata entry of the safetensors header is not valid JSON \(nested too deep: 100000 levels",
)
def _(tmp, rig):
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in valid_tensors(rig.model, 4).items()}
    save_file(tensors, str(tmp / "adapter_model.safetensors"), {"lora_adapter_metadata": "[" * 100_000 + "]" * 100_000})
    return tmp, {}


@case(
    "kohya_alpha_complex",
    AdapterReadError,
    r"q_proj\.alpha: alpha must be one finite number other than 0, got dtype torch\.c",
)
def _(tmp, rig):
    return _tensors_dir(tmp, _kohya(rig, torch.tensor(2.0 + 1.0j, dtype=torch.complex64)))


@case(
    "ldm_block_with_unknown_layer_index",
    AdapterMismatchError,
    r"lora_unet_output_blocks_2_5_proj_in: matches no injected layer",
)
def _(tmp, rig):
    a, b = valid_tensors(rig.model, 4, names=(Q0,)).values()
    stem = "lora_unet_output_blocks_2_5_proj_in"  # SD's output blocks have layers 0..2 only
    return _tensors_dir(tmp, {f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b})


# -- PEFT features lorahot does not load ----------------------------------------------------

_EXPERTS = "layers.0.mlp.experts"


@case(
    "moe_expert_parameters_config",
    UnknownFormatError,
    r'target_parameters=\["layers\.0\.mlp\.experts\.gate_up_proj"\]; LoRA on parameters such as MoE experts',
)
def _(tmp, rig):
    # PEFT's ParamWrapper: A [r * num_experts, in], B [out, r * num_experts] under the module
    tensors = {
        P + _EXPERTS + ".lora_A.weight": torch.randn(16, 16),
        P + _EXPERTS + ".lora_B.weight": torch.randn(32, 16),
    }
    return _tensors_dir(tmp, tensors, {"r": 4, "target_parameters": [_EXPERTS + ".gate_up_proj"]})


@case(
    "moe_expert_parameters_keys_only",
    UnknownFormatError,
    r"experts\.base_layer\.lora_A\.weight: LoRA on parameters such as MoE experts \(PEFT target_parameters\)",
)
def _(tmp, rig):
    # two target_parameters on one module: PEFT nests the wrappers (base_layer.lora_A)
    tensors = {
        P + _EXPERTS + ".base_layer.lora_A.weight": torch.randn(16, 16),
        P + _EXPERTS + ".base_layer.lora_B.weight": torch.randn(32, 16),
        P + _EXPERTS + ".lora_A.weight": torch.randn(16, 32),
        P + _EXPERTS + ".lora_B.weight": torch.randn(16, 16),
    }
    return _tensors_dir(tmp, tensors)


@case("modules_to_save_config", UnknownFormatError, r'modules_to_save=\["lm_head"\]; full copies of these modules')
def _(tmp, rig):
    tensors = {**valid_tensors(rig.model, 4), P + "lm_head.weight": torch.randn(32, 16)}
    return _tensors_dir(tmp, tensors, {"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]})


@case(
    "modules_to_save_keys_only",
    UnknownFormatError,
    r"lm_head\.weight: full weights of module 'base_model\.model\.lm_head', not LoRA weights \(PEFT saves these for "
    r"modules_to_save",
)
def _(tmp, rig):
    return _tensors_dir(tmp, {**valid_tensors(rig.model, 4), P + "lm_head.weight": torch.randn(32, 16)})


@case(
    "trainable_tokens_config",
    UnknownFormatError,
    r'trainable_token_indices=\{"embed_tokens": \[1, 2\]\}; trainable tokens',
)
def _(tmp, rig):
    tensors = {
        **valid_tensors(rig.model, 4),
        P + "embed_tokens.token_adapter.trainable_tokens_delta": torch.randn(2, 16),
    }
    return _tensors_dir(tmp, tensors, {"r": 4, "trainable_token_indices": {"embed_tokens": [1, 2]}})


@case(
    "trainable_tokens_keys_only",
    UnknownFormatError,
    r"token_adapter\.trainable_tokens_delta: trainable tokens \(PEFT trainable_token_indices\)",
)
def _(tmp, rig):
    tensors = {
        **valid_tensors(rig.model, 4),
        P + "embed_tokens.token_adapter.trainable_tokens_delta": torch.randn(2, 16),
    }
    return _tensors_dir(tmp, tensors)


# -- prefix= matches whole name components ----------------------------------------------------


@case(
    "prefix_does_not_select_a_longer_component",
    UsageError,
    r"prefix='text_encoder' matches no module key; keys start with text_encoder_2 ",
)
def _(tmp, rig):
    # a text_encoder_2-only file must not load into text_encoder through prefix + '_'
    tensors = {"text_encoder_2." + k.removeprefix(P): v for k, v in valid_tensors(rig.model, 4).items()}  # diffusers
    path, _ = _tensors_dir(tmp, tensors)
    return path, {"prefix": "text_encoder"}


# -- the tests -------------------------------------------------------------------------------


def test_corpus_size() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No case may reach the network: the Hub client is put in offline mode."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass


@pytest.mark.parametrize("c", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_adapter_raises_and_changes_nothing(c: Case, tmp_path: Path, offline: None) -> None:
    rig = build_rig(tmp_path / "rig")
    source, kwargs = c.build(tmp_path / "case", rig)
    before = snapshot(rig)
    attempts = [
        lambda: rig.runtime.load(source, slot=0, **kwargs),
        lambda: rig.runtime.load(source, slot=1, **kwargs),
        lambda: rig.runtime.preload(source, **kwargs),
    ]
    for attempt in attempts:
        with pytest.raises(c.error, match=c.match):
            within(HANG_S, attempt)  # a hang (FIFO, backtracking regex) fails instead of stalling
        assert_unchanged(rig, before)
    assert not (tmp_path / "case" / "PWNED").exists(), "a pickle payload ran"


def test_ambiguous_kohya_name_in_a_model_that_has_both_spellings(tmp_path: Path) -> None:
    """kohya turns every ``.`` into ``_``: ``attn_out.proj`` and ``attn.out_proj`` collide."""

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_out = torch.nn.Module()
            self.attn_out.proj = torch.nn.Linear(16, 16)
            self.attn = torch.nn.Module()
            self.attn.out_proj = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn_out.proj(x) + self.attn.out_proj(x)

    model = Two()
    runtime = lorahot.inject(model, ["proj", "out_proj"], max_rank=8, slots=2)
    tensors = {
        "lora_unet_attn_out_proj.lora_down.weight": torch.randn(4, 16),
        "lora_unet_attn_out_proj.lora_up.weight": torch.randn(16, 4),
    }
    before = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S)]
    with pytest.raises(AdapterMismatchError, match=r"ambiguous"):
        runtime.load(tensors)
    assert all(torch.equal(t, u) for t, u in zip((t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S)), before))


def test_damaged_files_are_refused_before_the_parser_sees_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header checks run first: safetensors is never handed a file they refuse."""
    import safetensors

    def parser_called(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("safetensors.safe_open was called on a damaged file")

    rig = build_rig(tmp_path / "rig")
    monkeypatch.setattr(safetensors, "safe_open", parser_called)
    damaged = [c for c in CASES if c.id in _HEADER_CASES]
    assert len(damaged) == len(_HEADER_CASES)
    for c in damaged:
        source, kwargs = c.build(tmp_path / c.id, rig)
        with pytest.raises(AdapterReadError, match=c.match):
            lorahot.read_adapter(source, **kwargs)


_HEADER_CASES = {
    "truncated_data", "truncated_in_header", "corrupted_header_bytes", "header_not_an_object", "absurd_header_length",
    "absurd_tensor_size", "absurd_offsets_past_end", "overlapping_tensors", "gap_between_tensors", "empty_file",
    "huge_metadata", "header_over_cap", "metadata_not_strings", "duplicate_header_key", "unknown_dtype",
    "pickle_named_safetensors", "torch_save_named_safetensors",
}  # fmt: skip


def test_absurd_declared_sizes_allocate_nothing(tmp_path: Path) -> None:
    """A header declaring 64 TiB costs an error and no memory (peak RSS grows < 64 MiB)."""
    rig = build_rig(tmp_path / "rig")
    path, _ = next(c for c in CASES if c.id == "absurd_tensor_size").build(tmp_path / "case", rig)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(20):
        with pytest.raises(AdapterReadError):
            rig.runtime.load(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 * 1024


def test_missing_config_is_not_an_error(tmp_path: Path) -> None:
    """Without adapter_config.json the tensors decide the rank and alpha defaults to the rank
    (scale 1), as in PEFT: a documented default, not a failure."""
    rig = build_rig(tmp_path / "rig")
    directory, _ = _tensors_dir(tmp_path / "noconfig", valid_tensors(rig.model, 4))
    info = rig.runtime.load(directory, slot=1)
    assert info.ranks == {Q0: 4, V1: 4}
    arena, idx = rig.runtime.buffers.arenas[rig.runtime.buffers.where[Q0][0]], rig.runtime.buffers.where[Q0][1]
    assert set(arena.S[1, idx].tolist()) == {1.0}  # every row of the layer


def test_report_corpus(request: pytest.FixtureRequest) -> None:
    kinds: dict[str, int] = {}
    for c in CASES:
        kinds[c.error.__name__] = kinds.get(c.error.__name__, 0) + 1
    report(request.config, "corpus", {"cases": len(CASES), "by_error": kinds})
