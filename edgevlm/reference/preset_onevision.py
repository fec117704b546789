"""The `llava-onevision-0.5b` preset: llava-hf/llava-onevision-qwen2-0.5b-ov-hf's published shapes with random
weights. SigLIP-so400m/14 at 384 (1152 wide, 26 layers as the checkpoint keeps them, 16 heads, MLP 4304: 27 x 27 =
729 rows per view), a 2-layer GELU projector (1152 -> 896 -> 896), the image_newline, a Qwen2-0.5B decoder (896
wide, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 152000 with <image> 151646 and <video> 151647, rope_theta
1e6, 32768 positions, tied head), anyres_max_9 over 1..6 x 1..6 tiles of 384 px, SigLIP's 0.5 mean/std. The shapes
are the published config's as remembered (the Hub files were not readable offline here); the tokenizer is a small
byte-level BPE carrying the special tokens at their real ids, not Qwen2's vocabulary."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tokenizers import CHATML_TEMPLATE, bpe_with_pinned_ids, wrap

ONEVISION_SPECIAL_IDS = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<image>",
                         151647: "<video>"}
# the checkpoint's template in short: ChatML, an image item is "<image>" (then the user's text)
ONEVISION_TEMPLATE = CHATML_TEMPLATE


@dataclass(frozen=True)
class OnevisionShape:
    text_hidden: int = 896
    text_layers: int = 24
    text_heads: int = 14
    text_kv_heads: int = 2
    text_mlp: int = 4864
    vision_hidden: int = 1152
    vision_layers: int = 26
    vision_heads: int = 16
    vision_mlp: int = 4304
    patch: int = 14
    image: int = 384
    max_grid: int = 6  # pinpoints: 1..max_grid x 1..max_grid tiles
    aspect_ratio: str = "anyres_max_9"
    vocab: int = 152000
    rope_theta: float = 1_000_000.0
    context: int = 32768
    tied: bool = True

    @property
    def pinpoints(self) -> list[list[int]]:
        return [[self.image * r, self.image * c] for r in range(1, self.max_grid + 1) for c in range(1, self.max_grid + 1)]


def files(shape: OnevisionShape) -> tuple[dict, dict]:
    """(config.json, processor config) as build_onevision writes them (the planner reads these without torch)."""
    vision = dict(model_type="siglip_vision_model", hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
                  num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                  image_size=shape.image, patch_size=shape.patch, vision_use_head=False)
    config = {"architectures": ["LlavaOnevisionForConditionalGeneration"], "vision_config": vision,
              "text_config": {"model_type": "qwen2"}, "image_token_index": 151646, "video_token_index": 151647,
              "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
              "image_grid_pinpoints": shape.pinpoints, "vision_aspect_ratio": shape.aspect_ratio}
    processor = {"size": {"height": shape.image, "width": shape.image}, "image_grid_pinpoints": shape.pinpoints,
                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3,
                 "num_image_tokens": (shape.image // shape.patch) ** 2, "vision_aspect_ratio": shape.aspect_ratio}
    return config, processor


def build_onevision(shape: OnevisionShape, out: Path, corpus: list[str]) -> Path:
    import json

    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    tokenizer = wrap(bpe_with_pinned_ids(corpus, shape.vocab, ONEVISION_SPECIAL_IDS, n_merges=1000, pre="qwen2"),
                     bos="<|endoftext|>", eos="<|im_end|>", pad="<|endoftext|>", chat_template=ONEVISION_TEMPLATE)
    config_json, processor = files(shape)
    text = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_mlp,
                       num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                       num_key_value_heads=shape.text_kv_heads, max_position_embeddings=shape.context,
                       rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
                       tie_word_embeddings=shape.tied, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    vision = dict(config_json["vision_config"])
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text.to_dict(), image_token_id=151646,
                                  video_token_id=151647, image_grid_pinpoints=shape.pinpoints,
                                  vision_aspect_ratio=shape.aspect_ratio, tie_word_embeddings=shape.tied)
    LlavaOnevisionForConditionalGeneration(config).eval().save_pretrained(out)
    LlavaOnevisionImageProcessorPil(size=processor["size"], image_grid_pinpoints=shape.pinpoints,
                                    image_mean=processor["image_mean"], image_std=processor["image_std"]
                                    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(ONEVISION_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({  # the processor class needs torchvision (video)
        "num_image_tokens": processor["num_image_tokens"], "vision_feature_select_strategy": "full",
        "vision_aspect_ratio": shape.aspect_ratio, "processor_class": "LlavaOnevisionProcessor"}))
    return out
