"""`edgevlm bench --video-seconds S`: the video workload on a tiny SmolVLM2 bundle (behaviour, not timing): a second
question encodes no frame, the stride run encodes the window and then only the new frames, the PyTorch reference is
in the same run with the same greedy tokens, and llama.cpp's video path is a row with its reason."""
from __future__ import annotations

import json
import shutil

import pytest

import builders
from edgevlm.cli import main

pytest.importorskip("av")
VIDEO_SAMPLING = {"fps": 2, "max_frames": 6, "video_size": {"longest_edge": 48}}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    ckpt = builders.build_smolvlm2(tmp_path_factory.mktemp("smolvlm2-bench"), seed=5, video_sampling=VIDEO_SAMPLING)
    return export_checkpoint(ckpt, tmp_path_factory.mktemp("bundle") / "smolvlm2-bench",
                             [ArtifactRequest("onnx", "fp32")], [ArtifactRequest("gguf", "f32")], max_tiles=8,
                             options={"group_size": 32})


def test_bench_video_workload(bundle, tmp_path, capsys):
    out = tmp_path / "bench"
    # a 2 s clip (4 frames at the processor's 2 fps); the stride run over a 5 s clip: 10 kept frames, a 4-frame
    # window (the clip's length) moved on by 2 frames (1 s) -> windows ending at kept frames 4, 6, 8, 10
    code = main(["bench", str(bundle), "--video-seconds", "2", "--video-stride-seconds", "5", "--video-every", "1s",
                 "--prompt-tokens", "6", "--new-tokens", "4", "--repeats", "2", "--threads", "1", "--encoder",
                 "onnx:fp32", "--decoder", "gguf:f32", "--flash-attn", "off", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result == json.loads((out / "bench.json").read_text())
    assert result["schema"] == "edgevlm-bench/1/video"
    assert [r["name"] for r in result["runs"]] == ["torch (transformers eager)", "onnx:fp32 + gguf:f32"]
    for run in result["runs"]:
        m = run["metrics"]
        assert m["n_frames"] == 4 and m["n_image_tokens"] == 16  # 4 frames x 4 tokens
        second = m["second_question"]  # the same clip: nothing encoded, its frames' KV restored from the prefix cache
        assert second["frames_encoded"] == 0 and second["prefix_cache_hits"] == 1, second
        assert second["reused_positions"] > m["n_image_tokens"], second
        assert m["ttft_cold_ms"]["median"] > 0 and m["ttft_second_question_ms"]["median"] > 0
        s = m["stride"]
        assert (s["window_frames"], s["stride_frames"], s["rate_fps"]) == (4, 2, 2.0)
        assert s["frames_encoded_per_answer"] == [4, 2, 2, 2]
        assert [a["frames_reused"] for a in s["answers"]] == [0, 2, 2, 2]
        assert [a["stream_time_s"] for a in s["answers"]] == [1.5, 2.5, 3.5, 4.5]
    reference, ours = (r["metrics"]["stride"]["answers"] for r in result["runs"])
    assert [a["tokens"] for a in ours] == [a["tokens"] for a in reference]  # F32 GGUF = PyTorch, window by window
    assert set(result["runs"][1]["vs_reference"]) == {"ttft_cold_ms", "ttft_second_question_ms", "stride_ttft_ms"}
    (peer,) = result["peers"]
    if shutil.which("ffmpeg") is None:
        assert "no ffmpeg executable" in peer["skipped"]
    markdown = (out / "bench.md").read_text()
    assert "| onnx:fp32 + gguf:f32 | 4 |" in markdown and "4 2 2 2" in markdown and "skipped: " in markdown


@pytest.mark.parametrize("argv, needle", [
    (["--video-seconds", "0"], "--video-seconds must be in"),
    (["--video", "missing.mp4"], "video not found"),
    (["--video-seconds", "2", "--video-every", "never"], "--video-every 'never' is not a duration"),
    (["--video-seconds", "2", "--video-window", "10s"], "over the 6 frames"),
])
def test_bad_video_bench_options(argv, needle, bundle, capsys):
    code = main(["bench", str(bundle), "--peers", "", "--in-process", "--repeats", "1", "--new-tokens", "2",
                 "--threads", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
