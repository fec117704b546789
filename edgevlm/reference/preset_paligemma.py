"""The `paligemma2-3b-448` preset: google/paligemma2-3b-pt-448's shapes with random weights. SigLIP-so400m/14 at
448 px (1152 wide, 27 layers, 16 heads, MLP 4304: 32 x 32 = 1024 image tokens), a linear projector to 2304, and a
Gemma 2 2B decoder (2304 wide, 26 layers, 8 heads of 256, 4 KV heads, MLP 9216, query_pre_attn_scalar 256,
attention / final logit soft-capping 50 / 30, sliding window 4096 on the even layers, RoPE base 10k, 8192 positions,
tied head). Vocabulary 257216 (Gemma's 256000 + 1024 <locNNNN> + 128 <segNNN> = 257152 tokens, then <image> at
257152, padded to a multiple of 64). The shapes are the published config.json's as remembered (it could not be read
offline here); the tokenizer is byte-level BPE, not Gemma's SentencePiece: only the shapes matter."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tokenizers import bpe_with_pinned_ids, wrap


def special_ids(shape: "PaliGemmaShape") -> dict[int, str]:
    return {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", shape.image_token_id: "<image>"}


# Gemma3Shape's tower fields again, on purpose: each preset's defaults are its own checkpoint's published config
@dataclass(frozen=True)
class PaliGemmaShape:
    text_hidden: int = 2304
    text_layers: int = 26
    text_heads: int = 8
    text_kv_heads: int = 4
    text_mlp: int = 9216
    head_dim: int = 256
    vision_hidden: int = 1152
    vision_layers: int = 27
    vision_heads: int = 16
    vision_mlp: int = 4304
    patch: int = 14
    image: int = 448
    vocab: int = 257216
    rope_theta: float = 10000.0
    sliding_window: int = 4096
    context: int = 8192
    tied: bool = True
    image_token_id: int = 257152


def files(shape: PaliGemmaShape) -> tuple[dict, dict]:
    """(config.json, processor config) as build_paligemma writes them."""
    vision = {"model_type": "siglip_vision_model", "hidden_size": shape.vision_hidden,
              "intermediate_size": shape.vision_mlp, "num_hidden_layers": shape.vision_layers,
              "num_attention_heads": shape.vision_heads, "image_size": shape.image, "patch_size": shape.patch,
              "projection_dim": shape.text_hidden, "vision_use_head": False}
    text = {"model_type": "gemma2", "hidden_size": shape.text_hidden, "num_hidden_layers": shape.text_layers,
            "num_attention_heads": shape.text_heads, "num_key_value_heads": shape.text_kv_heads,
            "head_dim": shape.head_dim, "intermediate_size": shape.text_mlp, "vocab_size": shape.vocab,
            "query_pre_attn_scalar": shape.head_dim, "sliding_window": shape.sliding_window,
            "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
            "max_position_embeddings": shape.context, "rms_norm_eps": 1e-6, "bos_token_id": 2, "eos_token_id": 1,
            "pad_token_id": 0, "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta}}
    config = {"architectures": ["PaliGemmaForConditionalGeneration"], "vision_config": vision, "text_config": text,
              "image_token_index": shape.image_token_id, "projection_dim": shape.text_hidden, "hidden_size": shape.text_hidden}
    n_tokens = (shape.image // shape.patch) ** 2
    processor = {"size": {"height": shape.image, "width": shape.image}, "resample": 3, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3, "image_seq_length": n_tokens}
    return config, processor


def build_paligemma(shape: PaliGemmaShape, out: Path, corpus: list[str]) -> Path:
    import json

    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = wrap(bpe_with_pinned_ids(corpus, shape.vocab, special_ids(shape), n_merges=1000), bos="<bos>",
                     eos="<eos>", pad="<pad>", chat_template=None, image_token="<image>")
    config_json, processor = files(shape)
    strip = lambda d: {k: v for k, v in d.items() if k != "model_type"}  # noqa: E731
    config = PaliGemmaConfig(vision_config=strip(config_json["vision_config"]),
                             text_config={**config_json["text_config"]}, image_token_index=shape.image_token_id,
                             projection_dim=shape.text_hidden, hidden_size=shape.text_hidden)
    PaliGemmaForConditionalGeneration(config).eval().save_pretrained(out)
    image_processor = SiglipImageProcessorPil(size=processor["size"], resample=3, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3)
    image_processor.image_seq_length = processor["image_seq_length"]
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": processor["image_seq_length"],
                                                           "processor_class": "PaliGemmaProcessor"}))
    return out
