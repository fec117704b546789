"""Incremental detokenization: text pieces as tokens arrive whose concatenation is exactly the decoded whole.

Decoding each new token alone is wrong for SentencePiece vocabularies (the decoder strips the leading "▁", so words
glue together) and for byte-fallback pieces (a character split over tokens). Here every step decodes the whole answer
and emits what it adds, up to the first U+FFFD: an incomplete (or, from a confused model, invalid) UTF-8 sequence is
held back until later bytes complete it or the answer ends, so nothing emitted ever changes afterwards. Decoding the
whole answer per token costs ~O(n) tokenizer work per step: microseconds at the lengths a device generates."""
from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder returns for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self.tokens: list[int] = []
        self.emitted = ""

    def add(self, token: int) -> str:
        """The text `token` completes ("" while a character is still open)."""
        self.tokens.append(int(token))
        text = self._decode(self.tokens)
        if not text.startswith(self.emitted):  # a decoder that rewrites earlier text: wait for the end
            return ""
        held = text.find(REPLACEMENT, len(self.emitted))
        stable = text if held < 0 else text[:held]
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
