"""The torch vision modules of the tiled families (the half each family's load() builds; Qwen2-VL's lives in
qwen2_vl_vision.py): pixel_values (tiles, 3, H, W) -> image embeddings (tiles, T, D), on the checkpoint's own
submodules. Imported only by the families' load(), never by the planner or the runtime."""
from __future__ import annotations

import torch

from .files import square_side


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


class OnevisionVision(torch.nn.Module):
    """LLaVA-OneVision: pixel_values (tiles,3,H,W) -> (tiles, side^2 + 1, D): tower -> projector per tile, then the
    image_newline as each tile's last row, so every encoder backend delivers it (anyres.pack takes it from there)."""

    def __init__(self, hf_model):
        super().__init__()
        config = hf_model.config
        self.features = LlavaVision(hf_model, config.vision_feature_layer, config.vision_feature_select_strategy)
        self.image_newline = hf_model.model.image_newline

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        rows = self.features(pixel_values)  # (tiles, side^2, D)
        newline = self.image_newline.to(rows.dtype)[None, None].expand(rows.shape[0], 1, rows.shape[-1])
        return torch.cat([rows, newline], dim=1)


class Idefics3Vision(torch.nn.Module):
    """Full tiles only (the processor always makes full tiles for single images), so position ids are static;
    this keeps the graph free of the variable-resolution code that the TorchScript ONNX exporter mis-traces."""

    def __init__(self, hf_model):
        super().__init__()
        vision_model = hf_model.model.vision_model
        self.patch_embedding = vision_model.embeddings.patch_embedding
        self.position_embedding = vision_model.embeddings.position_embedding
        self.encoder = vision_model.encoder
        self.post_layernorm = vision_model.post_layernorm
        self.connector = hf_model.model.connector
        n_patches = vision_model.embeddings.num_patches
        self.register_buffer("position_ids", torch.arange(n_patches), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (tiles, P, Dv)
        hidden = patches + self.position_embedding(self.position_ids)[None]  # (tiles, P, Dv)
        hidden = self.encoder(inputs_embeds=hidden).last_hidden_state
        return self.connector(self.post_layernorm(hidden))  # (tiles, P / scale^2, D)


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
        self.side = square_side(config.vision_config.image_size) // square_side(config.vision_config.patch_size)

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
