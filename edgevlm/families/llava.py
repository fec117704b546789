"""LLaVA (LlavaForConditionalGeneration): CLIP or SigLIP tower, feature layer, 2-layer MLP projector, Llama or Qwen2
decoder; one image is one tile of `tokens_per_tile` image tokens. The self-trained reference model is one too.
describe() is torch-free; load() builds the PyTorch modules (towers.LlavaVision)."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from .files import resample_name
from .spec import PINNED_LLAMA_CPP, FamilySpec, Vocabulary, VisionShapes, decoder_row, mlp_width_refusal

ARCHITECTURES = ("LlavaForConditionalGeneration",)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# transformers' CLIPVisionConfig / SiglipVisionConfig defaults, for keys a config.json may omit
TOWER_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              image_size=224, patch_size=32),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=16),
}
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")
MTMD_GELUS = ("gelu", "gelu_pytorch_tanh", "gelu_new")  # the projector activations mtmd's mlp projector computes


def preprocess_spec(processor: dict, image_size: int) -> PreprocessSpec:
    kind = processor.get("image_processor_type", "CLIPImageProcessor").removesuffix("Fast").removesuffix("Pil")
    common = dict(
        resample=resample_name(processor.get("resample", 3)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", CLIP_MEAN),
        image_std=processor.get("image_std", CLIP_STD),
    )
    size = processor.get("size", {})
    if kind in ("CLIPImageProcessor", "LlavaImageProcessor") and "shortest_edge" in size:
        if processor.get("do_pad"):
            raise CheckpointError("LLaVA pad-to-square preprocessing (do_pad=true) is not supported yet")
        crop = processor.get("crop_size", {"height": size["shortest_edge"], "width": size["shortest_edge"]})
        return PreprocessSpec("shortest_edge_crop", (crop["height"], crop["width"]), shortest_edge=size["shortest_edge"], **common)
    if "height" in size:
        return PreprocessSpec("fixed", (size["height"], size["width"]), **common)
    return PreprocessSpec("fixed", (image_size, image_size), **common)


def _mmproj(config: dict, tower: str) -> tuple[str | None, str | None]:
    """("mlp", None) when llama.cpp's mtmd computes this checkpoint like transformers, else (None, why not)."""
    if tower == "clip_vision_model":
        return None, (f"LLaVA with a CLIP tower cannot be written as an mmproj for {PINNED_LLAMA_CPP}: its llava graph "
                      "appends the CLS embedding after the patches but selects rows as if it came first, so every patch "
                      "gets its neighbour's position (ggml-org/llama.cpp issue 25814, fix PR 25844 not merged); export "
                      "--encoder onnx:... for this checkpoint")
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "full":
        return None, (f"vision_feature_select_strategy {strategy!r} drops the first patch of a SigLIP tower; mtmd's "
                      "llava graph keeps every patch (it drops a row only for a CLS token)")
    act = config.get("projector_hidden_act", "gelu")
    if act not in MTMD_GELUS:
        return None, f"the projector activation {act!r} is not the GELU mtmd's mlp projector computes"
    return "mlp", None


def describe(config: dict, processor: dict, tokenizer: Vocabulary) -> FamilySpec:
    vision_config = config.get("vision_config") or {}
    tower = vision_config.get("model_type", "clip_vision_model")
    tower = "clip_vision_model" if tower == "clip" else tower
    if tower not in TOWER_DEFAULTS:
        raise CheckpointError(f"LLaVA vision tower {tower!r} is not supported (CLIP or SigLIP)")
    shape = {**TOWER_DEFAULTS[tower], **{k: v for k, v in vision_config.items() if v is not None}}
    image, patch = int(shape["image_size"]), int(shape["patch_size"])
    has_cls = tower == "clip_vision_model"
    sequence = (image // patch) ** 2 + (1 if has_cls else 0)
    strategy = config.get("vision_feature_select_strategy", "default")
    tokens = sequence - (1 if strategy == "default" else 0)  # "default" drops row 0 (CLIP's CLS)
    image_token_id = config.get("image_token_id") or config.get("image_token_index")
    if image_token_id is None:
        raise CheckpointError("config.json names no image_token_id; re-save the checkpoint")
    image_token = tokenizer.text_of(int(image_token_id)) or "<image>"
    projector, refusal = _mmproj(config, tower)
    if projector and (refusal := mlp_width_refusal(projector, int(shape["hidden_size"]),
                                                   int(shape["intermediate_size"]))):
        projector = None
    return FamilySpec(
        family="llava", architecture=ARCHITECTURES[0], preprocess=preprocess_spec(processor, image),
        layout=ImageLayout("repeat", image_token, image_token, int(image_token_id), tokens),
        vision=VisionShapes.of_tower(shape, image, patch, sequence, tokens, ("multi_modal_projector.",)),
        decoder_architecture=decoder_row(config), mmproj_projector=projector, mmproj_refusal=refusal,
        stop_tokens=STOP_TOKENS,
    )


def load(path: Path, config_json: dict, dtype: str = "float32"):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from . import base
    from .towers import LlavaVision

    weights = base.check_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = describe(config_json, base.read_processor_config(path), Vocabulary.from_tokenizer(tokenizer))
    hf_model = LlavaForConditionalGeneration.from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    config = hf_model.config
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    vision = LlavaVision(hf_model, config.vision_feature_layer, strategy).eval()
    decoder = base.decoder_from(config.text_config, hf_model.model.language_model, hf_model.lm_head)
    return base.loaded(spec, path, config_json, hf_model, tokenizer, weights, vision, decoder)
