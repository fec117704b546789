"""Parity metrics and the one table of pass/fail thresholds (DESIGN.md's parity ladder) that `edgevlm verify`, the
exporter and the tests share. A leaf module: numpy only. docs/parity-ladder.md documents the same table."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude ("relative to peak"): elementwise
    ratios explode where the reference is ~0."""
    return float(np.abs(ours.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def cosine(ours: np.ndarray, ref: np.ndarray) -> float:
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def nmse(ours: np.ndarray, ref: np.ndarray) -> float:
    """Squared error of the logits relative to their energy, over every position and vocabulary entry."""
    ref = ref.astype(np.float64)
    return float(((ours.astype(np.float64) - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))


def top1_agreement(ours: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of positions (rows of (positions, vocab) logits) where both pick the same next token."""
    return float(np.mean(np.argmax(ours, axis=-1) == np.argmax(ref, axis=-1)))


@dataclass(frozen=True)
class EncoderGate:
    metric: str  # "max_rel_err" (at most) or "cosine" (at least)
    threshold: float

    def __post_init__(self) -> None:
        if self.metric not in ("max_rel_err", "cosine"):
            raise ValueError(f"unknown encoder metric {self.metric!r}")

    def passes(self, values: dict) -> bool:
        value = values[self.metric]
        return value <= self.threshold if self.metric == "max_rel_err" else value >= self.threshold

    @property
    def criterion(self) -> str:
        return f"{self.metric} {'<=' if self.metric == 'max_rel_err' else '>='} {self.threshold:g}"


@dataclass(frozen=True)
class DecoderGate:
    """Teacher-forced on the PyTorch reference's greedy tokens over verify's fixed probe set."""

    max_nmse: float
    min_agreement: float  # top-1 agreement with the reference; 1.0 = greedy tokens identical

    def __post_init__(self) -> None:
        if not (self.max_nmse > 0 and 0 <= self.min_agreement <= 1):
            raise ValueError(f"bad decoder gate {self}")

    def passes(self, values: dict) -> bool:
        return values["nmse"] <= self.max_nmse and values["greedy_agreement"] >= self.min_agreement

    @property
    def criterion(self) -> str:
        tokens = "tokens identical" if self.min_agreement == 1.0 else f"agreement >= {self.min_agreement:g}"
        return f"nmse <= {self.max_nmse:g}, {tokens}"


# encoder precision -> gate (ONNX graphs and TensorRT engines alike)
ENCODER_GATES = {
    "fp32": EncoderGate("max_rel_err", 1e-4),
    "fp16": EncoderGate("cosine", 0.999),
    "int8": EncoderGate("cosine", 0.99),
}

# llama.cpp's mmproj run by libmtmd, per tile (the worst tile counts). ggml-cpu computes GELU through an fp16 table,
# so even an F32 file is not 1e-4 close: measured 1.000000 (max abs 2.2e-4) for F32 and F16, 0.99990 for Q8_0 on the
# tiny test models.
MMPROJ_GATES = {
    "f32": EncoderGate("cosine", 0.999),
    "f16": EncoderGate("cosine", 0.999),
    "q8_0": EncoderGate("cosine", 0.99),
}

DECODER_NMSE = 1e-5  # exact decoders: F32/F16 GGUF and fp32 MLX

# decoder artifact name -> gate. Exact decoders run in parity mode (f32 KV, no flash attention) and must give the
# reference's greedy tokens; quantized ones run as users run them. Measured (docs/parity-ladder.md): correct exports of
# the trained reference model reach nmse 2e-5 (8-bit) to 2.4e-3 (MLX 4-bit) with every token agreeing; the tiny
# random-weight test models, whose 64-wide rows and marginless logits are the worst case, 1.6e-4 (8-bit) to 3.4e-2
# (MLX 4-bit, agreement 0.63). Damaged exports of the reference model: a GGUF without the Q/K RoPE permutation
# nmse 0.08, two layers' attn_q swapped nmse 1.46. On random weights damage hides in quantization noise: verify
# trained checkpoints.
DECODER_GATES = {
    "gguf:f32": DecoderGate(DECODER_NMSE, 1.0),
    "gguf:f16": DecoderGate(DECODER_NMSE, 1.0),
    "mlx:fp32": DecoderGate(DECODER_NMSE, 1.0),
    "mlx:fp16": DecoderGate(DECODER_NMSE, 0.95),  # no parity mode in MLX: near-ties of random weights may flip
    "gguf:q8_0": DecoderGate(2e-3, 0.9),
    "mlx:8bit": DecoderGate(2e-3, 0.9),
    "gguf:q6_k": DecoderGate(5e-3, 0.85),
    "gguf:q5_k_m": DecoderGate(1e-2, 0.75),
    "gguf:q4_k_m": DecoderGate(5e-2, 0.5),
    "gguf:q4_0": DecoderGate(5e-2, 0.5),
    "mlx:4bit": DecoderGate(5e-2, 0.5),
}
EXACT_DECODERS = tuple(name for name, gate in DECODER_GATES.items() if gate.min_agreement == 1.0)
