"""A bundle's plan on one device: for every GGUF decoder x ONNX encoder in the bundle, the memory it needs (exact
weight bytes from the files, the rest from budget.py), the verdict against the device's usable memory, and the
predicted decode speed. Numbers are bytes; each option says which items are measured, exact or estimated."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BadInputError, BundleError
from . import budget
from .devices import Device

# most accurate first: the recommendation is the first option that fits with its margin
DECODER_ACCURACY = ("gguf:f32", "gguf:bf16", "gguf:f16", "gguf:q8_0", "gguf:q6_k", "gguf:q5_k_m", "gguf:q4_k_m",
                    "gguf:q4_0")
ENCODER_ACCURACY = ("onnx:fp32", "onnx:fp16", "onnx:int8")
KV_TYPE = "f16"  # what the llama.cpp decoder allocates outside parity mode (runtimes/llamacpp_decoder.py)
BASIS = {
    "decoder_weights": "exact: the GGUF's tensor bytes",
    "encoder_weights": "exact: the ONNX graph file (+ external data) the runtime loads",
    "encoder_activations": "estimate: tiles per run x per-tile activations, plus the images' embeddings",
    "kv_cache": "exact formula: llama.cpp's padded n_ctx x layers x KV heads x head_dim, f16",
    "compute_buffer": "formula: llama.cpp's logits / attention scratch for one ubatch (about +-5% on CPU here)",
    "caches": "the embedding and prefix cache bounds (host memory; not counted on a discrete GPU)",
    "runtime_overhead": "estimate: process, libraries and runtime contexts per target",
    "margin": "headroom: 1 GiB, 0.5 GiB on devices of 8 GiB or less",
}


@dataclass(frozen=True)
class PlanRequest:
    images: int = 1
    image_size: tuple[int, int] | None = None  # (width, height); None: the largest the preprocessing keeps
    context: int | None = None  # per sequence; None: the runtime's default
    parallel: int = 1
    embed_cache_bytes: int | None = None
    prefix_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.images < 0:
            raise BadInputError(f"--images must be 0 or more, got {self.images}")
        if self.parallel < 1:
            raise BadInputError(f"--parallel must be 1 or more, got {self.parallel}")
        if self.context is not None and self.context < 16:
            raise BadInputError(f"--context must be at least 16 positions, got {self.context}")


@dataclass
class Option:
    decoder: str
    encoder: str
    memory: budget.MemoryPlan
    verdict: str
    decode_tok_s: float  # per sequence, with the images in the KV cache
    decode_tok_s_full: float  # per sequence, every sequence at a full context
    weight_bytes_per_token: int

    def to_dict(self) -> dict:
        return {"decoder": self.decoder, "encoder": self.encoder, "memory": self.memory.to_dict(),
                "verdict": self.verdict, "decode_tok_s": self.decode_tok_s,
                "decode_tok_s_full_context": self.decode_tok_s_full,
                "weight_bytes_per_token": self.weight_bytes_per_token}


def resolve_context(requested: int | None, context_length: int, default: int) -> int:
    """The context per sequence: the runtime's default (at most the model's) unless asked; never past the model's."""
    if requested is None:
        return min(context_length, default)
    if requested > context_length:
        raise BadInputError(f"--context {requested} is more than this model supports ({context_length} positions); "
                            f"use --context {context_length} or less")
    return requested


def parse_image_size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height): the bench's parser, with the planner's own bound on the sides."""
    from ..bench.harness import parse_size

    width, height = parse_size(text)
    if max(width, height) > 1 << 16:
        raise BadInputError(f"--image-size sides must be 1..65536 pixels, got {text!r}")
    return width, height


def _text_counter(bundle: Path, manifest):
    """The bundle's tokenizer as a token counter, or None when it cannot be opened (the count is then assumed)."""
    from ..runtimes.tokenizer import BundleTokenizer

    try:
        tokenizer = BundleTokenizer(bundle / manifest.tokenizer["path"])
    except (BundleError, KeyError, OSError):
        return None
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def _onnx_bytes(artifact, cpu: bool) -> int:
    """The graph the ONNX runtime opens (the CPU-optimised copy on a CPU target) plus its external data file."""
    sizes = {entry.path: entry.bytes for entry in artifact.files}
    graph = artifact.details.get("cpu_optimized") if cpu else None
    graph = graph if graph in sizes else artifact.path
    return sizes.get(graph, 0) + sizes.get(f"{graph}.data", 0)


def _ordered(names: list[str], order: tuple[str, ...]) -> list[str]:
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


def plan_bundle(bundle: str | Path, device: Device, request: PlanRequest) -> dict:
    from ..bench.roofline import gguf_weight_bytes_per_token
    from ..manifest import Manifest
    from ..runtimes.llamacpp_decoder import DEFAULT_N_BATCH, DEFAULT_N_CTX
    from ..runtimes.onnx_encoder import CPU_TILES_PER_RUN, TILES_PER_RUN
    from ..runtimes.session import DEFAULT_EMBED_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES

    bundle = Path(bundle)
    manifest = Manifest.load(bundle)
    spec = manifest.decoder
    context = resolve_context(request.context, spec.context_length, DEFAULT_N_CTX)
    n_ctx = budget.llama_cpp_n_ctx(context, request.parallel)
    width, height = request.image_size or budget.largest_image(manifest.preprocess)
    image = budget.image_tokens(manifest.image_layout, manifest.preprocess, width, height,
                                _text_counter(bundle, manifest))
    image_positions = request.images * image.positions
    if image_positions > context:
        raise BadInputError(f"{request.images} image(s) of {width}x{height} take {image_positions} positions, more than "
                            f"the context of {context}; raise --context (the model supports {spec.context_length}) "
                            "or plan fewer or smaller images")
    cpu = device.target == "cpu"
    tile_h, tile_w = manifest.preprocess.tile_size
    _, tokens, width_d = manifest.encoder.output_shape
    embeddings = request.images * image.n_tiles * int(tokens) * int(width_d) * 4  # f32 [tiles, T, D] per image
    caches = (DEFAULT_EMBED_CACHE_BYTES if request.embed_cache_bytes is None else request.embed_cache_bytes) \
        + (DEFAULT_PREFIX_CACHE_BYTES if request.prefix_cache_bytes is None else request.prefix_cache_bytes)
    shared = dict(
        kv_cache=budget.kv_cache_bytes(spec.n_layers, spec.n_kv_heads, spec.head_dim, n_ctx, KV_TYPE),
        # flash attention: on where llama.cpp offloads to a GPU, off on CPU builds (llamacpp_decoder)
        compute_buffer=budget.llama_cpp_compute_buffer_bytes(spec.vocab_size, spec.hidden_size, spec.n_heads, n_ctx,
                                                             DEFAULT_N_BATCH, flash_attn=not cpu,
                                                             n_outputs=request.parallel),
        caches=0 if device.kind == "discrete-gpu" else caches,
        runtime_overhead=budget.RUNTIME_OVERHEAD_BYTES[device.target],
        margin=budget.default_margin_bytes(device.memory_bytes),
    )
    efficiency = budget.DECODE_EFFICIENCY_MEASURED if device.bandwidth_measured else budget.DECODE_EFFICIENCY_PEAK
    kv_read_images = budget.kv_cache_bytes(spec.n_layers, spec.n_kv_heads, spec.head_dim,
                                           max(1, image_positions), KV_TYPE, request.parallel)
    kv_read_full = budget.kv_cache_bytes(spec.n_layers, spec.n_kv_heads, spec.head_dim, context, KV_TYPE,
                                         request.parallel)
    decoders = _ordered([a.name for a in manifest.artifacts if a.format == "gguf"], DECODER_ACCURACY)
    encoders = _ordered([a.name for a in manifest.artifacts if a.format == "onnx"], ENCODER_ACCURACY)
    skipped = [f"{a.name}: planning {a.format} artifacts is not implemented yet" for a in manifest.artifacts
               if a.format in ("mlx", "tensorrt", "gguf-mmproj")]
    if not decoders or not encoders:
        raise BadInputError(f"{bundle} has no GGUF decoder and ONNX encoder pair to plan (decoders: "
                            f"{', '.join(decoders) or 'none'}; encoders: {', '.join(encoders) or 'none'})")
    options = []
    for decoder in decoders:
        path = bundle / manifest.find("decoder", decoder).path
        if not path.is_file():
            raise BundleError(f"bundle {bundle} is incomplete: {path.name} ({decoder}) is missing; re-export it")
        weights = sum(t.n_bytes for t in budget.read_gguf_tensors(path))
        per_token = gguf_weight_bytes_per_token(path)
        for encoder in encoders:
            artifact = manifest.find("encoder", encoder)
            per_tile = artifact.details.get("activation_bytes_per_tile")  # a measured figure, when the exporter kept one
            activations = budget.encoder_activation_bytes(
                image.n_tiles, CPU_TILES_PER_RUN if cpu else TILES_PER_RUN, tile_h, tile_w,
                int(per_tile) if isinstance(per_tile, int) and per_tile > 0 else None) if request.images else 0
            memory = budget.MemoryPlan(decoder_weights=weights, encoder_weights=_onnx_bytes(artifact, cpu),
                                       encoder_activations=activations + embeddings, **shared)
            options.append(Option(
                decoder, encoder, memory, memory.verdict(device.usable_bytes),
                budget.decode_tokens_per_second(per_token, kv_read_images, device.bandwidth_gbs, efficiency),
                budget.decode_tokens_per_second(per_token, kv_read_full, device.bandwidth_gbs, efficiency),
                per_token))
    recommended = next((o for o in options if o.verdict == "fits"), None)
    return {
        "bundle": str(bundle),
        "device": device.to_dict(),
        "usable_bytes": device.usable_bytes,
        "context": context,
        "n_ctx": n_ctx,
        "parallel": request.parallel,
        "kv_type": KV_TYPE,
        "images": {"count": request.images, "width": width, "height": height, "rows": image.rows, "cols": image.cols,
                   "n_tiles": image.n_tiles, "image_rows": image.image_rows, "text_tokens": image.text_tokens,
                   "positions_per_image": image.positions, "positions": image_positions,
                   "text_tokens_exact": image.exact, "max_tiles": manifest.encoder.max_tiles},
        "decode_efficiency": efficiency,
        "options": [o.to_dict() for o in options],
        "recommended": None if recommended is None else f"{recommended.encoder} + {recommended.decoder}",
        "basis": BASIS,
        "skipped": skipped,
    }
