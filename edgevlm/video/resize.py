"""torchvision's antialiased bicubic and Lanczos resizes of uint8 frames, in numpy: what transformers' video
processors run (TorchvisionBackend.resize -> tvF.resize(BICUBIC or LANCZOS, antialias=True)), so frames resized here
equal theirs without torch (Qwen's are bicubic, SmolVLM2's Lanczos).

On CPU torchvision 0.28 hands uint8 straight to ATen's uint8 antialiased kernel (`_do_native_uint8_resize_on_cpu`
is true for both), PIL's scheme with int16 weights: Keys' cubic (a = -0.5, support 2) or Lanczos-3 (sinc(x) sinc(x/3),
support 3, `HelperInterpLanczos`) weights computed in float64 as
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


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0.0, 1.0, np.sin(x * math.pi) / (x * math.pi))


def _lanczos(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 3.0, _sinc(x) * _sinc(x / 3.0), 0.0)


# filter name -> (the filter, its half-width: ATen's interp_size / 2)
FILTERS = {"bicubic": (_cubic, 2.0), "lanczos": (_lanczos, 3.0)}


def _taps(in_size: int, out_size: int, kind: str = "bicubic") -> tuple[np.ndarray, np.ndarray, int]:
    """(out, K) source indices, (out, K) int16-valued weights (unused taps: index 0, weight 0) and the precision."""
    filter_fn, half_width = FILTERS[kind]
    scale = in_size / out_size  # area_pixel_compute_scale, align_corners=False
    support = half_width * scale if scale >= 1 else half_width
    invscale = 1.0 / scale if scale >= 1 else 1.0
    max_taps = int(math.ceil(support)) * 2 + 1
    centers = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C++ casts truncate
    xsize = np.clip(np.minimum((centers + support + 0.5).astype(np.int64), in_size) - xmin, 0, max_taps)
    j = np.arange(max_taps)
    used = j[None, :] < xsize[:, None]
    weights = np.where(used, filter_fn(((j[None, :] + xmin[:, None]) - centers[:, None] + 0.5) * invscale), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.where(total != 0, weights / np.where(total == 0, 1, total), weights)
    wt_max = float(weights.max(initial=0.0))
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int64)  # half away from 0
    return np.where(used, j[None, :] + xmin[:, None], 0), fixed, precision


BAND_ROWS = 64  # output rows per matmul: a band of the weight matrix, not the whole (mostly zero) matrix


def _resample_rows(values: np.ndarray, out_size: int, kind: str) -> np.ndarray:
    """Resample axis 1 of (N, A, B, C) uint8 exactly as ATen's integer loop does, as float64 matmuls over bands of
    output rows: the int16 weights times uint8 pixels sum to integers far below 2^53, so BLAS gives ATen's exact
    sums; rounding, the shift and the clamp are done per band into uint8 (a tap-by-tap integer gather was 4x slower
    than Pillow on a frame, and float32 needs two matmuls and int64 temporaries to stay exact: 3x this)."""
    index, weights, precision = _taps(values.shape[1], out_size, kind)
    n, rows = values.shape[:2]
    flat = values.reshape(n, rows, -1)  # (N, A, B*C)
    out = np.empty((n, out_size, flat.shape[2]), dtype=np.uint8)
    half, scale = float(1 << (precision - 1)) if precision else 0.0, 1.0 / (1 << precision)
    weights64 = weights.astype(np.float64)
    for start in range(0, out_size, BAND_ROWS):
        stop = min(start + BAND_ROWS, out_size)
        taps, used = index[start:stop], weights[start:stop] != 0
        first = int(taps[used].min(initial=rows - 1))
        last = int(taps[used].max(initial=first))
        band = np.zeros((stop - start, last - first + 1), dtype=np.float64)  # (band, span)
        cells = (np.repeat(np.arange(stop - start), taps.shape[1]), np.clip(taps - first, 0, last - first).ravel())
        np.add.at(band, cells, weights64[start:stop].ravel())  # unused taps add weight 0
        acc = np.matmul(band, flat[:, first:last + 1].astype(np.float64))  # (N, band, B*C), exact integers
        acc += half  # + half an LSB, then >> precision: a power-of-two scale and floor, exact in float64
        acc *= scale
        np.floor(acc, out=acc)
        out[:, start:stop] = np.clip(acc, 0, 255, out=acc)  # negative lobes clamp to 0
    return out.reshape((n, out_size) + values.shape[2:])


def resize_bicubic_aa(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, height, width, C) uint8, equal to tvF.resize(BICUBIC, antialias=True) on the
    (N, C, H, W) uint8 tensor on CPU."""
    return resize_aa(frames, height, width, "bicubic")


def resize_aa(frames: np.ndarray, height: int, width: int, kind: str) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, height, width, C) uint8, equal to tvF.resize(kind, antialias=True) on the
    (N, C, H, W) uint8 tensor on CPU; `kind` is "bicubic" or "lanczos"."""
    if kind not in FILTERS:
        raise ValueError(f"resize filter {kind!r} is not one of {sorted(FILTERS)}")
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise ValueError(f"frames must be (N, H, W, C) uint8, got {frames.shape} {frames.dtype}")
    if height < 1 or width < 1:
        raise ValueError(f"cannot resize to {height}x{width}")
    out = frames
    if frames.shape[2] != width:  # width first, as ATen does: rows of the transposed frames, then back
        out = _resample_rows(np.ascontiguousarray(out.transpose(0, 2, 1, 3)), width, kind).transpose(0, 2, 1, 3)
    if frames.shape[1] != height:
        out = _resample_rows(np.ascontiguousarray(out), height, kind)
    return out


def fused_normalize(frames: np.ndarray, rescale_factor: float, mean, std) -> np.ndarray:
    """(..., H, W, C) uint8 -> float32, as the video processors' fused rescale + normalize computes it in float32:
    (x - mean / rescale) / (std / rescale)."""
    mean = np.asarray([m / rescale_factor for m in mean], dtype=np.float32)
    std = np.asarray([s / rescale_factor for s in std], dtype=np.float32)
    return (frames.astype(np.float32) - mean) / std
