"""Decoder backend on MLX (mlx-lm's Llama): token ids, or `input_embeddings` for image rows, into mlx-lm's prompt
cache; truncation with `trim_prompt_cache`, snapshots with `copy.deepcopy` of the cache (KVCache has no copy())."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from ..export.mlx import require_mlx
from .base import DecoderState, Segment


class MlxDecoder:
    name = "mlx"

    def __init__(self, folder: str | Path, n_ctx: int):
        require_mlx()
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.utils import load_model

        self._mx = mx
        self.model, self.config = load_model(Path(folder))
        self._make_cache = lambda: make_prompt_cache(self.model)
        self.cache = self._make_cache()
        self.n_ctx = int(n_ctx)
        self.n_past = 0
        self.vocab_size = int(self.config["vocab_size"])
        self.device = str(mx.default_device())

    def prefill(self, segments: list[Segment]) -> np.ndarray:
        mx = self._mx
        logits = None
        for segment in segments:
            n = len(segment)
            if segment.token_ids is not None:
                logits = self.model(mx.array(segment.token_ids.astype(np.int32))[None], cache=self.cache)
            else:
                # mlx-lm uses `inputs` only for its shape when input_embeddings are given
                embeds = mx.array(np.ascontiguousarray(segment.embeds, dtype=np.float32))[None]  # (1, n, D)
                logits = self.model(mx.zeros((1, n), dtype=mx.int32), cache=self.cache, input_embeddings=embeds)
            self.n_past += n
        last = logits[0, -1].astype(mx.float32)
        mx.eval(last)
        return np.array(last)

    def truncate(self, n_past: int) -> None:
        from mlx_lm.models.cache import trim_prompt_cache

        if n_past == 0:
            self.cache = self._make_cache()
        elif n_past < self.n_past:
            trim_prompt_cache(self.cache, self.n_past - n_past)
        self.n_past = min(self.n_past, n_past)

    def snapshot(self) -> DecoderState:
        nbytes = sum(getattr(c, "nbytes", 0) for c in self.cache)
        return DecoderState(copy.deepcopy(self.cache), self.n_past, int(nbytes))

    def restore(self, state: DecoderState) -> None:
        self.cache = copy.deepcopy(state.payload)
        self.n_past = state.n_past
