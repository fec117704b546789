"""A video in a prompt: probe, sample, check the context, then decode only the chosen frames, and lay them out as
the family's processor does. One path for every family; what differs is the layout, found by the spec's kind in
LAYOUTS (the one dispatch):
- "smolvlm" (SmolVLM2): each frame a PreparedImage keyed by its decoded pixels and the video preprocessing; the chat
  template's "<video>" becomes the family's text with one image placeholder per frame, tokenized like images;
- "qwen2_vl" (Qwen2-VL / Qwen2.5-VL): the template's <|video_pad|> expanded to the video's tokens, one run of
  temporal patches (each encoded and cached alone) at M-RoPE positions with the time scaling (video/qwen_session.py);
- "qwen3_vl" (Qwen3-VL): each temporal patch behind its "<t seconds>" text and its own vision delimiters, placed
  like an image (video/qwen3_session.py).
Either way the embedding cache serves a unit seen before (a second question, a window that moved on), and the prompt's
length is computed from the header's numbers before any frame is decoded."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import BadInputError
from ..video.clip import VideoClip
from .prompt import PreparedImage, Prompt, RuntimeSpec, tokenize

VIDEO_PLACEHOLDER = "<video>"


@dataclass(frozen=True)
class VideoRequest:
    """A video source (path, bytes, file-like, or a decoded VideoClip) and the caller's sampling limits; `probe` is the
    source's header (video.decode.VideoProbe) once read (`probed`), so the steps after it (the context's size, the
    prompt's layout, decoding) do not read it again."""

    source: Any
    max_frames: int | None = None
    fps: float | None = None
    probe: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.max_frames is not None and not (isinstance(self.max_frames, int) and self.max_frames >= 1):
            raise BadInputError(f"max_frames must be a whole number >= 1, got {self.max_frames!r}")
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and 0 < self.fps <= 1000):
            raise BadInputError(f"the sampling fps must be in (0, 1000], got {self.fps!r}")

    def probed(self) -> "VideoRequest":
        """This request with its source's header read (one BadInputError line for a bad video); a decoded clip, or a
        request already probed, as it is."""
        if self.probe is not None or isinstance(self.source, VideoClip):
            return self
        from ..video.decode import probe_video

        return replace(self, probe=probe_video(self.source))


def as_request(video: Any, max_frames: int | None = None, fps: float | None = None) -> VideoRequest:
    """generate()'s `video`: a source with its limits, or a VideoRequest that holds them (and maybe its probe)."""
    if not isinstance(video, VideoRequest):
        return VideoRequest(video, max_frames, fps)
    if max_frames is not None or fps is not None:
        raise BadInputError("pass max_frames and fps inside the VideoRequest, not beside it")
    return video


@dataclass(frozen=True)
class VideoChoice:
    """What the sampler chose, known from the header (or a decoded clip) before any pixel is decoded."""

    source: Any  # the request's source (a VideoClip is selected from, anything else decoded)
    indices: np.ndarray  # (n,) frame indices to decode
    total_frames: int
    source_fps: float
    duration_s: float
    height: int
    width: int
    probe: Any = None  # the source's VideoProbe (None for a decoded clip): decoding does not read the header again

    @property
    def timestamps_s(self) -> np.ndarray:
        return self.indices / self.source_fps

    @property
    def sampled_fps(self) -> float:
        """transformers' VideoMetadata.sampled_fps: frames kept per second of source."""
        return len(self.indices) / self.total_frames * self.source_fps

    def first(self, n_frames: int) -> "VideoChoice":
        return replace(self, indices=self.indices[:n_frames])

    def frames(self) -> VideoClip:
        """The chosen frames, decoded (times: their source times)."""
        if isinstance(self.source, VideoClip):
            return self.source.select(self.indices)
        from ..video.decode import decode_video

        return decode_video(self.source, lambda probe: self.indices, self.probe)


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
        raise BadInputError("this model takes no video (video input: SmolVLM2, Qwen2-VL, Qwen2.5-VL and Qwen3-VL); "
                            "pass images instead")


def choose(spec: RuntimeSpec, request: VideoRequest) -> VideoChoice:
    """Probe the source unless the request carries its probe (or read a decoded clip's numbers) and sample, decoding
    nothing."""
    _refuse_no_video(spec)
    source, probe = request.source, request.probed().probe
    if isinstance(source, VideoClip):  # already decoded (a stream's window): sample its frames
        total, fps, duration = source.num_frames, source.source_fps, source.duration_s
        height, width = source.frames.shape[1:3]
    else:
        total, fps, duration, height, width = probe.total_frames, probe.fps, probe.duration_s, probe.height, probe.width
    try:
        indices = spec.video.sample(total, fps, request.max_frames, request.fps)
    except ValueError as exc:  # a clip shorter than one temporal patch, a --max-frames under one
        raise BadInputError(str(exc)) from None
    return VideoChoice(source, np.asarray(indices), int(total), float(fps), float(duration), int(height), int(width),
                       probe)


class FrameLayout:
    """SmolVLM2: each frame one unsplit tile, laid out as images between timestamp text."""

    placeholder = VIDEO_PLACEHOLDER

    def length(self, spec: RuntimeSpec, text: str, choice: VideoChoice) -> int:
        per_frame = spec.video.tokens_per_unit(choice.height, choice.width, spec.layout.tokens_per_tile)
        return prompt_length(spec, text, choice.timestamps_s, choice.duration_s, per_frame)

    def build(self, session, text: str, choice: VideoChoice, clip: VideoClip) -> tuple[Prompt, list]:
        spec = session.spec
        per_frame = spec.video.tokens_per_unit(choice.height, choice.width, spec.layout.tokens_per_tile)
        frames = [PreparedImage(frame, frame_key(frame, spec.video, session.encoder.artifact_id), 0, 0, per_frame,
                                frame_preprocess=spec.video.preprocess_frame) for frame in clip.frames]
        return tokenize(spec, _expand(spec, text, choice.timestamps_s, choice.duration_s), frames), frames


def _qwen_layout():
    from ..video.qwen_session import TemporalPatchLayout

    return TemporalPatchLayout()


def _qwen3_layout():
    from ..video.qwen3_session import Qwen3PatchLayout

    return Qwen3PatchLayout()


# the one dispatch by the manifest's video kind (edgevlm.video.kinds): how a family's units become prompt rows
LAYOUTS = {"smolvlm": FrameLayout, "qwen2_vl": _qwen_layout, "qwen3_vl": _qwen3_layout}


def layout_for(spec: RuntimeSpec):
    _refuse_no_video(spec)
    return LAYOUTS[spec.video.kind]()


def _check_placeholder(layout, text: str) -> None:
    if text.count(layout.placeholder) != 1:
        raise BadInputError(f"the rendered prompt has {text.count(layout.placeholder)} {layout.placeholder} items; "
                            "this chat template does not place a video (use one video per prompt, and a template "
                            "that renders {'type': 'video'})")


def video_prompt_length(spec: RuntimeSpec, text: str, request: VideoRequest) -> int:
    """The prompt's positions with this video (header read, nothing decoded): what a job's context is sized by."""
    layout = layout_for(spec)
    _check_placeholder(layout, text)
    return layout.length(spec, text, choose(spec, request))


def prepare_video(session, text: str, request: VideoRequest, images: list) -> tuple[Prompt, list]:
    """(the tokenized prompt, its images: frames or one PreparedVideo) of rendered `text` about the video. The prompt's
    length is checked against the decoder's context from the header's numbers, before any frame is decoded."""
    if images:
        raise BadInputError("a prompt takes one video or images, not both; send the images in another turn")
    spec, n_ctx = session.spec, session.decoder.n_ctx
    layout = layout_for(spec)
    _check_placeholder(layout, text)
    choice = choose(spec, request)
    n_prompt = layout.length(spec, text, choice)
    if n_prompt >= n_ctx:
        raise BadInputError(_overflow(spec, layout, text, choice, n_prompt, n_ctx, request.fps))
    try:
        return layout.build(session, text, choice, choice.frames())
    except ValueError as exc:  # e.g. positions llama.cpp cannot take (video/qwen_session.py)
        raise BadInputError(str(exc)) from None


def _overflow(spec: RuntimeSpec, layout, text: str, choice: VideoChoice, n_prompt: int, n_ctx: int,
              fps: float | None = None) -> str:
    """The one-line refusal, with the --max-frames that fits (estimated as linear in the units, then checked with
    the frames --max-frames would sample: Qwen3-VL sizes frames by the whole clip's budget, so it is not linear)."""
    video = spec.video
    per_unit, unit = video.frames_per_unit, video.unit_name
    units = math.ceil(len(choice.indices) / per_unit)
    one = layout.length(spec, text, choice.first(per_unit))
    each = max(1, (n_prompt - one) // max(1, units - 1))
    fit = (max(0, (n_ctx - 1 - one) // each + 1) if one < n_ctx else 0) * per_unit
    while fit >= per_unit and _resampled_length(spec, layout, text, choice, fit, fps) >= n_ctx:
        fit -= per_unit
    fit = fit if fit >= per_unit else 0
    fix = f"pass --max-frames {fit} or less (or a lower --fps), or raise --n-ctx" if fit else \
        f"even one {unit} makes a {one}-token prompt: raise --n-ctx or shorten the prompt"
    tokens = video.tokens_per_unit(choice.height, choice.width, spec.layout.tokens_per_tile,
                                  n_frames=len(choice.indices))
    return (f"the video's {len(choice.indices)} frames ({units} {unit}{'es' if unit.endswith('h') else 's'} x "
            f"{tokens} tokens) make a {n_prompt}-token prompt, over the decoder context of {n_ctx}; {fix}")


def _resampled_length(spec: RuntimeSpec, layout, text: str, choice: VideoChoice, max_frames: int,
                      fps: float | None) -> int:
    """The prompt's length were the clip sampled with --max-frames `max_frames`."""
    indices = np.asarray(spec.video.sample(choice.total_frames, choice.source_fps, max_frames, fps))
    return layout.length(spec, text, replace(choice, indices=indices))


def _expand(spec: RuntimeSpec, text: str, timestamps: np.ndarray, duration: float) -> str:
    return text.replace(VIDEO_PLACEHOLDER, spec.video.prompt_text(timestamps, duration, spec.layout.placeholder))


def prompt_length(spec: RuntimeSpec, text: str, timestamps: np.ndarray, duration: float, per_frame: int) -> int:
    """The tokenized prompt's length with these frames, no pixel needed (the planner's and the context check's)."""
    pending = [PreparedImage(None, f"pending-{i}", 0, 0, per_frame) for i in range(len(timestamps))]
    return len(tokenize(spec, _expand(spec, text, timestamps, duration), pending))
