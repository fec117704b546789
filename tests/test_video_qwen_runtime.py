"""Qwen2.5-VL video through the runtimes: the ONNX image graph run per temporal patch equals HF's video features,
the torch runtime's greedy tokens equal model.generate on the clip (and change with the clip and without the time
scaling), F32 GGUF and fp32 MLX give the same tokens, and a window advanced by k temporal patches encodes exactly k
and answers as a cold run of that window."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_video_qwen import moving_shapes

import builders
from edgevlm.video.qwen import QwenVideoSpec, prepare_video, read_video_processor_config, video_spec
from edgevlm.video.qwen_session import generate_video, prepared_video, video_prompt

QUESTION = "What moves here?"
OPTIONS = dict(max_tokens=16, stop_token_ids=[])


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    return builders.build_qwen2_vl(tmp_path_factory.mktemp("qwen25-video-rt"), "2.5", seed=11)


@pytest.fixture(scope="module")
def spec(qwen25) -> QwenVideoSpec:
    return video_spec(json.loads((qwen25 / "config.json").read_text()), read_video_processor_config(qwen25))


@pytest.fixture(scope="module")
def clip():
    return moving_shapes(61, 75, 131)  # 6.1 s at 10 fps


@pytest.fixture(scope="module")
def bundle(qwen25, tmp_path_factory):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    return export_checkpoint(qwen25, tmp_path_factory.mktemp("qwen25-video") / "bundle", [ArtifactRequest("onnx", "fp32")],
                             [ArtifactRequest("gguf", "f32"), ArtifactRequest("mlx", "fp32")], max_tiles=8,
                             options={"group_size": 32})


def _bundle_session(bundle, decoder: str = "gguf:f32"):
    import edgevlm

    return edgevlm.load(bundle, encoder="onnx:fp32", decoder=decoder, threads=1)


def _torch_session(path, rms_eps: float | None = None):
    from edgevlm.families import load_checkpoint
    from edgevlm.loading import session_from_checkpoint

    ckpt = load_checkpoint(path)
    if rms_eps is not None:  # llama.cpp's qwen2vl reads no RMS-norm epsilon (tests/test_qwen2_vl.py)
        for module in ckpt.decoder.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = rms_eps
    return ckpt, session_from_checkpoint(ckpt)


def _hf_generate(ckpt, session, video, spec) -> list[int]:
    item = prepared_video(video, session.encoder.artifact_id)
    ids = torch.from_numpy(video_prompt(session, session.render([{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": QUESTION}]}]), video, item).ids.astype(np.int64))[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values_videos": torch.from_numpy(video.pixel_patches()),
              "video_grid_thw": torch.tensor([video.grid]),
              "second_per_grid_ts": torch.tensor([video.second_per_grid_t], dtype=torch.float32),
              "mm_token_type_ids": (ids == spec.video_token_id).int() * 2}
    ckpt.hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = ckpt.hf_model.generate(**inputs, max_new_tokens=OPTIONS["max_tokens"], do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def test_onnx_encoder_per_temporal_patch_equals_hf_video_features(qwen25, bundle, spec, clip):
    ckpt, _ = _torch_session(qwen25)
    video = prepare_video(clip, spec)
    with torch.inference_mode():
        ref = ckpt.hf_model.model.get_video_features(torch.from_numpy(video.pixel_patches()),
                                                     torch.tensor([video.grid])).pooler_output[0].numpy()
    session = _bundle_session(bundle)
    _, h, w = video.grid
    ours = np.concatenate([session.encoder.encode(video.pixel_patches(k, k + 1), grid=(1, h, w))
                           for k in range(video.grid[0])])
    assert ours.shape == ref.shape == (video.n_tokens, 64)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_torch_greedy_tokens_equal_model_generate(qwen25, spec, clip):
    ckpt, session = _torch_session(qwen25)
    video = prepare_video(clip, spec)
    result = generate_video(session, video, QUESTION, spec, **OPTIONS)
    assert result.tokens == _hf_generate(ckpt, session, video, spec)
    assert result.timings["video_units_encoded"] == video.grid[0] == 6  # 12 of 61 frames sampled
    # discriminative: another clip, or the same clip without Qwen2.5-VL's time scaling, answers otherwise
    other = generate_video(session, moving_shapes(61, 75, 131, seed=5), QUESTION, spec, **OPTIONS)
    unscaled_spec = QwenVideoSpec.from_dict({**spec.to_dict(), "tokens_per_second": None})
    unscaled = generate_video(session, prepare_video(clip, unscaled_spec), QUESTION, unscaled_spec, **OPTIONS)
    assert other.tokens != result.tokens and unscaled.tokens != result.tokens


def test_f32_gguf_and_fp32_mlx_give_the_torch_tokens(qwen25, bundle, spec, clip):
    _, reference = _torch_session(qwen25)
    video = prepare_video(clip, spec)
    mlx = generate_video(_bundle_session(bundle, "mlx:fp32"), video, QUESTION, spec, **OPTIONS)
    assert mlx.tokens == generate_video(reference, video, QUESTION, spec, **OPTIONS).tokens
    # llama.cpp takes text only after the largest t so far: a 2-s clip (2 temporal patches, t = pos0 + 0, 4)
    # keeps below where the text resumes (pos0 + 5); the 6-s clip's t = pos0 + 20 does not, and is refused
    short = prepare_video(moving_shapes(20, 75, 131, seed=2), spec)
    assert short.grid[0] == 2
    _, eps0 = _torch_session(qwen25, rms_eps=0.0)
    gguf_session = _bundle_session(bundle, "gguf:f32")
    gguf = generate_video(gguf_session, short, QUESTION, spec, **OPTIONS)
    assert gguf.tokens == generate_video(eps0, short, QUESTION, spec, **OPTIONS).tokens
    with pytest.raises(ValueError, match="llama.cpp cannot take text there"):
        generate_video(gguf_session, video, QUESTION, spec, **OPTIONS)


def test_window_advanced_by_one_temporal_patch_encodes_one(bundle, spec, clip):
    """Two 4-s windows 1 s apart at 10 fps: 8 frames sampled each (every 5th), so the second shares 3 of its 4
    temporal patches with the first. On MLX: llama.cpp refuses 4 time-scaled temporal patches (see above)."""
    first, second = clip.select(np.arange(0, 40)), clip.select(np.arange(10, 50))
    session = _bundle_session(bundle, "mlx:fp32")
    cold_first = generate_video(session, first, QUESTION, spec, **OPTIONS)
    assert cold_first.timings["video_units_encoded"] == 4 and cold_first.timings["video_units_reused"] == 0
    warm = generate_video(session, second, QUESTION, spec, **OPTIONS)
    assert warm.timings["video_units_encoded"] == 1 and warm.timings["video_units_reused"] == 3
    assert warm.timings["n_reused_positions"] < warm.timings["n_prompt_tokens"] - 4 * 15  # the KV is not reused
    cold = generate_video(_bundle_session(bundle, "mlx:fp32"), second, QUESTION, spec, **OPTIONS)
    assert warm.tokens == cold.tokens
    # the same window asked again: nothing encoded, the whole prompt's prefix reused
    again = generate_video(session, second, QUESTION, spec, **OPTIONS)
    assert again.timings["video_units_encoded"] == 0 and again.tokens == cold.tokens
    assert again.timings["n_reused_positions"] >= again.timings["n_prompt_tokens"] - 1


def test_qwen2_vl_video_without_time_scaling(tmp_path):
    """Qwen2-VL: the same processor, no time scaling (t advances 1 per temporal patch); torch tokens =
    model.generate."""
    path = builders.build_qwen2_vl(tmp_path / "qwen2", "2", seed=11)
    spec = video_spec(json.loads((path / "config.json").read_text()), read_video_processor_config(path))
    assert spec.tokens_per_second is None
    ckpt, session = _torch_session(path)
    video = prepare_video(moving_shapes(41, 75, 131), spec)
    assert video.time_interval == 1.0 and video.grid[0] == 4
    item = prepared_video(video, session.encoder.artifact_id)
    text = session.render([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}])
    prompt = video_prompt(session, text, video, item)
    ids = torch.from_numpy(prompt.ids.astype(np.int64))[None]
    types = (ids == spec.video_token_id).int() * 2
    ref, _ = ckpt.hf_model.model.get_rope_index(ids, types, None, torch.tensor([video.grid]),
                                                attention_mask=torch.ones_like(ids))
    assert prompt.positions.positions.T.tolist() == ref[:, 0].tolist()
    ckpt.hf_model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = ckpt.hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                                     pixel_values_videos=torch.from_numpy(video.pixel_patches()),
                                     video_grid_thw=torch.tensor([video.grid]), max_new_tokens=16, do_sample=False)
    assert generate_video(session, video, QUESTION, spec, **OPTIONS).tokens == out[0, ids.shape[1]:].tolist()
