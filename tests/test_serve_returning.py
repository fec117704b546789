"""`edgevlm serve --parallel N` with more conversations than slots (issue 32): a conversation whose slot went to
another one is parked in RAM (--conversation-cache-mb) and restored when its user returns, answering exactly what a
cold run answers; hits and misses in /metrics. Servers on 127.0.0.1, bounded counts."""
from __future__ import annotations

import pytest

import edgevlm
from edgevlm.runtimes.base import DecoderState
from edgevlm.runtimes.parked import ParkedSequences
from test_parallel import ask, urls  # noqa: F401 - urls is a fixture
from server_client import QUESTION, metric, start, stop, user


@pytest.fixture(scope="module")
def session(bundles):
    return edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", threads=1, n_seq=2)


def state(n: int, nbytes: int) -> DecoderState:
    return DecoderState(b"", n, nbytes, n)


def test_the_parked_tier_is_bounded_and_gives_back_the_longest_continued_conversation():
    tier = ParkedSequences(250)
    assert tier.park("d", [1, 2, 3], state(3, 100)) and tier.park("d", [1, 2, 9, 9], state(4, 100))
    assert not tier.park("d", list(range(9)), state(9, 251))  # larger than the bound alone: not kept
    assert tier.take([7, 7], beyond=0) is None
    entry, shared = tier.take([1, 2, 9, 9, 5], beyond=2)
    assert entry.keys == (1, 2, 9, 9) and shared == 4 and len(tier) == 1 and tier.bytes == 100
    assert tier.take([1, 2, 3, 4], beyond=3) is None  # the live sequence already holds as much
    assert tier.park("d", [5], state(1, 100)) and tier.park("d", [6], state(1, 100))  # the oldest goes
    assert len(tier) == 2 and tier.take([1, 2, 3], beyond=0) is None and tier.bytes == 200
    with pytest.raises(ValueError):
        tier.park("d", [1, 2], state(3, 10))


def test_an_evicted_conversation_is_restored_when_it_returns_and_answers_as_a_cold_run(session, urls):  # noqa: F811
    first = [user(urls["small"], QUESTION)]
    server, base = start(session, parallel=2)
    try:
        turn1 = ask(base, first)
        ask(base, [user(urls["wide"], QUESTION)])  # the empty slot
        ask(base, [user(urls["tall"], QUESTION)])  # the least recently used: the first conversation's, parked
        returning = first + [{"role": "assistant", "content": turn1["text"]},
                             {"role": "user", "content": "How many shapes are there?"}]
        back = ask(base, returning)
        t = back["timings"]
        assert t["conversation_cache_hits"] == 1 and t["prefix_cache_hits"] == 0 and t["encode_ms"] == 0
        assert t["n_reused_positions"] > turn1["timings"]["n_image_tokens"]  # past the image: the conversation
        assert metric(base, "edgevlm_conversation_cache_hits_total") == 1
        assert metric(base, "edgevlm_conversation_cache_misses_total") >= 3  # the three new conversations
    finally:
        stop(server)
    session.clear_caches()
    cold_server, cold_base = start(session, parallel=2, conversation_cache_bytes=0)
    try:
        for sibling in cold_server.engine.sequences.sessions:
            sibling.forget_sequence()
        cold = ask(cold_base, returning)
        assert cold["timings"]["conversation_cache_hits"] == 0 and cold["timings"]["n_reused_positions"] == 0
        assert back["text"] == cold["text"]
    finally:
        stop(cold_server)


def test_a_parked_conversation_comes_back_from_disk_after_a_restart(session, urls, tmp_path):  # noqa: F811
    """--cache-dir: the evicted conversation's state is written to disk too (atomically, nothing half-written left);
    a new server on the same folder, RAM tier empty, restores it from disk, skips its prefill, counts a disk hit, and
    answers what a cold run answers."""
    from edgevlm.runtimes.parked_disk import decode_keys, encode_keys

    keys = [5, 6, ("img", 0), ("img", 1), ("img", 2), 7, ("img", 0), ("other", 4), ("other", 5)]
    assert encode_keys(keys) == [5, 6, ["img", 0, 3], 7, ["img", 0, 1], ["other", 4, 2]]
    assert decode_keys(encode_keys(keys)) == tuple(keys)
    first = [user(urls["small"], QUESTION)]
    cache = tmp_path / "cache"
    server, base = start(session, parallel=2, cache_dir=str(cache))
    try:
        turn1 = ask(base, first)
        ask(base, [user(urls["wide"], QUESTION)])
        ask(base, [user(urls["tall"], QUESTION)])  # the first conversation is parked: RAM and disk
        server.engine.sequences.sessions[0].parked.disk.flush()
        assert len(server.engine.sequences.sessions[0].parked.disk) >= 1
    finally:
        stop(server)
    assert not list(cache.glob(".*.tmp-*"))  # every write renamed into place
    returning = first + [{"role": "assistant", "content": turn1["text"]},
                         {"role": "user", "content": "How many shapes are there?"}]
    session.clear_caches()  # RAM: no parked state, no prefix, no embeddings
    restarted, base2 = start(session, parallel=2, cache_dir=str(cache))
    try:
        for sibling in restarted.engine.sequences.sessions:
            sibling.forget_sequence()
        back = ask(base2, returning)
        t = back["timings"]
        assert t["conversation_cache_hits"] == 1 and t["conversation_disk_hits"] == 1 and t["encode_ms"] == 0
        assert t["n_reused_positions"] > turn1["timings"]["n_image_tokens"]  # past the image: the conversation
        assert t["n_prefilled_positions"] == t["n_prompt_tokens"] - t["n_reused_positions"]  # the prefill it skipped
        assert metric(base2, "edgevlm_conversation_disk_hits_total") == 1
    finally:
        stop(restarted)
    session.clear_caches()
    session.disk_cache = None
    cold_server, cold_base = start(session, parallel=2, conversation_cache_bytes=0)
    try:
        for sibling in cold_server.engine.sequences.sessions:
            sibling.forget_sequence()
        cold = ask(cold_base, returning)
        assert cold["timings"]["n_reused_positions"] == 0 and cold["timings"]["conversation_disk_hits"] == 0
        assert back["text"] == cold["text"]
    finally:
        stop(cold_server)
