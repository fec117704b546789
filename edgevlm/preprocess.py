"""Image preprocessing that reproduces the Hugging Face processors bit for bit (PIL resize on uint8, then float32).

One spec, three resize rules:
- ``shortest_edge_crop`` (CLIP): resize the short side, then centre-crop;
- ``fixed`` (SigLIP): resize to exactly (height, width);
- ``idefics3``: resize the long side to ``longest_edge``, round both sides up to tile multiples, split into
  full tiles in row-major order, and append the global view (the whole image resized to one tile);
- ``internvl`` (GotOcr2's crop_to_patches): pick the cols x rows grid (min_tiles <= cols*rows <= max_tiles) whose
  aspect ratio is closest to the image's, resize the whole image to it, cut tiles row-major, and append a
  thumbnail (the image resized to one tile) when there is more than one tile;
- ``qwen2vl`` (Qwen2VLImageProcessor): smart_resize both sides to multiples of patch_size x merge_size with the area
  in [min_pixels, max_pixels], then flatten into patches (P, 3*T*p*p) in HF's order (2x2 merge blocks row-major), the
  frame repeated temporal_patch_size times. Native resolution: no tiles, and the token count follows the image.
- ``gemma3`` (Gemma3ImageProcessor): the whole image resized to one tile; with pan-and-scan (image_splitting) an
  image whose aspect ratio reaches pan_and_scan_min_ratio is also cut into 2..max_tiles equal crops along its long
  side (crops of at least pan_and_scan_min_crop pixels), each resized to a tile; the whole image comes first.
- ``idefics2`` (Idefics2ImageProcessor): optionally split the image into 4 quarters + the whole, resize each so its
  long side is at most ``longest_edge`` (keeping the aspect) and each side at least ``shortest_edge`` (not keeping
  it), then pad bottom/right with zeros to a ``longest_edge`` square canvas. Tiles differ in size, so a 4th channel
  carries HF's pixel_attention_mask (1 = image, 0 = padding); the encoder masks the padded patches out.
- ``anyres`` (LlavaOnevisionImageProcessor): the whole image resized to one tile (the base view, first), then the
  image fitted into the best of ``grid_pinpoints`` keeping its aspect, centred on a black canvas and cut into tiles
  row-major; anyres.py packs the features (unpadding, pooling above ``max_pooled_tiles``, newlines).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from . import anyres

RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
RESAMPLE_NAMES = {v: k for k, v in RESAMPLE.items()}
RESIZE_RULES = ("shortest_edge_crop", "fixed", "idefics3", "internvl", "qwen2vl", "gemma3", "idefics2", "anyres")
MAX_TILE_SIDE_PIXELS = 4096  # the HF Idefics3 processor's absolute cap on a resized side
MAX_ASPECT_RATIO = 200  # smart_resize refuses longer/shorter side ratios above this


@dataclass(frozen=True)
class PreprocessSpec:
    resize_rule: str
    tile_size: tuple[int, int]  # (height, width) of one encoder input
    resample: str = "bicubic"
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    shortest_edge: int | None = None  # shortest_edge_crop; idefics2: the smallest side after resizing
    longest_edge: int | None = None  # idefics3: the first resize; idefics2: the largest side (and the canvas)
    image_splitting: bool = False  # idefics3, idefics2
    max_tiles: int = field(default=1)  # internvl: the grid's largest tile count (the thumbnail comes on top)
    min_tiles: int = 1  # internvl only
    # qwen2vl only (0 elsewhere); tile_size is then the resize factor (patch_size * merge_size, both sides)
    patch_size: int = 0
    temporal_patch_size: int = 0
    merge_size: int = 0
    min_pixels: int = 0
    max_pixels: int = 0
    # gemma3 with image_splitting (pan-and-scan); max_tiles is then the most crops
    pan_and_scan_min_crop: int = 0
    pan_and_scan_min_ratio: float = 0.0
    # anyres only: the (height, width) canvases a grid may take, and the most tiles' worth of features kept unpooled
    # ("anyres_max_9": 9); patch_size is then the tower's patch (a tile's features are (tile // patch)^2)
    grid_pinpoints: tuple[tuple[int, int], ...] = ()
    max_pooled_tiles: int = 0

    def __post_init__(self) -> None:
        if self.resize_rule not in RESIZE_RULES:
            raise ValueError(f"resize_rule {self.resize_rule!r} is not one of {RESIZE_RULES}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample {self.resample!r} is not one of {sorted(RESAMPLE)}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std need three values, std > 0")
        if self.resize_rule == "shortest_edge_crop" and not self.shortest_edge:
            raise ValueError("shortest_edge_crop needs shortest_edge")
        if self.resize_rule == "idefics3" and not self.longest_edge:
            raise ValueError("idefics3 resizing needs longest_edge")
        if self.resize_rule == "idefics2" and not (self.shortest_edge and self.longest_edge
                                                   and self.shortest_edge <= self.longest_edge
                                                   and tuple(self.tile_size) == (self.longest_edge,) * 2):
            raise ValueError("idefics2 resizing needs 0 < shortest_edge <= longest_edge and a longest_edge square tile")
        if self.resize_rule == "qwen2vl":
            self._check_qwen2vl()
        object.__setattr__(self, "grid_pinpoints", tuple(tuple(int(v) for v in p) for p in self.grid_pinpoints))
        if self.resize_rule == "anyres":
            self._check_anyres()
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"tile counts need 1 <= min_tiles ({self.min_tiles}) <= max_tiles ({self.max_tiles})")
        object.__setattr__(self, "tile_size", tuple(int(v) for v in self.tile_size))
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    def _check_qwen2vl(self) -> None:
        numbers = {"patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                   "merge_size": self.merge_size, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}
        bad = [f"{k}={v!r}" for k, v in numbers.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            raise ValueError(f"qwen2vl resizing needs positive integers: {', '.join(bad)}")
        factor = self.patch_size * self.merge_size
        if tuple(self.tile_size) != (factor, factor):
            raise ValueError(f"qwen2vl: tile_size {tuple(self.tile_size)} must be the resize factor ({factor}, {factor})")
        if not factor * factor <= self.max_pixels or self.min_pixels > self.max_pixels:
            raise ValueError(f"qwen2vl needs {factor * factor} <= max_pixels and min_pixels <= max_pixels, got "
                             f"min_pixels={self.min_pixels}, max_pixels={self.max_pixels}")

    def _check_anyres(self) -> None:
        tile = self.tile_size[0]
        # the tower's conv floors (SigLIP-so400m/14 at 384: 27 x 27 patches), so patch_size need not divide the tile
        if self.tile_size[1] != tile or not 1 <= self.patch_size <= tile or self.max_pooled_tiles < 1:
            raise ValueError(f"anyres needs a square tile, 1 <= patch_size <= tile and max_pooled_tiles >= 1, got tile "
                             f"{tuple(self.tile_size)}, patch_size {self.patch_size}, max_pooled_tiles "
                             f"{self.max_pooled_tiles}")
        bad = [p for p in self.grid_pinpoints if len(p) != 2 or min(p) < tile or p[0] % tile or p[1] % tile]
        if not self.grid_pinpoints or bad:
            raise ValueError(f"anyres needs grid_pinpoints that are (height, width) multiples of the {tile}-px tile, "
                             f"got {list(self.grid_pinpoints) or 'none'}")

    def anyres_rows(self, height: int, width: int) -> int:
        """anyres: the embedding rows (image tokens) of one height x width image after packing."""
        return anyres.packed_rows(height, width, self.grid_pinpoints, self.tile_size[0],
                                  self.tile_size[0] // self.patch_size, self.max_pooled_tiles)

    def pack_anyres(self, embeds: np.ndarray, height: int, width: int) -> np.ndarray:
        """anyres: encoder rows (tiles, side^2 + 1, D) of one image -> its packed (anyres_rows, D) rows."""
        return anyres.pack(embeds, height, width, self.grid_pinpoints, self.tile_size[0],
                           self.tile_size[0] // self.patch_size, self.max_pooled_tiles)

    @property
    def channels(self) -> int:
        """Channels of an encoder input: RGB, plus the pixel mask for idefics2's padded tiles."""
        return 4 if self.resize_rule == "idefics2" else 3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known})


@dataclass
class PreprocessedImage:
    pixel_values: np.ndarray  # (tiles, 3, H, W) float32
    rows: int  # 0 when the image is not split (one global tile); qwen2vl: merged-token rows (h / merge)
    cols: int
    grid: tuple[int, int, int] | None = None  # qwen2vl: (t, h, w) in patches, what the grid encoder takes
    source_size: tuple[int, int] | None = None  # anyres: the image's (height, width), which the packing unpads to


def _resize(image: Image.Image, height: int, width: int, resample: str) -> Image.Image:
    if image.size == (width, height):
        # PIL returns a copy for same-size resizes; the HF processors do the same, so no numeric change.
        return image.copy()
    return image.resize((width, height), resample=RESAMPLE[resample])


def _normalize(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # (3, H, W)
    # Same arithmetic and order as transformers.image_transforms.rescale/normalize.
    scaled = (array.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.image_std, dtype=np.float32)[:, None, None]
    return ((scaled - mean) / std).astype(np.float32)


def _shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def longest_edge_to(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) with the longest edge at `longest` and the other side rounded up to even (transformers'
    Idefics3 _resize_output_size_rescale_to_max_len; SmolVLM's video frames take the same first resize)."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    # transformers' Idefics3 _resize_output_size_rescale_to_max_len + scale_below_upper_bound.
    height, width = longest_edge_to(height, width, longest)
    aspect = width / height
    if width >= height and width > MAX_TILE_SIDE_PIXELS:
        width, height = MAX_TILE_SIDE_PIXELS, int(MAX_TILE_SIDE_PIXELS / aspect)
    elif height > width and height > MAX_TILE_SIDE_PIXELS:
        height, width = MAX_TILE_SIDE_PIXELS, int(MAX_TILE_SIDE_PIXELS * aspect)
    return max(height, 1), max(width, 1)


def _tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def internvl_grid(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(rows, cols): transformers' GotOcr2 get_optimal_tiled_canvas. Candidates ordered by tile count (cols outer,
    rows inner, stable sort); the closest aspect ratio wins; on a tie, the larger grid wins while the image's area
    exceeds half the grid's."""
    th, tw = spec.tile_size
    candidates = sorted(((c, r) for c in range(1, spec.max_tiles + 1) for r in range(1, spec.max_tiles + 1)
                         if spec.min_tiles <= c * r <= spec.max_tiles), key=lambda cr: cr[0] * cr[1])
    aspect, area = width / height, width * height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * th * tw * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


def smart_resize(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(height, width) after Qwen2VLImageProcessor's resize (image_processing_pil_qwen2_vl.smart_resize, 5.23): round
    to multiples of the factor, then scale down into max_pixels or up into min_pixels keeping the aspect ratio."""
    factor = spec.patch_size * spec.merge_size
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image {width}x{height}: aspect ratio above {MAX_ASPECT_RATIO}, which Qwen2-VL refuses")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > spec.max_pixels:
        beta = math.sqrt((height * width) / spec.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < spec.min_pixels:
        beta = math.sqrt(spec.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def max_merged_tokens(spec: PreprocessSpec) -> int:
    """An upper bound on smart_resize's merged tokens for any image: max_pixels' worth, or one factor-high strip at
    the largest aspect ratio (smart_resize keeps each side >= factor, which can overshoot max_pixels there)."""
    factor = spec.patch_size * spec.merge_size
    strip = math.isqrt(spec.max_pixels * MAX_ASPECT_RATIO) // factor + 1
    return max(spec.max_pixels // factor**2, strip, math.ceil(spec.min_pixels / factor**2) + 2 * strip)


def _patchify(array: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(3, H, W) -> (H/p * W/p, 3*T*p*p): Qwen2VLImageProcessorPil.patchify (merge blocks row-major, patches row-major
    inside a block; per patch channel, then the T repeated frames, then the p x p pixels)."""
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    c, height, width = array.shape
    gh, gw = height // p, width // p
    patches = array.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, c, p, p)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))  # the frame, T times
    return np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p), dtype=np.float32)


def tile_grid(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(rows, cols) of the split for an RGB image of this size; (0, 0) when only the global view is used.
    qwen2vl: (rows, cols) of merged tokens, never (0, 0)."""
    if spec.resize_rule == "qwen2vl":
        h, w = smart_resize(height, width, spec)
        factor = spec.patch_size * spec.merge_size
        return h // factor, w // factor
    if spec.resize_rule == "internvl":
        rows, cols = internvl_grid(height, width, spec) if spec.max_tiles > 1 else (1, 1)
        return (0, 0) if rows * cols == 1 else (rows, cols)
    if spec.resize_rule == "gemma3":
        return pan_and_scan_grid(height, width, spec)
    if spec.resize_rule == "idefics2":
        return (2, 2) if spec.image_splitting else (0, 0)
    if spec.resize_rule == "anyres":
        return anyres.grid(height, width, spec.grid_pinpoints, spec.tile_size[0])
    if spec.resize_rule != "idefics3" or not spec.image_splitting:
        return 0, 0
    tile = spec.tile_size[0]
    h, w = _tile_multiple_size(*_longest_edge_size(height, width, spec.longest_edge), tile)
    if h > tile or w > tile:
        return (h - tile) // tile + 1, (w - tile) // tile + 1
    return 0, 0


def preprocess(image: Image.Image, spec: PreprocessSpec) -> PreprocessedImage:
    """RGB PIL image -> (tiles, 3, H, W) float32, identical to the HF processor for the same config."""
    width, height = image.size
    th, tw = spec.tile_size
    if spec.resize_rule == "qwen2vl":
        return _preprocess_qwen2vl(image, spec)
    if spec.resize_rule == "gemma3":
        rows, cols = pan_and_scan_grid(height, width, spec)
        tiles = [image]
        if rows:  # crops cut from the original pixels, row-major, after the whole image
            ch, cw = math.ceil(height / rows), math.ceil(width / cols)
            tiles += [image.crop((c * cw, r * ch, min((c + 1) * cw, width), min((r + 1) * ch, height)))
                      for r in range(rows) for c in range(cols)]
        return PreprocessedImage(np.stack([_normalize(_resize(t, th, tw, spec.resample), spec) for t in tiles]),
                                 rows, cols)
    if spec.resize_rule == "idefics2":
        return _preprocess_idefics2(image, spec)
    if spec.resize_rule == "anyres":
        return _preprocess_anyres(image, spec)
    if spec.resize_rule == "fixed":
        return PreprocessedImage(_normalize(_resize(image, th, tw, spec.resample), spec)[None], 0, 0)
    if spec.resize_rule == "shortest_edge_crop":
        h, w = _shortest_edge_size(height, width, spec.shortest_edge)
        resized = np.asarray(_resize(image, h, w, spec.resample))
        top, left = (h - th) // 2, (w - tw) // 2
        if top < 0 or left < 0:
            raise ValueError(f"crop {th}x{tw} is larger than the resized image {h}x{w}")
        cropped = Image.fromarray(resized[top : top + th, left : left + tw])
        return PreprocessedImage(_normalize(cropped, spec)[None], 0, 0)
    if spec.resize_rule == "internvl":
        rows, cols = tile_grid(height, width, spec)
        if rows == 0:
            return PreprocessedImage(_normalize(_resize(image, th, tw, spec.resample), spec)[None], 0, 0)
        canvas = _resize(image, rows * th, cols * tw, spec.resample)
        tiles = [canvas.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th)) for r in range(rows) for c in range(cols)]
        tiles.append(_resize(image, th, tw, spec.resample))  # the thumbnail comes last
        return PreprocessedImage(np.stack([_normalize(t, spec) for t in tiles]), rows, cols)
    # idefics3
    h, w = _longest_edge_size(height, width, spec.longest_edge)
    image = _resize(image, h, w, spec.resample)
    if not spec.image_splitting:
        return PreprocessedImage(_normalize(_resize(image, th, tw, spec.resample), spec)[None], 0, 0)
    h, w = _tile_multiple_size(h, w, th)
    image = _resize(image, h, w, spec.resample)
    if h <= th and w <= tw:
        return PreprocessedImage(_normalize(image, spec)[None], 0, 0)
    rows, cols = (h - th) // th + 1, (w - tw) // tw + 1
    tiles = [image.crop((c * tw, r * th, (c + 1) * tw, (r + 1) * th)) for r in range(rows) for c in range(cols)]
    tiles.append(_resize(image, th, tw, spec.resample))  # the global view comes last
    return PreprocessedImage(np.stack([_normalize(t, spec) for t in tiles]), rows, cols)


def _preprocess_qwen2vl(image: Image.Image, spec: PreprocessSpec) -> PreprocessedImage:
    width, height = image.size
    h, w = smart_resize(height, width, spec)
    patches = _patchify(_normalize(_resize(image, h, w, spec.resample), spec), spec)  # (P, 3*T*p*p)
    factor = spec.patch_size * spec.merge_size
    return PreprocessedImage(patches, h // factor, w // factor, grid=(1, h // spec.patch_size, w // spec.patch_size))


def pan_and_scan_grid(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(rows, cols) of Gemma 3's pan-and-scan crops (Gemma3ImageProcessor.pan_and_scan), (0, 0) when it does not
    apply: off, an aspect ratio under pan_and_scan_min_ratio, or crops under pan_and_scan_min_crop pixels."""
    if not spec.image_splitting:
        return 0, 0
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < spec.pan_and_scan_min_ratio:
        return 0, 0
    n = min(int(math.floor(long_side / short_side + 0.5)), int(math.floor(long_side / spec.pan_and_scan_min_crop)))
    n = min(spec.max_tiles, max(2, n))
    rows, cols = (1, n) if width >= height else (n, 1)
    if min(math.ceil(width / cols), math.ceil(height / rows)) < spec.pan_and_scan_min_crop:
        return 0, 0
    return rows, cols


def idefics2_size(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(height, width) after Idefics2's resize (image_processing_pil_idefics2.get_resize_output_image_size, 5.23)."""
    aspect = width / height
    if width >= height and width > spec.longest_edge:
        width, height = spec.longest_edge, int(spec.longest_edge / aspect)
    elif height > width and height > spec.longest_edge:
        height, width = spec.longest_edge, int(spec.longest_edge * aspect)
    return max(height, spec.shortest_edge), max(width, spec.shortest_edge)


def _preprocess_idefics2(image: Image.Image, spec: PreprocessSpec) -> PreprocessedImage:
    width, height = image.size
    if spec.image_splitting:  # quarters (split at the floor of the half) then the whole, before resizing
        mw, mh = width // 2, height // 2
        boxes = [(0, 0, mw, mh), (mw, 0, width, mh), (0, mh, mw, height), (mw, mh, width, height)]
        parts = [image.crop(box) for box in boxes] + [image]
    else:
        parts = [image]
    side = spec.longest_edge
    tiles = np.zeros((len(parts), 4, side, side), dtype=np.float32)
    for tile, part in zip(tiles, parts):
        h, w = idefics2_size(part.size[1], part.size[0], spec)
        tile[:3, :h, :w] = _normalize(_resize(part, h, w, spec.resample), spec)
        tile[3, :h, :w] = 1.0
    rows, cols = tile_grid(height, width, spec)
    return PreprocessedImage(tiles, rows, cols)


def _preprocess_anyres(image: Image.Image, spec: PreprocessSpec) -> PreprocessedImage:
    """LlavaOnevisionImageProcessorPil.get_image_patches for a single image: the base view, then the grid's tiles."""
    width, height = image.size
    tile = spec.tile_size[0]
    best_h, best_w = anyres.select_best_resolution(height, width, spec.grid_pinpoints)
    fit_h, fit_w = anyres.fitted_size(height, width, (best_h, best_w))
    canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))  # HF pads with zeros before rescaling
    canvas.paste(_resize(image, fit_h, fit_w, spec.resample), ((best_w - fit_w) // 2, (best_h - fit_h) // 2))
    rows, cols = best_h // tile, best_w // tile
    tiles = [_resize(image, tile, tile, spec.resample)]
    tiles += [canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)]
    return PreprocessedImage(np.stack([_normalize(t, spec) for t in tiles]), rows, cols, source_size=(height, width))


def preprocess_square_view(image: Image.Image, spec: PreprocessSpec) -> PreprocessedImage:
    """anyres, one image of several in a prompt (LlavaOnevisionImageProcessorPil with batch_num_images > 1): no grid,
    the image padded to a square with the mean colour (int(mean * 255), centred), resized to one tile."""
    width, height = image.size
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in spec.image_mean))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    tile = _resize(canvas, spec.tile_size[0], spec.tile_size[1], spec.resample)
    return PreprocessedImage(_normalize(tile, spec)[None], 0, 0)
