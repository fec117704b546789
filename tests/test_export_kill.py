"""`kill -9` at any moment of `edgevlm export` leaves the target absent, the previous complete bundle, or the new
complete one; the next export of the target removes what the killed one left behind (or puts the previous bundle
back), and `edgevlm verify` passes on what remains."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from edgevlm.export.bundle import recover_interrupted
from edgevlm.manifest import Manifest

# (a line of the export's log to wait for, seconds to wait after it): points across the ONNX, GGUF and MLX stages
KILL_POINTS = [
    ("loading", 0.0), ("vision module to ONNX", 0.2), ("quantizing to int8", 0.0), ("quantizing to int8", 0.5),
    ("int8 dynamic", 0.0), ("encoder onnx:int8", 0.0), ("F16 GGUF", 0.0), ("q8_0 with llama.cpp", 0.0),
    ("HF checkpoint folder for mlx-lm", 0.0), ("converting with mlx-lm", 0.3), ("converting with mlx-lm", 1.5),
]


def _complete(target) -> bool:
    manifest = Manifest.load(target)
    for artifact in manifest.artifacts:
        artifact.verify(target)
    return {a.name for a in manifest.artifacts} == {"tokenizer", "onnx:fp32", "onnx:int8", "gguf:q8_0", "mlx:4bit"}


def _export_killed_after(argv, marker: str, delay: float, timeout: float = 120) -> bool:
    """Run the export, kill -9 it `delay` s after `marker` appears in its log; True if it was killed before ending."""
    import os

    env = {**os.environ, "COLUMNS": "400"}  # rich wraps log lines at 80 columns otherwise, splitting the markers
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    seen = threading.Event()

    def watch():
        for line in process.stderr:
            if marker in line:
                seen.set()

    threading.Thread(target=watch, daemon=True).start()
    seen.wait(timeout)
    time.sleep(delay)
    killed = process.poll() is None
    process.kill()
    process.wait()
    return killed


@pytest.mark.slow
def test_kill_9_at_any_moment_never_leaves_a_half_bundle(ckpts, tmp_path, capsys):
    from edgevlm.cli import main

    target = tmp_path / "bundle"
    argv = [sys.executable, "-m", "edgevlm", "export", str(ckpts["llava-clip"]), "-o", str(target), "--encoder",
            "onnx:fp32,onnx:int8", "--decoder", "gguf:q8_0,mlx:4bit", "--max-tiles", "4", "--threads", "1"]
    subprocess.run(argv, check=True, capture_output=True, timeout=300)  # the previous complete bundle
    assert _complete(target)
    killed = 0
    for marker, delay in KILL_POINTS:
        killed += _export_killed_after(argv + ["--force"], marker, delay)
        # what the next export of this target does first: leftovers of the killed one are cleaned up
        recover_interrupted(target)
        assert target.is_dir() and _complete(target), (marker, delay)  # the previous (or the new) complete bundle
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], (marker, delay)
    assert killed >= 10  # the kills landed mid-export, not after it
    # every artifact that can be judged passes (random weights: the quantized gates cannot judge; exit 3 without it)
    assert main(["verify", str(target), "--threads", "1", "--allow-skips"]) == 0
    capsys.readouterr()


def test_a_killed_swap_puts_the_previous_bundle_back(bundles, tmp_path):
    """The one window between the two renames: the target moved aside, the new one not yet in place."""
    import os
    import shutil

    target = tmp_path / "bundle"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    shutil.copytree(bundles["llava-clip"], tmp_path / f".bundle.old-{pid}")
    shutil.copytree(bundles["llava-clip"], tmp_path / f".bundle.partial-{pid}-x1y2")
    os.makedirs(tmp_path / f".bundle.partial-{os.getpid()}-live")  # a running export's folder is left alone
    recover_interrupted(target)
    assert _complete_llava(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".bundle.partial-{os.getpid()}-live", "bundle"]


def _complete_llava(target) -> bool:
    manifest = Manifest.load(target)
    for artifact in manifest.artifacts:
        artifact.verify(target)
    return True
