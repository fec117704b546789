"""The two protocols every backend implements, and the pieces of a prompt that flow between them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class Segment:
    """A run of prompt positions: token ids, or image-embedding rows (never both), and the decoder position of each
    (edgevlm/positions.py computes them; backends never count positions themselves)."""

    positions: np.ndarray  # (n,) or (n, k) int32
    token_ids: np.ndarray | None = None  # (n,) int32
    embeds: np.ndarray | None = None  # (n, D) float32

    def __post_init__(self) -> None:
        if (self.token_ids is None) == (self.embeds is None):
            raise ValueError("a segment holds token ids or embeddings, exactly one of them")
        self.positions = np.asarray(self.positions, dtype=np.int32)
        if self.positions.ndim not in (1, 2) or len(self.positions) != len(self):
            raise ValueError(f"a segment of {len(self)} positions got positions of shape {self.positions.shape}")

    def __len__(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else self.embeds.shape[0]

    def slice(self, start: int, stop: int | None = None) -> "Segment":
        if self.token_ids is not None:
            return Segment(self.positions[start:stop], token_ids=self.token_ids[start:stop])
        return Segment(self.positions[start:stop], embeds=self.embeds[start:stop])

    @classmethod
    def tokens(cls, ids, start: int) -> "Segment":
        """Text tokens at 1-D positions start, start+1, ... (tests and text-only callers)."""
        ids = np.asarray(ids, dtype=np.int32)
        return cls(np.arange(start, start + len(ids), dtype=np.int32), token_ids=ids)


@dataclass
class DecoderState:
    """A snapshot of the decoder's sequence (KV) at ``n_past`` positions; opaque to everyone but its backend.
    ``next_position`` is where the sequence continues (not always n_past: M-RoPE)."""

    payload: Any
    n_past: int
    nbytes: int
    next_position: int


class Encoder(Protocol):
    name: str
    artifact_id: str  # sha256 of the artifact (or of the checkpoint for torch): part of every cache key

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """(tiles, 3, H, W) float32 -> (tiles, T, D) float32."""


class Decoder(Protocol):
    name: str
    n_ctx: int
    n_past: int
    vocab_size: int

    def prefill(self, segments: list[Segment]) -> np.ndarray:
        """Append the segments to the sequence (after its n_past cached positions), each at the positions it carries;
        return the last position's logits (vocab,) float32. The array may be a view into the backend's buffer,
        valid until the next call: copy it to keep it."""

    def truncate(self, n_past: int) -> None:
        """Forget every cached entry after the first n_past."""

    def snapshot(self) -> DecoderState: ...

    def restore(self, state: DecoderState) -> None: ...
