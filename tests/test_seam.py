"""Seam v2: explicit positions, streaming that loses nothing, back-to-back images, and a session that can never reuse
the wrong KV (each test here failed on the code before it)."""
from __future__ import annotations

import io
import json
import shutil
import threading
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import edgevlm
from edgevlm.cli import main
from edgevlm.errors import BadInputError, BundleError
from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
from edgevlm.families import load_checkpoint
from edgevlm.manifest import Manifest
from edgevlm.runtimes.base import Segment
from edgevlm.runtimes.detokenize import IncrementalDetokenizer
from edgevlm.runtimes.reuse import prefix_key
from conftest import random_image

QUESTION = "What colour is the circle?"


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """A LLaVA with a Llama-2-style SentencePiece vocabulary (Metaspace decoding strips the leading "▁")."""
    from builders import build_llava

    root = tmp_path_factory.mktemp("spm-seam")
    ckpt = build_llava(root / "ckpt", "clip", seed=5, vocab="sentencepiece")
    bundle = export_checkpoint(ckpt, root / "bundle", [ArtifactRequest("onnx", "fp32")], [ArtifactRequest("gguf", "f32")])
    return ckpt, bundle


# ---- 1. streaming ------------------------------------------------------------------------------------------------

def test_incremental_detokenizer_on_sentencepiece_with_byte_fallback(spm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spm[0])
    text = "The quick brown fox Ünïcödé 日本語 😀 jumps  twice"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.finish()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == detok.text
    assert "".join(pieces).count(" ") >= 6  # the words are not glued together
    assert all("\ufffd" not in p for p in pieces)  # no half character ever goes out


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_streamed_text_equals_the_final_text_in_run_and_chat(which, spm, ckpts, images, capsys):
    path = spm[0] if which == "spm" else ckpts["llava-clip"]
    session = edgevlm.load(path)
    pieces: list[str] = []
    result = session.generate(images["small"], QUESTION, on_text=pieces.append, max_tokens=24, stop_token_ids=[])
    assert "".join(pieces) == result.text and " " in result.text.strip()
    turn: list[str] = []
    second = session.chat("And the square?", on_text=turn.append, max_tokens=24, stop_token_ids=[])
    assert "".join(turn) == second.text
    # `edgevlm run` prints the streamed pieces; --json prints the final text
    image = spm[0].parent / "img.png"
    images["small"].save(image)
    argv = ["run", str(path), "--image", str(image), "--prompt", QUESTION, "--max-tokens", "24"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    assert main(argv + ["--json"]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]
    assert streamed.startswith(final) and streamed[len(final):].strip() == ""


def test_streamed_text_equals_the_final_text_in_serve(spm, images):
    from edgevlm.serve import make_server

    session = edgevlm.load(spm[1], encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    server = make_server(session, "spm", port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        buffer = io.BytesIO()
        images["small"].save(buffer, "PNG")
        import base64

        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": QUESTION}]}], "max_tokens": 24}

        def post(payload):
            request = urllib.request.Request(f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions",
                                             data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.read().decode()

        whole = json.loads(post(body))["choices"][0]["message"]["content"]
        events = [line[6:] for line in post({**body, "stream": True}).splitlines() if line.startswith("data: ")]
        streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert streamed == whole and " " in whole.strip()
    finally:
        server.shutdown()
        server.server_close()


# ---- 2. images side by side ----------------------------------------------------------------------------------------

def test_two_images_back_to_back_match_hf(ckpts, images):
    ckpt = load_checkpoint(ckpts["llava-clip"])
    processor = AutoProcessor.from_pretrained(ckpts["llava-clip"])
    session = edgevlm.load(ckpts["llava-clip"])
    pair = [images["small"], images["wide"]]
    text = session.render([session.user_message("Compare them.", 2)])  # the template puts them side by side
    hf = processor(images=pair, text=[text], return_tensors="pt")
    prompt = session.tokenize(text, [session._prepare_image(i) for i in pair])
    assert prompt.ids.tolist() == hf["input_ids"][0].tolist()
    assert len(prompt.boundaries) == 2 and prompt.runs[1][0] == prompt.runs[0][1]  # adjacent runs, split per image
    ckpt.hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**hf, max_new_tokens=12, do_sample=False)
    result = session.generate(pair, "Compare them.", max_tokens=12, stop_token_ids=[])
    assert result.tokens == out[0, hf["input_ids"].shape[1]:].tolist()


@pytest.mark.slow
def test_two_images_back_to_back_on_the_reference_model(tmp_path, capsys):
    from edgevlm.reference import scenes
    from edgevlm.reference.train import DEFAULT_RECIPE, ensure_reference

    reference = ensure_reference(DEFAULT_RECIPE)
    ckpt = load_checkpoint(reference)
    processor = AutoProcessor.from_pretrained(reference)
    session = edgevlm.load(reference)
    pair = [scenes.render(scenes.make_scene(9_000_000_000 + i)) for i in range(2)]
    text = session.render([session.user_message("Describe the image.", 2)])
    hf = processor(images=pair, text=[text], return_tensors="pt")
    assert session.tokenize(text, [session._prepare_image(i) for i in pair]).ids.tolist() == hf["input_ids"][0].tolist()
    ckpt.hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**hf, max_new_tokens=12, do_sample=False)
    assert session.generate(pair, "Describe the image.", max_tokens=12, stop_token_ids=[]).tokens == \
        out[0, hf["input_ids"].shape[1]:].tolist()
    for i, image in enumerate(pair):
        image.save(tmp_path / f"{i}.png")
    assert main(["run", str(reference), "--image", str(tmp_path / "0.png"), "--image", str(tmp_path / "1.png"),
                 "--prompt", "Describe the image.", "--json"]) == 0


def test_prefix_keys_tell_image_occurrences_apart():
    t, img = [5, 6], [("K", r) for r in range(3)]
    once, twice = t + img + [7], t + img + img + [7]
    assert prefix_key("d", once, 5) != prefix_key("d", twice, 8)  # T+[img]  vs  T+[img]+[img]
    assert prefix_key("d", twice, 5) == prefix_key("d", once, 5)  # the same first image: the same prefix
    assert prefix_key("d", once, 5) != prefix_key("e", once, 5)  # another decoder artifact


@pytest.mark.parametrize("backend", ["torch", "llamacpp"])
def test_the_same_image_twice_and_a_longer_prompt_after_a_cached_one_give_cold_tokens(backend, ckpts, bundles, images):
    def open_session():
        if backend == "torch":
            return edgevlm.load(ckpts["llava-clip"])
        return edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", parity=True, threads=1)

    image = images["small"]
    cold_twice = open_session().generate([image, image], "Same?", max_tokens=10, stop_token_ids=[])
    session = open_session()
    session.generate([image], "Same?", max_tokens=10, stop_token_ids=[])  # caches T+[img]
    session.forget_sequence()  # a new request, as the server makes it: only the caches may help
    warm = session.generate([image, image], "Same?", max_tokens=10, stop_token_ids=[])
    assert warm.tokens == cold_twice.tokens
    assert warm.timings["n_image_tokens"] == cold_twice.timings["n_image_tokens"]  # both images placed
    assert warm.timings["prefix_cache_hits"] == 1  # T+[img] restored, the second occurrence prefilled


# ---- 3. failures never poison the next request --------------------------------------------------------------------

class FailingEncoder:
    """Wraps a real encoder and raises on the n-th call."""

    def __init__(self, inner, fail_on: int):
        self.inner, self.fail_on, self.calls = inner, fail_on, 0
        self.name, self.artifact_id = inner.name, inner.artifact_id

    def encode(self, pixel_values):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("injected encoder failure")
        return self.inner.encode(pixel_values)


@pytest.mark.parametrize("backend", ["torch", "llamacpp", "llamacpp-default"])
def test_an_exception_mid_prefill_leaves_the_next_request_cold_exact(backend, ckpts, bundles, images):
    def open_session():
        if backend == "torch":
            return edgevlm.load(ckpts["llava-clip"])
        return edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32" if backend == "llamacpp"
                            else "gguf:q8_0", parity=backend == "llamacpp", threads=1)

    a, b = images["small"], images["wide"]
    cold = open_session().generate([a, b], "Compare <image> then <image> now.", max_tokens=8, stop_token_ids=[])
    session = open_session()
    session.generate([a], "Look <image> here.", max_tokens=4, stop_token_ids=[])  # a live sequence to poison
    session.encoder = FailingEncoder(session.encoder, fail_on=1)  # a is cached; b's encode is the first call
    with pytest.raises(RuntimeError, match="injected"):
        session.generate([a, b], "Compare <image> then <image> now.", max_tokens=8, stop_token_ids=[])
    assert session.decoder.n_past == 0 and session._kv_keys == []
    again = session.generate([a, b], "Compare <image> then <image> now.", max_tokens=8, stop_token_ids=[])
    assert again.tokens == cold.tokens


def test_a_refused_restore_leaves_the_decoder_empty_and_consistent(bundles, images):
    from edgevlm.runtimes.base import DecoderState

    session = edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", parity=True, threads=1)
    cold = session.generate(images["small"], QUESTION, max_tokens=8, stop_token_ids=[])
    key = next(iter(session.prefix_cache._items))
    good = session.prefix_cache.peek(key)
    bad = DecoderState(b"\x00" * 64, good.n_past, 64, good.next_position)
    with pytest.raises(RuntimeError, match="refused"):
        session.decoder.restore(bad)
    assert session.decoder.n_past == 0 and session.decoder.next_position == 0
    session.prefix_cache.put(key, bad)  # the session meets the bad state itself: a miss, then a cold run
    session.forget_sequence()
    again = session.generate(images["small"], QUESTION, max_tokens=8, stop_token_ids=[])
    assert again.tokens == cold.tokens and again.timings["prefix_cache_hits"] == 0
    assert session.prefix_cache.peek(key) is not bad  # replaced by the fresh snapshot


def test_a_state_stored_for_another_boundary_is_never_restored(bundles, images):
    session = edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", parity=True, threads=1)
    cold = session.generate(images["small"], QUESTION, max_tokens=8, stop_token_ids=[])
    key = next(iter(session.prefix_cache._items))
    state = session.prefix_cache.peek(key)
    state.n_past += 1  # as if a key bug mapped this prefix to a longer state
    session.forget_sequence()
    again = session.generate(images["small"], QUESTION, max_tokens=8, stop_token_ids=[])
    assert again.tokens == cold.tokens and again.timings["prefix_cache_hits"] == 0


# ---- 4. positions, batches, snapshots ------------------------------------------------------------------------------

def test_a_long_image_is_split_across_decode_calls(bundles):
    from edgevlm.runtimes.llamacpp import open_decoder

    gguf = bundles["llava-clip"] / "decoder" / "f32.gguf"
    rows = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    segments = [Segment.tokens([1, 5, 9], 0), Segment(np.arange(3, 43), embeds=rows), Segment.tokens([11, 12], 43)]
    one_batch = open_decoder(gguf, threads=1, parity=True)  # kept alive: prefill returns a view of its buffer
    whole = one_batch.prefill(segments).copy()
    split = open_decoder(gguf, threads=1, parity=True, n_batch=16)  # 40 rows -> 16 + 16 + 8
    assert np.allclose(split.prefill(segments), whole, atol=1e-4)
    assert split.n_past == 45 and split.next_position == 45


def test_positions_come_from_the_segment(ckpts, bundles):
    """Each backend places a segment at the positions it carries (RoPE is relative: a shift leaves the logits alone,
    a gap changes them; llama.cpp itself requires consecutive 1-D positions within a sequence)."""
    from edgevlm.runtimes.llamacpp import open_decoder

    ids = np.array([1, 5, 9], np.int32)
    decoder = open_decoder(bundles["llava-clip"] / "decoder" / "f32.gguf", threads=1, parity=True)
    plain = decoder.prefill([Segment.tokens(ids, 0)]).copy()
    decoder.truncate(0)
    shifted = decoder.prefill([Segment(np.array([10, 11, 12]), token_ids=ids)]).copy()
    assert decoder.next_position == 13 and np.allclose(shifted, plain, atol=1e-4)
    reference = edgevlm.load(ckpts["llava-clip"]).decoder
    assert np.allclose(reference.prefill([Segment(np.array([10, 11, 12]), token_ids=ids)]), plain, atol=1e-4)
    reference.truncate(0)
    gap = reference.prefill([Segment(np.array([0, 1, 7]), token_ids=ids)])
    assert reference.next_position == 8 and not np.allclose(gap, plain, atol=1e-3)
    with pytest.raises(ValueError, match="positions of shape"):
        Segment(np.arange(2), token_ids=ids)


def test_snapshots_are_fast_and_reported(bundles, images):
    session = edgevlm.load(bundles["idefics3"], encoder="onnx:fp32", decoder="gguf:q8_0", threads=1)
    result = session.generate(images["wide"], QUESTION, max_tokens=2)
    assert result.timings["snapshot_ms"] > 0 and result.timings["prefix_cache_misses"] == 1
    state = session.decoder.snapshot()
    assert isinstance(state.payload, bytes) and len(state.payload) == state.nbytes


@pytest.mark.parametrize("field_name,value", [("position_scheme", "something-else"), ("architecture", "gpt-j"),
                                              ("image_attention", "cross-attention")])
def test_a_bundle_with_an_unknown_contract_value_is_refused(field_name, value, bundles, tmp_path, images, capsys):
    bundle = shutil.copytree(bundles["llava-clip"], tmp_path / "b")
    data = json.loads((bundle / "manifest.json").read_text())
    data["decoder"][field_name] = value
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=f"decoder.{field_name} is '{value}'"):
        Manifest.load(bundle)
    images["small"].save(tmp_path / "i.png")
    assert main(["run", str(bundle), "--image", str(tmp_path / "i.png"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert field_name in err and len(err.strip().splitlines()) == 1


# ---- 5. the conversation, flags, images ----------------------------------------------------------------------------

def test_chat_after_generate_continues_about_the_image(ckpts, images):
    session = edgevlm.load(ckpts["llava-clip"])
    first = session.generate(images["small"], QUESTION, max_tokens=6, stop_token_ids=[])
    second = session.chat("And what is it doing?", max_tokens=6, stop_token_ids=[])
    assert second.timings["n_image_tokens"] == first.timings["n_image_tokens"] > 0
    assert second.timings["n_reused_positions"] >= first.timings["n_prompt_tokens"]  # only the new turn prefilled
    fresh = edgevlm.load(ckpts["llava-clip"])
    messages = [fresh.user_message(QUESTION, 1), {"role": "assistant", "content": [{"type": "text", "text": first.text}]},
                fresh.user_message("And what is it doing?", 0)]
    replay = [d.result for d in fresh.stream_conversation(messages, [images["small"]], max_tokens=6, stop_token_ids=[])]
    assert replay[-1].tokens == second.tokens


def test_n_ctx_and_cache_flags(bundles, tmp_path, images, capsys):
    images["small"].save(tmp_path / "i.png")
    argv = ["run", str(bundles["llava-clip"]), "--image", str(tmp_path / "i.png"), "--prompt", QUESTION,
            "--threads", "1", "--decoder", "gguf:q8_0"]
    assert main(argv + ["--n-ctx", "20"]) == 2
    err = capsys.readouterr().err
    assert "decoder context is 20" in err and "raise --n-ctx" in err
    session = edgevlm.load(bundles["llava-clip"], decoder="gguf:q8_0", n_ctx=300, threads=1,
                           embed_cache_bytes=1 << 20, prefix_cache_bytes=2 << 20)
    assert session.decoder.n_ctx == 300
    assert session.embed_cache.max_bytes == 1 << 20 and session.prefix_cache.max_bytes == 2 << 20
    assert main(argv + ["--n-ctx", "6000"]) == 2  # the tiny model's context is 512
    assert "beyond the model's context of 512" in capsys.readouterr().err
    from edgevlm.runtimes.llamacpp import open_decoder

    big = open_decoder(bundles["llava-clip"] / "decoder" / "q8_0.gguf", n_ctx=6000, context_length=8192, threads=1)
    assert big.n_ctx == 6000  # not capped at 4096 when a model's context allows more
    assert main(argv + ["--embed-cache-mb", "-1"]) == 2


def test_threads_are_honoured_by_the_torch_reference(ckpts):
    previous = torch.get_num_threads()
    try:
        edgevlm.load(ckpts["llava-clip"], threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


def test_exif_orientation_is_applied(tmp_path):
    from edgevlm.images import load_image

    image = random_image(11, 40, 20)  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "phone.jpg").size == (20, 40)


def test_mlx_truncate_that_cannot_trim_clears_instead_of_lying(mlx_bundles, monkeypatch):
    import mlx_lm.models.cache as cache_module

    from edgevlm.runtimes.mlx_decoder import MlxDecoder

    decoder = MlxDecoder(mlx_bundles["llava-clip"] / "decoder" / "mlx-fp32", n_ctx=64)
    decoder.prefill([Segment.tokens([1, 5, 9, 11], 0)])
    monkeypatch.setattr(cache_module, "trim_prompt_cache", lambda cache, n: 0)  # a rotating cache trims nothing
    with pytest.raises(RuntimeError, match="could trim 0 of 2"):
        decoder.truncate(2)
    assert decoder.n_past == 0
