"""The reference model: deterministic training, a plain HF checkpoint, and (slow) the accuracy it is built for,
kept through export and quantization."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import edgevlm
from edgevlm.reference import scenes
from edgevlm.reference.evaluate import evaluate
from edgevlm.reference.train import (
    DEFAULT_RECIPE, TINY_RECIPE, TRAIN_THREADS, build_reference, ensure_reference,
)
from edgevlm.sweep.bundles import checkpoint_digest as weights_sha256


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-ref") / "a"
    build_reference(out, TINY_RECIPE)
    return out


def test_training_is_deterministic(tiny_reference, tmp_path):
    import torch

    again = tmp_path / "b"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # whatever the caller set, training runs with its own fixed thread count
    try:
        facts = build_reference(again, TINY_RECIPE)
        assert torch.get_num_threads() == 1  # and gives the caller's setting back
    finally:
        torch.set_num_threads(previous)
    assert facts["torch_threads"] == TRAIN_THREADS
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


@pytest.fixture(scope="session")
def reference_report(reference):
    return evaluate(edgevlm.load(reference), n=200)


@pytest.mark.slow
def test_reference_accuracy_target(reference_report):
    """Issue 3's bar: >= 0.95 on 200 held-out questions, every question type >= 0.90 (PyTorch runtime, greedy)."""
    assert reference_report["n"] == 200
    assert reference_report["accuracy"] >= 0.95, reference_report
    assert set(reference_report["per_type"]) == {"colour", "count", "position", "presence", "describe"}
    assert all(acc >= 0.90 for acc in reference_report["per_type"].values()), reference_report


@pytest.mark.slow
def test_reference_hf_generate_matches_our_runtime(reference):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(reference).eval()
    processor = AutoProcessor.from_pretrained(reference)
    session = edgevlm.load(reference)

    for seed in range(4):
        scene = scenes.make_scene(6_000_000_000 + seed)
        image = scenes.render(scene)
        for qa in scenes.questions(scene, scenes.question_rng(seed)).values():
            text = session.render([session.user_message(qa.question, 1)])
            inputs = processor(images=[image], text=[text], return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
            hf_answer = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            assert session.generate(image, qa.question, max_tokens=32).text == hf_answer


@pytest.fixture(scope="session")
def reference_bundle(reference, tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    # every decoder precision the CLI offers (MLX is part of every install: a missing MLX fails here, loudly)
    decoders = [ArtifactRequest("gguf", p) for p in ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")]
    decoders += [ArtifactRequest("mlx", p) for p in ("fp32", "fp16", "8bit", "4bit")]
    return export_checkpoint(reference, tmp_path_factory.mktemp("ref-bundle") / "bundle",
                             [ArtifactRequest("onnx", "fp32"), ArtifactRequest("onnx", "int8")], decoders, max_tiles=4)


def _accuracy(bundle, encoder, decoder):
    return evaluate(edgevlm.load(bundle, encoder=encoder, decoder=decoder, threads=1), n=200)["accuracy"]


@pytest.mark.slow
def test_int8_encoder_keeps_accuracy(reference_bundle, reference_report):
    fp32 = _accuracy(reference_bundle, "onnx:fp32", "gguf:f32")
    int8 = _accuracy(reference_bundle, "onnx:int8", "gguf:f32")
    assert abs(fp32 - reference_report["accuracy"]) <= 0.01  # the split graph itself costs nothing
    assert int8 >= fp32 - 0.01


@pytest.mark.slow
def test_gguf_quants_keep_accuracy(reference_bundle):
    fp32 = _accuracy(reference_bundle, "onnx:fp32", "gguf:f32")
    for quant, points in (("q8_0", 0.01), ("q6_k", 0.01), ("q5_k_m", 0.02), ("q4_k_m", 0.03), ("q4_0", 0.03)):
        accuracy = _accuracy(reference_bundle, "onnx:fp32", f"gguf:{quant}")  # each quant gated on its own
        assert accuracy >= fp32 - points, (quant, accuracy, fp32)


@pytest.mark.slow
def test_mlx_quants_keep_accuracy(reference_bundle):
    fp32 = _accuracy(reference_bundle, "onnx:fp32", "mlx:fp32")
    assert _accuracy(reference_bundle, "onnx:fp32", "mlx:8bit") >= fp32 - 0.01
    assert _accuracy(reference_bundle, "onnx:fp32", "mlx:4bit") >= fp32 - 0.03


@pytest.mark.slow
def test_reference_gguf_and_mlx_parity(reference_bundle):
    """F32 GGUF (parity mode) and fp32 MLX against the PyTorch reference on the trained model."""
    from edgevlm.verify import DECODER_NMSE, nmse

    scene = scenes.make_scene(8_000_000_000)
    image, prompt = scenes.render(scene), "Describe the image."
    ref = edgevlm.load(reference_bundle, encoder="torch", decoder="torch").generate(
        image, prompt, max_tokens=32, stop_token_ids=[], return_logits=True)
    decoders = {"gguf:f32": DECODER_NMSE, "gguf:f16": DECODER_NMSE, "mlx:fp32": DECODER_NMSE, "mlx:fp16": 1e-4}
    for decoder, bound in decoders.items():
        ours = edgevlm.load(reference_bundle, encoder="torch", decoder=decoder, parity=True, threads=1).generate(
            image, prompt, max_tokens=32, stop_token_ids=[], return_logits=True)
        assert ours.tokens == ref.tokens, decoder  # identical greedy tokens on the trained model, fp16 included
        assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= bound, decoder


@pytest.mark.slow
def test_two_exports_give_byte_identical_artifacts(reference, tmp_path):
    """Same checkpoint, same options: the same bytes (the int8 method is chosen by accuracy, never by timing)."""
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
    from edgevlm.manifest import Manifest

    encoders = [ArtifactRequest("onnx", "fp32"), ArtifactRequest("onnx", "int8")]
    decoders = [ArtifactRequest("gguf", "q8_0"), ArtifactRequest("mlx", "4bit")]
    shas = []
    for name in ("a", "b"):
        bundle = export_checkpoint(reference, tmp_path / name, encoders, decoders, max_tiles=4)
        shas.append({(a.name, f.path): f.sha256 for a in Manifest.load(bundle).artifacts for f in a.files})
    assert len(shas[0]) >= 8 and shas[0] == shas[1]
