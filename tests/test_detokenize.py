"""Streaming text from tokens (runtimes/detokenize.py) with the two ways a decoder renders bytes that are not (yet)
UTF-8: byte-level BPE's lossy decode (GPT-2, SmolLM: one U+FFFD for an incomplete tail) and SentencePiece's byte
fallback (Llama: one U+FFFD per byte of a run that is not valid). Answers here are byte strings chosen to hold what a
random-weight or confused model emits: an invalid byte amid text, a run of invalid bytes, characters split over
tokens. At every step what was emitted is a prefix of the final text (nothing emitted ever changes), and text after
an invalid byte goes out as it comes: the detokenizer held everything from the first U+FFFD to the end of the answer,
which was workload f's ~800 ms "stall" (the second user's whole answer was invalid bytes, so its first chunk came
with its last token; docs/notes/2026-12-07-serve-stall.md). These tests failed on that code."""
from __future__ import annotations

from typing import Callable

import pytest
from tokenizers import Tokenizer, decoders, models

from edgevlm.runtimes.detokenize import MAX_OPEN, IncrementalDetokenizer

TEXT_WITH_INVALID = b"Hi \x80 there " + "日本 😀".encode() + b" \xff\xfe end"


def byte_to_char() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: the printable character byte-level BPE writes for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def byte_level() -> tuple[Tokenizer, Callable[[bytes], list[int]]]:
    """A byte-level BPE vocabulary of the 256 bytes (token id = byte value), decoded as GPT-2's is."""
    vocab = {char: byte for byte, char in byte_to_char().items()}
    tokenizer = Tokenizer(models.BPE(vocab, []))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, lambda data: list(data)


def byte_fallback() -> tuple[Tokenizer, Callable[[bytes], list[int]]]:
    """A SentencePiece-style vocabulary: <0xNN> byte tokens (id = byte value) and a few whole pieces, decoded as
    Llama's is (Replace ▁, ByteFallback, Fuse, Strip). ASCII letters go as whole pieces, so a run of byte tokens ends
    where text comes, as it does in a SentencePiece answer."""
    vocab = {f"<0x{byte:02X}>": byte for byte in range(256)}
    pieces = sorted({chr(c) for c in range(ord("a"), ord("z") + 1)} | {chr(c) for c in range(ord("A"), ord("Z") + 1)}
                    | {"▁"})
    vocab.update({piece: 256 + i for i, piece in enumerate(pieces)})
    tokenizer = Tokenizer(models.BPE(vocab, [], byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])

    def ids(data: bytes) -> list[int]:
        out = []
        for byte in data:
            char = chr(byte)
            out.append(vocab["▁"] if char == " " else vocab[char] if char.isascii() and char.isalpha() else byte)
        return out

    return tokenizer, ids


def stream(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    """The pieces after each token (the last: finish()), checking at every step that the emitted text is a prefix of
    the final text."""
    detok = IncrementalDetokenizer(tokenizer)
    final = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = []
    for token in ids:
        pieces.append(detok.add(token))
        assert final.startswith("".join(pieces))  # nothing emitted ever changes
    pieces.append(detok.finish())
    assert "".join(pieces) == final == detok.text
    return pieces, final


@pytest.mark.parametrize("vocab", [byte_level, byte_fallback])
def test_text_after_an_invalid_byte_streams_as_it_comes(vocab):
    tokenizer, ids = vocab()
    tokens = ids(TEXT_WITH_INVALID)
    pieces, final = stream(tokenizer, tokens)
    assert final.count("\ufffd") >= 3 and "日本 😀" in final and final.endswith(" end")
    # each word after the invalid byte is out by the time its last byte is (a byte-fallback run of valid bytes: by
    # the token that ends the run), not held until finish()
    late = vocab is byte_fallback
    for word, run in ((b"there", False), ("😀".encode(), True), (b"end", False)):
        at = TEXT_WITH_INVALID.index(word) + len(word) + (late and run)  # one token per byte
        assert word.decode() in "".join(pieces[:at]), word
    assert "".join(pieces[:-1]) == final  # the last token's step sent everything: finish() had nothing left


@pytest.mark.parametrize("vocab", [byte_level, byte_fallback])
def test_a_run_of_invalid_bytes_streams_as_it_comes(vocab):
    """Workload f's second user: 48 tokens, every one an invalid byte. Each step emits what it can no longer change:
    byte-level BPE all but the last MAX_OPEN U+FFFD (an open character renders as one), byte fallback every one (a
    run with an invalid byte stays invalid)."""
    tokenizer, ids = vocab()
    pieces, final = stream(tokenizer, ids(b"\x80" * 48))
    assert final == "\ufffd" * 48
    held = MAX_OPEN if vocab is byte_level else 0
    for step in range(1, 49):
        assert len("".join(pieces[:step])) == max(0, step - held)  # before the fix: 0 until finish()


@pytest.mark.parametrize("vocab", [byte_level, byte_fallback])
def test_a_character_split_over_tokens_is_held_until_complete(vocab):
    """The other side: a 4-byte character's first 3 bytes are never sent as U+FFFD."""
    tokenizer, ids = vocab()
    pieces, final = stream(tokenizer, ids("a😀b日c".encode()))
    assert final == "a😀b日c" and not any("\ufffd" in piece for piece in pieces)
    # out at the emoji's 4th byte; with byte fallback at the token that ends the run ("b")
    assert "".join(pieces[:5]) == ("a😀" if vocab is byte_level else "a")
    assert "".join(pieces[:6]) == "a😀b"


def test_a_byte_fallback_run_that_turns_invalid_never_sent_its_valid_start():
    """SentencePiece's byte fallback renders "3$" for the bytes 33 24, and U+FFFD x 3 once 80 joins the run: the valid
    start must not go out before the run ends (it did, and the streamed text then differed from the final text)."""
    tokenizer, ids = byte_fallback()
    pieces, final = stream(tokenizer, ids(b"ab 3$\x80 cd"))
    assert final == "ab \ufffd\ufffd\ufffd cd" and "3" not in "".join(pieces)
