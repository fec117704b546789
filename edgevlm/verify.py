"""Parity metrics (DESIGN.md's ladder) and the checks `edgevlm verify` runs on a bundle."""
from __future__ import annotations

import numpy as np

# artifact precision -> (metric, threshold)
ENCODER_THRESHOLDS = {"fp32": ("max_rel_err", 1e-4), "fp16": ("cosine", 0.999), "int8": ("cosine", 0.99)}
DECODER_NMSE = 1e-5  # F32/F16 GGUF and fp32 MLX


def max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (elementwise ratios explode
    where the reference is ~0)."""
    return float(np.abs(ours.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def cosine(ours: np.ndarray, ref: np.ndarray) -> float:
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def nmse(ours: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(((ours.astype(np.float64) - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))
