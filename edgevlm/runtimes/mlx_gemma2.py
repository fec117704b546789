"""Gemma 2 on MLX (PaliGemma 2's decoder): mlx-lm's gemma2 weights and layers under edgevlm's own masks. mlx-lm's
GemmaModel has no sliding window (every layer attends to everything before it), takes no embedding rows, and scales
every input row by sqrt(hidden); HF scales only token embeddings, windows the local layers (even ones) and, for a
prefix-LM prompt, lets every prompt row see every other. So this forward embeds and scales the tokens (in the
model's dtype, as HF does), passes image rows as they are, runs one call per prompt with boolean masks: the prompt
block all-visible (HF's block overlay wins over the window); after it causal, windowed on local layers; and applies
the final soft-capping. Every layer keeps a full KVCache, so truncation and snapshots stay exact anywhere.

Not mlx-vlm 0.7.10's paligemma language model (issue 33 checked it): it gives every layer one mask (no sliding
window) and scales every input row, image rows included, by sqrt(hidden). On a tiny PaliGemma 2, 40-token text
prompt, against HF: NMSE 1.03 (argmax 25%) with window 8, 2.9e-4 with window 256; the fp32 gate is 1e-5."""
from __future__ import annotations


class Gemma2Forward:
    def __init__(self, model, sliding_window: int | None):
        import mlx.core as mx

        args = model.args
        self._mx, self.model = mx, model
        self.window = int(sliding_window) if sliding_window else None
        embedding = model.model.embed_tokens
        self.dtype = getattr(embedding, "scales", embedding.weight).dtype
        self.embed_scale = mx.array(args.hidden_size**0.5, mx.float32).astype(self.dtype)
        self.cap = float(args.final_logit_softcapping)

    def make_cache(self) -> list:
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.model.layers]

    def embed(self, ids):
        """(1, n) token ids -> (1, n, D) scaled embeddings, as HF's Gemma2TextScaledWordEmbedding."""
        return self.model.model.embed_tokens(ids) * self.embed_scale

    def __call__(self, cache: list, h, block: bool = False):
        """Logits (1, n, V), unevaluated, of n input rows h (1, n, D) continuing the cache; block: the rows are one
        bidirectional prefix (a prompt into an empty cache)."""
        mx, inner = self._mx, self.model.model
        n, offset = h.shape[1], cache[0].offset
        queries = mx.arange(offset, offset + n)[:, None]
        keys = mx.arange(offset + n)[None]
        allowed = keys <= queries
        local = allowed if self.window is None else allowed & (keys > queries - self.window)
        if block:
            allowed = local = allowed | (keys >= offset)
        for i, (layer, layer_cache) in enumerate(zip(inner.layers, cache)):
            h = layer(h, local if i % 2 == 0 else allowed, layer_cache)  # HF: even layers local, odd global
        out = inner.embed_tokens.as_linear(inner.norm(h))
        return mx.tanh(out / self.cap) * self.cap
