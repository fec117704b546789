"""The decode roofline: a decoder must read its weights (and the KV cache) once per token, so memory bandwidth /
bytes read per token bounds tokens/s (bandwidth: machine.measure_bandwidth_gbs). The one home of the bytes-per-token
arithmetic: the planner and the bench both read it."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, context: int, bytes_per_value: float) -> float:
    """KV read for one decoded token at a context of `context` positions: K and V of every layer."""
    return 2.0 * n_layers * n_kv_heads * head_dim * context * bytes_per_value


def gguf_weight_bytes_per_token(path: str | Path) -> int:
    """Bytes of the tensors one decode step reads (gguf_header.GGUFHeader.bytes_per_token)."""
    from ..gguf_header import read_header

    return read_header(path).bytes_per_token()


def torch_weight_bytes_per_token(decoder) -> int:
    tied = decoder.config.tie_word_embeddings
    total = 0
    seen: set[int] = set()
    for name, p in decoder.named_parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if name == "model.embed_tokens.weight" and not tied:
            continue
        total += p.numel() * p.element_size()
    return total


@dataclass
class Roofline:
    bandwidth_gbs: float
    weight_bytes: int
    kv_bytes: float
    ceiling_tok_s: float
    measured_tok_s: float
    fraction: float

    def to_dict(self) -> dict:
        return asdict(self)


def roofline(bandwidth_gbs: float, weight_bytes: int, kv_bytes: float, measured_tok_s: float) -> Roofline:
    per_token = weight_bytes + kv_bytes
    if per_token <= 0 or bandwidth_gbs <= 0:
        raise ValueError("bandwidth and bytes per token must be positive")
    ceiling = bandwidth_gbs * 1e9 / per_token
    return Roofline(bandwidth_gbs, int(weight_bytes), float(kv_bytes), ceiling, measured_tok_s, measured_tok_s / ceiling)
