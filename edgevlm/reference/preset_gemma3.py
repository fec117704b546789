"""The Gemma 3 preset: google/gemma-3-4b-it's published shapes (config.json) with random weights. SigLIP-so400m/14 at
896 (1152 wide, 27 layers, 16 heads, MLP 4304: 64x64 patches pooled 4x4 to 256 image tokens) + a Gemma 3 decoder
(2560 wide, 34 layers, 8 heads of 256, 4 KV heads, MLP 10240, vocabulary 262208; local layers with a 1024-position
window and RoPE base 10k, every sixth layer global with base 1e6 and linear scaling x8; tied head). The special
tokens sit at their real ids. A Gemma 3 1B is text-only (Gemma3ForCausalLM): planning or building it is refused."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tokenizers import bpe_with_pinned_ids, wrap

GEMMA3_SPECIAL_IDS = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>",
                      255999: "<start_of_image>", 256000: "<end_of_image>", 262144: "<image_soft_token>"}
TEXT_ONLY_PRESETS = {"gemma3-1b": "Gemma3ForCausalLM"}
# the chat template of the published checkpoints, less its system-message branch (tests/builders_gemma3.py uses it too)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}<start_of_turn>{{ role }}\n{% if message['content'] is string %}"
    "{{ message['content'] | trim }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<start_of_image>{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class Gemma3Shape:
    text_hidden: int = 2560
    text_layers: int = 34
    text_heads: int = 8
    text_kv_heads: int = 4
    text_mlp: int = 10240
    head_dim: int = 256
    vision_hidden: int = 1152
    vision_layers: int = 27
    vision_heads: int = 16
    vision_mlp: int = 4304
    patch: int = 14
    image: int = 896
    tokens_per_image: int = 256
    vocab: int = 262208
    rope_theta: float = 1_000_000.0
    rope_local_theta: float = 10_000.0
    rope_scaling_factor: float = 8.0
    sliding_window: int = 1024
    context: int = 131072
    tied: bool = True


def text_config(shape: Gemma3Shape) -> dict:
    return {"model_type": "gemma3_text", "hidden_size": shape.text_hidden, "num_hidden_layers": shape.text_layers,
            "num_attention_heads": shape.text_heads, "num_key_value_heads": shape.text_kv_heads,
            "head_dim": shape.head_dim, "intermediate_size": shape.text_mlp, "vocab_size": shape.vocab,
            "query_pre_attn_scalar": shape.head_dim, "sliding_window": shape.sliding_window,
            "max_position_embeddings": shape.context, "rms_norm_eps": 1e-6,
            "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": shape.rope_scaling_factor,
                                                   "rope_theta": shape.rope_theta},
                                "sliding_attention": {"rope_type": "default", "rope_theta": shape.rope_local_theta}}}


def files(shape: Gemma3Shape) -> tuple[dict, dict]:
    """(config.json, processor config) as build_gemma3 writes them."""
    vision = {"model_type": "siglip_vision_model", "hidden_size": shape.vision_hidden,
              "intermediate_size": shape.vision_mlp, "num_hidden_layers": shape.vision_layers,
              "num_attention_heads": shape.vision_heads, "image_size": shape.image, "patch_size": shape.patch,
              "vision_use_head": False}
    config = {"architectures": ["Gemma3ForConditionalGeneration"], "vision_config": vision,
              "text_config": text_config(shape), "mm_tokens_per_image": shape.tokens_per_image,
              "boi_token_index": 255999, "eoi_token_index": 256000, "image_token_index": 262144}
    processor = {"size": {"height": shape.image, "width": shape.image}, "resample": 2, "image_mean": [0.5] * 3,
                 "image_std": [0.5] * 3, "image_seq_length": shape.tokens_per_image}
    return config, processor


def build_gemma3(shape: Gemma3Shape, out: Path, corpus: list[str]) -> Path:
    import json

    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = wrap(bpe_with_pinned_ids(corpus, shape.vocab, GEMMA3_SPECIAL_IDS, n_merges=1000), bos="<bos>",
                     eos="<eos>", pad="<pad>", chat_template=GEMMA3_TEMPLATE, boi_token="<start_of_image>",
                     eoi_token="<end_of_image>", image_token="<image_soft_token>")
    config_json, processor = files(shape)
    text = {k: v for k, v in config_json["text_config"].items() if k != "model_type"}
    config = Gemma3Config(vision_config={k: v for k, v in config_json["vision_config"].items() if k != "model_type"},
                          text_config=text, mm_tokens_per_image=shape.tokens_per_image, boi_token_index=255999,
                          eoi_token_index=256000, image_token_index=262144)
    model = Gemma3ForConditionalGeneration(config).eval()
    # transformers initialises the projector to zero: every image would embed to zeros (the decoder ignores it and
    # the int8 encoder's cosine to fp32 has nothing to measure, so export refuses it); the published one is not zero
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, config.text_config.initializer_range)
    model.save_pretrained(out)
    Gemma3ImageProcessorPil(size=processor["size"], resample=2, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(GEMMA3_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": shape.tokens_per_image,
                                                           "processor_class": "Gemma3Processor"}))
    return out
