"""The TensorRT path as far as it runs without a GPU: a fake `tensorrt` module records what build-engine asks of the
TensorRT 10 API (profile shapes, flags, which ONNX graph is parsed) and returns a fake plan; the bundle bookkeeping,
the explicit-quantization QDQ graph and the engine/GPU checks are real; a fake cuda-python runs the encoder's run path
(buffers, copies, one stream, in order). The `gpu` test builds a real engine (not run: no GPU here)."""
from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import onnx
import pytest

from edgevlm.errors import BackendUnavailableError, BadInputError, BundleError
from edgevlm.export import tensorrt as trt_export
from edgevlm.manifest import Manifest
from fake_gpu import fake_modules


@pytest.fixture
def fake_gpu(monkeypatch):
    """Fake TensorRT and cuda-python (tests/fake_gpu.py): one "Fake GPU" with compute capability 8.7."""
    modules = fake_modules()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules["tensorrt"]


@pytest.fixture
def bundle(bundles, tmp_path):
    return shutil.copytree(bundles["llava-clip"], tmp_path / "bundle")  # build-engine writes into the bundle


def test_fp16_engine_profile_comes_from_max_tiles_and_lands_in_the_manifest(fake_gpu, bundle):
    plan = trt_export.build_engine(bundle, "fp16", max_tiles=3, log=lambda m: None)
    calls = fake_gpu.calls
    assert calls["profiles"] == [("pixel_values", (1, 3, 32, 32), (3, 3, 32, 32), (3, 3, 32, 32))]
    assert calls["flags"] == ["FP16"] and calls["calibrator"] is None
    assert calls["parsed"] == [str(bundle / "encoder" / "fp32.onnx")]
    manifest = Manifest.load(bundle)
    artifact = manifest.find("engine", "tensorrt:fp16")
    artifact.verify(bundle)  # sha256 and size of the written plan
    assert plan.read_bytes().startswith(b"fake-plan")
    assert artifact.details["tiles"] == {"min": 1, "opt": 3, "max": 3}
    assert artifact.details["gpu"] == "Fake GPU" and artifact.details["tensorrt_version"] == "10.3.0"
    assert (bundle / "encoder" / "timing.cache").read_bytes() == b"timing-cache"
    assert not list(bundle.glob(".build-engine-*"))


def test_int8_engine_is_explicit_quantization_from_a_qdq_graph(fake_gpu, bundle):
    trt_export.build_engine(bundle, "int8", max_tiles=2, opt_tiles=1, log=lambda m: None)
    calls = fake_gpu.calls
    assert calls["flags"] == ["FP16", "INT8"]
    assert calls["calibrator"] is None  # TensorRT 10 deprecates implicit calibration
    assert calls["qdq_ops"] == {"QuantizeLinear", "DequantizeLinear"} and calls["qdq_int8"]  # signed, symmetric
    assert calls["profiles"][0][1:] == ((1, 3, 32, 32), (1, 3, 32, 32), (2, 3, 32, 32))
    assert Manifest.load(bundle).find("engine", "tensorrt:int8").details["tiles"]["max"] == 2
    assert not list(bundle.glob(".build-engine-*"))  # the QDQ graph was scratch


def test_calibration_batches_never_exceed_the_profile(bundle):
    manifest = Manifest.load(bundle)
    for batch in (1, 2, 3, 8):
        batches = trt_export.calibration_batches(manifest, n_tiles=10, batch=batch)
        assert max(len(b) for b in batches) <= batch and sum(len(b) for b in batches) == 10


@pytest.mark.parametrize("max_tiles,opt_tiles", [(0, None), (9, None), (3, 4)])
def test_profile_outside_the_graph_bound_is_refused(fake_gpu, bundle, max_tiles, opt_tiles):
    with pytest.raises(BadInputError, match="--(max|opt)-tiles must be 1.."):
        trt_export.build_engine(bundle, "fp16", max_tiles=max_tiles, opt_tiles=opt_tiles, log=lambda m: None)
    assert fake_gpu.calls["parsed"] == []  # refused before any TensorRT work


def test_an_engine_built_for_another_gpu_or_tensorrt_is_refused(fake_gpu, bundle, monkeypatch):
    from edgevlm.runtimes.tensorrt_encoder import TensorRTEncoder

    trt_export.build_engine(bundle, "fp16", max_tiles=2, log=lambda m: None)
    manifest = Manifest.load(bundle)
    artifact = manifest.find("engine", "tensorrt:fp16")
    cudart = sys.modules["cuda.bindings.runtime"]
    monkeypatch.setattr(cudart, "device_name", "Other GPU")
    with pytest.raises(BundleError, match="built for Fake GPU with TensorRT 10.3.0; this is Other GPU.*build-engine"):
        TensorRTEncoder(bundle, artifact, manifest.encoder)
    monkeypatch.setattr(cudart, "device_name", "Fake GPU")
    monkeypatch.setattr(fake_gpu, "__version__", "10.9.0")
    with pytest.raises(BundleError, match="TensorRT 10.3.0; this is Fake GPU with TensorRT 10.9.0"):
        TensorRTEncoder(bundle, artifact, manifest.encoder)


def test_without_tensorrt_build_engine_says_what_is_missing(bundle, monkeypatch, capsys):
    from edgevlm.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as on a machine without TensorRT
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        trt_export.require_tensorrt()
    assert main(["build-engine", str(bundle), "--precision", "fp16"]) == 2
    assert "TensorRT is not installed" in capsys.readouterr().err


def _engine_encoder(bundle, max_tiles: int):
    from edgevlm.runtimes.tensorrt_encoder import TensorRTEncoder

    trt_export.build_engine(bundle, "fp16", max_tiles=max_tiles, log=lambda m: None)
    manifest = Manifest.load(bundle)
    sys.modules["tensorrt"].Engine.output_tail = tuple(manifest.encoder.output_shape[1:])
    return TensorRTEncoder(bundle, manifest.find("engine", "tensorrt:fp16"), manifest.encoder), manifest


def test_the_encoder_copies_runs_and_copies_back_on_one_stream_then_waits(fake_gpu, bundle):
    """Each chunk of at most max_tiles: input copy, engine, output copy, all on the encoder's own stream (never the
    default stream 0), then the host waits on that stream before it reads the output."""
    encoder, manifest = _engine_encoder(bundle, max_tiles=3)
    tokens, width = manifest.encoder.output_shape[1:]
    tile = int(np.prod(manifest.encoder.input_shape[1:]))
    log = fake_gpu.calls["cuda"]
    (_, stream), = [c for c in log if c[0] == "stream"]
    assert stream != 0 and log[-2:] == [("malloc", 3 * tile * 4), ("malloc", 3 * tokens * width * 4)]
    setup = len(log)
    pixels = np.random.default_rng(0).normal(size=(7, *manifest.encoder.input_shape[1:])).astype(np.float32)
    out = encoder.encode(pixels)
    assert out.shape == (7, tokens, width) and out.dtype == np.float32
    expected = np.broadcast_to(pixels.reshape(7, -1).sum(axis=1)[:, None, None], out.shape)
    assert np.allclose(out, expected, rtol=1e-5)  # the bytes went in, through the engine and back
    steps = []
    for n in (3, 3, 1):
        steps += [("copy", "HostToDevice", n * tile * 4, stream), ("execute", stream, n),
                  ("copy", "DeviceToHost", n * tokens * width * 4, stream), ("sync", stream)]
    assert log[setup:] == steps
    encoder.close()
    assert sorted(c[0] for c in log[len(log) - 3:]) == ["destroy", "free", "free"]
    assert sys.modules["cuda.bindings.runtime"].memory == {}  # every device buffer freed


def test_without_a_visible_gpu_tensorrt_is_unavailable(monkeypatch):
    from edgevlm.backends import require_tensorrt

    for name, module in fake_modules(devices=0).items():
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(BackendUnavailableError, match="needs a CUDA GPU; none is visible"):
        require_tensorrt()


TORCH_FREE_RUN = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import numpy as np
import fake_gpu
fake_gpu.install(fake_gpu.fake_modules())
from edgevlm.export.tensorrt import build_engine
from edgevlm.manifest import Manifest
from edgevlm.runtimes.bundle_loader import make_encoder
bundle = Path(sys.argv[1])
build_engine(bundle, "fp16", max_tiles=2, log=lambda m: None)
manifest = Manifest.load(bundle)
sys.modules["tensorrt"].Engine.output_tail = tuple(manifest.encoder.output_shape[1:])
encoder = make_encoder(bundle, manifest, "tensorrt:fp16")
out = encoder.encode(np.ones((3, *manifest.encoder.input_shape[1:]), np.float32))
print(out.shape, "torch" in sys.modules)
"""


def test_the_tensorrt_encoder_builds_and_runs_without_torch(bundle):
    import subprocess
    from pathlib import Path

    result = subprocess.run([sys.executable, "-c", TORCH_FREE_RUN, str(bundle), str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    shape = tuple(Manifest.load(bundle).encoder.output_shape[1:])
    assert result.stdout.split("\n")[-2] == f"{(3, *shape)} False"


@pytest.mark.gpu
def test_real_engine_builds_and_verifies(bundle):
    """On a machine with an NVIDIA GPU and TensorRT: build-engine, then verify the engine against PyTorch."""
    from edgevlm.verify import verify_bundle

    for precision in ("fp16", "int8"):
        trt_export.build_engine(bundle, precision, max_tiles=4, log=lambda m: None)
    rows = {r["artifact"]: r for r in verify_bundle(bundle, threads=1)}
    # random weights: fp16/int8 encoder gates are measured, not judged (docs/parity-ladder.md); the bounds stay
    assert rows["tensorrt:fp16"]["status"] == "unjudged" and rows["tensorrt:fp16"]["cosine"] >= 0.999
    assert rows["tensorrt:int8"]["status"] == "unjudged" and rows["tensorrt:int8"]["cosine"] >= 0.99
    pixels = np.random.default_rng(0).normal(size=(7, 3, 32, 32)).astype(np.float32)  # more tiles than the profile
    from edgevlm.runtimes.tensorrt_encoder import TensorRTEncoder

    manifest = Manifest.load(bundle)
    encoder = TensorRTEncoder(bundle, manifest.find("engine", "tensorrt:fp16"), manifest.encoder)
    assert encoder.encode(pixels).shape[0] == 7
