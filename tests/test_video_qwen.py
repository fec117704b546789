"""Qwen2-VL / Qwen2.5-VL video: sampling, resizing, patches, prompt ids and M-RoPE positions equal transformers'
(`Qwen2_5_VLProcessor` with `Qwen2VLVideoProcessor`, run in a child with torchvision: tests/hf_video.py, and
`get_rope_index` with `video_grid_thw` and `second_per_grid_ts`) on a generated clip of odd resolution."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import builders
import hf_video
from edgevlm.positions import VideoSpan, plan_positions
from edgevlm.video.clip import VideoClip
from edgevlm.video.qwen import (QwenVideoSpec, expand_video_tokens, prepare_video, read_video_processor_config,
                                sample_indices, video_spec)
from edgevlm.video.resize import resize_bicubic_aa

pytestmark = pytest.mark.skipif(not hf_video.available(), reason="no torchvision for the HF video reference")
SOURCE_FPS = 10.0


def moving_shapes(n_frames: int, height: int, width: int, seed: int = 0, fps: float = SOURCE_FPS) -> VideoClip:
    """A square and a disc crossing a noisy background, one frame every 1 / fps s."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    rows, cols = np.mgrid[:height, :width]
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    for i in range(n_frames):
        frame = background.copy()
        x0, y0 = (5 + 3 * i) % (width - 12), (7 + 2 * i) % (height - 12)
        frame[y0:y0 + 12, x0:x0 + 12] = (230, 40, 40)
        cy, cx = height / 2 + height / 3 * np.sin(i / 4), width / 2 + width / 3 * np.cos(i / 5)
        frame[(rows - cy) ** 2 + (cols - cx) ** 2 < 36] = (40, 200, 90)
        frames[i] = frame
    return VideoClip(frames, np.arange(n_frames) / fps, fps, n_frames / fps)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    return builders.build_qwen2_vl(tmp_path_factory.mktemp("qwen25-video"), "2.5", seed=11)


HF_PROCESSOR = """
from transformers import AutoTokenizer
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.video_utils import VideoMetadata
path = PATH
processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(path),
                                tokenizer=AutoTokenizer.from_pretrained(path),
                                video_processor=Qwen2VLVideoProcessor.from_pretrained(path),
                                chat_template=open(path + "/chat_template.jinja").read())
frames = INPUTS["frames"]
metadata = VideoMetadata(total_num_frames=len(frames), fps=float(INPUTS["fps"]), height=frames.shape[1],
                         width=frames.shape[2], duration=len(frames) / float(INPUTS["fps"]))
messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
out = processor(text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=True, fps=2,
                cap_pixels_per_frame=False, return_tensors="pt")
for key in ("input_ids", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids"):
    OUTPUTS[key] = out[key].numpy()
OUTPUTS["frames_indices"] = np.asarray(processor.video_processor(videos=[frames], video_metadata=[metadata],
    do_sample_frames=True, fps=2, cap_pixels_per_frame=False, return_metadata=True)["video_metadata"][0].frames_indices)
OUTPUTS["text"] = np.frombuffer(text.encode(), dtype=np.uint8)
"""


def hf_reference(path, clip: VideoClip) -> dict[str, np.ndarray]:
    return hf_video.run_reference(HF_PROCESSOR.replace("PATH", repr(str(path))),
                                  {"frames": clip.frames, "fps": np.asarray(clip.source_fps)})


def test_resize_equals_torchvision_uint8_bicubic():
    """torch's uint8 antialiased bicubic kernel, which tvF.resize runs on CPU (no torchvision needed for it)."""
    frames = np.random.default_rng(3).integers(0, 256, (2, 75, 131, 3), dtype=np.uint8)
    for size in ((84, 140), (56, 84), (112, 196), (75, 84), (28, 252)):  # down, down, up, one side kept, mixed
        tensor = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        ref = torch.nn.functional.interpolate(tensor, size=size, mode="bicubic", antialias=True, align_corners=False)
        assert np.array_equal(resize_bicubic_aa(frames, *size), ref.permute(0, 2, 3, 1).numpy()), size


def test_sampling_follows_the_processor():
    spec = QwenVideoSpec()
    assert sample_indices(40, 10.0, spec).tolist() == [0, 5, 10, 15, 20, 25, 30, 35]  # 4 s at 2 fps
    assert sample_indices(9, 30.0, spec).tolist() == [0, 2, 4, 6]  # 0.3 s: min_frames 4
    assert sample_indices(7, 10.0, spec).tolist() == [0, 1, 3, 5]  # min_frames 4, spread over the 7
    assert len(sample_indices(3000, 30.0, QwenVideoSpec(max_frames=64))) == 64
    with pytest.raises(ValueError, match="shorter than one temporal patch"):
        sample_indices(1, 10.0, spec)
    # the generic hook (a manifest's video section, --max-frames, --fps)
    assert spec.sample(3000, 30.0, max_frames=8).tolist() == list(range(0, 3000, 375))
    assert spec.sample(40, 10.0, fps=1.0).tolist() == [0, 10, 20, 30]
    assert QwenVideoSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["kind"] == "qwen2_vl"


def test_frames_patches_ids_and_positions_equal_hf(qwen25):
    from edgevlm.families import load_checkpoint
    from edgevlm.loading import session_from_checkpoint

    clip = moving_shapes(81, 75, 131)  # 8.1 s at 10 fps, 75 x 131: odd on both sides
    hf = hf_reference(qwen25, clip)
    config = __import__("json").loads((qwen25 / "config.json").read_text())
    spec = video_spec(config, read_video_processor_config(qwen25))
    assert spec.tokens_per_second == 4 and (spec.min_pixels, spec.max_pixels) == (56 * 56, 224 * 224)
    video = prepare_video(clip, spec)
    assert sample_indices(clip.num_frames, clip.source_fps, spec).tolist() == hf["frames_indices"].tolist()
    assert list(video.grid) == hf["video_grid_thw"][0].tolist() == [8, 6, 10]
    patches = video.pixel_patches()
    assert patches.shape == hf["pixel_values_videos"].shape
    assert np.abs(patches - hf["pixel_values_videos"]).max() <= 1e-5  # fused normalize: float32 rounding only
    # one temporal patch at a time gives the same rows
    assert np.array_equal(np.concatenate([video.pixel_patches(t, t + 1) for t in range(8)]), patches)
    assert np.float32(video.second_per_grid_t) == hf["second_per_grid_ts"][0]

    ckpt = load_checkpoint(qwen25)
    session = session_from_checkpoint(ckpt)
    text = hf["text"].tobytes().decode()
    ids = ckpt.tokenizer(expand_video_tokens(text, [video]), add_special_tokens=False)["input_ids"]
    assert ids == hf["input_ids"][0].tolist()
    start = ids.index(spec.video_token_id)
    t, rows, cols = video.merged
    plan = plan_positions("mrope", len(ids), [VideoSpan(start, t, rows, cols, video.time_interval)])
    model = ckpt.hf_model.model
    ref, deltas = model.get_rope_index(torch.tensor([ids]), torch.tensor(hf["mm_token_type_ids"]), None,
                                       torch.tensor(hf["video_grid_thw"]), torch.tensor(hf["second_per_grid_ts"]),
                                       torch.ones(1, len(ids), dtype=torch.long))
    assert plan.positions.T.tolist() == ref[:, 0].tolist()
    assert plan.next_position == len(ids) + int(deltas[0, 0])  # where generate's decode steps continue
    # the time scaling matters here: 16 of 81 frames sampled (1.975 fps), so a temporal patch is 1.0125 s x 4
    # tokens/s = 4.05 t apart: t = pos0 + 0, 4, ..., 28; generation continues after t's 28, past the text's positions
    assert plan.positions[start:start + rows * cols * t:rows * cols, 0].tolist() == [start + 4 * k for k in range(8)]
    assert plan.next_position == start + 28 + 1 > plan.positions[-1, 0] + 1
    del session
