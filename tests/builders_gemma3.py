"""A tiny Gemma 3 checkpoint built in the test session: real transformers classes and processor, random weights made
discriminative (FACTS.md: the projector and soft-embedding norm start at zero)."""
from __future__ import annotations

from pathlib import Path

import torch

from builders import CORPUS, PARAGRAPHS
# Gemma 3's chat template (the Hub's, without the system-message branch): <bos>, turns as <start_of_turn>role\n ...
# <end_of_turn>\n, each image as <start_of_image>, which the processor expands (Gemma3Processor.full_image_sequence)
from edgevlm.reference.preset_gemma3 import GEMMA3_TEMPLATE
from edgevlm.reference.tokenizers import train_bpe, wrap


GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                   "<image_soft_token>"]


def gemma3_tokenizer():
    tokenizer = wrap(train_bpe(CORPUS + PARAGRAPHS, 400, GEMMA3_SPECIALS), bos="<bos>", eos="<eos>", pad="<pad>",
                     chat_template=GEMMA3_TEMPLATE, boi_token="<start_of_image>", eoi_token="<end_of_image>",
                     image_token="<image_soft_token>")
    return tokenizer


def build_gemma3(out: Path, seed: int = 0, sliding_window: int = 128, pan_and_scan: bool = False,
                 layers: int = 6, image_size: int = 64, global_rope_factor: float | None = None) -> Path:
    """Gemma 3 at toy size: SigLIP (patch 4: a 16x16 patch grid) -> 4x4 avg pool -> soft-embedding RMSNorm ->
    linear projector (16 image tokens), a Gemma 3 decoder of `layers` layers (pattern 6: five local layers with a
    `sliding_window` window, then a global one; head_dim 16, QK-norm, sandwich norms, tied head). Made discriminative
    (FACTS.md): the projector and soft-embedding norm start at zero and are randomised; the text weights go to unit
    scale and the final norm is sharpened so that greedy tokens follow the image. global_rope_factor: linear RoPE
    scaling on the global layers (the published 4B and larger use 8)."""
    import json

    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = gemma3_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA3_SPECIALS}
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=4, vision_use_head=False)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                max_position_embeddings=1024, rms_norm_eps=1e-6, sliding_window=sliding_window,
                bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"],
                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6} if not global_rope_factor
                                 else {"rope_type": "linear", "factor": global_rope_factor, "rope_theta": 1e6},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=16,
                          boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        projector = model.model.multi_modal_projector
        projector.mm_input_projection_weight.normal_(0.0, 3 * 32 ** -0.5)
        projector.mm_soft_emb_norm.weight.normal_(0.0, 0.5)
        for name, param in model.model.language_model.named_parameters():
            if "post_" in name or "q_norm" in name or "k_norm" in name:
                # sandwich norms after each block: block outputs outweigh the embedding; QK-norms: sharp attention,
                # so that which rows an image row may see (bidirectional or causal) shows in the tokens
                param.normal_(1.0, 0.3)
            elif "norm" in name:
                param.normal_(0.0, 0.3)
            elif param.ndim == 2:  # embeddings at 1/sqrt(hidden): unit scale once Gemma multiplies by sqrt(hidden)
                param.normal_(0.0, param.shape[1] ** -0.5)
        # tied head: without a sharp final norm the last token's own embedding wins and one token repeats
        model.model.language_model.norm.weight.normal_(4.0, 1.0)
    model.save_pretrained(out)
    Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, resample=2, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3, do_pan_and_scan=pan_and_scan, pan_and_scan_min_crop_size=16,
                            pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(GEMMA3_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": 16, "processor_class": "Gemma3Processor"}))
    return out


def gemma3_processor(path: Path):
    from transformers import AutoImageProcessor, AutoTokenizer, Gemma3Processor

    return Gemma3Processor(image_processor=AutoImageProcessor.from_pretrained(path),
                           tokenizer=AutoTokenizer.from_pretrained(path), chat_template=GEMMA3_TEMPLATE,
                           image_seq_length=16)
