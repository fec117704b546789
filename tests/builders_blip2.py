"""Tiny BLIP-2 (OPT and Flan-T5 decoders) and InstructBLIP (Llama decoder) checkpoints built in the test session: real
transformers classes and processors, random weights, a WordPiece Q-Former tokenizer trained here (no download).
InstructBLIP's query tokens start at zero and its vision weights at std 1e-10 (the image would be ignored): both are
randomised, and the bridge's matrices scaled so that the image and the instruction move the greedy tokens."""
from __future__ import annotations

from pathlib import Path

import torch

from builders import CORPUS, _tokenizer, text_config

BLIP_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
N_QUERIES = 8


def qformer_tokenizer():
    """A BERT-style WordPiece tokenizer ([PAD]=0, [UNK], [CLS], [SEP], [MASK]; lower-cased; [CLS] x [SEP]) with a
    vocabulary listed from the corpus (the corpus' words, its characters and their ## forms, sorted): `tokenizers`'
    WordPiece trainer breaks ties differently from run to run, and the tests need the same ids every time."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = sorted({w for line in CORPUS for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(line))})
    chars = sorted({c for w in words for c in w})
    vocab = specials + chars + ["##" + c for c in chars] + [w for w in words if len(w) > 1]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, splitter, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]", do_lower_case=True)


def _vision_and_qformer(instruct: bool, qformer_vocab: int):
    from transformers import Blip2QFormerConfig, Blip2VisionConfig, InstructBlipQFormerConfig, InstructBlipVisionConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, initializer_range=0.02)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   cross_attention_frequency=1, encoder_hidden_size=32, vocab_size=qformer_vocab,
                   max_position_embeddings=64)
    if instruct:
        return InstructBlipVisionConfig(**vision), InstructBlipQFormerConfig(**qformer)
    return Blip2VisionConfig(**vision), Blip2QFormerConfig(**qformer)


def _randomise(model) -> None:
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 1.0)
        for name, param in model.vision_model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.3 if param.ndim > 1 else 0.1)
        for name, param in list(model.qformer.named_parameters()) + list(model.language_projection.named_parameters()):
            if param.ndim == 2 and "embeddings" not in name:
                param.mul_(4)


def _image_processor():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": 32, "width": 32})


def build_instructblip(out: Path, seed: int = 0) -> Path:
    """InstructBLIP with a Llama (Vicuna-shaped) decoder, 8 queries, a 32-px ViT of 8-px patches."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

    torch.manual_seed(seed)
    tokenizer = _tokenizer(BLIP_SPECIALS, None)
    qtok = qformer_tokenizer()
    vision, qformer = _vision_and_qformer(True, len(qtok))
    config = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text_config(len(tokenizer)),
                                num_query_tokens=N_QUERIES, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = InstructBlipForConditionalGeneration(config).eval()
    _randomise(model)
    processor = InstructBlipProcessor(image_processor=_image_processor(), tokenizer=tokenizer, qformer_tokenizer=qtok,
                                      num_query_tokens=N_QUERIES)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_blip2_opt(out: Path, seed: int = 0) -> Path:
    """BLIP-2 with an OPT decoder (what the published blip2-opt checkpoints are), 8 queries."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, OPTConfig

    torch.manual_seed(seed)
    tokenizer = _tokenizer(BLIP_SPECIALS, None)
    vision, qformer = _vision_and_qformer(False, 30522)
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64, bos_token_id=0,
                     eos_token_id=2, pad_token_id=1, init_std=0.2)  # at 0.02 the tiny OPT repeats one token
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=N_QUERIES,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = Blip2ForConditionalGeneration(config).eval()
    _randomise(model)
    processor = Blip2Processor(image_processor=_image_processor(), tokenizer=tokenizer, num_query_tokens=N_QUERIES)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_blip2_t5(out: Path, seed: int = 0) -> Path:
    """BLIP-2 with a Flan-T5-shaped decoder (an encoder-decoder: gated-GELU, untied head, relative attention
    buckets), 8 queries. The prompt (image rows + text) is T5's encoder input; generation starts from the pad id."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, T5Config

    torch.manual_seed(seed)
    tokenizer = _tokenizer(BLIP_SPECIALS, None)
    vision, qformer = _vision_and_qformer(False, 30522)
    pad, eos = tokenizer.convert_tokens_to_ids("<|endoftext|>"), tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                    num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=pad, eos_token_id=eos,
                    decoder_start_token_id=pad)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=N_QUERIES,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = Blip2ForConditionalGeneration(config).eval()
    _randomise(model)
    with torch.no_grad():  # at T5's init the residual stream stays the input token's embedding, and the tied head
        for name, param in model.language_model.named_parameters():  # then repeats the start token whatever the image
            if param.ndim == 2 and "shared" not in name and "relative_attention" not in name:
                param.mul_(4)
    processor = Blip2Processor(image_processor=_image_processor(), tokenizer=tokenizer, num_query_tokens=N_QUERIES)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
