"""Byte-level BPE tokenizers built locally with the `tokenizers` library (no hub): for presets, tests and the
reference model. Special tokens can be pinned to exact ids (presets carry the public models' ids)."""
from __future__ import annotations

from typing import Iterable

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The reference model's template: a user turn is <|user|> + content; the assistant's answer follows the question
# directly and ends with <|im_end|> (no generation-prompt token). Its tokenizer makes each known question one token
# (edgevlm.scenes.all_questions), so the answer is predicted at a position that holds the whole question: one
# attention hop to the image, which a small decoder learns in minutes (a question a few tokens back needs a
# second, composed hop that takes it far longer).
REFERENCE_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}<|user|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}<|im_end|>{% endif %}{% endfor %}"
)

# SmolVLM's own template (HuggingFaceTB/SmolVLM-256M-Instruct chat_template.json).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# Qwen2's pre-tokenizer split (transformers/models/qwen2/tokenization_qwen2.py PRETOKENIZE_REGEX)
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def train_bpe(corpus: Iterable[str], vocab_size: int, special_tokens: list[str], pre: str = "gpt-2"):
    """A byte-level BPE trained on ``corpus``; special tokens get the first ids, in order. pre: "gpt-2" (plain
    ByteLevel) or "qwen2" (NFC + Qwen2's regex split + ByteLevel without its own regex, as Qwen2 ships it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def bpe_with_pinned_ids(corpus: Iterable[str], vocab_size: int, pinned: dict[int, str], n_merges: int = 2000,
                        pre: str = "gpt-2"):
    """A byte-level BPE of exactly ``vocab_size`` entries with special tokens at the given ids; ids not used by
    bytes, merges or specials are filled with unreachable ``<|unused_N|>`` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    base = train_bpe(corpus, 256 + n_merges, [], pre=pre)
    free = iter(i for i in range(vocab_size) if i not in pinned)
    vocab = {token: next(free) for token, _ in sorted(base.get_vocab().items(), key=lambda kv: kv[1])}
    vocab.update({token: token_id for token_id, token in pinned.items()})
    vocab.update({f"<|unused_{token_id}|>": token_id for token_id in free})
    if len(vocab) != vocab_size:
        raise ValueError(f"built {len(vocab)} tokens, wanted {vocab_size}")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=_merges(base)))
    tokenizer.normalizer = base.normalizer
    tokenizer.pre_tokenizer = base.pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(pinned.values()))
    return tokenizer


def _merges(tokenizer) -> list[tuple[str, str]]:
    import json

    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def wrap(tokenizer, *, bos: str | None, eos: str, pad: str | None = None, unk: str | None = None, chat_template: str | None = None,
         **named_tokens):
    """transformers' PreTrainedTokenizerFast around a `tokenizers` object. named_tokens: extra named special tokens
    (InternVL's start_image_token="<img>", ...), saved in tokenizer_config.json as the real checkpoints have them."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad or eos, unk_token=unk,
                                   **({"extra_special_tokens": named_tokens} if named_tokens else {}))
    if chat_template:
        fast.chat_template = chat_template
    return fast
