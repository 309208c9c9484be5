"""``lorahot.inject`` / ``lorahot.eject``: target selection, errors, and leaving the model as it was."""

from __future__ import annotations

import contextlib
import copy
import re
import sys
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

import lorahot
from tests.helpers import Conv1D, ScaledProj, count_calls, make_adapter, model_reference, tiny_lm, token_ids

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _wrapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, lorahot.LoRALayer)]


def _ids() -> torch.Tensor:
    return token_ids((2, 5), 32)


# -- targets --------------------------------------------------------------------------------


def test_names_match_whole_trailing_components() -> None:
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj", "mlp.down_proj"], max_rank=4)
    expected = [
        "layers.0.self_attn.q_proj",
        "layers.0.mlp.down_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.mlp.down_proj",
    ]
    assert _wrapped(model) == expected
    assert list(runtime.layers) == expected


def test_name_must_match_a_whole_component() -> None:
    with pytest.raises(
        ValueError, match=r"targets=\['proj'\] matched no module\. Some module names: embed_tokens, layers, layers\.0"
    ):
        lorahot.inject(tiny_lm(), ["proj"], max_rank=4)


def test_name_matches_exact_top_level_module() -> None:
    model = tiny_lm()
    lorahot.inject(model, ["lm_head"], max_rank=4)
    assert _wrapped(model) == ["lm_head"]


def test_regex_is_a_full_match() -> None:
    model = tiny_lm()
    lorahot.inject(model, r"layers\.0\.self_attn\.[qv]_proj", max_rank=4)
    assert _wrapped(model) == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]
    # a bare name as the string is a regex over whole names: the message says to pass a list
    with pytest.raises(
        ValueError,
        match=r"targets='q_proj' matched no module\. .* to wrap the 2 module\(s\) named 'q_proj' "
        r"\(layers\.0\.self_attn\.q_proj, layers\.1\.self_attn\.q_proj\), pass a list: targets=\['q_proj'\]\.",
    ):
        lorahot.inject(tiny_lm(), "q_proj", max_rank=4)
    with pytest.raises(ValueError, match=r"targets='qkv' matched no module\. .* for every name ending in '\.q_proj'\)"):
        lorahot.inject(tiny_lm(), "qkv", max_rank=4)


def test_invalid_regex_is_a_usage_error() -> None:
    with pytest.raises(lorahot.UsageError, match=r"targets='\(q' is not a valid regex"):
        lorahot.inject(tiny_lm(), "(q", max_rank=4)


def test_all_linear_skips_lm_head() -> None:
    model = tiny_lm()
    lorahot.inject(model, "all-linear", max_rank=4)
    linear = [n for n, m in tiny_lm().named_modules() if isinstance(m, nn.Linear)]
    assert _wrapped(model) == [n for n in linear if n != "lm_head"]
    assert "lm_head" in linear


def test_all_linear_skips_the_output_embeddings_and_includes_conv1d() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = Conv1D(12, 4)
            self.emb = nn.Embedding(5, 4)
            self.out = nn.Linear(12, 5)

        def get_output_embeddings(self) -> nn.Module:
            return self.out

    model = Net()
    lorahot.inject(model, "all-linear", max_rank=2)
    assert _wrapped(model) == ["c_attn"]


def test_all_linear_takes_an_lm_head_the_model_does_not_name_its_output_embeddings() -> None:
    """As PEFT: where ``get_output_embeddings()`` returns None (transformers' ``...ForCTC``,
    whose ``lm_head`` is a CTC head), ``lm_head`` is an ordinary target. Before, lorahot's
    "all-linear" left it out, and PEFT's all-linear adapters of wav2vec2, HuBERT, WavLM, SEW
    and Data2VecAudio CTC models were refused at load ('lm_head: matches no injected layer')."""

    class CTC(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.lm_head = nn.Linear(8, 5)

        def get_output_embeddings(self) -> None:
            return None

    model = CTC()
    lorahot.inject(model, "all-linear", max_rank=2)
    assert _wrapped(model) == ["proj", "lm_head"]


def test_all_linear_leaves_out_a_linear_whose_forward_does_not_return_its_output() -> None:
    """A router subclassing ``nn.Linear`` whose forward returns ``(scores, logits)`` (transformers'
    ``Llama4Router``, which PEFT's all-linear also takes and then fails on) cannot carry a LoRA
    over its output, and inject refuses it when named: "all-linear" leaves it out and wraps the
    other linears, which compute their float64 reference. Before, "all-linear" on such a model
    was refused as a whole. A subclass whose forward raises on the probe (one taking only 2-D
    input) is still taken."""

    class Router(nn.Linear):
        def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = super().forward(input)
            return logits.sigmoid(), logits

    class TwoDimensional(nn.Linear):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if input.dim() != 2:
                raise RuntimeError("2-D input only")
            return super().forward(input)

    class Moe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = Router(6, 3)
            self.proj = nn.Linear(6, 6)
            self.flat = TwoDimensional(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores, _ = self.router(x)
            return self.flat(self.proj(x) * scores.sum(-1, keepdim=True))

    torch.manual_seed(0)
    model = Moe().double()
    reference_model = copy.deepcopy(model)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    assert _wrapped(model) == ["proj", "flat"] and type(model.router) is Router
    tensors, ab = make_adapter(reference_model, {"proj": 2, "flat": 2}, dtype=torch.float64)
    runtime.load(tensors)
    x = torch.randn(5, 6, dtype=torch.float64)
    want = model_reference(reference_model, x, {n: (a, b, 1.0) for n, (a, b) in ab.items()})
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(lorahot.UsageError, match=r"^router: Router declares .* to tuple, not \(2, 4, 3\)"):
        lorahot.inject(Moe(), ["router"], max_rank=2)


def test_callable_targets() -> None:
    model = tiny_lm()
    lorahot.inject(model, lambda name, m: isinstance(m, nn.Embedding) or name.endswith("up_proj"), max_rank=4)
    assert _wrapped(model) == ["embed_tokens", "layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]


def test_custom_linear_like_module_is_wrapped() -> None:
    model = nn.Sequential(ScaledProj(6, 3))
    lorahot.inject(model, ["0"], max_rank=2)
    assert isinstance(model[0], lorahot.LoRALinear)


def test_unsupported_type_names_path_and_type() -> None:
    model = tiny_lm()
    with pytest.raises(
        TypeError,
        match=r"layers\.0\.norm: cannot add LoRA to LayerNorm, a normalization layer: .* merged mode only\. Inject "
        r"with merged=True, or narrow targets to exclude it\.",
    ):
        lorahot.inject(model, ["norm", "q_proj"], max_rank=4)
    assert _wrapped(model) == []


def test_empty_or_bad_target_list_is_a_usage_error() -> None:
    for bad in ([], [1, 2]):
        with pytest.raises(lorahot.UsageError, match=r"targets must be a non-empty list of module names"):
            lorahot.inject(tiny_lm(), bad, max_rank=4)


def test_injecting_twice_is_refused() -> None:
    model = tiny_lm()
    lorahot.inject(model, ["q_proj"], max_rank=4)
    with pytest.raises(
        TypeError, match=r"layers\.0\.self_attn\.q_proj: already a LoRALinear; call lorahot\.eject\(model\)"
    ):
        lorahot.inject(model, ["q_proj"], max_rank=4)


def test_a_lora_layer_given_as_the_model_is_refused() -> None:
    """inject(model.layer, ["base_layer"]) on a layer lorahot wrapped would put a LoRA layer
    inside another, which no load of a file for the model reaches (an independent audit)."""
    model = tiny_lm()
    lorahot.inject(model, ["q_proj"], max_rank=4)
    layer = model.get_submodule("layers.0.self_attn.q_proj")
    with pytest.raises(TypeError, match=r"^the model given to inject: already a LoRALinear; call lorahot\.eject"):
        lorahot.inject(layer, ["base_layer"], max_rank=4)
    assert type(layer.base_layer) is nn.Linear


@pytest.mark.parametrize(
    "targets", ["all-linear", lambda name, m: isinstance(m, nn.Linear)], ids=["all-linear", "callable"]
)
def test_injecting_twice_never_wraps_a_base_layer(targets: object) -> None:
    model = tiny_lm()
    lorahot.inject(model, ["q_proj"], max_rank=4)
    with pytest.raises(
        TypeError, match=r"layers\.0\.self_attn\.q_proj: already a LoRALinear; call lorahot\.eject\(model\)"
    ):
        lorahot.inject(model, targets, max_rank=4)  # type: ignore[arg-type]
    assert _wrapped(model) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]


def test_second_runtime_on_other_targets() -> None:
    model = tiny_lm()
    first = lorahot.inject(model, ["q_proj"], max_rank=4)
    second = lorahot.inject(model, ["v_proj"], max_rank=2)
    tensors, ab = make_adapter(model, {"layers.0.self_attn.q_proj": 4}, seed=1)
    first.load(tensors)
    tensors2, ab2 = make_adapter(model, {"layers.1.self_attn.v_proj": 2}, seed=2)
    second.load(tensors2)
    with torch.no_grad():
        y = model(_ids())
    expected = model_reference(tiny_lm(), _ids(), {n: (a, b, 1.0) for n, (a, b) in (ab | ab2).items()})
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_failed_inject_leaves_earlier_layers_in_place() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Conv1d(6, 6, 3, groups=3))
    first = lorahot.inject(model, ["0"], max_rank=4)
    with pytest.raises(lorahot.UsageError, match=r"1: conv with groups=3 needs max_rank divisible by 3"):
        lorahot.inject(model, ["1"], max_rank=4)
    assert _wrapped(model) == ["0"] and model[0] is first.layers["0"]


def test_runtime_eject_removes_only_its_own_layers() -> None:
    model = tiny_lm()
    first = lorahot.inject(model, ["q_proj"], max_rank=4)
    second = lorahot.inject(model, ["v_proj"], max_rank=4)
    second.eject()
    assert _wrapped(model) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    first.load(make_adapter(model, {"layers.1.self_attn.q_proj": 2}, seed=3)[0])
    with torch.no_grad():
        assert not torch.equal(model(_ids()), tiny_lm()(_ids()))
    first.eject()
    assert _wrapped(model) == []
    with torch.no_grad():
        assert torch.equal(model(_ids()), tiny_lm()(_ids()))


def test_nested_matches_are_refused() -> None:
    class Outer(ScaledProj):
        def __init__(self) -> None:
            super().__init__(4, 4)
            self.inner = nn.Linear(4, 4)

    model = nn.Sequential(Outer())
    with pytest.raises(lorahot.UsageError, match=r"targets select both 0 and its submodule 0\.inner"):
        lorahot.inject(model, lambda name, m: True, max_rank=2)
    assert _wrapped(model) == []


# -- the model is unchanged until an adapter is loaded ----------------------------------------


def test_outputs_and_state_dict_unchanged_after_inject() -> None:
    model, pristine = tiny_lm(), tiny_lm()
    before = pristine.state_dict()
    lorahot.inject(model, "all-linear", max_rank=8, slots=2)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(_ids()), pristine(_ids()))


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "negative-control"])
def test_inject_in_training_mode_leaves_spectral_norm_state_bitwise(
    kept: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In training mode every read of a parametrized weight runs spectral norm's power
    iteration, which advances its vectors; inject reads the weights it wraps (their shapes,
    dtypes, whether they are sharded), and the state dict after it is bitwise the one before.
    The negative control lets the reads through: the vectors move."""
    from torch.nn.utils import parametrizations

    if not kept:  # the module, which the package's inject function hides
        monkeypatch.setattr(
            sys.modules["lorahot.runtime.inject"], "kept_parametrizations", lambda models: contextlib.nullcontext()
        )
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.spectral_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 4)).double()
    before = {k: v.clone() for k, v in model.train().state_dict().items()}
    lorahot.inject(model, "0|2", max_rank=4)
    after = model.state_dict()
    same = all(torch.equal(after[k], v) for k, v in before.items())
    assert same == kept


def test_inject_into_an_inference_mode_model_with_a_parametrization() -> None:
    """Inference tensors can be written only inside inference mode: inject (outside it) puts
    no parametrization state back where nothing changed, so a model made under
    ``torch.inference_mode()`` with a parametrized module (not a target) injects, unchanged."""
    from torch.nn.utils import parametrizations

    with torch.inference_mode():
        model = nn.ModuleDict({"fc": nn.Linear(8, 8), "other": nn.Linear(8, 8), "norm": nn.BatchNorm1d(8)})
        parametrizations.spectral_norm(model["other"])
    before = {k: v.clone() for k, v in model.eval().state_dict().items()}
    lorahot.inject(model, ["fc"], max_rank=4)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_base_checkpoint_loads_strictly_into_injected_model() -> None:
    model, other = tiny_lm(seed=0), tiny_lm(seed=1)
    runtime = lorahot.inject(model, [*ATTN, "embed_tokens"], max_rank=4)
    tensors, ab = make_adapter(model, {"layers.1.self_attn.v_proj": 3, "embed_tokens": 2}, seed=4)
    runtime.load(tensors)
    result = model.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        y = model(_ids())
    expected = model_reference(other, _ids(), {n: (a, b, 1.0) for n, (a, b) in ab.items()})
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_eject_restores_modules_and_bitwise_outputs() -> None:
    model = tiny_lm()
    originals = dict(model.named_modules())
    with torch.no_grad():
        before = model(_ids())
    runtime = lorahot.inject(model, "all-linear", max_rank=4)
    runtime.load(make_adapter(model, {"layers.0.self_attn.q_proj": 4}, seed=1)[0])
    with torch.no_grad():
        assert not torch.equal(model(_ids()), before)
    assert lorahot.eject(model) is model
    assert _wrapped(model) == []
    assert all(m is originals[n] for n, m in model.named_modules())
    with torch.no_grad():
        assert torch.equal(model(_ids()), before)


def test_runtime_eject_then_use_is_refused() -> None:
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    runtime.eject()
    assert _wrapped(model) == []
    with pytest.raises(lorahot.UsageError, match=r"this runtime was ejected; call lorahot\.inject again"):
        runtime.unload()


# -- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, True, 2.5, "8"])
def test_bad_max_rank(bad: object) -> None:
    model = tiny_lm()
    with pytest.raises(lorahot.UsageError, match=rf"max_rank={bad!r} must be an integer >= 1"):
        lorahot.inject(model, ["q_proj"], max_rank=bad)  # type: ignore[arg-type]
    assert _wrapped(model) == []


@pytest.mark.parametrize("bad", [0, False, 1.0])
def test_bad_slots(bad: object) -> None:
    with pytest.raises(lorahot.UsageError, match=rf"slots={bad!r} must be an integer >= 1"):
        lorahot.inject(tiny_lm(), ["q_proj"], max_rank=4, slots=bad)  # type: ignore[arg-type]


def test_max_rank_must_divide_by_conv_groups() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Conv1d(6, 6, 3, groups=3))
    with pytest.raises(lorahot.UsageError, match=r"1: conv with groups=3 needs max_rank divisible by 3; got 4"):
        lorahot.inject(model, ["0", "1"], max_rank=4)
    assert _wrapped(model) == []
    lorahot.inject(model, ["0", "1"], max_rank=6)
    assert _wrapped(model) == ["0", "1"]


def test_dtype_option_sets_buffer_dtype() -> None:
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj", "embed_tokens"], max_rank=4, dtype=torch.float64)
    for layer in runtime.layers.values():
        assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
        assert layer.lora_scale.dtype == torch.float64  # scales are at least float32, float64 for float64 buffers
    tensors, ab = make_adapter(model, {"layers.0.self_attn.q_proj": 2, "embed_tokens": 3}, seed=2)
    runtime.load(tensors)
    with torch.no_grad():
        y = model(_ids())
    assert y.dtype == torch.float32
    expected = model_reference(tiny_lm(), _ids(), {n: (a, b, 1.0) for n, (a, b) in ab.items()})
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_default_dtype_follows_each_base_weight() -> None:
    model = nn.Sequential(nn.Linear(4, 4).double(), nn.Linear(4, 4).to(torch.bfloat16))
    runtime = lorahot.inject(model, ["0", "1"], max_rank=2)
    assert runtime.layers["0"].lora_A.dtype == torch.float64
    assert runtime.layers["1"].lora_A.dtype == torch.bfloat16
    assert runtime.layers["0"].lora_scale.dtype == torch.float64
    assert runtime.layers["1"].lora_scale.dtype == torch.float32
    assert len(runtime.buffers.arenas) == 2


@pytest.mark.parametrize("bad", [torch.int8, "float16", torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64])
def test_bad_dtype(bad: object) -> None:
    with pytest.raises(lorahot.UsageError, match=r"dtype=.* must be a floating-point torch\.dtype"):
        lorahot.inject(tiny_lm(), ["q_proj"], max_rank=4, dtype=bad)  # type: ignore[arg-type]


def test_module_without_float_weights_needs_dtype() -> None:
    class Stateless(nn.Module):
        in_features, out_features = 3, 3

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(Stateless())
    with pytest.raises(lorahot.UsageError, match=r"0: base weights are None, not floating point; pass dtype="):
        lorahot.inject(model, ["0"], max_rank=2)
    assert _wrapped(model) == []
    runtime = lorahot.inject(model, ["0"], max_rank=2, dtype=torch.float32)
    assert runtime.layers["0"].lora_A.shape == (2, 3)


def test_wrapper_forwards_base_attributes():
    conv, lin = nn.Conv2d(3, 4, 3), nn.Linear(5, 6)
    model = nn.Sequential(conv, lin)
    lorahot.inject(model, ["0", "1"], max_rank=4)
    assert model[0].weight is conv.weight and model[0].kernel_size == (3, 3)
    assert model[1].in_features == 5 and model[1].bias is lin.bias
    with pytest.raises(AttributeError, match="no_such_attribute"):
        _ = model[1].no_such_attribute


@pytest.mark.parametrize(("name", "value"), [("max_rank", 10**30), ("max_rank", 65537), ("slots", 10**9)])
def test_absurd_sizes_are_bounded(name: str, value: int) -> None:
    model = tiny_lm()
    kwargs = {"max_rank": 4, name: value}
    with pytest.raises(lorahot.UsageError, match=rf"^{name}={value} is absurd; it must be at most \d+\.$"):
        lorahot.inject(model, ["q_proj"], **kwargs)  # type: ignore[arg-type]
    assert _wrapped(model) == []


def test_buffers_beyond_the_devices_memory_are_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    inject_module = sys.modules["lorahot.runtime.inject"]  # (lorahot.runtime.inject is the function)

    monkeypatch.setattr(inject_module, "_capacity", lambda device: 1000)
    model = tiny_lm()
    with pytest.raises(
        lorahot.UsageError,
        match=r"^the LoRA buffers need 1,568 bytes on cpu \(max_rank=4, slots=1\), more than its 1,000 bytes of "
        r"memory\. Inject with a smaller max_rank or fewer slots\.$",
    ):
        lorahot.inject(model, ["q_proj"], max_rank=4)
    assert _wrapped(model) == []
    monkeypatch.undo()
    assert lorahot.inject(model, ["q_proj"], max_rank=4).nbytes == 1568  # the estimate is exact


def test_an_allocation_failure_is_a_usage_error_with_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    inject_module = sys.modules["lorahot.runtime.inject"]  # (lorahot.runtime.inject is the function)

    def out_of_memory(*args: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8 GiB")

    monkeypatch.setattr(inject_module, "BufferManager", type("Failing", (), {"nbytes_needed": staticmethod(
        inject_module.BufferManager.nbytes_needed), "__init__": out_of_memory}))  # fmt: skip
    model = tiny_lm()
    with pytest.raises(
        lorahot.UsageError,
        match=r"^allocating the LoRA buffers \(1,568 bytes on cpu; max_rank=4, slots=1\) failed: CUDA out of memory\. "
        r"Tried to allocate 8 GiB\. Inject with a smaller max_rank or fewer slots, or free memory\.$",
    ):
        lorahot.inject(model, ["q_proj"], max_rank=4)
    assert _wrapped(model) == []


def test_meta_weights_are_refused() -> None:
    with torch.device("meta"):
        model = tiny_lm()
    with pytest.raises(lorahot.UsageError, match=r"^layers\.0\.self_attn\.q_proj: base weights are on the meta device"):
        lorahot.inject(model, ["q_proj"], max_rank=4)
    assert _wrapped(model) == []


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        (42, r"^targets must be a non-empty list of module names, a regex, 'all-linear' or a callable; got 42\.$"),
        ([""], r"^targets must be a non-empty list .*; got \[''\]\.$"),
        (lambda name, module: 1 / 0, r"^targets callable raised ZeroDivisionError on module 'embed_tokens'"),
    ],
    ids=["int", "empty_name", "raising_callable"],
)
def test_targets_of_the_wrong_kind(targets: object, message: str) -> None:
    model = tiny_lm()
    with pytest.raises(lorahot.UsageError, match=message):
        lorahot.inject(model, targets, max_rank=4)  # type: ignore[arg-type]
    assert _wrapped(model) == []


def test_a_refused_wrapper_leaves_every_earlier_module_in_place() -> None:
    class Shifted(nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) + 1

    model = tiny_lm()
    model.embed_tokens = Shifted(32, 16)
    with pytest.raises(lorahot.UsageError, match=r"^embed_tokens: Shifted overrides nn\.Embedding\.forward"):
        lorahot.inject(model, ["q_proj", "embed_tokens"], max_rank=4)
    assert _wrapped(model) == []


# -- modules whose parent reads their weight without calling them ------------------------------


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize(
    ("model", "target"),
    [
        (_Attention(), "attn.out_proj"),
        (nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1), "linear1"),
    ],
)
def test_a_linear_its_parent_never_calls_is_refused(model: nn.Module, target: str) -> None:
    """nn.MultiheadAttention computes with out_proj.weight in F.multi_head_attention_forward, and
    nn.TransformerEncoderLayer's inference fast path reads linear1/linear2 itself: a LoRA there
    loaded and changed nothing."""
    with pytest.raises(lorahot.UsageError, match="computes with its weight directly"):
        lorahot.inject(model, [target], max_rank=2)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())


def test_all_linear_leaves_out_linears_their_parents_never_call() -> None:
    model = _Attention()
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    assert list(runtime.layers) == ["proj"]
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)
    with pytest.raises(lorahot.UsageError, match=r"leaves out layers\.0\.self_attn\.out_proj, layers\.0\.linear1"):
        lorahot.inject(encoder, "all-linear", max_rank=2)


def _with_a_layer_compiled_alone() -> nn.Sequential:
    """Two linears, the second compiled on its own before inject (regional compilation)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1] = torch.compile(model[1], backend="eager")
    return model


@pytest.mark.parametrize(
    "targets",
    [r"1\._orig_mod", ["_orig_mod"], lambda name, module: isinstance(module, nn.Linear)],
    ids=["regex", "names", "callable"],
)
def test_a_module_compiled_alone_before_inject_is_refused_where_its_wrapper_would_never_call_the_lora(
    targets: Any,
) -> None:
    """``model[1] = torch.compile(model[1])`` before inject: the OptimizedModule's forward is bound
    to the Linear it was made of, so a LoRA layer put under its ``_orig_mod`` never ran. inject took
    it ("all-linear" too), a load keyed ``1._orig_mod`` loaded, and the model computed the base
    (2.0 off the float64 reference), silently. Such a target is now refused naming the wrapper and
    the fix, nothing changed; "all-linear" leaves it out; and inject first, compile after computes
    the adapter, as the README's order says."""
    model = _with_a_layer_compiled_alone()
    wrapper, inner = model[1], model[1]._orig_mod
    with pytest.raises(
        lorahot.UsageError,
        match=r"1\._orig_mod: it is the module that model\.1 = torch\.compile\(\.\.\.\) was made of before inject.*"
        r"never apply\. Inject first and compile after \(model\.1 = torch\.compile\(model\.1\) after inject",
    ):
        lorahot.inject(model, targets, max_rank=4)
    assert model[1] is wrapper and model[1]._orig_mod is inner and not _wrapped(model)
    alone = torch.compile(nn.Linear(8, 8), backend="eager")  # the model given to inject is the wrapper
    with pytest.raises(lorahot.UsageError, match=r"_orig_mod: it is the layer torch\.compile\(\.\.\.\) was made of.*"):
        lorahot.inject(alone, ["_orig_mod"], max_rank=4)
    assert not _wrapped(alone)
    runtime = lorahot.inject(model, "all-linear", max_rank=4)
    assert list(runtime.layers) == ["0"]
    runtime.eject()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    base = copy.deepcopy(model)
    runtime = lorahot.inject(model, "all-linear", max_rank=4)
    model[1] = torch.compile(model[1], backend="eager")  # after inject: it compiles the LoRA layer
    tensors, ab = make_adapter(base, {"0": 2, "1": 3}, seed=1)
    runtime.load(tensors)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    expected = model_reference(base, x, {n: (a, b, 1.0) for n, (a, b) in ab.items()})
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_a_module_compiled_alone_before_inject_named_as_a_target_is_refused_with_the_fix() -> None:
    """A target naming the compiled wrapper itself: a conv's was refused with 'Narrow targets to
    exclude it', which drops the LoRA the caller wanted, and a linear's in merged mode as 'a plain
    tensor attribute' to register as a parameter; both messages now say to inject first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    model[0] = torch.compile(model[0], backend="eager")
    with pytest.raises(
        lorahot.UsageError,
        match=r"0: cannot add LoRA to OptimizedModule\..*It is torch\.compile's wrapper of a Conv2d, made before "
        r"inject: inject first and compile after \(model\.0 = torch\.compile\(model\.0\) after inject",
    ):
        lorahot.inject(model, ["0"], max_rank=2)
    assert not _wrapped(model)
    linear = nn.Sequential(torch.compile(nn.Linear(4, 4), backend="eager"))  # wrapped as a Linear-like module
    with pytest.raises(
        lorahot.UsageError,
        match=r"0: its weight is the parameter of the Linear that torch\.compile wrapped before inject.*"
        r"inject first and compile it after",
    ):  # merged mode rewrites no weight of the wrapper: it said 'a plain tensor attribute', and to register one
        lorahot.inject(linear, ["0"], max_rank=2, merged=True)
    assert not _wrapped(linear)


# -- weights computed on each call, hooks, lazy modules ------------------------------------------


@pytest.mark.parametrize("kind", ["parametrizations", "hook"])
def test_merged_mode_refuses_a_weight_norm_weight_and_unmerged_applies_the_adapter(kind: str) -> None:
    """A weight a parametrization (or weight_norm's pre-hook) recomputes on each call: merged mode
    wrote the adapter into a tensor the next call threw away (the output stayed the base's)."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 4))
        if kind == "parametrizations":
            torch.nn.utils.parametrizations.weight_norm(net[0])
        else:
            with pytest.warns(FutureWarning):
                torch.nn.utils.weight_norm(net[0])
        return net

    with pytest.raises(lorahot.UsageError, match="computed from other tensors on each call"):
        lorahot.inject(model(), "0", max_rank=2, merged=True)
    net, x = model(), torch.randn(3, 6)
    with torch.no_grad():
        base = net(x)
    runtime = lorahot.inject(net, "0", max_rank=2)  # a regex: "0" alone, not the parametrization's "...weight.0"
    tensors, ab = make_adapter(net, {"0": 2}, seed=1)
    runtime.load(tensors)
    a, b = ab["0"]
    with torch.no_grad():
        torch.testing.assert_close(net(x), base + x @ a.T @ b.T)


@pytest.mark.parametrize("merged", [False, True])
def test_a_lazy_module_is_refused_until_materialized(merged: bool) -> None:
    """Merged mode's checks read the target's weight first: they raised the lazy parameter's
    ValueError, surfaced as an UnexpectedError, before the lazy target's own refusal."""
    model = nn.Sequential(nn.LazyLinear(4))
    with pytest.raises(
        lorahot.UsageError, match=r"^0: LazyLinear has not been materialized yet .*run one forward of the model before"
    ):
        lorahot.inject(model, ["0"], max_rank=2, merged=merged)
    assert type(model[0]) is nn.LazyLinear
    model(torch.randn(2, 6))
    assert list(lorahot.inject(model, ["0"], max_rank=2, merged=merged).layers) == ["0"]


@pytest.mark.parametrize("several", [False, True], ids=["model", "components"])
@pytest.mark.parametrize("kind", ["lora", "diff"])
def test_plan_targets_refuses_a_lazy_target_with_inject_s_reason(kind: str, several: bool) -> None:
    """plan_targets compared a file's shapes with a lazy module's unknown ones (a LazyLinear's
    in_features is 0 until its first call) and refused the LoRA as 'A has shape (2, 5),
    expected (r, 0)', and a diff (merged mode's) as a weight of another shape, where inject
    refuses the target as not materialized yet. It now gives inject's refusal; once a
    call materializes the module, it plans, and the plan injects and loads. A lazy module no
    key names plans as any other."""
    g = torch.Generator().manual_seed(0)
    sd = (
        {"base_model.model.0.lora_A.weight": torch.randn(2, 5, generator=g), "0.lora_B.weight": torch.randn(4, 2)}
        if kind == "lora"
        else {"lora_unet_0.diff": torch.randn(4, 5, generator=g)}
    )
    if kind == "lora":
        sd["base_model.model.0.lora_B.weight"] = sd.pop("0.lora_B.weight")
    model = nn.Sequential(nn.LazyLinear(4), nn.LazyLinear(3))
    target: Any = {"unet": model} if several else model
    where = "unet.0" if several else "0"
    with pytest.raises(lorahot.UsageError) as planned:
        lorahot.plan_targets(dict(sd), target)
    with pytest.raises(lorahot.UsageError) as injected:
        lorahot.inject(model, ["0"], max_rank=2, merged=kind == "diff")
    assert str(planned.value) == str(injected.value).replace("0:", f"{where}:", 1), str(planned.value)
    assert all(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
    model(torch.randn(2, 5))  # both materialized
    plan = lorahot.plan_targets(dict(sd), target)
    assert plan.targets == ({"unet": ["0"]} if several else ["0"])
    lorahot.inject(target, plan.targets, **plan.inject_options()).load(dict(sd))


class _BesideLazy(nn.Module):
    """A target beside lazy modules no call has materialized yet (a Linear and a BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4, dtype=torch.float64)
        self.head = nn.LazyLinear(3, dtype=torch.float64)
        self.unused = nn.LazyBatchNorm1d(dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(x))


@pytest.mark.parametrize(("merged", "fused"), [(False, True), (False, False), (True, True)])
def test_a_model_holding_lazy_modules_outside_the_targets_injects_and_computes(merged: bool, fused: bool) -> None:
    """Lazy modules that are not targets, not yet materialized: inject's scans of every tensor
    of the model (merged mode's ties, the widening's shared storages, a load's aliases) used each
    one, which raises before its module's first call, so inject failed with an UnexpectedError
    whatever the targets. They hold no memory yet and are now skipped; the first call
    materializes them, and loads, the forward and eject then work as for any model."""
    model = _BesideLazy()
    proj = copy.deepcopy(model.proj)
    tensors, ab = make_adapter(model, {"proj": 2}, dtype=torch.float64)
    runtime = lorahot.inject(model, ["proj"], max_rank=2, merged=merged, fused=fused)
    runtime.load(tensors)
    x = torch.randn(3, 5, dtype=torch.float64)
    a, b = ab["proj"]
    with torch.no_grad():
        y = model(x)  # materializes head
        torch.testing.assert_close(y, model.head(proj(x) + x @ a.T @ b.T), rtol=1e-12, atol=1e-12)
        runtime.load(tensors, scale=0.5)
        torch.testing.assert_close(model(x), model.head(proj(x) + 0.5 * x @ a.T @ b.T), rtol=1e-12, atol=1e-12)
    runtime.eject()
    assert type(model.proj) is nn.Linear and torch.equal(model.proj.weight, proj.weight)
    assert isinstance(model.unused.weight, nn.parameter.UninitializedParameter)


class _HoldsLazy(nn.Module):
    """Linear-like by its declared sizes, computing through a lazy Linear inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.LazyLinear(3)
        self.in_features, self.out_features = 4, 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_a_target_holding_a_lazy_module_is_refused_until_materialized() -> None:
    """A target whose lazy submodule was not materialized yet: the probe forward materialized
    it (inject changed the model: a new class, new parameters), and with the probe putting
    parameters back it raised on the uninitialized one, read as the forward's own error. Now it
    is refused as a lazy target is, nothing changed."""
    model = nn.Sequential(_HoldsLazy())
    with pytest.raises(lorahot.UsageError, match=r"^0: _HoldsLazy has not been materialized yet .*run one forward"):
        lorahot.inject(model, ["0"], max_rank=2)
    assert type(model[0].inner) is nn.LazyLinear
    model(torch.randn(2, 4))
    assert list(lorahot.inject(model, ["0"], max_rank=2).layers) == ["0"]


@pytest.mark.parametrize("hooked", ["pre-hook", "hook", "forward"])
def test_a_linear_with_hooks_is_not_widened_and_its_hooks_run(hooked: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wide path (CUDA; widened on the CPU here) computes F.linear from the weight without
    calling the base module: its hooks, or an instance forward (accelerate's), were skipped."""
    from lorahot.runtime import wide

    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8))
    plain = net[0].forward
    if hooked == "pre-hook":
        net[0].register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    elif hooked == "hook":
        net[0].register_forward_hook(lambda m, args, out: out + 100.0)
    else:
        net[0].forward = lambda x: plain(x) + 100.0  # type: ignore[method-assign]
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = net(x)
    runtime = lorahot.inject(net, ["0"], max_rank=2)
    runtime.load(
        {"base_model.model.0.lora_A.weight": torch.zeros(2, 8), "base_model.model.0.lora_B.weight": torch.zeros(8, 2)}
    )
    assert not net[0].wide
    with torch.no_grad():
        assert torch.equal(net(x), want)
    plain_net = nn.Sequential(nn.Linear(8, 8))
    lorahot.inject(plain_net, ["0"], max_rank=2)
    assert plain_net[0].wide  # the control: a plain linear is widened here


def test_load_state_dict_reports_keys_as_the_checkpoint_names_them() -> None:
    """Missing and unexpected keys of a wrapped module read as on the plain model (they read
    ``0.base_layer.bias``), and strict loading names them so too."""
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model = copy.deepcopy(plain)
    lorahot.inject(model, ["0"], max_rank=2)
    part = {
        "0.weight": torch.zeros(4, 4),
        "0.extra": torch.zeros(1),
        "1.weight": torch.zeros(2, 4),
        "1.bias": torch.zeros(2),
    }
    want = plain.load_state_dict(dict(part), strict=False)
    got = model.load_state_dict(dict(part), strict=False)
    assert (
        (got.missing_keys, got.unexpected_keys)
        == (want.missing_keys, want.unexpected_keys)
        == (["0.bias"], ["0.extra"])
    )
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0\.bias"') as info:
        model.load_state_dict(dict(part))
    assert "base_layer" not in str(info.value)


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("where", ["wrapping", "runtime"])
def test_an_inject_failing_midway_leaves_the_model_as_it_was(
    where: str, error: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault or Ctrl-C after the first wrapper took its module's place left wrappers with no
    buffers in the model (its forward raised, a new inject refused); one in the runtime's set-up
    left lorahot's forward pre-hook on the model. Both put back; a new inject then works."""
    from lorahot.layers.base import LoRALayer
    from lorahot.runtime import lora_runtime

    model = tiny_lm(0, dim=32, hidden=48)
    ids = token_ids((2, 6), 32, seed=1)
    with torch.no_grad():
        base = model(ids)
    hooks = {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()}
    if where == "wrapping":  # the second layer's attach, after two modules were replaced
        original, calls = LoRALayer.attach, []

        def attach(self: LoRALayer) -> None:
            calls.append(1)
            if len(calls) == 2:
                raise error("midway")
            original(self)

        monkeypatch.setattr(LoRALayer, "attach", attach)
    else:  # the runtime's last step, after its hooks were installed
        monkeypatch.setattr(lora_runtime.RuntimeState, "on_eject", lambda self, cb: (_ for _ in ()).throw(error("x")))
    with pytest.raises((error, lorahot.UnexpectedError)):
        lorahot.inject(model, ["q_proj", "v_proj"], max_rank=8)
    monkeypatch.undo()
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()} == hooks
    with torch.no_grad():
        assert torch.equal(model(ids), base)
    lorahot.inject(model, ["q_proj", "v_proj"], max_rank=8)


def test_float32_buffers_on_a_float16_model_keep_the_intermediate_in_range() -> None:
    """Every factor fits float16, but ``x A^T s`` (scale 20000) passes 65504. PEFT (adapters in
    float32 on float16 models) and the float64 reference are finite; so is lorahot with
    ``dtype=torch.float32``, and with float16 buffers (the default on a float16 weight), whose
    library formula computes in float32 (it overflowed to Inf and gave NaN before; the CUDA
    paths: ``tests/unit/layers/test_float16_range.py``)."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64).half()
    model = nn.Sequential(layer)
    x = (torch.randn(4, 64) * 4).half()
    a, b = torch.randn(4, 64), torch.randn(64, 4) * 1e-4
    adapter = {"base_model.model.0.lora_A.weight": a, "base_model.model.0.lora_B.weight": b}
    config = {"r": 4, "lora_alpha": 80000}
    ref = x.double() @ (layer.weight.double() + 20000 * b.double() @ a.double()).T + layer.bias.double()
    assert ref.abs().max() < 60000  # the output fits float16; the intermediate does not
    outputs = {}
    for dtype in (None, torch.float32):
        runtime = lorahot.inject(model, ["0"], max_rank=8, dtype=dtype)
        runtime.load(adapter, config=config)
        with torch.no_grad():
            outputs[dtype] = model(x)
        lorahot.eject(model)
    for out in outputs.values():
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=0.5)


@pytest.mark.parametrize("targets", [["l"], ["l", "k"], ["l.weight_holder"]], ids=["alone", "with-another", "inside"])
def test_a_torchscript_target_is_refused_and_the_model_left_as_it_was(targets: list[str]) -> None:
    """A scripted submodule (or a module inside one): inject failed hooking it with TorchScript's
    RuntimeError, an UnexpectedError; it is refused, naming it, before anything is wrapped."""

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight_holder = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.weight_holder(x)
            return out

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = torch.jit.script(Holder() if targets == ["l.weight_holder"] else nn.Linear(4, 4))
            self.k = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.k(self.l(x))
            return out

    model, x = Model(), torch.randn(2, 4)
    kinds = [type(m) for m in model.modules()]
    with torch.no_grad():
        before = model(x)
    with pytest.raises(lorahot.UsageError, match=r"^l(\.weight_holder)?: a TorchScript module.*Inject into the eager"):
        lorahot.inject(model, targets, max_rank=2)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert [type(m) for m in model.modules()] == kinds and not model.k._load_state_dict_pre_hooks


@pytest.mark.parametrize("targets", ["all-linear", ["weight"], ".*"])
def test_a_model_that_is_one_layer_is_told_to_go_in_a_container(targets: object) -> None:
    """A bare nn.Linear given to inject: the message listed its submodules' names (none: "Some
    module names: ."); it says the model is one layer and how to wrap it."""
    with pytest.raises(lorahot.UsageError, match=r"the model is a single Linear with no submodules.*nn\.Sequential"):
        lorahot.inject(nn.Linear(4, 4), targets, max_rank=2)


def _fsdp(kind: str, model: nn.Module, mesh: Any) -> tuple[nn.Module, str]:
    """``model`` sharded by FSDP as ``kind`` says, and the name its first linear has then."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    if kind == "fsdp1":
        return FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), use_orig_params=True
        ), "_fsdp_wrapped_module.0"
    if kind == "fully_shard-layer":
        fully_shard(model[0], mesh=mesh)
    return fully_shard(model, mesh=mesh), "0"


@pytest.mark.parametrize("kind", ["fully_shard-root", "fully_shard-layer", "fsdp1"])
def test_a_layer_fsdp_shards_is_refused_at_inject_and_plan_and_nothing_changes(kind: str, one_rank: Any) -> None:
    """FSDP keeps a layer's parameters sharded between calls (FSDP2: DTensors, which inject took
    for a column-parallel weight: on 2 ranks the first forward raised a raw size mismatch) and
    gathers them for each call: inject and plan_targets refuse such a layer, naming it and the
    fix, before anything is wrapped."""
    torch.manual_seed(0)
    model, name = _fsdp(kind, nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), one_rank)
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = model(x)
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    params = {n: (type(p), p.detach().clone()) for n, p in model.named_parameters()}
    fix = r"inject into the model without fully_shard or FullyShardedDataParallel .*exclude this module from targets\.$"
    message = (
        rf"^{re.escape(name)}: its parameters are sharded by FSDP \(fully_shard or FullyShardedDataParallel.*{fix}"
    )
    with pytest.raises(lorahot.UsageError, match=message):
        lorahot.inject(model, ["0"], max_rank=4)
    a, b = torch.ones(2, 8), torch.ones(8, 2)
    with pytest.raises(lorahot.UsageError, match=message):
        lorahot.plan_targets({f"{name}.lora_A.weight": a, f"{name}.lora_B.weight": b}, model)
    assert [(n, type(m)) for n, m in model.named_modules()] == kinds
    for n, p in model.named_parameters():
        assert type(p) is params[n][0] and torch.equal(p.detach(), params[n][1]), n
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_a_tensor_parallel_weight_outside_fsdp_still_injects(one_rank: Any) -> None:
    """The refusal is FSDP's, not every DTensor's: a weight ``distribute_tensor`` sharded
    ``Shard(0)`` (as ``ColwiseParallel`` does) still gets a sharded LoRA layer."""
    from torch.distributed.tensor import Shard, distribute_tensor

    model = nn.Sequential(nn.Linear(8, 8))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), one_rank, [Shard(0)]))
    lorahot.inject(model, ["0"], max_rank=4)
    assert isinstance(model[0], lorahot.ShardedLoRALinear)


def test_fsdp_sharding_a_model_after_inject_is_refused_at_the_next_call_naming_fsdp(one_rank: Any) -> None:
    """``fully_shard`` after inject makes the wrapped layer's weight a DTensor: the next load
    says FSDP sharded it (it said to parallelize the model and inject again, which inject then
    refuses), and writes nothing."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    adapter = {"0.lora_A.weight": torch.randn(2, 8), "0.lora_B.weight": torch.randn(8, 2)}
    runtime.load(adapter)
    fully_shard(model, mesh=one_rank)
    buffers = {n: b.clone() for n, b in model[0].named_buffers()}
    message = (
        r"^0: its parameters are sharded by FSDP .* FSDP sharded it after inject: call runtime\.eject\(\) first\.$"
    )
    with pytest.raises(lorahot.UsageError, match=message):
        runtime.load({k: 2 * v for k, v in adapter.items()})
    assert all(torch.equal(b, buffers[n]) for n, b in model[0].named_buffers())


@pytest.mark.parametrize("kind", ["flat-parameters", "original-parameters", "a-block-wrapped"])
def test_fsdp1_wrapping_a_model_after_inject_is_refused_at_the_next_call_naming_fsdp(
    kind: str, one_rank: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``FullyShardedDataParallel`` after inject puts the layers' weights into its flat
    parameters (``use_orig_params=False``: the weights leave their modules; ``True``: they stay
    as views of it; or a block on the path becomes an FSDP wrapper), which it shards between
    calls: the next call says FSDP sharded the layer, and writes nothing. (A load went on: on 2
    ranks, merged mode then computed wrong outputs, since the next all-gather wrote the shards
    over the merged weights.) The LoRA layers now refuse FSDP1's wrapping itself
    (:func:`test_fsdp1_wrapping_an_injected_model_is_refused_before_it_changes_anything`): this
    is the runtime's own check behind that, for a wrapping they did not see (their refusal is
    switched off here)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8)), nn.Linear(8, 8))
    runtime = lorahot.inject(model, ["0.0"], max_rank=4, slots=2)
    adapter = {"0.0.lora_A.weight": torch.randn(2, 8), "0.0.lora_B.weight": torch.randn(8, 2)}
    runtime.load(adapter)
    runtime.load(adapter, slot=1)
    layer = model[0][0]
    block = model[0]
    options: dict[str, Any] = {"use_orig_params": kind == "original-parameters"}
    if kind == "a-block-wrapped":
        options["auto_wrap_policy"] = partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m is block)
    monkeypatch.setattr(lorahot.layers.base, "_refuse_fsdp1", lambda layer: None)
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), **options)
    monkeypatch.undo()
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = wrapped(x)
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    where = {"flat-parameters": " on the model", "original-parameters": "", "a-block-wrapped": " on 0"}[kind]
    message = (
        rf"^0\.0: its parameters are sharded by FSDP \(fully_shard or FullyShardedDataParallel{where}\), which .* "
        r"FSDP sharded it after inject: call runtime\.eject\(\) first\.$"
    )
    for call in (
        lambda: runtime.load({k: 2 * v for k, v in adapter.items()}),
        lambda: runtime.set_scale(0.5),
        lambda: runtime.activate(1),
        lambda: runtime.unload(),
    ):
        with pytest.raises(lorahot.UsageError, match=message):
            call()
    assert all(torch.equal(b, buffers[n]) for n, b in layer.named_buffers())
    assert runtime.active_slot == 0
    with torch.no_grad():
        assert torch.equal(wrapped(x), before)


@pytest.mark.parametrize("orig", [True, False], ids=["original-parameters", "flat-parameters"])
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
@pytest.mark.parametrize("where", ["first", "last", "in-a-block-wrapped", "every-linear-wrapped"])
def test_fsdp1_wrapping_an_injected_model_is_refused_before_it_changes_anything(
    where: str, merge: bool, orig: bool, one_rank: Any
) -> None:
    """``FullyShardedDataParallel`` after inject is refused naming FSDP before FSDP changed
    anything: every parameter and buffer bitwise and the same objects (the same storage,
    registered on the same modules), no module wrapped or left marked for dynamo as FSDP's, the
    forward bitwise, and the runtime still serving (a later load against the float64
    reference). Before, it was refused midway or broke the model: a merged layer (its adapter
    merged into its own weight) refused where FSDP set the weight's view, after FSDP had taken
    the weight off the base layer (the forward then raised AttributeError) and moved the other
    layers' weights into its flat parameter; with use_orig_params=True an unmerged layer was
    wrapped, and on 2 gloo ranks its first forward was refused so, the weight taken off; an
    auto-wrap policy wrapping every Linear left the layers before the first base layer
    replaced by FSDP wrappers when the LoRA layer refused its base layer's; the rest was
    wrapped, with every runtime call refused after it."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy, lambda_auto_wrap_policy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)))
    reference = copy.deepcopy(model).double()
    target = {"first": "0", "last": "1.1", "in-a-block-wrapped": "1.1", "every-linear-wrapped": "1.1"}[where]
    runtime = lorahot.inject(model, [target], max_rank=4, merged=merge)
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    runtime.load({f"{target}.lora_A.weight": a, f"{target}.lora_B.weight": b})
    x = torch.randn(2, 8)
    with torch.no_grad():
        before = model(x)
    tensors = {n: (t, t.detach().clone(), t.data_ptr()) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    registered = {n: (type(m), dict(m._parameters), dict(m._buffers)) for n, m in model.named_modules()}
    options: dict[str, Any] = {"use_orig_params": orig}
    if where == "in-a-block-wrapped":
        block = model[1]
        options["auto_wrap_policy"] = partial(lambda_auto_wrap_policy, lambda_fn=lambda m: m is block)
    if where == "every-linear-wrapped":
        options["auto_wrap_policy"] = ModuleWrapPolicy({nn.Linear})
    message = (
        rf"^{re.escape(target)}: FSDP \(FullyShardedDataParallel, applied after inject\) would put its base layer's "
        r"weight into its flat parameters, .* FSDP's wrapping was refused before it changed any parameter or "
        r"module: call runtime\.eject\(\) before wrapping the model in FSDP\.$"
    )
    with pytest.raises(lorahot.UsageError, match=message):
        FullyShardedDataParallel(model, device_id=torch.device("cpu"), **options)
    for n, (t, values, ptr) in tensors.items():
        now = model.get_parameter(n) if n in dict(model.named_parameters()) else model.get_buffer(n)
        assert now is t and t.data_ptr() == ptr and torch.equal(t.detach(), values), n
        assert not getattr(t, "_fsdp_flattened", False), n
    assert {n: (type(m), dict(m._parameters), dict(m._buffers)) for n, m in model.named_modules()} == registered
    assert not [n for n, m in model.named_modules() if hasattr(m, "_is_fsdp_managed_module")]
    with torch.no_grad():
        assert torch.equal(model(x), before)
    runtime.load({f"{target}.lora_A.weight": 2 * a, f"{target}.lora_B.weight": b})  # still serving
    with torch.no_grad():
        reference.get_submodule(target).weight += 2 * b.double() @ a.double()
        assert torch.allclose(model(x).double(), reference(x.double()), rtol=0, atol=1e-5)


# -- host cost: what inject does per layer does not grow with the model ----------------------


def _blocks(blocks: int) -> tuple[nn.Module, list[str]]:
    """``blocks`` blocks of two linears each among ten other modules (norms, activations,
    containers), and the qualified names of the linears."""
    torch.manual_seed(0)

    def block() -> nn.Module:
        return nn.ModuleDict(
            {
                "norm": nn.LayerNorm(4),
                "attn": nn.ModuleDict({"q": nn.Linear(4, 4), "drop": nn.Dropout(0.0), "skip": nn.Identity()}),
                "mlp": nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Sequential(nn.ReLU(), nn.Identity())),
                "acts": nn.ModuleList([nn.SiLU(), nn.Tanh()]),
            }
        )

    model = nn.Sequential(nn.ModuleDict({"blocks": nn.ModuleList([block() for _ in range(blocks)])}))
    return model, [f"0.blocks.{b}.{p}" for b in range(blocks) for p in ("attn.q", "mlp.0")]


def _inject_calls(blocks: int, second: bool) -> int:
    """The calls of one inject of every linear by name into a model of ``blocks`` blocks (with
    ``second``, of the second linear of each block beside a runtime holding the first)."""
    model, names = _blocks(blocks)
    if second:
        lorahot.inject(model, names[0::2], max_rank=2)
        names = names[1::2]
    return count_calls(lambda: lorahot.inject(model, names, max_rank=2))


@pytest.mark.parametrize("second", [False, True], ids=["one runtime", "beside another"])
def test_inject_s_work_per_layer_does_not_grow_with_the_layers(second: bool) -> None:
    """A list of names was matched by comparing every module's name with every entry, and the
    names inject found were compared pairwise (a match inside another) and each with every
    layer already in the model: an SDXL UNet's 700 layers by name took seconds. Each is now a
    lookup per level of the name's path, so four times the layers cost at most four times the
    calls."""
    _inject_calls(2, second)  # first-call costs (imports, compiled patterns) out of the counts
    small, large = _inject_calls(8, second), _inject_calls(32, second)
    assert large <= 4 * small, (small, large)


def test_matching_by_name_keeps_its_semantics() -> None:
    """An entry matches a name equal to it or ending in ``"." + entry`` (an entry of several
    levels too, and a whole dotted name); a name that ends like one without the dot does not."""
    model = nn.Sequential(
        nn.ModuleDict({"attn": nn.ModuleDict({"q": nn.Linear(2, 2), "xq": nn.Linear(2, 2)}), "q": nn.Linear(2, 2)})
    )
    runtime = lorahot.inject(model, ["attn.q", "0.q"], max_rank=2)
    assert list(runtime.layers) == ["0.attn.q", "0.q"]
    lorahot.eject(model)
    runtime = lorahot.inject(model, ["q"], max_rank=2)
    assert list(runtime.layers) == ["0.attn.q", "0.q"]


@pytest.mark.parametrize("placements", ["Replicate", "2-D mesh, Replicate and Shard(0)", "2-D mesh, Shard(0) twice"])
def test_a_tensor_parallel_weight_placed_otherwise_is_refused_and_nothing_changes(
    placements: str, one_rank: Any
) -> None:
    """A DTensor weight that is not ``Shard(0)`` or ``Shard(1)`` on a 1-D mesh (replicated, or on
    a mesh of two dimensions, as tensor parallelism combined with FSDP or data parallelism puts
    it): inject refuses it naming the placements and the mesh, and nothing changes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh, placed = {
        "Replicate": (one_rank, [Replicate()]),
        "2-D mesh, Replicate and Shard(0)": (init_device_mesh("cpu", (1, 1)), [Replicate(), Shard(0)]),
        "2-D mesh, Shard(0) twice": (init_device_mesh("cpu", (1, 1)), [Shard(0), Shard(0)]),
    }[placements]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, placed))
    params = {n: p.detach().to_local().clone() for n, p in model.named_parameters() if hasattr(p, "to_local")}
    message = rf"on a {mesh.ndim}-D mesh with placements \({re.escape(', '.join(map(repr, placed)))},?\);.*Exclude"
    with pytest.raises(lorahot.UsageError, match=message):
        lorahot.inject(model, ["0"], max_rank=4)
    assert type(model[0]) is nn.Linear
    assert all(torch.equal(p.detach().to_local(), params[n]) for n, p in model.named_parameters() if n in params)


class _ReadDirectly(nn.Module):
    """An nn.MultiheadAttention (out_proj read by F.multi_head_attention_forward), an
    nn.TransformerEncoderLayer (linear1, linear2 and its attention's out_proj read by its fast
    path) and a Linear that is called, in float64."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.double().eval()  # no dropout: the encoder layer's inference path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.enc(self.attn(x, x, x, need_weights=False)[0]))


@pytest.mark.parametrize("module", ["attn.out_proj", "enc.self_attn.out_proj", "enc.linear1"])
def test_a_file_module_on_a_linear_its_parent_never_calls_is_refused_at_load_with_why(module: str) -> None:
    """A file's module on a Linear its parent reads without calling (nn.MultiheadAttention's
    out_proj, nn.TransformerEncoderLayer's linear1) was refused at load as matching no injected
    layer, with the hint to inject it, which inject refuses. The load now says why no LoRA layer
    can serve it (the reason inject gives) and what to do; every parameter and buffer bitwise
    unchanged; strict=False skips exactly its keys and lands the rest at the float64 reference."""
    model = _ReadDirectly()
    runtime = lorahot.inject(model, "all-linear", max_rank=4)
    assert list(runtime.layers) == ["proj"]
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name in ("proj", module):
        sd[f"{name}.lora_A.weight"] = torch.randn(2, 8, generator=g, dtype=torch.float64)
        sd[f"{name}.lora_B.weight"] = torch.randn(16 if name.endswith("linear1") else 8, 2, generator=g).double()
    x = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    with torch.no_grad():
        base = model(x)
    with pytest.raises(lorahot.AdapterMismatchError) as caught:
        runtime.load(dict(sd))
    text = str(caught.value)
    assert f"{module}: names {module}, which no LoRA layer can serve" in text, text
    assert "computes with its weight directly" in text and "strict=False" in text, text
    assert "merge_and_unload" in text and "Inject those modules" not in text, text
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    info = runtime.load(dict(sd), strict=False)
    assert sorted(info.skipped) == sorted(k for k in sd if k.startswith(module))
    a, b = sd["proj.lora_A.weight"], sd["proj.lora_B.weight"]
    with torch.no_grad():
        hidden = model.enc(model.attn(x, x, x, need_weights=False)[0])
        torch.testing.assert_close(model(x), base + hidden @ a.T @ b.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("several", [False, True], ids=["model", "components"])
@pytest.mark.parametrize("module", ["attn.out_proj", "enc.self_attn.out_proj", "enc.linear1"])
def test_plan_targets_refuses_a_linear_its_parent_never_calls_as_load_does(module: str, several: bool) -> None:
    """plan_targets with a model planned a target on a Linear its parent reads without calling
    (nn.MultiheadAttention's out_proj, nn.TransformerEncoderLayer's linear1), which inject then
    refused. It now resolves against what load resolves against: the key is refused with the
    very text load gives (why no LoRA layer can serve it, the fixes), and strict=False plans
    without it, a plan inject takes and load fits; the model bitwise unchanged throughout."""
    model = _ReadDirectly()
    g = torch.Generator().manual_seed(1)
    sd = {}
    for name in ("proj", module):
        sd[f"{name}.lora_A.weight"] = torch.randn(2, 8, generator=g, dtype=torch.float64)
        sd[f"{name}.lora_B.weight"] = torch.randn(16 if name.endswith("linear1") else 8, 2, generator=g).double()
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    target: Any = {"transformer": model} if several else model
    with pytest.raises(lorahot.AdapterMismatchError) as planned:
        lorahot.plan_targets(dict(sd), target)
    plan = lorahot.plan_targets(dict(sd), target, strict=False)
    assert sorted(plan.skipped) == sorted(k for k in sd if k.startswith(module))
    assert plan.targets == ({"transformer": ["proj"]} if several else ["proj"])
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    runtime = lorahot.inject(target, plan.targets, **plan.inject_options())
    with pytest.raises(lorahot.AdapterMismatchError) as loaded:
        runtime.load(dict(sd))
    line = next(ln for ln in str(loaded.value).splitlines() if "which no LoRA layer can serve" in ln)
    assert "computes with its weight directly" in line and "merge_and_unload" in line, line
    assert line in str(planned.value).splitlines(), (str(planned.value), line)
    assert "Inject those modules" not in str(planned.value), str(planned.value)
    assert sorted(runtime.load(dict(sd), strict=False).skipped) == sorted(plan.skipped)
