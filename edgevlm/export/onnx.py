"""Encoder + projector -> ONNX: fp32 (torch.onnx dynamo exporter, one dynamic axis `tiles`), fp16 (fp32 IO kept),
int8 (onnxruntime dynamic quantization). Each also gets an ORT-optimized CPU graph saved offline."""
from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import ExportError
from ..manifest import Artifact
from .bundle import BundleWriter

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with room for the graph itself
CALIBRATION_TILES = 16  # reference-scene tiles for static QDQ calibration and for choosing the int8 method


def _quiet_exporter() -> None:
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torch.onnx")
    warnings.filterwarnings("ignore", category=FutureWarning)  # pytree deprecations inside torch.export


def export_graph(vision, encoder_spec, path: Path) -> Path:
    """Export a module with the encoder signature (fp32 in, fp32 out); its compute dtype is the module's."""
    import onnx

    _quiet_exporter()
    _, channels, height, width = encoder_spec.input_shape
    dummy = torch.zeros(min(2, encoder_spec.max_tiles), channels, height, width)
    n_bytes = sum(p.numel() * p.element_size() for p in vision.parameters())
    tiles = torch.export.Dim("tiles", min=1, max=max(2, encoder_spec.max_tiles))
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            vision, (dummy,), str(path), dynamo=True, input_names=[encoder_spec.input_name],
            output_names=[encoder_spec.output_name], dynamic_shapes=({0: tiles},),
            external_data=n_bytes > EXTERNAL_DATA_BYTES, verbose=False,
        )
    onnx.checker.check_model(str(path), full_check=False)
    return path


class HalfPrecision(torch.nn.Module):
    """fp16 weights and compute behind the fp32 signature callers use."""

    def __init__(self, vision):
        super().__init__()
        import copy

        self.inner = copy.deepcopy(vision).half()  # never mutate the caller's module

    def forward(self, pixel_values):
        return self.inner(pixel_values.half()).float()


def _quiet_root_logger():
    # ORT's quantizer logs a pre-processing hint on the root logger; the graph is ORT-optimized at load anyway
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    return lambda: root.setLevel(level)


# Weights are stored as uint8 (with a zero point), so every product is u8 x u8. ONNX Runtime's x86 kernels for u8 x s8
# without VNNI (AVX2, AVX-512 before Cascade Lake) add pairs of products in saturating int16 (vpmaddubsw): on such a CPU
# the same s8 graph gave cosine 0.983 where a VNNI CPU gave 0.9999. u8 x u8 widens to int16 first and accumulates
# exactly on every path, so the int8 graph gives the same numbers on every x86 CPU (and on ARM) and the accuracy
# measured at export holds on the device.
WEIGHT_TYPE = "uint8"


def quantize_dynamic_int8(fp32_path: Path, path: Path, _calibration=None) -> Path:
    """MatMul/Gemm weights to uint8 with per-channel scales; activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    restore = _quiet_root_logger()
    try:
        quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QUInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        restore()
    return path


def quantize_static_qdq_int8(fp32_path: Path, path: Path, calibration) -> Path:
    """QDQ int8 with activation ranges calibrated on reference-scene tiles (same preprocessing as at run time)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    restore = _quiet_root_logger()
    try:
        quantize_static(str(fp32_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
                        op_types_to_quantize=["MatMul", "Gemm", "Conv"])
    finally:
        restore()
    return path


INT8_METHODS = {"dynamic": quantize_dynamic_int8, "static_qdq": quantize_static_qdq_int8}


def calibration_tiles(manifest, n: int = CALIBRATION_TILES, seed: int = 3_000_000_000):
    """The int8 calibration set (ONNX static QDQ and TensorRT): reference-scene tiles, (n, 3, H, W) float32."""
    from .. import scenes

    return scenes.scene_tiles(manifest.preprocess, n, seed)


def run_per_tile(session, inputs) -> tuple:
    """One tile per run (after a warm-up): the outputs, concatenated, and the ms of each run."""
    import time

    import numpy as np

    name = session.get_inputs()[0].name
    session.run(None, {name: inputs[:1]})
    times, outputs = [], []
    for i in range(len(inputs)):
        start = time.perf_counter()
        outputs.append(session.run(None, {name: inputs[i : i + 1]})[0])
        times.append((time.perf_counter() - start) * 1e3)
    return np.concatenate(outputs), times


def measure(graph: Path, inputs, reference) -> dict:
    """Median ms per tile and cosine to the fp32 graph's outputs."""
    import statistics

    import onnxruntime as ort

    from ..metrics import cosine

    outputs, times = run_per_tile(ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]), inputs)
    return {"ms_per_tile": statistics.median(times), "cosine": cosine(outputs, reference)}


# Static QDQ must beat dynamic by this much cosine on the held-out tiles to be chosen. The choice depends only on
# accuracy (timings are kept as information), so the same checkpoint always gives the same bundle.
STATIC_MIN_GAIN = 1e-3
INT8_MIN_COSINE = 0.99  # DESIGN ladder


def quantize_int8(fp32_path: Path, path: Path, manifest, log=print) -> dict:
    """Both int8 methods, judged on held-out tiles (fresh scenes plus Gaussian noise, since users' images are not our
    scenes and static ranges clip what calibration never saw). Dynamic is kept unless static QDQ is clearly more
    accurate; an int8 graph below the ladder's cosine on the held-out tiles is refused rather than shipped."""
    import numpy as np
    import onnxruntime as ort

    calibration = calibration_tiles(manifest)
    fresh = calibration_tiles(manifest, 8, seed=3_500_000_000)
    noise = np.random.default_rng(0).normal(size=(4, *fresh.shape[1:])).astype(np.float32)
    held_out = np.concatenate([fresh, noise])
    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    name = fp32.get_inputs()[0].name
    reference, _ = run_per_tile(fp32, held_out)
    candidates = {}
    for method, quantize in INT8_METHODS.items():
        candidate = path.with_name(f".{method}.{path.name}")
        quantize(fp32_path, candidate, [{name: calibration[i : i + 1]} for i in range(len(calibration))])
        candidates[method] = {**measure(candidate, held_out, reference), "graph": candidate}
        log(f"  int8 {method}: cosine {candidates[method]['cosine']:.4f} on held-out tiles "
            f"({candidates[method]['ms_per_tile']:.1f} ms/tile here)")
    static, dynamic = candidates["static_qdq"], candidates["dynamic"]
    chosen = "static_qdq" if static["cosine"] >= dynamic["cosine"] + STATIC_MIN_GAIN else "dynamic"
    cosine_chosen = candidates[chosen]["cosine"]
    if cosine_chosen < INT8_MIN_COSINE:
        for c in candidates.values():
            c["graph"].unlink(missing_ok=True)
        raise ExportError(f"the int8 encoder reaches cosine {cosine_chosen:.4f} < {INT8_MIN_COSINE} against fp32 on "
                          "held-out tiles; this model does not quantize well to int8: export onnx:fp16 or onnx:fp32")
    candidates[chosen]["graph"].replace(path)
    for c in candidates.values():
        c.pop("graph").unlink(missing_ok=True)
    return {"quantization": chosen, "candidates": candidates, "rule": f"static_qdq only if cosine >= dynamic + {STATIC_MIN_GAIN}",
            "calibration": f"{len(calibration)} reference-scene tiles; judged on {len(held_out)} held-out tiles"}


def save_cpu_optimized(graph: Path, optimized: Path) -> Path:
    """ORT's offline-optimized graph for the CPU provider (CPU-specific fused ops: used only with CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return optimized


def export_encoder(ckpt, manifest, writer: BundleWriter, precision: str, log=print, **_) -> Artifact:
    folder = writer.root / "encoder"
    folder.mkdir(exist_ok=True)
    scratch = writer.root / ".work"
    scratch.mkdir(exist_ok=True)
    fp32 = scratch / "fp32.onnx"
    if not fp32.exists():
        log("  exporting the vision module to ONNX (fp32)")
        export_graph(ckpt.vision, manifest.encoder, fp32)
    graph = folder / f"{precision}.onnx"
    if precision == "fp32":
        shutil.copy(fp32, graph)
        for data in scratch.glob("fp32.onnx.data"):
            shutil.copy(data, folder / data.name)
        details = {}
    elif precision == "fp16":
        log("  exporting an fp16 graph (fp32 inputs and outputs)")
        export_graph(HalfPrecision(ckpt.vision).eval(), manifest.encoder, graph)
        details = {"io_dtype": "float32", "compute_dtype": "float16"}
    else:
        log("  quantizing to int8 (onnxruntime: dynamic and static QDQ, keeping the better)")
        details = {**quantize_int8(fp32, graph, manifest, log), "weight_type": WEIGHT_TYPE, "activation_type": "uint8",
                   "per_channel": True}
    optimized = folder / f"{precision}.ort-cpu.onnx"
    save_cpu_optimized(graph, optimized)
    extras = tuple(p.relative_to(writer.root).as_posix() for p in folder.glob(f"{precision}.*") if p != graph)
    artifact = writer.artifact(f"onnx:{precision}", "encoder", "onnx", precision, f"encoder/{precision}.onnx",
                               extra_files=extras, cpu_optimized=f"encoder/{precision}.ort-cpu.onnx", **details)
    return artifact


def finish(writer: BundleWriter) -> None:
    shutil.rmtree(writer.root / ".work", ignore_errors=True)
