"""Qwen2-VL / Qwen2.5-VL's M-RoPE forward over an mlx-lm `qwen2` model and its KVCache.

mlx-lm 0.32 has no M-RoPE text model: its qwen2 attention rotates at `cache.offset`, one position per row, which is
wrong for image rows (t, row, col) and for text after an image (it continues at pos0 + max(h', w'), not at the row
count). This module runs the same layers with rotary angles built from explicit (L, 3) positions, as HF's
`Qwen2VLRotaryEmbedding` does: frequency i of section s (of `mrope_section`) takes its angle from axis s % 3, and the
rotation is rotate-half (NEOX). Every projection is the model's own module, so 8/4-bit quantized layers work
unchanged. Written against mlx-lm 0.32's `models/qwen2.py` attribute names (pinned); mlx only, no torch.

Qwen3-VL (mlx-lm's `qwen3` weights: QK-norm per head) takes the sections interleaved (frequency i: row when
i % 3 == 1 and i < 3 * section[1], col when i % 3 == 2 and i < 3 * section[2], else t: HF's
Qwen3VLTextRotaryEmbedding) and DeepStack: image rows carry k more slices, slice i + 1 added to the hidden states
after layer i at the rows' positions."""
from __future__ import annotations

from typing import Any, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention


class MRopeForward:
    """Callable over one loaded mlx-lm qwen2 `Model`: (positions, tokens or embeddings, cache) -> logits."""

    def __init__(self, model: Any, mrope_section: Sequence[int], interleaved: bool = False, deepstack_layers: int = 0):
        self.model = model
        args = model.args
        # mlx-lm's qwen2 has no head_dim field; its qwen3 has one
        head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
        self.deepstack_layers = int(deepstack_layers)
        section = [int(s) for s in mrope_section]
        if sum(section) != head_dim // 2:
            raise ValueError(f"mrope_section {section} sums to {sum(section)}, but head_dim {head_dim} has "
                             f"{head_dim // 2} rotary frequencies")
        # axis (0 = t, 1 = row, 2 = col) that drives each rotary frequency: HF's recomposition_frequencies
        self.axes = mx.array(_interleaved_axes(section) if interleaved else
                             np.concatenate([np.full(n, s % 3) for s, n in enumerate(section)]).astype(np.int32))
        # float32 as HF computes it, so angles match its reference bit for bit where possible
        exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        self.inv_freq = mx.array(np.float32(1.0) / (np.float32(args.rope_theta) ** exponent))  # (d/2,)

    def cos_sin(self, positions: mx.array) -> tuple[mx.array, mx.array]:
        """(L, 3) int positions -> cos, sin of shape (L, d), float32."""
        chosen = positions[:, self.axes].astype(mx.float32)  # (L, d/2): each frequency's own axis
        angles = chosen * self.inv_freq  # (L, d/2)
        angles = mx.concatenate([angles, angles], axis=-1)  # (L, d): rotate-half pairs i and i + d/2
        return mx.cos(angles), mx.sin(angles)

    def __call__(self, positions: mx.array, cache: list, inputs: mx.array | None = None,
                 input_embeddings: mx.array | None = None, deepstack: mx.array | None = None) -> mx.array:
        """positions (L, 3) int32; inputs (1, L) token ids or input_embeddings (1, L, D); deepstack (1, L, k, D): the
        image rows' slices; cache: one KVCache per layer, extended in place. Returns logits (1, L, V)."""
        inner = self.model.model
        h = input_embeddings if input_embeddings is not None else inner.embed_tokens(inputs)  # (1, L, D)
        cos, sin = self.cos_sin(positions)
        cos, sin = cos.astype(h.dtype), sin.astype(h.dtype)  # HF casts cos/sin to the activations' dtype too
        # causal over cache rows: within one image, sequence order equals HF's mask (positions do not order rows)
        mask = create_attention_mask(h, cache[0])
        for index, (layer, layer_cache) in enumerate(zip(inner.layers, cache)):
            h = h + _attention(layer.self_attn, layer.input_layernorm(h), cos, sin, mask, layer_cache)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if deepstack is not None and index < deepstack.shape[2]:
                h = h + deepstack[:, :, index].astype(h.dtype)
        h = inner.norm(h)
        if self.model.args.tie_word_embeddings:
            return inner.embed_tokens.as_linear(h)
        return self.model.lm_head(h)


def _interleaved_axes(section: list[int]) -> np.ndarray:
    """The axis of each rotary frequency under interleaved M-RoPE (HF's Qwen3VLTextRotaryEmbedding)."""
    index = np.arange(sum(section))
    axes = np.zeros(len(index), dtype=np.int32)  # t unless overwritten
    axes[(index % 3 == 1) & (index < 3 * section[1])] = 1
    axes[(index % 3 == 2) & (index < 3 * section[2])] = 2
    return axes


def _rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half RoPE: x (B, H, L, d), cos/sin (L, d)."""
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # (B, H, L, d)
    return x * cos + rotated * sin


def _attention(attn: Any, x: mx.array, cos: mx.array, sin: mx.array, mask: Any, cache: Any) -> mx.array:
    """mlx-lm qwen2 `Attention.__call__` with explicit rotary angles in place of `rope(offset=cache.offset)`."""
    B, L, _ = x.shape
    queries = attn.q_proj(x).reshape(B, L, attn.n_heads, -1)  # (B, L, H, d)
    keys = attn.k_proj(x).reshape(B, L, attn.n_kv_heads, -1)  # (B, L, Hkv, d)
    if hasattr(attn, "q_norm"):  # qwen3: RMS norm per head before the rotation
        queries, keys = attn.q_norm(queries), attn.k_norm(keys)
    queries, keys = queries.transpose(0, 2, 1, 3), keys.transpose(0, 2, 1, 3)  # (B, H, L, d)
    values = attn.v_proj(x).reshape(B, L, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)  # (B, Hkv, L, d)
    queries, keys = _rotate(queries, cos, sin), _rotate(keys, cos, sin)
    keys, values = cache.update_and_fetch(keys, values)  # (B, Hkv, rows, d): the cache stores rotated keys
    out = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))  # (B, L, D)
