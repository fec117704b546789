"""Session-scoped tiny checkpoints and bundles, built here with real transformers classes (no downloads)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import builders  # noqa: E402


def random_image(seed: int, width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    return {
        "llava-clip": builders.build_llava(root / "llava-clip", "clip"),
        "llava-siglip": builders.build_llava(root / "llava-siglip", "siglip", seed=1),
        "idefics3": builders.build_idefics3(root / "idefics3", seed=2),
        "idefics3-nosplit": builders.build_idefics3(root / "idefics3-nosplit", seed=3, splitting=False),
    }


@pytest.fixture(scope="session")
def bundles(ckpts, tmp_path_factory) -> dict[str, Path]:
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("bundles")
    encoders = [ArtifactRequest("onnx", p) for p in ("fp32", "fp16", "int8")]
    decoders = [ArtifactRequest("gguf", p) for p in ("f32", "q8_0")]
    return {
        name: export_checkpoint(ckpts[name], root / name, encoders, decoders, max_tiles=8)
        for name in ("llava-clip", "llava-siglip", "idefics3")
    }


@pytest.fixture(scope="session")
def mlx_bundles(ckpts, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("mlx.core", reason="MLX is not installed on this platform (pip install 'mlx[cpu]' mlx-lm)")
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("mlx-bundles")
    decoders = [ArtifactRequest("mlx", p) for p in ("fp32", "fp16", "8bit", "4bit")]
    return {
        name: export_checkpoint(ckpts[name], root / name, [ArtifactRequest("onnx", "fp32")], decoders, max_tiles=8,
                                options={"group_size": 32})
        for name in ("llava-clip", "idefics3")
    }


@pytest.fixture(scope="session")
def images() -> dict[str, Image.Image]:
    return {
        "small": random_image(0, 50, 70),
        "wide": random_image(1, 100, 40),
        "tall": random_image(2, 30, 90),
        "tiny": random_image(3, 9, 7),
        "square": random_image(4, 64, 64),
    }
