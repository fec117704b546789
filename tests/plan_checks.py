"""Helpers the plan tests share: a one-GPU device file and a GGUF's tensor bytes."""
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
