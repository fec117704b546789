"""TensorRT engine for the encoder, built on the device from the bundle's ONNX (engines are specific to a GPU and a
TensorRT version, so they are never shipped). Written against the TensorRT 10 Python API; int8 is explicit
quantization from a QDQ graph; the runtime's device buffers and stream come from cuda-python, not torch. Not run on
hardware here (no GPU, and TensorRT cannot be installed): CI runs the pure-Python parts against fake `tensorrt` and
cuda-python modules (tests/fake_gpu.py, tests/test_tensorrt.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..backends import gpu_identity, require_tensorrt
from ..errors import BadInputError
from ..manifest import Artifact, FileEntry, Manifest, sha256_file

PRECISIONS = ("fp16", "int8")
WORKSPACE_BYTES = 2 << 30


def profile_shapes(spec, max_tiles: int | None, opt_tiles: int | None) -> tuple[int, int, int]:
    """(min, opt, max) tiles of the optimization profile; max is bounded by the ONNX graph's own tile bound."""
    max_tiles = spec.max_tiles if max_tiles is None else max_tiles  # 0 is an error, not "the default"
    if not 1 <= max_tiles <= spec.max_tiles:
        raise BadInputError(f"--max-tiles must be 1..{spec.max_tiles} (the ONNX graph's bound), got {max_tiles}")
    opt_tiles = min(max_tiles, 5) if opt_tiles is None else opt_tiles
    if not 1 <= opt_tiles <= max_tiles:
        raise BadInputError(f"--opt-tiles must be 1..{max_tiles} (--max-tiles), got {opt_tiles}")
    return 1, opt_tiles, max_tiles


def calibration_batches(manifest: Manifest, n_tiles: int = 64, batch: int = 8) -> list[np.ndarray]:
    """The same reference-scene tiles the ONNX int8 calibration uses, in batches of at most `batch` tiles."""
    from ..reference import scenes

    if batch < 1:
        raise BadInputError(f"calibration batch must be >= 1, got {batch}")
    stacked = scenes.scene_tiles(manifest.preprocess, n_tiles, scenes.CALIBRATION_SEED)
    return [stacked[i : i + batch] for i in range(0, n_tiles, batch)]


def write_qdq_graph(fp32_graph: Path, path: Path, batches: list[np.ndarray], input_name: str) -> Path:
    """Explicit quantization for TensorRT 10 (its implicit-INT8 calibrators are deprecated): a QDQ ONNX with
    symmetric signed int8 activations and per-channel weights, the form TensorRT accepts, calibrated by ONNX Runtime."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            batch = next(self.items, None)
            return None if batch is None else {input_name: batch}

    quantize_static(str(fp32_graph), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return path


def build_engine(bundle: Path, precision: str, max_tiles: int | None = None, opt_tiles: int | None = None, log=print) -> Path:
    if precision not in PRECISIONS:
        raise BadInputError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    trt = require_tensorrt()
    import tempfile

    manifest = Manifest.load(bundle)
    source = manifest.find("encoder", "onnx:fp32")
    source.verify(bundle)
    spec = manifest.encoder
    if spec.kind != "tiles":
        raise BadInputError("build-engine builds fixed-size tile encoders only; this bundle's native-resolution (grid) "
                            "encoder runs on ONNX Runtime (onnx:fp32, onnx:int8)")
    min_tiles, opt_tiles, max_tiles = profile_shapes(spec, max_tiles, opt_tiles)
    engine_dir = bundle / "encoder"
    with tempfile.TemporaryDirectory(dir=bundle, prefix=".build-engine-") as scratch:
        graph = bundle / source.path
        if precision == "int8":
            log("calibrating a QDQ int8 graph for TensorRT (explicit quantization)")
            graph = write_qdq_graph(graph, Path(scratch) / "int8-qdq.onnx",
                                    calibration_batches(manifest, batch=max_tiles), spec.input_name)
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(graph)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {graph.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        shape = tuple(spec.input_shape[1:])
        profile = builder.create_optimization_profile()
        profile.set_shape(spec.input_name, (min_tiles, *shape), (opt_tiles, *shape), (max_tiles, *shape))
        config.add_optimization_profile(profile)
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # the Q/DQ nodes carry the scales: no calibrator
        timing_file = engine_dir / "timing.cache"
        cache = config.create_timing_cache(timing_file.read_bytes() if timing_file.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        log(f"building the TensorRT {precision} engine (tiles {min_tiles}/{opt_tiles}/{max_tiles}); this takes minutes")
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError("TensorRT failed to build the engine (see the log above)")
    plan_path = engine_dir / f"{precision}.plan"
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(plan))
    os.replace(tmp, plan_path)
    tmp_cache = timing_file.with_suffix(".cache.tmp")
    tmp_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp_cache, timing_file)
    entry = FileEntry(plan_path.relative_to(bundle).as_posix(), sha256_file(plan_path), plan_path.stat().st_size)
    artifact = Artifact(f"tensorrt:{precision}", "engine", "tensorrt", precision, entry.path, [entry], {
        "tensorrt_version": trt.__version__, **gpu_identity(),
        "tiles": {"min": min_tiles, "opt": opt_tiles, "max": max_tiles}, "source": source.name,
        "quantization": "explicit (QDQ, symmetric int8, calibrated by ONNX Runtime)" if precision == "int8" else None,
    })
    manifest.artifacts = [a for a in manifest.artifacts if a.name != artifact.name] + [artifact]
    tmp_manifest = bundle / "manifest.json.tmp"
    tmp_manifest.write_text(manifest.to_json())
    os.replace(tmp_manifest, bundle / "manifest.json")
    return plan_path
