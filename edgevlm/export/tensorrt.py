"""TensorRT engine for the encoder, built on the device from the bundle's ONNX (engines are specific to a GPU and a
TensorRT version, so they are never shipped). Written against the TensorRT 10 Python API; device buffers come from
torch CUDA tensors. Not run in CI (no GPU there): see README for what was verified on hardware."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, BadInputError
from ..manifest import Artifact, FileEntry, Manifest, sha256_file

PRECISIONS = ("fp16", "int8")
WORKSPACE_BYTES = 2 << 30


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not installed ({exc}); it needs an NVIDIA GPU: on Jetson it comes with JetPack, elsewhere "
            "`pip install tensorrt` from NVIDIA's index"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT needs a CUDA GPU and a CUDA build of torch; none is available here")
    return trt


class ImageCalibrator:
    """int8 entropy calibration fed with reference-scene tiles, preprocessed exactly as at run time."""

    def __new__(cls, trt, batches: list[np.ndarray], cache_file: Path):
        import torch

        class _Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self):
                super().__init__()
                self.batches = iter(batches)
                self.batch_size = batches[0].shape[0]
                self.device = None

            def get_batch_size(self):
                return self.batch_size

            def get_batch(self, names):
                batch = next(self.batches, None)
                if batch is None:
                    return None
                self.device = torch.from_numpy(batch).cuda()
                return [int(self.device.data_ptr())]

            def read_calibration_cache(self):
                return cache_file.read_bytes() if cache_file.is_file() else None

            def write_calibration_cache(self, cache):
                cache_file.write_bytes(bytes(cache))

        return _Calibrator()


def calibration_batches(manifest: Manifest, n_tiles: int = 64, batch: int = 8) -> list[np.ndarray]:
    from .onnx import calibration_tiles  # the same reference-scene tiles the ONNX int8 calibration uses

    stacked = calibration_tiles(manifest, n_tiles)
    return [stacked[i : i + batch] for i in range(0, n_tiles, batch)]


def build_engine(bundle: Path, precision: str, max_tiles: int | None = None, opt_tiles: int | None = None, log=print) -> Path:
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    trt = require_tensorrt()
    import torch

    manifest = Manifest.load(bundle)
    source = manifest.find("encoder", "onnx:fp32")
    source.verify(bundle)
    spec = manifest.encoder
    max_tiles = max_tiles or spec.max_tiles
    if not 1 <= max_tiles <= spec.max_tiles:
        raise BadInputError(f"--max-tiles must be 1..{spec.max_tiles} (the ONNX graph's bound), got {max_tiles}")
    opt_tiles = opt_tiles or min(max_tiles, 5)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(bundle / source.path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {source.path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    shape = tuple(spec.input_shape[1:])
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.input_name, (1, *shape), (opt_tiles, *shape), (max_tiles, *shape))
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.FP16)
    engine_dir = bundle / "encoder"
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = ImageCalibrator(trt, calibration_batches(manifest), engine_dir / "int8.calib")
        config.set_calibration_profile(profile)
    timing_file = engine_dir / "timing.cache"
    cache = config.create_timing_cache(timing_file.read_bytes() if timing_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    log(f"building the TensorRT {precision} engine (tiles {1}/{opt_tiles}/{max_tiles}); this takes minutes")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    plan_path = engine_dir / f"{precision}.plan"
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(plan))
    os.replace(tmp, plan_path)
    timing_file.write_bytes(bytes(config.get_timing_cache().serialize()))
    entry = FileEntry(plan_path.relative_to(bundle).as_posix(), sha256_file(plan_path), plan_path.stat().st_size)
    artifact = Artifact(f"tensorrt:{precision}", "engine", "tensorrt", precision, entry.path, [entry], {
        "tensorrt_version": trt.__version__, "gpu": torch.cuda.get_device_name(0),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "tiles": {"min": 1, "opt": opt_tiles, "max": max_tiles}, "source": source.name,
    })
    manifest.artifacts = [a for a in manifest.artifacts if a.name != artifact.name] + [artifact]
    tmp_manifest = bundle / "manifest.json.tmp"
    tmp_manifest.write_text(manifest.to_json())
    os.replace(tmp_manifest, bundle / "manifest.json")
    return plan_path
