"""LLaVA (LlavaForConditionalGeneration): CLIP or SigLIP tower, feature layer, 2-layer MLP projector, Llama decoder."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from . import base

ARCHITECTURES = ("LlavaForConditionalGeneration",)


class LlavaVision(torch.nn.Module):
    """pixel_values (tiles,3,H,W) -> image_embeds (tiles,T,D): tower -> selected hidden state(s) -> projector."""

    def __init__(self, hf_model, feature_layer: int | list[int], select_strategy: str):
        super().__init__()
        self.tower = hf_model.model.vision_tower
        self.projector = hf_model.model.multi_modal_projector
        self.feature_layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        self.drop_first = select_strategy == "default"  # HF drops token 0 (CLS for CLIP) under "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        selected = [hidden[i][:, 1:] if self.drop_first else hidden[i] for i in self.feature_layers]  # (tiles, P, Dv)
        return self.projector(torch.cat(selected, dim=-1))  # (tiles, T, D)


def preprocess_spec(processor: dict, vision_config) -> PreprocessSpec:
    kind = processor.get("image_processor_type", "CLIPImageProcessor").removesuffix("Fast").removesuffix("Pil")
    common = dict(
        resample=base.resample_name(processor.get("resample", 3)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", (0.48145466, 0.4578275, 0.40821073)),
        image_std=processor.get("image_std", (0.26862954, 0.26130258, 0.27577711)),
    )
    size = processor.get("size", {})
    if kind in ("CLIPImageProcessor", "LlavaImageProcessor") and "shortest_edge" in size:
        if processor.get("do_pad"):
            raise CheckpointError("LLaVA pad-to-square preprocessing (do_pad=true) is not supported yet")
        crop = processor.get("crop_size", {"height": size["shortest_edge"], "width": size["shortest_edge"]})
        return PreprocessSpec("shortest_edge_crop", (crop["height"], crop["width"]), shortest_edge=size["shortest_edge"], **common)
    if "height" in size:
        return PreprocessSpec("fixed", (size["height"], size["width"]), **common)
    side = vision_config.image_size
    return PreprocessSpec("fixed", (side, side), **common)


def tokens_per_tile(config, vision_config) -> int:
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    has_cls = vision_config.model_type in ("clip_vision_model", "clip")
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    return patches + (1 if has_cls else 0) - (1 if strategy == "default" else 0)


def load(path: Path, config_json: dict, dtype: str = "float32") -> base.LoadedCheckpoint:
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    weights = base.check_files(path)
    hf_model = LlavaForConditionalGeneration.from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    config = hf_model.config
    vision_config = config.vision_config
    if vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise CheckpointError(f"LLaVA vision tower {vision_config.model_type!r} is not supported (CLIP or SigLIP)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_token_id = int(getattr(config, "image_token_id", None) or getattr(config, "image_token_index"))
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    vision = LlavaVision(hf_model, config.vision_feature_layer, strategy).eval()
    decoder = base.decoder_from(config.text_config, hf_model.model.language_model, hf_model.lm_head)
    layout = ImageLayout("repeat", image_token, image_token, image_token_id, tokens_per_tile(config, vision_config))
    return base.LoadedCheckpoint(
        family="llava",
        path=path,
        hf_model=hf_model,
        vision=vision,
        decoder=decoder,
        tokenizer=tokenizer,
        preprocess=preprocess_spec(base.read_processor_config(path), vision_config),
        layout=layout,
        chat_template=base.read_chat_template(path, tokenizer),
        stop_token_ids=base.stop_ids(path, config_json, tokenizer, ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")),
        context_length=int(config.text_config.max_position_embeddings),
        source_sha256=base.checkpoint_sha256(path, weights),
    )
