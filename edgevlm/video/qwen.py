"""Qwen2-VL / Qwen2.5-VL video, torch-free: frames sampled, resized and patchified as transformers'
`Qwen2VLVideoProcessor` does (what `Qwen2_5_VLProcessor` runs), the temporal-patch time scaling of Qwen2.5-VL's
M-RoPE (`second_per_grid_ts` x `tokens_per_second`), and a content key per temporal patch (2 frames) for the
embedding cache.

References, transformers 5.23: video_processing_qwen2_vl.py (`sample_frames`, `resize`, `patchify`),
processing_qwen2_5_vl.py (`second_per_grid_ts = temporal_patch_size / sampled_fps`), video_utils.VideoMetadata
(`sampled_fps = len(indices) / total_num_frames * fps`).

The vision tower attends only inside one temporal patch (its cu_seqlens cut the sequence at every t), so a video's
embeddings are those of its temporal patches, each encoded as a (1, h, w) grid by the image graph.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from .clip import VideoClip
from .resize import fused_normalize, resize_bicubic_aa

VIDEO_TOKEN, VIDEO_TOKEN_ID = "<|video_pad|>", 151656
# Qwen2VLVideoProcessor's class defaults (size.shortest_edge / longest_edge, min/max frames); qwen-vl-utils' fps
DEFAULT_VIDEO_MIN_PIXELS, DEFAULT_VIDEO_MAX_PIXELS = 128 * 28 * 28, 28 * 28 * 768
DEFAULT_FPS, DEFAULT_MIN_FRAMES, DEFAULT_MAX_FRAMES = 2.0, 4, 768
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class QwenVideoSpec:
    """How a Qwen2-VL / Qwen2.5-VL checkpoint reads video; written beside the image preprocessing (a manifest's
    "video" section: `kind` + to_dict(), the shape the video-smol branch's edgevlm/video/kinds.py reads)."""

    kind: ClassVar[str] = "qwen2_vl"
    min_pixels: int = DEFAULT_VIDEO_MIN_PIXELS
    max_pixels: int = DEFAULT_VIDEO_MAX_PIXELS
    fps: float = DEFAULT_FPS  # frames sampled per second of source
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    # Qwen2.5-VL: a temporal patch advances M-RoPE's t by tokens_per_second x its seconds; None (Qwen2-VL): by 1
    tokens_per_second: float | None = None
    video_token_id: int = VIDEO_TOKEN_ID

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "min_frames", "max_frames", "patch_size", "temporal_patch_size",
                     "merge_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"qwen video spec: {name} must be >= 1, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels or self.min_frames > self.max_frames:
            raise ValueError(f"qwen video spec: min above max ({self.min_pixels}/{self.max_pixels} pixels, "
                             f"{self.min_frames}/{self.max_frames} frames)")
        if not self.fps > 0 or (self.tokens_per_second is not None and not self.tokens_per_second > 0):
            raise ValueError(f"qwen video spec: fps and tokens_per_second must be > 0, got {self.fps}, "
                             f"{self.tokens_per_second}")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size**2

    # the unit protocol edgevlm.video.kinds names: a temporal patch of 2 frames, encoded and cached alone
    unit_name: ClassVar[str] = "temporal patch"

    @property
    def frames_per_unit(self) -> int:
        return self.temporal_patch_size

    def tokens_per_unit(self, height: int, width: int, tokens_per_tile: int = 0,
                        n_frames: int | None = None) -> int:
        """Merged tokens of one temporal patch of (height, width) source frames (smart_resize, 2x2 merge)."""
        h, w = smart_resize(height, width, self)
        return (h // self.factor) * (w // self.factor)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    def sample(self, total_frames: int, source_fps: float, max_frames: int | None = None,
               fps: float | None = None) -> np.ndarray:
        """Indices of the frames to decode (the generic sampler hook: a caller's --max-frames caps the processor's)."""
        if max_frames is not None and max_frames < self.temporal_patch_size:
            raise ValueError(f"max_frames {max_frames} is under one temporal patch: pass --max-frames "
                             f"{self.temporal_patch_size} or more (Qwen video takes frames {self.temporal_patch_size} "
                             "at a time)")
        spec = self if max_frames is None else replace(self, max_frames=max_frames,
                                                       min_frames=min(self.min_frames, max_frames))
        return sample_indices(total_frames, source_fps, spec, fps)

    @classmethod
    def from_dict(cls, data: dict) -> "QwenVideoSpec":
        known = {f.name for f in fields(cls)}  # not `kind` (a ClassVar)
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known})


def read_video_processor_config(folder: Path) -> dict:
    """The video processor's settings as AutoVideoProcessor finds them: processor_config.json's "video_processor",
    else video_preprocessor_config.json, else preprocessor_config.json (then the image processor's min/max pixels
    become the video's: Qwen2VLVideoProcessor.__init__ lets them override its size)."""
    folder = Path(folder)
    nested = folder / "processor_config.json"
    if nested.exists():
        data = json.loads(nested.read_text())
        if isinstance(data.get("video_processor"), dict):
            return data["video_processor"]
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    return {}


def video_spec(config: dict, video_processor: dict, fps: float | None = None) -> QwenVideoSpec:
    """The spec of a checkpoint from config.json and its video processor's settings (read_video_processor_config).
    `fps` overrides the processor's (which has none saved unless the checkpoint sets one: then 2, qwen-vl-utils')."""
    size = video_processor.get("size") or {}

    def pixels(key: str, size_key: str, default: int) -> int:
        value = video_processor.get(key)
        return int(value if value is not None else size.get(size_key) or default)

    architecture = next(iter(config.get("architectures") or []), "")
    vision = config.get("vision_config") or {}
    scaled = architecture == "Qwen2_5_VLForConditionalGeneration"  # Qwen2-VL's get_rope_index has no time scaling
    return QwenVideoSpec(
        min_pixels=pixels("min_pixels", "shortest_edge", DEFAULT_VIDEO_MIN_PIXELS),
        max_pixels=pixels("max_pixels", "longest_edge", DEFAULT_VIDEO_MAX_PIXELS),
        fps=float(fps or video_processor.get("fps") or DEFAULT_FPS),
        min_frames=int(video_processor.get("min_frames") or DEFAULT_MIN_FRAMES),
        max_frames=int(video_processor.get("max_frames") or DEFAULT_MAX_FRAMES),
        patch_size=int(video_processor.get("patch_size") or 14),
        temporal_patch_size=int(video_processor.get("temporal_patch_size") or 2),
        merge_size=int(video_processor.get("merge_size") or 2),
        rescale_factor=float(video_processor.get("rescale_factor") or 1 / 255),
        image_mean=video_processor.get("image_mean") or CLIP_MEAN,
        image_std=video_processor.get("image_std") or CLIP_STD,
        tokens_per_second=float(vision.get("tokens_per_second") or 4) if scaled else None,  # 4: HF config default
        video_token_id=int(config.get("video_token_id") or VIDEO_TOKEN_ID),
    )


def sample_indices(total_frames: int, source_fps: float, spec: QwenVideoSpec, fps: float | None = None) -> np.ndarray:
    """Qwen2VLVideoProcessor.sample_frames with `fps`: the frame count is total / source_fps x fps, clamped to
    [min_frames, min(max_frames, total)] and floored to the temporal patch, spread evenly from frame 0."""
    fps = spec.fps if fps is None else fps
    tp = spec.temporal_patch_size
    max_frames = math.floor(min(spec.max_frames, total_frames) / tp) * tp
    wanted = min(max(total_frames / source_fps * fps, spec.min_frames), max_frames, total_frames)
    n = math.floor(wanted / tp) * tp
    if n < 1:
        raise ValueError(f"a clip of {total_frames} frames is shorter than one temporal patch ({tp} frames)")
    # torch.arange(0, total, total / n).int(): a float32 tensor whose length is computed in float64
    step = total_frames / n
    count = math.ceil(total_frames / step)
    return (np.arange(count, dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def smart_resize(height: int, width: int, spec: QwenVideoSpec) -> tuple[int, int]:
    """transformers' qwen2_vl smart_resize with the video's pixel limits."""
    factor = spec.factor
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"the video's aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > spec.max_pixels:
        beta = math.sqrt(height * width / spec.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < spec.min_pixels:
        beta = math.sqrt(spec.min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class TemporalPatches:
    """The geometry and pixels of a sampled Qwen clip (Qwen2-VL / 2.5-VL's QwenVideo, Qwen3-VL's Qwen3Video): needs
    `frames` ((t * temporal_patch_size, H, W, 3) uint8), `size` ((height, width) after smart_resize) and `spec`."""

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) in patches: video_grid_thw."""
        p = self.spec.patch_size
        return len(self.frames) // self.spec.temporal_patch_size, self.size[0] // p, self.size[1] // p

    @property
    def merged(self) -> tuple[int, int, int]:
        """(t, rows, cols) of the video's tokens: one token per 2x2 merge block of each temporal patch."""
        t, h, w = self.grid
        return t, h // self.spec.merge_size, w // self.spec.merge_size

    def pixel_patches(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """(n * h * w, patch_dim) float32 patches of temporal patches [start, stop), in pixel_values_videos' order."""
        spec, tp = self.spec, self.spec.temporal_patch_size
        stop = self.grid[0] if stop is None else stop
        frames = resize_bicubic_aa(self.frames[start * tp:stop * tp], *self.size)  # (n*tp, H, W, 3) uint8
        values = fused_normalize(frames, spec.rescale_factor, spec.image_mean, spec.image_std)
        values = values.transpose(0, 3, 1, 2)  # (n*tp, C, H, W)
        return patchify(values, spec)


@dataclass(frozen=True)
class QwenVideo(TemporalPatches):
    """A sampled clip, ready to be patchified one temporal patch at a time (nothing resized until asked)."""

    frames: np.ndarray  # (t * temporal_patch_size, H, W, 3) uint8 sampled source frames, last repeated to fill
    timestamps_s: np.ndarray  # (same,) their source times
    size: tuple[int, int]  # (height, width) after smart_resize
    second_per_grid_t: float  # seconds one temporal patch covers (temporal_patch_size / sampled fps)
    spec: QwenVideoSpec
    patch_keys: tuple[str, ...]  # one content key per temporal patch

    @property
    def n_tokens(self) -> int:
        t, rows, cols = self.merged
        return t * rows * cols

    @property
    def time_interval(self) -> float:
        """M-RoPE t advance per temporal patch (get_rope_index's time_interval), before truncation."""
        tps = self.spec.tokens_per_second
        # float32, as transformers multiplies the processor's float32 second_per_grid_ts tensor
        return 1.0 if tps is None else float(np.float32(tps) * np.float32(self.second_per_grid_t))


def patchify(values: np.ndarray, spec: QwenVideoSpec) -> np.ndarray:
    """(n*tp, C, H, W) -> (n*h*w, C*tp*p*p), Qwen2VLVideoProcessor.patchify's layout (merge blocks row-major)."""
    tp, p, m = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    frames, channels, height, width = values.shape
    gt, gh, gw = frames // tp, height // p, width // p
    patches = values.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p)
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches.reshape(gt * gh * gw, channels * tp * p * p), dtype=np.float32)


def patch_key(frames: np.ndarray, size: tuple[int, int], spec: QwenVideoSpec) -> str:
    """One temporal patch's identity: its frames' pixels, the size they are resized to and the preprocessing."""
    digest = hashlib.sha256()
    digest.update(f"qwen-video {frames.shape} {size}".encode())
    digest.update(np.ascontiguousarray(frames).tobytes())
    spec_part = {k: v for k, v in spec.to_dict().items() if k not in ("kind", "fps", "min_frames", "max_frames",
                                                                      "tokens_per_second", "video_token_id")}
    digest.update(json.dumps(spec_part, sort_keys=True).encode())
    return digest.hexdigest()


def prepare_video(clip: VideoClip, spec: QwenVideoSpec, fps: float | None = None, sample: bool = True) -> QwenVideo:
    """Sample (unless `sample` is False: the clip's frames are the sampled ones, at its source_fps), pad to whole
    temporal patches by repeating the last frame, and key each temporal patch."""
    if sample:
        indices = sample_indices(clip.num_frames, clip.source_fps, spec, fps)
        sampled_fps = len(indices) / clip.num_frames * clip.source_fps  # VideoMetadata.sampled_fps
        clip = clip.select(indices)
    else:
        sampled_fps = clip.source_fps
    tp = spec.temporal_patch_size
    frames, times = clip.frames, clip.timestamps_s
    if pad := -len(frames) % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        times = np.concatenate([times, np.repeat(times[-1:], pad)])
    size = smart_resize(frames.shape[1], frames.shape[2], spec)
    keys = tuple(patch_key(frames[i:i + tp], size, spec) for i in range(0, len(frames), tp))
    return QwenVideo(frames, times, size, tp / sampled_fps, spec, keys)


def expand_video_tokens(text: str, videos: list[QwenVideo], token: str = VIDEO_TOKEN) -> str:
    """Qwen2_5_VLProcessor's expansion: each `token` in the rendered text becomes the video's n_tokens copies."""
    pieces = text.split(token)
    if len(pieces) - 1 != len(videos):
        raise ValueError(f"the text has {len(pieces) - 1} {token} placeholders for {len(videos)} videos")
    return pieces[0] + "".join(token * video.n_tokens + piece for video, piece in zip(videos, pieces[1:]))
