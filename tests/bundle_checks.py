"""Checks several test files make the same way: a CLI run in process and its one-line error, a one-line refusal (exit 2, no traceback, nothing
written), the mmproj refusal of a family llama.cpp has no projector for (export and inspect), the worst encoder error
over images, and the disk tier surviving a restart."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.cli import main
from edgevlm.metrics import cosine


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `edgevlm ARGV` run in this process."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(code, err, *needles):
    """Exit 2, no traceback, one line on stderr, naming each of `needles`."""
    assert code == 2
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, err


def assert_refused_in_one_line(argv: list[str], message: str, out: Path, capsys) -> None:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and message in errors[0], err
    assert not out.exists()


def assert_mmproj_refused(checkpoint: Path, tmp_path: Path, capsys, message: str) -> None:
    """export --encoder ...,gguf:f16 is refused in one line naming why; inspect says why, too."""
    out = tmp_path / "refused"
    assert_refused_in_one_line(["export", str(checkpoint), "-o", str(out), "--encoder", "onnx:fp32,gguf:f16",
                                "--decoder", "gguf:f32"], message, out, capsys)
    assert main(["inspect", str(checkpoint)]) == 0
    assert message in " ".join(capsys.readouterr().out.split())


def record_worst(worst: dict, precision: str, ours: np.ndarray, expected: np.ndarray) -> None:
    """worst[precision] = (largest max-relative error, smallest cosine) over the images seen so far."""
    rel = float(np.abs(ours - expected).max() / np.abs(expected).max())
    old_rel, old_cos = worst.get(precision, (0.0, 1.0))
    worst[precision] = max(old_rel, rel), min(old_cos, cosine(ours, expected))


def assert_disk_tier_restores(open_session, image, question: str, max_tokens: int, cache_dir: Path) -> list[int]:
    """A restart with the same --cache-dir reads the image's rows and its image-prefix state from disk: no encode, a
    prefix hit, the cold run's tokens. Returns the cold tokens."""
    from edgevlm.runtimes.disk_cache import DiskCache

    options = dict(max_tokens=max_tokens, stop_token_ids=[])
    cold = open_session().generate(image, question, **options)
    first = open_session()
    first.disk_cache = DiskCache(cache_dir, 1 << 28)
    assert first.generate(image, question, **options).tokens == cold.tokens
    assert len(list(cache_dir.glob("*.evc"))) == 2  # the rows and the image-prefix state
    restarted = open_session()
    restarted.disk_cache = DiskCache(cache_dir, 1 << 28)
    warm = restarted.generate(image, question, **options)
    assert warm.timings["disk_cache_hits"] >= 1 and warm.timings["prefix_cache_hits"] == 1
    assert warm.timings["n_tiles"] == 0 and warm.tokens == cold.tokens
    return cold.tokens
