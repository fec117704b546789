"""Static int8 calibration holds one attention layer's scores at a time. ONNX Runtime's MinMax calibrator puts a
ReduceMin/ReduceMax pair on every tensor into or out of a MatMul, and its session's default execution order runs
those pairs late: every layer's (heads, T, T) scores stayed alive at once, and idefics2-8b's 27-layer tower at
980x980 (1.5 GB of scores a layer) was killed at 24 GiB. Measured here on synthetic attention stacks of 2 and 16
layers (a layer's scores and softmax: 2 x 9.4 MB), each quantized in a fresh process (ru_maxrss is a high-water
mark): the peak must not grow with depth. The ranges, and so the int8 graph, must equal what ONNX Runtime's own
quantize_static computes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgevlm.export import onnx_int8

TOKENS, WIDTH = 1536, 16
SCORES_MB = TOKENS * TOKENS * 4 / 2**20  # one layer's (1, T, T) float32 scores; its softmax is as large


def attention_stack(path, layers: int = 4):
    """x (1, T, D) -> layers x [x + softmax(x Wq (x Wk)^T) x Wv]: single-head attention, nothing else."""
    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(layers):
        for name in ("q", "k", "v"):
            weights.append(numpy_helper.from_array(rng.normal(0, WIDTH ** -0.5, (WIDTH, WIDTH)).astype(np.float32),
                                                   f"w{name}{i}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{name}{i}"], [f"{name}{i}"], name=f"{name}_proj{i}"))
        nodes += [helper.make_node("Transpose", [f"k{i}"], [f"kt{i}"], perm=[0, 2, 1], name=f"kt{i}"),
                  helper.make_node("MatMul", [f"q{i}", f"kt{i}"], [f"s{i}"], name=f"scores{i}"),
                  helper.make_node("Softmax", [f"s{i}"], [f"p{i}"], axis=-1, name=f"softmax{i}"),
                  helper.make_node("MatMul", [f"p{i}", f"v{i}"], [f"o{i}"], name=f"mix{i}"),
                  helper.make_node("Add", [x, f"o{i}"], [f"x{i}"], name=f"residual{i}")]
        x = f"x{i}"
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, TOKENS, WIDTH])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)  # what ORT 1.31 reads
    onnx.save(onnx.shape_inference.infer_shapes(model), path)
    return path


def feeds(n: int):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(1, TOKENS, WIDTH)).astype(np.float32)} for _ in range(n)]


PEAK_SCRIPT = """
import json, resource, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[3])
from test_int8_calibration_memory import feeds
from edgevlm.export import onnx_int8
calibration = feeds(2)
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 1024  # resident now, KiB
onnx_int8.quantize_static_qdq_int8(Path(sys.argv[1]), Path(sys.argv[2]), calibration)
print(json.dumps({"peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def peak_growth_mb(tmp_path, layers: int) -> float:
    """How far quantizing a `layers`-deep stack raises a fresh process's peak RSS above its resident size before."""
    graph = attention_stack(tmp_path / f"fp32-{layers}.onnx", layers)
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(graph), str(tmp_path / f"int8-{layers}.onnx"),
                          str(Path(__file__).parent)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mb"]


def test_calibration_memory_does_not_grow_with_depth(tmp_path):
    shallow, deep = peak_growth_mb(tmp_path, 2), peak_growth_mb(tmp_path, 16)
    # every layer's scores and softmax alive at once: 14 more layers x 2 x 9.4 MB = 263 MB more for the deep stack
    # (before the fix: 2 layers +210 MB, 16 layers +653 MB); one layer's at a time: the same peak (210 and 210)
    assert deep - shallow < 6 * SCORES_MB, f"2 layers raised the peak by {shallow:.0f} MB, 16 by {deep:.0f} MB"


def test_the_int8_graph_equals_onnx_runtimes_own_static_quantization(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    graph = attention_stack(tmp_path / "fp32.onnx")
    calibration = feeds(2)
    ours = onnx_int8.quantize_static_qdq_int8(graph, tmp_path / "ours.onnx", calibration)

    class Reader(CalibrationDataReader):
        items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    theirs = tmp_path / "theirs.onnx"
    quantize_static(str(graph), str(theirs), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, op_types_to_quantize=onnx_int8.STATIC_OP_TYPES,
                    weight_type=QuantType.QInt8, reduce_range=True)
    x = feeds(3)[2]
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)[0]  # noqa: E731
    assert np.array_equal(run(ours), run(theirs))
    assert not (tmp_path / "ours.onnx.ranges.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32.onnx", "ours.onnx", "theirs.onnx"]
