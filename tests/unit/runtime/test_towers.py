"""lorahot.runtime.towers: a multimodal model's vision tower runs on the batch's images, not on
its rows. A per-row routing to an adapter with weights on it is refused (it would give images
other rows' slots), and under any per-row routing its layers compute their base output, so a
batch whose image count differs from its row count runs."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import lorahot
from lorahot.runtime import towers as towers_module
from lorahot.runtime.towers import find_towers, tower_paths
from tests.helpers import count_calls, make_adapter

IMAGE = 63  # the image token's id
PATCHES = 4  # image tokens per image: 16 x 16 pixels in 8 x 8 patches


def _llava() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": 64,
        },
        image_token_id=IMAGE,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model: nn.Module = transformers.LlavaForConditionalGeneration(config).double().eval()
    return model


TOWER = ["model.vision_tower.encoder.layers.0.mlp.fc1", "model.multi_modal_projector.linear_1"]
LANGUAGE = ["model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.0.mlp.up_proj"]


def _batch(images: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``len(images)`` rows of 12 tokens, row ``i`` holding ``images[i]`` images,
    and their pixels (every image in row order)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, IMAGE, (len(images), 12), generator=g)
    for row, n in enumerate(images):
        ids[row, 1 : 1 + n * PATCHES] = IMAGE
    return ids, torch.randn(sum(images), 3, 16, 16, dtype=torch.float64, generator=g)


def _rows_alone(model: nn.Module, runtime: lorahot.LoraRuntime, images: tuple[int, ...], route: list[int]) -> list:
    """Each row's logits run alone with its slot active (-1: an empty slot)."""
    ids, pixels = _batch(images)
    out, first = [], 0
    for row, slot in enumerate(route):
        runtime.activate(slot if slot >= 0 else runtime.slots - 1)
        n = images[row]
        kwargs = {"pixel_values": pixels[first : first + n]} if n else {}
        out.append(model(input_ids=ids[row : row + 1], **kwargs).logits)
        first += n
    return out


def test_the_tower_and_projector_of_a_multimodal_model_are_towers_and_a_vision_model_alone_is_not() -> None:
    model = _llava()
    assert tower_paths(model) == ["model.vision_tower", "model.multi_modal_projector"]
    assert find_towers(model, TOWER + LANGUAGE) == set(TOWER)
    # a vision model alone: its images are its rows (the negative control)
    assert tower_paths(model.model.vision_tower) == []
    # a pipeline's IP-Adapter image encoder, beside its denoiser
    assert tower_paths(nn.ModuleDict({"unet": nn.Linear(2, 2), "image_encoder": nn.Linear(2, 2)})) == ["image_encoder"]


def test_a_routing_to_an_adapter_on_the_tower_is_refused_and_the_rest_routes_whatever_the_image_count() -> None:
    """An adapter on the tower cannot be routed per row: refused, naming the layers, with the
    routing and the outputs unchanged. Adapters on the language model route, and each row
    equals itself run alone: with two images in one row and none in the other (a tower batch
    of 2 under a routing of 2), and with three images over two rows (a tower batch a routing
    of 2 would have refused by shape)."""
    model = _llava()
    runtime = lorahot.inject(model, TOWER + LANGUAGE, max_rank=2, slots=4)
    assert [runtime.layers[n]._plan[8] for n in TOWER + LANGUAGE] == [True, True, False, False]
    on_tower, _ = make_adapter(model, {TOWER[0]: 2, LANGUAGE[0]: 2}, seed=1, dtype=torch.float64)
    language, _ = make_adapter(model, {LANGUAGE[0]: 2, LANGUAGE[1]: 1}, seed=2, dtype=torch.float64)
    other, _ = make_adapter(model, {LANGUAGE[1]: 2}, seed=3, dtype=torch.float64)
    runtime.load(on_tower, slot=0)
    runtime.load(language, slot=1)
    runtime.load(other, slot=2)
    with torch.no_grad():
        for images, route in (((2, 0), [1, -1]), ((2, 1), [2, 1])):
            ids, pixels = _batch(images)
            runtime.activate(route)
            out = model(input_ids=ids, pixel_values=pixels).logits
            with pytest.raises(lorahot.UsageError, match=r"slot 0, whose adapter has weights on a vision tower"):
                runtime.activate([0, route[1]])
            assert runtime.routing == tuple(route)
            assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, out)
            with pytest.raises(lorahot.UsageError, match=r"vision tower .*activate\(1\)"):
                runtime.load(on_tower, slot=1)
            for row, alone in enumerate(_rows_alone(model, runtime, images, route)):
                torch.testing.assert_close(out[row : row + 1], alone, rtol=1e-10, atol=1e-10)
        runtime.activate(0)  # the tower adapter on a batch of its own: every image on it
        ids, pixels = _batch((2, 1))
        whole = model(input_ids=ids, pixel_values=pixels).logits
        for row, alone in enumerate(_rows_alone(model, runtime, (2, 1), [0, 0])):
            torch.testing.assert_close(whole[row : row + 1], alone, rtol=1e-10, atol=1e-10)


def test_negative_control_without_towers_the_images_take_other_rows_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no tower found, the routing to the tower adapter is accepted, and the second
    image of row 0 (a tower batch of 2 under a routing of 2) runs on row 1's slot: row 0 is
    not itself run alone. With three images over two rows the tower refuses by shape."""
    monkeypatch.setattr(towers_module, "tower_paths", lambda model: [])
    model = _llava()
    runtime = lorahot.inject(model, TOWER + LANGUAGE, max_rank=2, slots=3)
    on_tower, _ = make_adapter(model, {TOWER[0]: 2, TOWER[1]: 2}, seed=1, dtype=torch.float64)
    runtime.load(on_tower, slot=0)
    with torch.no_grad():
        ids, pixels = _batch((2, 0))
        runtime.activate([0, -1])
        routed = model(input_ids=ids, pixel_values=pixels).logits
        alone = _rows_alone(model, runtime, (2, 0), [0, -1])
        assert not torch.allclose(routed[:1], alone[0], rtol=1e-6, atol=1e-6)
        ids, pixels = _batch((2, 1))
        runtime.activate([0, -1])
        with pytest.raises(lorahot.UsageError, match=r"vision_tower"):
            model(input_ids=ids, pixel_values=pixels)


AUDIO = 63  # Qwen2-Audio's audio token id here
AUDIO_TOKENS = 4  # audio tokens per clip: 16 mel frames, halved by the second conv and by the pooler


def _qwen2_audio() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "d_model": 32,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "num_mel_bins": 8,
            "max_source_positions": 8,
        },
        text_config={
            "model_type": "qwen2",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": 64,
        },
        audio_token_id=AUDIO,
    )
    model: nn.Module = transformers.Qwen2AudioForConditionalGeneration(config).double().eval()
    return model


def _audio_batch(clips: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """``len(clips)`` rows of 12 tokens, row ``i`` holding ``clips[i]`` audio clips, and every
    clip's mel features in row order."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, AUDIO, (len(clips), 12), generator=g)
    for row, n in enumerate(clips):
        ids[row, 1 : 1 + n * AUDIO_TOKENS] = AUDIO
    features = torch.randn(sum(clips), 8, 16, dtype=torch.float64, generator=g)
    return {"input_ids": ids, "input_features": features, "feature_attention_mask": torch.ones(sum(clips), 16)}


def test_an_audio_tower_is_a_tower_an_audio_clip_batch_of_the_routing_s_length_takes_no_row_s_slot() -> None:
    """Qwen2-Audio's ``audio_tower`` runs on the batch's audio clips, as a vision tower runs on
    its images: two clips in row 0 and none in row 1 make a tower batch of 2 under a routing of
    2. Before, the tower was not found, the routing to an adapter on it was accepted, and the
    second clip of row 0 ran on row 1's slot (row 0 was 0.38 off itself run alone). The audio
    towers of Gemma 3n (with its multimodal embedders) and Video-LLaVA's towers are found by
    name as well."""
    model = _qwen2_audio()
    assert tower_paths(model) == ["model.audio_tower", "model.multi_modal_projector"]
    tower, language = "model.audio_tower.layers.0.fc1", "model.language_model.layers.0.self_attn.q_proj"
    runtime = lorahot.inject(model, [tower, language], max_rank=2, slots=3)
    runtime.load(make_adapter(model, {tower: 2, language: 2}, seed=1, dtype=torch.float64)[0], slot=0)
    runtime.load(make_adapter(model, {language: 2}, seed=2, dtype=torch.float64)[0], slot=1)
    with pytest.raises(lorahot.UsageError, match=r"slot 0, whose adapter has weights on a vision tower"):
        runtime.activate([0, -1])
    batch = _audio_batch((2, 0))
    with torch.no_grad():
        runtime.activate([1, -1])
        routed = model(**batch).logits
        runtime.activate(1)
        alone = model(**{**batch, "input_ids": batch["input_ids"][:1]}).logits  # both clips are row 0's
    torch.testing.assert_close(routed[:1], alone, rtol=1e-10, atol=1e-10)
    beside = {"language_model": nn.Linear(2, 2)}
    for names in (["audio_tower", "embed_audio", "embed_vision", "vision_tower"], ["video_tower", "image_tower"]):
        found = tower_paths(nn.ModuleDict({**beside, **{n: nn.Linear(2, 2) for n in names}}))
        assert sorted(found) == sorted(names)


def _phi4_multimodal() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Phi4MultimodalConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
            "crop_size": 16,
            "image_token_id": 62,
        },
        audio_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_blocks": 1,
            "num_attention_heads": 2,
            "ext_pw_out_channel": 32,
            "depthwise_separable_out_channel": 32,
            "nemo_conv_channels": 32,
            "input_size": 8,
            "audio_token_id": 63,
        },
    )
    model: nn.Module = transformers.Phi4MultimodalForCausalLM(config).eval()
    return model


def test_towers_under_other_names_are_found_by_name_by_their_inputs_and_beside_a_tower() -> None:
    """Phi-4-multimodal's image and audio embedders (each a tower with its own projection, under
    ``embed_tokens_extend``, beside nothing but each other) are towers: a per-row routing to an
    adapter on their projections is refused, where before no tower was found and it was taken.
    Its language model's layers are not towers."""
    model = _phi4_multimodal()
    extend = "model.embed_tokens_extend"
    assert tower_paths(model) == [f"{extend}.image_embed", f"{extend}.audio_embed"]
    image, audio = f"{extend}.image_embed.img_projection_up", f"{extend}.audio_embed.up_proj_for_speech"
    language = ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.down_proj", "lm_head"]
    runtime = lorahot.inject(model, [image, audio, *language], max_rank=2, slots=3)
    assert runtime._towers == {image, audio}
    runtime.load(make_adapter(model, {image: 2, language[0]: 2}, seed=1)[0], slot=0)
    runtime.load(make_adapter(model, {audio: 1}, seed=2)[0], slot=1)
    runtime.load(make_adapter(model, dict.fromkeys(language, 2), seed=3)[0], slot=2)
    for slot in (0, 1):
        with pytest.raises(lorahot.UsageError, match=rf"slot {slot}, whose adapter has weights on a vision tower"):
            runtime.activate([2, slot])
        assert runtime.routing is None
    runtime.activate([2, -1])  # the language model routes


class _Media(nn.Module):
    """A module that declares what it takes, as transformers' models do."""

    def __init__(self, main_input_name: str = "input_ids", input_modalities: object = "text") -> None:
        super().__init__()
        self.main_input_name, self.input_modalities = main_input_name, input_modalities
        self.fc = nn.Linear(2, 2)


def test_a_module_that_takes_images_or_audio_and_no_text_is_a_tower_under_any_name_and_its_projector_too() -> None:
    """The structural rule: a module whose ``main_input_name`` is an image or audio input, or
    whose ``input_modalities`` hold no text, is a tower whatever its name (Granite Speech's
    ``encoder``), and a ``projector`` beside it carries its output. Negative controls: a
    ``projector`` beside no tower (a text model's head), a module that takes text as well,
    and a model that itself takes images (its rows are its images: no tower in it)."""
    text = nn.Linear(2, 2)
    takes_media = [_Media("input_features"), _Media(input_modalities="audio")]
    takes_media.append(_Media(input_modalities=("image", "video")))
    for media in takes_media:
        model = nn.ModuleDict({"encoder": media, "projector": nn.Linear(2, 2), "language_model": text})
        assert tower_paths(model) == ["encoder", "projector"]
    for other in (_Media(), _Media(input_modalities=("image", "text")), _Media("input_ids", ["text"])):
        model = nn.ModuleDict({"encoder": other, "projector": nn.Linear(2, 2), "language_model": text})
        assert tower_paths(model) == []
    whole = _Media("pixel_values")
    whole.add_module("vision_model", nn.Linear(2, 2))
    whole.add_module("head", nn.Linear(2, 2))
    assert tower_paths(whole) == []  # a vision model with a head (CLIPVisionModelWithProjection): rows are images
    alone = nn.ModuleDict({"vision_tower": nn.Linear(2, 2)})  # every parameter in the tower
    assert tower_paths(alone) == []


def test_a_tower_or_carrier_that_is_a_single_layer_is_a_tower() -> None:
    """A tower or the projector beside it may be one Linear (Fuyu's ``vision_embed_tokens``, a
    ``projector`` or ``visual_projection``): the injected layer is the tower's path itself, and a
    per-row routing to an adapter on it is refused, where only layers inside a tower were
    found (a routing to it was taken, giving images other rows' slots)."""
    model = nn.ModuleDict(
        {
            "vision_embed_tokens": nn.Linear(2, 2),
            "vision_tower": nn.Sequential(nn.Linear(2, 2)),
            "projector": nn.Linear(2, 2),
            "language_model": nn.Linear(2, 2),
        }
    )
    assert tower_paths(model) == ["vision_embed_tokens", "vision_tower", "projector"]
    names = ["vision_embed_tokens", "vision_tower.0", "projector", "language_model"]
    assert find_towers(model, names) == {"vision_embed_tokens", "vision_tower.0", "projector"}
    runtime = lorahot.inject(model, names, max_rank=2, slots=2)
    runtime.load(make_adapter(model, {"projector": 2}, seed=1)[0], slot=0)
    runtime.load(make_adapter(model, {"language_model": 2}, seed=2)[0], slot=1)
    with pytest.raises(lorahot.UsageError, match=r"slot 0, whose adapter has weights on a vision tower"):
        runtime.activate([1, 0])
    assert runtime.routing is None
    runtime.activate([1, -1])  # the language model routes


def _tower_per_block(blocks: int) -> tuple[nn.Module, list[str]]:
    """``blocks`` blocks, each a ``vision_model`` (a tower by name) beside a linear, and a head
    outside them; the names of every linear."""
    model = nn.ModuleDict(
        {
            "blocks": nn.ModuleList(
                [
                    nn.ModuleDict({"vision_model": nn.Sequential(nn.Linear(2, 2)), "fc": nn.Linear(2, 2)})
                    for _ in range(blocks)
                ]
            ),
            "head": nn.Linear(2, 2),
        }
    )
    names = [f"blocks.{b}.{p}" for b in range(blocks) for p in ("vision_model.0", "fc")] + ["head"]
    return model, names


def _tower_calls(blocks: int) -> int:
    model, names = _tower_per_block(blocks)
    found: set[str] = set()
    count = count_calls(lambda: found.update(find_towers(model, names)))
    assert found == {n for n in names if ".vision_model." in n}
    return count


def test_finding_the_towers_does_not_compare_each_layer_with_each_tower() -> None:
    """Each tower was compared with every other (to keep the outermost) and each layer with
    every tower: the towers squared, with a tower per block. Each path above a tower or a layer
    is now looked up, so four times the blocks cost at most four times the calls, and the
    towers found are the same."""
    _tower_calls(2)  # first-call costs out of the counts
    assert _tower_calls(32) <= 4 * _tower_calls(8)
