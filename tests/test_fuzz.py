"""Fuzzing in CI (fixed seeds, bounded counts): images, server request bodies and CLI options either work or end in
edgevlm's own one-line error. benchmarks/fuzz.py runs the same fuzzers with 10,000 cases each."""
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


def test_request_bodies_fuzz(bundles, images):
    from edgevlm.serve import ChatService

    session = edgevlm.load(bundles["llava-clip"], encoder="onnx:fp32", decoder="gguf:q8_0", threads=1, n_ctx=96)
    buffer = io.BytesIO()
    images["small"].save(buffer, "PNG")
    tally = fuzzers.fuzz_bodies(ChatService(session, "m"), buffer.getvalue(), 150, seed=2)
    assert tally.counts["traceback"] == 0, _report(tally)
    assert tally.counts["ok"] > 10 and tally.counts["clean error"] > 50, tally.counts


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
