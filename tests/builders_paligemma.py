"""A tiny PaliGemma 2 built in the test session: real transformers classes and processor, random weights."""
from __future__ import annotations

from pathlib import Path

import torch

from builders import CORPUS
from edgevlm.reference.tokenizers import train_bpe, wrap

PALIGEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]


def paligemma_tokenizer():
    return wrap(train_bpe(CORPUS, 400, PALIGEMMA_SPECIALS), bos="<bos>", eos="<eos>", pad="<pad>",
                image_token="<image>")


def build_paligemma(out: Path, seed: int = 0, sliding_window: int = 256, image_size: int = 32, weight_scale: float = 2.5,
                    embed_scale: float = 0.5, post_norm: float = 1.5, final_norm: float = 6.0) -> Path:
    """PaliGemma 2 at toy size: SigLIP (patch 4: an 8 x 8 grid, 64 image tokens) -> linear projector -> a Gemma 2
    decoder of 4 layers (local, global, local, global; head_dim 16; soft-capping 50 / 30; tied head). Made
    discriminative (FACTS.md): the projector is randomised at unit scale, the text weights go to unit scale, the
    sandwich norms favour the blocks and the final norm is sharpened (the tied head otherwise repeats one token), so
    that the greedy tokens follow the image and the prefix-LM mask."""
    import json

    from transformers import Gemma2Config, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = paligemma_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in PALIGEMMA_SPECIALS}
    n_tokens = (image_size // 4) ** 2
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=4, vision_use_head=False)
    text = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        max_position_embeddings=512, rms_norm_eps=1e-6, sliding_window=sliding_window,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"])
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=ids["<image>"],
                             projection_dim=64, hidden_size=64)
    model = PaliGemmaForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.linear.weight.normal_(0.0, 3 * 32 ** -0.5)
        for name, param in model.model.language_model.named_parameters():
            if "post_" in name:  # sandwich norms after each block: block outputs outweigh the embedding
                param.normal_(post_norm, 0.3)
            elif "norm" in name:
                param.normal_(0.0, 0.3)
            elif "embed_tokens" in name:
                param.normal_(0.0, embed_scale * param.shape[1] ** -0.5)
            elif param.ndim == 2:  # unit scale: q/k sharp enough that which rows a row may see shows in the tokens
                param.normal_(0.0, weight_scale * param.shape[1] ** -0.5)
        model.model.language_model.norm.weight.normal_(final_norm, 1.0)  # tied head: a sharp final norm
    model.save_pretrained(out)
    processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, resample=3,
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.image_seq_length = n_tokens
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": n_tokens,
                                                           "processor_class": "PaliGemmaProcessor"}))
    return out


def paligemma_processor(path: Path):
    from transformers import AutoImageProcessor, AutoTokenizer, PaliGemmaProcessor

    image_processor = AutoImageProcessor.from_pretrained(path)
    image_processor.image_seq_length = (image_processor.size["height"] // 4) ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(path))
