"""Decoder positions, computed in one place from the manifest's `decoder.position_scheme`.

Every backend takes the positions a segment carries; none counts them itself. "1d" (Llama-style RoPE) is the only
scheme this version runs; "mrope" (Qwen2-VL's (t, row, col) positions, (n, 3)) fits the same shapes: positions may
be (n,) or (n, k), and the first generated token's position need not equal the prompt's length."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POSITION_SCHEMES = ("1d",)
IMAGE_ATTENTION = ("causal",)


@dataclass(frozen=True)
class PositionPlan:
    positions: np.ndarray  # (N,) or (N, k) int32: one per prompt position
    next_position: int  # where generated tokens continue

    def __post_init__(self) -> None:
        if self.positions.ndim not in (1, 2) or self.positions.dtype != np.int32:
            raise ValueError(f"positions must be (n,) or (n, k) int32, got {self.positions.shape} {self.positions.dtype}")

    def next_after(self, n_prompt_positions: int) -> int:
        """The next position once the first `n_prompt_positions` of the prompt are in the KV cache."""
        if n_prompt_positions >= len(self.positions):
            return self.next_position
        return int(self.positions[:n_prompt_positions].max(initial=-1)) + 1


def plan_positions(scheme: str, n_positions: int) -> PositionPlan:
    """The positions of a whole prompt of `n_positions` (text and image rows), starting at 0."""
    if scheme == "1d":
        return PositionPlan(np.arange(n_positions, dtype=np.int32), n_positions)
    raise ValueError(f"position scheme {scheme!r} is not one of {POSITION_SCHEMES}")


def text_positions(scheme: str, start: int, n: int) -> np.ndarray:
    """Positions of `n` text tokens that continue at `start` (generated tokens, teacher forcing)."""
    if scheme == "1d":
        return np.arange(start, start + n, dtype=np.int32)
    raise ValueError(f"position scheme {scheme!r} is not one of {POSITION_SCHEMES}")
