"""The llama-mtmd-cli video row of `edgevlm bench --video` (edgevlm/bench/mtmd_video.py) without ffmpeg or the CLI:
the command line it builds, the parsing of a log and an answer recorded from a real run (tests/data/mtmd_video), the
process plumbing on a shell command, and the skip reasons."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgevlm.bench import mtmd_video
from edgevlm.bench.harness import Scenario
from edgevlm.bench.video import ratios, rows

DATA = Path(__file__).parent / "data" / "mtmd_video"


def test_command_line():
    argv = mtmd_video.command("/bin/llama-mtmd-cli", Path("b/decoder/q8_0.gguf"), Path("b/encoder/mmproj-f16.gguf"),
                              "/tmp/c.mp4", "Question 0: what?", 1.0, 64, 2, 16)
    assert argv == ["/bin/llama-mtmd-cli", "-m", "b/decoder/q8_0.gguf", "--mmproj", "b/encoder/mmproj-f16.gguf",
                    "--video", "/tmp/c.mp4", "--video-fps", "1", "--image-max-tokens", "64", "-p", "Question 0: what?",
                    "-n", "16", "--temp", "0", "--ignore-eos", "-t", "2", "-lv", "5"]
    assert mtmd_video.command("x", Path("g"), Path("m"), "c", "q", 0.5, 128, 1, 4)[7:11] == [
        "--video-fps", "0.5", "--image-max-tokens", "128"]


def test_parse_recorded_log():
    # 10 s at 1 fps: 10 frames, each the global view + one tile (20 chunks of 64 tokens), 1,396 prompt positions,
    # 15 decode steps in 251.13 ms after the first token
    parsed = mtmd_video.parse_log((DATA / "stderr-ok.txt").read_text())
    assert parsed["n_frames"] == 10 and parsed["n_views"] == 20 and parsed["n_image_tokens"] == 1280
    assert parsed["encode_ms"] == 25674.0
    assert parsed["n_prompt_tokens"] == 1396 and parsed["n_decoded"] == 15
    assert parsed["decode_tok_s"] == pytest.approx(15 / 251.13 * 1e3)


def test_parse_empty_log():
    assert mtmd_video.parse_log("") == {"n_frames": None, "n_views": None, "n_image_tokens": None, "encode_ms": None,
                                        "n_prompt_tokens": None, "decode_tok_s": None, "n_decoded": 0}


def test_first_token_on_recorded_answer():
    answer = (DATA / "stdout-ok.txt").read_bytes()
    assert answer.startswith(b"\n") and answer.count(b"<|unused_12623|>") == 16
    # the newline mtmd-cli prints once the prompt is evaluated, then the answer as it streams
    chunks = [(10.0, answer[:1]), (10.25, answer[1:17]), (10.5, answer[17:])]
    assert mtmd_video.first_token_ms(chunks, start=9.0) == pytest.approx(1250.0)
    assert mtmd_video.first_token_ms([(10.0, answer)], start=9.0) == pytest.approx(1000.0)  # in one read
    assert mtmd_video.first_token_ms([(10.0, b"\n")], start=9.0) is None  # no answer


def test_failure_line_is_the_last_error():
    assert mtmd_video.failure_line((DATA / "stderr-overflow.txt").read_text()) == "Unable to decode media chunk 247"
    ffprobe = ("0.00.385.401 W       For normal use cases, please use the standard llama-cli\n"
               "0.00.556.117 E mtmd_helper_video_init_from_buf: ffprobe failed on buffer (is ffprobe in PATH?)\n"
               "0.00.556.132 E mtmd_helper_bitmap_init_from_buf: failed to decode buffer as either image/audio/video\n"
               "0.00.600.000 D some debug line\n")
    assert mtmd_video.failure_line(ffprobe).startswith("mtmd_helper_bitmap_init_from_buf: failed to decode")
    assert mtmd_video.failure_line("") == "no output"


def test_run_cli_on_a_process():
    done = mtmd_video.run_cli(["sh", "-c", "printf '\\nabc'; cat " + str(DATA / "stderr-ok.txt") + " >&2"])
    assert done["answer"] == "\nabc" and done["ttft_ms"] > 0 and done["peak_rss_mb"] > 0
    assert done["n_frames"] == 10 and done["n_prompt_tokens"] == 1396
    with pytest.raises(RuntimeError, match=r"exit 1: mtmd_helper_video_init: ffprobe failed"):
        mtmd_video.run_cli(["sh", "-c", "echo '0.00.5 E mtmd_helper_video_init: ffprobe failed' >&2; exit 1"])
    with pytest.raises(RuntimeError, match="printed no answer"):
        mtmd_video.run_cli(["sh", "-c", "echo"])


def _executable(folder: Path, name: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_skip_reasons(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    scenario = Scenario(prompt_tokens=8, new_tokens=4, repeats=1, threads=1)
    row = mtmd_video.mtmd_video_row(tmp_path, "gguf:q8_0", "c.mp4", scenario, None)
    assert row["name"] == mtmd_video.NAME and "no ffmpeg executable on PATH" in row["skipped"]
    assert "apt-get install ffmpeg" in row["skipped"]
    _executable(tmp_path, "ffmpeg")
    assert "no ffprobe executable" in mtmd_video.mtmd_video_row(tmp_path, "gguf:q8_0", "c", scenario, None)["skipped"]
    _executable(tmp_path, "ffprobe")
    row = mtmd_video.mtmd_video_row(tmp_path, "gguf:q8_0", "c", scenario, str(tmp_path / "bin"))
    assert row["skipped"].startswith("llama-mtmd-cli not found (pass --llamacpp-bin DIR")
    (tmp_path / "bin").mkdir()
    _executable(tmp_path / "bin", "llama-mtmd-cli")
    assert mtmd_video.locate(str(tmp_path / "bin")) == (str(tmp_path / "bin" / "llama-mtmd-cli"), None)
    row = mtmd_video.mtmd_video_row(None, None, "c", scenario, str(tmp_path / "bin"))
    assert row["skipped"].startswith("no GGUF decoder in this run")


def test_faststart_leaves_other_containers(tmp_path):
    assert mtmd_video.faststart(tmp_path / "clip.mkv", tmp_path) == tmp_path / "clip.mkv"  # no ffmpeg run


def test_row_in_the_table():
    summary = {"median": 30000.0, "min": 29000.0, "max": 31000.0}
    peer = {"name": mtmd_video.NAME, "kind": mtmd_video.KIND, "encoder": "gguf:f16", "decoder": "gguf:q8_0",
            "metrics": {"n_frames": 10, "n_views": 20, "n_image_tokens": 1280, "n_prompt_tokens": 1396,
                        "ttft_cold_ms": summary, "encode_ms_cold": {**summary, "median": 25674.0},
                        "decode_tok_s": {**summary, "median": 59.7}, "peak_rss_mb": 812.0},
            "sampling": mtmd_video.sampling_note(1.0, 10, 10)}
    reference = {"name": "torch (transformers eager)", "kind": "reference", "metrics": {
        "ttft_cold_ms": {**summary, "median": 10000.0}, "n_frames": 10, "n_prompt_tokens": 949,
        "encode_ms_cold": summary, "ttft_second_question_ms": summary,
        "second_question": {"frames_encoded": 0, "reused_positions": 918},
        "stride": {"frames_encoded_per_answer": [10], "answers": [{"ttft_ms": 1.0}], "ttft_ms_after_first": summary}}}
    result = {"runs": [reference], "peers": [peer, {"name": "x", "skipped": "why"}]}
    table = rows(result)
    assert table[1][:5] == [f"{mtmd_video.NAME} (gguf:f16 + gguf:q8_0)", "10", "1396", "30000", "25674"]
    assert table[2][:2] == ["x", "skipped: why"]
    (line,) = [line for line in ratios(result) if line.startswith(mtmd_video.NAME)]
    assert "3.00x the PyTorch reference's" in line and "1280 image tokens" in line and "59.7 tok/s" in line
    assert "against the HF processor's" not in line
    assert mtmd_video.sampling_note(4.0, 40, 10).endswith(": 40 frames against the HF processor's 10")
