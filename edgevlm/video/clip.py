"""A decoded video clip: the one type the decoder (PyAV), the families' frame samplers and the runtimes share.

Torch-free and PyAV-free, so the families and the runtimes can take a clip that came from anywhere (a file, a live
stream's rolling window, a test's numpy array).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VideoClip:
    """Frames in presentation order with their times.

    frames: (N, H, W, 3) uint8 RGB. timestamps_s: (N,) seconds from the start of the source, increasing.
    source_fps: the stream's average frame rate (what HF's samplers call the video's fps). duration_s: the
    source's length in seconds (for a window of a stream: the window's length).
    """

    frames: np.ndarray
    timestamps_s: np.ndarray
    source_fps: float
    duration_s: float

    def __post_init__(self) -> None:
        if self.frames.ndim != 4 or self.frames.shape[-1] != 3 or self.frames.dtype != np.uint8:
            raise ValueError(f"frames must be (N, H, W, 3) uint8, got {self.frames.shape} {self.frames.dtype}")
        if len(self.frames) == 0:
            raise ValueError("the clip has no frames")
        if self.timestamps_s.shape != (len(self.frames),):
            raise ValueError(f"timestamps_s must be ({len(self.frames)},), got {self.timestamps_s.shape}")
        if len(self.timestamps_s) > 1 and not np.all(np.diff(self.timestamps_s) > 0):
            raise ValueError("timestamps_s must increase")
        if not (self.source_fps > 0 and self.duration_s > 0):
            raise ValueError(f"source_fps and duration_s must be > 0, got {self.source_fps}, {self.duration_s}")

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def select(self, indices: np.ndarray) -> "VideoClip":
        """The frames at `indices` (a sampler's choice), with the source's fps and duration kept."""
        indices = np.asarray(indices, dtype=np.int64)
        return VideoClip(self.frames[indices], self.timestamps_s[indices], self.source_fps, self.duration_s)
