"""InternVL3 (transformers-native `InternVLForConditionalGeneration`, the `-hf` checkpoints): InternViT tower, CLS
dropped, pixel shuffle 0.5, LayerNorm + MLP projector; GotOcr2 tiling (closest-aspect grid + thumbnail); the
`<img>` + `<IMG_CONTEXT>` x tokens per tile x tiles + `</img>` layout; a Qwen2 decoder. describe() is torch-free;
load() builds the PyTorch modules (towers.InternVLVision)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from .files import resample_name, square_side
from .spec import FamilySpec, Vocabulary, VisionShapes, decoder_row, tower_config

ARCHITECTURES = ("InternVLForConditionalGeneration",)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# transformers' InternVLVisionConfig defaults, for keys a config.json may omit
TOWER_DEFAULTS = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=448, patch_size=14, use_qk_norm=False, norm_type="layer_norm", use_mean_pooling=True,
                      use_absolute_position_embeddings=True, hidden_act="gelu")
MTMD_RMS_TOWER = (3200, 45)  # (width, layers): the one InternViT llama.cpp's internvl graph runs with RMS norms
MTMD_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "silu")  # tower activations clip.cpp has


def mmproj_refusal(config: dict, shape: dict) -> str | None:
    """Why llama.cpp's internvl graph cannot run this checkpoint like transformers (config.json alone), or None."""
    rms = shape["norm_type"] == "rms_norm"
    if shape["use_qk_norm"]:
        return "the tower normalizes q and k (use_qk_norm), which llama.cpp's internvl graph does not"
    if rms != ((int(shape["hidden_size"]), int(shape["num_hidden_layers"])) == MTMD_RMS_TOWER):
        return (f"llama.cpp's internvl graph picks its norm by the tower's shape, not {shape['norm_type']!r} for a "
                f"{shape['hidden_size']}-wide, {shape['num_hidden_layers']}-layer tower")
    if not shape["use_mean_pooling"]:
        return "the tower ends in a LayerNorm (use_mean_pooling false), which llama.cpp's internvl graph never runs"
    if not shape["use_absolute_position_embeddings"]:
        return "the tower has no learned positions, which llama.cpp's internvl graph requires"
    if shape["hidden_act"] not in MTMD_ACTIVATIONS or config.get("projector_hidden_act", "gelu") != "gelu":
        return f"llama.cpp has no {shape['hidden_act']!r} tower / {config.get('projector_hidden_act')!r} projector activation"
    if config.get("vision_feature_select_strategy", "default") != "default":
        return "the projector keeps the CLS token (vision_feature_select_strategy 'full'); llama.cpp drops it"
    layer, n_layers = config.get("vision_feature_layer", -1), int(shape["num_hidden_layers"])
    index = (layer if layer >= 0 else n_layers + 1 + layer) if isinstance(layer, int) else -1  # HF hidden_states[i]
    if not 0 < index <= n_layers:
        return f"vision_feature_layer {layer!r} is not one tower layer, the only feature llama.cpp takes"
    return None


def preprocess_spec(processor: dict, image_size: int) -> PreprocessSpec:
    tile = square_side(processor.get("size", image_size))
    # InternVLProcessor forces crop_to_patches=True over the image processor's stored False
    # (processing_internvl.py images_kwargs), so a checkpoint always tiles unless max_patches says otherwise.
    return PreprocessSpec(
        "internvl",
        (tile, tile),
        resample=resample_name(processor.get("resample", 3)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", IMAGENET_MEAN),
        image_std=processor.get("image_std", IMAGENET_STD),
        min_tiles=int(processor.get("min_patches", 1)),
        max_tiles=int(processor.get("max_patches", 12)),
    )


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    shape = tower_config(config, TOWER_DEFAULTS)
    image, patch = square_side(shape["image_size"]), square_side(shape["patch_size"])
    side = image // patch
    shrink = round(1 / float(config.get("downsample_ratio", 0.5)))  # 2 for InternVL3's 0.5
    tokens = side * side // shrink**2
    seq_len = int(processor.get("image_seq_length", config.get("image_seq_length", tokens)))
    if seq_len != tokens:
        raise CheckpointError(f"processor_config.json says {seq_len} tokens per tile but the vision tower makes "
                              f"{tokens}; the checkpoint's files do not belong together")
    image_token_id = int(config.get("image_token_id", 151667))
    image_token = tokenizer.text_of(image_token_id) or "<IMG_CONTEXT>"
    start = tokenizer.options.get("start_image_token") or "<img>"
    end = tokenizer.options.get("end_image_token") or "</img>"
    if tokenizer.known and (tokenizer.id_of(start) is None or tokenizer.id_of(end) is None):
        raise CheckpointError(f"the tokenizer lacks the image delimiters {start!r} / {end!r}; re-save the tokenizer")
    refusal = mmproj_refusal(config, shape)
    return FamilySpec(
        family="internvl", architecture=ARCHITECTURES[0], preprocess=preprocess_spec(processor, image),
        layout=ImageLayout("wrapped", image_token, image_token, image_token_id, tokens, start_token=start,
                           end_token=end),
        vision=VisionShapes.of_tower(shape, image, patch, side * side + 1,  # + 1: the CLS position
                                     tokens, ("multi_modal_projector.",)),
        decoder_architecture=decoder_row(config, "qwen2"), mmproj_projector=None if refusal else "internvl",
        mmproj_refusal=f"{refusal}: no llama.cpp mmproj can run this checkpoint (export onnx:fp32 / onnx:int8 instead)"
        if refusal else None,
        stop_tokens=("<|im_end|>",),
    )


def load(path: Path, config_json: dict, dtype: str = "float32"):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from . import base
    from .towers import InternVLVision

    weights = base.check_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = describe(config_json, base.read_processor_config(path), Vocabulary.from_tokenizer(tokenizer))
    hf_model = InternVLForConditionalGeneration.from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    config = hf_model.config
    vision = InternVLVision(hf_model).eval()
    if vision.side**2 // vision.shrink**2 != spec.tokens_per_tile:  # the module's own shapes, against the config's
        raise CheckpointError(f"the vision tower makes {vision.side**2 // vision.shrink**2} tokens per tile, config.json "
                              f"says {spec.tokens_per_tile}; re-save the checkpoint")
    decoder = base.decoder_from(config.text_config, hf_model.model.language_model, hf_model.lm_head)
    return base.loaded(spec, path, config_json, hf_model, tokenizer, weights, vision, decoder)
