"""`edgevlm serve` under a burst (issue 32): up to --parallel + --queue requests at once are admitted and answered
with their solo greedy answers, one more gets 429 with Retry-After; one image asked twice at once is encoded once.
Servers on 127.0.0.1, bounded counts."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

import edgevlm
from test_parallel import ask, health, urls, wait_for  # noqa: F401 - urls is a fixture
from server_client import QUESTION, metric, start, stop, user

SLOTS, QUEUE = 4, 8


@pytest.fixture(scope="module")
def session(bundles):
    return edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", threads=1, n_seq=SLOTS)


def post_status(base: str, body: dict) -> tuple[int, dict, bytes]:
    """Status, headers and body of one request (a 4xx/5xx too)."""
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_a_burst_of_slots_plus_queue_is_answered_and_one_more_gets_429(session, urls):  # noqa: F811
    """The engine is held (tick_hook) with one request in a slot, so the whole burst is in flight at once: before the
    queue counted the free slots, 3 of a burst of 12 on 4 slots + a queue of 8 were refused at once."""
    questions = [QUESTION, "How many shapes are there?"]
    cases = [([user(urls[name], q)], stream) for name in urls for q in questions for stream in (False, True)]
    cases = cases[:SLOTS + QUEUE]
    assert len(cases) == SLOTS + QUEUE
    server, base = start(session, capacity=QUEUE, parallel=SLOTS)
    gate = threading.Event()
    gate.set()
    server.engine.tick_hook = gate.wait  # cleared: the first request holds the engine until the burst is in
    try:
        solo = [ask(base, m)["text"] for m, _ in cases]
        statuses: list[int] = []

        def one(case) -> str:
            messages, stream = case
            status, _, raw = post_status(base, {"messages": messages, "max_tokens": 6, "stream": stream})
            statuses.append(status)
            assert status == 200, raw
            if not stream:
                return json.loads(raw)["choices"][0]["message"]["content"]
            chunks = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]
            return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])

        gate.clear()
        with ThreadPoolExecutor(len(cases)) as pool:
            futures = [pool.submit(one, cases[0])]
            wait_for(lambda: metric(base, "edgevlm_active_sequences") == 1, "the first request to take a slot")
            futures += [pool.submit(one, case) for case in cases[1:]]
            wait_for(lambda: metric(base, "edgevlm_queue_depth") + metric(base, "edgevlm_active_sequences")
                     + len(statuses) >= len(cases), "the burst to arrive")
            assert statuses == [], f"refused below capacity: {statuses}"
            status, headers, raw = post_status(base, {"messages": cases[0][0], "max_tokens": 2})
            assert status == 429, raw
            assert headers.get("Retry-After") == "1"
            assert f"{SLOTS + QUEUE} requests" in json.loads(raw)["error"]["message"]
            gate.set()
            answers = [f.result() for f in futures]
        assert answers == solo
        assert statuses == [200] * len(cases)
        assert metric(base, 'edgevlm_requests_total{outcome="429"}') == 1
        assert [s["state"] for s in health(base)["slots"]] == ["idle"] * SLOTS
        # everything answered: the whole capacity is free again
        assert post_status(base, {"messages": cases[1][0], "max_tokens": 2})[0] == 200
    finally:
        gate.set()
        stop(server)


def test_the_default_queue_holds_a_burst_of_three_times_the_slots():
    from edgevlm.commands.serve import default_queue

    for parallel in (1, 2, 4, 8, 32):
        assert parallel + default_queue(parallel) >= 3 * parallel
    assert default_queue(4) == 8 and default_queue(16) == 32


# --- single flight: one image is never encoded twice at once ----------------------------------------------------------


def data_url(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class CountingEncoder:
    """The session's real encoder, its calls counted and each one slowed so that a second caller asking for the same
    image arrives while the first is still encoding."""

    def __init__(self, encoder, pause_s: float = 0.3):
        self.encoder, self.pause_s, self.calls = encoder, pause_s, 0
        self.lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, *args, **kwargs):
        import time

        with self.lock:
            self.calls += 1
        time.sleep(self.pause_s)
        return self.encoder.encode(*args, **kwargs)


def test_two_threads_asking_for_one_new_image_encode_it_once(session):
    import numpy as np

    from conftest import random_image
    from edgevlm.runtimes.embeddings import image_embeddings
    from edgevlm.runtimes.requests import _new_timings

    encoder = CountingEncoder(session.encoder)
    image = session._prepare_image(random_image(101, 64, 48))
    timings = [_new_timings(), _new_timings()]
    start = threading.Barrier(2)

    def embed(i: int):
        start.wait(10)
        return image_embeddings(image, encoder, session.spec.preprocess, session.embed_cache, None,
                                session.encode_flights, timings[i])

    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(embed, range(2)))
    assert encoder.calls == 1
    np.testing.assert_array_equal(rows[0], rows[1])
    assert sorted((t["embed_cache_misses"], t["embed_cache_hits"]) for t in timings) == [(0, 1), (1, 0)]
    assert image_embeddings(image, encoder, session.spec.preprocess, session.embed_cache, None,
                            session.encode_flights, _new_timings()) is rows[0] and encoder.calls == 1


def test_two_requests_with_the_same_new_image_encode_it_once(session):
    """Both in flight at once on two slots: /metrics counts one encode (one miss) and one hit, and both answers equal
    the answer given alone."""
    from conftest import random_image

    url = data_url(random_image(102, 56, 72))  # an image no other test sends: no cache holds it
    messages = [user(url, QUESTION)]
    server, base = start(session, parallel=2)
    gate = threading.Event()
    server.engine.tick_hook = gate.wait
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(ask, base, messages)]
            wait_for(lambda: metric(base, "edgevlm_active_sequences") == 1, "the first request to take a slot")
            futures.append(pool.submit(ask, base, messages, 6, True))
            wait_for(lambda: metric(base, "edgevlm_queue_depth") + metric(base, "edgevlm_active_sequences") == 2,
                     "the second request to arrive")
            gate.set()
            answers = [f.result()["text"] for f in futures]
        assert metric(base, "edgevlm_embed_cache_misses_total") == 1
        assert metric(base, "edgevlm_embed_cache_hits_total") + metric(base, "edgevlm_prefix_cache_hits_total") >= 1
        session.embed_cache.clear()
        session.prefix_cache.clear()
        for sibling in server.engine.sequences.sessions:
            sibling.forget_sequence()
        assert ask(base, messages)["text"] == answers[0] == answers[1]
    finally:
        gate.set()
        stop(server)
