"""The data-dependent inputs of a native-resolution (Qwen2-VL / Qwen2.5-VL) vision graph, computed in numpy from the
image's patch grid and the vision config's numbers. The ONNX runtime feeds them and the exporter traces with them,
so both sides share one definition; the exported graph itself has no loops over windows or images.

Numpy only (the on-device runtime imports it): no torch, no transformers. References, transformers 5.23:
`vision_utils.get_vision_position_ids` (patch positions) and `get_vision_window_index` (windows)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PATCHES_INPUT = "pixel_patches"  # (P, C*T*p*p) float32, HF's patch order (merge blocks, row-major inside each)
POSITIONS_INPUT = "vision_pos"  # (P, 2) int64: (row, col) of each patch in the patch grid
WINDOWS_INPUT = "window_ids"  # (P,) int64: the attention window of each patch (window-attention towers only)
# towers with a learned square position table resampled to each image's grid (Qwen3-VL): bilinear taps per patch
TABLE_IDS_INPUT = "pos_embed_ids"  # (P, 4) int64: rows of the flattened table
TABLE_WEIGHTS_INPUT = "pos_embed_weights"  # (P, 4) float32: their weights
OUTPUT = "image_embeds"  # (M, D) float32, M = P / merge^2, merged tokens in raster order


@dataclass(frozen=True)
class VisionGrid:
    """The numbers a runtime needs to turn (t, h, w) into the graph's inputs; written to the manifest."""

    patch_size: int  # pixels per patch side (14)
    temporal_patch_size: int  # frames per patch (2: an image is repeated)
    merge_size: int  # patches per merged token side (2)
    in_channels: int = 3
    window_size: int = 0  # window side in pixels (Qwen2.5-VL: 112); 0 = every block attends to the whole image
    fullatt_block_indexes: tuple[int, ...] = ()  # the blocks without windows (information: the graph has them built in)
    position_grid: int = 0  # side of a learned square position table interpolated to each image (Qwen3-VL); 0: none

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "in_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"vision grid: {name} must be >= 1, got {getattr(self, name)}")
        if self.window_size and self.window_size % (self.patch_size * self.merge_size):
            raise ValueError(f"vision grid: window_size {self.window_size} is not a multiple of patch_size x merge_size "
                             f"({self.patch_size * self.merge_size})")
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2  # 1176

    @property
    def windowed(self) -> bool:
        return self.window_size > 0

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (HF's vit_merger_window_size)."""
        return self.window_size // (self.patch_size * self.merge_size)

    def input_names(self) -> list[str]:
        return ([PATCHES_INPUT, POSITIONS_INPUT] + ([WINDOWS_INPUT] if self.windowed else [])
                + ([TABLE_IDS_INPUT, TABLE_WEIGHTS_INPUT] if self.position_grid else []))

    def graph_inputs(self) -> list[dict]:
        """The manifest's list of graph inputs: name, dtype and shape with the dynamic axis named."""
        shapes = {PATCHES_INPUT: ("float32", ["patches", self.patch_dim]), POSITIONS_INPUT: ("int64", ["patches", 2]),
                  WINDOWS_INPUT: ("int64", ["patches"]), TABLE_IDS_INPUT: ("int64", ["patches", 4]),
                  TABLE_WEIGHTS_INPUT: ("float32", ["patches", 4])}
        return [{"name": name, "dtype": shapes[name][0], "shape": shapes[name][1]} for name in self.input_names()]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "VisionGrid":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known})


def check_grid(grid, spec: VisionGrid) -> tuple[int, int, int]:
    """(t, h, w) of one image in patches; t must be 1 (images: the frame is repeated inside each patch)."""
    t, h, w = (int(v) for v in grid)
    if t != 1 or h < spec.merge_size or w < spec.merge_size or h % spec.merge_size or w % spec.merge_size:
        raise ValueError(f"grid {tuple(grid)}: expected (1, h, w) with h and w positive multiples of the merge size "
                         f"{spec.merge_size} (one image per call)")
    return t, h, w


def patch_positions(h: int, w: int, merge: int) -> np.ndarray:
    """(h*w, 2) int64: (row, col) of each patch in HF's order: merge blocks row-major, patches row-major inside."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w) each
    block = (h // merge, merge, w // merge, merge)
    rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)  # (h*w,)
    cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([rows, cols], axis=-1).astype(np.int64)


def window_ids(h: int, w: int, merge: int, window_merged: int) -> np.ndarray:
    """(h*w,) int64: the window of each patch, in HF's patch order. Windows are window_merged x window_merged merged
    tokens, cut from the top-left; those at the right and bottom edges are smaller (HF pads, then drops the padding).
    Two patches attend to each other in a windowed block iff their ids are equal, which is what HF's window
    permutation + cu_window_seqlens compute, without the permutation."""
    mh, mw = h // merge, w // merge
    windows_w = -(-mw // window_merged)
    rows, cols = np.meshgrid(np.arange(mh), np.arange(mw), indexing="ij")  # (mh, mw) merged-token coordinates
    merged = (rows // window_merged) * windows_w + cols // window_merged  # (mh, mw)
    return np.repeat(merged.reshape(-1), merge * merge).astype(np.int64)  # each merged token's patches are adjacent


def encoder_feeds(pixel_patches: np.ndarray, grid, spec: VisionGrid) -> dict[str, np.ndarray]:
    """Every input of the graph for one image: the patches as given plus the auxiliary inputs from its grid."""
    _, h, w = check_grid(grid, spec)
    if pixel_patches.shape != (h * w, spec.patch_dim):
        raise ValueError(f"grid {tuple(grid)} needs patches of shape ({h * w}, {spec.patch_dim}), got {pixel_patches.shape}")
    feeds = {PATCHES_INPUT: np.ascontiguousarray(pixel_patches, dtype=np.float32),
             POSITIONS_INPUT: patch_positions(h, w, spec.merge_size)}
    if spec.windowed:
        feeds[WINDOWS_INPUT] = window_ids(h, w, spec.merge_size, spec.window_merged)
    if spec.position_grid:
        feeds[TABLE_IDS_INPUT], feeds[TABLE_WEIGHTS_INPUT] = table_taps(feeds[POSITIONS_INPUT], h, w, spec.position_grid)
    return feeds


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (floor, floor + 1, clamped) and weights along one axis, align_corners=True: patch `index` of
    `size` samples the table at index * (side - 1) / (size - 1), in float32 as transformers computes it."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)  # (P, 2)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
    return taps, weights.astype(np.float32)


def table_taps(positions: np.ndarray, h: int, w: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, 4) rows of a flattened side x side position table and (P, 4) weights that resample it bilinearly
    (align_corners=True) to an h x w patch grid, per patch at its (row, col): transformers'
    vision_utils.get_vision_interpolation_indices_and_weights (bilinear), in numpy."""
    row_taps, row_weights = _axis_taps(positions[:, 0], h, side)
    col_taps, col_weights = _axis_taps(positions[:, 1], w, side)
    ids = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return ids.astype(np.int64), weights.astype(np.float32)
