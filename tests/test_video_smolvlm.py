"""SmolVLM2 video: frame sampling, pixels and prompt ids equal transformers' SmolVLMVideoProcessor +
SmolVLMProcessor (run in a child with torchvision, tests/hf_video.py) on a PyAV-written clip; greedy tokens equal
`model.generate`, on torch and on the exported F32 GGUF and fp32 MLX decoders; per-frame embeddings are cached."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import builders
import hf_video
import video_clips
from edgevlm.errors import BadInputError
from edgevlm.families import load_checkpoint
from edgevlm.loading import session_from_checkpoint
from edgevlm.runtimes.video_prompt import VideoRequest, user_message
from edgevlm.video.smolvlm import number_words
from bundle_checks import assert_clean_error, run_cli

pytest.importorskip("av")
# the tiny checkpoint's video settings: 2 fps, at most 6 frames, frames to 48 px then to the 32 px tile
VIDEO_SAMPLING = {"fps": 2, "max_frames": 6, "video_size": {"longest_edge": 48}}
QUESTION = "What moves in the video?"

REFERENCE = r'''
import sys
import transformers.models.smolvlm.processing_smolvlm as processing
REAL = int(processing.num2words is not None)
if not REAL:  # num2words is not installed here: the count's words come from ours, checked against a table below
    from edgevlm.video.smolvlm import number_words
    processing.num2words = number_words
from transformers import AutoTokenizer
from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor, DEFAULT_CHAT_TEMPLATE
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.video_utils import read_video_pyav
path, clip = str(INPUTS["ckpt"]), str(INPUTS["clip"])
video_processor = SmolVLMVideoProcessor.from_pretrained(path)
processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessorPil.from_pretrained(path),
                             tokenizer=AutoTokenizer.from_pretrained(path), video_processor=video_processor,
                             image_seq_len=4, chat_template=DEFAULT_CHAT_TEMPLATE)
messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": str(INPUTS["question"])}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
kwargs = {}
if "max_frames" in INPUTS:
    kwargs["num_frames"] = int(INPUTS["max_frames"])
video, meta = read_video_pyav(clip, sample_indices_fn=video_processor.sample_frames, **kwargs)
out = processor(text=[text], videos=[video], video_metadata=[meta], do_sample_frames=False, return_tensors="pt")
OUTPUTS.update(pixel_values=out["pixel_values"].numpy(), input_ids=out["input_ids"].numpy(),
               pixel_attention_mask=out["pixel_attention_mask"].numpy(), indices=np.asarray(meta.frames_indices),
               real_num2words=REAL)
'''


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    return builders.build_smolvlm2(tmp_path_factory.mktemp("smolvlm2-video"), seed=5, video_sampling=VIDEO_SAMPLING)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return {"shapes": video_clips.make_clip(folder, "shapes.mp4"),
            "other": video_clips.make_clip(folder, "other.mp4", seed=7),
            "long": video_clips.make_clip(folder, "long.mp4", seconds=12, fps=5, width=161, height=97)}


def reference(ckpt_path, clip, **extra):
    if not hf_video.available():
        pytest.skip("torchvision's Python half is missing (make setup)")
    inputs = {"ckpt": np.array(str(ckpt_path)), "clip": np.array(str(clip)), "question": np.array(QUESTION)}
    inputs.update({k: np.array(v) for k, v in extra.items()})
    return hf_video.run_reference(REFERENCE, inputs)


def ours(session, clip, **limits):
    request = session.prepare([user_message(QUESTION)], video=VideoRequest(clip, **limits))
    pixels = np.stack([im.frame_preprocess(im.rgb).pixel_values[0] for im in request.images])
    return request, pixels


def test_number_words_match_num2words_english():
    table = {0: "zero", 1: "one", 6: "six", 13: "thirteen", 20: "twenty", 21: "twenty-one", 40: "forty",
             64: "sixty-four", 99: "ninety-nine", 100: "one hundred", 101: "one hundred and one",
             342: "three hundred and forty-two", 999: "nine hundred and ninety-nine"}
    assert {n: number_words(n) for n in table} == table


@pytest.mark.parametrize("clip_name, limits", [("shapes", {}), ("long", {}), ("long", {"max_frames": 4})])
def test_frames_pixels_and_prompt_ids_equal_hf(ckpt_path, clips, clip_name, limits):
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt.spec.video is not None and ckpt.spec.video.max_frames == 6
    hf = reference(ckpt_path, clips[clip_name], **limits)
    request, pixels = ours(session_from_checkpoint(ckpt), clips[clip_name], **limits)
    assert len(request.images) == len(hf["indices"])
    assert pixels.shape == hf["pixel_values"][0].shape
    # torch's uint8 antialiased LANCZOS in numpy (video/resize.py): the same uint8 levels; the fused normalize leaves
    # float32 rounding only (Pillow's LANCZOS put 0.82% of values one level, 2/255, apart)
    assert np.abs(pixels - hf["pixel_values"][0]).max() <= 1e-6, np.abs(pixels - hf["pixel_values"][0]).max()
    assert hf["pixel_attention_mask"].all()  # one size for every frame: nothing padded
    assert request.prompt.ids.tolist() == hf["input_ids"][0].tolist()
    from edgevlm.video.decode import probe_video

    probe = probe_video(clips[clip_name])  # the same indices (the prompt's timestamps already say so)
    assert ckpt.spec.video.sample(probe.total_frames, probe.fps, limits.get("max_frames")).tolist() == \
        hf["indices"].tolist()


def test_no_video_families_and_bad_limits_refuse_in_one_line(tmp_path, clips):
    session = session_from_checkpoint(load_checkpoint(builders.build_idefics3(tmp_path / "idefics3", seed=2)))
    with pytest.raises(BadInputError, match="this model takes no video"):
        session.generate(prompt=QUESTION, video=clips["shapes"], max_tokens=2)
    with pytest.raises(BadInputError, match="max_frames must be"):
        VideoRequest(clips["shapes"], max_frames=0)


def hf_generate(ckpt_path, hf, max_tokens: int) -> list[int]:
    from transformers import SmolVLMForConditionalGeneration

    model = SmolVLMForConditionalGeneration.from_pretrained(ckpt_path).eval()
    ids = torch.from_numpy(hf["input_ids"])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=torch.from_numpy(hf["pixel_values"]),
                             pixel_attention_mask=torch.from_numpy(hf["pixel_attention_mask"]).bool(),
                             max_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def hf_tokens(ckpt_path, clips):
    return {name: hf_generate(ckpt_path, reference(ckpt_path, clips[name]), 8) for name in ("shapes", "other")}


def test_torch_greedy_tokens_equal_model_generate_and_follow_the_video(ckpt_path, clips, hf_tokens):
    session = session_from_checkpoint(load_checkpoint(ckpt_path))
    for name in ("shapes", "other"):
        result = session.generate(prompt=QUESTION, video=clips[name], max_tokens=8)
        assert result.tokens[:len(hf_tokens[name])] == hf_tokens[name], name
    assert hf_tokens["shapes"] != hf_tokens["other"]  # the tiny model is discriminative: another video, other tokens


@pytest.fixture(scope="module")
def bundle(ckpt_path, tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    decoders = [ArtifactRequest("gguf", "f32")]
    try:
        import mlx.core  # noqa: F401

        decoders.append(ArtifactRequest("mlx", "fp32"))
    except ImportError:
        pass
    return export_checkpoint(ckpt_path, tmp_path_factory.mktemp("bundle") / "smolvlm2-video",
                             [ArtifactRequest("onnx", "fp32")], decoders, max_tiles=8, options={"group_size": 32})


@pytest.mark.parametrize("decoder", ["gguf:f32", "mlx:fp32"])
def test_exported_decoders_give_the_same_tokens(bundle, clips, hf_tokens, decoder):
    import edgevlm
    from edgevlm.manifest import Manifest

    if decoder.startswith("mlx"):
        pytest.importorskip("mlx.core", reason="MLX is not installed on this platform")
    assert Manifest.load(bundle).video["kind"] == "smolvlm"
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder=decoder, threads=1)
    for name in ("shapes", "other"):
        result = session.generate(prompt=QUESTION, video=clips[name], max_tokens=8)
        assert result.tokens[:len(hf_tokens[name])] == hf_tokens[name], (decoder, name)


def _window(frames, start: int, length: int, fps: float):
    from edgevlm.video.clip import VideoClip

    return VideoClip(frames[start:start + length], np.arange(length) / fps, fps, length / fps)


def test_a_window_advanced_by_k_frames_encodes_k_frames_and_answers_as_a_cold_run(bundle, clips):
    """A stream kept at the sampling rate (2 fps): a 3 s window holds 6 frames, all sampled; moved on by 2 frames it
    shares 4 with the last window, whose embeddings come from the cache. Positions move (the frames' timestamps and
    places in the prompt change), so the KV of the shared frames cannot be reused: only the encoder work is saved."""
    import edgevlm
    from edgevlm.video.decode import decode_video

    stream = decode_video(clips["shapes"], lambda probe: np.arange(0, probe.total_frames, 4)).frames  # kept as 2 fps
    warm = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    first = warm.generate(prompt=QUESTION, video=_window(stream, 0, 6, 2.0), max_tokens=6)
    assert first.timings["embed_cache_misses"] == 6
    for k, start in ((2, 2), (1, 3)):
        moved = warm.generate(prompt=QUESTION, video=_window(stream, start, 6, 2.0), max_tokens=6)
        assert (moved.timings["embed_cache_misses"], moved.timings["embed_cache_hits"]) == (k, 6 - k)
        cold = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
        again = cold.generate(prompt=QUESTION, video=_window(stream, start, 6, 2.0), max_tokens=6)
        assert again.timings["embed_cache_misses"] == 6
        assert again.tokens == moved.tokens and again.text == moved.text
    # the same clip asked again: nothing is encoded
    assert warm.generate(prompt="Describe it.", video=_window(stream, 2, 6, 2.0),
                         max_tokens=2).timings["embed_cache_misses"] == 0


def test_cli_run_video_and_its_one_line_errors(capsys, bundle, ckpt_path, clips, hf_tokens, tmp_path):
    import json

    code, out, err = run_cli(capsys, "run", str(bundle), "--video", str(clips["shapes"]), "--prompt", QUESTION,
                          "--max-tokens", "8", "--encoder", "onnx:fp32", "--decoder", "gguf:f32", "--json")
    assert code == 0, err
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["tokens"][:len(hf_tokens["shapes"])] == hf_tokens["shapes"]
    assert answer["timings"]["embed_cache_misses"] == 6
    # the context: 6 frames (a 245-token prompt) do not fit 200 positions; said before any frame is decoded or encoded
    code, _, err = run_cli(capsys, "run", str(bundle), "--video", str(clips["shapes"]), "--prompt", QUESTION,
                        "--n-ctx", "200", "--decoder", "gguf:f32")
    assert_clean_error(code, err, "over the decoder context of 200", "--max-frames")
    fit = int(err.split("--max-frames ")[1].split()[0])
    code, _, err = run_cli(capsys, "run", str(bundle), "--video", str(clips["shapes"]), "--prompt", QUESTION,
                        "--n-ctx", "200", "--decoder", "gguf:f32", "--max-frames", str(fit), "--max-tokens", "1")
    assert code == 0 and 1 <= fit < 6, err  # the suggested frame count fits
    code, _, err = run_cli(capsys, "run", str(bundle), "--video", str(clips["shapes"]), "--prompt", QUESTION,
                        "--n-ctx", "120", "--decoder", "gguf:f32")
    assert_clean_error(code, err, "even one frame makes a", "raise --n-ctx")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(clips["shapes"].read_bytes()[:300])
    for argv, needles in [
        (["--video", str(bad)], ["cannot read video", "bad.mp4"]),
        (["--video", str(tmp_path / "none.mp4")], ["video not found"]),
        (["--video", str(clips["shapes"]), "--max-frames", "0"], ["max_frames must be"]),
        (["--max-frames", "3"], ["pass --video FILE"]),
    ]:
        assert_clean_error(*run_cli(capsys, "run", str(bundle), "--prompt", QUESTION, *argv)[::2], *needles)
    idefics3 = builders.build_idefics3(tmp_path / "idefics3", seed=2)
    code, _, err = run_cli(capsys, "run", str(idefics3), "--video", str(clips["shapes"]), "--prompt", QUESTION)
    assert_clean_error(code, err, "this model takes no video")


def test_serve_video_url_data_and_local_paths(bundle, clips, hf_tokens):
    import base64

    import edgevlm
    from edgevlm.serve import ChatService

    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1)
    data = base64.b64encode(clips["shapes"].read_bytes()).decode()

    def body(url, extra=()):
        return {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}}, *extra,
                                                          {"type": "text", "text": QUESTION}]}], "max_tokens": 8}

    def answer(service, request):
        return [d for d in service.complete(request) if d.result is not None][0].result

    result = answer(ChatService(session, "m"), body(f"data:video/mp4;base64,{data}"))
    assert result.tokens[:len(hf_tokens["shapes"])] == hf_tokens["shapes"]
    local = ChatService(session, "m", allow_local_images=clips["shapes"].parent)
    assert answer(local, body(str(clips["shapes"]))).tokens == result.tokens
    png = "data:image/png;base64," + base64.b64encode(b"x").decode()
    for service, request, needle in [
        (ChatService(session, "m"), body(str(clips["shapes"])), "local video paths are refused"),
        (ChatService(session, "m"), body("data:video/mp4;base64,AAAA"), "cannot read video"),
        (ChatService(session, "m"), body("data:video/mp4,raw"), "a video data URL must be base64"),
        (ChatService(session, "m"), body("https://example.com/a.mp4"), "remote video URLs are not fetched"),
        (local, body("/etc/passwd"), "outside the folder"),
        (ChatService(session, "m"), body(png, [{"type": "image_url", "image_url": {"url": png}}]),
         "one video_url and no image_url"),
    ]:
        with pytest.raises(BadInputError, match=needle) as caught:
            answer(service, request)
        assert "\n" not in str(caught.value)


def test_plan_counts_frames_and_finds_any_length_fits(capsys, bundle):
    """The tiny SmolVLM2 samples 2 fps, at most 6 frames: 10 s -> min(round(2 x 10), 6) = 6 frames, each one tile of
    the layout's tokens; from 3 s on every clip gives those 6 frames, so any length that fits once fits."""
    import json

    from edgevlm.manifest import Manifest

    per_tile = Manifest.load(bundle).image_layout.tokens_per_tile
    code, out, err = run_cli(capsys, "plan", str(bundle), "--device", "raspberry-pi-5-8gb", "--video-seconds", "10",
                          "--json")
    assert code == 0, err
    video = json.loads(out)["video"]
    assert (video["frames"], video["unit"], video["units"], video["tokens_per_unit"], video["video_tokens"]) == \
        (6, "frame", 6, per_tile, 6 * per_tile)
    assert video["fits_context"] and "context" in video["any_length"]
    ten = json.loads(out)
    # the plan is the whole clip's: six frames encoded, their positions prefilled, held and decoded over
    assert ten["images"]["count"] == 6 and ten["images"]["positions"] == video["prompt_positions"]
    assert ten["ttft_prompt_positions"] == video["positions"] - 64 and ten["one_request"]["positions"] == \
        video["positions"]
    code, out, err = run_cli(capsys, "plan", str(bundle), "--device", "raspberry-pi-5-8gb", "--video-seconds", "1",
                          "--json")
    one = json.loads(out)
    assert one["video"]["frames"] == 2  # round(2 x 1)
    assert (ten["images"]["encoder_calls"], one["images"]["encoder_calls"]) == (6, 2)
    # on a device with a compute figure: TTFT's encode is 6 frames' against 2 (it counted one before)
    encode = []
    for seconds in ("10", "1"):
        code, out, err = run_cli(capsys, "plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--video-seconds",
                                 seconds, "--json")
        encode.append([option["ttft"]["encode_s"] for option in json.loads(out)["options"]])
    assert encode[0] and all(a == pytest.approx(3 * b) and b > 0 for a, b in zip(*encode))


def test_resize_equals_torch_uint8_lanczos():
    """torch's uint8 antialiased Lanczos kernel (what tvF.resize(LANCZOS) runs on CPU), in both layouts torchvision
    hands it: a contiguous batch and one channels-last frame; sizes down, up, one side kept, mixed, odd."""
    from edgevlm.video.resize import resize_aa

    frames = np.random.default_rng(4).integers(0, 256, (2, 75, 131, 3), dtype=np.uint8)
    for size in ((84, 140), (56, 84), (112, 196), (75, 84), (28, 252), (17, 9), (1, 2)):  # (1, 2): 451 taps
        tensor = torch.from_numpy(frames).permute(0, 3, 1, 2)
        for layout in (tensor.contiguous(), tensor[:1]):  # (N, C, H, W) contiguous; (1, C, H, W) channels-last
            ref = torch.nn.functional.interpolate(layout, size=size, mode="lanczos", antialias=True,
                                                  align_corners=False).permute(0, 2, 3, 1).numpy()
            assert np.array_equal(resize_aa(frames[:len(ref)], *size, "lanczos"), ref), size
    with pytest.raises(ValueError, match="resize filter 'box'"):
        resize_aa(frames, 8, 8, "box")


def test_plan_recommends_a_shorter_clip_when_the_asked_one_does_not_fit(capsys, bundle, tmp_path):
    """A device whose memory holds 2 frames' worth and not 6: the recommendation lowers the clip (the longest that
    fits) instead of the image, whose size the video processor fixes."""
    import json

    from plan_checks import _device_file

    def plan(seconds: str, device_file: str) -> dict:
        code, out, err = run_cli(capsys, "plan", str(bundle), "--device", "fake-gpu", "--device-file", device_file,
                                 "--video-seconds", seconds, "--json")
        assert code == 0, err
        return json.loads(out)

    roomy = _device_file(tmp_path, 8 << 30)
    totals = [min(o["memory"]["total"] for o in plan(s, roomy)["options"]) for s in ("10", "1")]
    assert totals[0] > totals[1]  # 6 frames' embeddings and positions against 2
    tight = tmp_path / "tight"
    tight.mkdir()
    result = plan("10", _device_file(tight, sum(totals) / 2))
    recommendation, longest = result["recommendation"], result["video"]["largest_clip_s"]
    assert recommendation["status"] == "lowered", recommendation["line"]
    pair = f"{recommendation['encoder']} + {recommendation['decoder']}"
    assert 1 <= longest[pair] < 3 and recommendation["changes"] == [f"the clip to {longest[pair]:g} s"]
    assert recommendation["total_bytes"] <= recommendation["usable_bytes"]
    assert f"lower the clip to {longest[pair]:g} s" in recommendation["line"]
