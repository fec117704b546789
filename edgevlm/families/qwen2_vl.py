"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`): a
native-resolution ViT (14-px patches, 2x2 merge; 2.5 adds window attention) whose image becomes h' x w' image tokens
(`<|image_pad|>` repeated, between the template's `<|vision_start|>` / `<|vision_end|>`), and a Qwen2 decoder with
M-RoPE positions (t, row, col). describe() is torch-free; load() builds the PyTorch modules, whose vision side lives
in qwen2_vl_vision.py."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from .files import resample_name
from .spec import FamilySpec, Vocabulary, VisionShapes, decoder_row, mlp_width_refusal, text_config, tower_config

ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<|image_pad|>", 151655
DELIMITERS = ("<|vision_start|>", "<|vision_end|>")
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # Qwen2VLImageProcessor's defaults
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# transformers' Qwen2VLVisionConfig / Qwen2_5_VLVisionConfig defaults, for keys a config.json may omit
TOWER_DEFAULTS = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, intermediate_size=3420,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
# llama.cpp's clip.cpp projector types (export/mmproj_qwen2vl.py writes both)
MMPROJ_TYPES = {"Qwen2VLForConditionalGeneration": "qwen2vl_merger",
                "Qwen2_5_VLForConditionalGeneration": "qwen2.5vl_merger"}
# what clip.cpp's qwen2vl graph hard-wires at the pinned llama.cpp: a 2x2 merge of 2-frame patches, 112-px windows
MTMD_MERGE, MTMD_TEMPORAL, MTMD_WINDOW_PX = 2, 2, 112
WINDOW_DEFAULTS = dict(window_size=112, fullatt_block_indexes=(7, 15, 23, 31))  # Qwen2_5_VLVisionConfig's


def _pixels(processor: dict, key: str, size_keys: tuple[str, ...], default: int) -> int:
    # Qwen2VLImageProcessor.__init__: explicit min_pixels/max_pixels override size.shortest_edge/longest_edge
    if processor.get(key) is not None:
        return int(processor[key])
    size = processor.get("size") or {}
    return int(next((size[k] for k in size_keys if size.get(k) is not None), default))


def preprocess_spec(processor: dict) -> PreprocessSpec:
    """The checkpoint's saved Qwen2VLImageProcessor settings (preprocessor_config.json) as a "qwen2vl" spec."""
    patch, merge = int(processor.get("patch_size", 14)), int(processor.get("merge_size", 2))
    return PreprocessSpec(
        "qwen2vl",
        (patch * merge, patch * merge),  # the resize factor: both sides are multiples of it
        resample=resample_name(processor.get("resample", 3)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", CLIP_MEAN),
        image_std=processor.get("image_std", CLIP_STD),
        patch_size=patch,
        temporal_patch_size=int(processor.get("temporal_patch_size", 2)),
        merge_size=merge,
        min_pixels=_pixels(processor, "min_pixels", ("shortest_edge", "min_pixels"), DEFAULT_MIN_PIXELS),
        max_pixels=_pixels(processor, "max_pixels", ("longest_edge", "max_pixels"), DEFAULT_MAX_PIXELS),
    )


def window_pattern(full_blocks, depth: int) -> int | None:
    """clip.vision.n_wa_pattern: n when the full-attention blocks are exactly those with (i + 1) % n == 0 (what
    clip.cpp's qwen2.5vl_merger graph runs), else None."""
    full = sorted(int(i) for i in full_blocks)
    pattern = full[0] + 1 if full else 0
    return pattern if full and full == [i for i in range(depth) if (i + 1) % pattern == 0] else None


def mmproj_refusal(shape: dict, gated: bool, width: int, mlp: int) -> str | None:
    """Why llama.cpp's qwen2vl graphs cannot run this tower like transformers (config.json alone), or None."""
    merge, patch = int(shape["spatial_merge_size"]), int(shape["patch_size"])
    graph = MMPROJ_TYPES["Qwen2_5_VLForConditionalGeneration" if gated else "Qwen2VLForConditionalGeneration"]
    if (merge, int(shape["temporal_patch_size"])) != (MTMD_MERGE, MTMD_TEMPORAL):
        return (f"llama.cpp's {graph} graph takes a 2x2 merge of 2-frame patches, this tower {merge} / "
                f"{shape['temporal_patch_size']}")
    if refusal := mlp_width_refusal(graph, width, mlp):
        return refusal
    if not gated:
        return None
    shape = {**WINDOW_DEFAULTS, **shape}
    full = list(shape["fullatt_block_indexes"] or ())
    if window_pattern(full, int(shape["depth"])) is None:
        return (f"fullatt_block_indexes {full} are not every n-th block, the only full-attention pattern of "
                "llama.cpp's qwen2.5vl_merger graph")
    if int(shape["window_size"]) // patch // merge != MTMD_WINDOW_PX // patch // MTMD_MERGE:
        return (f"the tower attends in {shape['window_size']}-px windows; llama.cpp's qwen2.5vl_merger graph uses "
                f"{MTMD_WINDOW_PX}-px ones (it reads no window size for this projector type)")
    return None


def image_token(config: dict, tokenizer: Vocabulary) -> int:
    """The Qwen-VL line's image token id from config.json, checked against the tokenizer's table (with the vision
    delimiters the chat template writes) where the checkpoint has one."""
    image_token_id = int(config.get("image_token_id") or IMAGE_TOKEN_ID)
    if tokenizer.known:
        for token in (IMAGE_TOKEN, *DELIMITERS):
            if tokenizer.id_of(token) is None:
                raise CheckpointError(f"the tokenizer lacks {token!r}; re-save the checkpoint's tokenizer")
        if tokenizer.id_of(IMAGE_TOKEN) != image_token_id:
            raise CheckpointError(f"config.json's image_token_id {image_token_id} is not the tokenizer's {IMAGE_TOKEN} "
                                  f"({tokenizer.id_of(IMAGE_TOKEN)}); the files do not belong together")
    return image_token_id


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    architecture = next((a for a in config.get("architectures") or [] if a in ARCHITECTURES), ARCHITECTURES[0])
    shape = tower_config(config, TOWER_DEFAULTS)
    merge, patch = int(shape["spatial_merge_size"]), int(shape["patch_size"])
    gated = architecture == "Qwen2_5_VLForConditionalGeneration"  # 2.5: SwiGLU MLP at intermediate_size
    width = int(shape["hidden_size"] if gated else shape["embed_dim"])
    mlp = int(shape["intermediate_size"]) if gated else width * int(shape["mlp_ratio"])
    image_token_id = image_token(config, tokenizer)
    text = text_config(config)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    refusal = mmproj_refusal(shape, gated, width, mlp)
    return FamilySpec(
        family="qwen2_vl", architecture=architecture, preprocess=preprocess_spec(processor),
        layout=ImageLayout("grid", IMAGE_TOKEN, IMAGE_TOKEN, image_token_id, 1),
        # one encoder input unit is a merge block: merge^2 patches in, one image token out
        vision=VisionShapes(patch * merge, patch, width, int(shape["depth"]), int(shape["num_heads"]), mlp,
                            merge * merge, 1, (".merger.", "merger."), gated=gated, merge_size=merge),
        decoder_architecture=decoder_row(config, "qwen2_vl_text"),
        mmproj_projector=None if refusal else MMPROJ_TYPES[architecture],
        mmproj_refusal=f"{refusal}: no llama.cpp mmproj can run this checkpoint (export onnx:fp32 / onnx:int8 instead)"
        if refusal else None,
        stop_tokens=("<|im_end|>",), mrope_section=rope.get("mrope_section"), video=video_spec(config, processor),
    )


def video_spec(config: dict, processor: dict):
    """Qwen2-VL and Qwen2.5-VL read video (temporal patches; 2.5 with time-scaled M-RoPE): the video processor's
    settings from video_preprocessor_config.json or processor_config.json's "video_processor" where saved, else the
    image processor's (what Qwen2VLVideoProcessor reads from preprocessor_config.json then)."""
    from ..video.qwen import video_spec as qwen_video_spec

    video = processor.get("video_processor")
    try:
        return qwen_video_spec(config, video if isinstance(video, dict) else processor)
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"the video processor settings are unusable ({exc}); re-save the checkpoint") from None


def load(path: Path, config_json: dict, dtype: str = "float32"):
    from .qwen2_vl_vision import QwenVisionEncoder

    return load_qwen_vl(path, config_json, dtype, describe, QwenVisionEncoder)


def load_qwen_vl(path: Path, config_json: dict, dtype: str, describe_checkpoint, vision_class):
    """The Qwen-VL line's load (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the family's describe() and vision module, one
    check that transformers' rotary reads the M-RoPE sections as config.json does."""
    import transformers
    from transformers import AutoTokenizer

    from . import base

    weights = base.check_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = describe_checkpoint(config_json, base.read_processor_config(path), Vocabulary.from_tokenizer(tokenizer))
    hf_model = getattr(transformers, spec.architecture).from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    decoder = base.decoder_from(hf_model.config.text_config, hf_model.model.language_model, hf_model.lm_head)
    rotary = getattr(decoder.model.rotary_emb, "mrope_section", None)  # what transformers' rotary made of config.json
    if rotary is not None and [int(v) for v in rotary] != list(spec.mrope_section or ()):
        raise CheckpointError(f"transformers rotates M-RoPE sections {list(rotary)} but config.json reads as "
                              f"{spec.mrope_section}; re-save the checkpoint")
    return base.loaded(spec, path, config_json, hf_model, tokenizer, weights, vision_class(hf_model).eval(), decoder)
