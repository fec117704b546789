"""The PyAV decoder: probe before decode, the chosen frames only, and one-line errors for every bad file."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest

from edgevlm.errors import BadInputError
from edgevlm.video.decode import decode_video, probe_video

import video_clips
import video_fuzz

pytest.importorskip("av")


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return video_clips.make_clip(tmp_path_factory.mktemp("clips"))


def test_probe_reads_the_header_and_decode_keeps_only_chosen_frames(clip_path):
    probe = probe_video(clip_path)
    assert (probe.width, probe.height, probe.fps, probe.total_frames) == (343, 201, 10.0, 40)
    assert probe.duration_s == 4.0
    clip = decode_video(clip_path, lambda p: np.array([0, 7, 20, 39]))
    assert clip.frames.shape == (4, 201, 343, 3) and clip.frames.dtype == np.uint8
    np.testing.assert_allclose(clip.timestamps_s, [0.0, 0.7, 2.0, 3.9])
    assert (clip.source_fps, clip.duration_s) == (10.0, 4.0)
    every = decode_video(clip_path)
    assert every.num_frames == 40
    np.testing.assert_array_equal(every.frames[[0, 7, 20, 39]], clip.frames)
    # the decoded frames are the written ones up to the codec's loss (moving shapes, not noise)
    written = video_clips.moving_shapes(40)
    assert np.abs(every.frames.astype(int) - written).mean() < 6
    # bytes and file-like objects decode the same frames
    data = clip_path.read_bytes()
    np.testing.assert_array_equal(decode_video(data, lambda p: np.array([7])).frames[0], clip.frames[1])
    np.testing.assert_array_equal(decode_video(io.BytesIO(data), lambda p: np.array([7])).frames[0], clip.frames[1])


def test_h264_and_a_headerless_frame_count(tmp_path):
    """MKV/WebM headers carry no frame count: the probe counts packets instead of decoding."""
    frames = video_clips.moving_shapes(15, 64, 48)
    mkv = video_clips.write_clip(tmp_path / "a.mkv", frames, fps=5, codec="libx264")
    probe = probe_video(mkv)
    assert (probe.total_frames, probe.fps, probe.codec) == (15, 5.0, "h264")
    assert decode_video(mkv).num_frames == 15


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"", r"is empty \(0 bytes\)"),
    (lambda d: d[:40], "not a valid or complete video file"),
    (lambda d: b"\x00" * 64 + d[64:], "not a valid or complete video file|truncated or damaged"),
    (lambda d: d[: len(d) // 3], "truncated|not a valid or complete"),  # MP4: the index (moov) is at the end
])
def test_bad_files_are_one_line_errors(clip_path, damage, message):
    with pytest.raises(BadInputError, match=message) as caught:
        decode_video(damage(clip_path.read_bytes()))
    assert "\n" not in str(caught.value)


def test_missing_audio_only_huge_and_too_many_frames(tmp_path, clip_path, monkeypatch):
    with pytest.raises(BadInputError, match="video not found"):
        probe_video(tmp_path / "nope.mp4")
    seeds = video_fuzz.seed_files(tmp_path)
    with pytest.raises(BadInputError, match="has no video stream .*audio"):
        probe_video(seeds["audio-only.mkv"])
    monkeypatch.setenv("EDGEVLM_MAX_VIDEO_PIXELS", str(343 * 201 - 1))
    with pytest.raises(BadInputError, match="343x201 = 68,943 pixels a frame, over the limit"):
        probe_video(clip_path)  # refused from the header, before any frame is decoded
    monkeypatch.delenv("EDGEVLM_MAX_VIDEO_PIXELS")
    monkeypatch.setattr("edgevlm.video.decode.DEFAULT_MAX_DECODED_BYTES", 343 * 201 * 3 * 3)
    with pytest.raises(BadInputError, match="4 frames of 343x201 .* lower --max-frames"):
        decode_video(clip_path, lambda p: np.arange(4))


def test_a_thousand_damaged_files_end_in_one_line_errors(tmp_path):
    seeds = video_fuzz.seed_files(tmp_path)
    start = time.perf_counter()
    tally = video_fuzz.fuzz_videos(seeds, 1000, seed=34)
    elapsed = time.perf_counter() - start
    assert tally.counts["traceback"] == 0, f"{tally.counts}\n" + "\n".join(tally.tracebacks[:5])
    assert tally.counts["ok"] > 100 and tally.counts["clean error"] > 300, tally.counts
    assert elapsed < 45, f"1,000 cases took {elapsed:.0f} s"
    print(f"\nvideo fuzz: {tally.as_dict()} in {elapsed:.1f} s")


def test_truncated_files(tmp_path):
    """AVI's header counts the frames: a cut file is refused as truncated. MKV's does not: the packets there are
    counted, so a cut MKV is a shorter clip."""
    frames = video_clips.moving_shapes(30, 64, 48)
    avi = video_clips.write_clip(tmp_path / "a.avi", frames, fps=5).read_bytes()
    with pytest.raises(BadInputError, match="ended after .* the file is truncated") as caught:
        decode_video(avi[: len(avi) // 2], lambda p: np.array([0, p.total_frames - 1]))
    assert "\n" not in str(caught.value)
    mkv = video_clips.write_clip(tmp_path / "a.mkv", frames, fps=5, codec="libx264").read_bytes()
    assert 0 < probe_video(mkv[: len(mkv) // 2]).total_frames < 30
