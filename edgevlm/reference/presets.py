"""Architecture presets: random weights with the exact shapes of public models, for speed and memory figures
(which do not depend on weight values). Nothing is downloaded: the tokenizer is built locally and carries the
public model's special tokens at their real ids."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .preset_gemma3 import Gemma3Shape
from .preset_idefics2 import Idefics2Shape
from .preset_onevision import OnevisionShape
from .preset_instructblip import InstructBlipShape
from .preset_paligemma import PaliGemmaShape
from .preset_qwen_vl import Qwen3VLShape, QwenVLShape
from .preset_shape import DecoderShape
from .tokenizers import SMOLVLM_TEMPLATE, bpe_with_pinned_ids, wrap


@dataclass(frozen=True)
class SmolVLMShape(DecoderShape):
    """Idefics3-architecture shapes (HuggingFaceTB/SmolVLM-*-Instruct and SmolVLM2-* config.json)."""

    vision_hidden: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    patch: int = 16
    image: int = 512
    scale_factor: int = 4
    vocab: int = 49280
    rope_theta: float = 100000.0
    context: int = 8192
    architecture: str = "idefics3"  # "smolvlm": SmolVLM2's SmolVLMForConditionalGeneration
    tied: bool = True


@dataclass(frozen=True)
class InternVLShape(DecoderShape):
    """InternVL3 -hf shapes (OpenGVLab/InternVL3-*-hf config.json): InternViT + pixel shuffle 0.5 + Qwen2."""

    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    patch: int = 14
    image: int = 448
    vocab: int = 151674
    rope_theta: float = 1000000.0
    context: int = 32768
    tied: bool = False
    max_patches: int = 12


@dataclass(frozen=True)
class LlavaShape(DecoderShape):
    """LLaVA-1.5 shapes (llava-hf/llava-1.5-*-hf config.json): CLIP ViT-L/14 at 336, 2-layer GELU projector, Llama-2."""

    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    patch: int = 14
    image: int = 336
    vocab: int = 32064
    rope_theta: float = 10000.0
    context: int = 4096


PRESETS = {
    # SigLIP-B/16 512 + SmolLM2-135M
    "smolvlm-256m": SmolVLMShape(text_hidden=576, text_layers=30, text_heads=9, text_kv_heads=3, text_mlp=1536),
    # SigLIP-B/16 512 + SmolLM2-360M
    "smolvlm-500m": SmolVLMShape(text_hidden=960, text_layers=32, text_heads=15, text_kv_heads=5, text_mlp=2560),
    # SmolVLM2-256M-Video-Instruct / -500M-Video-Instruct: the SmolVLM shapes above (their config.json as quoted by
    # third-party copies; the official files were not readable offline), with an untied lm_head, which is what
    # makes the published 256M (tied, the total is 228M)
    "smolvlm2-256m": SmolVLMShape(text_hidden=576, text_layers=30, text_heads=9, text_kv_heads=3, text_mlp=1536,
                                  architecture="smolvlm", tied=False),
    "smolvlm2-500m": SmolVLMShape(text_hidden=960, text_layers=32, text_heads=15, text_kv_heads=5, text_mlp=2560,
                                  architecture="smolvlm", tied=False),
    # SmolVLM2-2.2B-Instruct: hidden 2048, 24 layers, head_dim 64, MLP 8192, context 8192, scale factor 3 and image
    # token 49190 from its config.json; SigLIP-so400m/14 at 384 (1152 wide, 27 layers, 16 heads, MLP 4304: 81 tokens
    # per tile) and SmolLM2-1.7B's 32 heads without GQA and rope_theta 130000 are that decoder's and tower's
    # published shapes, not read from this checkpoint's own file
    "smolvlm2-2.2b": SmolVLMShape(text_hidden=2048, text_layers=24, text_heads=32, text_kv_heads=32, text_mlp=8192,
                                  vision_hidden=1152, vision_layers=27, vision_heads=16, vision_mlp=4304, patch=14,
                                  image=384, scale_factor=3, rope_theta=130000.0, architecture="smolvlm", tied=False),
    # InternVL3-1B-hf: InternViT-300M-448px (1024 wide, 24 layers, 16 heads, MLP 4096, patch 14) + Qwen2.5-0.5B-shaped
    # decoder (896 wide, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151674, rope_theta 1e6, context 32768)
    "internvl3-1b": InternVLShape(text_hidden=896, text_layers=24, text_heads=14, text_kv_heads=2, text_mlp=4864),
    # llava-1.5-7b-hf: CLIP ViT-L/14-336 + Llama-2-7B (4096 wide, 32 layers, 32 heads, MLP 11008, vocab 32064 with
    # <image> at 32000). The tokenizer here is byte-level BPE, not Llama-2's SentencePiece: only the shapes matter
    "llava-1.5-7b": LlavaShape(text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32, text_mlp=11008),
    # Qwen2-VL-2B-Instruct: ViT 32 x 1280 (675M) + Qwen2-1.5B (1536 wide, 28 layers, 12 heads, 2 KV heads), tied
    "qwen2-vl-2b": QwenVLShape(text_hidden=1536, text_layers=28, text_heads=12, text_kv_heads=2, text_mlp=8960),
    # Qwen2.5-VL-3B-Instruct: ViT 32 x 1280 (SwiGLU 3420, windows, full attention on 7/15/23/31) + Qwen2.5-3B
    "qwen2.5-vl-3b": QwenVLShape(text_hidden=2048, text_layers=36, text_heads=16, text_kv_heads=2, text_mlp=11008,
                                 version="2.5", vision_mlp=3420, context=128000),
    # Qwen3-VL-2B-Instruct: ViT 24 x 1024 (MLP 4096, 16 heads) + a Qwen3-1.7B-shaped decoder (2048 wide, 28 layers,
    # 16 heads, 8 KV heads, head_dim 128, MLP 6144), tied, rope_theta 5e6, 262,144 positions; shapes as its published
    # config.json states them (quoted here from the public model card's config, not read offline)
    "qwen3-vl-2b": Qwen3VLShape(text_hidden=2048, text_layers=28, text_heads=16, text_kv_heads=8, text_mlp=6144),
    # gemma-3-4b-it (preset_gemma3.py)
    "gemma3-4b": Gemma3Shape(),
    # Idefics2-8b: SigLIP-so400m/14 at 980 + Perceiver resampler (64 latents) + Mistral-7B (preset_idefics2.py)
    "idefics2-8b": Idefics2Shape(),
    # llava-onevision-qwen2-0.5b-ov-hf: SigLIP-so400m/14 at 384 + MLP + Qwen2-0.5B, anyres_max_9 (preset_onevision.py)
    "llava-onevision-0.5b": OnevisionShape(),
    # InstructBLIP-Vicuna-7B: EVA ViT-g/14 at 224 + Q-Former (32 queries) + Vicuna-7B (preset_instructblip.py)
    "instructblip-vicuna-7b": InstructBlipShape(),
    # PaliGemma 2 3B at 448: SigLIP-so400m/14 (1024 image tokens) + Gemma 2 2B, prefix-LM (preset_paligemma.py)
    "paligemma2-3b-448": PaliGemmaShape(),
}

# SmolVLM's special tokens at their ids in the public vocabulary (49280 entries).
SMOLVLM_SPECIAL_IDS = {
    0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>",
    49152: "<global-img>",
    **{49153 + 6 * (r - 1) + (c - 1): f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)},
    49189: "<fake_token_around_image>", 49190: "<image>", 49279: "<end_of_utterance>",
}

_CORPUS = [
    "User: What is in this image? Assistant: A red circle on the left and two blue squares at the top.",
    "The quick brown fox jumps over the lazy dog. 0123456789. How many shapes are there? Three.",
    "Describe the chart, the table, the document and the photo in detail, line by line.",
    # "\n\n" is one token in SmolVLM's vocabulary; GPT-2's pre-tokenizer keeps it whole only at the end of a
    # whitespace run that is followed by more whitespace or by the end of the text
    "First paragraph.\n\n\nSecond paragraph, after blank lines.\n\n",
] * 50


# Qwen2's special tokens at their ids in InternVL3's vocabulary (151674 entries)
INTERNVL_SPECIAL_IDS = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
    151665: "<img>", 151666: "</img>", 151667: "<IMG_CONTEXT>",
}

DTYPES = ("float32", "bfloat16")


def build_preset(name: str, out: Path, seed: int = 0, single_tile: bool = False, dtype: str = "float32") -> Path:
    """single_tile: the processor's first resize stops at one tile (no splitting), for one-tile benchmarks.
    dtype "bfloat16": weights made and saved in bf16, as the public checkpoints ship (never an fp32 copy)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose from {DTYPES}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        torch.manual_seed(seed)
        shape = PRESETS[name]
        if isinstance(shape, Gemma3Shape):
            from .preset_gemma3 import build_gemma3

            return build_gemma3(shape, out, _CORPUS)
        if isinstance(shape, InternVLShape):
            return _build_internvl(shape, out, single_tile)
        if isinstance(shape, LlavaShape):
            return _build_llava(shape, out)
        if isinstance(shape, QwenVLShape):
            from .preset_qwen_vl import build_qwen2_vl

            return build_qwen2_vl(shape, out, _CORPUS, single_tile)
        if isinstance(shape, Qwen3VLShape):
            from .preset_qwen_vl import build_qwen3_vl

            return build_qwen3_vl(shape, out, _CORPUS, single_tile)
        if isinstance(shape, OnevisionShape):
            from .preset_onevision import build_onevision

            return build_onevision(shape, out, _CORPUS)
        if isinstance(shape, Idefics2Shape):
            from .preset_idefics2 import build_idefics2

            return build_idefics2(shape, out, _CORPUS)
        if isinstance(shape, InstructBlipShape):
            from .preset_instructblip import build_instructblip

            return build_instructblip(shape, out, _CORPUS)
        if isinstance(shape, PaliGemmaShape):
            from .preset_paligemma import build_paligemma

            return build_paligemma(shape, out, _CORPUS)
        return _build_smolvlm(shape, out, single_tile)
    finally:
        torch.set_default_dtype(previous)


def _build_smolvlm(shape: SmolVLMShape, out: Path, single_tile: bool) -> Path:
    import json

    import transformers
    from transformers import Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = wrap(
        bpe_with_pinned_ids(_CORPUS, shape.vocab, SMOLVLM_SPECIAL_IDS, n_merges=1000),
        bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>", chat_template=SMOLVLM_TEMPLATE,
    )
    vision_class = Idefics3VisionConfig
    if shape.architecture == "smolvlm":
        from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig as vision_class
    vision = vision_class(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp, num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads, image_size=shape.image, patch_size=shape.patch,
    )
    text = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_mlp,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads, max_position_embeddings=shape.context, rms_norm_eps=1e-5,
        rope_theta=shape.rope_theta, tie_word_embeddings=shape.tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    prefix = "SmolVLM" if shape.architecture == "smolvlm" else "Idefics3"
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=vision.to_dict(), text_config=text.to_dict(), scale_factor=shape.scale_factor,
        image_token_id=49190, tie_word_embeddings=shape.tied,
    )
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": shape.image if single_tile else 4 * shape.image},
        max_image_size={"longest_edge": shape.image}, do_image_splitting=True
    )
    image_seq_len = (shape.image // shape.patch) ** 2 // shape.scale_factor**2
    model.save_pretrained(out)
    if shape.architecture == "smolvlm":
        # SmolVLMProcessor needs torchvision (video) to be built: its files are written one by one, as on the Hub
        from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
        from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

        SmolVLMImageProcessorPil(**{k: getattr(image_processor, k) for k in ("size", "max_image_size", "do_image_splitting")}
                                 ).save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
        (out / "processor_config.json").write_text(json.dumps({"image_seq_len": image_seq_len,
                                                               "processor_class": "SmolVLMProcessor"}))
        # the video processor's settings, where the Hub's SmolVLM2 checkpoints keep them (SmolVLMVideoProcessor's
        # defaults: 1 fps, at most 64 frames); its `size` above overrides video_size, as in transformers
        processor_file = out / "preprocessor_config.json"
        processor_file.write_text(json.dumps({**json.loads(processor_file.read_text()), "video_sampling": {
            "fps": 1, "max_frames": 64, "video_size": {"longest_edge": shape.image}}}, indent=2))
        return out
    Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                      chat_template=SMOLVLM_TEMPLATE).save_pretrained(out)
    return out


INTERNVL_TEMPLATE = (  # transformers' convert_internvl_weights_to_hf.py: ChatML, an image is "<IMG_CONTEXT>\n"
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)


def _build_internvl(shape: InternVLShape, out: Path, single_tile: bool) -> Path:
    import json

    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from .tokenizers import wrap

    tokenizer = wrap(bpe_with_pinned_ids(_CORPUS, shape.vocab, INTERNVL_SPECIAL_IDS, n_merges=1000, pre="qwen2"),
                     bos=None, eos="<|im_end|>", pad="<|endoftext|>", chat_template=INTERNVL_TEMPLATE,
                     start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>")
    vision = InternVLVisionConfig(hidden_size=shape.vision_hidden, num_hidden_layers=shape.vision_layers,
                                  num_attention_heads=shape.vision_heads, intermediate_size=shape.vision_mlp,
                                  image_size=shape.image, patch_size=shape.patch, attention_bias=True)
    text = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_mlp,
                       num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                       num_key_value_heads=shape.text_kv_heads, max_position_embeddings=shape.context, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta},
                       tie_word_embeddings=shape.tied, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    seq_len = (shape.image // shape.patch) ** 2 // 4
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=151667, image_seq_length=seq_len,
                            downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default",
                            tie_word_embeddings=shape.tied)
    InternVLForConditionalGeneration(config).eval().save_pretrained(out)
    GotOcr2ImageProcessorPil(size={"height": shape.image, "width": shape.image}, min_patches=1,
                             max_patches=1 if single_tile else shape.max_patches, crop_to_patches=True,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(INTERNVL_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": seq_len, "processor_class": "InternVLProcessor"}))
    return out


LLAVA15_TEMPLATE = (  # llava-hf/llava-1.5-*-hf chat_template.json
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA15_SPECIAL_IDS = {0: "<unk>", 1: "<s>", 2: "</s>", 32000: "<image>", 32001: "<pad>"}


def _build_llava(shape: LlavaShape, out: Path) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .tokenizers import wrap

    tokenizer = wrap(bpe_with_pinned_ids(_CORPUS, shape.vocab, LLAVA15_SPECIAL_IDS, n_merges=1000),
                     bos="<s>", eos="</s>", pad="<pad>", unk="<unk>", chat_template=LLAVA15_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                              image_size=shape.image, patch_size=shape.patch, projection_dim=768)
    text = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_mlp,
                       num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                       num_key_value_heads=shape.text_kv_heads, max_position_embeddings=shape.context, rms_norm_eps=1e-5,
                       rope_theta=shape.rope_theta, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=32001)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False)
    LlavaForConditionalGeneration(config).eval().save_pretrained(out)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": shape.image},
                                           crop_size={"height": shape.image, "width": shape.image})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=shape.patch,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA15_TEMPLATE).save_pretrained(out)
    return out
