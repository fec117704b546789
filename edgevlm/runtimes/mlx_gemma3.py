"""Gemma 3 on MLX: mlx-lm's gemma3_text weights and layers under edgevlm's own masks. mlx-lm's Gemma3Model builds a
causal mask itself and scales every input row by sqrt(hidden), image rows included; HF (and llama.cpp) scale only
token embeddings and let each image block attend to itself bidirectionally. So this forward embeds and scales the
tokens (in the model's dtype, as HF does), passes image rows as they are, and gives the layers boolean masks:
global layers causal OR "inside this image block"; local layers the same AND the sliding window (key position >
query position - window, which lets a block's rows see the block's later rows, as HF's mask does). Every layer
keeps a full KVCache (not mlx-lm's rotating one), so truncation and snapshots stay exact anywhere."""
from __future__ import annotations


class Gemma3Forward:
    def __init__(self, model):
        import mlx.core as mx

        args = model.args
        self._mx, self.model = mx, model
        self.window, self.every = int(args.sliding_window), int(args.sliding_window_pattern)
        embedding = model.model.embed_tokens
        self.dtype = getattr(embedding, "scales", embedding.weight).dtype
        self.embed_scale = mx.array(args.hidden_size**0.5, mx.float32).astype(self.dtype)

    def make_cache(self) -> list:
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.model.layers]

    def __call__(self, cache: list, inputs=None, input_embeddings=None, block: bool = False):
        """Logits (1, n, V), unevaluated, of n tokens (inputs (1, n)) or image rows (input_embeddings (1, n, D));
        block: the rows are one bidirectional image block."""
        mx, inner = self._mx, self.model.model
        h = inner.embed_tokens(inputs) * self.embed_scale if input_embeddings is None else input_embeddings
        n, offset = h.shape[1], cache[0].offset
        queries = mx.arange(offset, offset + n)[:, None]
        keys = mx.arange(offset + n)[None]
        allowed = keys <= queries
        if block:
            allowed = allowed | (keys >= offset)
        local = allowed & (keys > queries - self.window)
        for i, (layer, layer_cache) in enumerate(zip(inner.layers, cache)):
            h = layer(h, allowed if (i + 1) % self.every == 0 else local, layer_cache)
        out = inner.norm(h)
        if self.model.tie_word_embeddings:
            return inner.embed_tokens.as_linear(out)
        return self.model.lm_head(out)
