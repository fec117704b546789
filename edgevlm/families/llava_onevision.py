"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): SigLIP tower, 2-layer GELU MLP projector, Qwen2 decoder;
"anyres-max" images: a base view plus a grid of tiles chosen from the pinpoint resolutions, the grid's features
unpadded to the image's aspect, bilinear-pooled above max_pooled_tiles tiles' worth ("anyres_max_9"), an
image_newline row after every line (edgevlm/anyres.py). The encoder is tower + projector per tile with the newline
as each tile's last row; the runtime packs in numpy. Several images in one prompt: HF treats each image of a multi-image prompt
as one square-padded view (the tile's rows + image_newline, unpacked): prompt.prepare_image does the same.
describe() is torch-free; load() builds the PyTorch modules."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from .files import resample_name
from .spec import PINNED_LLAMA_CPP, FamilySpec, Vocabulary, VisionShapes, decoder_row, tower_config

ARCHITECTURES = ("LlavaOnevisionForConditionalGeneration",)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# transformers' LlavaOnevisionConfig vision defaults (SigLIP-so400m/14 at 384 without its pooling head)
TOWER_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                      image_size=384, patch_size=14)
# LlavaOnevisionConfig / LlavaOnevisionImageProcessor default pinpoints: 1..6 x 1..6 tiles of 384 px
DEFAULT_PINPOINTS = [[384 * r, 384 * c] for r in range(1, 7) for c in range(1, 7)]
DEFAULT_ASPECT_RATIO = "anyres_max_9"
MMPROJ_REFUSAL = (f"{PINNED_LLAMA_CPP} has no LLaVA-OneVision projector type (clip-impl.h lists no anyres-max "
                  "packing), so no mmproj can be written; export --encoder onnx:... (its GGUF decoder runs in "
                  "llama.cpp as usual)")


def max_pooled_tiles(aspect_ratio: str) -> int:
    """"anyres_max_9" -> 9, as pack_image_features reads it (strip of the prefix's characters)."""
    try:
        value = int(str(aspect_ratio).strip("anyres_max_"))
    except ValueError:
        value = 0
    if value < 1:
        raise CheckpointError(f"vision_aspect_ratio {aspect_ratio!r} is not 'anyres_max_N'; re-save the checkpoint")
    return value


def preprocess_spec(config: dict, processor: dict, tile: int, patch: int) -> PreprocessSpec:
    size = processor.get("size") or {"height": tile, "width": tile}
    side = size.get("shortest_edge") or size.get("height")
    if side != tile or size.get("width", side) != side:
        raise CheckpointError(f"preprocessor_config.json resizes to {size} but the vision tower takes {tile}-px tiles; "
                              "the checkpoint's files do not belong together")
    pinpoints = processor.get("image_grid_pinpoints") or config.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
    if config.get("image_grid_pinpoints") and config["image_grid_pinpoints"] != pinpoints:
        raise CheckpointError("config.json and preprocessor_config.json name different image_grid_pinpoints; the "
                              "model would pack features for another grid than the processor cuts")
    ratio = config.get("vision_aspect_ratio", DEFAULT_ASPECT_RATIO)
    if processor.get("vision_aspect_ratio", ratio) != ratio:
        raise CheckpointError(f"config.json pools at {ratio!r} but the processor counts tokens at "
                              f"{processor['vision_aspect_ratio']!r}; re-save the checkpoint")
    return PreprocessSpec(
        "anyres", (tile, tile), resample=resample_name(processor.get("resample", 3)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", CLIP_MEAN), image_std=processor.get("image_std", CLIP_STD),
        patch_size=patch, grid_pinpoints=tuple(tuple(p) for p in pinpoints), max_pooled_tiles=max_pooled_tiles(ratio),
    )


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    vision_config = config.get("vision_config") or {}
    if vision_config.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise CheckpointError(f"LLaVA-OneVision vision tower {vision_config.get('model_type')!r} is not supported "
                              "(SigLIP)")
    shape = tower_config(config, TOWER_DEFAULTS)
    image, patch = int(shape["image_size"]), int(shape["patch_size"])
    side = image // patch
    strategy = config.get("vision_feature_select_strategy", "full")
    if strategy != "full":  # pack_image_features reshapes side x side patches: "default" would drop one
        raise CheckpointError(f"vision_feature_select_strategy {strategy!r}: LLaVA-OneVision packs all of a tile's "
                              "side x side patches ('full')")
    seq = processor.get("num_image_tokens")
    if seq is not None and int(seq) != side * side:
        raise CheckpointError(f"the processor counts {seq} tokens per view but the tower makes {side * side}; the "
                              "checkpoint's files do not belong together")
    image_token_id = config.get("image_token_id", config.get("image_token_index", 151646))
    image_token = tokenizer.text_of(int(image_token_id)) or "<image>"
    per_tile = side * side + 1  # the tower's patches + the image_newline row every tile carries
    return FamilySpec(
        family="llava_onevision", architecture=ARCHITECTURES[0],
        preprocess=preprocess_spec(config, processor, image, patch),
        layout=ImageLayout("anyres", image_token, image_token, int(image_token_id), per_tile),
        vision=VisionShapes.of_tower(shape, image, patch, side * side, per_tile,
                                     ("multi_modal_projector.", "image_newline")),
        decoder_architecture=decoder_row(config, "qwen2"), mmproj_projector=None, mmproj_refusal=MMPROJ_REFUSAL,
        stop_tokens=("<|im_end|>",),
    )


def load(path: Path, config_json: dict, dtype: str = "float32"):
    from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

    from . import base
    from .towers import OnevisionVision

    weights = base.check_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = describe(config_json, base.read_processor_config(path), Vocabulary.from_tokenizer(tokenizer))
    hf_model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    decoder = base.decoder_from(hf_model.config.text_config, hf_model.model.language_model, hf_model.lm_head)
    return base.loaded(spec, path, config_json, hf_model, tokenizer, weights, OnevisionVision(hf_model).eval(), decoder)
