"""Idefics2 (Perceiver-resampler bridge): our preprocessing, prompt ids, vision module and greedy generation equal
the HF processor and model exactly, with image splitting off and on, on a tiny random checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

import builders
from conftest import random_image
from edgevlm.families import describe_checkpoint, load_checkpoint
from edgevlm.loading import session_from_checkpoint
from edgevlm.preprocess import preprocess

VARIANTS = {"idefics2": False, "idefics2-split": True}
# sizes (w, h): below shortest_edge (upscaled, aspect not kept), inside the range, above longest_edge, non-square,
# odd sides (the quarters differ by a pixel), patch remainders (partial patches are masked out)
SIZES = [(50, 70), (100, 40), (30, 90), (9, 7), (64, 64), (37, 29)]


@pytest.fixture(scope="module")
def idefics2(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics2")
    out = {}
    for seed, (name, split) in enumerate(VARIANTS.items()):
        path = builders.build_idefics2(root / name, seed=20 + seed, splitting=split)
        out[name] = (path, load_checkpoint(path), AutoProcessor.from_pretrained(path))
    return out


def _session(ckpt):
    return session_from_checkpoint(ckpt)


@pytest.mark.parametrize("name", VARIANTS)
def test_pixels_mask_and_ids_match_hf_processor(name, idefics2):
    path, ckpt, processor = idefics2[name]
    session = _session(ckpt)
    for i, (w, h) in enumerate(SIZES):
        image = random_image(i, w, h)
        text = session.render([session.user_message("What colour is the circle?", 1)])
        hf = processor(images=[image], text=[text], return_tensors="np")
        ours = preprocess(image, ckpt.preprocess).pixel_values  # (tiles, 4, 48, 48)
        pixels, mask = hf["pixel_values"][0], hf["pixel_attention_mask"][0]  # padded to the batch's largest tile
        tiles, _, hh, ww = pixels.shape
        assert ours.shape == (tiles, 4, 48, 48)
        assert np.abs(ours[:, :3, :hh, :ww] - pixels).max() <= 1e-6, (w, h)
        assert (ours[:, 3, :hh, :ww] == mask).all(), (w, h)
        assert not ours[:, :, hh:].any() and not ours[:, :, :, ww:].any()  # the canvas beyond is padding
        prompt = session.tokenize(text, [session._prepare_image(image)])
        assert prompt.ids.tolist() == hf["input_ids"][0].tolist(), (w, h)


def test_two_adjacent_images_share_a_fake_token(idefics2):
    path, ckpt, processor = idefics2["idefics2-split"]
    session = _session(ckpt)
    pair = [random_image(7, 40, 30), random_image(8, 20, 60)]
    text = session.render([session.user_message("<image><image>Compare them.", 2)])
    hf = processor(images=pair, text=[text], return_tensors="np")
    prompt = session.tokenize(text, [session._prepare_image(i) for i in pair])
    assert prompt.ids.tolist() == hf["input_ids"][0].tolist()
    assert int((prompt.ids == ckpt.layout.image_token_id).sum()) == 2 * 5 * 8


@pytest.mark.parametrize("name", VARIANTS)
def test_vision_module_equals_hf_image_features(name, idefics2):
    path, ckpt, processor = idefics2[name]
    for i, (w, h) in enumerate(SIZES):
        image = random_image(i, w, h)
        hf = processor(images=[image], text=["<image>"], return_tensors="pt")
        with torch.inference_mode():
            expected = ckpt.hf_model.model.get_image_features(
                hf["pixel_values"], hf["pixel_attention_mask"]).pooler_output[0]
            ours = ckpt.vision(torch.from_numpy(preprocess(image, ckpt.preprocess).pixel_values))
        ours = ours.reshape(expected.shape)
        rel = float((ours - expected).abs().max() / expected.abs().max())
        assert rel <= 1e-5, (w, h, rel)


def _generate_hf(ckpt, processor, images, text, n=12):
    hf = processor(images=images, text=[text], return_tensors="pt")
    ckpt.hf_model.generation_config.eos_token_id = None  # compare n tokens without early stops
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**hf, max_new_tokens=n, do_sample=False)
    return out[0, hf["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name,size", [("idefics2", (50, 70)), ("idefics2-split", (100, 40))])
def test_greedy_tokens_equal_model_generate_and_follow_the_image(name, size, idefics2):
    path, ckpt, processor = idefics2[name]
    session = _session(ckpt)
    prompt = "Describe <image>the image."
    text = session.render([session.user_message(prompt, 1)])
    tokens = {}
    for seed in (0, 1):
        image = random_image(seed, *size)
        expected = _generate_hf(ckpt, processor, [image], text)
        result = session.generate(image, prompt, max_tokens=12, stop_token_ids=[])
        assert result.tokens == expected
        tokens[seed] = result.tokens
    assert tokens[0] != tokens[1], "the tiny model ignores the image: it cannot tell a right bridge from a wrong one"


def test_two_images_greedy_tokens_equal_model_generate(idefics2):
    path, ckpt, processor = idefics2["idefics2-split"]
    session = _session(ckpt)
    pair = [random_image(3, 40, 30), random_image(4, 20, 60)]
    prompt = "Compare <image> and <image> now."
    text = session.render([session.user_message(prompt, 2)])
    assert session.generate(pair, prompt, max_tokens=12, stop_token_ids=[]).tokens == \
        _generate_hf(ckpt, processor, pair, text)


def test_describe_is_torch_free_and_refuses_the_mmproj(idefics2):
    spec = describe_checkpoint(idefics2["idefics2"][0])
    assert (spec.family, spec.decoder_architecture, spec.tokens_per_tile) == ("idefics2", "llama", 8)
    assert spec.mmproj_projector is None and "no Idefics2 projector type" in spec.mmproj_refusal
    assert spec.image_tokens(100, 40) == 8
    assert describe_checkpoint(idefics2["idefics2-split"][0]).image_tokens(100, 40) == 40


def test_idefics2_8b_preset_shapes_and_a_shrunk_build(tmp_path):
    """The preset's published shapes; its builder run at shrunk widths (the 8B build is 32 GB in fp32): special-token
    ids pinned, 64 image tokens, the description the family gives."""
    from dataclasses import replace

    from edgevlm.reference.preset_idefics2 import build_idefics2
    from edgevlm.reference.presets import _CORPUS, PRESETS

    shape = PRESETS["idefics2-8b"]
    assert (shape.text_hidden, shape.text_layers, shape.text_kv_heads, shape.text_mlp, shape.vocab) == \
        (4096, 32, 8, 14336, 32003)
    assert (shape.image // shape.patch, shape.latents, shape.vision_layers) == (70, 64, 27)
    small = replace(shape, text_hidden=64, text_layers=1, text_heads=4, text_kv_heads=2, text_mlp=128,
                    vision_hidden=32, vision_layers=1, vision_heads=2, vision_mlp=64, resampler_depth=1,
                    resampler_heads=2, resampler_head_dim=16, resampler_kv_heads=1)
    spec = describe_checkpoint(build_idefics2(small, tmp_path / "small", _CORPUS))
    assert (spec.layout.image_token_id, spec.tokens_per_tile, spec.vision.sequence) == (32001, 64, 70 * 70)
    assert (spec.preprocess.shortest_edge, spec.preprocess.longest_edge) == (378, 980)


def test_planner_describes_the_preset_and_counts_the_bridge(tmp_path, monkeypatch):
    """The planner's preset description (no files) is the family's; its tower + bridge parameter formula equals the
    parameters of a checkpoint built at shrunk widths."""
    from dataclasses import replace

    from edgevlm.plan.model import from_preset
    from edgevlm.reference import presets
    from edgevlm.reference.preset_idefics2 import build_idefics2

    big = from_preset("idefics2-8b")
    assert (big.family, big.layout.tokens_per_tile, big.preprocess.longest_edge) == ("idefics2", 64, 980)
    # Mistral's 4,096-token window on the llama row (every layer global): the context stops there, as load() does
    assert big.decoder.context_length == 4096 and from_preset("qwen2-vl-2b").decoder.context_length == 32768
    small = replace(presets.PRESETS["idefics2-8b"], text_hidden=64, text_layers=1, text_heads=4, text_kv_heads=2,
                    text_mlp=128, vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64, resampler_depth=2,
                    resampler_heads=2, resampler_head_dim=16, resampler_kv_heads=1, image=56, shortest_edge=28)
    monkeypatch.setitem(presets.PRESETS, "tiny-idefics2", small)
    ckpt = load_checkpoint(build_idefics2(small, tmp_path / "tiny", presets._CORPUS))
    assert from_preset("tiny-idefics2").vision.params == sum(p.numel() for p in ckpt.vision.parameters())
