"""A generated test clip (`edgevlm bench --video-seconds S`): moving shapes on a gradient, written with PyAV, so a
video benchmark needs no file and no download. Every frame differs (the square, the bar and the tint move), so no
embedding is shared by accident between frames."""
from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_SIZE = (640, 360)  # (width, height): a common camera stream, downscaled
DEFAULT_FPS = 10


def moving_shapes(n_frames: int, width: int, height: int, seed: int = 0, first: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8: frames first .. first + N - 1 of the clip."""
    rng = np.random.default_rng(seed)
    tint = rng.integers(0, 255, 3)
    y, x = np.mgrid[0:height, 0:width]
    side = max(8, min(width, height) // 5)
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    for i, t in enumerate(range(first, first + n_frames)):
        frames[i] = np.stack([(x * 255 // width + tint[0]) % 256, (y * 255 // height + tint[1]) % 256,
                              np.full_like(x, (7 * t + tint[2]) % 256)], axis=-1)
        cx, cy = (17 + 9 * t) % max(1, width - side), (11 + 5 * t) % max(1, height - side)
        frames[i, cy:cy + side, cx:cx + side] = (255, 255 - 20 * (t % 12), 30)
        bar = (height - 1 - 7 * t) % height
        frames[i, bar:bar + max(2, height // 30), :] = (20, 200, 255)
    return frames


def write_clip(path: Path, seconds: float, fps: int = DEFAULT_FPS, size: tuple[int, int] = DEFAULT_SIZE,
               seed: int = 0) -> Path:
    """An MPEG-4 Part 2 MP4 of `seconds` at `fps` (PyAV's wheel encodes it without any executable)."""
    import av

    width, height = size
    n = max(1, int(round(seconds * fps)))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 4_000_000
        for start in range(0, n, 64):  # a few frames at a time: a 30 s clip never sits in memory whole
            for array in moving_shapes(min(64, n - start), width, height, seed, start):
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)
