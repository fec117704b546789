"""Qwen3-VL vision tower + merger + DeepStack mergers: patches (P, 3*T*p*p) and the image's grid (t, h, w) in patches
-> (t*h*w / merge^2, (1 + k) * D) image rows: HF's get_image_features' pooler output, then its k DeepStack features,
side by side (llama.cpp's qwen3vl row layout; the decoders split a row into its slices).

Two modules share HF's weights:
- `Qwen3VisionEncoder`: HF's own tower, called with the grid (the torch reference and the parity baseline);
- `Qwen3VisionExport`: the same maths behind a fixed signature for ONNX (one graph, dynamic patch axis): the patch
  positions and the bilinear taps that resample the learned position table to the image's grid come in as inputs
  (edgevlm/vision_grid.py computes them in numpy), one image attends to itself whole (no mask), and the Conv3d patch
  embedding (stride = kernel) becomes a Linear so ONNX Runtime's dynamic int8 quantizes it.
"""
from __future__ import annotations

import torch

from ..vision_grid import VisionGrid
from .qwen2_vl_vision import QwenVisionExport


def vision_grid(vision_config) -> VisionGrid:
    """The numbers the runtime needs from HF's Qwen3VLVisionConfig."""
    return VisionGrid(patch_size=int(vision_config.patch_size), temporal_patch_size=int(vision_config.temporal_patch_size),
                      merge_size=int(vision_config.spatial_merge_size), in_channels=int(vision_config.in_channels),
                      position_grid=int(int(vision_config.num_position_embeddings) ** 0.5))


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

    def export_module(self) -> "Qwen3VisionExport":
        return Qwen3VisionExport(self.visual, self.grid_spec).eval()


class Qwen3VisionExport(QwenVisionExport):
    """Fixed signature for ONNX: pixel_patches (P, patch_dim), vision_pos (P, 2) int64, pos_embed_ids (P, 4) int64,
    pos_embed_weights (P, 4) -> (P / merge^2, (1 + k) * D). Qwen2-VL's attention (same qkv / rotate-half layout)
    without windows."""

    def __init__(self, visual, spec: VisionGrid):
        torch.nn.Module.__init__(self)
        conv = visual.patch_embed.proj  # Conv3d, stride = kernel, with a bias: one affine map per patch
        self.patch_proj = torch.nn.Linear(spec.patch_dim, conv.out_channels, bias=True)
        self.patch_proj.weight = torch.nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1),
                                                    requires_grad=False)  # (D, C*T*p*p), a view: no copy
        self.patch_proj.bias = torch.nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.pos_embed = visual.pos_embed
        self.rotary = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.deepstack_mergers = visual.deepstack_merger_list  # registered: .half() and the exporter see them
        self.deepstack_blocks = {int(block): i for i, block in enumerate(visual.deepstack_visual_indexes)}
        self._apply_rope = _rope_function(visual)

    def forward(self, pixel_patches: torch.Tensor, vision_pos: torch.Tensor, pos_embed_ids: torch.Tensor,
                pos_embed_weights: torch.Tensor) -> torch.Tensor:
        x = self.patch_proj(pixel_patches.to(self.patch_proj.weight.dtype))  # (P, C)
        table = self.pos_embed(pos_embed_ids) * pos_embed_weights.to(x.dtype)[:, :, None]  # (P, 4, C)
        x = x + table.sum(1)
        cos, sin = self.rotary(x, vision_pos)  # (P, head_dim) each
        slices = []
        for index, block in enumerate(self.blocks):
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, None)
            x = x + block.mlp(block.norm2(x))
            if index in self.deepstack_blocks:
                slices.append(self.deepstack_mergers[self.deepstack_blocks[index]](x))  # (M, D)
        return torch.cat([self.merger(x), *slices], dim=-1)  # (M, (1 + k) * D)


def _rope_function(visual):
    import sys

    return sys.modules[type(visual.blocks[0].attn).__module__].apply_rotary_pos_emb_vision
