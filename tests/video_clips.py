"""Test clips written with PyAV: moving shapes on a gradient, an odd resolution, a few seconds (test-only)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

WIDTH, HEIGHT, FPS, SECONDS = 343, 201, 10, 4


def moving_shapes(n_frames: int, width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    """(N, H, W, 3) uint8: a square and a bar that move, on a gradient tinted by `seed` (another seed, another clip)."""
    rng = np.random.default_rng(seed)
    tint = rng.integers(0, 255, 3)
    y, x = np.mgrid[0:height, 0:width]
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    for t in range(n_frames):
        frame = np.stack([(x * 255 // width + tint[0]) % 256, (y * 255 // height + tint[1]) % 256,
                          np.full_like(x, (40 * t + tint[2]) % 256)], axis=-1)
        cx, cy = (17 + 9 * t) % (width - 40), (11 + 5 * t) % (height - 40)
        frame[cy:cy + 40, cx:cx + 40] = (255, 255 - 20 * (t % 12), 30)
        bar = (height - 1 - 7 * t) % height
        frame[bar:bar + 12, :] = (20, 200, 255)
        frames[t] = frame
    return frames


def write_clip(path: Path, frames: np.ndarray, fps: int = FPS, codec: str = "mpeg4") -> Path:
    """Encode `frames` (N, H, W, 3) uint8 at `fps`; odd sizes work with both mpeg4 and libx264 in PyAV's wheel."""
    import av

    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv444p" if codec == "libx264" else "yuv420p"
        stream.bit_rate = 4_000_000  # mpeg4's default (200 kb/s) smears the shapes
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "ultrafast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_clip(folder: Path, name: str = "shapes.mp4", seconds: float = SECONDS, fps: int = FPS, seed: int = 0,
              width: int = WIDTH, height: int = HEIGHT, codec: str = "mpeg4") -> Path:
    return write_clip(Path(folder) / name, moving_shapes(int(seconds * fps), width, height, seed), fps, codec)
