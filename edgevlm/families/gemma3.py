"""Gemma 3 (Gemma3ForConditionalGeneration): SigLIP tower at one fixed size, a k x k average pool down to
`mm_tokens_per_image` (256 in the published models: 64x64 patches -> 16x16), the soft-embedding RMSNorm and a linear
projector; `<start_of_image>` expands to blank lines + `<start_of_image>` + image tokens + `<end_of_image>` + blank
lines, optional pan-and-scan crops after the whole image. The decoder attends to each image's block
bidirectionally (image_attention "bidirectional": HF builds it from token types; llama.cpp switches causal attention
off for the block). A Gemma 3 text-only checkpoint (1B: Gemma3ForCausalLM) has no vision tower and is refused.
describe() is torch-free; load() builds the PyTorch modules (gemma3_vision.Gemma3Vision)."""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from .files import resample_name, square_side
from .spec import FamilySpec, Vocabulary, VisionShapes, decoder_row, mlp_width_refusal, tower_config

ARCHITECTURES = ("Gemma3ForConditionalGeneration",)
# transformers' SiglipVisionConfig as Gemma3Config builds it (So400m/14 at 896) for keys a config.json may omit
TOWER_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=896, patch_size=14)
# Gemma3Processor's images_kwargs: a preprocessor_config.json on the Hub stores null for these
PAN_AND_SCAN_DEFAULTS = dict(do_pan_and_scan=False, pan_and_scan_min_crop_size=256, pan_and_scan_max_num_crops=4,
                             pan_and_scan_min_ratio_to_activate=1.2)
BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
GLOBAL_EVERY = 6  # llama.cpp's gemma3 takes every sixth layer as global (set_swa_pattern(6)), as HF's default does


def text_only_refusal(architecture: str) -> str:
    return (f"{architecture} is a text-only Gemma 3 (the 1B has no vision tower); edgevlm exports vision-language "
            "checkpoints: use a Gemma3ForConditionalGeneration (4B, 12B, 27B)")


def preprocess_spec(processor: dict, image_size: int) -> PreprocessSpec:
    size = square_side(processor.get("size") or image_size)
    options = {k: (v if (v := processor.get(k)) is not None else default) for k, default in PAN_AND_SCAN_DEFAULTS.items()}
    return PreprocessSpec(
        "gemma3", (size, size),
        resample=resample_name(processor.get("resample", 2)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", (0.5, 0.5, 0.5)),
        image_std=processor.get("image_std", (0.5, 0.5, 0.5)),
        image_splitting=bool(options["do_pan_and_scan"]),
        max_tiles=max(1, int(options["pan_and_scan_max_num_crops"])),
        pan_and_scan_min_crop=int(options["pan_and_scan_min_crop_size"]),
        pan_and_scan_min_ratio=float(options["pan_and_scan_min_ratio_to_activate"]),
    )


def layer_pattern_refusal(text: dict) -> str | None:
    """llama.cpp's gemma3 fixes the local/global pattern (every sixth layer global); another pattern is refused."""
    layers = int(text.get("num_hidden_layers", 34))
    types = text.get("layer_types") or ["sliding_attention" if (i + 1) % int(text.get("sliding_window_pattern", 6))
                                        else "full_attention" for i in range(layers)]
    expected = ["sliding_attention" if (i + 1) % GLOBAL_EVERY else "full_attention" for i in range(layers)]
    if list(types) != expected:
        return (f"the decoder's layer types {types} are not Gemma 3's every-sixth-layer-global pattern, which "
                "llama.cpp's gemma3 architecture assumes")
    return None


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    shape = tower_config(config, TOWER_DEFAULTS)
    image, patch = square_side(shape["image_size"]), square_side(shape["patch_size"])
    side = image // patch
    tokens = int(config.get("mm_tokens_per_image", 256))
    per_side = math.isqrt(tokens)
    if per_side * per_side != tokens or side % per_side:
        raise CheckpointError(f"mm_tokens_per_image {tokens} is not a square that divides the {side}x{side} patch grid")
    seq_len = int(processor.get("image_seq_length", tokens))
    if seq_len != tokens:
        raise CheckpointError(f"processor_config.json says {seq_len} tokens per image but the projector makes "
                              f"{tokens}; the checkpoint's files do not belong together")
    image_token_id = int(config.get("image_token_index", config.get("image_token_id", 262_144)))
    image_token = tokenizer.text_of(image_token_id) or SOFT
    if tokenizer.known and (tokenizer.id_of(BOI) is None or tokenizer.id_of(EOI) is None):
        raise CheckpointError(f"the tokenizer lacks the image delimiters {BOI} / {EOI}; re-save the tokenizer")
    refusal = layer_pattern_refusal((config.get("text_config") or {}))
    if refusal:
        raise CheckpointError(refusal)
    wide = mlp_width_refusal("gemma3", int(shape["hidden_size"]), int(shape["intermediate_size"]))
    return FamilySpec(
        family="gemma3", architecture=ARCHITECTURES[0], preprocess=preprocess_spec(processor, image),
        layout=ImageLayout("gemma3", BOI, image_token, image_token_id, tokens, start_token=BOI, end_token=EOI),
        vision=VisionShapes.of_tower(shape, image, patch, side * side, tokens, ("multi_modal_projector.",)),
        decoder_architecture=decoder_row(config, "gemma3_text"), mmproj_projector=None if wide else "gemma3", mmproj_refusal=wide,
        stop_tokens=("<end_of_turn>",), image_attention="bidirectional",
    )


def load(path: Path, config_json: dict, dtype: str = "float32"):
    from transformers import Gemma3ForConditionalGeneration

    from .gemma3_vision import load_siglip_gemma

    return load_siglip_gemma(path, config_json, dtype, Gemma3ForConditionalGeneration, describe)
