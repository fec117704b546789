"""InternVL3 (transformers-native `InternVLForConditionalGeneration`, the `-hf` checkpoints): InternViT tower, CLS
dropped, pixel shuffle 0.5, LayerNorm + MLP projector; GotOcr2 tiling (closest-aspect grid + thumbnail); the
`<img>` + `<IMG_CONTEXT>` x tokens per tile x tiles + `</img>` layout; a Qwen2 decoder."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..layout import ImageLayout
from ..preprocess import PreprocessSpec
from . import base

ARCHITECTURES = ("InternVLForConditionalGeneration",)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class InternVLVision(torch.nn.Module):
    """pixel_values (tiles, 3, H, W) -> (tiles, (H/p)^2 * r^2, D): the tower, CLS dropped, HF's pixel shuffle
    (modeling_internvl.pixel_shuffle) with static sizes, the projector. Equal to model.get_image_features."""

    def __init__(self, hf_model):
        super().__init__()
        config = hf_model.config
        self.tower = hf_model.model.vision_tower
        self.projector = hf_model.model.multi_modal_projector
        self.feature_layer = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"
        self.shrink = round(1 / config.downsample_ratio)  # 2 for InternVL3's 0.5
        self.side = _side(config.vision_config.image_size) // _side(config.vision_config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.feature_layer == -1:
            hidden = self.tower(pixel_values=pixel_values).last_hidden_state
        else:
            hidden = self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        if self.drop_cls:
            hidden = hidden[:, 1:, :]  # (tiles, s*s, C)
        s, k, c = self.side, self.shrink, hidden.shape[-1]
        x = hidden.reshape(-1, s, s, c)
        x = x.reshape(-1, s, s // k, c * k).permute(0, 2, 1, 3)  # (tiles, s/k, s, C*k)
        x = x.reshape(-1, s // k, s // k, c * k * k).permute(0, 2, 1, 3)  # (tiles, s/k, s/k, C*k*k)
        return self.projector(x.reshape(-1, (s // k) ** 2, c * k * k))  # (tiles, T, D)


def _side(value) -> int:
    """A square size as configs write it: 448, [448, 448] or {"height": 448, ...}."""
    if isinstance(value, dict):
        return int(value.get("height") or value.get("shortest_edge") or value.get("longest_edge"))
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def preprocess_spec(processor: dict, vision_config) -> PreprocessSpec:
    tile = _side(processor.get("size", vision_config.image_size))
    # InternVLProcessor forces crop_to_patches=True over the image processor's stored False
    # (processing_internvl.py images_kwargs), so a checkpoint always tiles unless max_patches says otherwise.
    return PreprocessSpec(
        "internvl",
        (tile, tile),
        resample=base.resample_name(processor.get("resample", 3)),
        rescale_factor=float(processor.get("rescale_factor", 1 / 255)),
        image_mean=processor.get("image_mean", IMAGENET_MEAN),
        image_std=processor.get("image_std", IMAGENET_STD),
        min_tiles=int(processor.get("min_patches", 1)),
        max_tiles=int(processor.get("max_patches", 12)),
    )


def load(path: Path, config_json: dict, dtype: str = "float32") -> base.LoadedCheckpoint:
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    weights = base.check_files(path)
    hf_model = InternVLForConditionalGeneration.from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    config = hf_model.config
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = base.read_processor_config(path)
    vision = InternVLVision(hf_model).eval()
    tokens_per_tile = vision.side**2 // vision.shrink**2
    seq_len = int(processor.get("image_seq_length", getattr(config, "image_seq_length", tokens_per_tile)))
    if seq_len != tokens_per_tile:
        raise CheckpointError(f"processor_config.json says {seq_len} tokens per tile but the vision tower makes "
                              f"{tokens_per_tile}; the checkpoint's files do not belong together")
    image_token = tokenizer.convert_ids_to_tokens(int(config.image_token_id))
    start = getattr(tokenizer, "start_image_token", None) or "<img>"
    end = getattr(tokenizer, "end_image_token", None) or "</img>"
    vocab = tokenizer.get_vocab()
    if start not in vocab or end not in vocab:
        raise CheckpointError(f"the tokenizer lacks the image delimiters {start!r} / {end!r}; re-save the tokenizer")
    layout = ImageLayout("wrapped", image_token, image_token, int(config.image_token_id), tokens_per_tile,
                         start_token=start, end_token=end)
    decoder = base.decoder_from(config.text_config, hf_model.model.language_model, hf_model.lm_head)
    return base.LoadedCheckpoint(
        family="internvl",
        path=path,
        hf_model=hf_model,
        vision=vision,
        decoder=decoder,
        tokenizer=tokenizer,
        preprocess=preprocess_spec(processor, config.vision_config),
        layout=layout,
        chat_template=base.read_chat_template(path, tokenizer),
        stop_token_ids=base.stop_ids(path, config_json, tokenizer, ("<|im_end|>",)),
        context_length=int(config.text_config.max_position_embeddings),
        source_sha256=base.checkpoint_sha256(path, weights),
    )
