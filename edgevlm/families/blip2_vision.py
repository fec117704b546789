"""BLIP-2 / InstructBLIP's torch vision module (the half blip2.load() builds): the ViT, the Q-Former (learned queries
cross-attending to the ViT's patches; InstructBLIP's also reads the instruction's ids beside them) and the language
projection, on the checkpoint's own submodules: (tiles, 3, H, W) [+ (tiles, n) instruction ids and mask] ->
(tiles, queries, D). Equal to model.get_image_features(...).pooler_output."""
from __future__ import annotations

import torch


class QFormerBridge(torch.nn.Module):
    def __init__(self, hf_model, default_ids: list[int] | None = None):
        """default_ids (InstructBLIP): the instruction an encode without a prompt reads (the Q-Former tokenizer's
        ids of the empty text), so that probes and verify's tiles run the same graph."""
        super().__init__()
        self.vision_model = hf_model.vision_model
        self.query_tokens = hf_model.query_tokens
        self.qformer = hf_model.qformer
        self.language_projection = hf_model.language_projection
        self.reads_instruction = default_ids is not None
        if default_ids is not None:
            self.register_buffer("default_ids", torch.tensor([default_ids], dtype=torch.long), persistent=False)

    def forward(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                qformer_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        n_queries = queries.shape[1]
        if not self.reads_instruction:
            out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                               encoder_attention_mask=image_mask, return_dict=True)
        else:
            if qformer_input_ids is None:
                qformer_input_ids = self.default_ids.expand(image_embeds.shape[0], -1)
            if qformer_attention_mask is None:
                qformer_attention_mask = torch.ones_like(qformer_input_ids)
            mask = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long), qformer_attention_mask.long()], dim=1)
            out = self.qformer(input_ids=qformer_input_ids, attention_mask=mask, query_embeds=queries,
                               encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, return_dict=True)
        query_output = out.last_hidden_state[:, :n_queries, :]
        return self.language_projection(query_output.to(self.language_projection.weight.dtype))
