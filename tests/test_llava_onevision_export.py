"""A LLaVA-OneVision bundle through the real runtimes: the ONNX encoder graph (SigLIP + projector per tile, the
image_newline as each tile's last row) packed in numpy against HF's image features, the F32 GGUF and fp32 MLX
decoders (qwen2 row) against the torch reference and model.generate (one image, and two in one prompt), `verify`,
`plan` figures, and the mmproj refusal (llama.cpp has no LLaVA-OneVision projector)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bundle_checks import assert_mmproj_refused, record_worst
import edgevlm
import onevision_builder
from conftest import random_image
from edgevlm.families import load_checkpoint
from edgevlm.preprocess import preprocess
from edgevlm.verify import DECODER_NMSE, nmse, outcome, verify_bundle

SIZES = [(100, 40), (128, 128), (50, 70)]  # wide (unpadded), square (pooled), tall
PROMPT = "Describe <image> the image."


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("mlx.core", reason="MLX is not installed on this platform (pip install 'mlx[cpu]' mlx-lm)")
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("onevision-export")
    ckpt_path = onevision_builder.build_onevision(root / "ckpt", seed=5)
    bundle = export_checkpoint(ckpt_path, root / "bundle", [ArtifactRequest("onnx", p) for p in ("fp32", "fp16", "int8")],
                               [ArtifactRequest("gguf", "f32"), ArtifactRequest("mlx", "fp32")], max_tiles=17)
    return ckpt_path, bundle, load_checkpoint(ckpt_path)


def test_onnx_encoder_packed_equals_hf_image_features(exported):
    ckpt_path, bundle, ckpt = exported
    processor = onevision_builder.hf_processor(ckpt_path)
    worst = {}
    for precision in ("fp32", "fp16", "int8"):
        session = edgevlm.load(bundle, encoder=f"onnx:{precision}", decoder="gguf:f32", threads=1)
        for i, (w, h) in enumerate(SIZES):
            image = random_image(i, w, h)
            hf = processor(images=[image], text=["<image>"], return_tensors="pt")
            with torch.inference_mode():
                expected = ckpt.hf_model.model.get_image_features(hf["pixel_values"], hf["image_sizes"])
            expected = expected.pooler_output[0].numpy()
            pre = preprocess(image, session.spec.preprocess)  # the manifest's preprocessing
            ours = session.spec.preprocess.pack_anyres(session.encoder.encode(pre.pixel_values), *pre.source_size)
            assert ours.shape == expected.shape
            record_worst(worst, precision, ours, expected)
    assert worst["fp32"][0] <= 1e-4, worst
    # random weights: fp16/int8 held to sanity only (verify judges them on trained weights)
    assert worst["fp16"][1] >= 0.99 and worst["int8"][1] >= 0.98, worst
    print("llava-onevision encoder (packed) vs HF image features (max rel, cosine):", worst)


@pytest.mark.parametrize("decoder", ["gguf:f32", "mlx:fp32"])
def test_f32_decoders_parity_with_pytorch_and_model_generate(decoder, exported):
    ckpt_path, bundle, ckpt = exported
    processor = onevision_builder.hf_processor(ckpt_path)
    reference = edgevlm.load(ckpt_path)
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder=decoder, threads=1)
    text = session.render([session.user_message(PROMPT, 1)])
    for i, (w, h) in enumerate(SIZES[:2]):
        image = random_image(10 + i, w, h)
        ref = reference.generate(image, PROMPT, max_tokens=16, stop_token_ids=[], return_logits=True)
        ours = session.generate(image, PROMPT, max_tokens=16, stop_token_ids=[], return_logits=True)
        assert ours.tokens == ref.tokens, (decoder, w, h)
        assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE
        hf = processor(images=[image], text=[text], return_tensors="pt")
        ckpt.hf_model.generation_config.eos_token_id = None
        with torch.inference_mode():
            out = ckpt.hf_model.generate(**hf, max_new_tokens=16, do_sample=False)
        assert ours.tokens == out[0, hf["input_ids"].shape[1]:].tolist(), (decoder, w, h)


@pytest.mark.parametrize("decoder", ["gguf:f32", "mlx:fp32"])
def test_two_images_in_one_prompt_through_the_bundle_equal_pytorch_and_model_generate(decoder, exported):
    """Several images in one prompt (each a square view: one tile's rows + the newline row): the ONNX encoder with
    the F32 GGUF / fp32 MLX decoder gives the torch reference's tokens and logits, and model.generate's tokens."""
    ckpt_path, bundle, ckpt = exported
    processor = onevision_builder.hf_processor(ckpt_path)
    reference = edgevlm.load(ckpt_path)
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder=decoder, threads=1)
    prompt = "Compare <image> and <image>."
    text = session.render([session.user_message(prompt, 2)])
    for i, sizes in enumerate([((100, 40), (50, 70)), ((128, 128), (40, 30))]):
        images = [random_image(20 + 2 * i + j, w, h) for j, (w, h) in enumerate(sizes)]
        ref = reference.generate(images, prompt, max_tokens=16, stop_token_ids=[], return_logits=True)
        ours = session.generate(images, prompt, max_tokens=16, stop_token_ids=[], return_logits=True)
        assert ours.tokens == ref.tokens, (decoder, sizes)
        assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE
        hf = processor(images=[images], text=[text], return_tensors="pt")
        ckpt.hf_model.generation_config.eos_token_id = None
        with torch.inference_mode():
            out = ckpt.hf_model.generate(**hf, max_new_tokens=16, do_sample=False)
        assert ours.tokens == out[0, hf["input_ids"].shape[1]:].tolist(), (decoder, sizes)


def test_verify_passes_what_random_weights_can_judge(exported):
    rows = verify_bundle(exported[1], threads=1)
    by_name = {r["artifact"]: r for r in rows}
    assert by_name["onnx:fp32"]["status"] == "pass" and by_name["onnx:fp32"]["max_rel_err"] <= 1e-4
    assert by_name["gguf:f32"]["status"] == "pass" and by_name["gguf:f32"]["nmse"] <= 1e-5
    assert by_name["mlx:fp32"]["status"] == "pass" and by_name["mlx:fp32"]["nmse"] <= 1e-5
    assert by_name["onnx:fp32 + gguf:f32"]["status"] == "pass"
    assert {r["status"] for r in rows} <= {"pass", "unjudged"}, rows
    assert outcome(rows)[1] in (0, 3)


def test_mmproj_is_refused_in_one_line(exported, tmp_path, capsys):
    assert_mmproj_refused(exported[0], tmp_path, capsys, "no LLaVA-OneVision projector type")
