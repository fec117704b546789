"""Gemma 3's torch vision half: pixel_values (tiles, 3, S, S) -> (tiles, mm_tokens_per_image, D), the SigLIP tower's
last hidden state through HF's own projector (k x k average pool, soft-embedding RMSNorm, linear). Equal to
Gemma3Model.get_image_features. Imported only by the family's load()."""
from __future__ import annotations

import torch


class Gemma3Vision(torch.nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.tower = hf_model.model.vision_tower
        self.projector = hf_model.model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values=pixel_values).last_hidden_state  # (tiles, P, Dv)
        return self.projector(hidden)  # (tiles, T, D)
