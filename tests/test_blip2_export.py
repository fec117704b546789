"""BLIP-2 / InstructBLIP bundles through the real runtimes: the ONNX encoder graph (ViT + Q-Former reading the
instruction's ids + projection) against HF's image features under two instructions, the F32 GGUF and fp32 MLX
decoders (llama row) against the PyTorch reference, `verify`, the embedding cache of the bundle runtime, and the
one-line refusals (BLIP-2's OPT decoder for GGUF/MLX; the mmproj: llama.cpp has no BLIP-2 projector)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image
from transformers import AutoProcessor

import builders_blip2
from bundle_checks import assert_mmproj_refused, assert_refused_in_one_line, record_worst
import edgevlm
from edgevlm.families import load_checkpoint
from edgevlm.loading import session_from_checkpoint
from edgevlm.preprocess import preprocess
from edgevlm.verify import DECODER_NMSE, nmse, verify_bundle

PROMPTS = ["What colour is the circle?", "Describe the image."]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("instructblip-export")
    ckpt_path = builders_blip2.build_instructblip(root / "ckpt", seed=1)
    bundle = export_checkpoint(ckpt_path, root / "bundle", [ArtifactRequest("onnx", p) for p in ("fp32", "fp16", "int8")],
                               [ArtifactRequest("gguf", "f32"), ArtifactRequest("mlx", "fp32")], max_tiles=4)
    return ckpt_path, bundle, load_checkpoint(ckpt_path)


@pytest.fixture(scope="module")
def blip2_opt(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2-opt")
    return builders_blip2.build_blip2_opt(root / "ckpt", seed=2)


def _hf_features(ckpt, processor, image, prompt) -> np.ndarray:
    hf = processor(images=[image], text=[prompt], return_tensors="pt")
    extra = {k: hf[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in hf}
    with torch.inference_mode():
        return ckpt.hf_model.get_image_features(hf["pixel_values"], **extra).pooler_output[0].numpy()


def test_onnx_encoder_reads_the_instruction_and_equals_hf_image_features(exported):
    ckpt_path, bundle, ckpt = exported
    processor = AutoProcessor.from_pretrained(ckpt_path)
    worst = {}
    for precision in ("fp32", "fp16", "int8"):
        session = edgevlm.load(bundle, encoder=f"onnx:{precision}", decoder="gguf:f32", threads=1)
        for i, (w, h) in enumerate([(50, 40), (17, 90)]):
            image = random_image(i, w, h)
            outputs = []
            for prompt in PROMPTS:
                expected = _hf_features(ckpt, processor, image, prompt)
                prepared = session._prepare_image(image, session.render([session.user_message(prompt, 1)]))
                ours = session.encoder.encode(preprocess(image, ckpt.preprocess).pixel_values,
                                              instruction=prepared.instruction)[0]
                record_worst(worst, precision, ours, expected)
                outputs.append(ours)
            if precision == "fp32":  # two instructions on the same image: different rows
                assert float(np.abs(outputs[0] - outputs[1]).max()) > 1e-3
    assert worst["fp32"][0] <= 1e-4, worst
    assert worst["fp16"][1] >= 0.98 and worst["int8"][1] >= 0.98, worst  # random weights: sanity only
    print("instructblip encoder vs HF image features (max rel, cosine):", worst)


@pytest.mark.parametrize("decoder", ["gguf:f32", "mlx:fp32"])
def test_bundle_decoders_match_pytorch_logits_and_tokens(exported, decoder):
    ckpt_path, bundle, ckpt = exported
    options = dict(max_tokens=12, stop_token_ids=[], return_logits=True)
    reference = session_from_checkpoint(ckpt)
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder=decoder, threads=1, parity=decoder.startswith("gguf"))
    for seed, prompt in ((0, PROMPTS[0]), (1, PROMPTS[1])):
        image = random_image(seed, 50, 40)
        ref = reference.generate(image, prompt, **options)
        ours = session.generate(image, prompt, **options)
        assert ours.tokens == ref.tokens, (decoder, seed)
        error = nmse(np.stack(ours.logits), np.stack(ref.logits))
        assert error <= DECODER_NMSE, (decoder, error)
        print(f"instructblip {decoder} vs torch: NMSE {error:.2e}")


def test_bundle_embedding_cache_keys_on_the_instruction(exported):
    """Through the torch-free bundle runtime: the same image under another instruction is encoded again (a miss)
    and gives the rows HF gives for that instruction, never the cached rows of the first."""
    ckpt_path, bundle, ckpt = exported
    processor = AutoProcessor.from_pretrained(ckpt_path)
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    image = random_image(3, 50, 40)
    for prompt, (hits, misses) in zip(PROMPTS + PROMPTS[:1], [(0, 1), (0, 1), (1, 0)]):
        session.prefix_cache.clear()  # the image's rows come from the embedding cache, not a restored KV prefix
        session.forget_sequence()
        result = session.generate(image, prompt, max_tokens=2, stop_token_ids=[])
        assert (result.timings["embed_cache_hits"], result.timings["embed_cache_misses"]) == (hits, misses), prompt
        prepared = session._prepare_image(image, session.render([session.user_message(prompt, 1)]))
        rows = session.embed_cache.peek(prepared.key)
        expected = _hf_features(ckpt, processor, image, prompt)
        assert np.abs(rows - expected).max() <= 1e-4 * np.abs(expected).max(), prompt
    assert len(session.embed_cache) == 2


def test_verify_passes_what_random_weights_can_judge(exported):
    rows = verify_bundle(exported[1], threads=1)
    by_name = {r["artifact"]: r for r in rows}
    assert by_name["onnx:fp32"]["status"] == "pass" and by_name["onnx:fp32"]["max_rel_err"] <= 1e-4
    assert by_name["gguf:f32"]["status"] == "pass" and by_name["gguf:f32"]["nmse"] <= 1e-5
    assert {r["status"] for r in rows} <= {"pass", "unjudged"}, rows


def test_mmproj_is_refused_in_one_line(exported, tmp_path, capsys):
    assert_mmproj_refused(exported[0], tmp_path, capsys, "no BLIP-2 projector type")


@pytest.mark.parametrize("decoder", ["gguf:f32", "mlx:fp32"])
def test_blip2_opt_decoder_is_refused_in_one_line(blip2_opt, decoder, tmp_path, capsys):
    out = tmp_path / "refused"
    assert_refused_in_one_line(["export", str(blip2_opt), "-o", str(out), "--encoder", "onnx:fp32", "--decoder", decoder],
                               "OPT decoders cannot be written as GGUF or MLX", out, capsys)


def test_blip2_opt_onnx_encoder_with_the_torch_decoder_equals_model_generate(blip2_opt, tmp_path):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    bundle = export_checkpoint(blip2_opt, tmp_path / "bundle", [ArtifactRequest("onnx", "fp32")], [], max_tiles=4)
    ckpt = load_checkpoint(blip2_opt)
    processor = AutoProcessor.from_pretrained(blip2_opt)
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="torch", threads=1)
    for model in (ckpt.hf_model, ckpt.hf_model.language_model):
        model.generation_config.eos_token_id = None
    for seed in (0, 1):
        image = random_image(seed, 50, 40)
        hf = processor(images=[image], text=[PROMPTS[1]], return_tensors="pt")
        with torch.inference_mode():
            expected = ckpt.hf_model.generate(**hf, max_new_tokens=10, do_sample=False)[0, hf["input_ids"].shape[1]:]
        assert session.generate(image, PROMPTS[1], max_tokens=10, stop_token_ids=[]).tokens == expected.tolist()
