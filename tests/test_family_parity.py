"""Our preprocessing, prompt ids and greedy generation equal the HF processor and model.generate exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from edgevlm.families import load_checkpoint
from edgevlm.loading import session_from_checkpoint
from edgevlm.preprocess import preprocess

FAMILIES = ["llava-clip", "llava-siglip", "idefics3", "idefics3-nosplit"]


@pytest.fixture(scope="module")
def loaded(ckpts):
    return {name: load_checkpoint(ckpts[name]) for name in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("image_name", ["small", "wide", "tall", "tiny", "square"])
def test_pixels_and_ids_match_hf_processor(family, image_name, loaded, ckpts, images):
    ckpt = loaded[family]
    processor = AutoProcessor.from_pretrained(ckpts[family])
    session = session_from_checkpoint(ckpt)
    image = images[image_name]
    text = session.render([session.user_message("What colour is the circle?", 1)])
    hf = processor(images=[image], text=[text], return_tensors="np")
    ours = preprocess(image, ckpt.preprocess)
    hf_pixels = hf["pixel_values"].reshape(ours.pixel_values.shape)
    assert np.abs(hf_pixels - ours.pixel_values).max() <= 1e-6
    prompt = session.tokenize(text, [session._prepare_image(image)])
    assert prompt.ids.tolist() == hf["input_ids"][0].tolist()


def test_idefics3_splits_into_tiles_plus_global(loaded, images):
    ckpt = loaded["idefics3"]
    out = preprocess(images["wide"], ckpt.preprocess)  # 100x40 -> longest 64 -> 64x32 -> 2 cols x 1 row
    assert (out.rows, out.cols) == (1, 2)
    assert out.pixel_values.shape == (3, 3, 32, 32)


def test_llava_two_images_ids_match(loaded, ckpts, images):
    ckpt = loaded["llava-clip"]
    processor = AutoProcessor.from_pretrained(ckpts["llava-clip"])
    session = session_from_checkpoint(ckpt)
    text = session.render([session.user_message("Compare <image> with <image> please.", 2)])
    pair = [images["small"], images["wide"]]
    hf = processor(images=pair, text=[text], return_tensors="np")
    prompt = session.tokenize(text, [session._prepare_image(i) for i in pair])
    assert prompt.ids.tolist() == hf["input_ids"][0].tolist()
    assert len(prompt.runs) == 2


@pytest.mark.parametrize("family,image_name", [
    ("llava-clip", "small"), ("llava-siglip", "square"), ("idefics3", "wide"), ("idefics3", "tiny"),
    ("idefics3-nosplit", "tall"),
])
def test_greedy_tokens_equal_model_generate(family, image_name, loaded, ckpts, images):
    ckpt = loaded[family]
    processor = AutoProcessor.from_pretrained(ckpts[family])
    session = session_from_checkpoint(ckpt)
    image = images[image_name]
    prompt = "Describe <image> the image."
    text = session.render([session.user_message(prompt, 1)])
    hf = processor(images=[image], text=[text], return_tensors="pt")
    ckpt.hf_model.generation_config.eos_token_id = None  # compare 16 tokens without early stops
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**hf, max_new_tokens=16, do_sample=False)
    expected = out[0, hf["input_ids"].shape[1]:].tolist()
    result = session.generate(image, prompt, max_tokens=16, stop_token_ids=[])
    assert result.tokens == expected
    assert result.timings["n_image_tokens"] == int((hf["input_ids"] == ckpt.layout.image_token_id).sum())


def test_vision_module_equals_hf_image_features(loaded, ckpts, images):
    """The exported seam (family vision module) is the HF model's own image-feature path."""
    for family in ("llava-clip", "llava-siglip", "idefics3"):
        ckpt = loaded[family]
        pixels = torch.from_numpy(preprocess(images["wide"], ckpt.preprocess).pixel_values)
        with torch.inference_mode():
            ours = ckpt.vision(pixels)
            if family == "idefics3":
                hf = ckpt.hf_model.model.get_image_features(pixels[None]).pooler_output[0]
                ours = ours.reshape(-1, ours.shape[-1])
            else:
                cfg = ckpt.hf_model.config
                hf = torch.stack(ckpt.hf_model.model.get_image_features(
                    pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                    vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output)
        assert torch.allclose(ours, hf, atol=1e-6), family


def test_decoder_is_a_plain_llama(loaded):
    from transformers import LlamaForCausalLM

    for ckpt in loaded.values():
        assert isinstance(ckpt.decoder, LlamaForCausalLM)
        fresh = LlamaForCausalLM(ckpt.decoder.config)
        fresh.load_state_dict(ckpt.decoder.state_dict())  # strict: the state dict fits a stock Llama
