"""Qwen3-VL video (issue 34) on a tiny checkpoint and PyAV-written clips: sampled frames, pixel values and prompt ids
equal `Qwen3VLProcessor` with `Qwen3VLVideoProcessor` (run in a child with torchvision: tests/hf_video.py), M-RoPE
positions equal `get_rope_index`, and the greedy tokens of the torch runtime, ONNX fp32 + F32 GGUF and ONNX fp32 +
fp32 MLX equal `model.generate` on the clip, which answers two clips differently."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import builders
import hf_video
import video_clips
from edgevlm.video.clip import VideoClip
from edgevlm.video.qwen import read_video_processor_config
from edgevlm.video.qwen3 import Qwen3VideoSpec, patch_times, prepare_video, sample_indices, smart_resize, video_spec
from bundle_checks import run_cli

pytest.importorskip("av")
pytestmark = pytest.mark.skipif(not hf_video.available(), reason="no torchvision for the HF video reference")
QUESTION = "What moves here?"
MAX_TOKENS = 12

HF_PROCESSOR = """
from transformers import AutoTokenizer
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata
path = PATH
processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(path),
                             tokenizer=AutoTokenizer.from_pretrained(path),
                             video_processor=Qwen3VLVideoProcessor.from_pretrained(path),
                             chat_template=open(path + "/chat_template.jinja").read())
frames = INPUTS["frames"]
fps = float(INPUTS["fps"])
def metadata():
    return VideoMetadata(total_num_frames=len(frames), fps=fps, height=frames.shape[1], width=frames.shape[2],
                         duration=len(frames) / fps)
messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
out = processor(text=[text], videos=[frames], video_metadata=[metadata()], do_sample_frames=True,
                cap_pixels_per_frame=False, return_tensors="pt")
for key in ("input_ids", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids"):
    OUTPUTS[key] = out[key].numpy()
OUTPUTS["frames_indices"] = np.asarray(processor.video_processor(videos=[frames], video_metadata=[metadata()],
    do_sample_frames=True, cap_pixels_per_frame=False, return_metadata=True)["video_metadata"][0].frames_indices)
OUTPUTS["text"] = np.frombuffer(text.encode(), dtype=np.uint8)
"""


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return builders.build_qwen3_vl(tmp_path_factory.mktemp("qwen3-video"), seed=5)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """3.5 s at 10 fps, 131 x 75 (odd sides): 7 frames sampled at 2 fps, padded to 4 temporal patches."""
    folder = tmp_path_factory.mktemp("qwen3-clips")
    return {"shapes": video_clips.make_clip(folder, "shapes.mp4", seconds=3.5, width=131, height=75),
            "other": video_clips.make_clip(folder, "other.mp4", seconds=3.5, width=131, height=75, seed=7)}


def _frames(path) -> tuple[np.ndarray, float]:
    """Every frame of the file, decoded by PyAV here (not through edgevlm's decoder)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]), float(stream.average_rate)


def hf_outputs(path, clip_path) -> dict:
    """The processor's outputs (child), then model.generate's greedy tokens on them."""
    from transformers import Qwen3VLForConditionalGeneration

    frames, fps = _frames(clip_path)
    hf = hf_video.run_reference(HF_PROCESSOR.replace("PATH", repr(str(path))).replace("QUESTION", repr(QUESTION)),
                                {"frames": frames, "fps": np.asarray(fps)})
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    ids = torch.from_numpy(hf["input_ids"])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values_videos=torch.from_numpy(hf["pixel_values_videos"]),
                             video_grid_thw=torch.from_numpy(hf["video_grid_thw"]),
                             mm_token_type_ids=torch.from_numpy(hf["mm_token_type_ids"]),
                             max_new_tokens=MAX_TOKENS, do_sample=False)
        positions, deltas = model.model.get_rope_index(ids, torch.from_numpy(hf["mm_token_type_ids"]), None,
                                                       torch.from_numpy(hf["video_grid_thw"]), torch.ones_like(ids))
    tokens = out[0, ids.shape[1]:].tolist()
    eos = [eos] if isinstance(eos, int) else eos
    hf.update(tokens=tokens[:-1] if tokens and tokens[-1] in eos else tokens, frames=frames, fps=fps,
              positions=positions[:, 0].numpy(), next_position=ids.shape[1] + int(deltas[0, 0]))
    return hf


@pytest.fixture(scope="module")
def reference(qwen3, clips):
    return {name: hf_outputs(qwen3, clips[name]) for name in ("shapes", "other")}


@pytest.fixture(scope="module")
def torch_session(qwen3):
    from edgevlm.families import load_checkpoint
    from edgevlm.loading import session_from_checkpoint

    return session_from_checkpoint(load_checkpoint(qwen3))


def test_sampling_and_resize_follow_the_processor():
    spec = Qwen3VideoSpec()
    assert sample_indices(40, 10.0, spec).tolist() == [0, 6, 11, 17, 22, 28, 33, 39]  # linspace(0, 39, 8).round()
    assert sample_indices(35, 10.0, spec).tolist() == [0, 6, 11, 17, 23, 28, 34]  # 7: odd, padded later
    assert sample_indices(9, 30.0, spec).tolist() == [0, 3, 5, 8]  # min_frames 4
    assert len(sample_indices(3000, 30.0, spec)) == 200 and len(spec.sample(3000, 30.0, max_frames=64)) == 64
    with pytest.raises(ValueError, match="under one temporal patch"):
        spec.sample(40, 10.0, max_frames=1)
    with pytest.raises(ValueError, match="shorter than one temporal patch"):
        sample_indices(1, 10.0, spec)
    # the time text: the mean of each patch's first and last frame, the last frame repeated to fill
    assert patch_times([0, 6, 11, 17, 23, 28, 34], 10.0, 2) == pytest.approx([0.3, 1.4, 2.55, 3.4])
    # the budget is the whole clip's: more frames, smaller frames (the tiny processor: 4096 .. 65536 pixels)
    tiny = Qwen3VideoSpec(min_pixels=4096, max_pixels=65536)
    assert smart_resize(2, 75, 131, tiny) == smart_resize(8, 75, 131, tiny) == (64, 128)  # 8 x 64 x 128 = the max
    assert smart_resize(10, 75, 131, tiny) == (32, 96) and smart_resize(64, 75, 131, tiny) == (32, 32)
    assert Qwen3VideoSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["kind"] == "qwen3_vl"


def test_the_checkpoint_records_the_qwen3_video_section(qwen3):
    from edgevlm.families import describe_checkpoint
    from edgevlm.video.kinds import video_spec_from_dict

    spec = describe_checkpoint(qwen3).video
    assert isinstance(spec, Qwen3VideoSpec) and (spec.min_pixels, spec.max_pixels) == (4096, 65536)
    assert spec == video_spec(read_video_processor_config(qwen3), json.loads((qwen3 / "config.json").read_text()))
    assert spec.image_mean == (0.5, 0.5, 0.5) and spec.patch_size == 16 and spec.fps == 2
    assert video_spec_from_dict(spec.to_dict()) == spec


def test_frames_pixels_ids_and_positions_equal_hf(qwen3, torch_session, reference):
    from edgevlm.runtimes.video_prompt import VideoRequest, choose, layout_for
    from edgevlm.video.qwen3_session import patch_items, video_prompt

    hf = reference["shapes"]
    spec = torch_session.spec.video
    choice = choose(torch_session.spec, VideoRequest(VideoClip(hf["frames"], np.arange(len(hf["frames"])) / hf["fps"],
                                                               hf["fps"], len(hf["frames"]) / hf["fps"])))
    assert choice.indices.tolist() == hf["frames_indices"].tolist() == [0, 6, 11, 17, 23, 28, 34]
    clip = choice.frames()
    video = prepare_video(clip, spec, indices=choice.indices, source_fps=choice.source_fps)
    # 7 frames padded to 4 temporal patches of 2 x 4 tokens
    assert list(video.grid) == hf["video_grid_thw"][0].tolist() == [4, 4, 8]
    patches = video.pixel_patches()
    assert patches.shape == hf["pixel_values_videos"].shape
    assert np.abs(patches - hf["pixel_values_videos"]).max() <= 1e-5  # fused normalize: float32 rounding only
    assert np.array_equal(np.concatenate([video.pixel_patches(t, t + 1) for t in range(4)]), patches)

    text = hf["text"].tobytes().decode()
    items = patch_items(video, torch_session.encoder.artifact_id)
    prompt = video_prompt(torch_session.spec, text, video, items)
    assert prompt.ids.tolist() == hf["input_ids"][0].tolist()
    assert "<0.3 seconds><|vision_start|>" in torch_session.spec.tokenizer.decode(prompt.ids.tolist())
    assert layout_for(torch_session.spec).length(torch_session.spec, text, choice) == len(prompt)
    assert prompt.positions.positions.T.tolist() == hf["positions"].tolist()
    assert prompt.positions.next_position == hf["next_position"]
    assert len(prompt.runs) == 4 and [r[2] for r in prompt.runs] == [0, 1, 2, 3]


def test_torch_runtime_equals_model_generate_and_tells_clips_apart(torch_session, clips, reference):
    assert reference["shapes"]["tokens"] != reference["other"]["tokens"]
    for name in ("shapes", "other"):
        result = torch_session.generate(prompt=QUESTION, video=clips[name], max_tokens=MAX_TOKENS)
        assert result.tokens == reference[name]["tokens"], name
        assert result.timings["n_image_tokens"] == 4 * 8


@pytest.fixture(scope="module")
def bundle(qwen3, tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    return export_checkpoint(qwen3, tmp_path_factory.mktemp("qwen3-video-bundle") / "b",
                             [ArtifactRequest("onnx", "fp32")],
                             [ArtifactRequest("gguf", "f32"), ArtifactRequest("mlx", "fp32")], max_tiles=8,
                             options={"group_size": 32})


@pytest.mark.parametrize("decoder", ["gguf:f32", "mlx:fp32"])
def test_onnx_encoder_and_exported_decoders_equal_model_generate(decoder, bundle, clips, reference):
    import edgevlm
    from edgevlm.manifest import Manifest

    assert Manifest.load(bundle).video["kind"] == "qwen3_vl"
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder=decoder, threads=1, parity=decoder.startswith("gguf"))
    for name in ("shapes", "other"):
        result = session.generate(prompt=QUESTION, video=clips[name], max_tokens=MAX_TOKENS)
        assert result.tokens == reference[name]["tokens"], (decoder, name)
        assert result.timings["video_units_encoded"] == 4
    # a second question about the same clip with the KV gone: every temporal patch from the embedding cache
    session.forget_sequence()
    session.prefix_cache.clear()
    again = session.generate(prompt="Describe it.", video=clips["shapes"], max_tokens=2)
    assert (again.timings["video_units_encoded"], again.timings["video_units_reused"]) == (0, 4)


def test_context_overflow_names_max_frames_that_fit(bundle, clips):
    """Said before any frame is decoded; the --max-frames it names fits (checked with the frames it would sample:
    Qwen3-VL sizes frames by the whole clip's budget, so the length is not linear in the patches) and 2 more do not."""
    import re

    import edgevlm
    from edgevlm.errors import BadInputError

    full = edgevlm.load(bundle, encoder="onnx:fp32", decoder="mlx:fp32", threads=1).generate(
        prompt=QUESTION, video=clips["shapes"], max_tokens=1).timings["n_prompt_tokens"]
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="mlx:fp32", threads=1, n_ctx=full - 10)
    with pytest.raises(BadInputError, match=f"4 temporal patches x 8 tokens\\) make a {full}-token prompt") as info:
        session.generate(prompt=QUESTION, video=clips["shapes"], max_tokens=1)
    fit = int(re.search(r"--max-frames (\d+) or less", str(info.value)).group(1))
    assert fit >= 2 and "\n" not in str(info.value)
    short = session.generate(prompt=QUESTION, video=clips["shapes"], max_frames=fit, max_tokens=1)
    assert short.timings["n_prompt_tokens"] < full - 10
    with pytest.raises(BadInputError, match="over the decoder context"):
        session.generate(prompt=QUESTION, video=clips["shapes"], max_frames=fit + 2, max_tokens=1)


def test_a_window_advanced_by_one_patch_encodes_one(bundle, clips):
    """Two 8-frame windows 2 frames apart (every frame sampled: 2 fps source at the processor's 2 fps): the second
    encodes 1 of its 4 temporal patches (the others come from the embedding cache; their KV cannot be kept, the
    first patch and the time texts changed) and answers as a cold session does."""
    import edgevlm

    frames, _ = _frames(clips["shapes"])

    def window(start: int) -> VideoClip:
        return VideoClip(frames[start:start + 8], np.arange(8) / 2.0, 2.0, 4.0)

    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="mlx:fp32", threads=1)
    first = session.generate(prompt=QUESTION, video=window(0), max_tokens=4)
    second = session.generate(prompt=QUESTION, video=window(2), max_tokens=4)
    assert first.timings["video_units_encoded"] == 4
    assert (second.timings["video_units_encoded"], second.timings["video_units_reused"]) == (1, 3)
    cold = edgevlm.load(bundle, encoder="onnx:fp32", decoder="mlx:fp32", threads=1).generate(
        prompt=QUESTION, video=window(2), max_tokens=4)
    assert cold.tokens == second.tokens and cold.timings["video_units_encoded"] == 4


def test_cli_run_video_on_gguf_equals_model_generate(capsys, bundle, clips, reference):
    """`run --video` sizes llama.cpp's context from the header (Job) and gives model.generate's tokens."""
    code, out, err = run_cli(capsys, "run", str(bundle), "--video", str(clips["other"]), "--prompt", QUESTION,
                          "--max-tokens", str(MAX_TOKENS), "--encoder", "onnx:fp32", "--decoder", "gguf:f32", "--json")
    assert code == 0, err
    answer = json.loads(out.strip().splitlines()[-1])
    assert answer["tokens"] == reference["other"]["tokens"]
    assert answer["timings"]["video_units_encoded"] == 4 and answer["timings"]["n_image_tokens"] == 32


def test_plan_counts_qwen3_video_tokens(capsys, bundle):
    """3.5 s of 131x75 at a nominal 30 fps: 105 frames, int(3.5 x 2) = 7 sampled -> 4 temporal patches of 64 x 128
    (2 x 4 = 8 tokens); 60 s: 120 frames share the 65,536-pixel budget -> 32 x 32 frames, 1 token a patch."""
    code, out, err = run_cli(capsys, "plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--video-seconds", "3.5",
                          "--video-size", "131x75", "--json")
    assert code == 0, err
    video = json.loads(out)["video"]
    assert (video["frames"], video["unit"], video["units"], video["tokens_per_unit"], video["video_tokens"]) == \
        (7, "temporal patch", 4, 8, 32)
    code, out, err = run_cli(capsys, "plan", str(bundle), "--device", "jetson-orin-nano-8gb", "--video-seconds", "60",
                          "--video-size", "131x75", "--json")
    assert code == 0, err
    video = json.loads(out)["video"]
    assert (video["frames"], video["units"], video["tokens_per_unit"]) == (120, 60, 1)


def test_serve_video_url_and_a_second_chat_turn(bundle, clips, reference):
    """serve's video_url (data URL) gives model.generate's tokens on GGUF; a VideoConversation's second turn keeps the
    video in the sequence: it encodes nothing and prefills only its own turn."""
    import base64

    import edgevlm
    from edgevlm.serve import ChatService
    from edgevlm.video.chat import VideoConversation

    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:f32", threads=1, parity=True)
    data = base64.b64encode(clips["shapes"].read_bytes()).decode()
    request = {"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{data}"}},
        {"type": "text", "text": QUESTION}]}], "max_tokens": MAX_TOKENS}
    result = [d for d in ChatService(session, "m").complete(request) if d.result is not None][0].result
    assert result.tokens[:len(reference["shapes"]["tokens"])] == reference["shapes"]["tokens"]
    chat = VideoConversation(session, clips["other"])
    first = chat.ask(QUESTION, max_tokens=4)
    second = chat.ask("And then?", max_tokens=4)
    assert first.timings["video_units_encoded"] == 4
    assert second.timings["video_units_encoded"] == 0
    assert second.timings["n_reused_positions"] >= first.timings["n_prompt_tokens"]
