"""GGUF weights per quantization, before any file exists: the type llama.cpp's quantizer gives each tensor (its
default type, the K-quant row-width fallbacks, the mixed Q4_K_M / Q5_K_M layers) and the bytes of each, as
src/llama-quant.cpp decides them at ggml-org/llama.cpp@007dbbf3fd17eefe9b47fee45f48f7ba5e62b714; and an existing
GGUF's tensors (gguf_header.py). No library exposes the quantizer's choice, so it is restated here, pinned to that
commit and checked against real files by tests/test_plan.py."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

# edgevlm's GGUF precisions -> the type llama.cpp's quantizer gives most tensors (llama_ftype_get_default_type)
PRECISION_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K",
                   "q4_k_m": "Q4_K", "q4_0": "Q4_0"}
UNQUANTIZED = ("F32", "F16", "BF16")
MIXED_K_QUANTS = ("q4_k_m", "q5_k_m")  # the two that give attn_v / ffn_down of some layers Q6_K
# tensor_type_fallback: a K-quant whose row width is not a multiple of 256 becomes this legacy quant (32-wide blocks)
K_QUANT_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def ggml_block(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGML type from gguf-py's table: F16 (1, 2), Q8_0 (32, 34)."""
    import gguf

    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    except KeyError:
        raise ValueError(f"unknown GGML type {type_name!r}") from None
    return int(block), int(size)


def row_bytes(type_name: str, n_cols: int) -> int:
    """Bytes of one row of n_cols elements; the row must hold whole blocks (llama.cpp refuses otherwise)."""
    block, size = ggml_block(type_name)
    if n_cols <= 0 or n_cols % block:
        raise ValueError(f"a {type_name} row needs a positive multiple of {block} elements, got {n_cols}")
    return n_cols // block * size


def tensor_bytes(type_name: str, shape: Sequence[int]) -> int:
    """shape in numpy order: the last axis is the row (ggml's ne[0]); every other axis counts rows."""
    return math.prod(int(d) for d in shape[:-1]) * row_bytes(type_name, int(shape[-1]))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp: the first and last eighth of the layers and every third one between get more bits."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None


def _quantizable(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization, the rules a llama-style decoder meets: 2-D+ weights, not norms or router gates."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name \
        and "ffn_gate_inp.weight" not in name


def _fallback(type_name: str, n_cols: int) -> str:
    """tensor_type_fallback: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 when the row is not whole blocks; F16 if even
    that does not divide. Other types have no fallback (llama.cpp fails the quantization)."""
    if n_cols % ggml_block(type_name)[0] == 0:
        return type_name
    if type_name not in K_QUANT_FALLBACK:
        raise ValueError(f"a row of {n_cols} cannot be stored as {type_name} and llama.cpp has no fallback for it")
    fallback = K_QUANT_FALLBACK[type_name]
    return fallback if n_cols % ggml_block(fallback)[0] == 0 else "F16"


def _mixed_type(name: str, n_cols: int, precision: str, default: str, tied: bool, counts: dict) -> str:
    """llama_tensor_get_type_impl for the ftypes edgevlm writes (no imatrix, no MoE, not Falcon)."""
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if n_cols % ggml_block(default)[0]:
            return "Q8_0"
        return default if default == "Q8_0" else "Q6_K"
    layer = _layer(name)
    if precision in MIXED_K_QUANTS and layer is not None:
        # the quantizer visits tensors by layer, so its running attn_v / ffn_down counters equal the layer index
        if ("attn_v.weight" in name or "attn_qkv.weight" in name) and use_more_bits(layer, counts["attn_v"]):
            return "Q6_K"
        if "ffn_down" in name and use_more_bits(layer, counts["layers"]):
            return "Q6_K"
    return default


def gguf_tensor_types(tensors: Sequence[tuple[str, Sequence[int]]], precision: str) -> dict[str, str]:
    """name -> GGML type llama.cpp's quantizer gives each tensor of a decoder at `precision` (shapes in numpy order).
    1-D tensors (norms, biases) stay F32, as edgevlm writes them; output.weight (or token_embd when tied) gets Q6_K
    under any K/legacy quant; Q4_K_M and Q5_K_M give Q6_K to attn_v and ffn_down of the layers use_more_bits picks;
    rows that are not whole 256-blocks fall back (K_QUANT_FALLBACK)."""
    if precision not in PRECISION_TYPES:
        raise ValueError(f"GGUF precision {precision!r} is not one of {tuple(PRECISION_TYPES)}")
    default = PRECISION_TYPES[precision]
    names = [name for name, _ in tensors]
    tied = "output.weight" not in names
    counts = {"attn_v": sum("attn_v.weight" in n or "attn_qkv.weight" in n for n in names),
              "layers": len({_layer(n) for n in names} - {None})}
    types = {}
    for name, shape in tensors:
        if not _quantizable(name, shape):
            types[name] = "F32"
        elif default in UNQUANTIZED:
            types[name] = default
        else:
            n_cols = int(shape[-1])
            types[name] = _fallback(_mixed_type(name, n_cols, precision, default, tied, counts), n_cols)
    return types


def gguf_weight_bytes(tensors: Sequence[tuple[str, Sequence[int]]], precision: str) -> dict[str, int]:
    """name -> bytes of each tensor at `precision` (see gguf_tensor_types); sum the values for the file's tensors."""
    types = gguf_tensor_types(tensors, precision)
    return {name: tensor_bytes(types[name], shape) for name, shape in tensors}


def llama_decoder_tensors(hidden: int, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int,
                          intermediate: int, vocab: int, tied: bool, biases: Sequence[str] = ()) -> list:
    """(name, numpy-order shape) of a llama-style decoder's GGUF tensors, as edgevlm's writer names them."""
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    rows = {"attn_q": q, "attn_k": kv, "attn_v": kv}
    tensors = [("token_embd.weight", (vocab, hidden))]
    for i in range(n_layers):
        tensors += [(f"blk.{i}.attn_norm.weight", (hidden,)), (f"blk.{i}.attn_q.weight", (q, hidden)),
                    (f"blk.{i}.attn_k.weight", (kv, hidden)), (f"blk.{i}.attn_v.weight", (kv, hidden)),
                    (f"blk.{i}.attn_output.weight", (hidden, q)), (f"blk.{i}.ffn_norm.weight", (hidden,)),
                    (f"blk.{i}.ffn_gate.weight", (intermediate, hidden)), (f"blk.{i}.ffn_up.weight", (intermediate, hidden)),
                    (f"blk.{i}.ffn_down.weight", (hidden, intermediate))]
        tensors += [(f"blk.{i}.{b}.bias", (rows[b],)) for b in biases]
    tensors.append(("output_norm.weight", (hidden,)))
    if not tied:
        tensors.append(("output.weight", (vocab, hidden)))
    return tensors


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple  # numpy order (the GGUF header stores ggml order, reversed here)
    type_name: str
    n_bytes: int


def read_gguf_tensors(path: str | Path) -> list[GGUFTensor]:
    """The tensors of an existing GGUF with their exact stored bytes (header only, read once per process)."""
    from ..gguf_header import read_header

    return [GGUFTensor(t.name, t.shape, t.type_name, t.n_bytes) for t in read_header(path).tensors]
