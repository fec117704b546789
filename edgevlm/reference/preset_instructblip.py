"""The `instructblip-vicuna-7b` preset: Salesforce/instructblip-vicuna-7b's published shapes with random weights.
EVA ViT-g/14 at 224 px (1408 wide, 39 layers, 16 heads, MLP 6144; 257 positions with CLS), a Q-Former of 12 BERT
layers (768 wide, 12 heads, MLP 3072, cross-attention every 2nd layer, 32 queries, BERT vocabulary 30522 + 1, 512
positions), a Linear(768 -> 4096) projection, Vicuna-7B (Llama: 4096 wide, 32 layers, 32 heads, MLP 11008, 2048
positions, vocab 32001 + <image> = 32002), 32 image tokens before the prompt. The shapes are the published config's
as remembered (the Hub files cannot be read offline here); the tokenizers are BPE / WordPiece trained locally."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .tokenizers import bpe_with_pinned_ids, wrap

INSTRUCTBLIP_SPECIAL_IDS = {0: "<unk>", 1: "<s>", 2: "</s>", 32000: "<pad>", 32001: "<image>"}
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class InstructBlipShape:
    text_hidden: int = 4096
    text_layers: int = 32
    text_heads: int = 32
    text_kv_heads: int = 32
    text_mlp: int = 11008
    vision_hidden: int = 1408
    vision_layers: int = 39
    vision_heads: int = 16
    vision_mlp: int = 6144
    patch: int = 14
    image: int = 224
    queries: int = 32
    qformer_hidden: int = 768
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_mlp: int = 3072
    qformer_vocab: int = 30523
    qformer_positions: int = 512
    cross_attention_frequency: int = 2
    vocab: int = 32002
    rope_theta: float = 10000.0
    context: int = 2048


def qformer_params(s: InstructBlipShape, instruct: bool = True) -> int:
    """The bridge: the queries, the Q-Former (InstructBLIP's with its word and position embeddings; every layer
    self-attention + an FFN for the text and one for the queries, cross-attention to the ViT's width every
    `cross_attention_frequency` layers; LayerNorms after each) and the language projection, all with biases."""
    h, m, dv = s.qformer_hidden, s.qformer_mlp, s.vision_hidden
    embeddings = (s.qformer_vocab * h + s.qformer_positions * h if instruct else 0) + 2 * h
    self_attention = 4 * (h * h + h) + 2 * h
    cross_attention = (h * h + h) + 2 * (dv * h + h) + (h * h + h) + 2 * h
    ffn = h * m + m + m * h + h + 2 * h
    layers = s.qformer_layers * (self_attention + 2 * ffn)
    layers += sum(1 for i in range(s.qformer_layers) if i % s.cross_attention_frequency == 0) * cross_attention
    return s.queries * h + embeddings + layers + h * s.text_hidden + s.text_hidden


def files(shape: InstructBlipShape) -> tuple[dict, dict]:
    """(config.json, processor config) as build_instructblip writes them, for the planner (no torch)."""
    tower = dict(hidden_size=shape.vision_hidden, intermediate_size=shape.vision_mlp,
                 num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
                 image_size=shape.image, patch_size=shape.patch)
    qformer = dict(hidden_size=shape.qformer_hidden, num_hidden_layers=shape.qformer_layers,
                   num_attention_heads=shape.qformer_heads, intermediate_size=shape.qformer_mlp,
                   max_position_embeddings=shape.qformer_positions, vocab_size=shape.qformer_vocab,
                   cross_attention_frequency=shape.cross_attention_frequency, encoder_hidden_size=shape.vision_hidden)
    config = {"architectures": ["InstructBlipForConditionalGeneration"], "vision_config": tower,
              "qformer_config": qformer, "text_config": {"model_type": "llama"}, "num_query_tokens": shape.queries,
              "image_token_index": 32001}
    processor = {"size": {"height": shape.image, "width": shape.image}, "resample": 3, "image_mean": CLIP_MEAN,
                 "image_std": CLIP_STD, "num_query_tokens": shape.queries}
    return config, processor


def randomise_bridge_inputs(model, std: float = 0.02) -> None:
    """transformers starts InstructBLIP's query tokens at zero and its ViT at the published initializer_range 1e-10:
    the ViT's LayerNorms then return ~0 for every image and the Q-Former's output does not depend on the image (the
    int8 encoder's held-out cosine measures nothing). The trained model has neither, so the preset draws both at the
    Q-Former's std (biases and norms keep their init)."""
    import torch

    with torch.no_grad():
        model.query_tokens.normal_(0.0, std)
        for _, param in model.vision_model.named_parameters():
            if param.ndim > 1:  # patch conv, class/position embeddings, every projection
                param.normal_(0.0, std)


def build_instructblip(shape: InstructBlipShape, out: Path, corpus: list[str]) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import (BertTokenizerFast, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor, LlamaConfig)
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = wrap(bpe_with_pinned_ids(corpus, shape.vocab, INSTRUCTBLIP_SPECIAL_IDS, n_merges=1000),
                     bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
    bert = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    bert.normalizer = normalizers.BertNormalizer(lowercase=True)
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bert.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    bert.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", bert.token_to_id("[CLS]")), ("[SEP]", bert.token_to_id("[SEP]"))])
    qformer_tokenizer = BertTokenizerFast(tokenizer_object=bert, unk_token="[UNK]", sep_token="[SEP]",
                                          pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    config_json, _ = files(shape)
    text = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.text_hidden, intermediate_size=shape.text_mlp,
                       num_hidden_layers=shape.text_layers, num_attention_heads=shape.text_heads,
                       num_key_value_heads=shape.text_kv_heads, max_position_embeddings=shape.context,
                       rms_norm_eps=1e-6, rope_theta=shape.rope_theta, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2, pad_token_id=32000)
    config = InstructBlipConfig(vision_config=config_json["vision_config"], qformer_config=config_json["qformer_config"],
                                text_config=text, num_query_tokens=shape.queries, image_token_index=32001)
    model = InstructBlipForConditionalGeneration(config).eval()
    randomise_bridge_inputs(model)
    model.save_pretrained(out)
    image_processor = BlipImageProcessorPil(size={"height": shape.image, "width": shape.image})
    InstructBlipProcessor(image_processor=image_processor, tokenizer=tokenizer, qformer_tokenizer=qformer_tokenizer,
                          num_query_tokens=shape.queries).save_pretrained(out)
    return out
