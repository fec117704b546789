"""Qwen2-VL / Qwen2.5-VL vision tower + merger: patches (P, 3*T*p*p) and the image's grid (t, h, w) in patches ->
(t*h*w / merge^2, D) image embeddings, equal to HF's get_image_features.

Two modules share HF's weights:
- `QwenVisionEncoder`: HF's own tower, called with the grid (the torch reference and the parity baseline);
- `QwenVisionExport`: the same maths behind a fixed signature for ONNX (one graph, dynamic patch axis). HF's tower
  splits attention per window with `.tolist()` (data-dependent), so the export takes the window of each patch as an
  input and turns it into a (P, P) mask; positions come in as an input too (edgevlm/vision_grid.py computes both in
  numpy). The Conv3d patch embedding (stride = kernel) becomes a Linear so ONNX Runtime's dynamic int8 quantizes it.
"""
from __future__ import annotations

import sys

import torch

from ..vision_grid import VisionGrid


def vision_grid(vision_config) -> VisionGrid:
    """The numbers the runtime needs from HF's vision config (Qwen2VLVisionConfig or Qwen2_5_VLVisionConfig)."""
    return VisionGrid(patch_size=int(vision_config.patch_size), temporal_patch_size=int(vision_config.temporal_patch_size),
                      merge_size=int(vision_config.spatial_merge_size), in_channels=int(vision_config.in_channels),
                      window_size=int(getattr(vision_config, "window_size", 0) or 0),
                      fullatt_block_indexes=tuple(getattr(vision_config, "fullatt_block_indexes", ()) or ()))


class QwenVisionEncoder(torch.nn.Module):
    """HF's tower + merger for one image: (P, patch_dim) and (t, h, w) -> (M, D)."""

    def __init__(self, hf_model):
        super().__init__()
        self.visual = hf_model.model.visual
        self.grid_spec = vision_grid(self.visual.config)

    def forward(self, pixel_values: torch.Tensor, grid) -> torch.Tensor:
        grid_thw = torch.as_tensor(grid, dtype=torch.long).reshape(1, 3)
        out = self.visual(pixel_values.to(self.visual.dtype), grid_thw=grid_thw)
        return out.pooler_output  # (M, D)

    def export_module(self) -> "QwenVisionExport":
        return QwenVisionExport(self.visual, self.grid_spec).eval()


class QwenVisionExport(torch.nn.Module):
    """Fixed signature for ONNX: pixel_patches (P, patch_dim), vision_pos (P, 2) int64[, window_ids (P,) int64] ->
    (P / merge^2, D). Every windowed block attends only inside a window (mask from the ids, in HF's patch order, so no
    permutation is needed: the merger groups the same consecutive patches either way); full-attention blocks see the
    whole image."""

    def __init__(self, visual, spec: VisionGrid):
        super().__init__()
        conv = visual.patch_embed.proj  # Conv3d, stride = kernel: one matrix product per patch
        self.patch_proj = torch.nn.Linear(spec.patch_dim, conv.out_channels, bias=False)
        self.patch_proj.weight = torch.nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1),
                                                    requires_grad=False)  # (D, C*T*p*p), a view: no copy
        self.rotary = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.windowed = tuple(spec.windowed and i not in spec.fullatt_block_indexes for i in range(len(visual.blocks)))
        # HF's own rotary application (float32 maths, rotate-half), from the tower's modeling module
        self._apply_rope = sys.modules[type(visual.blocks[0].attn).__module__].apply_rotary_pos_emb_vision

    def forward(self, pixel_patches: torch.Tensor, vision_pos: torch.Tensor,
                window_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_proj(pixel_patches.to(self.patch_proj.weight.dtype))  # (P, C)
        cos, sin = self.rotary(x, vision_pos)  # (P, head_dim) each
        window_mask = None
        if window_ids is not None:
            window_mask = window_ids[:, None] == window_ids[None, :]  # (P, P) bool: same window
        for block, windowed in zip(self.blocks, self.windowed):
            x = x + self._attention(block.attn, block.norm1(x), cos, sin, window_mask if windowed else None)
            x = x + block.mlp(block.norm2(x))
        return self.merger(x)  # (M, D)

    def _attention(self, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor | None) -> torch.Tensor:
        patches = x.shape[0]
        q, k, v = attn.qkv(x).reshape(patches, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (P, H, hd)
        q, k = self._apply_rope(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, P, hd)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
        return attn.proj(out[0].transpose(0, 1).reshape(patches, -1))  # (P, C)
