"""SmolVLM2's video input as transformers' SmolVLMVideoProcessor + SmolVLMProcessor build it (transformers 5.23,
models/smolvlm/video_processing_smolvlm.py and processing_smolvlm.py):

- sampling: round(fps x duration) frames, at most max_frames, spread uniformly (np.linspace) over the clip, skipping
  the first and last second when the clip is long enough (`sample_frames`, its quirk kept: the test compares the
  clip's length with max_frames x fps, not with the frames it will take);
- each frame resized twice with LANCZOS on uint8 (longest edge to video_size, the odd side rounded up to even, then
  stretched to the max_image_size square) by torch's uint8 antialiased kernel (int16 weights, video/resize.py; not
  Pillow's, whose int32 weights round 0.8% of values one level apart), rescaled and normalized as the processor's
  fused step does, one unsplit tile per frame;
- the prompt: "You are provided the following series of {count in words} frames from a {H:MM:SS} [H:MM:SS] video.\n",
  then per frame "\nFrame from MM:SS:" + the single-image block, then "\n\n".

Torch-free and PyAV-free: it works on a VideoProbe's numbers and a VideoClip's arrays.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
from PIL import Image

from ..preprocess import RESAMPLE, RESAMPLE_NAMES, PreprocessedImage, longest_edge_to
from .resize import FILTERS, fused_normalize, resize_aa

VIDEO_INTRO = "You are provided the following series of {frame_count} frames from a {video_duration} [H:MM:SS] video.\n"
MEDIA_OUTRO = "\n\n"
FRAME_TIMESTAMP = "\nFrame from {timestamp}:"
MAX_SIDE = 4096  # SmolVLM's MAX_IMAGE_SIZE: the first resize's cap
MAX_FRAMES = 999  # the frame count is written in words; beyond this a prompt would not fit any SmolVLM context


@dataclass(frozen=True)
class SmolVLMVideoSpec:
    """The video processor's settings (preprocessor_config.json's video_sampling, or video_preprocessor_config.json)."""

    fps: float = 1.0
    max_frames: int = 64
    video_longest_edge: int = 512
    frame_size: int = 512  # max_image_size: each frame becomes one square tile of this side
    resample: str = "lanczos"
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    skip_secs: float = 1.0

    def __post_init__(self) -> None:
        if not (self.fps > 0 and 1 <= self.max_frames <= MAX_FRAMES):
            raise ValueError(f"video fps must be > 0 and max_frames in [1, {MAX_FRAMES}], got {self.fps}, "
                             f"{self.max_frames}")
        if not (0 < self.video_longest_edge and 0 < self.frame_size <= MAX_SIDE):
            raise ValueError(f"video sizes must be positive, got {self.video_longest_edge}, {self.frame_size}")
        if self.resample not in RESAMPLE:
            raise ValueError(f"resample {self.resample!r} is not one of {sorted(RESAMPLE)}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std need three values, std > 0")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    kind = "smolvlm"

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "SmolVLMVideoSpec":
        data = {k: v for k, v in data.items() if k != "kind"}
        for key in ("image_mean", "image_std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)

    # the protocol edgevlm.video.kinds names: what a runtime calls, without knowing the family
    def sample(self, total_frames: int, source_fps: float, max_frames: int | None = None,
               fps: float | None = None) -> np.ndarray:
        return sample_indices(total_frames, source_fps, self, max_frames, fps)

    def prompt_text(self, timestamps_s: np.ndarray, duration_s: float, placeholder: str) -> str:
        return video_text(timestamps_s, duration_s, placeholder)

    def preprocess_frame(self, frame: np.ndarray) -> PreprocessedImage:
        return frame_pixels(frame, self)

    def tokens_per_frame(self, tokens_per_tile: int) -> int:
        return tokens_per_tile  # one unsplit tile per frame

    unit_name = "frame"  # each frame is encoded and cached alone
    frames_per_unit = 1

    def tokens_per_unit(self, height: int, width: int, tokens_per_tile: int, n_frames: int | None = None) -> int:
        return tokens_per_tile  # every frame is stretched to one square tile, whatever its size

    @classmethod
    def from_processor(cls, processor: dict, video_processor: dict | None = None) -> "SmolVLMVideoSpec | None":
        """From video_preprocessor_config.json when the checkpoint has one, else from preprocessor_config.json
        (what SmolVLMVideoProcessor.from_pretrained reads then); None when neither describes video. As in
        SmolVLMVideoProcessor.__init__, a `size` beside `video_sampling` overrides its video_size (so a Hub
        preprocessor_config.json's image `size` is the frames' first resize)."""
        source = video_processor or processor
        sampling = source.get("video_sampling")
        if isinstance(sampling, dict):
            fps, frames = sampling.get("fps", 1), sampling.get("max_frames", 64)
            size = source.get("size") or sampling.get("video_size") or {}
        elif video_processor:
            fps, frames = source.get("fps", 1), source.get("num_frames", 64)
            size = source.get("size") or {}
        else:
            return None
        tile = int((source.get("max_image_size") or {}).get("longest_edge", 364))
        return cls(
            fps=float(fps), max_frames=int(frames), video_longest_edge=int(size.get("longest_edge", 4 * 364)),
            frame_size=tile, resample=RESAMPLE_NAMES.get(int(source.get("resample", 1)), "lanczos"),
            rescale_factor=float(source.get("rescale_factor", 1 / 255)),
            image_mean=tuple(source.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(source.get("image_std", (0.5, 0.5, 0.5))),
        )


def sample_indices(total_frames: int, source_fps: float, spec: SmolVLMVideoSpec, max_frames: int | None = None,
                   fps: float | None = None) -> np.ndarray:
    """SmolVLMVideoProcessor.sample_frames: which frame indices a clip of `total_frames` at `source_fps` gives."""
    num_frames = spec.max_frames if max_frames is None else int(max_frames)
    fps = spec.fps if fps is None else float(fps)
    duration = total_frames / source_fps
    desired = max(min(int(round(fps * duration)), num_frames), 1)
    start, end = 0, total_frames - 1
    if spec.skip_secs > 0 and (duration - 2 * spec.skip_secs) > (num_frames * fps):
        start = int(spec.skip_secs * source_fps)
        end = int(total_frames - spec.skip_secs * source_fps)
    start, end = max(0, start), min(end, total_frames - 1)
    if start >= end:
        start, end = 0, total_frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def frame_size(height: int, width: int, spec: SmolVLMVideoSpec) -> tuple[int, int]:
    """The first resize's (height, width): the longest edge to video_size, the other side rounded up to even."""
    return longest_edge_to(height, width, min(MAX_SIDE, spec.video_longest_edge))


def frame_pixels(frame: np.ndarray, spec: SmolVLMVideoSpec) -> PreprocessedImage:
    """One (H, W, 3) uint8 frame -> one (1, 3, S, S) float32 tile, as the video processor computes it."""
    height, width = frame_size(frame.shape[0], frame.shape[1], spec)
    resized = _resize(_resize(frame, height, width, spec), spec.frame_size, spec.frame_size, spec)
    values = fused_normalize(resized, spec.rescale_factor, spec.image_mean, spec.image_std)  # (S, S, 3)
    return PreprocessedImage(np.ascontiguousarray(values.transpose(2, 0, 1))[None], 0, 0)  # (1, 3, S, S)


def _resize(frame: np.ndarray, height: int, width: int, spec: SmolVLMVideoSpec) -> np.ndarray:
    """(H, W, 3) uint8 -> (height, width, 3) uint8 with torch's uint8 kernel where it has the filter (bicubic,
    Lanczos: every SmolVLM2 checkpoint); Pillow's for the others, which torch would run in float."""
    if frame.shape[:2] == (height, width):
        return frame
    if spec.resample in FILTERS:
        return resize_aa(np.ascontiguousarray(frame)[None], height, width, spec.resample)[0]
    image = Image.fromarray(np.ascontiguousarray(frame), "RGB")
    return np.asarray(image.resize((width, height), resample=RESAMPLE[spec.resample]), dtype=np.uint8)


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """num2words(n) in English for 0 <= n <= 999 ("twenty-one", "one hundred and five"): the processor writes the
    frame count this way, and num2words is not a runtime dependency."""
    if not 0 <= n <= MAX_FRAMES:
        raise ValueError(f"frame counts are written for 0..{MAX_FRAMES}, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def video_text(timestamps_s: np.ndarray, duration_s: float, placeholder: str) -> str:
    """What replaces the chat template's <video>: intro, one "Frame from MM:SS:" + `placeholder` per frame (each
    placeholder later expands to the single-image block), outro."""
    text = VIDEO_INTRO.format(frame_count=number_words(len(timestamps_s)),
                              video_duration=str(timedelta(seconds=int(duration_s))))
    for second in timestamps_s:
        text += FRAME_TIMESTAMP.format(timestamp=f"{int(second // 60):02d}:{int(second % 60):02d}") + placeholder
    return text + MEDIA_OUTRO

