"""Helpers the plan tests share: a one-GPU device file, a GGUF's tensor bytes, a checkpoint plan run without torch."""
from __future__ import annotations

import json

from edgevlm.plan import budget


def _device_file(tmp_path, usable_bytes: float, memory_gib: float = 16) -> str:
    """A one-GPU device file with `usable_bytes` usable (a discrete GPU: the caches are host memory, not counted)."""
    entry = {"id": "fake-gpu", "name": "a fake GPU", "kind": "discrete-gpu", "memory_gib": memory_gib,
             "usable_gib": usable_bytes / (1 << 30), "usable_basis": "test", "bandwidth_gbs": 100, "target": "cuda",
             "sources": ["test"], "compute": {"fp16_tflops": 10.0}}
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"version": 1, "devices": [entry]}))
    return str(path)


def _gguf_bytes(path) -> int:
    return sum(t.n_bytes for t in budget.read_gguf_tensors(path))


def plan_without_torch(checkpoint) -> dict:
    """`edgevlm plan CHECKPOINT --json` in a fresh interpreter, asserting torch was never imported; its JSON."""
    import subprocess
    import sys

    code = ("import sys, json; from edgevlm.cli import main; "
            f"assert main(['plan', {str(checkpoint)!r}, '--device', 'rtx-4060-8gb', '--json']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)
