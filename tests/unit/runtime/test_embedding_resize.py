"""transformers' ``resize_token_embeddings`` on a model whose input or output embeddings lorahot
wraps is refused with a UsageError before anything changes (transformers itself resized the
input embeddings, then raised on the wrapped head, leaving the model half resized); where no
embedding is wrapped, and after eject, the model's own method runs."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lorahot
from lorahot.runtime import embedding_resize
from tests.helpers import TINY_DECODER, make_adapter, tiny_llama, token_ids

pytest.importorskip("transformers")

VOCAB = int(TINY_DECODER["vocab_size"])


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], ["embed_tokens"]], ids=["head", "input"])
def test_a_resize_over_wrapped_embeddings_is_refused_changing_nothing(targets: list[str]) -> None:
    """The wrapped module is named with the fix; the weights, the config's vocabulary and the
    outputs are as before. Negative control: the same call on an un-injected copy resizes, and
    on the model after eject too."""
    model = tiny_llama()
    plain = copy.deepcopy(model)
    runtime = lorahot.inject(model, targets, max_rank=4)
    runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 2))[0])
    ids = token_ids((1, 5), VOCAB, seed=1)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    before = _state(model)
    name = "lm_head" if "lm_head" in targets else "model.embed_tokens"
    with pytest.raises(lorahot.UsageError, match=rf"resize_token_embeddings.*\({name}\).*Eject first"):
        model.resize_token_embeddings(VOCAB + 8)
    assert _same(before, model) and model.config.vocab_size == VOCAB
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    plain.resize_token_embeddings(VOCAB + 8)
    assert plain.get_input_embeddings().weight.shape[0] == VOCAB + 8
    runtime.eject()
    assert "resize_token_embeddings" not in model.__dict__
    model.resize_token_embeddings(VOCAB + 8)
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == VOCAB + 8


def test_a_resize_with_no_wrapped_embedding_runs_the_models_own() -> None:
    """q_proj alone wrapped: the model's method resizes both embeddings and the adapter keeps
    serving the new vocabulary's tokens."""
    model = tiny_llama()
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 2))[0])
    model.resize_token_embeddings(VOCAB + 8)
    assert model.config.vocab_size == VOCAB + 8
    assert model.get_output_embeddings().weight.shape[0] == VOCAB + 8
    ids = torch.tensor([[VOCAB + 3, 1, 2]])
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 3, VOCAB + 8)


def test_a_copy_refuses_on_its_own_and_a_plain_module_gets_nothing() -> None:
    """A deepcopy of the injected model, and one saved and loaded with ``torch.save`` (which
    pickled the model before the method was added, and must still), refuse through their own
    method, which holds the copy; a module without ``resize_token_embeddings`` is left as it is."""
    model = tiny_llama()
    lorahot.inject(model, ["lm_head"], max_rank=4)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert clone.resize_token_embeddings.module is clone
        with pytest.raises(lorahot.UsageError, match="lm_head"):
            clone.resize_token_embeddings(VOCAB + 8)
    plain = nn.Sequential(nn.Linear(4, 4))
    lorahot.inject(plain, ["0"], max_rank=2)
    assert "resize_token_embeddings" not in plain.__dict__
    embedding_resize.install(plain)  # nothing to guard: no such method
    assert "resize_token_embeddings" not in plain.__dict__


def test_without_the_refusal_transformers_leaves_the_model_half_resized(monkeypatch: pytest.MonkeyPatch) -> None:
    """The negative control of the refusal: with :func:`embedding_resize.install` a no-op, the
    call resizes the input embeddings and then raises transformers' TypeError on the wrapped
    head, whose vocabulary (and the config's) stays the old one."""
    monkeypatch.setattr(embedding_resize, "install", lambda module: None)
    model = tiny_llama()
    lorahot.inject(model, ["lm_head"], max_rank=4)
    with pytest.raises(TypeError):
        model.resize_token_embeddings(VOCAB + 8)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB + 8
    assert model.lm_head.base_layer.weight.shape[0] == model.config.vocab_size == VOCAB
