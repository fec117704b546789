"""An encoder-decoder language model (BLIP-2's Flan-T5) behind the one-sequence Decoder contract, on PyTorch: the
prompt (image rows and text) is the T5 encoder's input, read whole and bidirectionally; generated tokens go to the
T5 decoder, which starts from decoder_start_token_id and cross-attends to the encoder's output. What HF's
`T5ForConditionalGeneration.generate(inputs_embeds=...)` computes, one token at a time.

Prefix-KV reuse does not apply: every encoder output depends on the whole prompt, so the family marks the prompt as
one prefix-LM block (image_attention "prefix") and the session re-prefills it whole each turn (runtimes/reuse.py).
n_past counts the prompt's positions and then one per generated token, as for a causal decoder."""
from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch

from .base import Decoder, DecoderState, Segment
from .torch_backend import _cache_nbytes

T5_CONTEXT = 512  # T5 has relative positions and no maximum; Flan-T5's tokenizer caps its inputs at 512


class TorchSeq2SeqDecoder(Decoder):
    name = "torch"

    def __init__(self, model, n_ctx: int | None = None, *, position_scheme: str = "1d", artifact_id: str = "torch"):
        if not getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__} is not an encoder-decoder; use TorchDecoder")
        self.model = model.eval()
        self.n_ctx = int(n_ctx or getattr(model.config, "n_positions", None) or T5_CONTEXT)
        self.vocab_size = int(model.config.vocab_size)
        self.n_batch = self.n_ctx  # the whole prompt is one encoder forward
        self.position_scheme, self.artifact_id = position_scheme, artifact_id
        start = model.config.decoder_start_token_id
        self._start = int(model.config.pad_token_id if start is None else start)
        self._embed = model.get_input_embeddings()
        self._reset()

    def _reset(self) -> None:
        self._encoded: torch.Tensor | None = None  # (1, L, D): the encoder's output for the prompt
        self._cache = None  # EncoderDecoderCache of the decoder's self- and cross-attention
        self._prompt = 0  # L
        self._logits: np.ndarray | None = None
        self.n_past = self.next_position = 0

    def prefill_chunks(self, segments: list[Segment]) -> Iterator[int]:
        length = sum(len(s) for s in segments)
        with torch.inference_mode():
            if self.n_past == 0:
                self._encode(segments)
            elif any(s.embeds is not None for s in segments):
                raise RuntimeError("an encoder-decoder cannot extend its prompt in place: prefill the whole prompt "
                                   "into an empty sequence")
            else:  # tokens after the prompt are the decoder's (generated, or a forced continuation)
                for token in np.concatenate([s.token_ids for s in segments]):
                    self._decode(int(token))
        self.n_past += length
        self.next_position = self.n_past
        yield length

    def _encode(self, segments: list[Segment]) -> None:
        from transformers import DynamicCache, EncoderDecoderCache

        parts = [self._embed(torch.from_numpy(s.token_ids.astype(np.int64))) if s.token_ids is not None else
                 torch.from_numpy(np.ascontiguousarray(s.embeds, dtype=np.float32)).to(self._embed.weight.dtype)
                 for s in segments]
        inputs = torch.cat(parts)[None]  # (1, L, D): T5 adds no positions to its inputs (relative attention bias)
        self._encoded = self.model.get_encoder()(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2],
                                                 dtype=torch.long)).last_hidden_state
        self._prompt = inputs.shape[1]
        self._cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self._decode(self._start)  # the decoder's first position: its logits are the prompt's last logits

    def _decode(self, token: int) -> None:
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self._encoded),
                         decoder_input_ids=torch.tensor([[token]]), past_key_values=self._cache, use_cache=True)
        self._logits = out.logits[0, -1].float().numpy()

    def logits(self) -> np.ndarray:
        if self._logits is None:
            raise RuntimeError("no logits yet: nothing was decoded")
        return self._logits

    def can_truncate(self, n_past: int) -> bool:
        return n_past == 0 or n_past >= self._prompt  # a cut inside the prompt would change every encoder row

    def truncate(self, n_past: int, next_position: int | None = None) -> None:
        if n_past == 0:
            self._reset()
            return
        if not self.can_truncate(n_past):
            raise RuntimeError(f"cannot keep {n_past} of an encoder-decoder's {self._prompt} prompt positions")
        if n_past < self.n_past:  # drop generated tokens from the decoder's self-attention cache
            self._cache.crop(n_past - self.n_past)
            self.n_past = self.next_position = n_past
            self._logits = None

    def snapshot(self) -> DecoderState:
        payload = (self._encoded, copy.deepcopy(self._cache), self._prompt, self._logits)
        nbytes = _cache_nbytes(self._cache.self_attention_cache) + _cache_nbytes(self._cache.cross_attention_cache)
        return DecoderState(payload, self.n_past, nbytes + self._encoded.numel() * self._encoded.element_size(),
                            self.next_position)

    def restore(self, state: DecoderState) -> None:
        encoded, cache, prompt, logits = state.payload
        self._encoded, self._cache, self._prompt, self._logits = encoded, copy.deepcopy(cache), prompt, logits
        self.n_past, self.next_position = state.n_past, state.next_position


def torch_decoder(model, n_ctx: int | None = None, *, position_scheme: str, artifact_id: str = "torch",
                  deepstack_layers: int = 0, image_attention: str = "causal") -> Decoder:
    """The torch Decoder for a text model: TorchSeq2SeqDecoder for an encoder-decoder (T5), else TorchDecoder."""
    if getattr(model.config, "is_encoder_decoder", False):
        return TorchSeq2SeqDecoder(model, n_ctx, position_scheme=position_scheme, artifact_id=artifact_id)
    from .torch_backend import TorchDecoder

    return TorchDecoder(model, n_ctx, position_scheme=position_scheme, artifact_id=artifact_id,
                        deepstack_layers=deepstack_layers, image_attention=image_attention)
