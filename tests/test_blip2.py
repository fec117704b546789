"""BLIP-2 / InstructBLIP (Q-Former bridge): our preprocessing, prompt ids (image tokens before BOS), Q-Former
instruction ids, vision module and greedy generation equal the HF processors and models, on tiny random checkpoints:
InstructBLIP with a Llama decoder, BLIP-2 with an OPT decoder (torch runtime only)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

import builders_blip2
from conftest import random_image
from edgevlm.families import describe_checkpoint, load_checkpoint
from edgevlm.loading import session_from_checkpoint
from edgevlm.preprocess import preprocess
from edgevlm.runtimes.requests import _new_timings

SIZES = [(50, 40), (32, 32), (17, 90)]
PROMPTS = ["What colour is the circle?", "Describe the image."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2")
    out = {}
    for name, build, seed in (("instructblip", builders_blip2.build_instructblip, 1),
                              ("blip2-opt", builders_blip2.build_blip2_opt, 2)):
        path = build(root / name, seed=seed)
        out[name] = (path, load_checkpoint(path), AutoProcessor.from_pretrained(path))
    return out


@pytest.mark.parametrize("name", ["instructblip", "blip2-opt"])
def test_pixels_and_ids_match_hf_processor(name, models):
    path, ckpt, processor = models[name]
    session = session_from_checkpoint(ckpt)
    for i, (w, h) in enumerate(SIZES):
        image = random_image(i, w, h)
        for prompt in PROMPTS:
            hf = processor(images=[image], text=[prompt], return_tensors="np")
            assert np.abs(preprocess(image, ckpt.preprocess).pixel_values - hf["pixel_values"]).max() <= 1e-6
            text = session.render([session.user_message(prompt, 1)])
            prepared = session._prepare_image(image, text)
            assert session.tokenize(text, [prepared]).ids.tolist() == hf["input_ids"][0].tolist()
            if name == "instructblip":
                assert prepared.instruction.tolist() == hf["qformer_input_ids"][0].tolist()
            else:
                assert prepared.instruction is None


def _hf_features(ckpt, processor, image, prompt) -> torch.Tensor:
    hf = processor(images=[image], text=[prompt], return_tensors="pt")
    extra = {k: hf[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in hf}
    with torch.inference_mode():
        return ckpt.hf_model.get_image_features(hf["pixel_values"], **extra).pooler_output[0]


@pytest.mark.parametrize("name", ["instructblip", "blip2-opt"])
def test_vision_module_equals_hf_image_features(name, models):
    path, ckpt, processor = models[name]
    session = session_from_checkpoint(ckpt)
    for i, (w, h) in enumerate(SIZES):
        image = random_image(i, w, h)
        features = []
        for prompt in PROMPTS:
            expected = _hf_features(ckpt, processor, image, prompt)
            prepared = session._prepare_image(image, session.render([session.user_message(prompt, 1)]))
            ours = session.encoder.encode(preprocess(image, ckpt.preprocess).pixel_values,
                                          instruction=prepared.instruction)[0]
            rel = float(np.abs(ours - expected.numpy()).max() / expected.abs().max())
            assert rel <= 1e-5, (name, w, h, rel)
            features.append(ours)
        differ = float(np.abs(features[0] - features[1]).max())
        assert (differ > 1e-3) if name == "instructblip" else differ == 0.0, differ


def _generate_hf(ckpt, processor, image, prompt, n=12):
    hf = processor(images=[image], text=[prompt], return_tensors="pt")
    for model in (ckpt.hf_model, ckpt.hf_model.language_model):  # compare n tokens without early stops (the
        model.generation_config.eos_token_id = None  # language model's generate reads its own config)
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**hf, max_new_tokens=n, do_sample=False)
    return out[0, hf["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", ["instructblip", "blip2-opt"])
def test_greedy_tokens_equal_model_generate_and_follow_image_and_instruction(name, models):
    path, ckpt, processor = models[name]
    session = session_from_checkpoint(ckpt)
    tokens = {}
    seeds = (0, 1, 2)
    for seed in seeds:
        image = random_image(seed, 50, 40)
        for prompt in PROMPTS:
            expected = _generate_hf(ckpt, processor, image, prompt)
            result = session.generate(image, prompt, max_tokens=12, stop_token_ids=[])
            assert result.tokens == expected, (seed, prompt)
            tokens[seed, prompt] = tuple(result.tokens)
    assert all(len({tokens[s, p] for s in seeds}) > 1 for p in PROMPTS), "the tiny model ignores the image"
    assert tokens[0, PROMPTS[0]] != tokens[0, PROMPTS[1]], "the tiny model ignores the instruction"


def test_embedding_cache_never_returns_features_of_another_instruction(models):
    """The same image under two instructions: two encodes, two cache entries, each equal to HF's features for its
    own instruction; asking again with the first instruction is a hit that returns the first features."""
    path, ckpt, processor = models["instructblip"]
    session = session_from_checkpoint(ckpt)
    image = random_image(5, 50, 40)
    rows = {}
    for prompt in PROMPTS + PROMPTS[:1]:
        text = session.render([session.user_message(prompt, 1)])
        timings = _new_timings()  # the counters a generation starts with
        got = session._embeddings(session._prepare_image(image, text), timings)
        expected = _hf_features(ckpt, processor, image, prompt).numpy()
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max(), prompt
        rows.setdefault(prompt, []).append((timings["embed_cache_hits"], timings["embed_cache_misses"]))
    assert rows[PROMPTS[0]] == [(0, 1), (1, 0)] and rows[PROMPTS[1]] == [(0, 1)]
    assert len(session.embed_cache) == 2


def test_describe_is_torch_free_and_names_bridge_decoder_and_refusals(models):
    spec = describe_checkpoint(models["instructblip"][0])
    assert (spec.family, spec.decoder_architecture, spec.tokens_per_tile, spec.layout.kind) == \
        ("blip2", "llama", 8, "leading")
    assert spec.instruction.tokenizer == "qformer_tokenizer" and spec.instruction.max_tokens == 64
    assert spec.mmproj_projector is None and "no BLIP-2 projector type" in spec.mmproj_refusal
    opt = describe_checkpoint(models["blip2-opt"][0])
    assert (opt.decoder_architecture, opt.instruction) == ("opt", None)
    from edgevlm.commands.inspect import supported

    info = supported()
    rows = {d["name"]: d for d in info["decoders"]}
    assert rows["opt"]["gguf_arch"] == "-" and "no OPT architecture" in rows["opt"]["export_refusal"]
    families = {f["architecture"]: f["family"] for f in info["families"]}
    assert families["InstructBlipForConditionalGeneration"] == families["Blip2ForConditionalGeneration"] == "blip2"


def test_instructblip_preset_shapes_plan_and_a_shrunk_build(tmp_path, monkeypatch):
    """The preset's published shapes; the planner's description of it is the family's; its ViT + Q-Former +
    projection parameter formula equals the parameters of a checkpoint built at shrunk widths (the 7B build is
    32 GB in fp32)."""
    from dataclasses import replace

    from edgevlm.plan.model import from_preset
    from edgevlm.reference import presets
    from edgevlm.reference.preset_instructblip import build_instructblip

    shape = presets.PRESETS["instructblip-vicuna-7b"]
    assert (shape.vision_hidden, shape.vision_layers, shape.image, shape.patch) == (1408, 39, 224, 14)
    assert (shape.qformer_hidden, shape.qformer_layers, shape.queries) == (768, 12, 32)
    assert (shape.text_hidden, shape.text_layers, shape.text_mlp) == (4096, 32, 11008)
    big = from_preset("instructblip-vicuna-7b")
    assert (big.family, big.layout.tokens_per_tile, big.layout.kind, big.decoder.architecture) == \
        ("blip2", 32, "leading", "llama")
    assert big.vision.sequence == 257
    small = replace(shape, text_hidden=64, text_layers=1, text_heads=4, text_kv_heads=2, text_mlp=128,
                    vision_hidden=32, vision_layers=2, vision_heads=2, vision_mlp=64, qformer_hidden=32,
                    qformer_layers=3, qformer_heads=2, qformer_mlp=64, qformer_vocab=200, qformer_positions=64,
                    queries=4, image=28)
    monkeypatch.setitem(presets.PRESETS, "tiny-instructblip", small)
    path = build_instructblip(small, tmp_path / "tiny", presets._CORPUS)
    spec = describe_checkpoint(path)
    assert (spec.layout.image_token_id, spec.tokens_per_tile, spec.instruction.max_tokens) == (32001, 4, 64)
    ckpt = load_checkpoint(path)
    assert from_preset("tiny-instructblip").vision.params == sum(p.numel() for p in ckpt.vision.parameters())



def test_the_instruction_the_qformer_reads_changes_the_greedy_tokens(models):
    """The same decoder prompt with the Q-Former reading another instruction gives other tokens: the bridge's
    instruction input is not ignored by the tiny model (so a runtime that dropped it would be caught)."""
    path, ckpt, processor = models["instructblip"]
    session = session_from_checkpoint(ckpt)
    image = random_image(0, 50, 40)
    right = session.generate(image, PROMPTS[0], max_tokens=12, stop_token_ids=[]).tokens
    other = session.spec.instruction_tokenizer(PROMPTS[1])
    session.spec.instruction_tokenizer = lambda text: other
    session.clear_caches()
    assert session.generate(image, PROMPTS[0], max_tokens=12, stop_token_ids=[]).tokens != right
