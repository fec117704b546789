"""`edgevlm serve --parallel N` encodes images off the decode path (issue 32): while one request streams, another
request's new image is encoded on the encode worker and the first stream's tokens keep being decoded during that
encode (counted by the server's batched decode rows inside the encode's window, not by the client's chunks: a
random-weight model's text has bytes a chunk may wait for, see runtimes/detokenize.py); the decoder runs its share
of the threads meanwhile (--encode-threads) and all of them after; greedy answers equal the answers given alone.
Timing is asserted by structure (what happens inside the encode's window), never by speed. Servers on 127.0.0.1,
bounded counts."""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import edgevlm
from test_parallel import ask, wait_for
from test_serve_burst import data_url
from server_client import QUESTION, metric, start, stop, user

LONG = 48  # tokens of the streaming answer: it must still be streaming when the other image is encoded
ENCODE_PAUSE_S = 0.6  # the watched encoder is slowed by this much, so the encode window is wide on any CPU


@pytest.fixture(scope="module")
def session(bundles):
    # 2 decoder threads, 1 for the encoder: the server cuts the decoder to 1 while an encode runs
    return edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", threads=2, encoder_threads=1,
                        n_seq=2)


class WatchedEncoder:
    """The session's real encoder, each encode slowed by ENCODE_PAUSE_S; for each, recorded: its window (monotonic
    start, end), the thread it ran on, the decoder threads the engine had set meanwhile, and the server's batched
    decode rows at its start and end."""

    def __init__(self, encoder, engine_threads, decoded_rows):
        self.encoder, self.engine_threads, self.decoded_rows = encoder, engine_threads, decoded_rows
        self.windows: list[tuple[float, float, str, int, float]] = []

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, *args, **kwargs):
        start, rows = time.monotonic(), self.decoded_rows()
        time.sleep(ENCODE_PAUSE_S)
        out = self.encoder.encode(*args, **kwargs)
        threads = self.engine_threads()
        self.windows.append((start, time.monotonic(), threading.current_thread().name, threads,
                             self.decoded_rows() - rows))
        return out


def stream_stamps(base: str, messages: list[dict], max_tokens: int) -> tuple[str, list[float]]:
    """The streamed text and the monotonic time each content chunk arrived."""
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True}
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    text, stamps = [], []
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if piece:
                stamps.append(time.monotonic())
                text.append(piece)
    return "".join(text), stamps


def test_a_stream_keeps_its_tokens_while_another_users_image_is_encoded(session, images):
    from conftest import random_image

    streaming = [{"role": "user", "content": "Tell me a long story about shapes."}]  # text only: no encode
    fresh = [user(data_url(random_image(303, 60, 52)), QUESTION)]  # an image no other test sends
    server, base = start(session, parallel=2, encode_threads=1)
    engine = server.engine
    assert engine.threads == (2, 1)
    watched = WatchedEncoder(session.encoder, lambda: engine._threads_now,
                             lambda: metric(base, "edgevlm_decode_batch_rows_total"))
    engine.tick_hook = lambda: time.sleep(0.01)  # a tick of the tiny model is ~1 ms: the stream spans the encode
    try:
        alone_stream = ask(base, streaming, LONG)["text"]
        session.encoder = watched  # siblings share the encoder object through the session only at sibling() time
        for sibling in engine.sequences.sessions:
            sibling.encoder = watched
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(stream_stamps, base, streaming, LONG)
            wait_for(lambda: metric(base, "edgevlm_active_sequences") == 1, "the stream to take a slot")
            arrival = time.monotonic()
            second = pool.submit(stream_stamps, base, fresh, 6)
            text, stamps = first.result()
            fresh_text, fresh_stamps = second.result()
        assert len(watched.windows) == 1, "the new image is encoded once"
        start_s, end_s, thread_name, threads_during, decoded = watched.windows[0]
        assert thread_name.startswith("edgevlm-encode")  # not the engine thread
        assert decoded >= 3, (f"{decoded:.0f} tokens decoded during the {end_s - start_s:.2f} s encode: the encode "
                              "paused the other slot's decode")
        assert arrival < start_s and stamps[-1] > fresh_stamps[0] - 60  # sanity: both streamed
        assert threads_during == 1 and engine._threads_now == 2  # the decoder's share, then all of it again
        assert text == alone_stream
        for sibling in engine.sequences.sessions:
            sibling.encoder = watched.encoder
        session.encoder = watched.encoder
        session.embed_cache.clear()
        session.prefix_cache.clear()
        for sibling in engine.sequences.sessions:
            sibling.forget_sequence()
        assert ask(base, fresh, 6)["text"] == fresh_text  # the answer given alone, cold
        assert [s["state"] for s in json.loads(urllib.request.urlopen(f"{base}/health").read())["slots"]] == \
            ["idle", "idle"]
    finally:
        session.encoder = watched.encoder
        stop(server)


def test_encode_threads_is_validated():
    from edgevlm.errors import BadInputError
    from edgevlm.serve import ServerOptions

    with pytest.raises(BadInputError, match="--encode-threads"):
        ServerOptions(encode_threads=-1)
