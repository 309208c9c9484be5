"""PEFT naming's attention-projection aliases (``q_proj``/``k_proj``/``v_proj``/``o_proj`` ->
``to_q``/``to_k``/``to_v``/``to_out.0``): ACE-Step's original names, which diffusers renames in its
ACE-Step loader alone, in a file with a ``q_proj`` or ``k_proj`` key; PEFT's injection and every
other diffusers loader place such a key nowhere. Taken only in a file one of whose keys is a
projection of ACE-Step's decoder (``layers.N.self_attn.q_proj``, ``cross_attn.k_proj``). And the old
diffusers naming's reverse, ``to_q_lora`` -> ``q_proj``, only for a text encoder's processor keys, as
diffusers' text-encoder loader renames them (its UNet loader places them on ``to_q``)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lorahot
from tests.helpers import linear_at

#: the file's prefix per naming: PEFT's wrapper, or the model's names bare
_HEADS = {"peft": "base_model.model.", "bare": ""}
_PROJECTIONS = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "o_proj": "to_out.0"}


class _Projections(nn.Module):
    """diffusers' projection names in a block of an image transformer (``transformer_blocks.0.attn``,
    SD3's, Flux's) and in ACE-Step's decoder (``layers.0.self_attn`` / ``cross_attn``), with no layer
    named ``q_proj`` and the like, and a layer of any model's name (``mlp``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        for stem in ("transformer_blocks.0.attn", "layers.0.self_attn", "layers.0.cross_attn"):
            for name in _PROJECTIONS.values():
                linear_at(self, f"{stem}.{name}")
        linear_at(self, "mlp")


def _file(head: str, module: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{head}{module}.lora_A.weight": torch.randn(2, 4, generator=g),
        f"{head}{module}.lora_B.weight": torch.randn(4, 2, generator=g),
    }


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())


def _assert_at_reference(model: nn.Module, tensors: dict, head: str, placed: dict[str, str], g) -> None:
    """Each module of ``placed`` (file module -> layer) at ``W + B @ A``, the float64 reference."""
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for module, name in placed.items():
        a, b = (tensors[f"{head}{module}.lora_{r}.weight"].double() for r in "AB")
        base = model.get_submodule(name).base_layer
        want = x @ (base.weight.double() + b @ a).T + base.bias.double()
        with torch.no_grad():
            got = model.get_submodule(name)(x.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("naming", list(_HEADS))
@pytest.mark.parametrize("projection", list(_PROJECTIONS))
def test_a_projection_alias_is_taken_only_in_a_file_of_ace_step(projection: str, naming: str) -> None:
    """PEFT naming took ``q_proj`` -> ``to_q`` (and ``k_proj``, ``v_proj``, ``o_proj``) in every file, so
    another model's ``transformer_blocks.0.attn.q_proj`` landed on ``transformer_blocks.0.attn.to_q``,
    silently, where PEFT's injection raises (no module of that name) and diffusers' loaders, but its
    ACE-Step one, load it nowhere. Refused naming the key, every parameter and buffer bitwise unchanged,
    skipped with ``strict=False``; beside a key of ACE-Step's decoder projections
    (``layers.0.cross_attn.k_proj``) it lands on ACE-Step's layer, at the float64 reference."""
    head, aliased = _HEADS[naming], _PROJECTIONS[projection]
    model, g = _Projections(), torch.Generator().manual_seed(3)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    lone = _file(head, f"transformer_blocks.0.attn.{projection}", g)
    before = _state(model)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"attn\.{projection}: matches no injected layer") as e:
        runtime.load(lone)
    assert not re.search(rf"places it at [^\n]*attn\.{re.escape(aliased)}\b", str(e.value))
    _assert_unchanged(model, before)
    info = runtime.load(lone | _file(head, "mlp", g), strict=False)
    assert set(info.skipped) == set(lone) and set(info.ranks) == {"mlp"}
    own = f"layers.0.self_attn.{projection}"
    tensors = _file(head, own, g) | _file(head, "layers.0.cross_attn.k_proj", g)
    info = runtime.load(tensors)
    assert info.format == "peft" and set(info.ranks) == {f"layers.0.self_attn.{aliased}", "layers.0.cross_attn.to_k"}
    _assert_at_reference(
        model,
        tensors,
        head,
        {own: f"layers.0.self_attn.{aliased}", "layers.0.cross_attn.k_proj": "layers.0.cross_attn.to_k"},
        g,
    )


@pytest.mark.parametrize("naming", list(_HEADS))
def test_ace_step_s_value_and_output_projections_alone_are_refused(naming: str) -> None:
    """diffusers' ACE-Step loader renames a file's projections only where some key is a ``q_proj`` or
    ``k_proj``; a file of ``v_proj``/``o_proj`` alone it loads nowhere. lorahot placed them on
    ``to_v``/``to_out.0``; now refused, bitwise unchanged; beside ``self_attn.q_proj`` both land."""
    head = _HEADS[naming]
    model, g = _Projections(), torch.Generator().manual_seed(4)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    lone = _file(head, "layers.0.self_attn.v_proj", g) | _file(head, "layers.0.cross_attn.o_proj", g)
    before = _state(model)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"self_attn\.v_proj: matches no injected layer"):
        runtime.load(lone)
    _assert_unchanged(model, before)
    tensors = lone | _file(head, "layers.0.self_attn.q_proj", g)
    runtime.load(tensors)
    placed = {
        "layers.0.self_attn.v_proj": "layers.0.self_attn.to_v",
        "layers.0.cross_attn.o_proj": "layers.0.cross_attn.to_out.0",
        "layers.0.self_attn.q_proj": "layers.0.self_attn.to_q",
    }
    _assert_at_reference(model, tensors, head, placed, g)


class _Clip(nn.Module):
    """A CLIP text encoder's attention projections (``q_proj``, ..., ``out_proj``) on transformers 5's
    paths (no ``text_model.`` level), and no layer named ``to_q`` or ``to_out.0``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear_at(self, f"encoder.layers.0.self_attn.{name}")
        linear_at(self, "encoder.layers.0.mlp.fc1")


def _old(module: str, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{module}.down.weight": torch.randn(2, 4, generator=g),
        f"{module}.up.weight": torch.randn(4, 2, generator=g),
    }


_STEM = "encoder.layers.0.self_attn"


@pytest.mark.parametrize(
    "module",
    [
        f"text_encoder.text_model.{_STEM}.to_q.lora",
        f"text_encoder.text_model.{_STEM}.to_out.0.lora",
        f"unet.{_STEM}.processor.to_q_lora",
        f"{_STEM}.processor.to_out_lora",
    ],
    ids=["text_encoder-to_q.lora", "text_encoder-to_out.0.lora", "unet-processor", "bare-processor"],
)
def test_old_diffusers_keys_take_clips_projection_names_only_as_a_text_encoders_processor_keys(module: str) -> None:
    """The old diffusers naming took ``to_q`` -> ``q_proj`` (``to_out.0`` -> ``out_proj``) for any of its
    keys, so a text encoder's ``...self_attn.to_q.lora.down`` landed on CLIP's ``q_proj``, where diffusers'
    text-encoder loader renames only the processor keys (``to_q_lora``, ``to_out_lora``) and leaves this
    one unloaded (or raises: no processor key to infer the naming from), and a UNet's or a bare
    processor key (which diffusers' UNet loader places on ``to_q`` / ``to_out.0``) landed on ``q_proj``
    too. Refused naming the key, every parameter and buffer bitwise unchanged, skipped with
    ``strict=False``; a text encoder's processor keys land on CLIP's projections, at the float64
    reference."""
    model, g = _Clip(), torch.Generator().manual_seed(5)
    runtime = lorahot.inject(model, "all-linear", max_rank=2)
    lone = _old(module, g)
    before = _state(model)
    with pytest.raises(lorahot.AdapterMismatchError, match="matches no injected layer"):
        runtime.load(lone)
    _assert_unchanged(model, before)
    own = _old(f"text_encoder.text_model.{_STEM.replace('self_attn', 'mlp')}.fc1.lora", g)
    info = runtime.load(lone | own, strict=False)
    assert set(info.skipped) == set(lone) and set(info.ranks) == {"encoder.layers.0.mlp.fc1"}
    stem = f"text_encoder.text_model.{_STEM}.processor"
    tensors = _old(f"{stem}.to_q_lora", g) | _old(f"{stem}.to_out_lora", g)
    assert set(runtime.load(tensors).ranks) == {f"{_STEM}.q_proj", f"{_STEM}.out_proj"}
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for key, name in (("to_q_lora", "q_proj"), ("to_out_lora", "out_proj")):
        a, b = (tensors[f"{stem}.{key}.{r}.weight"].double() for r in ("down", "up"))
        base = model.get_submodule(f"{_STEM}.{name}").base_layer
        want = x @ (base.weight.double() + b @ a).T + base.bias.double()
        with torch.no_grad():
            got = model.get_submodule(f"{_STEM}.{name}")(x.float()).double()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
