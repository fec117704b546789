"""The reference model: deterministic training, a plain HF checkpoint, and (slow) the accuracy it is built for,
kept through export and quantization."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm import scenes
from edgevlm.evaluate import evaluate
from edgevlm.families.reference import DEFAULT_RECIPE, TINY_RECIPE, build_reference, ensure_reference, weights_sha256


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-ref") / "a"
    build_reference(out, TINY_RECIPE)
    return out


def test_training_is_deterministic(tiny_reference, tmp_path):
    again = tmp_path / "b"
    build_reference(again, TINY_RECIPE)
    assert weights_sha256(tiny_reference) == weights_sha256(again)


def test_recipe_hash_keys_the_cache():
    from dataclasses import replace

    assert DEFAULT_RECIPE.digest() != replace(DEFAULT_RECIPE, seed=1).digest()
    assert DEFAULT_RECIPE.text_hidden % 256 == 0 and DEFAULT_RECIPE.text_mlp % 256 == 0  # K-quants apply


def test_checkpoint_is_plain_transformers_and_generate_agrees(tiny_reference):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_reference).eval()
    processor = AutoProcessor.from_pretrained(tiny_reference)
    session = edgevlm.load(tiny_reference)
    model.generation_config.eos_token_id = None
    for seed in range(3):
        scene = scenes.make_scene(5_000_000_000 + seed)
        image = scenes.render(scene)
        text = session.render([session.user_message("What colour is the circle?", 1)])
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        ours = session.generate(image, "What colour is the circle?", max_tokens=8, stop_token_ids=[])
        assert ours.tokens == out[0, inputs["input_ids"].shape[1]:].tolist()


def test_scenes_are_pure_functions_of_the_seed():
    a, b = scenes.make_scene(42), scenes.make_scene(42)
    assert a == b
    assert np.array_equal(np.asarray(scenes.render(a)), np.asarray(scenes.render(b)))
    assert len({s.kind for s in a.shapes}) == len(a.shapes)  # kinds are unique, so questions are unambiguous


# ---- the real reference model (trained once per machine, cached under ~/.cache/edgevlm) --------------------------

@pytest.fixture(scope="session")
def reference():
    return ensure_reference(DEFAULT_RECIPE)


@pytest.mark.slow
def test_reference_accuracy(reference):
    report = evaluate(edgevlm.load(reference), n=200)
    assert report["n"] == 200
    assert report["accuracy"] >= 0.95, report
    assert all(acc >= 0.90 for acc in report["per_type"].values()), report


@pytest.mark.slow
def test_reference_hf_generate_matches_our_runtime(reference):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(reference).eval()
    processor = AutoProcessor.from_pretrained(reference)
    session = edgevlm.load(reference)
    import random

    for seed in range(4):
        scene = scenes.make_scene(6_000_000_000 + seed)
        image = scenes.render(scene)
        for qa in scenes.questions(scene, random.Random(seed)).values():
            text = session.render([session.user_message(qa.question, 1)])
            inputs = processor(images=[image], text=[text], return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
            hf_answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            assert session.generate(image, qa.question, max_tokens=32).text == hf_answer
