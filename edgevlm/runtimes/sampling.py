"""Token sampling on a logits vector: greedy, temperature, top-k, top-p, repetition penalty, seeded."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        import math

        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN and inf too
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in 0..2**63-1, got {self.seed}")


class Sampler:
    needs_logits = True  # it reads the logits array it is given (llama.cpp's native sampler reads them in place)

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def close(self) -> None:
        """Nothing to free (a native sampler frees its chain here)."""

    def penalize(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """transformers' RepetitionPenaltyLogitsProcessor: divide positive, multiply negative scores of seen ids."""
        penalty = self.config.repetition_penalty
        if penalty == 1.0 or not history:
            return logits
        logits = logits.copy()
        seen = np.unique(np.asarray(history, dtype=np.int64))
        scores = logits[seen]
        logits[seen] = np.where(scores < 0, scores * penalty, scores / penalty)
        return logits

    def sample(self, logits: np.ndarray, history: list[int]) -> int:
        if self.config.temperature == 0.0:
            return int(np.argmax(self.penalize(np.asarray(logits, dtype=np.float32), history)))
        probs = self.distribution(logits, history)
        return int(self.rng.choice(probs.size, p=probs))

    def distribution(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """The probabilities sampling draws from (temperature > 0): penalties, temperature, top-k, then top-p; zero
        outside the kept set."""
        logits = self.penalize(np.asarray(logits, dtype=np.float32), history)
        cfg = self.config
        scaled = logits.astype(np.float64) / cfg.temperature
        if cfg.top_k and cfg.top_k < scaled.size:
            kth = np.partition(scaled, -cfg.top_k)[-cfg.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, cfg.top_p) + 1)]  # smallest set reaching top_p
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return probs
