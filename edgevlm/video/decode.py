"""Decoding a video file, bytes or file-like object into a VideoClip with PyAV, probing first.

`probe_video` reads the container header (and, when the header has no frame count, counts packets without decoding)
so a caller can check its limits (resolution, frames, the context the sampled frames will take) before any frame is
decoded. `decode_video` then decodes in presentation order up to the last frame the sampler asked for, converting
only the chosen frames to RGB, so memory holds the kept frames and no more. Frame index i has time i / fps, as in
transformers' `read_video_pyav` (the reference our samplers match). Every failure is one BadInputError line.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BadInputError
from .clip import VideoClip

# 4096 x 4096: HF's SmolVLM caps a resized side at 4096; larger frames cost memory and give the model nothing.
DEFAULT_MAX_VIDEO_PIXELS = 4096 * 4096
# Kept RGB frames above this are refused before decoding (e.g. 64 frames of 4K is ~1.6 GB).
DEFAULT_MAX_DECODED_BYTES = 2 << 30
# A header that claims more frames than this is absurd (24 h at 120 fps).
MAX_FRAMES_IN_FILE = 24 * 3600 * 120


def max_video_pixels() -> int:
    value = os.environ.get("EDGEVLM_MAX_VIDEO_PIXELS")
    return int(value) if value else DEFAULT_MAX_VIDEO_PIXELS


@dataclass(frozen=True)
class VideoProbe:
    """What the header says, before decoding: the sampler's input (HF's VideoMetadata fields)."""

    name: str
    width: int
    height: int
    fps: float
    total_frames: int
    codec: str

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0 or self.fps <= 0 or self.total_frames <= 0:
            raise ValueError(f"a probe needs positive sizes, fps and frames, got {self}")

    @property
    def duration_s(self) -> float:
        return self.total_frames / self.fps


Source = "str | os.PathLike | bytes | bytearray | io.IOBase"
IndexChooser = Callable[[VideoProbe], np.ndarray]


def _av():
    try:
        import av
    except ImportError:
        raise BadInputError("video input needs PyAV: pip install 'edgevlm[video]'") from None
    return av


def _open(source, name: str):
    """(container, name); bytes and file-like objects are read from memory."""
    av = _av()
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadInputError(f"video {name} is empty (0 bytes); pass a video file with content")
        source = io.BytesIO(bytes(source))
    elif not hasattr(source, "read"):
        path = Path(source)
        try:
            found, size = path.is_file(), path.stat().st_size if path.is_file() else 0
        except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
            raise BadInputError(f"video path {str(path)[:80]!r} cannot be opened ({type(exc).__name__}); check the "
                                "path") from None
        if not found:
            raise BadInputError(f"video not found: {str(path)[:200]}; check the path")
        if size == 0:
            raise BadInputError(f"video {name} is empty (0 bytes); pass a video file with content")
        source = str(path)
    try:
        return av.open(source, mode="r", metadata_errors="ignore")
    except (av.FFmpegError, OSError, ValueError, EOFError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read video {name}: not a valid or complete video file "
                            f"({_reason(exc)}); re-encode it (e.g. to H.264 MP4)") from None


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def _name(source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "(video bytes)"
    if hasattr(source, "read"):
        return "(video stream)"
    return str(source)[:200]


def _video_stream(container, name: str):
    streams = list(container.streams.video)
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["nothing"]
        raise BadInputError(f"{name} has no video stream (it holds {', '.join(kinds)}); pass a file with video")
    stream = streams[0]
    if stream.codec_context is None:
        raise BadInputError(f"{name}: its video codec cannot be decoded by this PyAV build; re-encode it (e.g. to "
                            "H.264 MP4)")
    return stream


def _fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate.denominator and float(rate) > 0:
            return float(rate)
    return 0.0


def _count_packets(container, stream) -> int:
    """Frames in a container whose header has no count (WebM, MKV, raw streams): one packet per frame, no decoding."""
    count = 0
    for packet in container.demux(stream):
        count += int(packet.size > 0)
        if count > MAX_FRAMES_IN_FILE:
            break
    container.seek(0)
    return count


def _probe(container, name: str) -> VideoProbe:
    av = _av()
    stream = _video_stream(container, name)
    width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
    if width <= 0 or height <= 0:
        raise BadInputError(f"video {name} has no frame size in its header ({width}x{height}); the file is "
                            "damaged or not a video: re-encode it")
    limit = max_video_pixels()
    if width * height > limit:
        raise BadInputError(f"video {name} is {width}x{height} = {width * height:,} pixels a frame, over the limit of "
                            f"{limit:,}; downscale it (e.g. ffmpeg -vf scale=1280:-2) or raise "
                            "EDGEVLM_MAX_VIDEO_PIXELS")
    fps = _fps(stream)
    if not 0 < fps <= 1000:
        raise BadInputError(f"video {name} has no usable frame rate ({fps:g} fps in its header); re-encode it with a "
                            "constant frame rate")
    total = int(stream.frames or 0)
    if total <= 0:
        try:
            total = _count_packets(container, stream)
        except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
            raise BadInputError(f"cannot read video {name}: its packets are damaged ({_reason(exc)}); re-encode "
                                "it") from None
    if total <= 0:
        raise BadInputError(f"video {name} has no frames; pass a clip with at least one frame")
    if total > MAX_FRAMES_IN_FILE:
        raise BadInputError(f"video {name} claims {total:,} frames, more than {MAX_FRAMES_IN_FILE:,}; the header is "
                            "damaged or the file is too long: cut it first")
    codec = stream.codec_context.name or "unknown"
    return VideoProbe(name, width, height, fps, total, codec)


def probe_video(source) -> VideoProbe:
    """The header's facts (size, fps, frame count) without decoding any frame."""
    name = _name(source)
    container = _open(source, name)
    try:
        return _probe(container, name)
    finally:
        container.close()


def _check_indices(indices: np.ndarray, probe: VideoProbe) -> np.ndarray:
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size == 0:
        raise BadInputError(f"no frames were chosen from video {probe.name}; check --fps and --max-frames")
    if indices.min() < 0 or indices.max() >= probe.total_frames or np.any(np.diff(indices) <= 0):
        raise ValueError(f"frame indices must increase within [0, {probe.total_frames}), got {indices[:8]}...")
    need = indices.size * probe.width * probe.height * 3
    if need > DEFAULT_MAX_DECODED_BYTES:
        raise BadInputError(f"{indices.size} frames of {probe.width}x{probe.height} from {probe.name} would take "
                            f"{need / 2**30:.1f} GiB decoded, over {DEFAULT_MAX_DECODED_BYTES / 2**30:.0f} GiB; "
                            "lower --max-frames or --fps, or downscale the video")
    return indices


def decode_video(source, choose: IndexChooser | None = None, probe: VideoProbe | None = None) -> VideoClip:
    """Decode the frames `choose(probe)` picks (sorted frame indices; None: every frame) into a VideoClip.

    Frames after the last chosen one are not decoded, and unchosen frames are never converted to RGB. probe: this
    source's `probe_video`, when the caller has it (its header is then not read again: a header without a frame count
    costs a pass over every packet)."""
    av = _av()
    name = _name(source)
    container = _open(source, name)
    try:
        if probe is None:
            probe = _probe(container, name)
        else:
            _video_stream(container, name)
        indices = _check_indices(np.arange(probe.total_frames) if choose is None else choose(probe), probe)
        return VideoClip(_decode_frames(av, container, probe, indices), indices / probe.fps, probe.fps,
                         probe.duration_s)
    finally:
        container.close()


def _decode_frames(av, container, probe: VideoProbe, indices: np.ndarray) -> np.ndarray:
    wanted = set(indices.tolist())
    last = int(indices[-1])
    frames = np.empty((len(indices), probe.height, probe.width, 3), dtype=np.uint8)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    kept = decoded = 0
    try:
        for decoded, frame in enumerate(container.decode(stream)):
            if decoded > last:
                break
            if decoded not in wanted:
                continue
            if (frame.height, frame.width) != (probe.height, probe.width):
                raise BadInputError(f"video {probe.name} changes frame size mid-stream ({probe.width}x{probe.height} "
                                    f"to {frame.width}x{frame.height}); re-encode it at one size")
            frames[kept] = frame.to_ndarray(format="rgb24")
            kept += 1
    except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError) as exc:
        raise BadInputError(f"cannot decode video {probe.name}: frame {decoded} is damaged ({_reason(exc)}); "
                            "re-encode the file") from None
    if kept < len(indices):
        raise BadInputError(f"video {probe.name} ended after {kept} of the {len(indices)} chosen frames (its header "
                            f"says {probe.total_frames} frames): the file is truncated or damaged; re-encode it")
    return frames
