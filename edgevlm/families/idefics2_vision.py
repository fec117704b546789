"""Idefics2's torch vision module (the half idefics2.load() builds): padded tiles (tiles, 4, L, L) -- RGB plus HF's
pixel mask, see preprocess.py -> (tiles, n_latents, D), on the checkpoint's own submodules. The patch mask, the
NaViT position buckets and the additive attention masks are computed here with plain tensor ops (no bucketize, no
per-image loop), so that the dynamo ONNX exporter takes the whole graph; equal to model.get_image_features."""
from __future__ import annotations

import torch


class Idefics2Vision(torch.nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        vision_model = hf_model.model.vision_model
        embeddings = vision_model.embeddings
        self.patch_size = int(embeddings.patch_size)
        self.per_side = int(embeddings.num_patches_per_side)
        self.patch_embedding = embeddings.patch_embedding
        self.position_embedding = embeddings.position_embedding
        self.encoder = vision_model.encoder
        self.post_layernorm = vision_model.post_layernorm
        self.projection = hf_model.model.connector.modality_projection
        self.resampler = hf_model.model.connector.perceiver_resampler
        # the same float boundaries as Idefics2VisionEmbeddings: a bucket is the count of boundaries <= coordinate
        n = self.per_side
        self.register_buffer("boundaries", torch.arange(1 / n, 1.0, 1 / n), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels, mask = pixel_values[:, :3], pixel_values[:, 3]
        tiles, p = pixels.shape[0], self.patch_size
        gh, gw = mask.shape[1] // p, mask.shape[2] // p
        # a patch is valid when every pixel under it is (HF: unfold + sum == p*p)
        cells = mask[:, : gh * p, : gw * p].reshape(tiles, gh, p, gw, p)
        patch_mask = cells.amin(dim=(2, 4)) > 0.5  # (tiles, gh, gw)
        rows = patch_mask[:, :, 0].sum(dim=1).float()
        cols = patch_mask[:, 0, :].sum(dim=1).float()
        frac_h = (torch.arange(gh, dtype=torch.float32)[None] * (1.0 / rows)[:, None]).clamp(max=1.0 - 1e-6)
        frac_w = (torch.arange(gw, dtype=torch.float32)[None] * (1.0 / cols)[:, None]).clamp(max=1.0 - 1e-6)
        bucket_h = (frac_h[..., None] >= self.boundaries).sum(-1)  # torch.bucketize(..., right=True)
        bucket_w = (frac_w[..., None] >= self.boundaries).sum(-1)
        positions = (bucket_h[:, :, None] * self.per_side + bucket_w[:, None, :]).reshape(tiles, -1)
        flat_mask = patch_mask.reshape(tiles, -1)
        positions = torch.where(flat_mask, positions, torch.zeros_like(positions))
        hidden = self.patch_embedding(pixels).flatten(2).transpose(1, 2) + self.position_embedding(positions)
        dtype = hidden.dtype
        blocked = torch.finfo(dtype).min
        additive = torch.zeros(flat_mask.shape, dtype=dtype).masked_fill(~flat_mask, blocked)[:, None, None, :]
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=additive).last_hidden_state
        context = self.projection(self.post_layernorm(hidden))  # (tiles, P, D)
        return self._resample(context, additive)

    def _resample(self, context: torch.Tensor, additive: torch.Tensor) -> torch.Tensor:
        """Idefics2PerceiverResampler.forward with the additive mask built above (keys: the patches, then the
        latents, which are never masked)."""
        latents = self.resampler.latents.unsqueeze(0).expand(context.shape[0], -1, -1)
        mask = torch.cat([additive, torch.zeros(*additive.shape[:3], latents.shape[1], dtype=additive.dtype)], dim=-1)
        for layer in self.resampler.layers:
            latents = layer(latents, context, attention_mask=mask, position_ids=None)
        return self.resampler.norm(latents)
