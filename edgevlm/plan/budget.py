"""The arithmetic of a memory and speed budget: KV cache, GGUF weights per quantization, image positions, llama.cpp's
compute buffer, the encoder's activations, the decode roofline, and the itemised plan with its verdict (GGUF weights
per quantization: gguf_weights.py).

Pure functions of shapes and counts (no torch, no transformers; gguf-py only for its block-size table). All sizes are
bytes. llama.cpp rules are cited from ggml-org/llama.cpp@007dbbf3fd17eefe9b47fee45f48f7ba5e62b714
(src/llama-quant.cpp, src/llama-context.cpp)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Sequence

from ..layout import ImageLayout
from .gguf_weights import (  # noqa: F401 - the budget's names for the GGUF weight arithmetic
    K_QUANT_FALLBACK, MIXED_K_QUANTS, PRECISION_TYPES, UNQUANTIZED, GGUFTensor, ggml_block, gguf_tensor_types,
    gguf_weight_bytes, llama_decoder_tensors, read_gguf_tensors, row_bytes, tensor_bytes, use_more_bits,
)
from ..preprocess import PreprocessSpec, tile_grid

MIB = 1 << 20
GIB = 1 << 30
LLAMA_CTX_PAD = 256  # llama-context.cpp: cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)
KV_TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}  # --kv-type -> GGML type
# Decode reaches this fraction of the bandwidth roofline. Measured copy bandwidth (this-machine, the figure `edgevlm
# bench` measures), by the decoder's weight type, since llama.cpp's CPU kernels spend more compute per byte on
# sub-8-bit quants (K-quant super-block scales, 4/5/6-bit unpacking) than on Q8_0 or F16: the mean of two machines'
# medians of the bench's llama.cpp decode fractions (roofline.fraction in bench.json), so neither machine's spread
# sets it alone:
#   8-bit and wider (q8_0): Intel Xeon (Sapphire Rapids VM, benchmarks/results w1 0.48, w1-split 0.42, w2 0.59 / 0.46;
#     median 0.47) and AMD EPYC (Zen 4 VM, 2026-12-01: w1 0.65 / 0.61, w1-split 0.63, w2 0.71 / 0.70; median 0.65)
#     -> 0.55 (was 0.45, the Xeon alone, both kinds of quant pooled).
#   below 8 bits (q4_k_m): Xeon w2 0.35 / 0.27 (median 0.31), EPYC w1 0.53 / 0.44, w2 0.45 / 0.45 (median 0.45) -> 0.38.
# Published peak bandwidth (the device table): 0.55, the low end of the 0.55-0.8 the notes give (serve-plan-scale.md
# 2.4; jetson-mem-bench: 60-80 % of peak sustained).
DECODE_EFFICIENCY_MEASURED = 0.55  # q8_0, f16, bf16, f32
DECODE_EFFICIENCY_MEASURED_SUB8BIT = 0.38  # q6_k, q5_k_m, q4_k_m, q4_0
DECODE_EFFICIENCY_PEAK = 0.55
WIDE_PRECISIONS = ("q8_0", "f16", "bf16", "f32")
# The ONNX encoder's activations per tile in one run, per input pixel, for bundles exported before the exporter measured
# them (a bundle's details.activation_bytes_per_tile, edgevlm.plan.probe, is preferred): ~197 MiB per 512x512 tile
# (SigLIP-B/16, SmolVLM-256M int8, ORT CPU: process peaks of 495/706/1,086 MiB at 1/2/4 tiles per run,
# runtimes/onnx_encoder.py). Linear in pixels; attention grows with the square of the patch count, so larger tiles are
# under-estimated. The probe measured 216 MiB (int8, 864 B/px) and 280 MiB (fp32, 1,121 B/px) per 512x512 tile on
# the AMD EPYC VM (2026-12-01, w1 bundle's manifest); the constant is kept as the fallback it was documented as.
ENCODER_ACTIVATION_BYTES_PER_PIXEL = 788
# What a runtime process holds before any model. CPU: RUNTIME_BASELINE_BYTES, measured (`python -m edgevlm.plan.probe
# runtime`: Python, numpy, onnxruntime, llama.cpp with its backend initialised, edgevlm's runtime modules): 68.1 MiB
# on the AMD EPYC VM, 2026-12-01 (the bench's own figure before loading is 34-39 MiB: it has not imported the two
# runtimes yet), plus what opening a bundle's tokenizer and llama.cpp context adds beyond the weights and the KV
# cache (stage by stage in one process, same machine and day): the tokenizers library and the reference model's
# tokenizer + context (vocabulary 419) 5.6 + 1.6 + 4.4 -> RUNTIME_CPU_SESSION_BYTES, 12 MiB; SmolVLM-256M's
# (vocabulary 49,280) adds 9.7 MiB of tokenizer and 12-19 MiB of llama.cpp vocabulary and context over those, ~500 B
# per vocabulary token -> RUNTIME_BYTES_PER_VOCAB_TOKEN, 512 (runtime_overhead_bytes). ORT's session and thread
# pool are in the encoder's measured resident bytes. It was 320 MiB until 2026-12-01 (38 MiB before load + ~274 MiB of "library and
# session setup", W1 on the Xeon), which also held ORT's prepacked weights and arena: counted twice with the encoder
# items. GPU targets add a CUDA context and cuBLAS workspaces (0.5 GB, the notes' unverified default); apple-silicon
# keeps the old CPU figure (not measured on a Mac).
RUNTIME_BASELINE_BYTES = 68 * MIB
RUNTIME_CPU_SESSION_BYTES = 12 * MIB
RUNTIME_BYTES_PER_VOCAB_TOKEN = 512
RUNTIME_OVERHEAD_BYTES = {"cpu": RUNTIME_BASELINE_BYTES + RUNTIME_CPU_SESSION_BYTES, "apple-silicon": 320 * MIB,
                          "cuda": 512 * MIB, "jetson-orin": 512 * MIB}


def runtime_overhead_bytes(target: str, vocab_size: int) -> int:
    """The runtime_overhead item: on a CPU the measured baseline + session + the vocabulary's share; elsewhere the
    per-target estimate (RUNTIME_OVERHEAD_BYTES)."""
    if target not in RUNTIME_OVERHEAD_BYTES:
        raise ValueError(f"target {target!r} is not one of {tuple(RUNTIME_OVERHEAD_BYTES)}")
    if vocab_size < 0:
        raise ValueError("vocab_size must be 0 or more")
    if target != "cpu":
        return RUNTIME_OVERHEAD_BYTES[target]
    return RUNTIME_OVERHEAD_BYTES["cpu"] + RUNTIME_BYTES_PER_VOCAB_TOKEN * vocab_size


def decode_efficiency(precision: str, bandwidth_measured: bool) -> float:
    """The roofline fraction decode_tokens_per_second applies: DECODE_EFFICIENCY_PEAK against a published peak; against
    a measured copy bandwidth, DECODE_EFFICIENCY_MEASURED for 8-bit and wider weights, _SUB8BIT below."""
    if not bandwidth_measured:
        return DECODE_EFFICIENCY_PEAK
    return DECODE_EFFICIENCY_MEASURED if precision in WIDE_PRECISIONS else DECODE_EFFICIENCY_MEASURED_SUB8BIT


def image_input_bytes(n_tiles: int, channels: int, tile_height: int, tile_width: int) -> int:
    """The preprocessed pixels of one image at their peak: each tile normalised to f32 on its own, then stacked into
    the (tiles, C, H, W) batch the encoder takes, both held at the stack (preprocess.py): 2 x tiles x C x H x W x 4;
    a single tile is not stacked (1 x). W1-split's 17 tiles of 3x512x512: 107 MB, most of the difference between its
    peak RSS and W1's one tile once the caches and the compute buffer are counted."""
    if min(n_tiles, channels, tile_height, tile_width) <= 0:
        raise ValueError("tiles, channels and the tile size must be positive")
    return (2 if n_tiles > 1 else 1) * n_tiles * channels * tile_height * tile_width * 4


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int, kv_type: str = "f16",
                   n_seq: int = 1) -> int:
    """K and V of every layer: 2 x n_layers x [n_ctx * n_seq positions, n_kv_heads * head_dim] in kv_type.
    30 layers, 3 KV heads of 64, 4096 positions, f16: 2*30*4096*192*2 = 94,371,840 (llama.cpp logs 90.00 MiB)."""
    if kv_type not in KV_TYPES:
        raise ValueError(f"kv_type {kv_type!r} is not one of {tuple(KV_TYPES)}")
    if min(n_layers, n_kv_heads, head_dim, n_ctx, n_seq) <= 0:
        raise ValueError("layers, KV heads, head_dim, n_ctx and n_seq must be positive")
    return 2 * n_layers * n_ctx * n_seq * row_bytes(KV_TYPES[kv_type], n_kv_heads * head_dim)


def llama_cpp_n_ctx(context: int, n_seq: int = 1) -> int:
    """The KV positions llama.cpp allocates for n_seq sequences of `context`: the total, padded up to 256."""
    total = context * n_seq
    return -(-total // LLAMA_CTX_PAD) * LLAMA_CTX_PAD


# --- images --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTokens:
    rows: int  # the split (0, 0 = one global tile)
    cols: int
    n_tiles: int  # encoder inputs, the global view or thumbnail included
    image_rows: int  # embedding rows the encoder gives: n_tiles x tokens_per_tile
    text_tokens: int  # the layout's markers: row/col tokens, newlines, wrappers
    exact: bool  # text_tokens counted by the bundle's tokenizer (else assumed: one token per marker and newline)

    @property
    def positions(self) -> int:
        return self.image_rows + self.text_tokens


def _assumed_text_tokens(layout: ImageLayout, rows: int, cols: int) -> int:
    """Markers of ImageLayout.expand, one token each (true for SmolVLM's tokenizer, where "\\n\\n" is two tokens)."""
    if layout.kind in ("repeat", "grid", "anyres"):  # grid: the template writes <|vision_start|>/<|vision_end|>, not the layout
        return 0
    if layout.kind == "wrapped":
        return 2  # start + end
    if rows == 0 and cols == 0:
        return 3  # <fake><global-img> ... <fake>
    return rows * cols * 2 + rows + 4  # <fake><row_r_col_c> per tile, "\n" per row, "\n<fake><global-img>" ... "<fake>"


def image_tokens(layout: ImageLayout, preprocess: PreprocessSpec, width: int, height: int,
                 count_text: Callable[[str], int] | None = None) -> ImageTokens:
    """Decoder positions one width x height image takes: the tile grid the preprocessing picks (tile_grid), the
    embedding rows of its tiles and the layout's text around them. count_text(text) -> tokens (the bundle's tokenizer
    without special tokens) makes the count exact; merges with the prompt text around the placeholder are not seen."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    rows, cols = tile_grid(height, width, preprocess)
    n_tiles = layout.n_tiles(rows, cols)
    image_rows = n_tiles * layout.tokens_per_tile
    if preprocess.resize_rule == "anyres":  # packed rows: unpadded to the image's aspect, pooled above the max
        image_rows = preprocess.anyres_rows(height, width)
    if count_text is None:
        return ImageTokens(rows, cols, n_tiles, image_rows, _assumed_text_tokens(layout, rows, cols), False)
    text = layout.expand(rows, cols, image_rows)
    return ImageTokens(rows, cols, n_tiles, image_rows, count_text(text) - image_rows, True)


def largest_image(preprocess: PreprocessSpec) -> tuple[int, int]:
    """(width, height) of the largest square image the preprocessing keeps: the worst case when none is given."""
    tile_h, tile_w = preprocess.tile_size
    if preprocess.resize_rule == "qwen2vl":  # native resolution: the square max_pixels allows, in whole merge blocks
        side = math.isqrt(preprocess.max_pixels) // tile_w * tile_w
        return side, side
    if preprocess.resize_rule == "idefics3" and preprocess.image_splitting:
        return preprocess.longest_edge, preprocess.longest_edge
    if preprocess.resize_rule == "internvl":
        side = math.isqrt(preprocess.max_tiles)
        return tile_w * side, tile_h * side
    if preprocess.resize_rule == "anyres":  # an image of a pinpoint's exact size fills its grid (nothing unpadded);
        # the most rows are not always the largest grid's: pooling shrinks the large ones
        height, width = max(preprocess.grid_pinpoints, key=lambda p: (preprocess.anyres_rows(*p), p[0] * p[1]))
        return width, height
    return tile_w, tile_h


def cap_tiles(preprocess: PreprocessSpec, cap: int | None) -> PreprocessSpec:
    """The preprocessing with at most `cap` tiles per image (the global view / thumbnail included), as the processor's
    own knob sets it: idefics3 longest_edge = n tiles (an n x n split + the global view: n^2 + 1 <= cap; n = 1 is the
    global view alone), internvl max_patches (a grid of m tiles + the thumbnail: m + 1 <= cap; m = 1 has no
    thumbnail). One-tile rules are unchanged; a native-resolution rule (qwen2vl) has no tiles to cap: its knob is the
    image size (or max_pixels)."""
    from ..errors import BadInputError

    if cap is None:
        return preprocess
    if cap < 1:
        raise BadInputError(f"--max-tiles must be 1 or more, got {cap}")
    if preprocess.resize_rule == "qwen2vl":
        raise BadInputError("--max-tiles caps tiled models; a native-resolution model (qwen2vl) has no tiles: pass a "
                            "smaller --image-size instead")
    if preprocess.resize_rule == "idefics3" and preprocess.image_splitting:
        side = math.isqrt(cap - 1) if cap > 1 else 1
        edge = max(1, side) * preprocess.tile_size[0]
        return replace(preprocess, longest_edge=min(preprocess.longest_edge, edge))
    if preprocess.resize_rule == "internvl":
        grid = cap - 1 if cap >= 3 else 1
        return replace(preprocess, max_tiles=min(preprocess.max_tiles, grid),
                       min_tiles=min(preprocess.min_tiles, grid))
    return preprocess


def patch_input_bytes(patches: int, preprocess: PreprocessSpec, channels: int = 3) -> int:
    """A native-resolution image's preprocessed pixels at their peak: the normalised f32 image and its patches
    (patches x C*T*p*p, the frame repeated temporal_patch_size times: preprocess._patchify copies), both held:
    4 x patches x C x p^2 x (1 + T)."""
    if patches <= 0:
        raise ValueError("patches must be positive")
    return 4 * patches * channels * preprocess.patch_size**2 * (1 + preprocess.temporal_patch_size)


def grid_activation_fit(points: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(a, b) of bytes = a x P + b x P^2 through a grid encoder's measured (patches, bytes) pairs (the export probe,
    details.activation_bytes_at_patches): the linear part is the per-patch tensors (Q/K/V, the MLP, residuals), the
    quadratic part the (P, P) attention scores and masks of every block. Two points: the exact solution; a negative
    coefficient (measurement noise) is dropped and the other one refitted through the larger image, so the fit never
    falls below the larger measurement there. One point: linear (b = 0), an under-estimate above it."""
    measured = sorted((int(p), int(n)) for p, n in points if int(p) > 0 and int(n) >= 0)
    if not measured:
        raise ValueError("a grid activation fit needs at least one (patches, bytes) point with patches > 0")
    p2, n2 = measured[-1]
    if len(measured) == 1 or measured[0][0] == p2:
        return n2 / p2, 0.0
    p1, n1 = measured[0]
    b = (n2 / p2 - n1 / p1) / (p2 - p1)
    a = n1 / p1 - b * p1
    if b < 0:
        return max(n1 / p1, n2 / p2), 0.0
    if a < 0:
        return 0.0, n2 / p2**2
    return a, b


def grid_activation_bytes(points: Sequence[Sequence[int]], patches: int) -> int:
    """A grid encoder's activation peak for one image of `patches` patches, from the measured points (see
    grid_activation_fit)."""
    if patches <= 0:
        raise ValueError("patches must be positive")
    a, b = grid_activation_fit(points)
    return int(a * patches + b * patches * patches)


def encoder_activation_bytes(n_tiles: int, tiles_per_run: int, tile_height: int, tile_width: int,
                             bytes_per_tile: int | None = None) -> int:
    """The encoder's activation peak: the tiles of one run (the runtime encodes tiles_per_run at a time) at
    bytes_per_tile each (a measured figure when the bundle has one, else ENCODER_ACTIVATION_BYTES_PER_PIXEL)."""
    if min(n_tiles, tiles_per_run, tile_height, tile_width) <= 0:
        raise ValueError("tiles, tiles per run and the tile size must be positive")
    per_tile = bytes_per_tile if bytes_per_tile is not None else ENCODER_ACTIVATION_BYTES_PER_PIXEL * tile_height * tile_width
    return min(n_tiles, tiles_per_run) * int(per_tile)


# --- llama.cpp compute buffer and decode speed ---------------------------------------------------------------


def llama_cpp_compute_buffer_bytes(n_vocab: int, n_embd: int, n_heads: int, n_ctx: int, n_ubatch: int = 512,
                                   flash_attn: bool = False, n_outputs: int = 1) -> int:
    """llama.cpp's compute buffer, reserved for a full ubatch: the peak of the attention scratch and the logits, since
    ggml-alloc reuses memory between them (Ollama's GraphSize for llama-style models, fs/ggml/ggml.go):
        attention = 4 * ub * (1 + 4*d + n_ctx*(1 + H))   # f32 KQ scores [n_ctx, ub, H] + mask + [d, ub] activations
        logits    = 4 * ub * (d + V)                     # f32 logits [V, ub] and the last hidden state
    With flash attention the KQ scores are never materialised: attention = 4*ub*(1 + 4*d) + 2*ub*n_ctx (f16 mask;
    derived). Plus the output buffer, V f32 logits per output sequence. Checked here (llama-cpp-python 0.3.36, CPU,
    SmolVLM-256M q8_0, ub 512): 99.6 MiB measured vs 97.4 at n_ctx 4096, 166.4 vs 164.5 at 8192, 98.5 vs 97.4 with
    flash attention; Ollama found the formula off by up to 2x on GPUs (ollama#10359), so treat it as an estimate."""
    if min(n_vocab, n_embd, n_heads, n_ctx, n_ubatch, n_outputs) <= 0:
        raise ValueError("vocabulary, widths, heads, n_ctx, n_ubatch and n_outputs must be positive")
    if flash_attn:
        attention = 4 * n_ubatch * (1 + 4 * n_embd) + 2 * n_ubatch * n_ctx
    else:
        attention = 4 * n_ubatch * (1 + 4 * n_embd + n_ctx * (1 + n_heads))
    logits = 4 * n_ubatch * (n_embd + n_vocab)
    return max(attention, logits) + 4 * n_vocab * n_outputs


def llama_cpp_compute_in_use_bytes(n_vocab: int, n_embd: int, n_heads: int, positions: int, n_ubatch: int = 512,
                                   flash_attn: bool = False) -> int:
    """The part of llama.cpp's compute buffer one request's graphs write, which is what a CPU keeps resident (the buffer
    is reserved whole, but untouched pages of a large malloc are never mapped): the attention scratch of its largest
    ubatch, min(n_ubatch, positions) rows, over the KV span it reaches (positions padded to 256), and one position's
    logits (a prompt's graphs ask for the last position's only). llama_cpp_compute_buffer_bytes is the worst case the
    reservation is sized for: a full ubatch of logits, attention over the whole n_ctx."""
    if positions <= 0:
        raise ValueError("positions must be positive")
    n_kv = -(-positions // LLAMA_CTX_PAD) * LLAMA_CTX_PAD
    ub = min(n_ubatch, positions)
    if flash_attn:
        attention = 4 * ub * (1 + 4 * n_embd) + 2 * ub * n_kv
    else:
        attention = 4 * ub * (1 + 4 * n_embd + n_kv * (1 + n_heads))
    return max(attention, 4 * (n_embd + n_vocab)) + 4 * n_vocab


def decode_tokens_per_second(weight_bytes: int, kv_bytes_read: float, bandwidth_gbs: float,
                             efficiency: float = DECODE_EFFICIENCY_PEAK) -> float:
    """Decode steps per second: the bandwidth roofline (plan/roofline.py: bandwidth / (weights + KV read per step))
    times the sustained efficiency (DECODE_EFFICIENCY_PEAK for published peaks, _MEASURED for measured copies)."""
    from .roofline import roofline

    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency must be in (0, 1], got {efficiency}")
    return roofline(bandwidth_gbs, int(weight_bytes), float(kv_bytes_read), 0.0).ceiling_tok_s * efficiency


# --- the plan ------------------------------------------------------------------------------------------------


def default_margin_bytes(memory_bytes: int) -> int:
    """llama.cpp --fit-target's 1 GiB; 0.5 GiB on devices of 8 GiB or less (serve-plan-scale.md 2.4)."""
    return GIB // 2 if memory_bytes <= 8 * GIB else GIB


VERDICTS = ("fits", "tight", "does not fit")


@dataclass(frozen=True)
class MemoryPlan:
    """What one decoder x encoder option needs on a device, item by item (bytes)."""

    decoder_weights: int
    encoder_weights: int
    encoder_activations: int
    kv_cache: int
    compute_buffer: int
    caches: int  # the embedding and prefix caches' byte bounds (resident at worst); one request: what it puts there
    runtime_overhead: int
    margin: int  # headroom kept free (other processes, allocator slack, formula error)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MemoryPlan.{f.name} must be a non-negative int of bytes, got {value!r}")

    @property
    def needed(self) -> int:
        """Everything but the margin."""
        return sum(getattr(self, f.name) for f in fields(self)) - self.margin

    @property
    def total(self) -> int:
        return self.needed + self.margin

    def verdict(self, usable_bytes: int) -> str:
        """fits: needed + margin <= usable; tight: only by eating into the margin; else does not fit."""
        if self.total <= usable_bytes:
            return "fits"
        return "tight" if self.needed <= usable_bytes else "does not fit"

    def to_dict(self) -> dict:
        return {**asdict(self), "needed": self.needed, "total": self.total}
