"""BLIP-2 with a Flan-T5 decoder (an encoder-decoder), on a tiny random checkpoint: what can be exported is (the ONNX
encoder: ViT + Q-Former + projection, against HF's image features), the T5 runs on the torch runtime (the prompt is
the T5 encoder's input; greedy tokens equal `model.generate`), GGUF/MLX decoders are refused in one line (exit 2),
and a follow-up turn re-reads the whole prompt instead of extending it in place (prefix-KV reuse does not apply)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

import builders_blip2
from bundle_checks import assert_refused_in_one_line
import edgevlm
from conftest import random_image
from edgevlm.families import describe_checkpoint, load_checkpoint
from edgevlm.loading import session_from_checkpoint
from edgevlm.preprocess import preprocess
from edgevlm.runtimes.torch_seq2seq import TorchSeq2SeqDecoder

PROMPTS = ["What colour is the circle?", "Describe the image."]
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    path = builders_blip2.build_blip2_t5(tmp_path_factory.mktemp("blip2-t5") / "ckpt", seed=3)
    ckpt = load_checkpoint(path)
    for model in (ckpt.hf_model, ckpt.hf_model.language_model):  # n tokens without early stops (the language
        model.generation_config.eos_token_id = None  # model's generate reads its own config)
    return path, ckpt, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def bundle(t5, tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    return export_checkpoint(t5[0], tmp_path_factory.mktemp("blip2-t5-bundle") / "bundle",
                             [ArtifactRequest("onnx", "fp32")], [], max_tiles=4)


def _generate_hf(ckpt, processor, image, prompt, n=12) -> list[int]:
    hf = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**hf, max_new_tokens=n, do_sample=False)
    return out[0, 1:].tolist()  # an encoder-decoder's output starts with the decoder's start token


def test_describe_names_the_t5_row_as_a_prefix_block_and_the_refusal(t5):
    spec = describe_checkpoint(t5[0])
    assert (spec.family, spec.decoder_architecture, spec.image_attention, spec.instruction) == \
        ("blip2", "t5", "prefix", None)
    assert isinstance(session_from_checkpoint(t5[1]).decoder, TorchSeq2SeqDecoder)
    from edgevlm.commands.inspect import supported

    rows = {d["name"]: d for d in supported()["decoders"]}
    assert rows["t5"]["gguf_arch"] == "-" and "encoder-decoder" in rows["t5"]["export_refusal"]


def test_pixels_and_ids_match_hf_processor(t5):
    path, ckpt, processor = t5
    session = session_from_checkpoint(ckpt)
    for i, (w, h) in enumerate([(50, 40), (17, 90)]):
        image = random_image(i, w, h)
        for prompt in PROMPTS:
            hf = processor(images=[image], text=[prompt], return_tensors="np")
            assert np.abs(preprocess(image, ckpt.preprocess).pixel_values - hf["pixel_values"]).max() <= 1e-6
            text = session.render([session.user_message(prompt, 1)])
            assert session.tokenize(text, [session._prepare_image(image, text)]).ids.tolist() == \
                hf["input_ids"][0].tolist()


def test_torch_runtime_greedy_tokens_equal_model_generate_and_follow_the_image(t5):
    path, ckpt, processor = t5
    session = session_from_checkpoint(ckpt)
    tokens = {}
    for seed in SEEDS:
        image = random_image(seed, 50, 40)
        for prompt in PROMPTS:
            result = session.generate(image, prompt, max_tokens=12, stop_token_ids=[])
            assert result.tokens == _generate_hf(ckpt, processor, image, prompt), (seed, prompt)
            tokens[seed, prompt] = tuple(result.tokens)
    assert all(len({tokens[s, p] for s in SEEDS}) > 1 for p in PROMPTS), "the tiny model ignores the image"


def test_a_follow_up_turn_re_reads_the_whole_prompt(t5):
    """Every T5 encoder row depends on the whole prompt: a follow-up turn (and the same prompt again) keeps nothing
    of the live sequence, and gives the tokens a cold session gives for the same conversation."""
    path, ckpt, processor = t5
    session = session_from_checkpoint(ckpt)
    image = random_image(4, 50, 40)
    first = session.generate(image, PROMPTS[0], max_tokens=6, stop_token_ids=[])
    again = session.generate(image, PROMPTS[0], max_tokens=6, stop_token_ids=[])
    assert again.tokens == first.tokens and again.timings["n_reused_positions"] == 0
    follow = session.chat(PROMPTS[1], max_tokens=6, stop_token_ids=[])
    assert follow.timings["n_reused_positions"] == 0 and follow.timings["embed_cache_hits"] == 1
    conversation = session._messages[:-1]
    cold = session_from_checkpoint(ckpt)
    deltas = list(cold.stream_conversation(conversation, [image], max_tokens=6, stop_token_ids=[]))
    assert deltas[-1].result.tokens == follow.tokens
    decoder = session.decoder
    assert not decoder.can_truncate(3) and decoder.can_truncate(0) and decoder.can_truncate(decoder.n_past)


def test_decoder_snapshot_and_truncate_continue_as_generate_does(t5):
    """Cutting generated tokens off the T5 decoder's cache, or restoring a snapshot, continues exactly."""
    path, ckpt, processor = t5
    session = session_from_checkpoint(ckpt)
    image = random_image(1, 50, 40)
    expected = _generate_hf(ckpt, processor, image, PROMPTS[1], n=8)
    session.generate(image, PROMPTS[1], max_tokens=4, stop_token_ids=[])
    decoder = session.decoder
    state = decoder.snapshot()
    prompt_len = decoder._prompt
    assert state.n_past == prompt_len + 3  # three generated tokens fed; the fourth was sampled, not fed
    decoder.truncate(prompt_len + 1)  # keep the first generated token
    assert int(np.argmax(decoder.step(expected[1], prompt_len + 1))) == expected[2]
    decoder.restore(state)
    fed = state.n_past
    for i in range(3, 7):
        logits = decoder.step(expected[i], fed)
        fed += 1
        assert int(np.argmax(logits)) == expected[i + 1]


def test_onnx_encoder_equals_hf_image_features_and_runs_with_the_torch_t5(t5, bundle):
    path, ckpt, processor = t5
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="torch", threads=1)
    assert isinstance(session.decoder, TorchSeq2SeqDecoder)
    for seed in SEEDS:
        image = random_image(seed, 50, 40)
        hf = processor(images=[image], text=[PROMPTS[1]], return_tensors="pt")
        with torch.inference_mode():
            expected = ckpt.hf_model.get_image_features(hf["pixel_values"]).pooler_output[0].numpy()
        ours = session.encoder.encode(preprocess(image, ckpt.preprocess).pixel_values)[0]
        rel = float(np.abs(ours - expected).max() / np.abs(expected).max())
        assert rel <= 1e-4, (seed, rel)
        tokens = session.generate(image, PROMPTS[1], max_tokens=10, stop_token_ids=[]).tokens
        assert tokens == _generate_hf(ckpt, processor, image, PROMPTS[1], n=10), seed


@pytest.mark.parametrize("decoder", ["gguf:f32", "mlx:fp32"])
def test_gguf_and_mlx_t5_decoders_are_refused_in_one_line(t5, decoder, tmp_path, capsys):
    out = tmp_path / "refused"
    assert_refused_in_one_line(["export", str(t5[0]), "-o", str(out), "--encoder", "onnx:fp32", "--decoder", decoder],
                               "T5 decoders cannot be written as GGUF or MLX", out, capsys)
