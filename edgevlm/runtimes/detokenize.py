"""Incremental detokenization: text pieces as tokens arrive whose concatenation is exactly the decoded whole.

Decoding each new token alone is wrong for SentencePiece vocabularies (the decoder strips the leading "▁", so words
glue together) and for byte-fallback pieces (a character split over tokens). As HF's TextStreamer and vLLM do, decode
a window that starts a few tokens back and emit only what the window adds beyond its own prefix."""
from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder returns for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self.tokens: list[int] = []
        self._prefix_offset = 0  # window start
        self._read_offset = 0  # tokens before this are already emitted
        self.emitted = ""

    def add(self, token: int) -> str:
        """The text `token` completes ("" while a character or word is still open)."""
        self.tokens.append(int(token))
        prefix = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        window = self._decode(self.tokens[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith(REPLACEMENT) or not window.startswith(prefix):
            return ""
        piece = window[len(prefix) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
        self.emitted += piece
        return piece

    def finish(self) -> str:
        """What is left to emit so that everything emitted equals the decoded whole (when it can still be made so)."""
        text = self.text
        return text[len(self.emitted) :] if text.startswith(self.emitted) else ""

    @property
    def text(self) -> str:
        return self._decode(self.tokens)
