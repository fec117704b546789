"""The contract every backend implements (an Encoder; a Decoder, which is one sequence; a BatchedContext, which holds
several sequences and steps them in one call), and the pieces of a prompt that flow between them. Callers test a
capability by type, once (isinstance), never by probing attributes."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from ..positions import text_positions
from .sampling import Sampler, SamplingConfig


@dataclass
class Segment:
    """A run of prompt positions: token ids, or image-embedding rows (never both), and the decoder position of each
    (edgevlm/positions.py computes them; backends never count positions themselves)."""

    positions: np.ndarray  # (n,) or (n, k) int32
    token_ids: np.ndarray | None = None  # (n,) int32
    # (n, D) float32; with DeepStack (manifest encoder.row_slices = 1 + k) (n, (1 + k) * D): the main embedding, then
    # the slices each decoder adds to its hidden states after layers 0..k-1 at these positions
    embeds: np.ndarray | None = None

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




def chunks(segments: list[Segment], size: int) -> Iterator[Segment]:
    """Each segment cut every `size` rows, in order: the one place a prefill is cut into a backend's batches."""
    for segment in segments:
        for start in range(0, len(segment), size):
            yield segment.slice(start, start + size)


class Encoder(ABC):
    name: str
    artifact_id: str  # sha256 of the artifact (or of the checkpoint for torch): part of every cache key
    graph_bytes: int | None = None  # bytes of the graph file the runtime loaded (None: not a file, e.g. torch)

    @abstractmethod
    def encode(self, pixel_values: np.ndarray, grid: tuple[int, int, int] | None = None,
               instruction: np.ndarray | None = None) -> np.ndarray:
        """(tiles, 3, H, W) float32 -> (tiles, T, D) float32; with a grid (a native-resolution encoder):
        (P, C*T*p*p) patches of a (t, h, w) grid -> (M, D). D is encoder.row_slices x the decoder's width (a
        DeepStack row carries its slices side by side). `instruction`: (n,) int64 ids of the prompt, for an encoder
        that reads it (InstructBLIP's Q-Former; without it, the contract's default instruction)."""


class Decoder(ABC):
    """One sequence of a decoder's KV: the prompt goes in with `prefill` (at the positions its segments carry),
    generated tokens with `step`. Implementations set the attributes below in their constructor."""

    name: str
    n_ctx: int  # positions the KV holds at most
    n_past: int  # rows the sequence holds
    next_position: int  # where the sequence continues (not always n_past: M-RoPE)
    vocab_size: int
    n_batch: int  # most rows one prefill chunk takes (the whole context where the backend takes any prompt at once)
    artifact_id: str  # the weights' identity: part of every prefix-cache key
    state_signature: str | None = None  # what a snapshot depends on; None: snapshots cannot leave this process
    position_scheme: str = "1d"  # what `step`'s one-token prefill places its token at (positions.POSITION_SCHEMES)
    model_bytes: int | None = None  # the weights as the backend holds them in memory, when it says
    context: "BatchedContext | None" = None  # the context this sequence shares with others, when the backend has one

    @abstractmethod
    def prefill_chunks(self, segments: list[Segment]) -> Iterator[int]:
        """Append the segments to the sequence (after its n_past rows), each at the positions it carries, in chunks
        of at most n_batch rows; yields the rows of each chunk once it is in the KV (a scheduler may run other work
        between chunks). Afterwards `logits()` holds the last position's logits."""

    @abstractmethod
    def logits(self) -> np.ndarray:
        """The logits (vocab,) float32 of the last position decoded in this sequence. The array may be a view into
        the backend's buffer, valid until the next call: copy it to keep it."""

    def can_truncate(self, n_past: int) -> bool:
        """Whether `truncate(n_past)` keeps a state the sequence can continue from (False: a sliding-window cache
        dropped positions the cut would need; the caller starts cold instead)."""
        return True

    @abstractmethod
    def truncate(self, n_past: int, next_position: int | None = None) -> None:
        """Keep the first n_past rows; the sequence continues at next_position (default: n_past, which only a 1-D
        scheme may rely on)."""

    @abstractmethod
    def snapshot(self) -> DecoderState: ...

    @abstractmethod
    def restore(self, state: DecoderState) -> None:
        """Replace the sequence by a snapshot; if the backend refuses it, the sequence is left empty (RuntimeError)."""

    def prefill(self, segments: list[Segment]) -> np.ndarray:
        """`prefill_chunks` run to its end: the last position's logits."""
        for _ in self.prefill_chunks(segments):
            pass
        return self.logits()

    def step(self, token: int, position: int, logits: bool = True) -> np.ndarray | None:
        """One generated token at one position (1-D, or an M-RoPE text token's t); its logits, or None when
        logits=False (a sampler that reads them in place). By default a one-token prefill."""
        segment = Segment(text_positions(self.position_scheme, position, 1), token_ids=np.asarray([token], np.int32))
        out = self.prefill([segment])
        return out if logits else None

    def sampler(self, config: SamplingConfig, history: list[int]):
        """What samples this sequence's tokens: edgevlm's numpy Sampler, unless the backend has its own."""
        return Sampler(config)


class BatchedContext(ABC):
    """A context holding several sequences (each a Decoder) in one KV pool, stepping them in one call."""

    n_ctx: int  # positions of the pool, shared by every sequence
    n_seq: int

    @abstractmethod
    def sequence(self, index: int) -> Decoder:
        """The Decoder of sequence `index` (0 <= index < n_seq); the same object while anyone holds it."""

    @abstractmethod
    def step_many(self, sequences: Sequence[Decoder], tokens: Sequence[int], positions: Sequence[int]) -> None:
        """One generated token for each of several of its sequences in one call; each then reads its own
        `logits()`. On failure every sequence of the batch is in doubt: the caller empties them."""

    @abstractmethod
    def kv_used(self) -> int:
        """KV cells in use by all sequences."""

    def set_threads(self, threads: int) -> None:
        """The threads of later decodes (a server lends some to the image encoder meanwhile); a backend without such
        a setting keeps its own."""

    @property
    @abstractmethod
    def contexts_opened(self) -> int:
        """Contexts opened on the same weights so far, this one included (tests: `serve` opens exactly one)."""

    @abstractmethod
    def close(self) -> None: ...
