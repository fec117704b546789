"""Under CI=true a backend that `.[all]` installs but that cannot be imported fails the run with a clear message,
instead of turning its tests into skips; and a skipped test that is not marked `gpu` fails the run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def _pytest(args: list[str], tmp_path: Path, extra_path: Path | None = None, ci: str = "true"):
    env = {**os.environ, "CI": ci}
    if extra_path is not None:  # a shim package that shadows the real one
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300)


def test_ci_fails_when_mlx_cannot_be_imported(tmp_path):
    shim = tmp_path / "shim"
    (shim / "mlx").mkdir(parents=True)
    (shim / "mlx" / "__init__.py").write_text("raise ImportError('libmlx.so: cannot open shared object file (shim)')\n")
    done = _pytest([str(TESTS / "test_images.py"), "--co"], tmp_path, shim)
    output = done.stdout + done.stderr
    assert done.returncode == 3, output
    assert "mlx.core (ImportError: libmlx.so: cannot open shared object file (shim))" in output
    assert "re-run scripts/setup-venv.sh" in output
    outside_ci = _pytest([str(TESTS / "test_images.py"), "--co"], tmp_path, shim, ci="")
    assert outside_ci.returncode == 0, outside_ci.stdout  # a developer without MLX can still run the rest


def test_ci_fails_on_a_skip_that_is_not_gpu(tmp_path):
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n"
        "def test_runs():\n    assert 1 + 1 == 2\n"
        "def test_skips():\n    pytest.skip('backend missing')\n"
        "@pytest.mark.gpu\ndef test_gpu_only():\n    pytest.skip('no GPU here')\n"
    )
    target = TESTS / f"test_zz_generated_{os.getpid()}.py"  # inside tests/ so that conftest.py applies
    target.write_text((tmp_path / "test_skips.py").read_text())
    try:
        in_ci = _pytest([str(target), "-rs"], tmp_path)
        outside_ci = _pytest([str(target)], tmp_path, ci="")
    finally:
        target.unlink()
    assert in_ci.returncode == 1, in_ci.stdout
    summary = in_ci.stdout.split("1 test(s) skipped that are not marked gpu")[1]
    assert "::test_skips: Skipped: backend missing" in summary and "test_gpu_only" not in summary
    assert outside_ci.returncode == 0, outside_ci.stdout
