"""A rolling window over a live stream (`edgevlm watch`, the bench's stride run): frames kept on a fixed grid of
`rate` frames per second of stream time, the last N of them asked about every k new ones.

Why a grid and not the family's sampler over the window's raw frames: the sampler spreads its frames over whatever
window it is given (np.linspace), so a window moved on by 2 s would pick frames a fraction of a frame apart from the
last window's and share none. Kept on the grid at the sampling rate, a window of N frames is sampled whole (the
family's sampler given N frames at `rate` fps picks all N: `plan_window` checks it), consecutive windows share N - k
frames bit for bit, and the per-frame embedding cache (keyed by the decoded frame) encodes exactly the k new ones.
Each window is laid out as a clip of its own (timestamps from 0, duration N / rate), so an answer equals a cold run of
the same frames as a clip; the decoder's KV of shared frames is not reusable (their positions and timestamps in the
prompt move), only the text before the first frame is (the session's prefix reuse).

A live source (stdin, a URL, or a file read with --realtime) answers over the newest window each time: frames
arrive at their stream time whether or not an answer is being computed, so a window that became due while a newer
kept frame had already arrived is skipped, and the kept frames that left the window unanswered are counted as
dropped. A file read as fast as answers allow answers every stride (deterministic).

Torch-free; PyAV only inside `StreamSource`.
"""
from __future__ import annotations

import math
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from ..errors import BadInputError
from .clip import VideoClip

EPS_S = 1e-4  # frame times come from rational pts: closer than this is the same instant
MAX_WINDOW_FRAMES = 999  # SmolVLM writes the count in words up to this; no context holds more


def parse_seconds(text: str | float, flag: str) -> float:
    """'2s', '500ms', '1.5', '1m' -> seconds (> 0); anything else one line naming the flag."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|min)?\s*", str(text))
        if not match:
            raise BadInputError(f"{flag} {text!r} is not a duration; write e.g. 2s, 500ms or 1m")
        value = float(match.group(1)) * {"ms": 1e-3, "s": 1.0, None: 1.0, "m": 60.0, "min": 60.0}[match.group(2)]
    if not (math.isfinite(value) and 0 < value <= 24 * 3600):
        raise BadInputError(f"{flag} must be a duration in (0 s, 24 h], got {text!r}")
    return value


@dataclass(frozen=True)
class WindowPlan:
    """N frames per window (`window_frames`) at `rate` frames per second of stream, an answer every k new frames."""

    rate: float
    window_frames: int
    stride_frames: int

    @property
    def window_s(self) -> float:
        return self.window_frames / self.rate

    @property
    def every_s(self) -> float:
        return self.stride_frames / self.rate

    def timestamps(self, n: int) -> np.ndarray:
        """(n,) seconds: a window laid out as a clip of its own."""
        return np.arange(n) / self.rate


def plan_window(video_spec, window_s: float, every_s: float, rate: float | None = None,
                max_frames: int | None = None) -> WindowPlan:
    """The window in frames for a family's video spec (its fps and max_frames unless given); one line when it
    cannot work (no frame in it, over the frames a video may have, a sampler that would not keep every frame)."""
    rate = float(video_spec.fps if rate is None else rate)
    if not (math.isfinite(rate) and 0 < rate <= 1000):
        raise BadInputError(f"the sampling rate must be in (0, 1000] frames per second, got {rate!r}; fix --fps")
    cap = int(video_spec.max_frames if max_frames is None else max_frames)
    if not 1 <= cap <= MAX_WINDOW_FRAMES:
        raise BadInputError(f"--max-frames must be 1..{MAX_WINDOW_FRAMES}, got {cap}")
    n, k = int(round(window_s * rate)), int(round(every_s * rate))
    if n < 1:
        raise BadInputError(f"a {window_s:g} s window at {rate:g} fps holds no frame; lengthen --window or raise --fps")
    if k < 1:
        raise BadInputError(f"--every {every_s:g} s is less than one frame at {rate:g} fps; lengthen --every or "
                            "raise --fps")
    if n > cap:
        raise BadInputError(f"a {window_s:g} s window at {rate:g} fps is {n} frames, over the {cap} frames a video "
                            "may have; shorten --window, lower --fps or raise --max-frames")
    chosen = np.asarray(video_spec.sample(n, rate, n, rate))
    if chosen.tolist() != list(range(n)):
        raise BadInputError(f"this model's video sampler keeps {len(chosen)} of a {n}-frame window's frames at "
                            f"{rate:g} fps, so moved windows would not share frames; choose --window and --fps so "
                            "the window holds a frame count it samples whole (e.g. an even count)")
    return WindowPlan(rate, n, k)


def check_context(session, prompt: str, plan: WindowPlan) -> int:
    """The prompt length of a full window (no pixel decoded); one line when it does not fit the decoder's context."""
    from ..runtimes.video_prompt import prompt_length, user_message

    spec = session.spec
    text = session.render([user_message(prompt)])
    per_frame = spec.video.tokens_per_frame(spec.layout.tokens_per_tile)
    n_prompt = prompt_length(spec, text, plan.timestamps(plan.window_frames), plan.window_s, per_frame)
    n_ctx = session.decoder.n_ctx
    if n_prompt >= n_ctx:
        raise BadInputError(f"a {plan.window_s:g} s window is {plan.window_frames} frames x {per_frame} tokens, a "
                            f"{n_prompt}-token prompt, over the decoder context of {n_ctx}; shorten --window, lower "
                            "--fps or raise --n-ctx")
    return n_prompt


class FrameGrid:
    """Which frames of a stream to keep: the first at or after each tick j / rate (stream time from the first frame)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.next_tick = 0

    def keep(self, t: float) -> bool:
        if t + EPS_S < self.next_tick / self.rate:
            return False
        while self.next_tick / self.rate <= t + EPS_S:  # a source slower than the rate skips ticks
            self.next_tick += 1
        return True


@dataclass
class Window:
    """The last N kept frames and their stream times; `due` when full and k frames newer than the last answer."""

    plan: WindowPlan
    frames: deque = field(default_factory=deque)
    times: deque = field(default_factory=deque)
    since_answer: int = 0
    answered: bool = False

    def push(self, frame: np.ndarray, t: float) -> None:
        self.frames.append(frame)
        self.times.append(t)
        if len(self.frames) > self.plan.window_frames:
            self.frames.popleft()
            self.times.popleft()
        self.since_answer += 1

    @property
    def due(self) -> bool:
        full = len(self.frames) == self.plan.window_frames
        return full and (not self.answered or self.since_answer >= self.plan.stride_frames)

    def take(self) -> tuple[VideoClip, int]:
        """(the window as a clip of its own: (n, H, W, 3) uint8, timestamps from 0 at the grid's rate; the kept frames
        pushed since the last answer that left the window unanswered: what a live source dropped)."""
        n = len(self.frames)
        dropped = max(0, self.since_answer - n)
        self.answered, self.since_answer = True, 0
        return VideoClip(np.stack(self.frames), self.plan.timestamps(n), self.plan.rate, n / self.plan.rate), dropped


@dataclass(frozen=True)
class Answer:
    """One answer over one window: what `watch` prints."""

    index: int
    stream_time_s: float  # the newest frame's time in the stream
    window_start_s: float  # the oldest frame's
    n_frames: int
    ttft_ms: float
    frames_encoded: int
    frames_reused: int
    reused_positions: int  # prompt positions the decoder kept from the last answer (the text before the frames)
    text: str
    tokens: list[int]
    total_ms: float
    frames_dropped: int = 0  # kept frames that came after the last answer and left the window before this one (live)

    def to_dict(self) -> dict:
        return {"answer": self.index, "stream_time_s": round(self.stream_time_s, 4),
                "window_s": [round(self.window_start_s, 4), round(self.stream_time_s, 4)], "frames": self.n_frames,
                "ttft_ms": self.ttft_ms, "frames_encoded": self.frames_encoded, "frames_reused": self.frames_reused,
                "frames_dropped": self.frames_dropped,
                "reused_positions": self.reused_positions, "total_ms": self.total_ms, "text": self.text,
                "tokens": self.tokens}


def frame_counts(timings: dict) -> tuple[int, int]:
    """(encoded, reused) frames of one answer: the embedding cache's misses and hits for families that encode frames
    as images, the video units' counters for those that encode temporal patches (Qwen)."""
    if "video_units_encoded" in timings:
        return int(timings["video_units_encoded"]), int(timings["video_units_reused"])
    return int(timings.get("embed_cache_misses", 0)), int(timings.get("embed_cache_hits", 0))


@dataclass
class WatchResult:
    answers: list[Answer]
    interrupted: bool = False  # Ctrl-C: the answers given before it are kept
    frames_seen: int = 0


def ask(session, window: Window, prompt: str, plan: WindowPlan, index: int, generate_kwargs: dict) -> Answer:
    clip, dropped = window.take()
    result = session.generate(prompt=prompt, video=clip, max_frames=clip.num_frames, video_fps=plan.rate,
                              **generate_kwargs)
    encoded, reused = frame_counts(result.timings)
    return Answer(index, window.times[-1], window.times[0], clip.num_frames, float(result.timings["ttft_ms"]),
                  encoded, reused, int(result.timings.get("n_reused_positions", 0)), result.text, list(result.tokens),
                  float(result.timings["total_ms"]), dropped)


def watch(session, frames: Iterable[tuple[float, Callable[[], np.ndarray]]], prompt: str, plan: WindowPlan,
          on_answer: Callable[[Answer], None] = lambda a: None, max_answers: int | None = None,
          realtime: bool = False, generate_kwargs: dict | None = None, live: bool = False,
          clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None) -> WatchResult:
    """Answer `prompt` over the last `plan.window_frames` kept frames each time `plan.stride_frames` new ones came.

    frames: (stream time in s from the first frame, a callable giving the (H, W, 3) uint8 frame), in order; only
    kept frames are converted. A stream that ends before the window fills is answered once over what it held.
    realtime: pace a file as a camera would (sleep until each frame's time); a live source paces itself.
    live: frames arrive at their stream time after the first (wall time by `clock`), so after an answer a due window is
    passed over while a newer kept frame had arrived by the time that answer was done (the loop reads on to the newest
    window then: the frames it passes over are dropped, counted per answer); the target is fixed when the answer ends,
    so a source that decodes slower than real time still gets answers. At the stream's end a due window is answered.
    Not live: every stride is answered.
    clock, sleep: time.monotonic and time.sleep unless given (a test drives them)."""
    clock, sleep = clock or time.monotonic, sleep or time.sleep
    grid, window = FrameGrid(plan.rate), Window(plan)
    answers: list[Answer] = []
    kwargs = dict(generate_kwargs or {})
    seen = 0
    started: float | None = None  # the wall time of stream time 0
    arrived = -math.inf  # live: the stream time that had arrived when the last answer was done

    def answer() -> bool:
        """Answer the window; True when max_answers is reached."""
        nonlocal arrived
        answers.append(ask(session, window, prompt, plan, len(answers) + 1, kwargs))
        on_answer(answers[-1])
        arrived = clock() - started
        return max_answers is not None and len(answers) >= max_answers

    try:
        for t, to_rgb in frames:
            seen += 1
            started = clock() - t if started is None else started
            if not grid.keep(t):
                continue
            if realtime:
                sleep(max(0.0, started + t - clock()))
            window.push(to_rgb(), t)
            if not window.due:
                continue
            if live and grid.next_tick / plan.rate <= arrived + EPS_S:
                continue  # the next kept frame had arrived while the last answer was computed: answer the newest
            if answer():
                return WatchResult(answers, False, seen)
        if window.frames and (not answers or (live and window.due)):
            # a stream shorter than the window: one answer over all of it; a live stream's last window, passed over
            # while an answer was computed
            answer()
    except KeyboardInterrupt:
        return WatchResult(answers, True, seen)
    return WatchResult(answers, False, seen)


class StreamSource:
    """A video source opened and checked (its header read: no frame decoded yet), then decoded frame by frame:
    a path, '-' (stdin: a streamable container such as MKV or MPEG-TS), a URL PyAV opens (rtsp://, http://), bytes
    or a file object. Every failure is one line (BadInputError)."""

    def __init__(self, source: Any, stdin=None):
        from . import decode

        self._decode = decode
        self.av = decode._av()
        self.name = "(stdin)" if source == "-" else decode._name(source)
        # stdin and URLs deliver frames as they are produced (a camera, ffmpeg -re, rtsp): watch drops what it has no
        # time for; a file waits for the reader
        self.live = source == "-" or (isinstance(source, str) and "://" in source)
        if source == "-":
            self.container = self._open_raw((stdin or sys.stdin).buffer)
        elif self.live:
            self.container = self._open_raw(source)
        else:
            self.container = decode._open(source, self.name)
        try:
            self.stream = decode._video_stream(self.container, self.name)
            self.width = int(self.stream.codec_context.width or 0)
            self.height = int(self.stream.codec_context.height or 0)
            if self.width * self.height > decode.max_video_pixels():
                raise BadInputError(f"video {self.name} is {self.width}x{self.height}, over the limit of "
                                    f"{decode.max_video_pixels():,} pixels a frame; downscale it or raise "
                                    "EDGEVLM_MAX_VIDEO_PIXELS")
            self.fps = decode._fps(self.stream)
        except BaseException:
            self.container.close()
            raise

    def _open_raw(self, source):
        av = self.av
        try:
            return av.open(source, mode="r", metadata_errors="ignore")
        except (av.FFmpegError, OSError, ValueError, EOFError, UnicodeDecodeError) as exc:
            raise BadInputError(f"cannot read video {self.name}: not a stream PyAV can open "
                                f"({self._decode._reason(exc)}); pass a video file, or pipe a streamable container "
                                "(e.g. ffmpeg ... -f matroska -)") from None

    def frames(self) -> Iterator[tuple[float, Callable[[], np.ndarray]]]:
        """(time from the first frame in s, a callable converting that frame to (H, W, 3) uint8 RGB) per frame."""
        av, name = self.av, self.name
        self.stream.thread_type = "AUTO"
        first: float | None = None
        index = 0
        try:
            for index, frame in enumerate(self.container.decode(self.stream)):
                t = frame.time if frame.time is not None else (index / self.fps if self.fps else None)
                if t is None:
                    raise BadInputError(f"video {name} has neither frame times nor a frame rate; re-encode it")
                first = t if first is None else first
                if self.width and (frame.width, frame.height) != (self.width, self.height):
                    raise BadInputError(f"video {name} changes frame size mid-stream ({self.width}x{self.height} to "
                                        f"{frame.width}x{frame.height}); re-encode it at one size")
                yield t - first, (lambda frame=frame: frame.to_ndarray(format="rgb24"))
        except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError) as exc:
            raise BadInputError(f"cannot decode video {name}: frame {index} is damaged "
                                f"({self._decode._reason(exc)}); re-encode it") from None
        if first is None:
            raise BadInputError(f"video {name} has no frames; pass a clip with at least one frame")

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> "StreamSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
