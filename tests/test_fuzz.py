"""Fuzzing in CI (Hypothesis, fixed seeds, bounded counts, saved failures replayed first): images, server request
bodies (through the request path and over HTTP) and CLI options either work or end in edgevlm's own one-line error.
benchmarks/fuzz.py runs the same fuzzers with 10,000 cases each; crafted GGUFs are in tests/test_gguf_fuzz.py."""
from __future__ import annotations

import io

import pytest

import edgevlm
from edgevlm.families import load_checkpoint

import fuzzers


def _report(tally) -> str:
    return f"{tally.counts}\n" + "\n".join(tally.tracebacks[:5])


def test_images_fuzz(ckpts):
    specs = [load_checkpoint(ckpts[name]).preprocess for name in ("llava-clip", "idefics3")]
    tally = fuzzers.fuzz_images(300, seed=1, preprocess_specs=specs)
    assert tally.counts["traceback"] == 0, _report(tally)
    assert tally.counts["ok"] > 50 and tally.counts["clean error"] > 50, tally.counts  # both kinds exercised


def _png(images) -> bytes:
    buffer = io.BytesIO()
    images["small"].save(buffer, "PNG")
    return buffer.getvalue()


def test_request_bodies_fuzz(bundles, images):
    from edgevlm.serve import ChatService

    session = edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:q8_0", threads=1, n_ctx=96)
    tally = fuzzers.fuzz_bodies(ChatService(session, "m"), _png(images), 150, seed=2)
    assert tally.counts["traceback"] == 0, _report(tally)
    assert tally.counts["ok"] > 10 and tally.counts["clean error"] > 50, tally.counts


def test_request_bodies_over_http_get_a_4xx_or_a_200_and_the_server_keeps_serving(bundles, images, capfd):
    """Deep nesting, huge arrays, wrong types at every level of the chat request, sent to a server on 127.0.0.1:
    each answer is a 200 or a 4xx with a one-line message (a 500 counts as a traceback), nothing in the log."""
    from server_client import QUESTION, post, start, stop

    session = edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:q8_0", threads=1, n_ctx=96)
    server, base = start(session)
    try:
        tally = fuzzers.fuzz_server(base, _png(images), 120, seed=4)
        assert post(base, {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2})[0] == 200
    finally:
        stop(server)
    assert tally.counts["traceback"] == 0, _report(tally)
    assert tally.counts["ok"] > 5 and tally.counts["clean error"] > 50, tally.counts
    log = capfd.readouterr().err
    assert "Traceback" not in log and "internal error" not in log, log[-2000:]


def test_cli_options_fuzz(bundles, images, tmp_path):
    image = tmp_path / "image.png"
    images["small"].save(image)
    tally = fuzzers.fuzz_cli(bundles["llava-clip"], image, 60, seed=3)
    assert tally.counts["traceback"] == 0, _report(tally)
    assert tally.counts["ok"] > 5 and tally.counts["clean error"] > 20, tally.counts


@pytest.mark.parametrize("argv,needle", [
    (["--threads", "99999999999999999999"], "--threads"), (["--n-ctx", "99999999999999999999"], "--n-ctx"),
])
def test_absurd_numbers_are_refused_up_front(argv, needle, bundles, images, tmp_path, capsys):
    from edgevlm.cli import main

    images["small"].save(tmp_path / "i.png")
    assert main(["run", str(bundles["llava-clip"]), "--image", str(tmp_path / "i.png"), "--prompt", "hi", *argv]) == 2
    assert needle in capsys.readouterr().err
