"""The bundle's tokenizer without transformers (and so without torch, which transformers imports): tokenizer.json
through the `tokenizers` library, special tokens and decode options from tokenizer_config.json, and the chat template
rendered with jinja2 the way transformers' `apply_chat_template` renders it (same sandbox, options, filters and
globals; tests/test_tokenizer.py compares the two on every family's template)."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..errors import BundleError

# transformers' SPECIAL_TOKENS_ATTRIBUTES: what templates see as bos_token, eos_token, ...
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value) -> str | None:
    """tokenizer_config.json stores a special token as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _compile(template: str):
    """transformers.utils.chat_template_utils._cached_compile_jinja_template, minus the assistant-mask tracker (the
    `{% generation %}` tag renders its body)."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = dict
    return env.from_string(template)


class BundleTokenizer:
    """The subset of a transformers tokenizer the runtime uses: `tok(text)["input_ids"]`, `encode`, `decode`,
    `apply_chat_template`, `len()` and the special token ids."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        file = folder / "tokenizer.json"
        if not file.is_file():
            raise BundleError(f"the bundle's tokenizer in {folder} has no tokenizer.json; re-export the bundle")
        try:
            self._tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - whatever the Rust side says, the file is the problem
            raise BundleError(f"{file} cannot be loaded ({str(exc)[:200]}); re-export the bundle") from None
        config_file = folder / "tokenizer_config.json"
        try:
            config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{config_file} is not valid JSON ({exc}); re-export the bundle") from None
        self.special_tokens_map = {name: text for name in SPECIAL_TOKEN_NAMES
                                   if (text := _token_text(config.get(name))) is not None}
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
        for name in SPECIAL_TOKEN_NAMES:
            text = self.special_tokens_map.get(name)
            setattr(self, f"{name}_id", self._tokenizer.token_to_id(text) if text is not None else None)
        self._templates: dict[str, object] = {}

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def id_to_token(self, token: int) -> str | None:
        """The token's vocabulary string (a byte-fallback token is "<0xNN>"), None outside the vocabulary."""
        return self._tokenizer.id_to_token(int(token))

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None, tokenize: bool = False,
                            add_generation_prompt: bool = True, **kwargs) -> str:
        if tokenize:
            raise ValueError("BundleTokenizer.apply_chat_template renders text only (tokenize=False)")
        template = chat_template or self.chat_template
        if not template:
            raise BundleError("the bundle has no chat template; re-export it or pass raw text")
        if template not in self._templates:
            self._templates[template] = _compile(template)
        # plain JSON copies, as transformers passes them (the template never sees the caller's objects)
        messages = json.loads(json.dumps(messages, default=lambda obj: None))
        return self._templates[template].render(messages=messages, tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt,
                                                **{**self.special_tokens_map, **kwargs})


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (used when tokenizer_config.json asks for it)."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


class InstructionTokenizer:
    """The tokenizer an encoder reads the prompt with (InstructBLIP's Q-Former BERT tokenizer): tokenizer.json in
    `folder` through `tokenizers` (torch-free), special tokens added as its post-processor says ([CLS] x [SEP]);
    text -> (n,) int64 ids, refused beyond `max_tokens` (the Q-Former's position table)."""

    def __init__(self, folder: Path, max_tokens: int):
        from tokenizers import Tokenizer

        file = Path(folder) / "tokenizer.json"
        if not file.is_file():
            raise BundleError(f"{folder} has no tokenizer.json: the encoder's instruction tokenizer is missing; re-save "
                              "the checkpoint's processor (save_pretrained writes it) or re-export the bundle")
        self._tokenizer = Tokenizer.from_file(str(file))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.max_tokens = int(max_tokens)

    def __call__(self, text: str):
        import numpy as np

        from ..errors import BadInputError

        ids = np.asarray(self._tokenizer.encode(text, add_special_tokens=True).ids, dtype=np.int64)
        if len(ids) > self.max_tokens:
            raise BadInputError(f"the prompt is {len(ids)} tokens for the vision bridge's instruction input, which takes "
                                f"at most {self.max_tokens}; shorten the prompt")
        return ids
