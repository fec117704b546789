"""torchvision's antialiased bicubic resize of uint8 frames, in numpy: what transformers' video processors run
(TorchvisionBackend.resize -> tvF.resize(BICUBIC, antialias=True)), so frames resized here equal theirs without torch.

On CPU torchvision 0.28 hands uint8 straight to ATen's uint8 antialiased kernel (`_do_native_uint8_resize_on_cpu`
is true for bicubic), PIL's fixed-point scheme: Keys' cubic (a = -0.5) weights computed in float64 as
`_compute_indices_min_size_weights_aa` does, normalized, scaled to int16 at the largest precision (< 22 bits) that
keeps the largest weight below 2^15 (`_compute_index_ranges_int16_weights`); each output is an integer dot product
plus half an LSB, shifted down and clamped to [0, 255]. Width first into a uint8 intermediate, then height; a pass
whose side keeps its size is skipped. Images keep going through PIL (preprocess.py): their reference is the image
processors' PIL backend.
"""
from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(out, K) source indices, (out, K) int16-valued weights (unused taps: index 0, weight 0) and the precision."""
    scale = in_size / out_size  # area_pixel_compute_scale, align_corners=False
    support = 2.0 * scale if scale >= 1 else 2.0
    invscale = 1.0 / scale if scale >= 1 else 1.0
    max_taps = int(math.ceil(support)) * 2 + 1
    centers = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C++ casts truncate
    xsize = np.clip(np.minimum((centers + support + 0.5).astype(np.int64), in_size) - xmin, 0, max_taps)
    j = np.arange(max_taps)
    used = j[None, :] < xsize[:, None]
    weights = np.where(used, _cubic(((j[None, :] + xmin[:, None]) - centers[:, None] + 0.5) * invscale), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.where(total != 0, weights / np.where(total == 0, 1, total), weights)
    wt_max = float(weights.max(initial=0.0))
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)  # half away from 0
    return np.where(used, j[None, :] + xmin[:, None], 0), fixed, precision


def _resample_axis(values: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    index, weights, precision = _taps(values.shape[axis], out_size)
    moved = np.moveaxis(values, axis, -1).astype(np.int64)  # (..., in)
    acc = np.full(moved.shape[:-1] + (out_size,), 1 << (precision - 1) if precision else 0, dtype=np.int64)
    for k in range(index.shape[1]):
        acc += moved[..., index[:, k]] * weights[:, k]
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)  # negative lobes clamp to 0
    return np.moveaxis(out, -1, axis)


def resize_bicubic_aa(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, height, width, C) uint8, equal to tvF.resize(BICUBIC, antialias=True) on the
    (N, C, H, W) uint8 tensor on CPU."""
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be (N, H, W, C) uint8, got {frames.shape} {frames.dtype}")
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {height}x{width}")
    out = frames
    if frames.shape[2] != width:
        out = _resample_axis(out, 2, width)
    if frames.shape[1] != height:
        out = _resample_axis(out, 1, height)
    return out
