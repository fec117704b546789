"""Encoder + projector -> ONNX: fp32 (torch.onnx dynamo exporter, one dynamic axis `tiles`), fp16 (fp32 IO kept),
int8 (onnxruntime dynamic quantization). Each also gets an ORT-optimized CPU graph saved offline."""
from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import torch

from ..manifest import Artifact
from .bundle import BundleWriter

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with room for the graph itself
INT8_METHOD = "dynamic"  # see README: dynamic int8 kept over static QDQ on CPU


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


def quantize_int8(fp32_path: Path, path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMul/Gemm weights to int8 with per-channel scales; activations quantized on the fly. (ORT logs a hint about
    # its pre-processing pass on the root logger; the graph it would fold is already ORT-optimized at load.)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
    return path


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
        log("  quantizing to int8 (onnxruntime dynamic quantization)")
        quantize_int8(fp32, graph)
        details = {"quantization": INT8_METHOD, "weight_type": "int8", "per_channel": True}
    optimized = folder / f"{precision}.ort-cpu.onnx"
    save_cpu_optimized(graph, optimized)
    extras = tuple(p.relative_to(writer.root).as_posix() for p in folder.glob(f"{precision}.*") if p != graph)
    artifact = writer.artifact(f"onnx:{precision}", "encoder", "onnx", precision, f"encoder/{precision}.onnx",
                               extra_files=extras, cpu_optimized=f"encoder/{precision}.ort-cpu.onnx", **details)
    return artifact


def finish(writer: BundleWriter) -> None:
    shutil.rmtree(writer.root / ".work", ignore_errors=True)
