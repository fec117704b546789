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


def norm_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """How far the output's scale is from the reference's: |norm(ours) / norm(ref) - 1|. Cosine cannot see a scale
    error (a projector off by 2% has cosine 1.0); this can."""
    return float(abs(np.linalg.norm(ours.astype(np.float64)) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30) - 1))


def worst_tile(ours: np.ndarray, ref: np.ndarray) -> dict:
    """Encoder metrics per tile (axis 0), each taken at its worst tile: one bad tile among good ones is not averaged
    away. Also says which tile was worst by cosine."""
    tiles = range(len(ref))
    cosines = [cosine(ours[i], ref[i]) for i in tiles]
    worst = int(np.argmin(cosines))
    return {"max_rel_err": max(max_rel_err(ours[i], ref[i]) for i in tiles), "cosine": cosines[worst],
            "norm_err": max(norm_err(ours[i], ref[i]) for i in tiles), "worst_tile": worst, "tiles": len(ref)}


# metric -> True when a smaller value is better (the gate is an upper bound), False for a lower bound
METRICS = {"max_rel_err": True, "norm_err": True, "nmse": True, "accuracy_drop": True,
           "cosine": False, "greedy_agreement": False}


@dataclass(frozen=True)
class Bound:
    """One check of a gate: a metric and its threshold."""

    metric: str
    threshold: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {', '.join(METRICS)}")

    def passes(self, value: float) -> bool:
        return value <= self.threshold if METRICS[self.metric] else value >= self.threshold

    @property
    def text(self) -> str:
        return f"{self.metric} {'<=' if METRICS[self.metric] else '>='} {self.threshold:g}"


class _Gate:
    """What every gate does with its bounds: pass/fail, a criterion line, and one record per check."""

    trained_only: bool

    @property
    def bounds(self) -> tuple[Bound, ...]:
        raise NotImplementedError

    def passes(self, values: dict) -> bool:
        return all(b.passes(values[b.metric]) for b in self.bounds)

    def checks(self, values: dict, judged: bool = True) -> list[dict]:
        """--json's records: measured value, gate, verdict ("not judged" where the gate does not apply here)."""
        return [{"metric": b.metric, "value": values[b.metric], "gate": b.text,
                 "verdict": ("pass" if b.passes(values[b.metric]) else "FAIL") if judged else "not judged"}
                for b in self.bounds]


@dataclass(frozen=True)
class EncoderGate(_Gate):
    """Judged at the worst probe tile. max_norm_err bounds the scale that cosine cannot see."""

    metric: str  # "max_rel_err" (at most) or "cosine" (at least)
    threshold: float
    max_norm_err: float | None = None
    trained_only: bool = False

    def __post_init__(self) -> None:
        if self.metric not in ("max_rel_err", "cosine"):
            raise ValueError(f"unknown encoder metric {self.metric!r}")

    @property
    def bounds(self) -> tuple[Bound, ...]:
        main = (Bound(self.metric, self.threshold),)
        return main if self.max_norm_err is None else main + (Bound("norm_err", self.max_norm_err),)

    @property
    def criterion(self) -> str:
        return ", ".join(b.text for b in self.bounds)


@dataclass(frozen=True)
class DecoderGate(_Gate):
    """Teacher-forced on the PyTorch reference's greedy tokens over verify's fixed probe set. trained_only: the gate
    was calibrated on the trained reference model; on random weights damage hides in quantization noise, so verify
    reports the numbers but does not judge them."""

    max_nmse: float
    min_agreement: float  # top-1 agreement with the reference; 1.0 = greedy tokens identical
    trained_only: bool = False

    def __post_init__(self) -> None:
        if not (self.max_nmse > 0 and 0 <= self.min_agreement <= 1):
            raise ValueError(f"bad decoder gate {self}")

    @property
    def bounds(self) -> tuple[Bound, ...]:
        return (Bound("nmse", self.max_nmse), Bound("greedy_agreement", self.min_agreement))

    @property
    def criterion(self) -> str:
        tokens = "tokens identical" if self.min_agreement == 1.0 else f"agreement >= {self.min_agreement:g}"
        return f"nmse <= {self.max_nmse:g}, {tokens}"


@dataclass(frozen=True)
class PairGate(_Gate):
    """An encoder x decoder pair end to end on held-out questions, teacher-forced on the PyTorch reference's answers;
    on the reference model also its task accuracy (the drop from the PyTorch reference's on the same questions)."""

    max_nmse: float
    min_agreement: float
    max_accuracy_drop: float | None = None
    trained_only: bool = False

    def __post_init__(self) -> None:
        if not (self.max_nmse > 0 and 0 <= self.min_agreement <= 1):
            raise ValueError(f"bad pair gate {self}")

    @property
    def bounds(self) -> tuple[Bound, ...]:
        pair = (Bound("nmse", self.max_nmse), Bound("greedy_agreement", self.min_agreement))
        return pair if self.max_accuracy_drop is None else pair + (Bound("accuracy_drop", self.max_accuracy_drop),)

    @property
    def criterion(self) -> str:
        return ", ".join(b.text for b in self.bounds)


# encoder precision -> gate (ONNX graphs and TensorRT engines alike), at the worst of the probe's 5 tiles
# (docs/parity-ladder.md: correct, damaged, gate, margin). fp32's bound judges any weights; fp16's and int8's are
# calibrated on the trained reference model: on random weights two swapped attention layers keep cosine 1.0 (attention
# barely moves a random tower's residual stream), so there they are measured, not judged. norm_err sees the scale
# errors cosine cannot (a projector 2% off). The int8 cosine floor is the exporter's preferred one
# (export/onnx_int8.py INT8_PREFERRED_COSINE): a graph of its 0.99 fallback does not pass verify.
ENCODER_GATES = {
    "fp32": EncoderGate("max_rel_err", 1e-4),
    "fp16": EncoderGate("cosine", 0.9999, max_norm_err=2e-3, trained_only=True),
    "int8": EncoderGate("cosine", 0.995, max_norm_err=1e-2, trained_only=True),
    # MLX's affine-quantized vision half (mlx-vlm's modules; fp32/fp16 MLX take the rows above). Reference model, worst
    # of 5 tiles: 8bit correct 1-cos 1.5e-5, norm 1.2e-3; layers 0,1 attention swapped 7.7e-3 / 0.081; projector x1.02
    # norm 0.019. 4bit correct 1-cos 2.6e-3 but norm 0.017: its own scale error hides a 2% projector one (x1.02 measured
    # 5.3e-3), so its norm bound only catches gross scale damage; the pair gate judges what 4 bits do to answers.
    "8bit": EncoderGate("cosine", 0.999, max_norm_err=5e-3, trained_only=True),
    "4bit": EncoderGate("cosine", 0.995, max_norm_err=3e-2, trained_only=True),
}

# llama.cpp's mmproj run by libmtmd, per tile (the worst tile counts). ggml-cpu computes GELU through an fp16 table,
# so even an F32 file is not 1e-4 close (measured 2.4e-4, F16 4.0e-4 on the tiny Idefics3). Calibrated on random
# weights only (the reference model's CLIP tower has no mmproj: llama.cpp issue 25814): there two swapped attention
# layers keep cosine 1.0 but move max_rel_err to 5.1e-3, which F32/F16's bound sees; Q8_0's own noise (1e-2) hides
# that swap, and its gate catches scale errors (norm) and gross damage (docs/parity-ladder.md).
MMPROJ_GATES = {
    "f32": EncoderGate("max_rel_err", 2e-3),
    "f16": EncoderGate("max_rel_err", 2e-3),
    "q8_0": EncoderGate("cosine", 0.999, max_norm_err=1e-2),
}

DECODER_NMSE = 1e-5  # exact decoders: F32/F16 GGUF and fp32 MLX

# decoder artifact name -> gate. Exact decoders run in parity mode (f32 KV, no flash attention) and must give the
# reference's greedy tokens on any weights; quantized ones run as users run them and are judged on trained weights
# only: on random weights damage hides in quantization noise. Each quantized bound sits between what the correct
# export of the reference model measures and what its damaged exports measure (Q/K unpermuted, two layers' attention
# swapped): docs/parity-ladder.md has the numbers and the margins (3.5x to 60x either side).
DECODER_GATES = {
    "gguf:f32": DecoderGate(DECODER_NMSE, 1.0),
    "gguf:f16": DecoderGate(DECODER_NMSE, 1.0),
    "mlx:fp32": DecoderGate(DECODER_NMSE, 1.0),
    "mlx:fp16": DecoderGate(DECODER_NMSE, 0.95),  # no parity mode in MLX: near-ties of random weights may flip
    "gguf:q8_0": DecoderGate(1e-3, 0.95, trained_only=True),
    "mlx:8bit": DecoderGate(1e-3, 0.95, trained_only=True),
    "gguf:q6_k": DecoderGate(2e-3, 0.95, trained_only=True),
    "gguf:q5_k_m": DecoderGate(5e-3, 0.95, trained_only=True),
    "gguf:q4_k_m": DecoderGate(5e-3, 0.95, trained_only=True),
    "gguf:q4_0": DecoderGate(1e-2, 0.95, trained_only=True),
    "mlx:4bit": DecoderGate(1e-2, 0.95, trained_only=True),
}
EXACT_DECODERS = tuple(name for name, gate in DECODER_GATES.items() if gate.min_agreement == 1.0)

# The pair gate (an encoder x decoder pair end to end, teacher-forced over the answers of held-out questions). A pair
# of exact artifacts (fp32 encoder, exact decoder) keeps the decoder's exact gate on any weights; any other pair is
# judged on trained weights by the bound below, which sits between what correct pairs of the reference model measure
# and what they measure with a damaged encoder (docs/parity-ladder.md), at least 95% of the answer tokens as the
# reference's, and on the reference model at most 5 points of task accuracy lost against the PyTorch reference.
PAIR_NMSE = {
    "gguf:f32": 1e-4, "gguf:f16": 1e-4, "mlx:fp32": 1e-4, "mlx:fp16": 1e-4,  # with a fp16 or int8 encoder
    "gguf:q8_0": 2e-4, "mlx:8bit": 2e-4, "gguf:q6_k": 5e-4,
    "gguf:q5_k_m": 1.5e-3, "gguf:q4_k_m": 1.5e-3, "gguf:q4_0": 1.5e-3, "mlx:4bit": 4e-3,
}
PAIR_MIN_AGREEMENT = 0.95
# an exact pair over ~240 answer positions of a random-weight model meets near-ties that an F16 file's rounding flips
# (measured: 0.9951 on the tiny Idefics3, nmse 1.7e-7); the nmse bound stays the exact one
EXACT_PAIR_MIN_AGREEMENT = 0.99
PAIR_MAX_ACCURACY_DROP = 0.05


def pair_gate(encoder_precision: str, decoder: str, reference_model: bool) -> PairGate:
    """The gate of one encoder x decoder pair (both known: verify refuses unknown precisions before)."""
    decoder_gate = DECODER_GATES[decoder]
    if encoder_precision == "fp32" and not decoder_gate.trained_only:
        return PairGate(decoder_gate.max_nmse, min(decoder_gate.min_agreement, EXACT_PAIR_MIN_AGREEMENT))
    return PairGate(PAIR_NMSE[decoder], PAIR_MIN_AGREEMENT, PAIR_MAX_ACCURACY_DROP if reference_model else None,
                    trained_only=True)
