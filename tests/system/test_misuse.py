"""A table of bad calls: each raises its typed error with a pinned message, and changes nothing.

Every case starts from the reliability rig (two slots, a valid adapter in each, slot 0
active, one adapter preloaded) and makes one wrong call to a public entry point of
``lorahot.runtime`` (``inject``, ``eject``, every ``LoraRuntime`` operation, ``AdapterCache``).
Afterwards every arena buffer, the slot bookkeeping, the host cache, the model's modules and
its output must be bitwise what they were.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lorahot
from lorahot import UsageError
from lorahot.errors import one_line
from tests.reliability_helpers import Q0, V1, Rig, assert_unchanged, build_rig, snapshot, valid_tensors, write_valid

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Misuse:
    id: str
    call: Callable[[Rig, Path], Any]
    error: type[lorahot.LoraError]
    match: str


def _inject(targets: Any = ("k_proj",), **kwargs: Any) -> Callable[[Rig, Path], Any]:
    args = {"max_rank": 4, **kwargs}
    return lambda rig, tmp: lorahot.inject(rig.model, list(targets) if isinstance(targets, tuple) else targets, **args)


def _other_runtime_prepared(rig: Rig, tmp: Path) -> Any:
    from tests.helpers import tiny_lm

    other = lorahot.inject(tiny_lm(vocab=32), ["q_proj"], max_rank=8)
    return rig.runtime.load(other.preload(valid_tensors(rig.model, 4, names=(Q0,))))


def _beyond_memory(rig: Rig, tmp: Path) -> Any:
    """A petabyte of buffers (a 4 MiB layer, 1M inputs wide): refused before any allocation."""
    wide = torch.nn.Sequential(torch.nn.Linear(1 << 20, 1, bias=False))
    return lorahot.inject(wide, ["0"], max_rank=65536, slots=4096)


def _raising_targets(name: str, module: torch.nn.Module) -> bool:
    raise KeyError(name)


R = "this runtime has slots 0\\.\\.1"

MISUSES = [
    # -- inject ---------------------------------------------------------------------------------
    Misuse("inject_model_not_module", lambda rig, tmp: lorahot.inject("model", ["q_proj"], max_rank=4), UsageError,
           r"^model must be a torch\.nn\.Module, got str\.$"),
    Misuse("inject_max_rank_absurd", _inject(max_rank=10**30), UsageError,
           r"^max_rank=1000000000000000000000000000000 is absurd; it must be at most 65536\.$"),
    Misuse("inject_max_rank_zero", _inject(max_rank=0), UsageError, r"^max_rank=0 must be an integer >= 1\.$"),
    Misuse("inject_max_rank_float", _inject(max_rank=8.0), UsageError, r"^max_rank=8\.0 must be an integer >= 1\.$"),
    Misuse("inject_slots_absurd", _inject(slots=10**12), UsageError,
           r"^slots=1000000000000 is absurd; it must be at most 4096\.$"),
    Misuse("inject_slots_str", _inject(slots="2"), UsageError, r"^slots='2' must be an integer >= 1\.$"),
    Misuse("inject_buffers_beyond_memory", _beyond_memory, UsageError,
           r"^the LoRA buffers need 1,126,176,933,806,336 bytes on cpu \(max_rank=65536, slots=4096\), "
           r"more than its [\d,]+ bytes of memory\. Inject with a smaller max_rank or fewer slots\.$"),
    Misuse("inject_dtype_float8", _inject(dtype=torch.float8_e4m3fn), UsageError,
           r"^dtype=torch\.float8_e4m3fn must be a floating-point torch\.dtype LoRA weights can use: torch\.float16, "
           r"torch\.bfloat16, torch\.float32 or torch\.float64 \(or None: each base weight's dtype\)\.$"),
    Misuse("inject_dtype_complex", _inject(dtype=torch.complex64), UsageError, r"^dtype=torch\.complex64 must be"),
    Misuse("inject_dtype_str", _inject(dtype="float16"), UsageError, r"^dtype='float16' must be a floating-point"),
    Misuse("inject_cache_bytes_str", _inject(cache_bytes="2GB"), UsageError,
           r"^cache_bytes='2GB' must be an int number of bytes >= 0 \(e\.g\. 2 << 30 for 2 GiB\)\.$"),
    Misuse("inject_cache_bytes_negative", _inject(cache_bytes=-1), UsageError, r"^cache_bytes=-1 must be an int"),
    Misuse("inject_max_rank_int_raises", lambda rig, tmp: _inject(max_rank=_RaisingInt(4))(rig, tmp), UsageError,
           r"^max_rank=4 cannot be read as an int \(_RaisingInt\.__int__ raised RuntimeError\); pass an int\.$"),
    Misuse("inject_cache_bytes_int_raises", lambda rig, tmp: _inject(cache_bytes=_RaisingInt(4))(rig, tmp), UsageError,
           r"^cache_bytes=4 cannot be read as an int"),
    Misuse("inject_merged_not_bool", _inject(merged="yes"), UsageError, r"^merged='yes' must be True or False\.$"),
    Misuse("inject_fused_not_bool", _inject(fused=None), UsageError, r"^fused=None must be True or False\.$"),
    Misuse("inject_targets_int", _inject(targets=42), UsageError,
           r"^targets must be a non-empty list of module names, a regex, 'all-linear' or a callable; got 42\.$"),
    Misuse("inject_targets_none", _inject(targets=None), UsageError, r"^targets must be a non-empty list .*got None"),
    Misuse("inject_targets_ints", _inject(targets=[1, 2]), UsageError, r"^targets must be .*; got \[1, 2\]\.$"),
    Misuse("inject_targets_bytes", _inject(targets=b"k_proj"), UsageError, r"^targets must be .*; got b'k_proj'"),
    Misuse("inject_targets_bad_regex", _inject(targets="(k_proj"), UsageError,
           r"^targets='\(k_proj' is not a valid regex \(missing \), unterminated subpattern"),
    Misuse("inject_targets_callable_raises", _inject(targets=_raising_targets), UsageError,
           r"^targets callable raised KeyError on module 'embed_tokens' \(LoRAEmbedding\): 'embed_tokens'\. Fix the "
           r"callable so it returns True or False for every module\.$"),
    Misuse("inject_already_injected", _inject(targets=["q_proj"]), UsageError,
           r"^layers\.0\.self_attn\.q_proj: already a LoRALinear; call lorahot\.eject\(model\) before injecting"),
    Misuse("inject_merged_tied", lambda rig, tmp: lorahot.inject(_tie(rig), ["lm_head"], max_rank=4, merged=True),
           UsageError, r"^lm_head: its weight is tied to embed_tokens\.base_layer \(embed_tokens\.base_layer\.weight "
           r"shares its memory\); merged mode would rewrite both lm_head and embed_tokens\.base_layer\."),
    # -- module-level eject -------------------------------------------------------------------------
    Misuse("eject_not_a_module", lambda rig, tmp: lorahot.eject(rig.runtime), UsageError,
           r"^model must be a torch\.nn\.Module, got LoraRuntime\.$"),
    # -- load ---------------------------------------------------------------------------------------
    Misuse("load_slot_out_of_range", lambda rig, tmp: rig.runtime.load(_t(rig), slot=2), UsageError,
           rf"^slot=2 is out of range; {R} \(inject\(\.\.\., slots=N\) for more\)\.$"),
    Misuse("load_slot_negative", lambda rig, tmp: rig.runtime.load(_t(rig), slot=-1), UsageError, r"^slot=-1 is out"),
    Misuse("load_slot_bool", lambda rig, tmp: rig.runtime.load(_t(rig), slot=True), UsageError,
           r"^slot=True is a bool; a slot is an int in 0\.\.1\.$"),
    Misuse("load_slot_str", lambda rig, tmp: rig.runtime.load(_t(rig), slot="1"), UsageError, r"^slot='1' is a str;"),
    Misuse("load_scale_str", lambda rig, tmp: rig.runtime.load(_t(rig), scale="1"), UsageError,
           r"^scale='1' is not a number: pass a finite real number \(a float\), or a list of them, one per part; not "
           r"str\.$"),
    Misuse("load_scale_array", lambda rig, tmp: rig.runtime.load(_t(rig), scale=np.array([0.5])), UsageError,
           r"^scale=array\(\[0\.5\]\) is a 1-d ndarray, not a list: pass one float, or a list \(or tuple\) of floats "
           r"with one weight per part \(scale=value\.tolist\(\)\)\.$"),
    Misuse("load_stack_scale_tensor", lambda rig, tmp: rig.runtime.load([_t(rig)] * 2, scale=torch.tensor([1.0, 2.0])),
           UsageError, r"^scale=tensor\(\[1\., 2\.\]\) is a 1-d Tensor, not a list: pass one float, or a list"),
    Misuse("load_stack_scale_entry_array", lambda rig, tmp: rig.runtime.load([_t(rig)] * 2, scale=[1.0, np.ones(2)]),
           UsageError, r"^scale\[1\]=array\(\[1\., 1\.\]\) is a 1-d ndarray, not a number: each weight is one "
           r"float\.$"),
    Misuse("load_one_scale_two_weights", lambda rig, tmp: rig.runtime.load(_t(rig), scale=[1.0, 2.0]), UsageError,
           r"^scale has 2 weights but one adapter is a stack of 1 part; pass one weight per part \(in the order "
           r"loaded\), or one number for all\.$"),
    Misuse("load_denoiser_one_model", lambda rig, tmp: rig.runtime.load(_t(rig), denoiser="transformer_2"),
           UsageError, r"^denoiser='transformer_2': this runtime serves one model, which takes every module of a "
           r"file;"),
    Misuse("load_scale_nan", lambda rig, tmp: rig.runtime.load(_t(rig), scale=float("nan")), UsageError,
           r"^scale=nan must be finite\.$"),
    Misuse("load_scale_huge_int", lambda rig, tmp: rig.runtime.load(_t(rig), scale=10**400), UsageError,
           r"^scale=1000000000000000000000000000000000000\.\.\. is too large for a float; pass a finite number\.$"),
    Misuse("load_scale_overflows_buffer", lambda rig, tmp: rig.runtime.load(_t(rig), scale=1e39), UsageError,
           r"^scale=1e\+39 times the adapter's largest alpha/r \(1\) is 1e\+39, beyond the range of the torch\.float32 "
           r"scale buffers \(max 3\.403e\+38\)\. Pass a scale of at most 3\.403e\+38 in magnitude\.$"),
    Misuse("load_scale_underflows_buffer", lambda rig, tmp: rig.runtime.load(_t(rig), scale=1e-39), UsageError,
           r"^scale=1e-39 times the adapter's smallest alpha/r \(1\) is 1e-39, below the smallest normal number of "
           r"the torch\.float32 scale buffers \(1\.175e-38\), where it would lose its precision\. Pass a scale of at "
           r"least 1\.177e-38 in magnitude, or 0\.$"),
    Misuse("load_unknown_option", lambda rig, tmp: rig.runtime.load(_t(rig), foo=1), UsageError,
           r"^unknown read option 'foo'; the read options are revision, subfolder, token, weight_name, config, "
           r"prefix, key_map, fuse, strict, split\.$"),
    Misuse("load_device_option", lambda rig, tmp: rig.runtime.load(_t(rig), device="cpu"), UsageError,
           r"^unknown read option 'device'; .* \(device is where the runtime's buffers are; it is not an option\)\.$"),
    Misuse("load_config_not_mapping", lambda rig, tmp: rig.runtime.load(_t(rig), config="r=4"), UsageError,
           r"^config='r=4' must be a mapping \(or None\), not str\.$"),
    Misuse("load_revision_int", lambda rig, tmp: rig.runtime.load("org/name", revision=3), UsageError,
           r"^revision=3 must be str \(or None\), not int\.$"),
    Misuse("load_revision_nul", lambda rig, tmp: rig.runtime.load("org/name", revision="main\x00"), UsageError,
           r"^revision='main\\x00' must be a branch, tag or commit name"),
    Misuse("preload_revision_nul", lambda rig, tmp: rig.runtime.preload("org/name", revision="main\x00"), UsageError,
           r"^revision='main\\x00' must be a branch, tag or commit name"),
    Misuse("load_adapter_modules_not_mapping",
           lambda rig, tmp: rig.runtime.load(lorahot.Adapter([1], "peft", "<built>")), UsageError,
           r"^<built>: not a usable lorahot\.Adapter:\n  - Adapter\.modules is a list, Adapter\.config a dict"),
    Misuse("load_adapter_alpha_not_number", lambda rig, tmp: rig.runtime.load(_hand_built(rig, alpha="8")),
           UsageError,
           r"^<built>: not a usable lorahot\.Adapter:\n  - 'layers\.0\.self_attn\.q_proj': alpha is '8', not a "
           r"number\n"),
    Misuse("load_adapter_alpha_beyond_float", lambda rig, tmp: rig.runtime.load(_hand_built(rig, alpha=10**400)),
           UsageError, r"^<built>: not a usable lorahot\.Adapter:\n  - 'layers\.0\.self_attn\.q_proj': alpha is "
           r"1000.*, not a finite float\n"),
    Misuse("load_adapter_unit_scale_array",  # its truth value raised: an UnexpectedError
           lambda rig, tmp: rig.runtime.load(_hand_built(rig, unit_scale=np.array([0, 1]))), UsageError,
           r"unit_scale is array\(\[0, 1\]\), not True or False\n"),
    Misuse("plan_adapter_a_scalar", lambda rig, tmp: lorahot.plan_targets(_hand_built(rig, A=torch.tensor(1.0))),
           UsageError, r"'layers\.0\.self_attn\.q_proj': A is a 0-d tensor \(one number\), not a matrix\n"),
    Misuse("load_config_alpha_float_raises",
           lambda rig, tmp: rig.runtime.load(_t(rig), config={"lora_alpha": _RaisingFloat(2.0)}), UsageError,
           r"^config=: lora_alpha must be a finite number, got 2\.0, which cannot be read as a float\. Fix"),
    Misuse("load_split_parts_iteration_raises",
           lambda rig, tmp: rig.runtime.load(_t(rig), split={Q0: _RaisingRows([("a", 8), ("b", 8)])}), UsageError,
           r"^split=.* cannot be read \(RuntimeError raised while its entries were read: 'no rows'\)\. Pass a dict"),
    # a caller's name over the longest key lorahot takes: refused at the argument check, so that
    # no message holds it (a fused name of 5000 lines made a message of 10,000 characters)
    Misuse("load_fuse_name_too_long", lambda rig, tmp: rig.runtime.load(_t(rig), fuse={"q\n" * 5000: [Q0, V1]}),
           UsageError, r"^fuse: the fused name 'q\\nq\\n[^\n]{60,80}\.\.\. is 10000 characters long, more than 1024\. "
           r"Pass the fused layer's module name\.$"),
    Misuse("load_fuse_part_too_long", lambda rig, tmp: rig.runtime.load(_t(rig), fuse={"qv": [Q0, "p" * 2000]}),
           UsageError, r"^fuse\['qv'\]: the part 'p{76}\.\.\. is 2000 characters long, more than 1024\. Pass the "
           r"part's module name\.$"),
    Misuse("load_split_name_too_long",
           lambda rig, tmp: rig.runtime.load(_t(rig), split={Q0: [("a" * 1025, 8), ("b", 8)]}), UsageError,
           r"^split\['layers\.0\.self_attn\.q_proj'\]: the name 'a{76}\.\.\. is 1025 characters long, more than "
           r"1024\. Pass module names\.$"),
    Misuse("load_prefix_too_long", lambda rig, tmp: rig.runtime.load(_t(rig), prefix="u" * 5000), UsageError,
           r"^prefix='u{76}\.\.\. is 5000 characters long, more than 1024\. Pass a component name such as 'unet' "
           r"or 'lora_te1'\.$"),
    Misuse("load_key_map_result_too_long",
           lambda rig, tmp: rig.runtime.load(_t(rig), key_map={r"(layers\.0\..*)": "x" * 3000 + r"\1"}), UsageError,
           r"^key_map entry '\(layers\\\\\.0\\\\\.\.\*\)' renames 'layers\.0\.self_attn\.q_proj' to 'x{76}\.\.\., "
           r"which is 3025 characters long, more than 1024\. Map keys to the model's module names\.$"),
    Misuse("load_adapter_source_too_long", lambda rig, tmp: rig.runtime.load(_hand_fields(rig, source="s" * 4000)),
           UsageError, r"^s{197}\.\.\.: not a usable lorahot\.Adapter:\n  - Adapter\.source 's{76}\.\.\. is 4000 "
           r"characters long, more than 1024\n"),
    Misuse("preload_adapter_rslora_str", lambda rig, tmp: rig.runtime.preload(_hand_built(rig, use_rslora="yes")),
           UsageError, r"use_rslora is 'yes', not True or False\n"),
    Misuse("plan_unknown_option", lambda rig, tmp: lorahot.plan_targets([_t(rig)], foo=1), UsageError,
           r"^unknown read option 'foo'; the read options are"),
    Misuse("preload_adapter_a_not_tensor", lambda rig, tmp: rig.runtime.preload(_hand_built(rig, A=[[0.0]])),
           UsageError, r"^<built>: not a usable lorahot\.Adapter:\n  - 'layers\.0\.self_attn\.q_proj': A is a list, "
           r"not a torch\.Tensor\n"),
    Misuse("load_stack_update_overflows",  # each part's update fits float32; their sum does not
           lambda rig, tmp: rig.runtime.load([_t(rig), _t(rig)], scale=[1.5e38, 1.5e38]), UsageError,
           r"^scale=\[1\.5e\+38, 1\.5e\+38\]: the stack of 2 adapters' summed update would leave the LoRA buffers' "
           r"dtype in:\n  - layers\.0\.self_attn\.q_proj: the summed update of parts 0, 1 reaches \|value\| "
           r"4\.30106e\+38 > float32 max 3\.40282e\+38\nPass smaller weights \(the ones given times at most 0\.7911 "
           r"fit\), or stack fewer adapters\.$"),
    Misuse("load_lora_bias_update_overflows",  # B @ A fits float32; the LoRA bias term scale * lora_bias does not
           lambda rig, tmp: rig.runtime.load(_biased(rig), scale=1e38, config={"lora_bias": True}), UsageError,
           r"^scale=1e\+38: the slot's update would leave the LoRA buffers' dtype in:\n  - layers\.1\.self_attn\."
           r"v_proj: its LoRA bias scale \* lora_bias reaches \|value\| 2e\+39 > float32 max 3\.40282e\+38\nPass a "
           r"scale of at most 1\.701e\+37 in magnitude\.$"),
    Misuse("load_stack_adapter_source_none",  # passed every check, then emptied the slot while writing
           lambda rig, tmp: rig.runtime.load([_hand_fields(rig, source=None)] * 2, scale=[0.5, 0.5]), UsageError,
           r"^part 0 of the stack: None: not a usable lorahot\.Adapter:\n  - Adapter\.source is None, not a str\n"),
    Misuse("load_adapter_format_int", lambda rig, tmp: rig.runtime.load(_hand_fields(rig, format=3)), UsageError,
           r"^<built>: not a usable lorahot\.Adapter:\n  - Adapter\.format is 3, not a str\n"),
    Misuse("load_adapter_skipped_int", lambda rig, tmp: rig.runtime.load(_hand_fields(rig, skipped=3)), UsageError,
           r"^<built>: not a usable lorahot\.Adapter:\n  - Adapter\.skipped is 3, not a tuple of str\n"),
    # file_keys judges the file's naming (which aliases it takes): was an UnexpectedError (a TypeError or
    # AttributeError in keys.file_naming), and a str was read as its characters
    Misuse("load_adapter_file_keys_int", lambda rig, tmp: rig.runtime.load(_hand_fields(rig, file_keys=3)),
           UsageError, r"^<built>: not a usable lorahot\.Adapter:\n  - Adapter\.file_keys is 3, not a tuple of str\n"),
    Misuse("preload_adapter_file_keys_not_str",
           lambda rig, tmp: rig.runtime.preload(_hand_fields(rig, file_keys=(Q0, None))), UsageError,
           r"^<built>: not a usable lorahot\.Adapter:\n  - Adapter\.file_keys is \('layers\.0\.self_attn\.q_proj', "
           r"None\), not a tuple of str\n"),
    Misuse("plan_adapter_file_keys_str", lambda rig, tmp: lorahot.plan_targets([_hand_fields(rig, file_keys=Q0)]),
           UsageError, r"^<built>: not a usable lorahot\.Adapter:\n  - Adapter\.file_keys is 'layers\.0\.self_attn"
           r"\.q_proj', not a tuple of str\n"),
    Misuse("load_adapter_stored_dtypes_str",
           lambda rig, tmp: rig.runtime.load(_hand_fields(rig, stored_dtypes={Q0: "f8"})), UsageError,
           r"^<built>: not a usable lorahot\.Adapter:\n  - Adapter\.stored_dtypes is \{'layers\.0\.self_attn"
           r"\.q_proj': 'f8'\}, not a dict of str to torch\.dtype\n"),
    Misuse("preload_adapter_weights_list", lambda rig, tmp: rig.runtime.preload(_hand_fields(rig, weights=[1])),
           UsageError, r"^<built>: not a usable lorahot\.Adapter:\n  - Adapter\.weights is a list, not a dict\n"),
    Misuse("plan_adapter_weights_not_module",
           lambda rig, tmp: lorahot.plan_targets([_hand_fields(rig, weights={"x": 1})]), UsageError,
           r"^<built>: not a usable lorahot\.Adapter:\n  - Adapter\.weights maps a str to a int, not a str to a "
           r"WeightModule\n"),
    Misuse("load_adapter_nested_a", lambda rig, tmp: rig.runtime.load(_hand_built(rig, A=_nested())), UsageError,
           r"^<built>: not a usable lorahot\.Adapter:\n  - 'layers\.0\.self_attn\.q_proj': A is a nested tensor\n"),
    Misuse("load_source_int", lambda rig, tmp: rig.runtime.load(42), UsageError,
           r"^source=42 must be a path, a Hub repo id, a mapping of tensors or a lorahot\.Adapter\.$"),
    Misuse("load_prepared_of_another_runtime", _other_runtime_prepared, UsageError,
           r"^this PreparedAdapter was made for another runtime; preload it on this one\.$"),
    Misuse("load_prepared_tampered", lambda rig, tmp: rig.runtime.load(_tampered(rig, adapter=None)), UsageError,
           r"^this PreparedAdapter was changed after runtime\.preload made it \(adapter is None\); preload the adapter "
           r"again"),
    Misuse("load_prepared_packs_tampered", lambda rig, tmp: rig.runtime.load(_tampered(rig, packs=[1])), UsageError,
           r"^this PreparedAdapter was changed after runtime\.preload made it \(packs holds something other"),
    Misuse("cache_put_tampered", lambda rig, tmp: rig.runtime.cache.put(_tampered(rig, plan=None)), UsageError,
           r"^this PreparedAdapter was changed after runtime\.preload made it \(plan is None\)"),
    Misuse("load_prepared_with_options",
           lambda rig, tmp: rig.runtime.load(rig.runtime.cache.get(rig.runtime.cache.keys()[0]), prefix="x"),
           UsageError, r"^read options \(prefix\) do not apply to a PreparedAdapter, which was read already; pass "
           r"them to preload instead\.$"),
    # -- preload / prefetch ---------------------------------------------------------------------------
    Misuse("preload_key_int", lambda rig, tmp: rig.runtime.preload(_t(rig), key=3), UsageError,
           r"^key=3 must be a non-empty str \(or None: the source's identity\)\.$"),
    Misuse("preload_key_empty", lambda rig, tmp: rig.runtime.preload(_t(rig), key=""), UsageError, r"^key='' must"),
    Misuse("preload_unknown_option", lambda rig, tmp: rig.runtime.preload(_t(rig), weights="x"), UsageError,
           r"^unknown read option 'weights'; the read options are"),
    Misuse("prefetch_key_list", lambda rig, tmp: rig.runtime.prefetch(_t(rig), key=["k"]), UsageError,
           r"^key=\['k'\] must be a non-empty str"),
    Misuse("prefetch_unknown_options", lambda rig, tmp: rig.runtime.prefetch(_t(rig), a=1, b=2), UsageError,
           r"^unknown read options 'a', 'b'; the read options are"),
    # -- activate / unload / set_scale / info ---------------------------------------------------------
    Misuse("activate_out_of_range", lambda rig, tmp: rig.runtime.activate(2), UsageError, rf"^slot=2 is out.*{R}"),
    Misuse("activate_float", lambda rig, tmp: rig.runtime.activate(1.0), UsageError, r"^slot=1\.0 is a float;"),
    Misuse("activate_none", lambda rig, tmp: rig.runtime.activate(None), UsageError, r"^slot=None is a NoneType;"),
    Misuse("unload_out_of_range", lambda rig, tmp: rig.runtime.unload(7), UsageError, r"^slot=7 is out of range"),
    Misuse("activate_int_raises", lambda rig, tmp: rig.runtime.activate(_RaisingInt(1)), UsageError,
           r"^slot=1 cannot be read as an int \(_RaisingInt\.__int__ raised RuntimeError\); pass an int\.$"),
    Misuse("unload_int_raises", lambda rig, tmp: rig.runtime.unload(_RaisingInt(0)), UsageError,
           r"^slot=0 cannot be read as an int \(_RaisingInt\.__int__ raised RuntimeError\)"),
    Misuse("activate_rows_entry_int_raises", lambda rig, tmp: rig.runtime.activate([0, _RaisingInt(1)]), UsageError,
           r"^routing entry 1 \(1\) cannot be read as an int \(_RaisingInt\.__int__ raised RuntimeError\); pass an "
           r"int\.$"),
    Misuse("activate_rows_iteration_raises", lambda rig, tmp: rig.runtime.activate(_RaisingRows([0, 1])), UsageError,
           r"^the routing \(a _RaisingRows\) cannot be read: iterating it raised RuntimeError; pass a list of ints\.$"),
    Misuse("activate_lengths_entry_int_raises",
           lambda rig, tmp: rig.runtime.activate([0, 1], lengths=[2, _RaisingInt(3)]), UsageError,
           r"^lengths=\[2, 3\] must hold one token count"),
    Misuse("activate_lengths_iteration_raises",
           lambda rig, tmp: rig.runtime.activate([0, 1], lengths=_RaisingRows([2, 3])), UsageError,
           r"^lengths=\[2, 3\] must hold one token count"),
    Misuse("set_scale_str", lambda rig, tmp: rig.runtime.set_scale("x"), UsageError, r"^scale='x' is not a number"),
    Misuse("set_scale_bytearray", lambda rig, tmp: rig.runtime.set_scale(bytearray(b"\x02")), UsageError,
           r"^scale=bytearray\(b'\\x02'\) is not a number"),  # was taken as the list of weights [2]
    Misuse("set_scale_memoryview", lambda rig, tmp: rig.runtime.set_scale(memoryview(b"\x02")), UsageError,
           r"^scale=<memory at 0x[0-9a-f]+> is not a number"),
    Misuse("set_scale_len_raises", lambda rig, tmp: rig.runtime.set_scale(_RaisingLen([1.0])), UsageError,
           r"^scale=\[1\.0\] cannot be read \(_RaisingLen raised RuntimeError when its length or entries were "
           r"read\); pass a list of floats, one weight per part\.$"),
    Misuse("set_scale_range_beyond_len", lambda rig, tmp: rig.runtime.set_scale(range(10**20)), UsageError,
           r"^scale=range\(0, 100000000000000000000\) cannot be read \(range raised OverflowError"),
    Misuse("load_stack_scale_huge_list", lambda rig, tmp: rig.runtime.load([_t(rig)] * 2, scale=[0.5] * (2 << 20)),
           UsageError, r"^scale=\[0\.5, .* holds 2,097,152 entries, more than 1,048,576; pass a list of floats"),
    Misuse("load_stack_len_raises", lambda rig, tmp: rig.runtime.load(_RaisingLen([_t(rig)])), UsageError,
           r"^source=.* cannot be read \(_RaisingLen raised RuntimeError .*\); pass a list of sources\.$"),
    Misuse("set_scale_float_raises", lambda rig, tmp: rig.runtime.set_scale(_BadInt(2)), UsageError,
           r"^scale=2 cannot be read as a float \(_BadInt\.__float__ raised RuntimeError\); pass a float\.$"),
    Misuse("set_scale_inf", lambda rig, tmp: rig.runtime.set_scale(float("-inf")), UsageError,
           r"^scale=-inf must be finite\.$"),
    Misuse("set_scale_overflows_buffer", lambda rig, tmp: rig.runtime.set_scale(1e39), UsageError,
           r"^scale=1e\+39 times the adapter's largest alpha/r \(2\) is 2e\+39, beyond the range of the torch\.float32 "
           r"scale buffers \(max 3\.403e\+38\)\. Pass a scale of at most 1\.701e\+38 in magnitude\.$"),
    Misuse("set_scale_underflows_buffer", lambda rig, tmp: rig.runtime.set_scale(-3e-39), UsageError,
           r"^scale=-3e-39 times the adapter's smallest alpha/r \(2\) is -6e-39, below the smallest normal number of "
           r"the torch\.float32 scale buffers \(1\.175e-38\), where it would lose its precision\. Pass a scale of at "
           r"least 5\.883e-39 in magnitude, or 0\.$"),
    Misuse("set_scale_update_overflows", lambda rig, tmp: rig.runtime.set_scale(1.6e38), UsageError,
           r"^scale=1\.6e\+38: the slot's update would leave the LoRA buffers' dtype in:\n  - layers\.0\.self_attn\."
           r"q_proj: its update scale \* B @ A reaches \|value\| 3\.52394e\+38 > float32 max 3\.40282e\+38\nPass a "
           r"scale of at most 1\.545e\+38 in magnitude\.$"),
    Misuse("set_scale_huge_int", lambda rig, tmp: rig.runtime.set_scale(-(10**400), slot=1), UsageError,
           r"^scale=-100000000000000000000000000000000000\.\.\. is too large for a float"),
    Misuse("set_scale_bad_slot", lambda rig, tmp: rig.runtime.set_scale(1.0, slot=3), UsageError, r"^slot=3 is out"),
    Misuse("info_bad_slot", lambda rig, tmp: rig.runtime.info(-2), UsageError, r"^slot=-2 is out of range"),
    # -- the host cache ----------------------------------------------------------------------------------
    Misuse("cache_get_list", lambda rig, tmp: rig.runtime.cache.get(["k"]), UsageError,
           r"^cache keys are str, got list \['k'\]\.$"),
    Misuse("cache_is_name_list", lambda rig, tmp: rig.runtime.cache.is_name([1]), UsageError,
           r"^cache keys are str, got list \[1\]\.$"),
    Misuse("cache_name_int", lambda rig, tmp: rig.runtime.cache.name(3), UsageError,
           r"^cache keys are str, got int 3\.$"),
    Misuse("cache_unname_none", lambda rig, tmp: rig.runtime.cache.unname(None), UsageError,
           r"^cache keys are str, got NoneType None\.$"),
    Misuse("cache_touch_not_prepared", lambda rig, tmp: rig.runtime.cache.touch(["k"]), UsageError,
           r"^entries=\('k',\) must be a list of PreparedAdapter objects \(from runtime\.preload\)\.$"),
    Misuse("cache_touch_str", lambda rig, tmp: rig.runtime.cache.touch("k"), UsageError,
           r"^entries='k' must be a list of PreparedAdapter objects \(from runtime\.preload\), not str\.$"),
    Misuse("cache_put_not_prepared", lambda rig, tmp: rig.runtime.cache.put("x"), UsageError,
           r"^AdapterCache holds PreparedAdapter objects \(from runtime\.preload\), not str\.$"),
    Misuse("cache_budget_str", lambda rig, tmp: setattr(rig.runtime.cache, "budget_bytes", "1GB"), UsageError,
           r"^cache_bytes='1GB' must be an int number of bytes >= 0"),
    Misuse("cache_new_negative", lambda rig, tmp: lorahot.AdapterCache(-5), UsageError, r"^cache_bytes=-5 must be"),
]  # fmt: skip


def _hand_built(rig: Rig, **fields: Any) -> lorahot.Adapter:
    """An Adapter built by hand (not by a reader), with ``fields`` of its one module replaced."""
    tensors = valid_tensors(rig.model, 4, names=(Q0,))
    a, b = (tensors[f"base_model.model.{Q0}.lora_{r}.weight"] for r in "AB")
    module = lorahot.LoraModule(Q0, **{"A": a, "B": b, "alpha": 8.0, **fields})
    return lorahot.Adapter({Q0: module}, "peft", "<built>")


class _BadInt(int):
    """An int whose conversion to float raises (a caller's number type)."""

    def __float__(self) -> float:
        raise RuntimeError("no float")


class _RaisingInt(int):
    """An int whose conversion to int raises (a caller's integer type)."""

    def __int__(self) -> int:
        raise RuntimeError("no int")

    __index__ = __int__


class _RaisingLen(list):
    """A list whose ``len`` raises (a caller's sequence type)."""

    def __len__(self) -> int:
        raise RuntimeError("no len")


class _RaisingFloat(float):
    """A float whose conversion to float raises (a caller's number type)."""

    def __float__(self) -> float:
        raise RuntimeError("no float")


class _RaisingRows(list):
    """A list whose iteration raises (a caller's sequence type)."""

    def __iter__(self) -> Any:
        raise RuntimeError("no rows")


def _hand_fields(rig: Rig, **fields: Any) -> lorahot.Adapter:
    """A valid hand-built Adapter with ``fields`` of the Adapter itself replaced."""
    return dataclasses.replace(_hand_built(rig), **fields)


def _tampered(rig: Rig, **fields: Any) -> Any:
    """The rig's first preloaded adapter with ``fields`` replaced (as ``dataclasses.replace`` can)."""
    return dataclasses.replace(rig.runtime.cache.get(rig.runtime.cache.keys()[0]), **fields)


def _nested() -> torch.Tensor:
    with warnings.catch_warnings():  # the prototype API's warning
        warnings.simplefilter("ignore")
        return torch.nested.nested_tensor([torch.zeros(4, 8), torch.zeros(4, 8)])


def _t(rig: Rig) -> dict[str, torch.Tensor]:
    """A valid adapter for the rig (no config: alpha = rank, so every alpha/r is 1)."""
    return valid_tensors(rig.model, 4, names=(Q0, V1))


def _biased(rig: Rig) -> dict[str, torch.Tensor]:
    """:func:`_t` with a LoRA bias of 10 on ``V1`` (read with PEFT's default alpha 8, its alpha / r is 2:
    its update is ``20 * scale``)."""
    return _t(rig) | {f"base_model.model.{V1}.lora_B.bias": torch.full((16,), 10.0)}


def _tie(rig: Rig) -> torch.nn.Module:
    """Ties the rig's lm_head to its (wrapped) embedding, the way transformers ties weights."""
    rig.model.lm_head.weight = rig.model.embed_tokens.base_layer.weight
    return rig.model


def test_table_covers_every_entry_point() -> None:
    assert len({m.id for m in MISUSES}) == len(MISUSES)
    prefixes = {m.id.split("_")[0] for m in MISUSES}
    assert prefixes >= {"inject", "eject", "load", "preload", "prefetch", "activate", "unload", "set", "info", "cache"}


@pytest.mark.parametrize("misuse", MISUSES, ids=[m.id for m in MISUSES])
def test_bad_call_raises_and_changes_nothing(misuse: Misuse, tmp_path: Path) -> None:
    rig = build_rig(tmp_path / "rig")
    rig.runtime.preload(write_valid(tmp_path / "cached", rig.model, {Q0: 2}, seed=7))
    if misuse.id == "inject_merged_tied":
        _tie(rig)  # part of the setup, not of the call
    before = snapshot(rig)
    modules = [(n, id(m)) for n, m in rig.model.named_modules()]
    threads = {t.name for t in threading.enumerate()}
    with pytest.raises(misuse.error, match=misuse.match) as raised:
        misuse.call(rig, tmp_path)
    assert isinstance(raised.value, (ValueError, TypeError)) or not isinstance(raised.value, UsageError)
    assert_unchanged(rig, before)
    assert [(n, id(m)) for n, m in rig.model.named_modules()] == modules
    assert {t.name for t in threading.enumerate()} <= threads, "a bad prefetch started a thread"
    assert rig.runtime.cache.budget_bytes == 2 << 30


class _IntPath:
    def __fspath__(self) -> int:
        return 3


class _RaisingPath:
    def __fspath__(self) -> str:
        raise RuntimeError("the caller's path object broke")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda rt: lorahot.inject(torch.nn.Linear(4, 4), [""]), "inject: missing a required argument: 'max_rank'"),
        (
            lambda rt: lorahot.inject(torch.nn.Linear(4, 4), ["x"], max_rank=4, rank=4),
            "unexpected keyword argument 'rank'",
        ),
        (lambda rt: rt.load(), "LoraRuntime.load: missing a required argument: 'source'"),
        (lambda rt: rt.load(valid_tensors(rt.model), 0), "LoraRuntime.load: too many positional arguments"),
        (lambda rt: rt.activate(), "LoraRuntime.activate: missing a required argument: 'slot'"),
        (lambda rt: rt.set_scale(), "LoraRuntime.set_scale: missing a required argument: 'value'"),
        (lambda rt: lorahot.read_adapter(), "read_adapter: missing a required argument: 'source'"),
        (lambda rt: rt.load(_IntPath()), "is not a usable path"),
        (lambda rt: rt.load(_RaisingPath()), "is not a usable path: RuntimeError: the caller's path object broke"),
        (lambda rt: rt.preload(_RaisingPath(), key="k"), "is not a usable path: RuntimeError"),
    ],
)
def test_calls_the_signature_does_not_take_are_usage_errors(
    call: Callable[[Any], object], message: str, tmp_path: Path
) -> None:
    """Missing, unknown or extra arguments (and a path object that is no path) are bad calls: a
    UsageError, which is also a TypeError, not an UnexpectedError asking for a bug report."""
    rig = build_rig(tmp_path)
    before = snapshot(rig)
    with pytest.raises(UsageError, match=message) as info:
        call(rig.runtime)
    assert isinstance(info.value, TypeError)
    assert_unchanged(rig, before)


def test_numpy_integers_are_integers() -> None:
    import numpy as np

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    runtime = lorahot.inject(model, ["0"], max_rank=np.int64(4), slots=np.int32(2), cache_bytes=np.uint32(1 << 20))
    assert (runtime.max_rank, runtime.slots, runtime.cache.budget_bytes) == (4, 2, 1 << 20)
    assert type(runtime.max_rank) is int and type(runtime.cache.budget_bytes) is int
    runtime.cache.budget_bytes = np.int64(7)
    assert type(runtime.cache.budget_bytes) is int


class _Hostile:
    """An argument whose every protocol method raises: repr, str, format, hash, comparisons,
    truth, length, iteration, numbers, attributes, fspath. Messages that show it, and checks
    that compare or hash it, must not let its RuntimeError out as an UnexpectedError."""

    def _broken(self, *args: object, **kwargs: object) -> Any:
        raise RuntimeError("the caller's object broke")

    __repr__ = __str__ = __format__ = __hash__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _broken  # type: ignore[assignment]
    __bool__ = __len__ = __iter__ = __index__ = __int__ = __float__ = __fspath__ = __getattr__ = _broken


def _entry_points(rig: Rig, source: str) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """Every public entry point with valid arguments (``source``: an adapter, preloaded under
    the key ``"prepared"``), the host cache's included."""
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 4))
    rt, cache = rig.runtime, rig.runtime.cache
    prepared = "prepared"
    return {
        "inject": (lorahot.inject, {"model": fresh, "targets": ["0"], "max_rank": 2}),
        "eject": (lorahot.eject, {"model": fresh}),
        "read_adapter": (lorahot.read_adapter, {"source": source}),
        "plan_targets": (lorahot.plan_targets, {"source": source}),
        "load": (rt.load, {"source": source}),
        "preload": (rt.preload, {"source": source}),
        "prefetch": (lambda **kw: rt.prefetch(**kw).result(timeout=60), {"source": source}),
        "activate": (rt.activate, {"slot": 0}),
        "unload": (rt.unload, {}),
        "set_scale": (rt.set_scale, {"value": 1.0}),
        "info": (rt.info, {}),
        "cache.get": (cache.get, {"key": prepared}),
        "cache.put": (cache.put, {"entry": cache.get(prepared)}),
        "cache.discard": (cache.discard, {"key": "another"}),
    }


#: parameters that take any object where the valid call above leaves them unread: a local
#: adapter reads no Hub revision or token
_UNREAD = {("read_adapter", "revision"), ("read_adapter", "token"), ("plan_targets", "revision")}
_UNREAD |= {("plan_targets", "token")}


def test_a_hostile_object_in_any_argument_is_a_usage_error_and_changes_nothing(tmp_path: Path) -> None:
    """Each public parameter of each entry point in turn gets :class:`_Hostile` (the rest valid):
    a UsageError naming the argument, never an UnexpectedError (a check that let the object's
    own exception out), and nothing changed, bitwise."""
    import inspect

    rig = build_rig(tmp_path / "rig")
    source = str(write_valid(tmp_path / "cached", rig.model, {Q0: 2}, seed=7))
    rig.runtime.preload(source, key="prepared")
    hostile, tried, escaped = _Hostile(), 0, []
    for name, (fn, valid) in _entry_points(rig, source).items():
        target = getattr(fn, "__wrapped__", fn) if name != "prefetch" else rig.runtime.prefetch
        for param in inspect.signature(target).parameters.values():
            if param.name.startswith("_") or param.kind is param.VAR_POSITIONAL or (name, param.name) in _UNREAD:
                continue
            key = "unknown_option" if param.kind is param.VAR_KEYWORD else param.name
            before = snapshot(rig)
            tried += 1
            try:
                fn(**{**valid, key: hostile})
                escaped.append(f"{name}({key}=...): accepted")
            except lorahot.UnexpectedError as exc:
                escaped.append(f"{name}({key}=...): UnexpectedError from {exc.__cause__!r}")
            except UsageError:
                pass
            assert_unchanged(rig, before)
    assert tried > 40 and not escaped, "\n".join(escaped)


#: strings a file or a caller may put in a key, a path or a name: line breaks of every kind
#: (str.splitlines splits on each), the other control characters, bidi overrides and isolates
_HOSTILE = [
    "x\n  - fake",
    "x\r\n  - fake",
    "x\x0b\x0c\x1c\x1d\x1e\x85  - fake",
    "x\u2028\u2029  - fake",
    "x\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069y",
    "x\ty",
]


def _kohya_file(tmp: Path, rig: Rig, stem: str) -> Path:
    from safetensors.torch import save_file

    a, b = valid_tensors(rig.model, 4, names=(Q0,)).values()
    save_file({f"lora_unet_{stem}.lora_down.weight": a, f"lora_unet_{stem}.lora_up.weight": b}, tmp / "k.safetensors")
    return tmp / "k.safetensors"


def _peft_dir(tmp: Path, rig: Rig, field: str) -> Path:
    import json

    path = write_valid(tmp / "peft", rig.model, {Q0: 4})
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, field: 1}))
    return path


#: (id, call with the hostile string, lines of its message): refusals a file's keys, config,
#: path or a caller's names reach, in list messages and in one-line ones
_HOSTILE_PATHS: list[tuple[str, Callable[[Rig, Path, str], Any], int]] = [
    ("file_key_no_layer", lambda rig, tmp, h: rig.runtime.load(_kohya_file(tmp, rig, h)), 3),
    ("file_key_no_naming", lambda rig, tmp, h: rig.runtime.load({**_t(rig), f"{Q0}.{h}.weight": torch.ones(2)}), 4),
    ("config_field", lambda rig, tmp, h: rig.runtime.load(_peft_dir(tmp, rig, h)), 3),
    ("config_override", lambda rig, tmp, h: rig.runtime.load(_t(rig), config={h: 1}), 3),
    ("source_path", lambda rig, tmp, h: rig.runtime.load(tmp / f"{h}.safetensors"), 1),
    ("weight_name", lambda rig, tmp, h: rig.runtime.load(tmp, weight_name=f"{h}.safetensors"), 1),
    ("adapter_source", lambda rig, tmp, h: rig.runtime.load(_hand_source(rig, h)), 3),
    ("fuse_name", lambda rig, tmp, h: rig.runtime.load(_t(rig), fuse={h: [Q0, V1]}), 1),
    ("split_part", lambda rig, tmp, h: rig.runtime.load(_t(rig), split={Q0: [(h, 8), ("b", 8)]}), 1),
    ("prefix", lambda rig, tmp, h: rig.runtime.load(_t(rig), prefix=h), 1),
    ("key_map_result", lambda rig, tmp, h: rig.runtime.load(_t(rig), key_map={r"layers\.0\..*": h}), 1),
    ("denoiser", lambda rig, tmp, h: rig.runtime.load(_t(rig), denoiser=h), 1),
]


@pytest.mark.parametrize("hostile", _HOSTILE, ids=[ascii(h) for h in _HOSTILE])
@pytest.mark.parametrize(("path", "call", "lines"), _HOSTILE_PATHS, ids=[p[0] for p in _HOSTILE_PATHS])
def test_a_hostile_string_adds_no_line_to_a_message(
    path: str, call: Callable[[Rig, Path, str], Any], lines: int, hostile: str, tmp_path: Path
) -> None:
    """Whatever line breaks, control or bidi characters a key, a path or a name holds, the
    message shows it escaped and keeps its own lines: none can pass for a line of the list."""
    rig = build_rig(tmp_path / "rig")
    before = snapshot(rig)
    with pytest.raises(lorahot.LoraError) as raised:
        call(rig, tmp_path, hostile)
    text = str(raised.value)
    assert len(text.splitlines()) == lines, text
    assert hostile.encode("unicode_escape").decode("ascii") in text
    assert not any(c in text for c in hostile if not c.isprintable() and c != "\n"), ascii(text)
    assert_unchanged(rig, before)


#: characters a model's module name may hold (``add_module`` refuses only ``.`` and ``""``) that
#: a message must escape: every line break str.splitlines knows, the other C0 and C1 controls
#: (a terminal's ESC, NUL), bidi overrides and isolates, zero-width and separator characters
_UNPRINTABLE = st.sampled_from(
    [chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)]] + list("\u2028\u2029\u202a\u202e\u2066\u2069\u200b\ufeff")
)
_PLAIN = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="."), max_size=6)
_HOSTILE_MODULES = st.builds(
    lambda a, b, c: a + b + c,
    _PLAIN,
    st.text(_UNPRINTABLE, min_size=1, max_size=4),
    st.text(_UNPRINTABLE | _PLAIN.filter(bool).map(lambda t: t[0]), max_size=6),
)


def _named_model(name: str, inner: torch.nn.Module | None = None) -> torch.nn.Sequential:
    """``[name].q_proj``: a Linear(8, 8) (or ``inner``) under a child the model names ``name``."""
    model, block = torch.nn.Sequential(), torch.nn.Module()
    block.add_module("q_proj", torch.nn.Linear(8, 8) if inner is None else inner)
    model.add_module(name, block)
    return model


def _hooked(name: str) -> Any:
    model = _named_model(name)
    model.get_submodule(name).q_proj.register_forward_hook(lambda *args: None)
    return lorahot.inject(model, ["q_proj"], max_rank=4, merged=True)


def _tied(name: str) -> Any:
    model = _named_model(name)
    model.add_module("tied", torch.nn.Linear(8, 8))
    model.tied.weight = model.get_submodule(name).q_proj.weight
    return lorahot.inject(model, ["q_proj"], max_rank=4, merged=True)


def _replaced(name: str) -> Any:
    model = _named_model(name)
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4, slots=2)
    model.get_submodule(name).q_proj = torch.nn.Linear(8, 8)
    return runtime.activate(1)


def _wrong_b(name: str) -> lorahot.Adapter:
    """A hand-built LoRA of ``[name].q_proj`` (a reader would not parse a key with a line break)
    whose B has 9 rows where the layer has 8 outputs."""
    key = f"{name}.q_proj"
    return lorahot.Adapter(
        {key: lorahot.LoraModule(key, A=torch.ones(2, 8), B=torch.ones(9, 2), alpha=2.0)}, "peft", "<built>"
    )


def _injected_plan(name: str) -> Any:
    model = _named_model(name)
    lorahot.inject(model, ["q_proj"], max_rank=4)
    return lorahot.plan_targets(_wrong_b(name), model)


#: (id, call whose refusal names the model's module ``name``): inject's refusals of a
#: module, a call after a module on a layer's path was replaced, a load or plan whose shapes
#: do not fit the layer
_MODULE_NAME_PATHS: list[tuple[str, Callable[[str], Any]]] = [
    ("inject_merged_hooks", _hooked),
    ("inject_merged_tied", _tied),
    ("inject_lazy", lambda name: lorahot.inject(_named_model(name, torch.nn.LazyLinear(8)), ["q_proj"], max_rank=4)),
    ("call_after_replace", _replaced),
    ("load_wrong_shape", lambda name: lorahot.inject(_named_model(name), ["q_proj"], max_rank=4).load(_wrong_b(name))),
    ("plan_wrong_shape", lambda name: lorahot.plan_targets(_wrong_b(name), _named_model(name))),
    ("plan_injected", _injected_plan),
]


@pytest.mark.parametrize(("path", "call"), _MODULE_NAME_PATHS, ids=[p[0] for p in _MODULE_NAME_PATHS])
@settings(max_examples=15, deadline=None)
@given(name=_HOSTILE_MODULES)
@example(name="x\n  - fake").via("a forged list line")
@example(name="x\x1b[2J\x1b[31mred\r\x00").via("terminal escapes")
def test_a_models_module_name_adds_no_line_to_a_message(path: str, call: Callable[[str], Any], name: str) -> None:
    """A module name holds whatever ``add_module`` was given: every refusal that names it shows it
    escaped, and reads as with a plain name in its place (a plain name shows as it is)."""
    with pytest.raises(lorahot.LoraError) as plain:
        call("blk")
    with pytest.raises(type(plain.value)) as raised:
        call(name)
    text, escaped = str(raised.value), one_line(name)
    assert "blk" in str(plain.value) and escaped in text
    assert text.count("\n") == str(plain.value).count("\n")
    assert all(c.isprintable() for c in text.replace("\n", "")), ascii(text)
    assert text.replace(escaped, "blk") == str(plain.value)


def _hand_source(rig: Rig, source: str) -> lorahot.Adapter:
    """A hand-built adapter named ``source`` whose A does not fit its layer."""
    return dataclasses.replace(_hand_built(rig, A=torch.ones(4, 3)), source=source)
