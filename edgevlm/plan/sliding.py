"""KV bytes of a decoder with local (sliding-window) layers (Gemma 3): llama.cpp's SWA cache gives each local layer
only `window x n_seq + n_ubatch` cells (padded to 256, at most the context) while the global layers hold every
position, and a decode step reads at most the window from a local layer. A decoder without local layers: all
layers hold (and read) every position, budget.kv_cache_bytes as before."""
from __future__ import annotations

from ..manifest import DecoderSpec
from .budget import LLAMA_CTX_PAD, kv_cache_bytes


def layer_split(spec: DecoderSpec) -> tuple[int, int]:
    """(global layers, local layers)."""
    if not spec.sliding_window or not spec.global_every:
        return spec.n_layers, 0
    n_global = spec.n_layers // spec.global_every
    return n_global, spec.n_layers - n_global


def kv_bytes(spec: DecoderSpec, positions: int, kv_type: str, n_seq: int = 1, n_ubatch: int = 0,
             reading: bool = False) -> int:
    """KV bytes of `positions` per sequence over n_seq sequences: held in the cache (reading=False: the local layers'
    SWA cells, window x n_seq + n_ubatch padded) or read by one decode step of each sequence (reading=True)."""
    n_global, n_local = layer_split(spec)
    total = kv_cache_bytes(n_global, spec.n_kv_heads, spec.head_dim, positions, kv_type, n_seq) if n_global else 0
    if n_local:
        window = spec.sliding_window * n_seq + (0 if reading else n_ubatch)
        if not reading:
            window = -(-window // LLAMA_CTX_PAD) * LLAMA_CTX_PAD
        cells = min(positions * n_seq, window)
        total += kv_cache_bytes(n_local, spec.n_kv_heads, spec.head_dim, cells, kv_type)
    return total
