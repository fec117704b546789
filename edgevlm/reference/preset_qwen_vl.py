"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL presets: the public checkpoints' shapes (config.json) with random weights, a
native-resolution ViT with 2x2 merging and a Qwen2/Qwen3 decoder with M-RoPE. The special tokens sit at their real
ids; the tokenizer is byte-level BPE built locally."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .preset_shape import DecoderShape
from .tokenizers import bpe_with_pinned_ids, wrap


@dataclass(frozen=True)
class QwenVLShape(DecoderShape):
    """Qwen2-VL / Qwen2.5-VL shapes (Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct config.json): a
    native-resolution ViT (14-px patches, 2x2 merge) + a Qwen2 decoder with M-RoPE. `version` "2.5": SwiGLU
    vision MLP, RMSNorm, window attention (112 px) except on the full-attention blocks."""

    version: str = "2"
    vision_hidden: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    vision_mlp: int = 5120  # 2: embed_dim * mlp_ratio 4; 2.5: intermediate_size
    vocab: int = 151936
    rope_theta: float = 1000000.0
    context: int = 32768
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tied: bool = True
    max_pixels: int = 12845056  # the processor's default: 16,384 merged tokens


@dataclass(frozen=True)
class Qwen3VLShape(DecoderShape):
    """Qwen3-VL shapes (Qwen/Qwen3-VL-2B-Instruct config.json): a native-resolution ViT (16-px patches, a 48 x 48
    learned position table, 2x2 merge, DeepStack mergers after blocks 5, 11, 17) + a Qwen3 decoder (head_dim 128,
    QK-norm) with interleaved M-RoPE [24, 20, 20]."""

    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    deepstack: tuple[int, ...] = (5, 11, 17)
    position_embeddings: int = 2304
    head_dim: int = 128
    vocab: int = 151936
    rope_theta: float = 5000000.0
    context: int = 262144
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    tied: bool = True
    max_pixels: int = 16777216  # preprocessor_config.json size.longest_edge
    min_pixels: int = 65536  # size.shortest_edge


# Qwen2-VL's special tokens at their ids in its vocabulary (151936 entries with padding)
QWEN2VL_SPECIAL_IDS = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151652: "<|vision_start|>",
    151653: "<|vision_end|>", 151654: "<|vision_pad|>", 151655: "<|image_pad|>", 151656: "<|video_pad|>",
}

# Qwen2-VL-2B-Instruct's chat template (tokenizer_config.json), without the video branch
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != "
    "'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in "
    "content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_vl(shape: QwenVLShape, out: Path, corpus: list[str], single_tile: bool) -> Path:
    """single_tile: max_pixels 448x448 (256 image tokens), for one-image benchmarks at a fixed size."""
    import json

    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = wrap(bpe_with_pinned_ids(corpus, shape.vocab, QWEN2VL_SPECIAL_IDS, n_merges=1000, pre="qwen2"),
                     bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN2VL_TEMPLATE)
    text = dict(vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_mlp,
                num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                num_key_value_heads=shape.text_kv_heads, max_position_embeddings=shape.context, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": list(shape.mrope_section),
                                 "rope_theta": shape.rope_theta},
                tie_word_embeddings=shape.tied, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    if shape.version == "2":
        vision = dict(depth=shape.vision_layers, embed_dim=shape.vision_hidden, hidden_size=shape.text_hidden,
                      num_heads=shape.vision_heads, mlp_ratio=shape.vision_mlp // shape.vision_hidden, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        prefix = "Qwen2VL"
    else:
        vision = dict(depth=shape.vision_layers, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
                      num_heads=shape.vision_heads, out_hidden_size=shape.text_hidden, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31])
        prefix = "Qwen2_5_VL"
    config = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text,
                                                      tie_word_embeddings=shape.tied, **ids)
    getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval().save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=448 * 448 if single_tile else shape.max_pixels,
                             patch_size=14, temporal_patch_size=2, merge_size=2).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN2VL_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    return out


def build_qwen3_vl(shape: Qwen3VLShape, out: Path, corpus: list[str], single_tile: bool) -> Path:
    """single_tile: max_pixels 512x512 (256 image tokens), for one-image benchmarks at a fixed size."""
    import json

    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = wrap(bpe_with_pinned_ids(corpus, shape.vocab, QWEN2VL_SPECIAL_IDS, n_merges=1000, pre="qwen2"),
                     bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=QWEN2VL_TEMPLATE)
    text = dict(vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_mlp,
                num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                num_key_value_heads=shape.text_kv_heads, head_dim=shape.head_dim, max_position_embeddings=shape.context,
                rms_norm_eps=1e-6, tie_word_embeddings=shape.tied, bos_token_id=151643, eos_token_id=151645,
                rope_parameters={"rope_type": "default", "mrope_section": list(shape.mrope_section),
                                 "mrope_interleaved": True, "rope_theta": shape.rope_theta})
    vision = dict(depth=shape.vision_layers, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
                  num_heads=shape.vision_heads, out_hidden_size=shape.text_hidden, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=shape.position_embeddings,
                  deepstack_visual_indexes=list(shape.deepstack))
    ids = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    config = Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=shape.tied, **ids)
    Qwen3VLForConditionalGeneration(config).eval().save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=shape.min_pixels, max_pixels=512 * 512 if single_tile else shape.max_pixels,
                             patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN2VL_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}))
    return out
