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
import hypothesis_profile  # noqa: E402

hypothesis_profile.register()  # the saved-example database: written locally, read-only under CI=true

# What `.[all]` installs. Under CI=true a backend that cannot be imported fails the run at once (instead of turning
# its tests into skips), and any skipped test not marked `gpu` fails it at the end.
CI_BACKENDS = ("torch", "transformers", "onnxruntime", "onnx", "llama_cpp", "llama_cpp.mtmd_cpp", "gguf", "mlx.core",
               "mlx_lm", "matplotlib", "psutil")


in_ci = hypothesis_profile.in_ci


def pytest_configure(config):
    if not in_ci():
        return
    import importlib

    broken = []
    for module in CI_BACKENDS:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure to import is the message
            broken.append(f"{module} ({type(exc).__name__}: {exc})")
    if broken:
        pytest.exit(f"CI=true: these backends, which .[all] installs, cannot be imported: {'; '.join(broken)}; "
                    "re-run scripts/setup-venv.sh (or `make clean test`)", returncode=3)


def _gpu_missing() -> str | None:
    from edgevlm.backends import require_tensorrt
    from edgevlm.errors import BackendUnavailableError

    try:
        require_tensorrt()  # TensorRT, cuda-python and a visible GPU; no torch
        return None
    except BackendUnavailableError as exc:
        return str(exc)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    reason = _gpu_missing() if gpu_items else None
    for item in gpu_items if reason else []:
        item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))


_SKIPPED_IN_CI: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "gpu" not in report.keywords and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED_IN_CI.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if in_ci() and _SKIPPED_IN_CI and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if in_ci() and _SKIPPED_IN_CI:
        terminalreporter.write_line(f"CI=true: {len(_SKIPPED_IN_CI)} test(s) skipped that are not marked gpu "
                                    "(CI installs everything they need):", red=True)
        for line in _SKIPPED_IN_CI:
            terminalreporter.write_line(f"  {line}", red=True)


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
        "smolvlm2": builders.build_smolvlm2(root / "smolvlm2", seed=5),
        "llava-qwen2": builders.build_llava(root / "llava-qwen2", "siglip", seed=6, decoder="qwen2"),
        "llava-qwen2-tied": builders.build_llava(root / "llava-qwen2-tied", "siglip", seed=7, decoder="qwen2", tied=True),
        "internvl": builders.build_internvl(root / "internvl", seed=8),
        "internvl-tied": builders.build_internvl(root / "internvl-tied", seed=9, tied=True),
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
    pytest.importorskip("mlx.core", reason="MLX is not installed on this platform (pip install 'mlx[cpu]' mlx-lm)")  # CI: fails
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
