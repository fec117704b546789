"""Tiny checkpoints built in the test session: real transformers classes and processors, random weights."""
from __future__ import annotations

from pathlib import Path

import torch

from edgevlm.reference.tokenizers import CHATML_TEMPLATE, SMOLVLM_TEMPLATE, train_bpe, wrap

CORPUS = [
    "What colour is the circle? The circle is red. How many shapes are there? There are three shapes.",
    "Describe the image. A blue square on the left and a green triangle at the top. Ünïcödé 12345 \t tabs",
    "The quick brown fox jumps over the lazy dog 0123456789 !?., ;:'\"()[]{}",
] * 20
LLAVA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
IDEFICS3_SPECIALS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
)


def text_config(vocab_size: int, decoder: str = "llama", **overrides):
    from transformers import LlamaConfig, Qwen2Config

    values = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=2, pad_token_id=0,
    )
    values.update(overrides)
    if decoder == "qwen2":  # Qwen2's q/k/v biases come with the class
        return Qwen2Config(**values, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return LlamaConfig(**values)


# LLaVA-1.5's conversation format (Vicuna v1), as its HF chat template renders it.
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# SmolVLM's real vocabulary has "\n\n" as one token, and llama.cpp's mtmd inserts it by that piece between the tiles
# and the global view: the tiny Idefics3 tokenizer learns it too.
PARAGRAPHS = ["Rows of shapes.\n\nThe next row.\n\n\n\nEnd.\n"] * 40


def _tokenizer(specials, template, extra_corpus: tuple[str, ...] | list[str] = (), pre: str = "gpt-2"):
    return wrap(train_bpe(CORPUS + list(extra_corpus), 400, specials, pre=pre), bos="<|endoftext|>", eos="<|im_end|>",
                chat_template=template)


def qwen2_tokenizer(specials: list[str], template: str, **options):
    """A byte-level BPE with Qwen2's pre-tokenizer and no BOS, as the Qwen2-VL, Qwen3-VL, InternVL3 and
    LLaVA-OneVision checkpoints ship it (eos <|im_end|>, pad <|endoftext|>); options: PreTrainedTokenizerFast's."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_bpe(CORPUS, 400, specials, pre="qwen2"),
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>", **options)
    tokenizer.chat_template = template
    return tokenizer


def to_unit_scale(named_parameters, bias_std: float | None = None) -> None:
    """Weights at unit scale (std 1/sqrt(fan_in), embeddings std 1): at HF's init (std 0.02) attention is nearly
    uniform and the image barely moves the greedy tokens. bias_std: biases (zero at init) drawn at this std too."""
    with torch.no_grad():
        for name, param in named_parameters:
            if bias_std is not None and name.endswith("bias"):
                param.normal_(0.0, bias_std)
            elif param.ndim == 2:
                param.normal_(0.0, 1.0 if "embed_tokens" in name else param.shape[1] ** -0.5)


def images_only(processor_class):
    """transformers' processor class for images: its constructor insists on a torchvision video processor, which
    this subclass lets be None (nothing else changes)."""

    class ImagesOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImagesOnly


def sentencepiece_tokenizer(folder: Path):
    """A Llama-2-style tokenizer: SentencePiece BPE with byte fallback (<unk>, <s>, </s> at 0-2), trained here and
    saved as tokenizer.model beside the checkpoint, as real LLaVA-1.5 checkpoints ship it, plus <image> added."""
    import io

    import sentencepiece
    from tokenizers import normalizers
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=420, model_type="bpe", byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, add_eos_token=False, legacy=True)
    # the tokenizer.json layout Llama-2 and llava-1.5 ship: "▁" prepended by the normalizer (always, as
    # SentencePiece's dummy prefix), no pre-tokenizer (transformers 5 would convert to a Metaspace that skips the
    # prefix before a leading space)
    tokenizer._tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer._tokenizer.pre_tokenizer = None
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = LLAVA15_TEMPLATE
    return tokenizer


def build_llava(out: Path, tower: str = "clip", seed: int = 0, image_size: int = 32, vocab: str = "bpe",
                decoder: str = "llama", tied: bool = False) -> Path:
    """decoder="qwen2": a LLaVA with a Qwen2 decoder and Qwen2's byte-level BPE pre-tokenizer (the layout of
    llava-interleave-qwen: LlavaForConditionalGeneration + SigLIP + Qwen2)."""
    from transformers import (
        CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    torch.manual_seed(seed)
    if vocab == "sentencepiece":
        tokenizer = sentencepiece_tokenizer(out)
        template = LLAVA15_TEMPLATE
        text_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": 0}
    else:
        tokenizer = _tokenizer(LLAVA_SPECIALS, CHATML_TEMPLATE, pre="qwen2" if decoder == "qwen2" else "gpt-2")
        template, text_ids = CHATML_TEMPLATE, {}
    vision_kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         image_size=image_size, patch_size=8)
    if tower == "clip":
        vision = CLIPVisionConfig(**vision_kwargs)
        strategy, extra = "default", 1
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    else:
        vision = SiglipVisionConfig(**vision_kwargs)
        strategy, extra = "full", 0
        image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size})
    config = LlavaConfig(
        vision_config=vision, text_config=text_config(len(tokenizer), decoder, tie_word_embeddings=tied, **text_ids),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2, tie_word_embeddings=tied,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    if decoder == "qwen2":  # transformers initialises the q/k/v biases to zero: make them matter to the parity tests
        with torch.no_grad():
            for name, param in model.model.language_model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.5)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=extra,
                               chat_template=template)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_idefics3(out: Path, seed: int = 0, splitting: bool = True) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    torch.manual_seed(seed)
    tokenizer = _tokenizer(IDEFICS3_SPECIALS, SMOLVLM_TEMPLATE, PARAGRAPHS)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    config = Idefics3Config(vision_config=vision, text_config=text_config(len(tokenizer)), scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model = Idefics3ForConditionalGeneration(config).eval()
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                do_image_splitting=splitting)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=SMOLVLM_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_smolvlm2(out: Path, seed: int = 0, video_sampling: dict | None = None) -> Path:
    """SmolVLM2 (SmolVLMForConditionalGeneration, model_type smolvlm). Its processor class needs torchvision and
    num2words, so the parts are saved one by one, as the Hub checkpoints ship them: image processor, tokenizer,
    processor_config.json (image_seq_len) and the chat template."""
    import json

    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    torch.manual_seed(seed)
    tokenizer = _tokenizer(IDEFICS3_SPECIALS, DEFAULT_CHAT_TEMPLATE, PARAGRAPHS)
    vision = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8)
    config = SmolVLMConfig(vision_config=vision, text_config=text_config(len(tokenizer)).to_dict(), scale_factor=2,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model = SmolVLMForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                             do_image_splitting=True).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_len": 4, "processor_class": "SmolVLMProcessor"}))
    if video_sampling is not None:  # where the Hub's SmolVLM2 checkpoints keep the video processor's settings
        config = json.loads((out / "preprocessor_config.json").read_text())
        (out / "preprocessor_config.json").write_text(json.dumps({**config, "video_sampling": video_sampling}))
    return out


# InternVL3's chat template as transformers' convert_internvl_weights_to_hf.py writes it: ChatML, images as
# "<IMG_CONTEXT>\n"
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def build_internvl(out: Path, seed: int = 0, tied: bool = False, max_patches: int = 6) -> Path:
    """InternVL3-shaped (-hf layout): InternViT (CLS, learned positions), pixel shuffle 0.5, a Qwen2 decoder with
    random q/k/v biases. The processor needs torchvision (video), so its parts are saved one by one."""
    import json

    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    torch.manual_seed(seed)
    tokenizer = qwen2_tokenizer(INTERNVL_SPECIALS, INTERNVL_TEMPLATE, extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  image_size=32, patch_size=8)
    text = text_config(len(tokenizer), "qwen2", tie_word_embeddings=tied, bos_token_id=None,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1,
                            vision_feature_select_strategy="default", tie_word_embeddings=tied)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():  # zero at init: make the CLS token, positions and q/k/v biases matter
        model.model.vision_tower.embeddings.cls_token.normal_()
        model.model.vision_tower.embeddings.position_embeddings.normal_()
        for name, param in model.model.language_model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(out)
    GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, min_patches=1, max_patches=max_patches,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(INTERNVL_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": 4, "processor_class": "InternVLProcessor"}))
    return out


def build_internvl_unit_text(out: Path, seed: int = 8) -> Path:
    """The tiny InternVL with its decoder and projector at unit scale (as build_qwen2_vl does for its decoder): at
    HF's init (std 0.02) its greedy tokens do not depend on the image, so a greedy comparison would prove nothing
    about the image path."""
    from transformers import InternVLForConditionalGeneration

    build_internvl(out, seed=seed)
    model = InternVLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(seed)
    projector = [(f"projector.{n}", w) for n, w in model.model.multi_modal_projector.named_parameters()]
    to_unit_scale([*model.model.language_model.named_parameters(), *projector, ("lm_head", model.lm_head.weight)])
    model.save_pretrained(out)
    return out


def internvl_processor(path: Path):
    """transformers' own InternVLProcessor for images (images_only: no torchvision video processor)."""
    from transformers import AutoImageProcessor, AutoTokenizer, InternVLProcessor

    return images_only(InternVLProcessor)(
        image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=AutoTokenizer.from_pretrained(path),
        video_processor=None, image_seq_length=4, chat_template=INTERNVL_TEMPLATE)


# Qwen2-VL-2B-Instruct's chat template (tokenizer_config.json on the Hub): ChatML with a default system message,
# each image as <|vision_start|><|image_pad|><|vision_end|>; the processor repeats <|image_pad|> per merged patch.
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
QWEN2VL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]
# min/max pixels of the tiny processor: 2x2 .. 8x8 merged tokens (56..224 px a side)
QWEN2VL_MIN_PIXELS, QWEN2VL_MAX_PIXELS = 56 * 56, 224 * 224


def _qwen_vl_tokenizer():
    """Qwen2-VL's tokenizer (Qwen3-VL keeps it) and the config's ids of its image, video and vision delimiters."""
    tokenizer = qwen2_tokenizer(QWEN2VL_SPECIALS, QWEN2VL_TEMPLATE)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return tokenizer, ids


def build_qwen2_vl(out: Path, version: str = "2", seed: int = 0, tied: bool = False) -> Path:
    """Qwen2-VL ("2") or Qwen2.5-VL ("2.5"): the native-resolution ViT (14-px patches, 2x2 merge; 2.5 with window
    attention on its first block and full attention on its second) and a Qwen2 decoder with M-RoPE sections
    [2, 3, 3] (head_dim 16), random q/k/v biases. The processor class needs torchvision (video), so the image
    processor, tokenizer and chat template are saved one by one, as the Hub checkpoints ship them."""
    import json

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tokenizer, ids = _qwen_vl_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
                tie_word_embeddings=tied)
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=tied, **ids)
        model = Qwen2VLForConditionalGeneration(config).eval()
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=tied, **ids)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    else:
        raise ValueError(f"version {version!r}: '2' or '2.5'")
    # text weights at unit scale: at HF's init image rows at wrong positions move the logits by ~1e-3 only
    to_unit_scale([*model.model.language_model.named_parameters(), ("lm_head", model.lm_head.weight)], bias_std=0.5)
    model.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=QWEN2VL_MIN_PIXELS, max_pixels=QWEN2VL_MAX_PIXELS, patch_size=14,
                             temporal_patch_size=2, merge_size=2).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN2VL_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    return out


def build_qwen25_vl_mtmd_windows(out: Path, seed: int = 11) -> Path:
    """The tiny Qwen2.5-VL with llama.cpp's 112-px attention windows (build_qwen2_vl's 56 px is refused by the mmproj
    writer: mtmd fixes 112), so that its 4x4-token windows split the test images into several windows."""
    import json

    build_qwen2_vl(out, "2.5", seed=seed)
    config = json.loads((out / "config.json").read_text())
    config["vision_config"]["window_size"] = 112
    (out / "config.json").write_text(json.dumps(config))
    return out


# min/max pixels of the tiny Qwen3-VL processor: 2x2 .. 8x8 merged tokens (64..256 px a side, 32-px merge blocks)
QWEN3VL_MIN_PIXELS, QWEN3VL_MAX_PIXELS = 64 * 64, 256 * 256


def build_qwen3_vl(out: Path, seed: int = 0, tied: bool = False) -> Path:
    """Qwen3-VL: the native-resolution ViT (16-px patches, a 6x6 learned position grid interpolated to each image,
    2x2 merge, 3 blocks, DeepStack from blocks 0 and 1) and a Qwen3 decoder (QK-norm) with interleaved M-RoPE sections
    [3, 3, 2] (head_dim 16: frequencies t,row,col,t,row,col,t,row, where transformers and llama.cpp's IMROPE agree
    frequency by frequency). Built to tell right from wrong: text weights at unit scale, merger outputs at the token
    embeddings' scale, so the greedy tokens change with the image and when the DeepStack slices are dropped."""
    import json

    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    torch.manual_seed(seed)
    tokenizer, ids = _qwen_vl_tokenizer()
    # 3 decoder layers for 2 DeepStack slices: llama.cpp's qwen3vl graph cannot add a slice after its last layer
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                rms_norm_eps=1e-6, bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "mrope_section": [3, 3, 2], "mrope_interleaved": True,
                                 "rope_theta": 5e6})
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=36,
                  deepstack_visual_indexes=[0, 1])
    config = Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=tied, **ids)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # text weights at unit scale: at HF's init neither the image nor DeepStack moves the greedy tokens
    to_unit_scale([*model.model.language_model.named_parameters(), ("lm_head", model.lm_head.weight)])
    with torch.no_grad():
        visual = model.model.visual
        visual.pos_embed.weight.normal_(0.0, 1.0)  # the learned grid matters to the interpolation's parity
        for merger in [visual.merger, *visual.deepstack_merger_list]:  # rows at the token embeddings' scale
            for layer in (merger.linear_fc1, merger.linear_fc2):
                layer.weight.normal_(0.0, layer.weight.shape[1] ** -0.5)
                layer.bias.normal_(0.0, 0.1)
    model.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=QWEN3VL_MIN_PIXELS, max_pixels=QWEN3VL_MAX_PIXELS, patch_size=16,
                             temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5]).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN2VL_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}))
    return out


IDEFICS2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
                     "<end_of_utterance>"]


def build_idefics2(out: Path, seed: int = 0, splitting: bool = False) -> Path:
    """Idefics2 with a Mistral decoder; 8 perceiver latents over a 48-px canvas of 8-px patches. Its perceiver
    latents start as ones (every latent the same query) and at init std the latents swamp what the cross-attention
    adds (two images' rows differ by 0.4%): the latents are randomised and the bridge's matrices scaled x8 (80%)."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor, MistralConfig
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    torch.manual_seed(seed)
    template = SMOLVLM_TEMPLATE.removeprefix("<|im_start|>")  # Idefics2's template: SmolVLM's without the leading token
    tokenizer = _tokenizer(IDEFICS2_SPECIALS, template)
    vision = Idefics2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=48, patch_size=8)  # the position table covers the canvas, as in 8B
    perceiver = dict(resampler_n_latents=8, resampler_depth=2, resampler_n_heads=2, resampler_head_dim=16,
                     num_key_value_heads=1, hidden_size=64, rms_norm_eps=1e-6)
    text = MistralConfig(**text_config(len(tokenizer)).to_dict() | {"sliding_window": None})
    config = Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    model = Idefics2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.connector.perceiver_resampler.latents.normal_()
        for name, weight in model.model.connector.named_parameters():
            if weight.ndim == 2 and not name.endswith("latents"):
                weight.mul_(8)
    image_processor = Idefics2ImageProcessorPil(size={"shortest_edge": 24, "longest_edge": 48},
                                                do_image_splitting=splitting)
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=8,
                                  chat_template=template)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
