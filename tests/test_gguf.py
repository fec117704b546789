"""GGUF decoder + llama.cpp adapter against the PyTorch reference."""
from __future__ import annotations

import numpy as np
import pytest

import edgevlm
from edgevlm.errors import BadInputError, BundleError
from edgevlm.manifest import Manifest
from edgevlm.runtimes.llamacpp import open_decoder
from edgevlm.verify import DECODER_NMSE, nmse

CASES = [
    ("llava-clip", "Look: <image> what colour is the circle?", ["small"]),
    ("llava-clip", "Compare <image> and then <image> please.", ["small", "wide"]),
    ("idefics3", "Here <image> is a picture. Describe it.", ["wide"]),
    ("idefics3", "First <image> second <image> which is bigger?", ["small", "tall"]),
    ("llava-siglip", "<image> Describe the image.", ["square"]),
]


@pytest.mark.parametrize("family,prompt,image_names", CASES)
def test_f32_gguf_parity_with_pytorch(family, prompt, image_names, ckpts, bundles, images):
    pics = [images[n] for n in image_names]
    ref = edgevlm.load(ckpts[family]).generate(pics, prompt, max_tokens=32, stop_token_ids=[], return_logits=True)
    session = edgevlm.load(bundles[family], encoder="torch", decoder="gguf:f32", parity=True, threads=1)
    ours = session.generate(pics, prompt, max_tokens=32, stop_token_ids=[], return_logits=True)
    assert ours.tokens == ref.tokens
    assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE
    assert ours.timings["n_image_tokens"] > 0


def test_q8_0_gguf_passes_its_gate_teacher_forced_on_a_tiny_model(ckpts, bundles, images):
    """Q8_0 against PyTorch on the reference's own 16 greedy tokens: the ladder's q8_0 gate (nmse, top-1 agreement)."""
    from edgevlm.metrics import DECODER_GATES, top1_agreement

    prompt = "Look: <image> what colour is the circle?"
    ref = edgevlm.load(ckpts["llava-clip"]).generate(images["small"], prompt, max_tokens=16, stop_token_ids=[],
                                                     return_logits=True)
    q8 = edgevlm.load(bundles["llava-clip"], encoder="torch", decoder="gguf:q8_0", threads=1)
    ours = np.stack(q8.teacher_forced_logits(images["small"], prompt, ref.tokens))
    values = {"nmse": nmse(ours, np.stack(ref.logits)), "greedy_agreement": top1_agreement(ours, np.stack(ref.logits))}
    assert DECODER_GATES["gguf:q8_0"].passes(values), values


STRINGS = [
    "Hello world", "  leading and   multiple   spaces ", "tabs\tand\nnewlines\n\n", "Ünïcödé ñ 日本語 😀",
    "digits 0123456789 3.14159 -42", "<|im_start|>user\nWhat?<|im_end|>", "<image><image> mixed <|endoftext|>",
    "The quick brown fox jumps over the lazy dog!?", "", "a",
]


@pytest.mark.parametrize("family", ["llava-clip", "idefics3"])
def test_gguf_tokenizer_matches_hf(family, bundles):
    from transformers import AutoTokenizer

    bundle = bundles[family]
    hf = AutoTokenizer.from_pretrained(bundle / "tokenizer")
    decoder = open_decoder(bundle / "decoder" / "f32.gguf", threads=1)
    for text in STRINGS:
        assert decoder.tokenize(text) == hf(text)["input_ids"], repr(text)


@pytest.fixture(scope="module")
def sentencepiece_bundles(tmp_path_factory):
    """A LLaVA checkpoint with a Llama-2-style SentencePiece tokenizer, exported twice: with tokenizer.model beside
    it (piece scores from SentencePiece) and without (scores from tokenizer.json's merge ranks)."""
    import shutil

    from builders import build_llava
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("spm")
    ckpt = build_llava(root / "ckpt", "clip", seed=4, vocab="sentencepiece")
    bare = shutil.copytree(ckpt, root / "ckpt-no-model")
    (bare / "tokenizer.model").unlink()
    decoders = [ArtifactRequest("gguf", "f32"), ArtifactRequest("gguf", "q8_0")]
    return ckpt, {name: export_checkpoint(source, root / name, [], decoders)
                  for name, source in (("with-model", ckpt), ("merges-only", bare))}


@pytest.mark.parametrize("variant", ["with-model", "merges-only"])
def test_sentencepiece_vocab_tokenizes_like_hf_and_sentencepiece(variant, sentencepiece_bundles):
    import gguf
    import sentencepiece
    from transformers import AutoTokenizer

    ckpt, bundles = sentencepiece_bundles
    bundle = bundles[variant]
    reader = gguf.GGUFReader(str(bundle / "decoder" / "f32.gguf"))
    model_field = reader.fields["tokenizer.ggml.model"]
    assert bytes(model_field.parts[model_field.data[0]]).decode() == "llama"
    hf = AutoTokenizer.from_pretrained(bundle / "tokenizer")
    spm = sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    decoder = open_decoder(bundle / "decoder" / "f32.gguf", threads=1)
    strings = STRINGS + ["USER: <image>\nWhat is this? ASSISTANT:", "<image><image> mixed </s>"]
    for text in strings:
        assert decoder.tokenize(text) == hf(text)["input_ids"], repr(text)
        if "<" not in text:  # the HF tokenizer itself agrees with SentencePiece
            assert hf(text, add_special_tokens=False)["input_ids"] == spm.encode(text), repr(text)
    assert decoder.tokenize("a")[0] == hf.bos_token_id == 1  # add_bos, like Llama-2


def test_sentencepiece_gguf_parity_with_pytorch(sentencepiece_bundles, images):
    ckpt, bundles = sentencepiece_bundles
    prompt = "USER: <image>\nWhat colour is the circle? ASSISTANT:"
    ref = edgevlm.load(ckpt).generate(images["small"], prompt, max_tokens=32, stop_token_ids=[], return_logits=True)
    session = edgevlm.load(bundles["with-model"], encoder="torch", decoder="gguf:f32", parity=True, threads=1)
    ours = session.generate(images["small"], prompt, max_tokens=32, stop_token_ids=[], return_logits=True)
    assert ours.tokens == ref.tokens
    assert nmse(np.stack(ours.logits), np.stack(ref.logits)) <= DECODER_NMSE


@pytest.mark.parametrize("precision", ["f32", "q8_0"])
def test_stock_llama_cpp_gives_our_logits_on_a_text_prompt(precision, bundles):
    """llama-cpp-python's own `Llama` (every position's logits) and the llama.cpp decoder on the same GGUF and prompt."""
    from llama_cpp import Llama

    from edgevlm.runtimes.base import Segment

    path = bundles["idefics3"] / "decoder" / f"{precision}.gguf"
    llm = Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, flash_attn=False, type_k=0, type_v=0,
                verbose=False)
    assert llm.n_vocab() == Manifest.load(bundles["idefics3"]).decoder.vocab_size
    ids = llm.tokenize(b"The circle is red and the square is", add_bos=True, special=True)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])  # (positions, vocab)
    ours = open_decoder(path, threads=1, parity=True)
    assert ours.tokenize("The circle is red and the square is") == ids
    mine = [ours.prefill([Segment.tokens(ids[n : n + 1], n)]).copy() for n in range(len(ids))]
    assert np.abs(np.stack(mine) - theirs).max() <= 1e-4 * np.abs(theirs).max()
    assert list(np.argmax(theirs, axis=-1)) == list(np.argmax(np.stack(mine), axis=-1))


def test_corrupt_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(BundleError, match="broken.gguf.*corrupt"):
        open_decoder(bad, threads=1)


def test_prompt_longer_than_context_fails_before_any_work(bundles, images):
    session = edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:q8_0", n_ctx=48, threads=1)
    with pytest.raises(BadInputError, match="decoder context is 48"):
        session.generate(images["small"], "Describe the image in great detail please " * 3)
    assert len(session.embed_cache) == 0 and session.decoder.n_past == 0


def test_k_quant_fallback_is_reported(ckpts, tmp_path):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    out = export_checkpoint(ckpts["llava-clip"], tmp_path / "b", [], [ArtifactRequest("gguf", "q4_k_m")])
    artifact = Manifest.load(out).find("decoder", "gguf:q4_k_m")
    assert "not multiples of 256" in artifact.details["k_quant_fallback"]
    assert sum(artifact.details["tensor_types"].values()) == 2 * 9 + 3


def test_llama_cpp_loads_with_the_system_libstdcxx_global():
    """Seen on an H200 (CUDA 13 build of llama-cpp-python 0.3.36): libggml-cuda.so exports copies of libstdc++'s
    stream templates, and once numpy or tokenizers had loaded libstdc++ privately, every llama.cpp model load died
    with SIGSEGV in llama_model::print_info (edgevlm.load always imports them first). require_llama_cpp makes the
    system libstdc++ global first, which fixed it there (as LD_PRELOAD=libstdc++.so.6 does). This CPU build does not
    crash without it, so the test checks the mechanism: the symbol llama.cpp called is globally visible."""
    import subprocess
    import sys

    probe = ("import ctypes, numpy, tokenizers\n{setup}\n"
             "try:\n    ctypes.CDLL(None)._ZNSo9_M_insertIlEERSoT_\n    print('global')\n"
             "except AttributeError:\n    print('private')\n")
    plain = subprocess.run([sys.executable, "-c", probe.format(setup="import llama_cpp")], capture_output=True, text=True)
    ours = subprocess.run([sys.executable, "-c", probe.format(
        setup="from edgevlm.backends import require_llama_cpp\nrequire_llama_cpp()")], capture_output=True, text=True)
    assert plain.stdout.strip() == "private", plain.stderr  # what crashed on the GPU machine
    assert ours.stdout.strip() == "global", ours.stderr
