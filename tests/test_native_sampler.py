"""llama.cpp's sampler chain (what the llama.cpp backend samples with) against edgevlm's numpy Sampler (the
reference, used by the torch and MLX backends): the same greedy picks and the same kept sets for top-k / top-p, on
fixed logits; and the same greedy answers through a session."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

import edgevlm
from edgevlm.runtimes.llamacpp.sequence import sampler_chain
from edgevlm.runtimes.sampling import Sampler, SamplingConfig

N_VOCAB = 500


def _apply(config: SamplingConfig, logits: np.ndarray, history: list[int], final: bool):
    """Run a llama.cpp chain on fixed logits (llama_sampler_apply, no context): the candidates left, and the one
    selected when the chain ends in greedy."""
    import llama_cpp

    chain = sampler_chain(llama_cpp, config, len(logits), 4096, final=final)
    try:
        for token in history:
            llama_cpp.llama_sampler_accept(chain, token)
        data = (llama_cpp.llama_token_data * len(logits))(
            *[llama_cpp.llama_token_data(i, float(v), 0.0) for i, v in enumerate(logits)])
        array = llama_cpp.llama_token_data_array(data, len(logits), -1, False)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
        kept = {int(array.data[i].id) for i in range(array.size)}
        selected = int(array.data[array.selected].id) if array.selected >= 0 else None
        return kept, selected
    finally:
        llama_cpp.llama_sampler_free(chain)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_picks_agree_with_and_without_repetition_penalty(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, N_VOCAB).astype(np.float32)
    history = rng.integers(0, N_VOCAB, 40).tolist() + [int(np.argmax(logits))]  # the favourite was already said
    for penalty in (1.0, 1.3, 2.0):
        config = SamplingConfig(repetition_penalty=penalty)
        _, native = _apply(config, logits, history, final=True)
        assert native == Sampler(config).sample(logits, history), penalty


@pytest.mark.parametrize("seed", range(5))
def test_top_k_and_top_p_keep_the_same_tokens(seed):
    rng = np.random.default_rng(100 + seed)
    logits = rng.normal(0, 2, N_VOCAB).astype(np.float32)
    history = rng.integers(0, N_VOCAB, 30).tolist()
    for temperature, top_k, top_p, penalty in ((0.7, 40, 1.0, 1.0), (1.0, 0, 0.9, 1.0), (0.5, 50, 0.8, 1.2),
                                              (1.3, 10, 0.95, 1.0), (1.0, 0, 0.5, 1.5)):
        config = SamplingConfig(temperature, top_k, top_p, penalty)
        kept, _ = _apply(config, logits, history, final=False)
        reference = set(np.flatnonzero(Sampler(config).distribution(logits, history) > 0).tolist())
        assert kept == reference, (temperature, top_k, top_p, penalty, len(kept), len(reference))


def test_sessions_with_either_sampler_answer_alike(bundles, images):
    """Greedy through a whole session: llama.cpp's chain and the numpy sampler give the same tokens (with and without
    a repetition penalty); a seeded draw repeats itself."""
    session = edgevlm.load(bundles["llava-siglip"], encoder="onnx:fp32", decoder="gguf:q8_0", threads=1)
    assert session.decoder.sampler is not None
    ask = lambda **kw: session.generate(images["small"], "Describe the image.", max_tokens=12,  # noqa: E731
                                        stop_token_ids=[], **kw).tokens
    native = [ask(), ask(repetition_penalty=1.3)]
    seeded = [ask(temperature=0.8, top_k=20, top_p=0.9, seed=7), ask(temperature=0.8, top_k=20, top_p=0.9, seed=7)]
    session.decoder.native_sampling = False  # the numpy reference
    assert [ask(), ask(repetition_penalty=1.3)] == native
    assert seeded[0] == seeded[1]


def test_the_one_token_step_equals_a_one_token_prefill(bundles):
    """The decode loop's fast path (a batch whose fixed fields are set once) gives prefill's logits, bit for bit."""
    from edgevlm.manifest import Manifest
    from edgevlm.runtimes.base import Segment
    from edgevlm.runtimes.llamacpp import open_decoder

    bundle = bundles["llava-siglip"]
    path = bundle / Manifest.load(bundle).find("decoder", "gguf:f32").path
    stepped, prefilled = (open_decoder(path, n_ctx=64, threads=1, parity=True) for _ in range(2))
    prompt = np.asarray([1, 5, 9, 13, 17], dtype=np.int32)
    for decoder in (stepped, prefilled):
        decoder.prefill([Segment.tokens(prompt, 0)])
    for position, token in enumerate([21, 25, 29, 33], start=len(prompt)):
        if position % 2:  # without a logits view (what the native sampler's loop asks for): the same, in place
            assert stepped.step(token, position, logits=False) is None
            a = stepped.logits().copy()
        else:
            a = stepped.step(token, position).copy()
        b = prefilled.prefill([Segment.tokens(np.asarray([token], dtype=np.int32), position)]).copy()
        assert np.array_equal(a, b) and stepped.n_past == prefilled.n_past == position + 1
    assert stepped.next_position == prefilled.next_position == len(prompt) + 4
