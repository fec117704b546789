"""Cache invariants, for every decoder backend: chunked prefill == one prefill; a prefix-cache hit, an
embedding-cache hit and a multi-turn continuation give exactly the greedy tokens of a cold run."""
from __future__ import annotations

import numpy as np
import pytest

import edgevlm
from edgevlm.runtimes.base import Segment
from conftest import random_image

# "llamacpp-default": a Q8_0 GGUF as users run it (f16 KV cache, llama.cpp's default attention), not parity mode
BACKENDS = ["torch", "llamacpp", "llamacpp-default", "mlx"]
QUESTION = "What colour is the circle?"


@pytest.fixture()
def bundles(request, bundles, mlx_bundles_lazy):
    return {"gguf": bundles, "mlx": mlx_bundles_lazy}


@pytest.fixture()
def mlx_bundles_lazy(request):
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    return request.getfixturevalue("mlx_bundles") if backend == "mlx" else None


def open_session(backend, ckpts, bundles, family="llava-clip", **options):
    if backend == "torch":
        return edgevlm.load(ckpts[family], **options)
    if backend == "mlx":
        return edgevlm.load(bundles["mlx"][family], encoder="onnx:fp32", decoder="mlx:fp32", **options)
    bundles = bundles["gguf"]
    if backend == "llamacpp-default":
        return edgevlm.load(bundles[family], encoder="onnx:fp32", decoder="gguf:q8_0", threads=1, **options)
    return edgevlm.load(bundles[family], encoder="onnx:fp32", decoder="gguf:f32", parity=True, threads=1, **options)


def cold(backend, ckpts, bundles, image, prompt, family="llava-clip"):
    return open_session(backend, ckpts, bundles, family).generate(image, prompt, max_tokens=12, stop_token_ids=[])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_equals_one_prefill(backend, ckpts, bundles):
    session = open_session(backend, ckpts, bundles)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 300, 40).astype(np.int32)
    embeds = rng.normal(size=(16, 64)).astype(np.float32)
    pos = np.arange(56, dtype=np.int32)
    one = [Segment(pos[:10], token_ids=ids[:10]), Segment(pos[10:26], embeds=embeds), Segment(pos[26:], token_ids=ids[10:])]
    full = session.decoder.prefill(one).copy()  # backends may return a view of their buffer
    session.decoder.truncate(0)
    chunks = [Segment(pos[:3], token_ids=ids[:3]), Segment(pos[3:10], token_ids=ids[3:10]),
              Segment(pos[10:15], embeds=embeds[:5]), Segment(pos[15:26], embeds=embeds[5:]),
              Segment(pos[26:41], token_ids=ids[10:25])]
    session.decoder.prefill(chunks)
    last = None
    for i, token in enumerate(ids[25:]):  # then token by token
        last = session.decoder.prefill([Segment.tokens([token], 41 + i)])
    assert session.decoder.n_past == 56
    assert np.allclose(full, last, atol=1e-4, rtol=1e-4), np.abs(full - last).max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_cache_hit_equals_cold_run(backend, ckpts, bundles, images):
    session = open_session(backend, ckpts, bundles)
    image = images["small"]
    first = session.generate(image, QUESTION, max_tokens=12, stop_token_ids=[])
    assert first.timings["prefix_cache_misses"] == 1
    other_image = session.generate(images["wide"], "Something else entirely?", max_tokens=4, stop_token_ids=[])
    assert other_image.timings["prefix_cache_hits"] == 0
    warm = session.generate(image, "How many shapes are there?", max_tokens=12, stop_token_ids=[])
    assert warm.timings["prefix_cache_hits"] == 1
    assert warm.timings["encode_ms"] == 0.0  # neither the encoder nor the image prefill ran
    assert warm.timings["n_prefilled_positions"] < warm.timings["n_prompt_tokens"] - warm.timings["n_image_tokens"] + 1
    assert warm.tokens == cold(backend, ckpts, bundles, image, "How many shapes are there?").tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_cache_hit_equals_cold_run(backend, ckpts, bundles, images):
    session = open_session(backend, ckpts, bundles, prefix_cache_bytes=0)  # force the embedding path
    image = images["square"]
    session.generate(image, QUESTION, max_tokens=4, stop_token_ids=[])
    session.generate(images["tall"], QUESTION, max_tokens=4, stop_token_ids=[])  # another sequence in between
    prompt = "Where is the <image> square?"  # the image moves: the prefix differs, the embeddings do not
    result = session.generate(image, prompt, max_tokens=12, stop_token_ids=[])
    assert result.timings["embed_cache_hits"] == 1 and result.timings["encode_ms"] == 0.0
    assert result.tokens == cold(backend, ckpts, bundles, image, prompt).tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_turn_prefills_only_new_tokens(backend, ckpts, bundles, images):
    session = open_session(backend, ckpts, bundles, family="idefics3")
    image = images["small"]
    first = session.chat("What is this?", image=image, max_tokens=6, stop_token_ids=[])
    second = session.chat("And the colour?", max_tokens=6, stop_token_ids=[])
    assert second.timings["n_reused_positions"] >= first.timings["n_prompt_tokens"]
    t = second.timings
    assert t["n_prefilled_positions"] == t["n_prompt_tokens"] - t["n_reused_positions"]
    assert t["n_prefilled_positions"] < t["n_prompt_tokens"] - first.timings["n_prompt_tokens"] + len(first.tokens) + 8
    assert second.timings["encode_ms"] == 0.0
    # the same conversation from scratch gives the same answer
    fresh = open_session(backend, ckpts, bundles, family="idefics3")
    messages = [fresh.user_message("What is this?", 1),
                {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                fresh.user_message("And the colour?", 0)]
    replay = [d.result for d in fresh.stream_conversation(messages, [image], max_tokens=6, stop_token_ids=[])][-1]
    assert replay.tokens == second.tokens


def test_single_pixel_change_never_shares_an_entry(ckpts, images):
    session = edgevlm.load(ckpts["llava-clip"])
    image = random_image(7, 40, 40)
    changed = image.copy()
    changed.putpixel((13, 21), tuple((v + 1) % 256 for v in image.getpixel((13, 21))))
    a = session._prepare_image(image)
    b = session._prepare_image(changed)
    assert a.key != b.key
    session.generate(image, QUESTION, max_tokens=2)
    result = session.generate(changed, QUESTION, max_tokens=2)
    assert result.timings["embed_cache_hits"] == 0 and result.timings["prefix_cache_hits"] == 0
    assert len(session.embed_cache) == 2


def test_prefix_cache_eviction_respects_bound(ckpts, images):
    probe = edgevlm.load(ckpts["llava-clip"])
    probe.generate(images["small"], QUESTION, max_tokens=1)
    one_entry = probe.prefix_cache.bytes
    session = edgevlm.load(ckpts["llava-clip"], prefix_cache_bytes=int(one_entry * 2.5))
    for seed in range(4):
        session.generate(random_image(100 + seed, 40, 40), QUESTION, max_tokens=1)
        assert session.prefix_cache.bytes <= session.prefix_cache.max_bytes
    assert len(session.prefix_cache) == 2 and session.prefix_cache.evictions == 2


def test_streaming_pieces_join_to_the_text(ckpts, images):
    session = edgevlm.load(ckpts["idefics3"])
    deltas = list(session.stream_conversation([session.user_message(QUESTION, 1)], [images["small"]], max_tokens=10,
                                              stop_token_ids=[]))
    result = deltas[-1].result
    assert "".join(d.text for d in deltas) == result.text
    assert result.finish_reason == "length"
    assert "".join(session.stream(images["small"], QUESTION, max_tokens=10, stop_token_ids=[])) == result.text
