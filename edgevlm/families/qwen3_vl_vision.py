"""Qwen3-VL vision tower + merger + DeepStack mergers: patches (P, 3*T*p*p) and the image's grid (t, h, w) in patches
-> (t*h*w / merge^2, (1 + k) * D) image rows: HF's get_image_features' pooler output, then its k DeepStack features,
side by side (llama.cpp's qwen3vl row layout; the decoders split a row into its slices)."""
from __future__ import annotations

import torch

from ..vision_grid import VisionGrid


def vision_grid(vision_config) -> VisionGrid:
    """The numbers the runtime needs from HF's Qwen3VLVisionConfig."""
    return VisionGrid(patch_size=int(vision_config.patch_size), temporal_patch_size=int(vision_config.temporal_patch_size),
                      merge_size=int(vision_config.spatial_merge_size), in_channels=int(vision_config.in_channels))


class Qwen3VisionEncoder(torch.nn.Module):
    """HF's tower for one image: (P, patch_dim) and (t, h, w) -> (M, (1 + k) * D)."""

    def __init__(self, hf_model):
        super().__init__()
        self.visual = hf_model.model.visual
        self.grid_spec = vision_grid(self.visual.config)
        self.deepstack_layers = len(self.visual.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid) -> torch.Tensor:
        grid_thw = torch.as_tensor(grid, dtype=torch.long).reshape(1, 3)
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=grid_thw)
        return torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)  # (M, (1 + k) * D)
