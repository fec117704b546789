"""LLaVA-OneVision (anyres-max bridge) on a tiny random checkpoint: pixels and ids equal transformers' processor for
several aspect ratios (one grid pooled by the anyres_max_9 rule), the per-tile vision module + numpy packing equal
HF's get_image_features + pack_image_features, and the torch runtime's greedy tokens equal model.generate; dropping
the newline rows or the unpadding changes the tokens; several images in one prompt are square views, as HF's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import onevision_builder
from conftest import random_image
from edgevlm import anyres
from edgevlm.families import describe_checkpoint, load_checkpoint
from edgevlm.loading import session_from_checkpoint
from edgevlm.preprocess import preprocess

# (w, h): tall, wide (unpadded rows), square (4 x 4 grid: 16 x 16 features pooled to 12 x 12), 4:3 (3 x 4 grid
# pooled to 10 x 13), tiny (upscaled), odd sides, larger than every pinpoint
SIZES = [(50, 70), (100, 40), (128, 128), (128, 96), (30, 90), (33, 29), (200, 150)]
POOLED = {(128, 128), (128, 96), (200, 150)}
PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    path = onevision_builder.build_onevision(tmp_path_factory.mktemp("onevision") / "ckpt", seed=3)
    return path, load_checkpoint(path), onevision_builder.hf_processor(path)


def _hf(processor, image, text):
    return processor(images=[image], text=[text], return_tensors="pt")


def test_pixels_and_ids_match_hf_processor(onevision):
    path, ckpt, processor = onevision
    session = session_from_checkpoint(ckpt)
    text = session.render([session.user_message(PROMPT, 1)])
    pooled = set()
    for i, (w, h) in enumerate(SIZES):
        image = random_image(i, w, h)
        hf = processor(images=[image], text=[text], return_tensors="np")
        ours = preprocess(image, ckpt.preprocess)
        assert ours.pixel_values.shape == hf["pixel_values"][0].shape, (w, h)
        assert np.abs(ours.pixel_values - hf["pixel_values"][0]).max() <= 1e-6, (w, h)
        assert list(ours.source_size) == hf["image_sizes"][0].tolist()
        prompt = session.tokenize(text, [session._prepare_image(image)])
        assert prompt.ids.tolist() == hf["input_ids"][0].tolist(), (w, h)
        if anyres.feature_shape(h, w, ckpt.preprocess.grid_pinpoints, 32, 4, 9)[2]:
            pooled.add((w, h))
    assert pooled == POOLED  # the max-token pooling is exercised, and only where the rule says


def test_packed_features_equal_hf_image_features(onevision):
    path, ckpt, processor = onevision
    for i, (w, h) in enumerate(SIZES):
        image = random_image(i, w, h)
        hf = _hf(processor, image, "<image>")
        pre = preprocess(image, ckpt.preprocess)
        with torch.inference_mode():
            expected = ckpt.hf_model.model.get_image_features(hf["pixel_values"], hf["image_sizes"]).pooler_output[0]
            tiles = ckpt.vision(torch.from_numpy(pre.pixel_values)).numpy()  # (tiles, 16 + 1, D)
        ours = ckpt.preprocess.pack_anyres(tiles, *pre.source_size)
        assert ours.shape == tuple(expected.shape) == (describe_checkpoint(path).image_tokens(w, h), 64), (w, h)
        rel = float(np.abs(ours - expected.numpy()).max() / expected.abs().max())
        assert rel <= 1e-5, (w, h, rel)


def _generate_hf(ckpt, processor, image, text, n=12):
    hf = _hf(processor, image, text)
    ckpt.hf_model.generation_config.eos_token_id = None  # compare n tokens without early stops
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**hf, max_new_tokens=n, do_sample=False)
    return out[0, hf["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("size", [(100, 40), (128, 96)])
def test_greedy_tokens_equal_model_generate_and_follow_the_image(size, onevision):
    path, ckpt, processor = onevision
    session = session_from_checkpoint(ckpt)
    text = session.render([session.user_message(PROMPT, 1)])
    tokens = {}
    for seed in (0, 1):
        image = random_image(seed, *size)
        expected = _generate_hf(ckpt, processor, image, text)
        tokens[seed] = session.generate(image, PROMPT, max_tokens=12, stop_token_ids=[]).tokens
        assert tokens[seed] == expected, (size, seed)
    assert tokens[0] != tokens[1], "the tiny model ignores the image: it cannot tell a right bridge from a wrong one"


def _without_newlines(pack):
    def damaged(embeds, *args):
        embeds = embeds.copy()
        embeds[:, -1] = 0.0  # every tile's newline row: the packed newline rows become zeros
        return pack(embeds, *args)
    return damaged


def _top_aligned(unpadded_shape):
    def damaged(height, width, rows, cols):
        kept_rows, kept_cols = unpadded_shape(height, width, rows, cols)
        # as many rows, from the top: the padding's rows kept instead of the image's own last ones
        return slice(0, kept_rows.stop - kept_rows.start), slice(0, kept_cols.stop - kept_cols.start)
    return damaged


@pytest.mark.parametrize("damage", ["newline", "unpad"])
def test_dropping_newlines_or_unpadding_changes_the_tokens(damage, onevision, monkeypatch):
    """The same image (a wide one: its grid's top and bottom feature rows are padding) through the right packing and
    a damaged one of the same length: the newline rows zeroed, or the unpadding window taken from the top (the
    padding kept, the image's last rows dropped). The tiny model must tell them apart."""
    path, ckpt, processor = onevision
    image = random_image(4, 100, 40)
    right = session_from_checkpoint(ckpt).generate(image, PROMPT, max_tokens=12, stop_token_ids=[]).tokens
    if damage == "newline":
        monkeypatch.setattr(anyres, "pack", _without_newlines(anyres.pack))
    else:
        monkeypatch.setattr(anyres, "unpadded_shape", _top_aligned(anyres.unpadded_shape))
    wrong = session_from_checkpoint(ckpt).generate(image, PROMPT, max_tokens=12, stop_token_ids=[]).tokens
    assert wrong != right, damage


def test_describe_is_torch_free_and_refuses_the_mmproj(onevision):
    spec = describe_checkpoint(onevision[0])
    assert (spec.family, spec.decoder_architecture, spec.tokens_per_tile) == ("llava_onevision", "qwen2", 17)
    assert spec.mmproj_projector is None and "no LLaVA-OneVision projector type" in spec.mmproj_refusal
    assert (spec.preprocess.max_pooled_tiles, len(spec.preprocess.grid_pinpoints)) == (9, 16)
    assert spec.image_tokens(32, 32) == 16 + 4 * 5  # base view + one tile's 4 lines of 4 features and a newline
    assert spec.image_tokens(128, 128) == 16 + 12 * 13  # pooled from 16 x 16


def test_pack_refuses_rows_of_another_grid():
    with pytest.raises(ValueError, match="anyres"):
        anyres.pack(np.zeros((3, 17, 8), np.float32), 32, 32, [[32, 32]], 32, 4, 9)


def test_onevision_preset_shapes_worst_image_and_a_shrunk_build(tmp_path, monkeypatch):
    """The preset's published shapes; the planner's worst-case image (the pinpoint whose packed rows are most: not
    the largest grid, which pooling shrinks); its tower + projector formula equals a build at shrunk widths."""
    from dataclasses import replace

    from edgevlm.plan import budget
    from edgevlm.plan.model import from_preset
    from edgevlm.reference import presets
    from edgevlm.reference.preset_onevision import build_onevision

    shape = presets.PRESETS["llava-onevision-0.5b"]
    assert (shape.text_hidden, shape.text_layers, shape.text_heads, shape.text_kv_heads, shape.text_mlp) == \
        (896, 24, 14, 2, 4864)
    assert (shape.vision_hidden, shape.vision_layers, shape.image // shape.patch, shape.vocab) == (1152, 26, 27, 152000)
    big = from_preset("llava-onevision-0.5b")
    assert (big.family, big.layout.tokens_per_tile, big.preprocess.max_pooled_tiles) == ("llava_onevision", 730, 9)
    width, height = budget.largest_image(big.preprocess)
    worst = budget.image_tokens(big.layout, big.preprocess, width, height).image_rows
    # 768 x 1920: 5 x 2 tiles, 135 x 54 features stay under the pooling threshold: 729 + 135 x 55
    assert ((width, height), worst) == ((768, 1920), 8154)
    assert budget.image_tokens(big.layout, big.preprocess, 2304, 2304).image_rows == 729 + 81 * 82  # 162^2 pooled
    small = replace(shape, text_hidden=64, text_layers=1, text_heads=4, text_kv_heads=2, text_mlp=128,
                    vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64, image=56, patch=14, max_grid=2)
    monkeypatch.setitem(presets.PRESETS, "tiny-onevision", small)
    path = build_onevision(small, tmp_path / "tiny", presets._CORPUS)
    spec = describe_checkpoint(path)
    assert (spec.layout.image_token_id, spec.tokens_per_tile, spec.preprocess.grid_pinpoints[-1]) == (151646, 17, (112, 112))
    ckpt = load_checkpoint(path)
    assert from_preset("tiny-onevision").vision.params == sum(p.numel() for p in ckpt.vision.parameters())


TWO_IMAGES = "Compare <image> and <image>."


def _hf_several(processor, images, text, **kwargs):
    """HF's multi-image path: the images of one prompt as one nested list (what apply_chat_template hands over)."""
    return processor(images=[images], text=[text], **kwargs)


def test_several_images_in_one_prompt_are_square_views_as_hf(onevision):
    """Each image of a multi-image prompt: one square-padded view (no grid, no packing), its tile's rows and one
    image_newline row; pixels, ids, rows and greedy tokens equal the HF processor and model (batch_num_images)."""
    from edgevlm.preprocess import preprocess_square_view

    path, ckpt, processor = onevision
    session = session_from_checkpoint(ckpt)
    text = session.render([session.user_message(TWO_IMAGES, 2)])
    tokens = {}
    for i, sizes in enumerate([((40, 30), (30, 70)), ((128, 96), (32, 32)), ((200, 150), (100, 40))]):
        images = [random_image(10 * i + j, w, h) for j, (w, h) in enumerate(sizes)]
        hf = _hf_several(processor, images, text, return_tensors="pt")
        assert hf["batch_num_images"].tolist() == [2]
        prepared = [session._prepare_image(image, text) for image in images]
        assert [p.n_rows_embedded for p in prepared] == [17, 17] and all(p.square_view for p in prepared)
        assert session.tokenize(text, prepared).ids.tolist() == hf["input_ids"][0].tolist(), sizes
        with torch.inference_mode():
            expected = ckpt.hf_model.model.get_image_features(hf["pixel_values"], hf["image_sizes"],
                                                              batch_num_images=hf["batch_num_images"]).pooler_output
        for j, image in enumerate(images):
            pixels = preprocess_square_view(image, ckpt.preprocess).pixel_values
            assert np.abs(pixels - hf["pixel_values"][j].numpy()).max() <= 1e-6, (sizes, j)
            with torch.inference_mode():
                rows = ckpt.vision(torch.from_numpy(pixels)).numpy()[0]  # (16 + 1, D): no packing
            rel = float(np.abs(rows - expected[j].numpy()).max() / expected[j].abs().max())
            assert rel <= 1e-5, (sizes, j, rel)
        ckpt.hf_model.generation_config.eos_token_id = None
        with torch.inference_mode():
            out = ckpt.hf_model.generate(**hf, max_new_tokens=12, do_sample=False)[0, hf["input_ids"].shape[1]:]
        tokens[i] = session.generate(images, TWO_IMAGES, max_tokens=12, stop_token_ids=[]).tokens
        assert tokens[i] == out.tolist(), sizes
    assert len(set(map(tuple, tokens.values()))) == 3, "the tiny model ignores the images"
    # the same image alone in a prompt is packed (anyres grid), not a square view: other rows, another cache key
    alone = session._prepare_image(random_image(0, 40, 30), session.render([session.user_message(PROMPT, 1)]))
    assert not alone.square_view and alone.n_rows_embedded == ckpt.preprocess.anyres_rows(30, 40)
    assert alone.key != session._prepare_image(random_image(0, 40, 30), text).key


def test_a_second_image_in_a_follow_up_turn_makes_both_square_views(onevision):
    """HF's chat template hands every image of the conversation to the processor at once: an image asked about alone
    (packed) becomes a square view once a later turn adds another; the follow-up equals model.generate on the whole
    conversation (the live sequence is not reused past the first image, whose rows changed)."""
    path, ckpt, processor = onevision
    session = session_from_checkpoint(ckpt)
    first, second = random_image(7, 100, 40), random_image(8, 50, 70)
    session.generate(first, PROMPT, max_tokens=4, stop_token_ids=[])
    follow = session.chat("And <image>?", image=second, max_tokens=12, stop_token_ids=[])
    text = session.render(session._messages[:-1])
    assert text.count("<image>") == 2
    hf = _hf_several(processor, [first, second], text, return_tensors="pt")
    ckpt.hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**hf, max_new_tokens=12, do_sample=False)[0, hf["input_ids"].shape[1]:]
    assert follow.tokens == out.tolist()
    assert follow.timings["embed_cache_misses"] == 2  # both images encoded as square views
