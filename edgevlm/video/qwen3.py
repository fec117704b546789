"""Qwen3-VL video, torch-free: frames sampled, resized and patchified as transformers' `Qwen3VLVideoProcessor` does,
and the per-temporal-patch prompt text `Qwen3VLProcessor` writes ("<t seconds>" then the patch's own
<|vision_start|> <|video_pad|> x n <|vision_end|>), whose patches get M-RoPE positions as separate images (no time
scaling: get_rope_index splits video_grid_thw into t grids of (1, h, w); the time is in the text).

References, transformers 5.23: video_processing_qwen3_vl.py (`sample_frames`: int(total / fps_src x fps) frames
clamped to [min_frames, min(max_frames, total)], np.linspace(0, total - 1, n).round(); `smart_resize` over the
volume t x h x w with size.shortest_edge / longest_edge; `patchify` pads the last temporal patch by repeating the
last frame), processing_qwen3_vl.py (`replace_video_token`, `_calculate_timestamps`: the mean of a patch's first and
last frame times, idx / fps, formatted "%.1f"). See docs/notes/2026-12-07-qwen3-video.md.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar

import numpy as np

from .clip import VideoClip
from .qwen import VIDEO_TOKEN, VIDEO_TOKEN_ID, TemporalPatches, patch_key

# Qwen3VLVideoProcessor's class defaults
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 128 * 32 * 32, 32 * 32 * 768
DEFAULT_FPS, DEFAULT_MIN_FRAMES, DEFAULT_MAX_FRAMES, DEFAULT_MAX_VIDEO_TOKENS = 2.0, 4, 768, 768
HALF = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN / _STD
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclass(frozen=True)
class Qwen3VideoSpec:
    """How a Qwen3-VL checkpoint reads video (a manifest's "video" section: `kind` + to_dict())."""

    kind: ClassVar[str] = "qwen3_vl"
    min_pixels: int = DEFAULT_MIN_PIXELS  # size.shortest_edge: over the whole sampled volume t x h x w
    max_pixels: int = DEFAULT_MAX_PIXELS  # size.longest_edge: likewise
    fps: float = DEFAULT_FPS
    min_frames: int = DEFAULT_MIN_FRAMES
    max_frames: int = DEFAULT_MAX_FRAMES
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = HALF
    image_std: tuple[float, float, float] = HALF
    cap_pixels_per_frame: bool = False  # the processor's opt-in qwen-vl-utils cap (None there means False)
    max_video_tokens: int = DEFAULT_MAX_VIDEO_TOKENS
    video_token_id: int = VIDEO_TOKEN_ID

    def __post_init__(self) -> None:
        for name in ("min_pixels", "max_pixels", "min_frames", "max_frames", "patch_size", "temporal_patch_size",
                     "merge_size", "max_video_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"qwen3 video spec: {name} must be >= 1, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels or self.min_frames > self.max_frames or not self.fps > 0:
            raise ValueError(f"qwen3 video spec: min above max or fps <= 0 ({self.min_pixels}/{self.max_pixels} "
                             f"pixels, {self.min_frames}/{self.max_frames} frames, fps {self.fps})")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        object.__setattr__(self, "cap_pixels_per_frame", bool(self.cap_pixels_per_frame))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    # the unit protocol (edgevlm.video.kinds): a temporal patch of 2 frames, encoded and cached alone
    unit_name: ClassVar[str] = "temporal patch"

    @property
    def frames_per_unit(self) -> int:
        return self.temporal_patch_size

    def tokens_per_unit(self, height: int, width: int, tokens_per_tile: int = 0, n_frames: int | None = None) -> int:
        """Merged tokens of one temporal patch when `n_frames` frames of (height, width) are sampled: the resize
        budget is the whole clip's (None: one temporal patch's)."""
        h, w = smart_resize(n_frames or self.temporal_patch_size, height, width, self)
        return (h // self.factor) * (w // self.factor)

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "Qwen3VideoSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known})

    def sample(self, total_frames: int, source_fps: float, max_frames: int | None = None,
               fps: float | None = None) -> np.ndarray:
        """Indices of the frames to decode (a caller's --max-frames caps the processor's max_frames)."""
        if max_frames is not None and max_frames < self.temporal_patch_size:
            raise ValueError(f"max_frames {max_frames} is under one temporal patch: pass --max-frames "
                             f"{self.temporal_patch_size} or more (Qwen3-VL video takes frames "
                             f"{self.temporal_patch_size} at a time)")
        spec = self if max_frames is None else replace(self, max_frames=max_frames,
                                                       min_frames=min(self.min_frames, max_frames))
        return sample_indices(total_frames, source_fps, spec, fps)


def video_spec(video_processor: dict, config: dict | None = None, fps: float | None = None) -> Qwen3VideoSpec:
    """The spec from the video processor's saved settings (edgevlm.video.qwen.read_video_processor_config's dict;
    Qwen3VLVideoProcessor reads size.shortest_edge / longest_edge, not min_pixels / max_pixels)."""
    size = video_processor.get("size") or {}
    config = config or {}
    return Qwen3VideoSpec(
        min_pixels=int(size.get("shortest_edge") or DEFAULT_MIN_PIXELS),
        max_pixels=int(size.get("longest_edge") or DEFAULT_MAX_PIXELS),
        fps=float(fps or video_processor.get("fps") or DEFAULT_FPS),
        min_frames=int(video_processor.get("min_frames") or DEFAULT_MIN_FRAMES),
        max_frames=int(video_processor.get("max_frames") or DEFAULT_MAX_FRAMES),
        patch_size=int(video_processor.get("patch_size") or 16),
        temporal_patch_size=int(video_processor.get("temporal_patch_size") or 2),
        merge_size=int(video_processor.get("merge_size") or 2),
        rescale_factor=float(video_processor.get("rescale_factor") or 1 / 255),
        image_mean=video_processor.get("image_mean") or HALF,
        image_std=video_processor.get("image_std") or HALF,
        cap_pixels_per_frame=bool(video_processor.get("cap_pixels_per_frame") or False),
        max_video_tokens=int(video_processor.get("max_video_tokens") or DEFAULT_MAX_VIDEO_TOKENS),
        video_token_id=int(config.get("video_token_id") or VIDEO_TOKEN_ID),
    )


def sample_indices(total_frames: int, source_fps: float, spec: Qwen3VideoSpec, fps: float | None = None) -> np.ndarray:
    """Qwen3VLVideoProcessor.sample_frames with `fps`: int(total / source_fps x fps) frames, clamped to
    [min_frames, min(max_frames, total)], spread with linspace(0, total - 1).round() (an odd count is padded later)."""
    fps = spec.fps if fps is None else fps
    n = min(max(int(total_frames / source_fps * fps), spec.min_frames), spec.max_frames, total_frames)
    if n < spec.temporal_patch_size:  # the processor's smart_resize refuses t < temporal_patch_size
        raise ValueError(f"a clip of {total_frames} frames is shorter than one temporal patch "
                         f"({spec.temporal_patch_size} frames)")
    return np.linspace(0, total_frames - 1, n).round().astype(np.int64)


def smart_resize(n_frames: int, height: int, width: int, spec: Qwen3VideoSpec) -> tuple[int, int]:
    """video_processing_qwen3_vl.smart_resize with the spec's budget (and the per-frame cap where the spec asks)."""
    factor, tp = spec.factor, spec.temporal_patch_size
    max_pixels = spec.max_pixels
    if spec.cap_pixels_per_frame:
        per_frame = max(min(spec.max_video_tokens * factor * factor, spec.max_pixels // n_frames),
                        int(spec.min_pixels * 1.05))
        max_pixels = per_frame * n_frames
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"the video's aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(n_frames / tp) * tp
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(n_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < spec.min_pixels:
        beta = math.sqrt(spec.min_pixels / (n_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patch_times(indices, source_fps: float, temporal_patch_size: int) -> list[float]:
    """Qwen3VLProcessor._calculate_timestamps: indices padded with the last to whole patches, idx / fps, then the
    mean of each patch's first and last frame time."""
    indices = [int(i) for i in indices]
    if pad := -len(indices) % temporal_patch_size:
        indices += [indices[-1]] * pad
    times = [i / source_fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def video_text(times: list[float], tokens_per_patch: int, token: str = VIDEO_TOKEN) -> str:
    """What the processor puts in place of the template's one <|video_pad|>: per temporal patch its time, then its
    own vision delimiters around its tokens."""
    return "".join(f"<{t:.1f} seconds>{VISION_START}{token * tokens_per_patch}{VISION_END}" for t in times)


@dataclass(frozen=True)
class Qwen3Video(TemporalPatches):
    """A sampled clip, ready to be patchified one temporal patch at a time."""

    frames: np.ndarray  # (t * temporal_patch_size, H, W, 3) uint8, the last frame repeated to fill
    times: tuple[float, ...]  # per temporal patch: the seconds its text says
    size: tuple[int, int]  # (height, width) after smart_resize over the sampled count
    spec: Qwen3VideoSpec
    patch_keys: tuple[str, ...]

    @property
    def tokens_per_patch(self) -> int:
        _, rows, cols = self.merged
        return rows * cols

    def text(self) -> str:
        return video_text(list(self.times), self.tokens_per_patch)


def prepare_video(clip: VideoClip, spec: Qwen3VideoSpec, indices=None, source_fps: float | None = None,
                  fps: float | None = None) -> Qwen3Video:
    """Sample `clip` (or take its frames as the ones sampled at `indices` of a `source_fps` source: the clip's own
    rate unless given), size it for the sampled count, pad to whole temporal patches and key each one."""
    source_fps = clip.source_fps if source_fps is None else source_fps
    if indices is None:
        indices = sample_indices(clip.num_frames, clip.source_fps, spec, fps)
        clip = clip.select(indices)
    tp = spec.temporal_patch_size
    n_sampled = len(clip.frames)
    size = smart_resize(n_sampled, clip.frames.shape[1], clip.frames.shape[2], spec)
    frames = clip.frames
    if pad := -len(frames) % tp:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    keys = tuple(patch_key(frames[i:i + tp], size, spec) for i in range(0, len(frames), tp))
    return Qwen3Video(frames, tuple(patch_times(indices, source_fps, tp)), size, spec, keys)
