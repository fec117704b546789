"""Qwen2.5-VL video through the one generic path (issue 34, integration): the export records the video section, and
`edgevlm run --video`, Session.generate(video=...) and serve's video_url give the greedy tokens of transformers'
model.generate on the same PyAV-written clip, whose processor outputs come from the HF video processor in a child
(tests/hf_video.py); context overflow is one line, exit 2, before decoding."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from test_video_qwen import HF_PROCESSOR

import builders
import hf_video
import video_clips
from edgevlm.errors import BadInputError
from edgevlm.video.qwen import QwenVideoSpec, read_video_processor_config, video_spec
from bundle_checks import assert_clean_error, run_cli

pytest.importorskip("av")
pytestmark = pytest.mark.skipif(not hf_video.available(), reason="no torchvision for the HF video reference")
QUESTION = "What moves here?"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    return builders.build_qwen2_vl(tmp_path_factory.mktemp("qwen25-video-int"), "2.5", seed=11)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """4 s at 10 fps, 131 x 75 (odd on both sides): 8 frames sampled at 2 fps, 4 temporal patches of 3 x 5 tokens."""
    folder = tmp_path_factory.mktemp("qwen-clips")
    return {"shapes": video_clips.make_clip(folder, "shapes.mp4", seconds=4, width=131, height=75),
            "other": video_clips.make_clip(folder, "other.mp4", seconds=4, width=131, height=75, seed=7)}


@pytest.fixture(scope="module")
def bundle(qwen25, tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    return export_checkpoint(qwen25, tmp_path_factory.mktemp("qwen25-int") / "bundle",
                             [ArtifactRequest("onnx", "fp32")],
                             [ArtifactRequest("gguf", "f32"), ArtifactRequest("mlx", "fp32")], max_tiles=8,
                             options={"group_size": 32})


def _frames(path):
    """Every frame of the file, decoded by PyAV here (not through edgevlm's decoder)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def hf_tokens(ckpt_path, clip_path) -> list[int]:
    """transformers end to end: Qwen2_5_VLProcessor + Qwen2VLVideoProcessor (child), then model.generate."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    frames, fps = _frames(clip_path)
    hf = hf_video.run_reference(HF_PROCESSOR.replace("PATH", repr(str(ckpt_path))).replace(
        '{"type": "text", "text": "What moves?"}', '{"type": "text", "text": ' + repr(QUESTION) + '}'),
        {"frames": frames, "fps": np.asarray(fps)})
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt_path, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id  # <|im_end|>, the bundle's stop token too (not in our tokens)
    ids = torch.from_numpy(hf["input_ids"])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values_videos=torch.from_numpy(hf["pixel_values_videos"]),
                             video_grid_thw=torch.from_numpy(hf["video_grid_thw"]),
                             second_per_grid_ts=torch.from_numpy(hf["second_per_grid_ts"]),
                             mm_token_type_ids=torch.from_numpy(hf["mm_token_type_ids"]),
                             max_new_tokens=MAX_TOKENS, do_sample=False)
    tokens = out[0, ids.shape[1]:].tolist()
    return tokens[:-1] if tokens and tokens[-1] in ([eos] if isinstance(eos, int) else eos) else tokens


@pytest.fixture(scope="module")
def reference(qwen25, clips):
    return {name: hf_tokens(qwen25, clips[name]) for name in ("shapes", "other")}


def test_the_bundle_records_the_qwen_video_section(qwen25, bundle, tmp_path):
    from edgevlm.families import describe_checkpoint
    from edgevlm.manifest import Manifest
    from edgevlm.video.kinds import video_spec_from_dict

    expected = video_spec(json.loads((qwen25 / "config.json").read_text()), read_video_processor_config(qwen25))
    section = Manifest.load(bundle).video
    assert section["kind"] == "qwen2_vl" and video_spec_from_dict(section) == expected
    assert expected.tokens_per_second == 4 and (expected.min_pixels, expected.max_pixels) == (56 * 56, 224 * 224)
    # Qwen2-VL: the same processor, no time scaling (t advances 1 per temporal patch)
    qwen2 = describe_checkpoint(builders.build_qwen2_vl(tmp_path / "qwen2", "2", seed=3)).video
    assert isinstance(qwen2, QwenVideoSpec) and qwen2.tokens_per_second is None


def test_cli_run_video_equals_model_generate(capsys, bundle, clips, reference):
    assert reference["shapes"] != reference["other"]  # the tiny model is discriminative: another clip, other tokens
    for name in ("shapes", "other"):
        code, out, err = run_cli(capsys, "run", str(bundle), "--video", str(clips[name]), "--prompt", QUESTION,
                              "--max-tokens", str(MAX_TOKENS), "--encoder", "onnx:fp32", "--decoder", "mlx:fp32",
                              "--json")
        assert code == 0, err
        answer = json.loads(out.strip().splitlines()[-1])
        assert answer["tokens"] == reference[name], name
        assert answer["timings"]["video_units_encoded"] == 4 and answer["timings"]["n_image_tokens"] == 60


def test_session_generate_video_torch_and_bundle(qwen25, bundle, clips, reference):
    import edgevlm
    from edgevlm.families import load_checkpoint
    from edgevlm.loading import session_from_checkpoint

    torch_session = session_from_checkpoint(load_checkpoint(qwen25))
    result = torch_session.generate(prompt=QUESTION, video=clips["shapes"], max_tokens=MAX_TOKENS)
    assert result.tokens == reference["shapes"]
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="mlx:fp32", threads=1)
    first = session.generate(prompt=QUESTION, video=clips["shapes"], max_tokens=MAX_TOKENS)
    again = session.generate(prompt=QUESTION, video=clips["shapes"], max_tokens=MAX_TOKENS)
    assert first.tokens == again.tokens == reference["shapes"]
    # asked again: the whole prompt's KV prefix is reused, no unit looked up; with the KV gone (the prefix cache
    # emptied), the 4 temporal patches come from the embedding cache
    assert again.timings["video_units_encoded"] == 0
    assert again.timings["n_reused_positions"] >= again.timings["n_prompt_tokens"] - 1
    session.forget_sequence()
    session.prefix_cache.clear()
    other = session.generate(prompt="Describe it.", video=clips["shapes"], max_tokens=2)
    assert (other.timings["video_units_encoded"], other.timings["video_units_reused"]) == (0, 4)
    # --max-frames 4: 2 temporal patches, the first 2 s of the clip's sampling spread over it
    short = session.generate(prompt=QUESTION, video=clips["shapes"], max_frames=4, max_tokens=2)
    assert short.timings["n_image_tokens"] == 30


def test_serve_video_url_equals_model_generate(bundle, clips, reference):
    import edgevlm
    from edgevlm.serve import ChatService

    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="mlx:fp32", threads=1)
    data = base64.b64encode(clips["shapes"].read_bytes()).decode()
    request = {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{data}"}},
        {"type": "text", "text": QUESTION}]}], "max_tokens": MAX_TOKENS}
    result = [d for d in ChatService(session, "m").complete(request) if d.result is not None][0].result
    assert result.tokens[:len(reference["shapes"])] == reference["shapes"]


def test_context_overflow_and_bad_limits_are_one_line(capsys, bundle, clips):
    base = ["run", str(bundle), "--video", str(clips["shapes"]), "--prompt", QUESTION, "--encoder", "onnx:fp32",
            "--decoder", "mlx:fp32"]
    # 4 temporal patches x 15 tokens + 60 text positions: 120 do not fit 100; said before any frame is decoded, with
    # the frames that fit: 2 temporal patches (a 90-position prompt)
    code, _, err = run_cli(capsys, *base, "--n-ctx", "100")
    assert_clean_error(code, err, "4 temporal patches x 15 tokens) make a 120-token prompt, over the decoder context "
                     "of 100", "--max-frames 4 or less")
    code, out, err = run_cli(capsys, *base, "--n-ctx", "100", "--max-frames", "4", "--max-tokens", "1", "--json")
    assert code == 0, err
    timings = json.loads(out.strip().splitlines()[-1])["timings"]
    assert (timings["video_units_encoded"], timings["n_prompt_tokens"]) == (2, 90)
    code, _, err = run_cli(capsys, *base, "--n-ctx", "70")
    assert_clean_error(code, err, "even one temporal patch makes a", "raise --n-ctx")
    code, _, err = run_cli(capsys, *base, "--max-frames", "1")
    assert_clean_error(code, err, "under one temporal patch", "--max-frames 2")


def test_llama_cpp_context_sized_with_the_video_and_its_refusal(capsys, bundle, clips):
    """gguf: a one-shot job's llama.cpp context counts the video's positions (header only); llama.cpp cannot take the
    text after several time-scaled temporal patches (refused in one line); one temporal patch runs."""
    from edgevlm.manifest import Manifest
    from edgevlm.runtimes.bundle_loader import runtime_spec
    from edgevlm.runtimes.job_context import Job
    from edgevlm.runtimes.video_prompt import VideoRequest

    spec = runtime_spec(bundle, Manifest.load(bundle))
    assert Job((QUESTION,), (), 2, VideoRequest(clips["shapes"])).positions(spec) == 120 + 2
    assert Job((QUESTION,), (), 2, VideoRequest(clips["shapes"], max_frames=4)).positions(spec) == 90 + 2
    base = ["run", str(bundle), "--video", str(clips["shapes"]), "--prompt", QUESTION, "--encoder", "onnx:fp32",
            "--decoder", "gguf:f32", "--max-tokens", "2"]
    code, _, err = run_cli(capsys, *base)
    assert_clean_error(code, err, "llama.cpp cannot take text there")
    code, out, err = run_cli(capsys, *base, "--max-frames", "2", "--json")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["timings"]["n_image_tokens"] == 15
    import edgevlm

    with pytest.raises(BadInputError, match="llama.cpp cannot take text there"):
        edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1).generate(
            prompt=QUESTION, video=clips["shapes"], max_tokens=2)


def test_chat_video_is_the_first_turns_attachment(capsys, monkeypatch, bundle, clips, reference, tmp_path):
    """`edgevlm chat --video`: the first turn answers as model.generate; the second prefills only its own turn (the
    video's rows live in the sequence, no unit encoded) and equals a cold run of the whole conversation."""
    import edgevlm
    from edgevlm.cli import main
    from edgevlm.video.chat import VideoConversation

    load = dict(encoder="onnx:fp32", decoder="mlx:fp32", threads=1)
    warm = VideoConversation(edgevlm.load(bundle, **load), clips["shapes"])
    first = warm.ask(QUESTION, max_tokens=6)
    assert first.tokens == reference["shapes"][:6] and first.timings["video_units_encoded"] == 4
    second = warm.ask("And then?", max_tokens=6)
    assert second.timings["video_units_encoded"] == second.timings["video_units_reused"] == 0
    # the first turn's prompt (video included) is not prefilled again (its answer's text, re-tokenized, may split
    # otherwise than the sampled tokens, and the last sampled token was never fed)
    assert second.timings["n_reused_positions"] >= first.timings["n_prompt_tokens"] == 120
    cold = VideoConversation(edgevlm.load(bundle, **load), clips["shapes"])
    cold.messages = warm.messages[:2]
    again = cold.ask("And then?", max_tokens=6)
    assert again.tokens == second.tokens and again.timings["video_units_encoded"] == 4

    lines = iter([QUESTION, "And then?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code = main(["chat", str(bundle), "--video", str(clips["shapes"]), "--max-tokens", "6", "--verbose",
                 "--encoder", "onnx:fp32", "--decoder", "mlx:fp32", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    answers = [part.rstrip("\n") for part in captured.out.split("vlm> ")[1:]]
    assert answers == [first.text, second.text]
    turns = [line for line in captured.err.splitlines() if "new positions" in line]
    assert "video units encoded 4 reused 0" in turns[0] and "video units encoded 0 reused 0" in turns[1]
    # --video with --image, or a limit without --video: one line before the model loads
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    code, _, err = run_cli(capsys, "chat", str(bundle), "--video", str(clips["shapes"]), "--image",
                        str(tmp_path / "red.png"))
    assert_clean_error(code, err, "pass --video or --image, not both")
    assert_clean_error(*run_cli(capsys, "chat", str(bundle), "--fps", "1")[::2], "pass --video FILE")


def _hf_text_positions(ckpt_path) -> int:
    """The video turn with an empty question through transformers' tokenizer and the checkpoint's template: its
    length with the one <|video_pad|> left unexpanded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt_path)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": ""}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=(ckpt_path / "chat_template.jinja").read_text(),
                                         tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_plan_counts_qwen_video_tokens_and_the_longest_clip(capsys, bundle, qwen25):
    """4 s of 131x75 at a nominal 30 fps: 120 frames, 2 fps -> 8 frames = 4 temporal patches; smart_resize(75, 131)
    with the video's 56^2..224^2 pixels = 84 x 140 -> 3 x 5 = 15 tokens each; positions = the template's text + 60
    video tokens + 24 question + 64 answer. At S >= 2 s, floor(S) temporal patches: the longest clip in a context of
    C positions: the last tenth of a second whose temporal patches fit, counted here as Qwen2VLVideoProcessor
    samples (n = the fps count floored to pairs, then torch.arange(0, total, total / n), whose length can be n + 1:
    the last frame is then repeated to fill a temporal patch)."""
    text = _hf_text_positions(qwen25) - 1

    def units(seconds: float) -> int:
        total = round(seconds * 30)
        n = int(min(max(total / 30 * 2, 4), min(768, total) // 2 * 2, total) // 2 * 2)
        return -(-len(torch.arange(0, total, total / n)) // 2)

    def longest_in(context: int) -> float:
        return max(t / 10 for t in range(1, 3860) if text + 15 * units(t / 10) + 88 <= context)
    code, out, err = run_cli(capsys, "plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--video-seconds", "4",
                          "--video-size", "131x75", "--context", "256", "--json")
    assert code == 0, err
    video = json.loads(out)["video"]
    assert (video["frames"], video["unit"], video["units"], video["tokens_per_unit"], video["video_tokens"]) == \
        (8, "temporal patch", 4, 15, 60)
    assert video["positions"] == text + 60 + 24 + 64 and video["fits_context"]
    longest = longest_in(256)
    assert video["largest_clip_s"]["context"] == longest
    # the tiny model fits any device's memory: each option's longest clip is the context's
    assert all(value == longest for value in video["largest_clip_s"].values()) and video["any_length"] == []
    # without --context: the model's 1,024 positions, and the plan is sized to the clip's positions
    code, out, err = run_cli(capsys, "plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--video-seconds", "4",
                          "--video-size", "131x75", "--json")
    result = json.loads(out)
    assert result["context"] == text + 148 and result["video"]["largest_clip_s"]["context"] == longest_in(1024)
    # --max-frames 6 (3 temporal patches) caps every clip: any length fits
    code, out, err = run_cli(capsys, "plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--video-seconds", "60",
                          "--video-size", "131x75", "--max-frames", "6", "--json")
    video = json.loads(out)["video"]
    assert (video["frames"], video["video_tokens"]) == (6, 45) and "context" in video["any_length"]
    # the table, and the one-line refusals
    code, out, _ = run_cli(capsys, "plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--video-seconds", "4",
                        "--video-size", "131x75", "--context", "256")
    assert code == 0 and "4 x 15 = 60" in out and "8 = 4 temporal patches" in out and f"{longest:g} s" in out
    assert_clean_error(*run_cli(capsys, "plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--fps", "1")[::2],
                     "pass --video-seconds S")
    assert_clean_error(*run_cli(capsys, "plan", str(qwen25), "--device", "jetson-orin-nano-8gb", "--video-seconds",
                           "4")[::2], "pass an exported BUNDLE folder")
    assert_clean_error(*run_cli(capsys, "plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--video-seconds",
                           "0")[::2], "--video-seconds must be in")
