"""A video's tokens in a plan (`edgevlm plan BUNDLE --video-seconds S`): the frames the bundle's video processor
samples from S seconds, its units (SmolVLM2: frames; Qwen2-VL / 2.5-VL: temporal patches of 2 frames) x decoder rows
per unit, the prompt's positions counted as the runtime counts them (the same layout, runtimes/video_prompt.LAYOUTS,
with the bundle's tokenizer and chat template), and the longest clip at the processor's sampling that fits the
context and, option by option, the device's memory.

Only the header's numbers matter for the count, so no clip is needed: a source of S seconds at a nominal camera
rate (30 fps; the processors' frame counts depend on the duration, barely on the rate) and frames of --video-size
(Qwen's tokens per temporal patch depend on it; SmolVLM2 stretches every frame to one tile)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BadInputError

NOMINAL_SOURCE_FPS = 30.0
DEFAULT_VIDEO_SIZE = (1280, 720)  # (width, height): a 720p camera
MAX_SECONDS = 24 * 3600.0
RESOLUTION_S = 0.1  # the longest clip is searched to a tenth of a second


@dataclass(frozen=True)
class VideoQuery:
    seconds: float
    fps: float | None = None  # --fps: the sampling rate (None: the processor's)
    max_frames: int | None = None  # --max-frames (None: the processor's)
    size: tuple[int, int] = DEFAULT_VIDEO_SIZE  # (width, height) of the source frames
    source_fps: float = NOMINAL_SOURCE_FPS

    def __post_init__(self) -> None:
        if not 0 < self.seconds <= MAX_SECONDS:
            raise BadInputError(f"--video-seconds must be in (0, {MAX_SECONDS:.0f}], got {self.seconds}")
        if self.fps is not None and not 0 < self.fps <= 1000:
            raise BadInputError(f"--fps must be in (0, 1000], got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise BadInputError(f"--max-frames must be 1 or more, got {self.max_frames}")


class VideoCounter:
    """A bundle's video token counts, as its runtime would count them (tokenizer and template, no backend)."""

    def __init__(self, bundle: str | Path) -> None:
        from ..manifest import Manifest
        from ..runtimes.bundle_loader import runtime_spec
        from ..runtimes.prompt import render
        from ..runtimes.video_prompt import layout_for, user_message

        manifest = Manifest.load(Path(bundle))
        self.spec = runtime_spec(Path(bundle), manifest)
        if self.spec.video is None:
            raise BadInputError(f"{bundle} records no video section (its model takes no video); plan it without "
                                "--video-seconds, or export a SmolVLM2 / Qwen2-VL / Qwen2.5-VL checkpoint")
        self.layout = layout_for(self.spec)
        self.text = render(self.spec, [user_message("")])  # the question's tokens are --prompt-tokens
        self.context_length = manifest.decoder.context_length

    def count(self, query: VideoQuery, seconds: float | None = None) -> dict:
        from ..runtimes.video_prompt import VideoChoice

        video, seconds = self.spec.video, query.seconds if seconds is None else seconds
        total = max(1, round(seconds * query.source_fps))
        width, height = query.size
        try:
            indices = np.asarray(video.sample(total, query.source_fps, query.max_frames, query.fps))
            per_unit = video.tokens_per_unit(height, width, self.spec.layout.tokens_per_tile, n_frames=len(indices))
        except ValueError as exc:
            raise BadInputError(f"{exc}; plan another --video-seconds, --max-frames or --video-size") from None
        units = math.ceil(len(indices) / video.frames_per_unit)
        choice = VideoChoice(None, indices, total, query.source_fps, total / query.source_fps, height, width)
        return {"seconds": seconds, "frames": len(indices), "unit": video.unit_name, "units": units,
                "tokens_per_unit": per_unit, "video_tokens": units * per_unit,
                "prompt_positions": self.layout.length(self.spec, self.text, choice)}

    def encoder_image(self, query: VideoQuery) -> tuple[tuple[int, int], int | None]:
        """(image size, tile cap) of a plan image whose encode is one unit's: Qwen's resized frame as a grid image,
        SmolVLM2's one square tile."""
        video = self.spec.video
        if video.kind == "qwen2_vl":
            from ..video.qwen import smart_resize

            height, width = smart_resize(query.size[1], query.size[0], video)
            return (width, height), None
        if video.kind == "qwen3_vl":  # frames sized by the whole clip's pixel budget
            from ..video.qwen3 import smart_resize as smart_resize3

            total = max(1, round(query.seconds * query.source_fps))
            n = len(video.sample(total, query.source_fps, query.max_frames, query.fps))
            height, width = smart_resize3(n, query.size[1], query.size[0], video)
            return (width, height), None
        return (video.frame_size, video.frame_size), 1


def _largest(fits: Callable[[float], bool], low: float, high: float) -> float | None:
    """The largest tenth of a second in [low, high] where `fits` holds (monotone: true, then false); None if none."""
    lo, hi = round(low / RESOLUTION_S), round(high / RESOLUTION_S)
    if not fits(lo * RESOLUTION_S):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * RESOLUTION_S) else (lo, mid - 1)
    return round(lo * RESOLUTION_S, 1)


def plan_video(counter: VideoCounter, query: VideoQuery, plan: Callable, device, request) -> tuple[dict, dict, object]:
    """(the plan of one request about the clip, its "video" section, the PlanRequest planned). The request's context
    is the clip's positions (--prompt-tokens of question, --new-tokens of answer) unless --context is given; its images
    are the clip's units, each encoded as one image of the unit's size. The longest clip: where the positions fit the
    context (--context, else the model's), and per option, where the plan at that clip's positions still says
    "fits"."""
    size, tile_cap = counter.encoder_image(query)
    extra = request.prompt_tokens + request.new_tokens
    limit = request.context or counter.context_length
    plans: dict[tuple, dict] = {}
    counts: dict[float, dict] = {}

    def count_at(seconds: float) -> dict:  # the search asks each length for its positions and then its plan
        if seconds not in counts:
            counts[seconds] = counter.count(query, seconds)
        return counts[seconds]

    def request_at(seconds: float):
        """The request about `seconds` of clip: every unit encoded (one at a time, each an image of the unit's
        size), the clip's prompt positions prefilled and held in the KV cache (at most the context: a clip that does
        not fit is planned at the context's worth, and the section says it does not fit)."""
        count = count_at(seconds)
        positions = count["prompt_positions"] + extra
        context = request.context or max(16, min(positions, counter.context_length))
        return replace(request, images=count["units"], image_size=size, max_tiles=tile_cap, context=context,
                       media_positions=min(count["prompt_positions"], context))

    def plan_at(seconds: float) -> dict:
        asked = request_at(seconds)
        key = (asked.context, asked.images, asked.media_positions)
        if key not in plans:
            plans[key] = plan(device, asked)
        return plans[key]

    def positions(seconds: float) -> int:
        return count_at(seconds)["prompt_positions"] + extra

    count = count_at(query.seconds)
    needed = count["prompt_positions"] + extra
    result = plan_at(query.seconds)
    # past this length the sampler takes no more frames (its max_frames), so no longer clip needs more positions
    video = counter.spec.video
    cap = (query.max_frames or video.max_frames) / (query.fps or video.fps) + 2 * getattr(video, "skip_secs", 0) + 1
    cap = min(MAX_SECONDS, max(cap, query.seconds))
    fits_context = lambda s: positions(s) <= limit  # noqa: E731

    def fits_option(name: str) -> Callable[[float], bool]:
        def fits(seconds: float) -> bool:
            return positions(seconds) <= limit and \
                next(o for o in plan_at(seconds)["options"] if _name(o) == name)["verdict"] == "fits"
        return fits

    names = [_name(o) for o in result["options"]]
    largest = {"context": _largest(fits_context, RESOLUTION_S, cap),
               **{name: _largest(fits_option(name), RESOLUTION_S, cap) for name in names}}
    section = {
        **count, "source_fps": query.source_fps, "width": query.size[0], "height": query.size[1],
        "sampling_fps": query.fps or video.fps, "max_frames": query.max_frames or video.max_frames,
        "positions": needed, "context": limit, "fits_context": needed <= limit,
        "largest_clip_s": largest,
        # fits at the cap: any longer clip gives the same frames, so any length fits
        "any_length": [key for key, value in largest.items() if value is not None and value >= round(cap, 1)],
        "basis": (f"a source of {query.source_fps:g} fps, frames of {query.size[0]}x{query.size[1]}; positions "
                  f"counted with the bundle's tokenizer and template as the runtime counts them, plus "
                  f"{request.prompt_tokens} question and {request.new_tokens} answer tokens; the plan at that "
                  f"context: every {video.unit_name} encoded (one at a time: one's activations, all their "
                  f"embeddings held), the clip's positions prefilled and in the KV cache; a clip that fits at "
                  f"{cap:.1f} s fits at any length (the sampler takes no more frames)"),
    }
    result["recommendation"] = _recommend(result, largest, plan_at)
    return result, section, request_at(query.seconds)


def _recommend(result: dict, largest: dict, plan_at: Callable[[float], dict]) -> dict:
    """As asked if an option fits (plan/advise.py's first step); else a shorter clip, not a smaller image (a frame's
    size is the processor's): the most accurate option that fits some clip, at its longest."""
    from .advise import most_accurate_fit, recommendation_line

    fit = most_accurate_fit(result)
    if fit is not None:
        return recommendation_line("fits", result, result, [], fit)
    for option in result["options"]:  # most accurate first
        seconds = largest[_name(option)]
        if seconds is not None:
            lowered = plan_at(seconds)
            chosen = next(o for o in lowered["options"] if _name(o) == _name(option))
            return recommendation_line("lowered", result, lowered, [f"the clip to {seconds:g} s"], chosen)
    smallest = min(result["options"], key=lambda o: o["memory"]["total"])
    return recommendation_line("nothing fits", result, result, [], smallest)


def _name(option: dict) -> str:
    return f"{option['encoder']} + {option['decoder']}"
