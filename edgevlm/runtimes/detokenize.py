"""Incremental detokenization: text pieces as tokens arrive whose concatenation is exactly the decoded whole.

Decoding each new token alone is wrong for SentencePiece vocabularies (the decoder strips the leading "▁", so words
glue together) and for byte pieces (a character split over tokens). Here every step decodes the whole answer and
emits what it adds, less what a later token may still change, so nothing emitted ever changes afterwards. What may
change depends on how the decoder renders bytes that are not (yet) UTF-8:
- byte-level BPE (GPT-2, SmolLM, Qwen) decodes all bytes at once, lossily: only a character still open at the end can
  become another, and it renders as one U+FFFD; at most MAX_OPEN trailing U+FFFD are held back (a character's open
  tail is at most 3 bytes). A U+FFFD before other text is final: UTF-8 resynchronizes at the next character.
- SentencePiece's byte fallback (<0xNN> tokens, Llama, Gemma) renders a run of byte tokens all or nothing: valid
  UTF-8, else one U+FFFD per byte, so a later byte of the run can rewrite text the run already gave. The run's text
  waits for the run to end (a non-byte token), unless its bytes are already invalid UTF-8: then it stays U+FFFD per
  byte whatever comes, and goes out as it comes.
Holding back from the FIRST U+FFFD instead (as before) made an answer with one invalid byte (a random-weight or
confused model) stream nothing more until its end: workload f's ~800 ms "stall" (docs/notes/2026-12-07-serve-stall.md).
Decoding the whole answer per token costs ~O(n) tokenizer work per step: microseconds at the lengths a device
generates."""
from __future__ import annotations

import codecs
import re
from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder returns for an incomplete (or invalid) UTF-8 sequence
MAX_OPEN = 3  # bytes of a UTF-8 character that can still be incomplete: the most trailing U+FFFD that may change
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        # a token's vocabulary string (transformers, tokenizers and the bundle's tokenizer name it differently)
        self._token = getattr(tokenizer, "id_to_token", None) or getattr(tokenizer, "convert_ids_to_tokens", None)
        self.tokens: list[int] = []
        self.emitted = ""
        self._run = b""  # the bytes of the trailing run of byte-fallback tokens

    def add(self, token: int) -> str:
        """The text `token` completes ("" while a character is still open)."""
        self.tokens.append(int(token))
        byte = self._byte(int(token))
        self._run = self._run + bytes([byte]) if byte is not None else b""
        text = self._decode(self.tokens)
        if not text.startswith(self.emitted):  # a decoder that rewrites earlier text: wait for the end
            return ""
        if self._run and not _invalid_utf8(self._run):  # the run may still be rewritten: the text before it
            before = self._decode(self.tokens[: len(self.tokens) - len(self._run)])
            stable = before if text.startswith(before) else self.emitted
        elif self._run:  # an invalid run stays one U+FFFD per byte: final
            stable = text
        else:
            held = min(MAX_OPEN, len(text) - len(text.rstrip(REPLACEMENT)))  # trailing U+FFFD that may still change
            stable = text[: len(text) - held]
        piece = stable[len(self.emitted) :]
        self.emitted = stable if piece else self.emitted
        return piece

    def finish(self) -> str:
        """What is left to emit so that everything emitted equals the decoded whole (when it can still be made so)."""
        text = self.text
        return text[len(self.emitted) :] if text.startswith(self.emitted) else ""

    @property
    def text(self) -> str:
        return self._decode(self.tokens)

    def _byte(self, token: int) -> int | None:
        """The byte of a byte-fallback token (<0xNN>), else None."""
        name = self._token(token) if self._token is not None else None
        found = BYTE_TOKEN.fullmatch(name) if isinstance(name, str) else None
        return int(found.group(1), 16) if found else None


def _invalid_utf8(data: bytes) -> bool:
    """Whether `data` is no prefix of valid UTF-8 (no later bytes can make it valid)."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return True
    return False
