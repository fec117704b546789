"""Fuzzing the video decoder: small real clips (several containers and codecs, an audio-only file) damaged by
truncation, flipped bytes, zeroed or inserted runs, swapped headers and absurd sizes; each case decodes or ends in
edgevlm's one-line error (fuzzers.Tally counts anything else as a traceback)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

import fuzzers
from video_clips import moving_shapes, write_clip


def seed_files(folder: Path) -> dict[str, bytes]:
    """Small valid files the mutations start from (tiny frames, so a case decodes in milliseconds)."""
    import av

    frames = moving_shapes(12, 66, 38, seed=3)
    files = {}
    for name, codec in (("mp4-mpeg4.mp4", "mpeg4"), ("mkv-h264.mkv", "libx264"), ("avi-mpeg4.avi", "mpeg4"),
                        ("webm-vp9.webm", "libvpx-vp9")):
        files[name] = write_clip(folder / name, frames, fps=6, codec=codec).read_bytes()
    audio = folder / "audio-only.mkv"
    with av.open(str(audio), mode="w") as container:  # audio only: must be refused as "no video stream"
        stream = container.add_stream("mp2", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    files["audio-only.mkv"] = audio.read_bytes()
    return files


DAMAGE = ["none", "truncated", "truncated", "flipped", "flipped", "zeroed", "noise", "head", "empty", "repeat"]


@st.composite
def video_files(draw, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[name])
    damage = draw(st.sampled_from(DAMAGE))
    if damage == "truncated":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "flipped":
        for at, mask in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1,
                                      max_size=40)):
            data[at] ^= mask
    elif damage == "zeroed":
        at = draw(st.integers(0, len(data) - 1))
        data[at:at + draw(st.integers(1, 4096))] = bytes(min(len(data) - at, 4096))[:len(data[at:at + 4096])]
    elif damage == "noise":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=300))
    elif damage == "head":  # the first bytes from another container, the rest from this one
        other = seeds[draw(st.sampled_from(sorted(seeds)))]
        cut = draw(st.integers(1, 200))
        data = bytearray(other[:cut]) + data[cut:]
    elif damage == "empty":
        data = bytearray(draw(st.sampled_from([b"", b"\x00", b"\x00\x00\x00\x18ftypmp42", b"RIFF", b"\x1aE\xdf\xa3"])))
    elif damage == "repeat":  # an absurd size field: a 32-bit length patched to a huge value somewhere near the top
        at = draw(st.integers(0, max(0, min(len(data), 512) - 4)))
        data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00",
                                                b"\x00\x00\x00\x01"]))
    return f"{name} {damage}", bytes(data)


def _eight_frames(probe) -> np.ndarray:
    return np.unique(np.linspace(0, probe.total_frames - 1, min(8, probe.total_frames), dtype=int))


def fuzz_videos(seeds: dict[str, bytes], n: int, seed: int, strict: bool = True) -> fuzzers.Tally:
    from edgevlm.video.decode import decode_video

    def one(data: bytes, as_stream: bool):
        clip = decode_video(io.BytesIO(data) if as_stream else data, _eight_frames)
        assert clip.frames.ndim == 4 and clip.num_frames >= 1

    def check(case, tally):
        (label, data), as_stream = case
        return tally.run(f"{label} ({len(data)} bytes)", lambda: one(data, as_stream))

    return fuzzers.drive("videos", st.tuples(video_files(seeds), st.booleans()), check, n, seed, strict)
