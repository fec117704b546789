"""`edgevlm serve`'s per-request stages beside the session's timings (docs/notes/2026-12-07-serve-stall.md):
receive_ms (the handler reading and parsing the body), queue_ms (submitted until the engine took the job) and
first_text_ms (submitted until its first text reached the handler), in whole and streamed answers, so a client can
tell time spent before the engine, in it, and between its first token and its first text. Asserted by structure:
a job held in the queue while the engine is kept busy reports at least the interval the test saw it waiting, on any
CPU. Servers on 127.0.0.1, bounded counts."""
from __future__ import annotations

import threading
import time

import pytest

import edgevlm
from test_parallel import ask, health, urls, wait_for  # noqa: F401 - urls is a fixture
from server_client import QUESTION, start, stop, user

STAGES = ("receive_ms", "queue_ms", "first_text_ms")


@pytest.fixture(scope="module")
def session(bundles):
    return edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:f32", threads=1)


@pytest.mark.parametrize("stream", [False, True])
def test_answers_carry_the_stages_before_the_engine(session, urls, stream):  # noqa: F811
    server, base = start(session)
    gate, engine = threading.Event(), server.engine
    try:
        first = ask(base, [user(urls["small"], QUESTION)], stream=stream)
        t = first["timings"]
        assert all(t[key] >= 0 for key in STAGES), t
        assert t["first_text_ms"] >= t["queue_ms"]  # the engine took the job before any of its text came
        # hold the engine after its next answer (--parallel 1: a tick answers a whole request), then queue another
        engine.tick_hook = gate.wait
        holder = ask(base, [user(urls["wide"], QUESTION)])
        assert all(key in holder["timings"] for key in STAGES)
        waiting: dict = {}
        client = threading.Thread(target=lambda: waiting.update(ask(base, [user(urls["tall"], QUESTION)],
                                                                    stream=stream)))
        client.start()
        wait_for(lambda: health(base)["queue_depth"] == 1, "the request to wait in the queue")
        seen = time.monotonic()  # submitted before this; the engine cannot take it before the gate opens
        for _ in range(3):
            assert health(base)["queue_depth"] == 1  # still waiting: the engine is held
        engine.tick_hook = None
        released = time.monotonic()
        gate.set()
        client.join(timeout=120)
        assert not client.is_alive()
        assert waiting["timings"]["queue_ms"] >= (released - seen) * 1e3
        assert waiting["timings"]["first_text_ms"] >= waiting["timings"]["queue_ms"]
    finally:
        gate.set()
        stop(server)


def test_a_tokens_text_goes_out_before_the_next_decode(session, images):
    """At each decode step the generator asks for (StepRequest), the text of every token sampled so far, this step's
    included, has already been handed out: a client's first text does not wait for the second token's decode."""
    from edgevlm.runtimes.detokenize import IncrementalDetokenizer
    from edgevlm.runtimes.requests import Delta, StepRequest

    request = session.prepare_conversation([session.user_message(QUESTION, 1)], [images["small"]], max_tokens=8)
    sent, reference, steps_with_new_text = "", IncrementalDetokenizer(session.spec.tokenizer), 0
    for event in session.generation(request):
        if isinstance(event, Delta):
            sent += event.text
        elif isinstance(event, StepRequest):
            steps_with_new_text += bool(reference.add(event.token))
            assert sent == reference.emitted, (sent, reference.emitted)
    assert steps_with_new_text >= 1  # the tokens had text to hand out, so the test can fail
