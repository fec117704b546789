"""Architecture presets: random weights with the exact shapes of public models, for speed and memory figures
(which do not depend on weight values). Nothing is downloaded: the tokenizer is built locally and carries the
public model's special tokens at their real ids."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tokenizers import SMOLVLM_TEMPLATE, bpe_with_pinned_ids, wrap


@dataclass(frozen=True)
class SmolVLMShape:
    """Idefics3-architecture shapes (HuggingFaceTB/SmolVLM-*-Instruct config.json)."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_mlp: int
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


PRESETS = {
    # SigLIP-B/16 512 + SmolLM2-135M
    "smolvlm-256m": SmolVLMShape(text_hidden=576, text_layers=30, text_heads=9, text_kv_heads=3, text_mlp=1536),
    # SigLIP-B/16 512 + SmolLM2-360M
    "smolvlm-500m": SmolVLMShape(text_hidden=960, text_layers=32, text_heads=15, text_kv_heads=5, text_mlp=2560),
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


def build_preset(name: str, out: Path, seed: int = 0, single_tile: bool = False) -> Path:
    """single_tile: the processor's first resize stops at one tile (no splitting), for one-tile benchmarks."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    shape = PRESETS[name]
    torch.manual_seed(seed)
    tokenizer = wrap(
        bpe_with_pinned_ids(_CORPUS, shape.vocab, SMOLVLM_SPECIAL_IDS, n_merges=1000),
        bos="<|im_start|>", eos="<end_of_utterance>", pad="<|im_end|>", chat_template=SMOLVLM_TEMPLATE,
    )
    vision = Idefics3VisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp, num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads, image_size=shape.image, patch_size=shape.patch,
    )
    text = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_mlp,
        num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads, max_position_embeddings=shape.context, rms_norm_eps=1e-5,
        rope_theta=shape.rope_theta, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    config = Idefics3Config(
        vision_config=vision, text_config=text, scale_factor=shape.scale_factor,
        image_token_id=49190, tie_word_embeddings=True,
    )
    model = Idefics3ForConditionalGeneration(config).eval()
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(
            size={"longest_edge": shape.image if single_tile else 4 * shape.image},
            max_image_size={"longest_edge": shape.image}, do_image_splitting=True
        ),
        tokenizer=tokenizer,
        image_seq_len=(shape.image // shape.patch) ** 2 // shape.scale_factor**2,
        chat_template=SMOLVLM_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
