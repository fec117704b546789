"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): a native-resolution ViT (16-px patches, learned position embeddings
interpolated to the image's grid plus 2-D RoPE, 2x2 merge) whose image becomes h' x w' image tokens (`<|image_pad|>`
between `<|vision_start|>` / `<|vision_end|>`, as Qwen2-VL), and a Qwen3 decoder (QK-norm, no biases) with
interleaved M-RoPE. DeepStack: the features of a few intermediate vision blocks go through their own mergers and are
added to the hidden states after the first k decoder layers at the image's positions, so an image row is
(1 + k) x hidden wide (main embedding, then the k slices: llama.cpp's layout). Preprocessing is Qwen2-VL's image
processor (Qwen2VLImageProcessor) at patch 16; video is Qwen3VLVideoProcessor's (edgevlm/video/qwen3.py).
describe() is torch-free; load() builds the PyTorch modules, whose vision side lives in qwen3_vl_vision.py."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from .qwen2_vl import IMAGE_TOKEN, image_token, load_qwen_vl, preprocess_spec
from .spec import FamilySpec, Vocabulary, VisionShapes, decoder_row, text_config, tower_config

ARCHITECTURE = "Qwen3VLForConditionalGeneration"
# transformers' Qwen3VLVisionConfig defaults, for keys a config.json may omit
TOWER_DEFAULTS = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584, num_position_embeddings=2304,
                      deepstack_visual_indexes=[8, 16, 24])
PROCESSOR_DEFAULTS = {"patch_size": 16, "image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)}


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    shape = tower_config(config, TOWER_DEFAULTS)
    merge, patch = int(shape["spatial_merge_size"]), int(shape["patch_size"])
    deepstack = [int(i) for i in shape["deepstack_visual_indexes"]]
    image_token_id = image_token(config, tokenizer)
    text = text_config(config)
    n_layers = int(text.get("num_hidden_layers", 32))
    if len(deepstack) > n_layers or any(not 0 <= i < int(shape["depth"]) for i in deepstack):
        raise CheckpointError(f"deepstack_visual_indexes {deepstack} do not fit a {shape['depth']}-block tower and a "
                              f"{n_layers}-layer decoder; config.json is damaged")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if rope.get("mrope_interleaved") is False:
        raise CheckpointError("this Qwen3-VL text config says mrope_interleaved=false; the qwen3vl decoder rotates "
                              "interleaved sections (as transformers and llama.cpp do)")
    return FamilySpec(
        family="qwen3_vl", architecture=ARCHITECTURE, preprocess=preprocess_spec({**PROCESSOR_DEFAULTS, **processor}),
        layout=ImageLayout("grid", IMAGE_TOKEN, IMAGE_TOKEN, image_token_id, 1),
        # one encoder input unit is a merge block: merge^2 patches in, one image token out
        vision=VisionShapes(patch * merge, patch, int(shape["hidden_size"]), int(shape["depth"]),
                            int(shape["num_heads"]), int(shape["intermediate_size"]), merge * merge, 1,
                            (".merger.", "merger.", "deepstack_merger_list."), merge_size=merge),
        decoder_architecture=decoder_row(config, "qwen3_vl_text"), mmproj_projector="qwen3vl_merger", mmproj_refusal=None,
        stop_tokens=("<|im_end|>",), mrope_section=rope.get("mrope_section") or [24, 20, 20],
        deepstack_layers=len(deepstack), video=video_spec(config, processor),
    )


def video_spec(config: dict, processor: dict):
    """Qwen3-VL reads video (temporal patches behind timestamp text): Qwen3VLVideoProcessor's settings from
    video_preprocessor_config.json or processor_config.json's "video_processor" where saved, else the image
    processor's file (what its from_pretrained falls back to)."""
    from ..video.qwen3 import video_spec as qwen3_video_spec

    video = processor.get("video_processor")
    try:
        return qwen3_video_spec(video if isinstance(video, dict) else processor, config)
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the video processor settings are unusable ({exc}); re-save the checkpoint") from None


def load(path: Path, config_json: dict, dtype: str = "float32"):
    from .qwen3_vl_vision import Qwen3VisionEncoder

    return load_qwen_vl(path, config_json, dtype, describe, Qwen3VisionEncoder)
