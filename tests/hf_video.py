"""transformers' video processors as the parity reference for video input, run in a subprocess.

They need torchvision, and the only torchvision for torch 2.13 on the index is a CUDA build: setup-venv.sh installs
its Python half into .venv/hf-torchvision without the `_C.so` that cannot load here. That folder is never put on the
test session's own path (transformers would switch every image processor to its torchvision variant), so the
reference runs in a child process that defines the two operator schemas torchvision's import registers fakes for.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HF_TORCHVISION = Path(sys.prefix) / "hf-torchvision"

# Prepended to every child script: torchvision's _meta_registrations registers fakes for these two operators
# without checking that its C extension loaded.
PRELUDE = """
import torch
_lib = torch.library.Library("torchvision", "DEF")
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import torchvision  # noqa: F401
"""


def available() -> bool:
    return (HF_TORCHVISION / ".ready").exists()


def run_reference(script: str, inputs: dict[str, np.ndarray], timeout: float = 300) -> dict[str, np.ndarray]:
    """Run `script` in a child with torchvision importable.

    The child finds `INPUTS` (a dict of arrays loaded from an npz) and must fill the dict `OUTPUTS` with numpy arrays
    (or things np.asarray takes); they come back as a dict.
    """
    if not available():
        raise RuntimeError(f"{HF_TORCHVISION} is missing: run `make setup` (scripts/setup-venv.sh installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, **inputs)
        body = (PRELUDE + "import numpy as np\n"
                f"INPUTS = dict(np.load({str(src)!r}, allow_pickle=False))\nOUTPUTS = {{}}\n"
                + script
                + f"\nnp.savez({str(dst)!r}, **{{k: np.asarray(v) for k, v in OUTPUTS.items()}})\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HF_TORCHVISION), str(ROOT)]))
        done = subprocess.run([sys.executable, "-c", body], env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"reference child failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return dict(np.load(dst, allow_pickle=False))
