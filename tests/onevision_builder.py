"""A tiny LLaVA-OneVision checkpoint built in the test session (random weights, nothing downloaded), and transformers'
own processor for it. SigLIP 32-px tiles of 8-px patches (4 x 4 = 16 rows per view), pinpoints up to 4 x 4 tiles,
"anyres_max_9" (a 4 x 4 grid's 16 x 16 features pool to 12 x 12), a Qwen2 decoder at unit weight scale with random
q/k/v biases and a random image_newline, so that the image, its newlines and its unpadding all move the tokens."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from builders import images_only, qwen2_tokenizer, text_config, to_unit_scale

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# llava-onevision-qwen2-*-ov-hf's template in short: ChatML, each image "<image>\n" before the text
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TILE, PATCH = 32, 8
PINPOINTS = [[TILE * r, TILE * c] for r in range(1, 5) for c in range(1, 5)]


def build_onevision(out: Path, seed: int = 0) -> Path:
    # not builders.build_llava(decoder="qwen2"): OneVision's own config and processor (anyres pinpoints), Qwen2's
    # tokenizer without BOS, the whole decoder at unit scale, and the processor's config written by hand
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = qwen2_tokenizer(SPECIALS, TEMPLATE)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=TILE, patch_size=PATCH, vision_use_head=False)
    text = text_config(len(tokenizer), "qwen2", bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, max_position_embeddings=1024)
    config = LlavaOnevisionConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                  video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=PINPOINTS, vision_aspect_ratio="anyres_max_9")
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    # at HF's init (std 0.02) attention is nearly uniform and a wrong row order moves the logits by ~1e-3 only
    to_unit_scale([*model.model.language_model.named_parameters(), ("lm_head", model.lm_head.weight)], bias_std=0.5)
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 1.0)
    model.save_pretrained(out)
    LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS
                                    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    # the processor class needs torchvision (video) to be built: its own config is written by hand
    (out / "processor_config.json").write_text(json.dumps({
        "num_image_tokens": (TILE // PATCH) ** 2, "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": "anyres_max_9", "processor_class": "LlavaOnevisionProcessor"}))
    return out


def hf_processor(path: Path):
    """transformers' LlavaOnevisionProcessor for images (builders.images_only: no torchvision video processor)."""
    from transformers import AutoTokenizer, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    return images_only(LlavaOnevisionProcessor)(
        image_processor=LlavaOnevisionImageProcessorPil.from_pretrained(path),
        tokenizer=AutoTokenizer.from_pretrained(path), video_processor=None, num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=TEMPLATE)
