"""Time to first token from compute: encode (the vision tower's FLOPs per tile x tiles) + prefill (2 x the decoder
blocks' parameters x prompt positions), each over the device's compute x an efficiency factor. Estimates, labelled
so: attention over the prompt (under 5% of prefill at these sizes) and the output head (one position) are left out.

Compute: the device table's dense FP16 figure (GPUs; `compute.fp16_tflops`), or for `this-machine` a float32
matmul probe (MATMUL_PROBE_N, best of MATMUL_PROBE_REPEATS, 0.1-0.4 s), which the CPU efficiency factors are
relative to."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

MATMUL_PROBE_N = 1024
MATMUL_PROBE_REPEATS = 10  # best of 10: ~0.1 s idle, ~0.4 s when other processes share the cores

# Efficiency against a published dense FP16 peak (GPU targets, encode and prefill alike): 0.4, the middle of the
# 0.3-0.5 the notes give for TTFT (serve-plan-scale.md 2.4, marked unverified there); not measured on any device here.
EFFICIENCY_PEAK = 0.4
# Efficiency against this machine's float32 matmul probe (numpy/OpenBLAS, 1024^3), measured on the AMD EPYC VM
# (2 cores, 2026-12-01; probe 196-211 GFLOP/s when idle): the W1 bench's encode of a SigLIP-B/16 512x512 tile (216.6
# GFLOP by vision_flops_per_tile) took 1,144 ms on onnx:fp32 (189 GFLOP/s -> 0.95) and 535 ms on onnx:int8 (405
# GFLOP/s -> 2.0: VNNI int8 beats the float32 probe); W1-split's llama.cpp q8_0 prefill of 1,158 positions through
# SmolLM2-135M's blocks (106.2 M parameters, 246 GFLOP) took 3,020 ms (81 GFLOP/s -> 0.40; q4_k_m prefilled W1 at the
# same rate). fp16 ONNX on a CPU: not measured, fp32's factor. The probe is noisy where other processes share the
# cores (67-135 GFLOP/s seen here under load): it then predicts the slower TTFT such a machine gives.
EFFICIENCY_MEASURED_ENCODE = {"fp32": 0.95, "fp16": 0.95, "int8": 2.0}
EFFICIENCY_MEASURED_PREFILL = 0.40


def measure_matmul_gflops(n: int = MATMUL_PROBE_N, repeats: int = MATMUL_PROBE_REPEATS) -> float:
    """float32 n x n matmul GFLOP/s, best of `repeats` after one warm-up (thread pool start, page faults)."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def vision_flops_per_tile(vision) -> int:
    """2 x positions x tower parameters (every weight once per position) + the attention's QK^T and AV
    (4 x layers x positions^2 x width) + 2 x output rows x projector parameters (a plan.model.VisionShape)."""
    tower = vision.params - vision.projector_params
    return (2 * vision.sequence * tower + 4 * vision.layers * vision.sequence**2 * vision.width
            + 2 * vision.tokens_out * vision.projector_params)


def prefill_flops(decoder_params: int, positions: int) -> int:
    return 2 * decoder_params * positions


@dataclass(frozen=True)
class Compute:
    """What TTFT is computed against: FLOP/s and the two efficiencies, with where they come from."""

    flops: float
    encode_efficiency: dict  # encoder precision -> factor
    prefill_efficiency: float
    basis: str

    def to_dict(self) -> dict:
        return asdict(self)


def device_compute(device) -> Compute | None:
    """The measured probe for this-machine, the published FP16 peak elsewhere; None where the table has neither
    (a CPU-only board: run `edgevlm plan ... --device this-machine` on it)."""
    measured = device.compute.get("matmul_gflops")
    if device.bandwidth_measured and measured:
        return Compute(measured * 1e9, dict(EFFICIENCY_MEASURED_ENCODE), EFFICIENCY_MEASURED_PREFILL,
                       f"measured: float32 matmul probe {measured:.0f} GFLOP/s x efficiency (encode fp32 0.95, "
                       "int8 2.0; prefill 0.40; calibrated on an AMD EPYC VM's bench)")
    peak = device.compute.get("fp16_tflops")
    if peak:
        factors = {p: EFFICIENCY_PEAK for p in EFFICIENCY_MEASURED_ENCODE}
        return Compute(peak * 1e12, factors, EFFICIENCY_PEAK,
                       f"estimate: published dense FP16 {peak} TFLOPS x {EFFICIENCY_PEAK} (unverified factor)")
    return None


def ttft(compute: Compute | None, encode_flops: int | None, tiles: int, prefill: int, encoder_precision: str) -> dict:
    """{"encode_s", "prefill_s", "ttft_s", "basis"}; None for what cannot be computed (no compute figure, or no vision
    shapes: a bundle whose source checkpoint is gone)."""
    if compute is None:
        return {"encode_s": None, "prefill_s": None, "ttft_s": None,
                "basis": "no compute figure for this device (plan with --device this-machine on it)"}
    prefill_s = prefill / (compute.flops * compute.prefill_efficiency)
    if encode_flops is None:
        return {"encode_s": None, "prefill_s": prefill_s, "ttft_s": None,
                "basis": compute.basis + "; encode unknown: the vision tower's shapes are not known (a bundle has "
                         "them only through its source checkpoint, manifest source.path): TTFT is the prefill only"}
    encode_s = encode_flops * tiles / (compute.flops * compute.encode_efficiency.get(encoder_precision,
                                                                                      compute.prefill_efficiency))
    return {"encode_s": encode_s, "prefill_s": prefill_s, "ttft_s": encode_s + prefill_s, "basis": compute.basis}
