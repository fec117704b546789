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


def load_siglip_gemma(path, config_json: dict, dtype: str, model_class, describe, causal_decoder: bool = False):
    """The load() of Gemma 3 and PaliGemma, which differ only in their HF class and description: both split a SigLIP
    tower + projector (Gemma3Vision) from a Gemma decoder. causal_decoder: PaliGemma's config marks its text model
    bidirectional, which the decoder alone must not be."""
    from transformers import AutoTokenizer

    from . import base
    from .spec import Vocabulary

    weights = base.check_files(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = describe(config_json, base.read_processor_config(path), Vocabulary.from_tokenizer(tokenizer))
    hf_model = model_class.from_pretrained(path, dtype=base.torch_dtype(dtype)).eval()
    decoder = base.decoder_from(hf_model.config.text_config, hf_model.model.language_model, hf_model.lm_head)
    # a non-persistent buffer (sqrt(hidden)), not in the state dict: the meta-device build left it empty
    embed = decoder.model.embed_tokens
    embed.embed_scale = torch.tensor(embed.scalar_embed_scale)
    if causal_decoder:
        # PaliGemmaConfig sets use_bidirectional_attention on its text config (HF's VL model always passes its own
        # masks); the decoder alone must be causal wherever no mask is given (the backends give the prefix's)
        decoder.config.use_bidirectional_attention = False
        for layer in decoder.model.layers:
            layer.self_attn.is_causal = True
    # tower -> last hidden state -> projector: PaliGemma's split has Gemma 3's submodule names (no pooling there)
    return base.loaded(spec, path, config_json, hf_model, tokenizer, weights, Gemma3Vision(hf_model).eval(), decoder)
