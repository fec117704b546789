"""`edgevlm watch`: a window over a stream, moved on by k frames, encodes exactly the k new frames and answers as a cold
run of the same window; bad sources, families without video and windows that do not fit are one line, exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import builders
import video_clips
from edgevlm.video.window import FrameGrid, WindowPlan, parse_seconds
from bundle_checks import assert_clean_error, run_cli

pytest.importorskip("av")
VIDEO_SAMPLING = {"fps": 2, "max_frames": 6, "video_size": {"longest_edge": 48}}  # as tests/test_video_smolvlm.py
QUESTION = "What moves in the video?"
PAIR = ["--encoder", "onnx:fp32", "--decoder", "gguf:f32", "--threads", "1", "--flash-attn", "off"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    ckpt = builders.build_smolvlm2(tmp_path_factory.mktemp("smolvlm2-watch"), seed=5, video_sampling=VIDEO_SAMPLING)
    return export_checkpoint(ckpt, tmp_path_factory.mktemp("bundle") / "smolvlm2-watch",
                             [ArtifactRequest("onnx", "fp32")], [ArtifactRequest("gguf", "f32")], max_tiles=8,
                             options={"group_size": 32})


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    # 6 s at 10 fps: the 2-fps grid keeps frames 0, 5, ..., 55 (12 frames)
    return video_clips.make_clip(tmp_path_factory.mktemp("clips"), "stream.mp4", seconds=6)


def grid_frames(path) -> np.ndarray:
    """The frames the 2-fps grid keeps, decoded independently of window.py: every 5th of the 10-fps clip."""
    from edgevlm.video.decode import decode_video

    return decode_video(path, lambda probe: np.arange(0, probe.total_frames, 5)).frames


def window_clip(frames: np.ndarray, start: int, n: int = 6):
    from edgevlm.video.clip import VideoClip

    return VideoClip(frames[start:start + n], np.arange(n) / 2.0, 2.0, n / 2.0)


def test_durations_and_the_grid():
    assert [parse_seconds(t, "--every") for t in ("2s", "500ms", "1.5", "1m", 3)] == [2.0, 0.5, 1.5, 60.0, 3.0]
    grid = FrameGrid(2.0)  # 10 fps source: every 5th frame; a 1.5 fps source: every frame that passes a tick
    assert [i for i in range(30) if grid.keep(i / 10)] == [0, 5, 10, 15, 20, 25]
    grid = FrameGrid(2.0)
    assert [round(t, 3) for t in np.arange(6) / 1.5 if grid.keep(t)] == [0.0, 0.667, 1.333, 2.0, 2.667, 3.333]
    assert WindowPlan(2.0, 6, 2).window_s == 3.0 and WindowPlan(2.0, 6, 2).every_s == 1.0


def test_watch_json_encodes_only_new_frames_and_answers_as_a_cold_run(capsys, bundle, clip):
    import edgevlm

    code, out, err = run_cli(capsys, "watch", str(bundle), str(clip), "--every", "1s", "--window", "3s", "--prompt",
                          QUESTION, "--max-tokens", "6", "--json", *PAIR)
    assert code == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    answers, summary = lines[:-1], lines[-1]["summary"]
    # 12 kept frames, a 6-frame window every 2 new frames: windows start at kept frames 0, 2, 4, 6
    assert [a["stream_time_s"] for a in answers] == [2.5, 3.5, 4.5, 5.5]
    assert [a["window_s"][0] for a in answers] == [0.0, 1.0, 2.0, 3.0]
    assert [(a["frames_encoded"], a["frames_reused"]) for a in answers] == [(6, 0), (2, 4), (2, 4), (2, 4)]
    assert all(a["reused_positions"] > 0 for a in answers[1:])  # the text before the first frame stays in the KV
    assert summary == {"answers": 4, "frames_decoded": 60, "frames_encoded": 12, "frames_reused": 12,
                       "frames_dropped": 0, "live": False, "interrupted": False}
    assert all(a["frames_dropped"] == 0 for a in answers)  # a file is answered at every stride
    frames = grid_frames(clip)
    cold = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    for j, answer in enumerate(answers):
        cold.clear_caches()
        cold.forget_sequence()
        again = cold.generate(prompt=QUESTION, video=window_clip(frames, 2 * j), max_tokens=6)
        assert again.timings["embed_cache_misses"] == 6
        assert again.tokens == answer["tokens"] and again.text == answer["text"], j
    assert len({tuple(a["tokens"]) for a in answers}) > 1  # the windows differ, and so do the answers


def test_stride_of_one_frame_max_answers_and_ctrl_c(bundle, clip):
    import edgevlm
    from edgevlm.video.window import StreamSource, plan_window, watch

    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    plan = plan_window(session.spec.video, 3.0, 0.5)
    assert (plan.window_frames, plan.stride_frames, plan.rate) == (6, 1, 2.0)
    with StreamSource(clip) as source:
        result = watch(session, source.frames(), QUESTION, plan, max_answers=3, generate_kwargs={"max_tokens": 3})
    assert [(a.frames_encoded, a.frames_reused) for a in result.answers] == [(6, 0), (1, 5), (1, 5)]
    assert [a.window_start_s for a in result.answers] == [0.0, 0.5, 1.0] and not result.interrupted

    def interrupt(answer):
        if answer.index == 2:
            raise KeyboardInterrupt

    session.clear_caches()
    with StreamSource(clip) as source:
        result = watch(session, source.frames(), QUESTION, plan, on_answer=interrupt, generate_kwargs={"max_tokens": 2})
    assert result.interrupted and len(result.answers) == 2  # what was answered before Ctrl-C is kept


def test_a_stream_shorter_than_the_window_is_answered_once(bundle, tmp_path):
    import edgevlm
    from edgevlm.video.window import StreamSource, plan_window, watch

    short = video_clips.make_clip(tmp_path, "short.mp4", seconds=1.5)  # 3 kept frames, a 6-frame window
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    with StreamSource(short) as source:
        result = watch(session, source.frames(), QUESTION, plan_window(session.spec.video, 3.0, 1.0),
                       generate_kwargs={"max_tokens": 2})
    assert [(a.n_frames, a.frames_encoded) for a in result.answers] == [(3, 3)]


def test_stdin_stream(bundle, clip, tmp_path, capsys):
    """`-` reads a streamable container from stdin: the same first answer as the file."""
    mkv = video_clips.write_clip(tmp_path / "stream.mkv", video_clips.moving_shapes(60), codec="libx264")
    argv = ["watch", str(bundle), "-", "--every", "1s", "--window", "3s", "--prompt", QUESTION, "--max-tokens", "6",
            "--json", "--max-answers", "1", *PAIR]
    root = Path(__file__).resolve().parent.parent
    with open(mkv, "rb") as stdin:
        done = subprocess.run([sys.executable, "-m", "edgevlm", *argv], stdin=stdin, capture_output=True, text=True,
                              cwd=root, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert len(lines) == 2 and lines[0]["frames_encoded"] == 6 and lines[1]["summary"]["answers"] == 1
    assert lines[1]["summary"]["live"] is True  # stdin delivers frames as they are produced
    code, out, err = run_cli(capsys, *[str(mkv) if a == "-" else a for a in argv])
    assert code == 0, err
    assert json.loads(out.splitlines()[0])["tokens"] == lines[0]["tokens"]


def test_one_line_errors(capsys, bundle, clip, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(clip.read_bytes()[:300])
    base = ["--prompt", QUESTION, *PAIR]
    for argv, needles in [
        ([str(tmp_path / "none.mp4")], ["video not found"]),
        ([str(bad)], ["cannot read video", "bad.mp4"]),
        ([str(clip), "--every", "soon"], ["--every 'soon' is not a duration"]),
        ([str(clip), "--window", "10s"], ["is 20 frames, over the 6 frames", "--window"]),
        ([str(clip), "--window", "0.1s"], ["holds no frame"]),
        ([str(clip), "--window", "3s", "--n-ctx", "200"], ["over the decoder context of 200", "--window"]),
        ([str(clip), "--max-answers", "0"], ["--max-answers must be"]),
    ]:
        assert_clean_error(*run_cli(capsys, "watch", str(bundle), *argv, *base)[::2], *needles)
    idefics3 = builders.build_idefics3(tmp_path / "idefics3", seed=2)
    code, _, err = run_cli(capsys, "watch", str(idefics3), str(clip), "--prompt", QUESTION)
    assert_clean_error(code, err, "this model takes no video")


def test_watch_table_for_people(capsys, bundle, clip):
    code, out, err = run_cli(capsys, "watch", str(bundle), str(clip), "--every", "1s", "--window", "3s", "--prompt",
                          QUESTION, "--max-tokens", "2", "--max-answers", "2", *PAIR)
    assert code == 0, err
    assert out.count("stream time") == 1 and out.count("TTFT ms") == 1  # one header, then a row per answer
    assert out.count("dropped") == 1 and "live:" not in out  # the column; a file is not live
    assert "watching: a 6-frame window (3 s at 2 fps" in out and "2.5 s" in out and "3.5 s" in out
    assert "2 answers, 8 frames encoded, 4 reused" in err


def test_realtime_paces_each_kept_frame_to_its_stream_time(bundle, clip, monkeypatch):
    """--realtime: before each kept frame, a sleep until its stream time (recorded, not waited: no timed test)."""
    import edgevlm
    from edgevlm.video import window
    from edgevlm.video.window import StreamSource, plan_window, watch

    clock = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(window.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(window.time, "sleep", lambda s: (slept.append(s), clock.__setitem__(0, clock[0] + s)))
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    with StreamSource(clip) as source:
        result = watch(session, source.frames(), QUESTION, plan_window(session.spec.video, 3.0, 1.0),
                       max_answers=1, realtime=True, generate_kwargs={"max_tokens": 1})
    assert len(result.answers) == 1
    assert slept == pytest.approx([0.0, 0.5, 0.5, 0.5, 0.5, 0.5])  # the 6 kept frames, 0.5 s of stream apart


class FakeClock:
    """watch's wall time in seconds: moved on by its sleeps (a file read as a camera) and by the test's slow answerer,
    standing still otherwise (frames decode in no time: the source is faster than the answerer)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_live_source_answers_the_newest_window_and_counts_the_frames_it_dropped(bundle, clip):
    """A 2-frame window (1 s) due every kept frame (0.5 s), each answer taking 1.6 s of wall time: live, watch answers
    over the newest window and drops the kept frames that left the window unanswered; a file answers every stride
    and falls further behind with each answer (what a live source did before)."""
    import edgevlm
    from edgevlm.video.window import StreamSource, plan_window, watch

    answer_s = 1.6
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    plan = plan_window(session.spec.video, 1.0, 0.5)
    assert (plan.window_frames, plan.stride_frames, plan.rate) == (2, 1, 2.0)

    def run(live: bool):
        session.clear_caches()
        clock, asked_at = FakeClock(), []

        def slow(answer) -> None:
            asked_at.append(clock.now)  # the fake clock stands still while the answer is computed
            clock.now += answer_s

        with StreamSource(clip) as source:
            assert not source.live  # a file: live only as read here, at its own pace
            result = watch(session, source.frames(), QUESTION, plan, slow, realtime=True,
                           generate_kwargs={"max_tokens": 3}, live=live, clock=clock, sleep=clock.sleep)
        return result, asked_at

    live, asked_at = run(live=True)
    answers = live.answers
    # kept frames at 0, 0.5, ..., 5.5 s; the first answer at 0.5 s ends at 2.1 s of wall time, when 1.0, 1.5 and 2.0
    # have arrived: the window [1.5, 2.0] is answered (1.0 dropped), and so on; the stream's last window at its end
    assert [a.stream_time_s for a in answers] == [0.5, 2.0, 3.5, 5.0, 5.5]
    assert [a.frames_dropped for a in answers] == [0, 1, 1, 1, 0]
    assert asked_at == pytest.approx([0.5, 2.1, 3.7, 5.3, 6.9])
    for answer, at in zip(answers[:-1], asked_at):  # the newest window: its last frame the newest that had arrived
        assert answer.stream_time_s <= at < answer.stream_time_s + 1 / plan.rate
    assert [(a.frames_encoded, a.frames_reused) for a in answers] == [(2, 0), (2, 0), (2, 0), (2, 0), (1, 1)]
    # the counts add up: every kept frame was answered in some window or counted once as dropped
    answered = {round(a.window_start_s + i / plan.rate, 3) for a in answers for i in range(a.n_frames)}
    assert len(answered) + sum(a.frames_dropped for a in answers) == 12 and live.frames_seen == 60

    stride, behind = run(live=False)
    assert [a.stream_time_s for a in stride.answers] == [0.5 * i for i in range(1, 12)]
    assert all(a.frames_dropped == 0 for a in stride.answers)
    assert behind[-1] - stride.answers[-1].stream_time_s == pytest.approx(11.0)  # 0.5 + 10 x 1.6 s: 11 s late
    by_end = {a.stream_time_s: a.tokens for a in stride.answers}
    assert all(a.tokens == by_end[a.stream_time_s] for a in answers)  # dropping frames changes no answer


def test_run_video_reads_the_header_once_and_answers_as_before(capsys, bundle, clip, monkeypatch):
    """`edgevlm run --video`: the file's header is read once (the check before the model loads); that probe sizes
    llama.cpp's context, lays out the prompt and decodes the chosen frames (the old path read it 4 times). The answer
    equals one about the whole clip decoded here and handed over decoded (no header involved)."""
    import edgevlm
    from edgevlm.video import decode

    every = decode.decode_video(clip)  # all 60 frames at 10 fps, decoded before the count starts
    reads: list[str] = []
    read_header = decode._probe  # the one function that reads a header: probe_video and decode_video call it

    def counted(container, name):
        reads.append(name)
        return read_header(container, name)

    monkeypatch.setattr(decode, "_probe", counted)
    code, out, err = run_cli(capsys, "run", str(bundle), "--video", str(clip), "--prompt", QUESTION, "--max-tokens",
                          "6", "--json", *PAIR)
    assert code == 0, err
    assert reads == [str(clip)]
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["timings"]["embed_cache_misses"] == 6 and len(answer["tokens"]) == 6
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    decoded = session.generate(prompt=QUESTION, video=every, max_tokens=6)
    assert reads == [str(clip)] and decoded.tokens == answer["tokens"] and decoded.text == answer["text"]
    session.forget_sequence()
    by_path = session.generate(prompt=QUESTION, video=clip, max_tokens=6)  # the Python API: one read as well
    assert reads == [str(clip)] * 2 and by_path.tokens == answer["tokens"]


def test_a_live_source_decoded_slower_than_real_time_is_still_answered(bundle, clip):
    """Each source frame takes 0.15 s to read (1.5x slower than its 10 fps) and answers take no time: a due window is
    passed over only while catching up on the frames that had arrived when the last answer was done, so answers keep
    coming (a rule on the clock's present time would pass over every window until the stream ended)."""
    import edgevlm
    from edgevlm.video.clip import VideoClip
    from edgevlm.video.decode import decode_video
    from edgevlm.video.window import plan_window, watch

    every: VideoClip = decode_video(clip)  # (60, H, W, 3) at 10 fps
    clock = FakeClock()

    def slow_source():
        for i, frame in enumerate(every.frames):
            clock.now = 0.15 * i  # the wall time frame i is read at
            yield i / 10, (lambda frame=frame: frame)

    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    plan = plan_window(session.spec.video, 1.0, 0.5)
    result = watch(session, slow_source(), QUESTION, plan, generate_kwargs={"max_tokens": 1}, live=True, clock=clock,
                   sleep=clock.sleep)
    answers = result.answers
    # after the answer at 2.0 s (read at 3.0 s of wall time) the kept frame at 2.5 s had arrived: passed over for the
    # window ending at 3.0 s; after 3.0 s (read at 4.5 s) the windows ending at 3.5 and 4.0 s are passed over
    assert [a.stream_time_s for a in answers] == [0.5, 1.0, 1.5, 2.0, 3.0, 4.5, 5.5]
    assert [a.frames_dropped for a in answers] == [0, 0, 0, 0, 0, 1, 0]
    answered = {round(a.window_start_s + i / plan.rate, 3) for a in answers for i in range(a.n_frames)}
    assert len(answered) + sum(a.frames_dropped for a in answers) == 12
