"""One sequence of a LlamaContext: the Decoder. It keeps the sequence's own record (n_past, next_position, the output
row its logits are in) and asks its context to decode; llama.cpp's sampler chain samples from that row in place."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..base import Decoder, DecoderState, Segment

DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed


def sampler_chain(llama_cpp, config, n_vocab: int, penalty_window: int, final: bool = True):
    """llama.cpp's sampler chain in the order edgevlm's numpy Sampler applies the same settings: repetition penalty
    (transformers' rule, over the whole history), then greedy; or temperature, top-k, top-p and a seeded draw.
    final=False leaves out the last step (greedy / draw), for comparing what each setting keeps."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda sampler: llama_cpp.llama_sampler_chain_add(chain, sampler)  # noqa: E731
    if config.repetition_penalty != 1.0:
        add(llama_cpp.llama_sampler_init_penalties(n_vocab, penalty_window, config.repetition_penalty, 0.0, 0.0))
    if config.temperature == 0.0:
        if final:
            add(llama_cpp.llama_sampler_init_greedy())
        return chain
    add(llama_cpp.llama_sampler_init_temp(config.temperature))
    if config.top_k:
        add(llama_cpp.llama_sampler_init_top_k(config.top_k))
    if config.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(config.top_p, 1))
    if final:
        add(llama_cpp.llama_sampler_init_dist(DEFAULT_SEED if config.seed is None else config.seed % 2**32))
    return chain


class NativeSampler:
    """Samples from the sequence's last logits with llama.cpp's chain: no copy of the vocabulary-sized logits into
    Python per token. Greedy picks equal the numpy Sampler's; seeded draws come from llama.cpp's own RNG."""

    needs_logits = False  # it reads them in llama.cpp's context, at the sequence's row

    def __init__(self, sequence: "LlamaSequence", config, history: list[int]):
        self._lib, self._sequence = sequence.context.lib, sequence
        self.chain = sampler_chain(self._lib, config, sequence.vocab_size, sequence.n_ctx)
        if config.repetition_penalty != 1.0:  # the penalty sees the prompt too, as transformers' does
            for token in history:
                self._lib.llama_sampler_accept(self.chain, int(token))

    def sample(self, logits, history) -> int:  # the logits are already in llama.cpp's context, at this row
        sequence = self._sequence
        return int(self._lib.llama_sampler_sample(self.chain, sequence.context.pointer, sequence.logits_row))

    def close(self) -> None:
        if self.chain:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None


class LlamaSequence(Decoder):
    name = "llamacpp"

    def __init__(self, context, seq_id: int):
        model = context.model
        self.context, self.seq_id = context, seq_id  # context: the LlamaContext that made it (context.sequence)
        self.n_ctx, self.n_batch, self.vocab_size = context.n_ctx, context.n_batch, model.vocab_size
        self.artifact_id, self.state_signature = model.artifact_id, context.state_signature
        self.model_bytes = model.model_bytes
        self.n_past = self.next_position = 0
        self.logits_row = -1  # where this sequence's logits are among the last decode's outputs
        self.native_sampling = True  # False: edgevlm's numpy Sampler on copied logits (the reference, for tests)

    @property
    def n_embd(self) -> int:
        return self.context.model.n_embd

    @property
    def mrope(self) -> bool:
        return self.context.model.mrope

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.context.model.tokenize(text, add_special, parse_special)

    def decoded(self, rows: int, next_position: int, logits_row: int = -1) -> None:
        """Record rows the context decoded into this sequence (the context calls it after a batched step)."""
        self.n_past += rows
        self.next_position = max(self.next_position, next_position)
        self.logits_row = logits_row

    def prefill_chunks(self, segments: list[Segment]) -> Iterator[int]:
        total = sum(len(s) for s in segments)
        if self.n_past + total > self.n_ctx:
            raise RuntimeError(f"{self.n_past + total} positions exceed the llama.cpp context of {self.n_ctx}")
        if self.n_past == 0 and total > 0 and self.context.settings.image_attention == "prefix":
            rows = self.context.decode_prefix(self.seq_id, segments)  # the prompt: one bidirectional block
            self.decoded(rows, int(max(s.positions.max() for s in segments)) + 1)
            yield rows
            return
        for piece in self.context.decode_chunks(self.seq_id, segments):
            self.decoded(len(piece), int(piece.positions.max()) + 1)
            yield len(piece)

    def logits(self) -> np.ndarray:
        # A view of llama.cpp's buffer, valid until the next decode: the session samples from it at once, and
        # copying 49k floats per token is measurable at ~100 tok/s. Callers that keep logits copy them.
        return self.context.logits_at(self.logits_row)

    def step(self, token: int, position: int, logits: bool = True) -> np.ndarray | None:
        """What prefill does for a one-token segment, without building one; logits=False: no view of them (the
        native sampler reads them in place)."""
        if self.n_past >= self.n_ctx:
            raise RuntimeError(f"{self.n_past + 1} positions exceed the llama.cpp context of {self.n_ctx}")
        self.context.decode_one(self.seq_id, token, position)
        self.decoded(1, position + 1)
        return self.logits() if logits else None

    def sampler(self, config, history: list[int]):
        return NativeSampler(self, config, history) if self.native_sampling else super().sampler(config, history)

    def can_truncate(self, n_past: int) -> bool:
        """With an SWA cache the local layers dropped every position more than a window behind the newest one: the
        sequence can continue at n_past only while the positions a window before it are still there (llama-server's
        own rule, server-context.cpp: pos_min > n_past - n_swa forces a full prompt)."""
        n_swa = self.context.n_swa
        if not n_swa or n_past == 0 or n_past >= self.n_past:
            return True
        return self.context.oldest_kept(self.seq_id) <= max(0, n_past - n_swa)

    def truncate(self, n_past: int, next_position: int | None = None) -> None:
        """llama.cpp removes by position: 1-D, rows 0..n_past-1 hold positions 0..n_past-1; M-RoPE, the first
        removed row's t is `next_position` (text continues at max + 1 and an image starts there too; the session
        never cuts inside an image, whose rows share one t)."""
        if n_past < self.n_past:
            if not self.can_truncate(n_past):
                self._forget()
                raise RuntimeError(f"llama.cpp's sliding-window cache no longer holds the window before position "
                                   f"{n_past}; the sequence was cleared (prefill it again from the start)")
            first_removed = next_position if self.mrope and next_position is not None and n_past > 0 else n_past
            if not self.context.remove(self.seq_id, first_removed):
                self._forget()
                raise RuntimeError("llama.cpp could not truncate the sequence; it was cleared")
            self.n_past = n_past
        self.next_position = n_past if next_position is None else next_position

    def _forget(self) -> None:
        self.context.forget(self.seq_id)
        self.n_past = self.next_position = 0

    def snapshot(self) -> DecoderState:
        payload = self.context.save(self.seq_id)
        return DecoderState(payload, self.n_past, len(payload), self.next_position)

    def restore(self, state: DecoderState) -> None:
        """A snapshot taken from any sequence of a context with the same state_signature."""
        self._forget()
        if not self.context.load(self.seq_id, state.payload, state.nbytes):
            self._forget()
            raise RuntimeError("llama.cpp refused a saved sequence state (different model or context settings)")
        self.n_past, self.next_position = state.n_past, state.next_position
