"""A video in a prompt: probe, sample, check the context, then decode only the chosen frames, and lay them out as
the family's processor does. Each frame becomes a PreparedImage keyed by its decoded pixels and the video
preprocessing, so the embedding cache serves a frame seen before (a second question, a window that moved on).

The chat template renders the video item as "<video>" (SmolVLM's and Qwen's templates do); that text is replaced by
the family's prompt_text, one image placeholder per frame, and tokenized like images."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..video.clip import VideoClip
from .prompt import PreparedImage, RuntimeSpec, tokenize

VIDEO_PLACEHOLDER = "<video>"


@dataclass(frozen=True)
class VideoRequest:
    """A video source (path, bytes, file-like, or a decoded VideoClip) and the caller's sampling limits."""

    source: Any
    max_frames: int | None = None
    fps: float | None = None

    def __post_init__(self) -> None:
        if self.max_frames is not None and not (isinstance(self.max_frames, int) and self.max_frames >= 1):
            raise BadInputError(f"max_frames must be a whole number >= 1, got {self.max_frames!r}")
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 1000):
            raise BadInputError(f"the sampling fps must be in (0, 1000], got {self.fps!r}")


def user_message(prompt: str) -> dict:
    """The one-turn message with the video first, as HF's chat examples put it."""
    return {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}


def frame_key(frame: np.ndarray, video_spec, encoder_id: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"frame{frame.shape}".encode())
    digest.update(np.ascontiguousarray(frame).tobytes())
    digest.update(json.dumps(video_spec.to_dict(), sort_keys=True).encode())
    digest.update(encoder_id.encode())
    return digest.hexdigest()


def _refuse_no_video(spec: RuntimeSpec) -> None:
    if spec.video is None:
        raise BadInputError("this model takes no video (video input: SmolVLM2, and Qwen2-VL/2.5-VL/3-VL where "
                            "supported); pass images instead")


def _chosen(request: VideoRequest, video_spec) -> tuple[Any, np.ndarray, float, float]:
    """(probe or clip, indices, fps, duration) before decoding anything."""
    source = request.source
    if isinstance(source, VideoClip):  # already decoded (a stream's window): sample its frames
        indices = video_spec.sample(source.num_frames, source.source_fps, request.max_frames, request.fps)
        return source, indices, source.source_fps, source.duration_s
    from ..video.decode import probe_video

    probe = probe_video(source)
    indices = video_spec.sample(probe.total_frames, probe.fps, request.max_frames, request.fps)
    return probe, indices, probe.fps, probe.duration_s


def prepare_video(spec: RuntimeSpec, text: str, request: VideoRequest, encoder_id: str,
                  n_ctx: int) -> tuple[str, list[PreparedImage]]:
    """(the prompt text with one image placeholder per frame, the frames as PreparedImages). The prompt's length is
    checked against `n_ctx` from the header's numbers, before any frame is decoded."""
    _refuse_no_video(spec)
    video_spec = spec.video
    if text.count(VIDEO_PLACEHOLDER) != 1:
        raise BadInputError(f"the rendered prompt has {text.count(VIDEO_PLACEHOLDER)} {VIDEO_PLACEHOLDER} items; "
                            "this chat template does not place a video (use one video per prompt, and a template "
                            "that renders {'type': 'video'})")
    source, indices, fps, duration = _chosen(request, video_spec)
    timestamps = indices / fps
    per_frame = video_spec.tokens_per_frame(spec.layout.tokens_per_tile)
    n_prompt = prompt_length(spec, text, timestamps, duration, per_frame)
    if n_prompt >= n_ctx:
        one = prompt_length(spec, text, timestamps[:1], duration, per_frame)
        each = max(1, (n_prompt - one) // max(1, len(indices) - 1))
        fit = max(0, (n_ctx - 1 - one) // each + 1) if one < n_ctx else 0
        fix = f"pass --max-frames {fit} or less (or a lower --fps), or raise --n-ctx" if fit else \
            f"even one frame makes a {one}-token prompt: raise --n-ctx or shorten the prompt"
        raise BadInputError(f"the video's {len(indices)} frames x {per_frame} tokens make a {n_prompt}-token prompt, "
                            f"over the decoder context of {n_ctx}; {fix}")
    if isinstance(source, VideoClip):
        clip = source.select(indices)
    else:
        from ..video.decode import decode_video

        clip = decode_video(request.source, lambda probe: indices)
    frames = [PreparedImage(frame, frame_key(frame, video_spec, encoder_id), 0, 0, per_frame,
                            frame_preprocess=video_spec.preprocess_frame) for frame in clip.frames]
    return _expand(spec, text, timestamps, duration), frames


def video_prompt_positions(spec: RuntimeSpec, text: str, request: VideoRequest) -> int:
    """The positions a rendered one-video prompt fills, from the header's numbers (no frame decoded): what a
    one-shot job sizes llama.cpp's context with (runtimes/job_context.py)."""
    _refuse_no_video(spec)
    _, indices, fps, duration = _chosen(request, spec.video)
    return prompt_length(spec, text, indices / fps, duration, spec.video.tokens_per_frame(spec.layout.tokens_per_tile))


def _expand(spec: RuntimeSpec, text: str, timestamps: np.ndarray, duration: float) -> str:
    return text.replace(VIDEO_PLACEHOLDER, spec.video.prompt_text(timestamps, duration, spec.layout.placeholder))


def prompt_length(spec: RuntimeSpec, text: str, timestamps: np.ndarray, duration: float, per_frame: int) -> int:
    """The tokenized prompt's length with these frames, no pixel needed (the planner's and the context check's)."""
    pending = [PreparedImage(None, f"pending-{i}", 0, 0, per_frame) for i in range(len(timestamps))]
    return len(tokenize(spec, _expand(spec, text, timestamps, duration), pending))

