"""An int8 encoder quantized from an fp32 graph over protobuf's 2 GB limit (idefics2-8b's tower): ONNX Runtime's
static quantizer saves an augmented copy of the graph while calibrating, which fails ("Failed to serialize proto")
unless it goes to external data, and its output then carries a data file it names at random. Exercised on a tiny
graph by lowering the size threshold (our constant, not a runtime): the shipped int8 graph must name its data
`int8.onnx.data`, leave no other file behind, and compute what the same quantization gives in one file."""
from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort

from edgevlm.export import onnx_int8
from edgevlm.manifest import Manifest
from edgevlm.verify import cosine


def _outputs(graph, pixels):
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: pixels})[0]


def test_static_int8_of_a_graph_past_the_threshold_ships_one_data_file(bundles, tmp_path, monkeypatch):
    bundle = bundles["llava-clip"]
    manifest = Manifest.load(bundle)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fp32 = scratch / "fp32.onnx"
    shutil.copy(bundle / "encoder" / "fp32.onnx", fp32)
    # only the static method, as when the dynamic one misses the preferred cosine (idefics2-8b: 0.9939 < 0.995)
    monkeypatch.setattr(onnx_int8, "INT8_METHODS", {"static_qdq": onnx_int8.INT8_METHODS["static_qdq"]})
    one_file = tmp_path / "one" / "int8.onnx"
    one_file.parent.mkdir()
    onnx_int8.quantize_int8(fp32, one_file, manifest, log=lambda *_: None)
    assert sorted(p.name for p in one_file.parent.iterdir()) == ["int8.onnx"]

    monkeypatch.setattr(onnx_int8, "EXTERNAL_DATA_BYTES", 0)  # every graph is "over 2 GB"
    external = tmp_path / "external" / "int8.onnx"
    external.parent.mkdir()
    details = onnx_int8.quantize_int8(fp32, external, manifest, log=lambda *_: None)
    assert details["quantization"] == "static_qdq"
    assert sorted(p.name for p in external.parent.iterdir()) == ["int8.onnx", "int8.onnx.data"]
    assert onnx_int8._external_files(external) == {external.parent / "int8.onnx.data"}
    assert sorted(p.name for p in scratch.iterdir()) == ["fp32.onnx"]  # no calibration or candidate leftovers
    pixels = np.random.default_rng(0).normal(size=(3, *manifest.encoder.input_shape[1:])).astype(np.float32)
    assert cosine(_outputs(external, pixels), _outputs(one_file, pixels)) >= 0.9999
