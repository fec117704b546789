"""The int8 encoder gives the same numbers on ONNX Runtime's x86 int8 paths: the VNNI / AVX-512 kernels this machine
may have, and the AVX2 kernels without VNNI (whose u8 x s8 products saturate), reached by running ONNX Runtime under
`qemu-x86_64 -cpu Haswell`, which reports a CPU without AVX-512 or VNNI to MLAS's CPUID dispatch."""
from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgevlm.families import load_checkpoint
from edgevlm.manifest import Manifest
from edgevlm.verify import cosine

RUN_GRAPHS = """
import sys, numpy as np, onnxruntime as ort
pixels = np.load(sys.argv[1])
for graph, out in zip(sys.argv[2::2], sys.argv[3::2]):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    np.save(out, session.run(None, {session.get_inputs()[0].name: pixels})[0])
"""


def _run(graphs: list, pixels: np.ndarray, folder, emulate_haswell: bool) -> list[np.ndarray]:
    script, inputs = folder / "run_graphs.py", folder / "pixels.npy"
    script.write_text(RUN_GRAPHS)
    np.save(inputs, pixels)
    tag = "haswell" if emulate_haswell else "native"
    outs = [folder / f"{i}-{tag}.npy" for i in range(len(graphs))]
    command = [sys.executable, str(script), str(inputs)] + [str(x) for pair in zip(graphs, outs) for x in pair]
    if emulate_haswell:
        command = ["qemu-x86_64", "-cpu", "Haswell"] + command
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return [np.load(o) for o in outs]


@pytest.fixture(scope="module")
def qemu():
    if platform.machine() != "x86_64":
        pytest.skip("ONNX Runtime's x86 int8 kernel paths exist only on x86-64")
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 is not installed (apt-get install qemu-user; scripts/setup-venv.sh does it as root)")


@pytest.mark.parametrize("family", ["llava-siglip", "llava-clip", "idefics3"])
def test_int8_encoder_gives_the_same_numbers_on_the_avx2_path(family, qemu, ckpts, bundles, tmp_path):
    from edgevlm.export.onnx_int8 import WEIGHT_TYPES, quantize_dynamic_int8

    bundle = bundles[family]
    artifact = Manifest.load(bundle).find("encoder", "onnx:int8")
    assert artifact.details["weight_type"] in WEIGHT_TYPES.values()
    # the shipped graph (the CPU provider runs its ORT-optimized copy) and both portable weight forms
    from edgevlm.runtimes.onnx_encoder import cpu_graph

    graphs = [bundle / artifact.path, cpu_graph(bundle, artifact)]
    for weight in WEIGHT_TYPES:
        graphs.append(quantize_dynamic_int8(bundle / "encoder" / "fp32.onnx", tmp_path / f"{weight}.onnx", weight=weight))
    pixels = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        ref = load_checkpoint(ckpts[family]).vision(torch.from_numpy(pixels)).numpy()
    native = _run(graphs, pixels, tmp_path, emulate_haswell=False)
    avx2 = _run(graphs, pixels, tmp_path, emulate_haswell=True)
    for ours, theirs in zip(native, avx2):
        assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(ours).max()  # exact integer accumulation on both paths
        assert cosine(theirs, ref) >= 0.99


def test_int8_method_rule_is_by_accuracy_and_deterministic():
    from edgevlm.export.onnx_int8 import choose_int8

    assert choose_int8({"dynamic": 0.999, "static_qdq": 0.9999, "dynamic_u8": 0.9999}) == "dynamic"  # fastest first
    assert choose_int8({"dynamic": 0.993, "static_qdq": 0.996, "dynamic_u8": 0.999}) == "static_qdq"
    assert choose_int8({"dynamic": 0.991, "static_qdq": 0.990, "dynamic_u8": 0.994}) == "dynamic_u8"  # most accurate
    assert choose_int8({"dynamic": 0.98, "static_qdq": 0.95, "dynamic_u8": 0.985}) is None  # refused


def test_the_emulation_reaches_the_saturating_kernel(qemu, bundles, tmp_path):
    """Control: the s8-weight graph the exporter used to write loses accuracy on the emulated AVX2 path (cosine 0.983
    on this model), so the test above really ran the non-VNNI kernels."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    bundle = bundles["llava-siglip"]
    s8 = tmp_path / "s8.onnx"
    quantize_dynamic(str(bundle / "encoder" / "fp32.onnx"), str(s8), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm"])
    pixels = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    fp32 = _run([bundle / "encoder" / "fp32.onnx"], pixels, tmp_path, emulate_haswell=False)[0]
    (s8_avx2,) = _run([s8], pixels, tmp_path, emulate_haswell=True)
    assert cosine(s8_avx2, fp32) < 0.99
