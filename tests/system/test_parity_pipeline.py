"""One lorahot runtime over a whole tiny SDXL pipeline (UNet and both CLIP text encoders),
against diffusers' own ``pipe.load_lora_weights`` as the oracle, for a diffusers-named and a
kohya-named file (diffusers' ``convert_state_dict_to_kohya``, with alphas of half the rank).

The pipeline is built offline from configs; it has no VAE, tokenizers or scheduler (the
components are called directly), which diffusers' constructor accepts as None.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorahot
from tests.helpers import tiny_clip, tiny_unet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TARGETS = {"unet": UNET_TARGETS, "text_encoder": TE_TARGETS, "text_encoder_2": TE_TARGETS}
RANK = 4


def _pipeline() -> diffusers.StableDiffusionXLPipeline:
    unet = tiny_unet(cross_attention_dim=32)
    te, te2 = tiny_clip(), tiny_clip(with_projection=True)  # drawn in this order after the unet's seed
    return diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=None, tokenizer_2=None, unet=unet, scheduler=None
    )


@pytest.fixture(scope="module")
def pipe() -> diffusers.StableDiffusionXLPipeline:
    return _pipeline()


def _diffusers_file(pipe, components: list[str], seed: int = 1) -> dict[str, torch.Tensor]:
    """A diffusers-named LoRA (``<component>.<module>.lora_A.weight``) on every target of ``components``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in components:
        targets = TARGETS[c]
        for name, mod in getattr(pipe, c).named_modules():
            if isinstance(mod, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
                out[f"{c}.{name}.lora_A.weight"] = torch.randn(RANK, mod.in_features, generator=g) * 0.2
                out[f"{c}.{name}.lora_B.weight"] = torch.randn(mod.out_features, RANK, generator=g) * 0.2
    return out


def _kohya_file(pipe, components: list[str], seed: int = 1) -> dict[str, torch.Tensor]:
    out = convert_state_dict_to_kohya(_diffusers_file(pipe, components, seed))
    return {k: torch.tensor(RANK / 2) if k.endswith(".alpha") else v for k, v in out.items()}


FILES = {"diffusers": _diffusers_file, "kohya": _kohya_file}


def _run(pipe, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return _call({c: getattr(pipe, c) for c in TARGETS}, dtype)


def _call(models: dict[str, nn.Module], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    ids = torch.tensor([[0, 5, 9, 3, 1]])
    g = torch.Generator().manual_seed(3)
    sample, context = torch.randn(1, 4, 8, 8, generator=g).to(dtype), torch.randn(1, 5, 32, generator=g).to(dtype)
    with torch.no_grad():
        return {
            "unet": models["unet"](sample, 7, encoder_hidden_states=context).sample,
            "text_encoder": models["text_encoder"](ids)[0],
            "text_encoder_2": models["text_encoder_2"](ids)[0],
        }


def _tensors(pipe) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (the LoRA buffers too) of every component, copied."""
    return {
        f"{c}.{name}": t.detach().clone()
        for c in TARGETS
        for name, t in [*getattr(pipe, c).named_parameters(), *getattr(pipe, c).named_buffers()]
    }


def _oracle(pipe, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    oracle = copy.deepcopy(pipe)
    oracle.load_lora_weights(dict(source))
    return _run(oracle)


@pytest.mark.parametrize("naming", FILES)
def test_one_runtime_pipeline_matches_load_lora_weights(pipe, naming: str) -> None:
    source = FILES[naming](pipe, list(TARGETS))
    want, base = _oracle(pipe, source), _run(pipe)
    ours = copy.deepcopy(pipe)
    runtime = lorahot.inject(ours, TARGETS, max_rank=8)  # the pipeline itself, duck-typed
    info = runtime.load(source)
    assert info.format == naming
    assert info.components == {"unet": 32, "text_encoder": 12, "text_encoder_2": 12}
    got = _run(ours)
    for c in TARGETS:
        assert not torch.allclose(got[c], base[c], atol=1e-4), c  # the file does change every component
        torch.testing.assert_close(got[c], want[c], rtol=1e-5, atol=1e-5, msg=c)


@pytest.mark.parametrize("naming", FILES)
def test_unet_only_file_leaves_text_encoders_at_base_bitwise(pipe, naming: str) -> None:
    ours = copy.deepcopy(pipe)
    base = _run(ours)
    runtime = lorahot.inject(
        {"unet": ours.unet, "text_encoder": ours.text_encoder, "text_encoder_2": ours.text_encoder_2},
        TARGETS,
        max_rank=8,
    )
    runtime.load(FILES[naming](pipe, list(TARGETS)))
    unet_only = FILES[naming](pipe, ["unet"], seed=2)
    info = runtime.load(unet_only)
    assert info.components == {"unet": 32, "text_encoder": 0, "text_encoder_2": 0}
    got = _run(ours)
    assert torch.equal(got["text_encoder"], base["text_encoder"])
    assert torch.equal(got["text_encoder_2"], base["text_encoder_2"])
    torch.testing.assert_close(got["unet"], _oracle(pipe, unet_only)["unet"], rtol=1e-5, atol=1e-5)


def test_compiled_components_swap_without_recompiling(pipe) -> None:
    ours = copy.deepcopy(pipe)
    runtime = lorahot.inject(ours, TARGETS, max_rank=8)
    full, unet_only = _kohya_file(pipe, list(TARGETS)), _diffusers_file(pipe, ["unet"], seed=2)
    eager = {}
    for key, source in (("full", full), ("unet", unet_only)):
        runtime.load(source)
        eager[key] = _run(ours)
    # Every component through dynamo and AOTAutograd (aot_eager): the guards, graph breaks and
    # recompiles this checks are dynamo's, and AOTAutograd lifts the LoRA buffers as graph
    # inputs as inductor does. Inductor's code over swapped LoRA buffers (layers loaded, left
    # without an adapter, re-ranked) is held to the float64 reference by test_compile.py
    # (test_no_op_sequence_recompiles, test_stacks_load_and_reweight_without_recompiling), whose
    # layers are these (LoRALinear); its cold compile of the CLIP text encoder was most of this
    # test's time on the CPU, a UNet's takes over a minute.
    compiled = {c: torch.compile(getattr(ours, c), backend="aot_eager") for c in TARGETS}
    runtime.load(full)
    _call(compiled)  # compiles each component once
    with torch._dynamo.config.patch(error_on_recompile=True):
        for key, source in (("unet", unet_only), ("full", full), ("unet", unet_only)):
            runtime.load(source)
            got = _call(compiled)
            for c in TARGETS:
                torch.testing.assert_close(got[c], eager[key][c], rtol=1e-5, atol=1e-5, msg=f"{key} {c}")
        with pytest.raises(torch._dynamo.exc.RecompileError), torch.no_grad():  # negative control
            compiled["text_encoder"](torch.tensor([[0, 5, 9, 3, 1, 1]]))  # a new shape does recompile


@pytest.mark.parametrize("naming", FILES)
def test_a_stack_of_a_full_and_a_unet_only_file_matches_set_adapters(pipe, naming: str) -> None:
    """One slot holds a unet + text encoders file and a unet-only file, each at its weight:
    each part is routed to its components as a load routes it, and the text encoders take the
    full file's part only, as diffusers' ``set_adapters`` computes them."""
    full, unet_only = FILES[naming](pipe, list(TARGETS)), FILES[naming](pipe, ["unet"], seed=2)
    oracle = copy.deepcopy(pipe)
    oracle.load_lora_weights(dict(full), adapter_name="full")
    oracle.load_lora_weights(dict(unet_only), adapter_name="unet_only")
    ours = copy.deepcopy(pipe)
    runtime = lorahot.inject(ours, TARGETS, max_rank=8)
    info = runtime.load([full, unet_only], scale=[0.6, 1.4])
    assert info.components == {"unet": 32, "text_encoder": 12, "text_encoder_2": 12}
    assert [p.components for p in info.parts] == [info.components, {"unet": 32, "text_encoder": 0, "text_encoder_2": 0}]
    assert info.ranks["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == 2 * RANK
    for weights in ([0.6, 1.4], [-0.5, 0.8]):
        runtime.set_scale(weights)
        oracle.set_adapters(["full", "unet_only"], adapter_weights=weights)
        got, want = _run(ours), _run(oracle)
        for c in TARGETS:
            torch.testing.assert_close(got[c], want[c], rtol=1e-5, atol=1e-5, msg=f"{weights} {c}")


def test_a_dora_file_on_every_component_matches_diffusers_on_the_unet_and_peft_on_the_text_encoders(pipe) -> None:
    """A diffusers-named DoRA file (``lora_magnitude_vector`` beside every module) on the UNet and
    both text encoders, one runtime with ``extras=True``, in float64: the UNet equals diffusers'
    ``load_lora_weights``; the text encoders equal PEFT's ``use_dora`` model given the same keys,
    where diffusers 0.42.1 leaves their magnitudes unloaded (transformers' ``load_adapter`` reports
    ``lora_magnitude_vector.default_0`` unexpected and ``...default_0.weight`` missing). Without
    ``extras`` the load is refused naming it, every parameter and buffer bitwise unchanged."""
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(pipe).to(torch.float64)
    source = {k: v.double() for k, v in _diffusers_file(base, list(TARGETS)).items()}
    g = torch.Generator().manual_seed(9)
    for key in [k for k in source if k.endswith("lora_B.weight")]:
        rows = source[key].shape[0]
        source[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.rand(rows, generator=g).double() + 0.5
    oracle = copy.deepcopy(base)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report of the magnitudes it leaves
    try:
        oracle.load_lora_weights(dict(source))
    finally:
        transformers.logging.set_verbosity(verbosity)
    theirs = _run(oracle, torch.float64)
    peft_te = {}
    for c in ("text_encoder", "text_encoder_2"):
        model = peft.get_peft_model(
            copy.deepcopy(getattr(base, c)),
            peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TE_TARGETS, use_dora=True),
        )
        part = {
            "base_model.model." + k[len(c) + 1 :].replace("lora_magnitude_vector", "lora_magnitude_vector.weight"): v
            for k, v in source.items()
            if k.startswith(c + ".")
        }
        assert not peft.set_peft_model_state_dict(model, part).unexpected_keys
        peft_te[c] = model

    refused = copy.deepcopy(base)
    runtime = lorahot.inject(refused, TARGETS, max_rank=8)
    before = _tensors(refused)
    with pytest.raises(lorahot.AdapterMismatchError, match="extras=True"):
        runtime.load(source)
    after = _tensors(refused)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    ours = copy.deepcopy(base)
    info = lorahot.inject(ours, TARGETS, max_rank=8, extras=True).load(source)
    assert info.components == {"unet": 32, "text_encoder": 12, "text_encoder_2": 12}
    got = _run(ours, torch.float64)
    torch.testing.assert_close(got["unet"], theirs["unet"], rtol=1e-12, atol=1e-12)
    ids = torch.tensor([[0, 5, 9, 3, 1]])
    for c, model in peft_te.items():
        with torch.no_grad():
            want = model(ids)[0]
        torch.testing.assert_close(got[c], want, rtol=1e-12, atol=1e-12, msg=c)
        assert (theirs[c] - want).abs().max() > 1e-2, c  # diffusers' text encoders without their magnitudes
