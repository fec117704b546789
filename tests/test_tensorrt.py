"""The TensorRT path as far as it runs without a GPU: a fake `tensorrt` module records what build-engine asks of the
TensorRT 10 API (profile shapes, flags, which ONNX graph is parsed) and returns a fake plan; the bundle bookkeeping,
the explicit-quantization QDQ graph and the engine/GPU checks are real. The `gpu` test builds a real engine."""
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


def fake_tensorrt(version: str = "10.3.0") -> types.ModuleType:
    calls: dict = {"flags": [], "profiles": [], "parsed": [], "qdq_ops": set(), "calibrator": None}

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class Profile:
        def set_shape(self, name, min_shape, opt_shape, max_shape):
            calls["profiles"].append((name, min_shape, opt_shape, max_shape))

    class Cache:
        def serialize(self):
            return b"timing-cache"

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls["workspace"] = size

        def add_optimization_profile(self, profile):
            calls["profile_added"] = True

        def set_flag(self, flag):
            calls["flags"].append(flag)

        def create_timing_cache(self, data):
            calls["timing_cache_in"] = bytes(data)
            return Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            calls["ignore_mismatch"] = ignore_mismatch

        def get_timing_cache(self):
            return Cache()

        def __setattr__(self, name, value):  # the deprecated implicit-INT8 calibrator must not be used
            if name == "int8_calibrator":
                calls["calibrator"] = value
            object.__setattr__(self, name, value)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"fake-plan:" + ",".join(sorted(calls["qdq_ops"])).encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls["parsed"].append(path)
            model = onnx.load(path)
            calls["qdq_ops"] = {n.op_type for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
            calls["qdq_int8"] = all(
                init.data_type == onnx.TensorProto.INT8 for init in model.graph.initializer if init.name.endswith("_zero_point"))
            return True

    module = types.ModuleType("tensorrt")
    module.__version__ = version
    module.calls = calls
    module.Logger, module.Builder, module.OnnxParser = Logger, Builder, OnnxParser
    module.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    module.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    return module


@pytest.fixture
def fake_gpu(monkeypatch):
    import torch

    module = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (8, 7))
    return module


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
    import torch

    from edgevlm.runtimes.tensorrt_encoder import TensorRTEncoder

    trt_export.build_engine(bundle, "fp16", max_tiles=2, log=lambda m: None)
    manifest = Manifest.load(bundle)
    artifact = manifest.find("engine", "tensorrt:fp16")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Other GPU")
    with pytest.raises(BundleError, match="built for Fake GPU with TensorRT 10.3.0; this is Other GPU.*build-engine"):
        TensorRTEncoder(bundle, artifact, manifest.encoder)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
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


@pytest.mark.gpu
def test_real_engine_builds_and_verifies(bundle):
    """On a machine with an NVIDIA GPU and TensorRT: build-engine, then verify the engine against PyTorch."""
    from edgevlm.verify import verify_bundle

    for precision in ("fp16", "int8"):
        trt_export.build_engine(bundle, precision, max_tiles=4, log=lambda m: None)
    rows = {r["artifact"]: r for r in verify_bundle(bundle, threads=1)}
    assert rows["tensorrt:fp16"]["status"] == "pass" and rows["tensorrt:fp16"]["cosine"] >= 0.999
    assert rows["tensorrt:int8"]["status"] == "pass" and rows["tensorrt:int8"]["cosine"] >= 0.99
    pixels = np.random.default_rng(0).normal(size=(7, 3, 32, 32)).astype(np.float32)  # more tiles than the profile
    from edgevlm.runtimes.tensorrt_encoder import TensorRTEncoder

    manifest = Manifest.load(bundle)
    encoder = TensorRTEncoder(bundle, manifest.find("engine", "tensorrt:fp16"), manifest.encoder)
    assert encoder.encode(pixels).shape[0] == 7
