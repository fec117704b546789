"""The `idefics2-8b` preset: HuggingFaceM4/idefics2-8b's published shapes with random weights. SigLIP-so400m/14 at
980 px (1152 wide, 27 layers, 16 heads, MLP 4304), a Perceiver resampler of 64 latents (depth 3, 16 heads of 96, 4
KV heads), Mistral-7B (4096 wide, 32 layers, 32 heads, 8 KV heads, MLP 14336, vocab 32003 with
<fake_token_around_image> 32000, <image> 32001, <end_of_utterance> 32002, sliding window 4096), processor
shortest_edge 378 / longest_edge 980, 64 image tokens per image. The shapes are the published config's as quoted
from memory of the Hub files (not read offline here); the tokenizer is byte-level BPE, not Mistral's SentencePiece."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tokenizers import SMOLVLM_TEMPLATE, bpe_with_pinned_ids, wrap

IDEFICS2_SPECIAL_IDS = {0: "<unk>", 1: "<s>", 2: "</s>", 32000: "<fake_token_around_image>", 32001: "<image>",
                        32002: "<end_of_utterance>"}
IDEFICS2_TEMPLATE = SMOLVLM_TEMPLATE.removeprefix("<|im_start|>")  # "User:<image>...<end_of_utterance>\nAssistant:"


@dataclass(frozen=True)
class Idefics2Shape:
    text_hidden: int = 4096
    text_layers: int = 32
    text_heads: int = 32
    text_kv_heads: int = 8
    text_mlp: int = 14336
    vision_hidden: int = 1152
    vision_layers: int = 27
    vision_heads: int = 16
    vision_mlp: int = 4304
    patch: int = 14
    image: int = 980
    latents: int = 64
    resampler_depth: int = 3
    resampler_heads: int = 16
    resampler_head_dim: int = 96
    resampler_kv_heads: int = 4
    shortest_edge: int = 378
    vocab: int = 32003
    rope_theta: float = 10000.0
    context: int = 32768
    sliding_window: int = 4096


def build_idefics2(shape: Idefics2Shape, out: Path, corpus: list[str]) -> Path:
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor, MistralConfig
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tokenizer = wrap(bpe_with_pinned_ids(corpus, shape.vocab, IDEFICS2_SPECIAL_IDS, n_merges=1000),
                     bos="<s>", eos="</s>", unk="<unk>", chat_template=IDEFICS2_TEMPLATE)
    vision = Idefics2VisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
                                  num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                                  image_size=shape.image, patch_size=shape.patch)
    perceiver = dict(resampler_n_latents=shape.latents, resampler_depth=shape.resampler_depth,
                     resampler_n_heads=shape.resampler_heads, resampler_head_dim=shape.resampler_head_dim,
                     num_key_value_heads=shape.resampler_kv_heads, hidden_size=shape.text_hidden, rms_norm_eps=1e-5)
    text = MistralConfig(vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_mlp,
                         num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                         num_key_value_heads=shape.text_kv_heads, max_position_embeddings=shape.context,
                         rms_norm_eps=1e-5, rope_theta=shape.rope_theta, sliding_window=shape.sliding_window,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text, image_token_id=32001,
                            tie_word_embeddings=False)
    Idefics2ForConditionalGeneration(config).eval().save_pretrained(out)
    image_processor = Idefics2ImageProcessorPil(size={"shortest_edge": shape.shortest_edge, "longest_edge": shape.image},
                                                do_image_splitting=False)
    Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=shape.latents,
                      chat_template=IDEFICS2_TEMPLATE).save_pretrained(out)
    return out
