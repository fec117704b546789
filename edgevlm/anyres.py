"""LLaVA-OneVision's "anyres-max" image rule in numpy (no torch): the tile grid picked from the pinpoint resolutions,
the feature map unpadded to the image's aspect, bilinear-downsampled when it exceeds max_pooled_tiles tiles' worth
("anyres_max_9"), an image_newline row after every line, the base view's rows first.

The encoder graph runs tower + projector per tile and carries the image_newline as one extra last row of every tile
(so every encoder backend delivers it and no weight file travels beside the graph); this module packs those rows.
The packing stays out of the graph because its shape follows the image's size and aspect: a fixed-signature graph
would take gather indices and weights computed here anyway. References, transformers 5.23:
image_processing_utils.select_best_resolution / get_patch_output_size, modeling_llava_onevision.unpad_image /
pack_image_features, processing_llava_onevision._get_number_of_features."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(height, width) of the pinpoint that keeps the most of the image's pixels, then wastes the fewest."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(pin_h), int(pin_w)), effective, wasted
    if best is None:
        raise ValueError("anyres needs at least one grid pinpoint")
    return best


def fitted_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image resized into target keeping its aspect (get_patch_output_size); the rest is
    padding, centred."""
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def grid(height: int, width: int, pinpoints: Sequence[Sequence[int]], tile: int) -> tuple[int, int]:
    """(rows, cols) of tiles the image is cut into (the base view comes on top)."""
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    return best_h // tile, best_w // tile


def unpadded_shape(height: int, width: int, rows: int, cols: int) -> tuple[slice, slice]:
    """The rows and columns of a rows x cols feature map that show the image, not the padding (unpad_image)."""
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        pad = (rows - new_rows) // 2
        return slice(pad, rows - pad), slice(0, cols)
    new_cols = int(round(width * (rows / height), 7))
    pad = (cols - new_cols) // 2
    return slice(0, rows), slice(pad, cols - pad)


def feature_shape(height: int, width: int, pinpoints, tile: int, side: int, max_pooled_tiles: int) -> tuple[int, int, bool]:
    """(rows, cols, pooled) of the grid's feature map after unpadding and, when it holds more than 1.1 x
    sqrt(max_pooled_tiles) tiles' worth on each side on average, the bilinear downsample."""
    tile_rows, tile_cols = grid(height, width, pinpoints, tile)
    rows, cols = unpadded_shape(height, width, tile_rows * side, tile_cols * side)
    h, w = rows.stop - rows.start, cols.stop - cols.start
    ratio = math.sqrt(h * w / (max_pooled_tiles * side**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio), True
    return h, w, False


def packed_rows(height: int, width: int, pinpoints, tile: int, side: int, max_pooled_tiles: int) -> int:
    """Embedding rows (= image tokens) of one image: the base view's side^2, then each line of the grid's features
    and its newline."""
    h, w, _ = feature_shape(height, width, pinpoints, tile, side, max_pooled_tiles)
    return side * side + h * (w + 1)


def _bilinear(features: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(H, W, D) -> (out_h, out_w, D) as torch.nn.functional.interpolate(mode="bilinear", align_corners=False)."""

    def taps(n_in: int, n_out: int):
        scale = np.float32(n_in / n_out)
        src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
        lo = src.astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (src - lo).astype(np.float32)
        return lo, hi, (np.float32(1) - frac), frac

    h_lo, h_hi, h0, h1 = taps(features.shape[0], out_h)
    w_lo, w_hi, w0, w1 = taps(features.shape[1], out_w)
    top = w0[None, :, None] * features[h_lo][:, w_lo] + w1[None, :, None] * features[h_lo][:, w_hi]
    bottom = w0[None, :, None] * features[h_hi][:, w_lo] + w1[None, :, None] * features[h_hi][:, w_hi]
    return (h0[:, None, None] * top + h1[:, None, None] * bottom).astype(np.float32)


def pack(embeds: np.ndarray, height: int, width: int, pinpoints, tile: int, side: int,
         max_pooled_tiles: int) -> np.ndarray:
    """Encoder rows (1 + rows*cols tiles, side^2 + 1, D), base view first and the image_newline as each tile's last
    row, of one height x width image -> its (packed_rows, D) embedding rows in prompt order."""
    tile_rows, tile_cols = grid(height, width, pinpoints, tile)
    n_tiles, per_tile, dim = embeds.shape
    if n_tiles != 1 + tile_rows * tile_cols or per_tile != side * side + 1:
        raise ValueError(f"anyres: {embeds.shape[:2]} encoder rows for an image that needs "
                         f"({1 + tile_rows * tile_cols}, {side * side + 1})")
    newline = embeds[0, -1]
    base = embeds[0, :-1]
    tiles = embeds[1:, :-1].reshape(tile_rows, tile_cols, side, side, dim)
    features = tiles.transpose(0, 2, 1, 3, 4).reshape(tile_rows * side, tile_cols * side, dim)
    rows, cols = unpadded_shape(height, width, tile_rows * side, tile_cols * side)
    features = features[rows, cols]
    h, w, pooled = feature_shape(height, width, pinpoints, tile, side, max_pooled_tiles)
    if pooled:
        features = _bilinear(features, h, w)
    lines = np.concatenate([features, np.broadcast_to(newline, (h, 1, dim))], axis=1)  # (h, w + 1, D)
    return np.ascontiguousarray(np.concatenate([base, lines.reshape(-1, dim)]), dtype=np.float32)
