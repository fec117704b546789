"""Decoder positions, computed in one place from the manifest's `decoder.position_scheme`.

Every backend takes the positions a segment carries; none counts them itself. "1d" (Llama-style RoPE): one position
per prompt position, (n,). "mrope" (Qwen2-VL / Qwen2.5-VL): (n, 3) (t, row, col); a text token has t = row = col,
continuing after the largest position so far; an image's rows (raster order over its merged grid h' x w') share
t = pos0 and get row = pos0 + r, col = pos0 + c; the text after it continues at pos0 + max(h', w') (HF's
get_rope_index and llama.cpp's mtmd agree). So the first generated token's position need not equal the prompt's
length. A video's block (VideoSpan) is its temporal patches' grids one after another: temporal patch k has
t = pos0 + trunc(k x time_interval) (Qwen2.5-VL: tokens_per_second x seconds per temporal patch; Qwen2-VL: 1), rows
and cols as an image's; the text after it continues at pos0 + max(h', w') as after an image (transformers 5.23's
get_rope_index), while generation continues after the prompt's largest position (its rope_deltas)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POSITION_SCHEMES = ("1d", "mrope")
# how the decoder attends inside one image's block of rows: causal, or bidirectional (Gemma 3: every row of an image
# sees the whole image; the block is never cut by prefix reuse and goes into the decoder in one piece), or prefix
# (PaliGemma's prefix-LM: the whole prompt, images and text, is one bidirectional block, the answer causal; a
# prompt is never extended in place nor cut)
IMAGE_ATTENTION = ("causal", "bidirectional", "prefix")


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


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's rows lie in the prompt: `rows x cols` positions from `start`, raster order (merged grid)."""

    start: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.rows < 1 or self.cols < 1:
            raise ValueError(f"an image span needs start >= 0 and a grid of at least 1x1, got {self}")

    @property
    def stop(self) -> int:
        return self.start + self.rows * self.cols


@dataclass(frozen=True)
class VideoSpan:
    """Where one video's rows lie: `frames` temporal patches of `rows x cols` each from `start`, in order."""

    start: int
    frames: int
    rows: int
    cols: int
    time_interval: float = 1.0  # M-RoPE t advance per temporal patch, truncated per patch (get_rope_index)

    def __post_init__(self) -> None:
        if self.start < 0 or self.frames < 1 or self.rows < 1 or self.cols < 1 or not self.time_interval >= 0:
            raise ValueError(f"a video span needs start >= 0, at least one 1x1 temporal patch and a time interval "
                             f">= 0, got {self}")

    @property
    def stop(self) -> int:
        return self.start + self.frames * self.rows * self.cols


def _grid_positions(span: "ImageSpan | VideoSpan", pos0: int) -> np.ndarray:
    """(n, 3) int32 positions of an image's or a video's rows whose block starts at pos0."""
    frames = getattr(span, "frames", 1)
    # (arange * time_interval).long() in float32, as transformers computes it: truncation toward zero
    t = (np.arange(frames, dtype=np.float32) * np.float32(getattr(span, "time_interval", 1.0))).astype(np.int64)
    rows, cols = np.divmod(np.arange(span.rows * span.cols, dtype=np.int64), span.cols)
    out = np.empty((frames, span.rows * span.cols, 3), dtype=np.int64)
    out[..., 0] = pos0 + t[:, None]
    out[..., 1] = pos0 + rows[None, :]
    out[..., 2] = pos0 + cols[None, :]
    return out.reshape(-1, 3).astype(np.int32)


def plan_positions(scheme: str, n_positions: int,
                   images: "tuple[ImageSpan | VideoSpan, ...] | list[ImageSpan | VideoSpan]" = ()) -> PositionPlan:
    """The positions of a whole prompt of `n_positions` (text and image rows), starting at 0. `images` (ordered,
    not overlapping) matter only to schemes that place image rows on a grid."""
    if scheme == "1d":
        return PositionPlan(np.arange(n_positions, dtype=np.int32), n_positions)
    if scheme == "mrope":
        positions = np.empty((n_positions, 3), dtype=np.int32)  # (N, 3) t, row, col
        done, next_pos = 0, 0
        for span in sorted(images, key=lambda s: s.start):
            if span.start < done or span.stop > n_positions:
                raise ValueError(f"image span {span} overlaps another or runs past the prompt's {n_positions} positions")
            n_text = span.start - done
            positions[done:span.start] = np.arange(next_pos, next_pos + n_text, dtype=np.int32)[:, None]
            pos0 = next_pos + n_text
            positions[span.start:span.stop] = _grid_positions(span, pos0)
            done, next_pos = span.stop, pos0 + max(span.rows, span.cols)
        positions[done:] = np.arange(next_pos, next_pos + n_positions - done, dtype=np.int32)[:, None]
        # generation goes on after the largest position (a scaled video's t may pass the text's); with images and
        # text alone that is where the text continues
        return PositionPlan(positions, max(next_pos + n_positions - done, int(positions.max(initial=-1)) + 1))
    raise ValueError(f"position scheme {scheme!r} is not one of {POSITION_SCHEMES}")


def text_positions(scheme: str, start: int, n: int) -> np.ndarray:
    """Positions of `n` text tokens that continue at `start` (generated tokens, teacher forcing)."""
    if scheme == "1d":
        return np.arange(start, start + n, dtype=np.int32)
    if scheme == "mrope":
        return np.repeat(np.arange(start, start + n, dtype=np.int32)[:, None], 3, axis=1)  # (n, 3): t = row = col
    raise ValueError(f"position scheme {scheme!r} is not one of {POSITION_SCHEMES}")
