"""`edgevlm serve --parallel N` (issue 17): several sequences in one llama.cpp context, their decode steps batched in
one llama_decode. Greedy answers must not depend on who else is served; a conversation keeps its sequence; a cached
image prefix restores into any sequence; a client that leaves frees its slot. Servers on 127.0.0.1, bounded counts."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import edgevlm
from edgevlm.runtimes.base import Segment
from server_client import QUESTION, metric, post, start, stop, user


@pytest.fixture(scope="module")
def session(bundles):
    return edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", threads=1, n_seq=4)


@pytest.fixture(scope="module")
def urls(images) -> dict[str, str]:
    out = {}
    for name in ("small", "wide", "tall", "square"):
        buffer = io.BytesIO()
        images[name].save(buffer, format="PNG")
        out[name] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return out


def ask(base: str, messages: list[dict], max_tokens: int = 6, stream: bool = False) -> dict:
    """The answer's text and timings, streamed or not."""
    status, raw = post(base, {"messages": messages, "max_tokens": max_tokens, "stream": stream})
    assert status == 200, raw
    if not stream:
        reply = json.loads(raw)
        return {"text": reply["choices"][0]["message"]["content"], "timings": reply["timings"]}
    chunks = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
    return {"text": "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]),
            "timings": chunks[-1]["timings"]}


def health(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/health", timeout=30) as response:
        return json.loads(response.read())


def wait_for(condition, what: str, tries: int = 600) -> None:
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


def test_concurrent_clients_get_the_answers_they_get_alone_and_with_parallel_1(session, urls):
    """16 clients at once (4 images, text only too, streamed and not) on 4 slots: every greedy answer equals the
    same request served alone by the same server, and by a --parallel 1 server; decode steps really were batched."""
    questions = [QUESTION, "How many shapes are there?"]
    cases = [([user(urls[name], q)], stream) for name in urls for q in questions for stream in (False, True)]
    cases += [([{"role": "user", "content": q}], stream) for q in questions for stream in (False, True)]
    cases = cases[:16]
    single, base1 = start(session, capacity=64)
    try:
        serial = [ask(base1, m)["text"] for m, _ in cases]
    finally:
        stop(single)
    server, base = start(session, capacity=64, parallel=4)
    gate = threading.Event()
    gate.set()
    server.engine.tick_hook = gate.wait  # cleared: the first request holds the engine until all are in
    try:
        alone = [ask(base, m)["text"] for m, _ in cases[:1]]
        gate.clear()
        with ThreadPoolExecutor(len(cases)) as pool:
            futures = [pool.submit(ask, base, m, 6, stream) for m, stream in cases]
            wait_for(lambda: metric(base, "edgevlm_queue_depth") + metric(base, "edgevlm_active_sequences")
                     == len(cases), "the requests to arrive")
            gate.set()
            answers = [f.result()["text"] for f in futures]
        alone += [ask(base, m)["text"] for m, _ in cases[1:]]
        assert answers == alone == serial
        assert metric(base, "edgevlm_decode_batch_rows_total") > metric(base, "edgevlm_decode_batches_total") > 0
        assert [s["state"] for s in health(base)["slots"]] == ["idle"] * 4
    finally:
        gate.set()
        stop(server)


def test_a_follow_up_turn_keeps_its_sequence_while_other_conversations_run(session, urls):
    server, base = start(session, parallel=4)
    try:
        first_messages = [user(urls["small"], QUESTION)]
        first = ask(base, first_messages)
        for name in ("wide", "tall"):  # other conversations in between take the other (least recently used) slots
            other = ask(base, [user(urls[name], "How many shapes are there?")])
            assert other["timings"]["slot"] != first["timings"]["slot"]
        follow = first_messages + [{"role": "assistant", "content": first["text"]},
                                   {"role": "user", "content": "And the shape?"}]
        second = ask(base, follow, stream=True)
        t = second["timings"]
        assert t["slot"] == first["timings"]["slot"]
        assert t["n_reused_positions"] >= first["timings"]["n_prompt_tokens"]
        assert t["n_prefilled_positions"] == t["n_prompt_tokens"] - t["n_reused_positions"] < 40
        assert t["encode_ms"] == 0
    finally:
        stop(server)
    session.clear_caches()  # the same conversation on a cold session (no live sequence, no cached prefix)
    cold_server, cold_base = start(session)
    try:
        cold = ask(cold_base, follow)
        assert cold["timings"]["n_reused_positions"] == 0 and cold["text"] == second["text"]
    finally:
        stop(cold_server)


def test_a_cached_image_prefix_restores_into_another_slot(session, urls):
    """One slot stores the image prefix; while it is busy, the same image goes to another slot, which restores the
    prefix (no encode, no image prefill) and answers exactly what a cold session answers."""
    server, base = start(session, parallel=4)
    gate = threading.Event()
    gate.set()
    server.engine.tick_hook = gate.wait
    try:
        session.prefix_cache.clear()
        session.embed_cache.clear()
        question = [user(urls["square"], "How many shapes are there?")]
        cold = ask(base, question)
        assert cold["timings"]["encode_ms"] > 0 and cold["timings"]["prefix_cache_hits"] == 0
        holder = cold["timings"]["slot"]
        gate.clear()  # a longer answer to the same question continues that slot and holds the engine after a tick
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(ask, base, question, 40)
            wait_for(lambda: health(base)["slots"][holder]["state"] != "idle", "the long answer to start")
            again = pool.submit(ask, base, question)
            wait_for(lambda: metric(base, "edgevlm_queue_depth") == 1, "the question to queue")
            gate.set()
            restored, long = again.result(), long.result()
        assert long["timings"]["slot"] == holder and restored["timings"]["slot"] != holder
        t = restored["timings"]
        assert t["prefix_cache_hits"] == 1 and t["encode_ms"] == 0 and t["n_reused_positions"] > 0
        assert restored["text"] == cold["text"]
    finally:
        gate.set()
        stop(server)


def test_a_disconnect_mid_stream_frees_its_slot_while_others_continue(session, urls):
    import socket

    server, base = start(session, parallel=4)
    server.engine.tick_hook = lambda: time.sleep(0.005)  # a 200-token answer then spans hundreds of ticks
    messages = [user(urls["wide"], QUESTION)]
    try:
        n_prompt = ask(base, messages, 1)["timings"]["n_prompt_tokens"]
        other_alone = ask(base, [user(urls["tall"], QUESTION)], 200)
        body = json.dumps({"messages": messages, "max_tokens": 200, "stream": True}).encode()
        with ThreadPoolExecutor(1) as pool:
            leaver = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30)
            leaver.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert leaver.recv(4096).startswith(b"HTTP/1.1 200")
            other = pool.submit(ask, base, [user(urls["tall"], QUESTION)], 200, True)
            wait_for(lambda: sum(s["state"] != "idle" for s in health(base)["slots"]) == 2, "both answers to run")
            busy = [s["id"] for s in health(base)["slots"] if s["state"] != "idle"]
            leaver.close()
            freed = lambda: [s for s in health(base)["slots"] if s["id"] in busy and s["state"] == "idle"]  # noqa: E731
            wait_for(lambda: metric(base, "edgevlm_cancelled_total") >= 1 and freed(), "the slot to be freed")
            left = freed()
            assert other.result()["text"] == other_alone["text"]  # the other answer went on to its end
        assert len(left) == 1 and left[0]["n_past"] < n_prompt + 199  # stopped well before its 200 tokens
        assert metric(base, "edgevlm_active_sequences") == 0
    finally:
        stop(server)


def test_parallel_is_refused_without_a_llama_cpp_decoder(session):
    from edgevlm.errors import BadInputError
    from edgevlm.serve import ServerOptions, make_server

    class NotLlama:
        def __init__(self, session):
            self.decoder, self.disk_cache = object(), None

    with pytest.raises(BadInputError, match="--parallel 2 needs a llama.cpp"):
        make_server(NotLlama(session), "x", port=0, options=ServerOptions(parallel=2))
    with pytest.raises(BadInputError, match="--parallel must be"):
        ServerOptions(parallel=0)


# ---- the decoder: sequences of one context ---------------------------------------------------------------------
def batched_equals_alone(decoder, prompts: list[list[Segment]], steps: list[list[tuple[int, int]]]) -> float:
    """Max |logit difference| between sequences prefilled and stepped together (one llama_decode per step) and each
    alone in a one-sequence context."""
    from edgevlm.runtimes.llamacpp import LlamaContext

    alone = []
    for segments, tokens in zip(prompts, steps):
        decoder.truncate(0)
        decoder.prefill(segments)
        alone.append([decoder.step(t, p).copy() for t, p in tokens])
    pool = LlamaContext(decoder.context.model, decoder.context.settings, len(prompts) + 1)  # on the same weights
    seqs = [pool.sequence(i + 1) for i in range(len(prompts))]  # not 0: any sequence id works
    for seq, segments in zip(seqs, prompts):
        seq.prefill(segments)
    worst = 0.0
    for k in range(len(steps[0])):
        pool.step_many(seqs, [s[k][0] for s in steps], [s[k][1] for s in steps])
        for row, seq in enumerate(seqs):
            assert seq.logits_row == row
            worst = max(worst, float(np.abs(seq.logits() - alone[row][k]).max()))
    pool.close()
    return worst


def test_two_sequences_stepped_in_one_batch_get_their_own_logits(bundles):
    from edgevlm.manifest import Manifest
    from edgevlm.runtimes.llamacpp import open_decoder

    bundle = bundles["llava-clip"]
    gguf = bundle / Manifest.load(bundle).find("decoder", "gguf:f32").path
    decoder = open_decoder(gguf, n_ctx=256, threads=1, parity=True)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((20, decoder.n_embd)).astype(np.float32) * 0.1
    prompts = [[Segment.tokens([1, 5, 9, 14], 0), Segment(np.arange(4, 24), embeds=rows), Segment.tokens([3, 4], 24)],
               [Segment.tokens([7, 8, 2, 30, 31, 32, 33, 40, 41], 0)]]
    steps = [[(11, 26), (12, 27), (13, 28)], [(21, 9), (22, 10), (23, 11)]]
    assert batched_equals_alone(decoder, prompts, steps) < 1e-4


def test_a_state_saved_from_one_sequence_restores_into_another(bundles):
    from edgevlm.manifest import Manifest
    from edgevlm.runtimes.llamacpp import LlamaContext, open_decoder

    bundle = bundles["llava-clip"]
    gguf = bundle / Manifest.load(bundle).find("decoder", "gguf:f32").path
    decoder = open_decoder(gguf, n_ctx=256, threads=1, parity=True)
    pool = LlamaContext(decoder.context.model, decoder.context.settings, 3)
    a, b, c = pool.sequence(0), pool.sequence(1), pool.sequence(2)
    b.prefill([Segment.tokens([4, 8, 15, 16, 23], 0)])
    state = b.snapshot()
    c.restore(state)  # another sequence of the same context
    decoder.restore(state)  # and the one-sequence context beside it (same settings, same signature)
    assert pool.state_signature == decoder.state_signature and c.n_past == decoder.n_past == 5
    a.prefill([Segment.tokens([4, 8, 15, 16, 23, 42], 0)])
    expected = a.logits().copy()
    assert np.abs(c.step(42, 5) - expected).max() < 1e-4
    assert np.abs(decoder.step(42, 5) - expected).max() < 1e-4
    assert pool.kv_used() == 6 + 6 + 5  # a, c, b: no sequence sees another's cells
    pool.close()


@pytest.fixture(scope="module")
def qwen_gguf(tmp_path_factory):
    import builders

    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
    from edgevlm.manifest import Manifest

    root = tmp_path_factory.mktemp("qwen-parallel")
    ckpt = builders.build_qwen2_vl(root / "ckpt", "2", seed=11)
    bundle = export_checkpoint(ckpt, root / "bundle", [ArtifactRequest("onnx", "fp32")], [ArtifactRequest("gguf", "f32")],
                               max_tiles=8)
    return bundle / Manifest.load(bundle).find("decoder", "gguf:f32").path


def test_mrope_sequences_stepped_in_one_batch_get_their_own_logits(qwen_gguf):
    """Qwen2-VL: an image's rows at (t, row, col) in one sequence (the 4-positions-per-row embedding batch), text in
    another; their generated tokens in one batch at their t positions."""
    from edgevlm.runtimes.llamacpp import open_decoder

    decoder = open_decoder(qwen_gguf, n_ctx=256, threads=1, parity=True)
    assert decoder.mrope
    rng = np.random.default_rng(1)
    grid = np.array([(3, r, c) for r in range(2) for c in range(3)], dtype=np.int32) + [0, 3, 3]  # t=3 rows
    rows = rng.standard_normal((6, decoder.n_embd)).astype(np.float32) * 0.1
    text = lambda ids, t: Segment(np.repeat(np.arange(t, t + len(ids))[:, None], 3, 1), token_ids=np.array(ids))  # noqa: E731
    prompts = [[text([1, 2, 3], 0), Segment(grid, embeds=rows), text([5, 6], 6)], [text([9, 10, 11, 12], 0)]]
    steps = [[(20, 8), (21, 9)], [(30, 4), (31, 5)]]
    assert batched_equals_alone(decoder, prompts, steps) < 1e-4


def test_a_client_that_stops_reading_does_not_hold_up_another(session, urls):
    """A streaming client that sends its request and never reads (a tiny receive window): the engine never waits on
    a socket (answers go to per-request queues), so another client's first token comes a few engine ticks after it
    asks, its answer equals its solo answer, and the stalled answer is still being decoded beside it."""
    import socket

    server, base = start(session, parallel=2)
    server.engine.tick_hook = lambda: time.sleep(0.02)  # ticks much slower than an HTTP round trip on 127.0.0.1
    stalled = None
    try:
        question = [user(urls["tall"], QUESTION)]
        alone = ask(base, question, 8)["text"]
        body = json.dumps({"messages": [user(urls["wide"], QUESTION)], "max_tokens": 300, "stream": True}).encode()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", server.server_address[1]))
        stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_for(lambda: metric(base, "edgevlm_active_sequences") == 1, "the stalled answer to start")
        ticks_before = metric(base, "edgevlm_decode_batches_total")
        request = urllib.request.Request(f"{base}/v1/chat/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"messages": question, "max_tokens": 8, "stream": True}).encode())
        with urllib.request.urlopen(request, timeout=60) as response:
            first = next(line for line in response if line.startswith(b"data: {"))
            ticks_to_first = metric(base, "edgevlm_decode_batches_total") - ticks_before
            rest = [first] + [line for line in response if line.startswith(b"data: {")]
        chunks = [json.loads(line[6:]) for line in rest]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == alone
        assert ticks_to_first <= 10, f"the first token came {ticks_to_first} engine ticks after the request"
        assert metric(base, "edgevlm_active_sequences") == 1  # the stalled answer is still running
    finally:
        if stalled is not None:
            stalled.close()
        stop(server)


@pytest.mark.parametrize("parallel", [None, 4])  # None: serve's default on a gguf decoder (2)
def test_serve_opens_one_llama_cpp_context_for_all_its_slots(bundles, parallel):
    """`edgevlm serve --parallel N` opens the decoder's context once, with N sequences, and its slots run on them
    (it used to open a one-sequence context, then an N-sequence one beside it: two KV caches at peak). Counted by
    the weights' own count of contexts opened on them."""
    from edgevlm.cli import build_parser
    from edgevlm.commands.serve import DEFAULT_PARALLEL, open_server

    argv = ["serve", str(bundles["llava-clip"]), "--port", "0", "--threads", "1", "--decoder", "gguf:q8_0"]
    args = build_parser("serve").parse_args(argv + ([] if parallel is None else ["--parallel", str(parallel)]))
    server, session, options, _ = open_server(args)
    try:
        context, n = session.decoder.context, parallel or DEFAULT_PARALLEL
        assert context.contexts_opened == 1 and context.n_seq == options.parallel == n
        assert server.engine.sequences.context is context and len(server.engine.slots) == n
        assert all(slot.session.decoder is context.sequence(i) for i, slot in enumerate(server.engine.slots))
        assert server.engine.slots[0].session is session  # sequence 0 has one record of its KV: the session's
    finally:
        server.server_close()
