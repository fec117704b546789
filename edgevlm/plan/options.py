"""The plan's arithmetic, shared by a bundle's plan (bundle.py) and a plan before export (before_export.py): the
request, the decoder and encoder choices, every decoder x encoder option's itemised memory, verdict, decode speed and
TTFT on a device, and the recommendation read from them. Numbers are bytes; each item says its basis."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadInputError
from . import budget, sliding
from .devices import Device

# most accurate first: the recommendation is the first option that fits with its margin
DECODER_ACCURACY = ("gguf:f32", "gguf:bf16", "gguf:f16", "gguf:q8_0", "gguf:q6_k", "gguf:q5_k_m", "gguf:q4_k_m",
                    "gguf:q4_0")
ENCODER_ACCURACY = ("onnx:fp32", "onnx:fp16", "onnx:int8")
KV_TYPE = "f16"  # what the llama.cpp decoder allocates outside parity mode (runtimes/llamacpp/context.py)
BASIS = {
    "decoder_weights": "exact: the GGUF's tensor bytes",
    "encoder_weights": "measured where the bundle has it: the resident bytes of an ORT CPU session on the graph "
                       "(details.session_resident_bytes, edgevlm.plan.probe at export; ~1.65x the file: ORT keeps "
                       "prepacked weights beside the initializers); else the graph file (+ external data)",
    "encoder_activations": "tiles per run x per-tile activations (measured at export where the bundle has "
                           "details.activation_bytes_per_tile, else 788 B per input pixel), plus the images' embeddings "
                           "and one image's preprocessed pixels (f32 tiles, twice: normalised, then stacked)",
    "kv_cache": "exact formula: llama.cpp's padded n_ctx x layers x KV heads x head_dim, f16",
    "compute_buffer": "formula: llama.cpp's logits / attention scratch for one ubatch (about +-5% on CPU here); "
                      "one request: the part its graphs write (its ubatch, its KV span, one row of logits)",
    "caches": "the embedding and prefix cache bounds (host memory; not counted on a discrete GPU); one request: "
              "the prefix KV snapshot it stores",
    "runtime_overhead": "CPU: measured, Python + numpy + ONNX Runtime + llama.cpp imported (68 MiB) + tokenizer and "
                        "llama.cpp context (12 MiB + 512 B per vocabulary token); GPU targets: estimate",
    "margin": "headroom: 1 GiB, 0.5 GiB on devices of 8 GiB or less; none in the one-request figure",
    "ttft": "estimate: encode (vision FLOPs per tile x tiles; a native-resolution tower: per image, at its patch "
            "count) + prefill (2 x decoder block parameters x image and prompt positions), each over the device's "
            "compute x an efficiency (plan/compute.py)",
}
# The one request `memory_one_request` describes, unless asked otherwise: `edgevlm bench`'s defaults
DEFAULT_PROMPT_TOKENS = 24
DEFAULT_NEW_TOKENS = 64


@dataclass(frozen=True)
class PlanRequest:
    images: int = 1
    image_size: tuple[int, int] | None = None  # (width, height); None: the largest the preprocessing keeps
    context: int | None = None  # per sequence; None: the runtime's default
    parallel: int = 1
    embed_cache_bytes: int | None = None
    prefix_cache_bytes: int | None = None
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS  # the one request: text tokens after the images, and tokens generated
    new_tokens: int = DEFAULT_NEW_TOKENS
    max_tiles: int | None = None  # the tile cap per image (budget.cap_tiles); None: the preprocessing's own
    # positions the media take, counted by the caller where the images x positions per image is not the layout (a
    # video: its frames' text and template, plan/video.py); None: images x positions per image
    media_positions: int | None = None

    def __post_init__(self) -> None:
        if self.images < 0:
            raise BadInputError(f"--images must be 0 or more, got {self.images}")
        if self.media_positions is not None and self.media_positions < 0:
            raise ValueError(f"media_positions must be 0 or more, got {self.media_positions}")
        if self.parallel < 1:
            raise BadInputError(f"--parallel must be 1 or more, got {self.parallel}")
        if self.prompt_tokens < 0 or self.new_tokens < 0:
            raise BadInputError(f"--prompt-tokens and --new-tokens must be 0 or more, got {self.prompt_tokens} and "
                                f"{self.new_tokens}")
        if self.context is not None and self.context < 16:
            raise BadInputError(f"--context must be at least 16 positions, got {self.context}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise BadInputError(f"--max-tiles must be 1 or more, got {self.max_tiles}")


@dataclass
class Option:
    decoder: str
    encoder: str
    memory: budget.MemoryPlan
    one_request: budget.MemoryPlan  # one request in a fresh process, as `edgevlm bench` runs it: its peak is `needed`
    verdict: str
    decode_tok_s: float  # per sequence, with the images in the KV cache
    decode_tok_s_full: float  # per sequence, every sequence at a full context
    weight_bytes_per_token: int
    ttft: dict  # plan/compute.ttft: encode_s, prefill_s, ttft_s, basis (estimates; None where unknown)

    def to_dict(self) -> dict:
        return {"decoder": self.decoder, "encoder": self.encoder, "memory": self.memory.to_dict(),
                "memory_one_request": self.one_request.to_dict(), "peak_one_request": self.one_request.needed,
                "verdict": self.verdict, "decode_tok_s": self.decode_tok_s,
                "decode_tok_s_full_context": self.decode_tok_s_full,
                "weight_bytes_per_token": self.weight_bytes_per_token, "ttft": self.ttft}


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
    from ..machine import parse_size

    width, height = parse_size(text)
    if max(width, height) > 1 << 16:
        raise BadInputError(f"--image-size sides must be 1..65536 pixels, got {text!r}")
    return width, height


def _ordered(names: list[str], order: tuple[str, ...]) -> list[str]:
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order))


@dataclass(frozen=True)
class DecoderChoice:
    """One GGUF decoder option: its weights (exact) and the bytes one decode step reads."""

    name: str  # "gguf:q8_0"
    precision: str
    weight_bytes: int
    bytes_per_token: int


@dataclass(frozen=True)
class EncoderChoice:
    """One encoder option: its weights as they will be resident, and its activations per tile (None: the per-pixel
    fallback, budget.ENCODER_ACTIVATION_BYTES_PER_PIXEL)."""

    name: str  # "onnx:int8"
    precision: str
    weight_bytes: int
    activation_bytes_per_tile: int | None
    # a grid (native-resolution) encoder: the (patches, bytes) pairs measured at export (details.
    # activation_bytes_at_patches), which budget.grid_activation_bytes fits; None: not measured
    activation_points: tuple | None = None


@dataclass(frozen=True)
class PlanModel:
    """What the budget needs to know about a model, whether it came from a bundle's manifest or, before any export,
    from a checkpoint's or a preset's shapes (plan/model.py)."""

    decoder: object  # manifest.DecoderSpec
    preprocess: object  # preprocess.PreprocessSpec
    layout: object  # layout.ImageLayout
    embed_tokens: int  # embedding rows per tile and their width: the encoder's output
    embed_width: int
    channels: int
    max_tiles: int
    decoder_params: int  # the blocks' parameters: prefill FLOPs
    vision_flops_per_tile: int | None  # None: unknown (TTFT gives the prefill only)
    count_text: object = None  # text -> tokens (a tokenizer), or None: one token per layout marker assumed
    # native resolution (layout "grid", Qwen2-VL): the tower's shapes (plan.model.VisionShape); its FLOPs and
    # activations follow each image's patch count (one image per encoder call). None: a tiled encoder, or a grid
    # bundle whose source checkpoint is gone (its activations then come from the export's measurement or a fallback)
    grid_vision: object = None


@dataclass(frozen=True)
class EncoderWork:
    """Encoding one request's images: the encoder calls, the FLOPs of each, the preprocessed pixels held at their
    peak, and the activation peak per encoder choice."""

    calls: int  # tiled: images x tiles; grid: one per image
    flops_per_call: int | None  # None: the tower's shapes are unknown
    pixels: int
    patches: int | None  # grid: patches of one image through the tower; None for tiled encoders
    activations: object  # EncoderChoice -> bytes


def encoder_work(model: PlanModel, preprocess, image: budget.ImageTokens, images: int, cpu: bool) -> EncoderWork:
    """Tiled encoders run tiles_per_run tiles at a time, each tile the same cost. A native-resolution tower (grid)
    runs one image per call over all its patches (merged tokens x merge^2): its activations and FLOPs are the tower's
    at that sequence. Attention is quadratic in the patches of a full-attention block (the (P, P) scores), and
    edgevlm's ONNX graph masks Qwen2.5-VL's windows over all P patches rather than splitting them
    (qwen2_vl_vision.QwenVisionExport), so every block is counted at P^2: 4x the patches, 16x the scores."""
    from ..runtimes.onnx_encoder import CPU_TILES_PER_RUN, TILES_PER_RUN
    from .compute import vision_flops_per_tile

    if not images:
        return EncoderWork(0, model.vision_flops_per_tile, 0, None, lambda encoder: 0)
    if model.layout.kind == "grid":
        merge = preprocess.merge_size
        patches = image.image_rows * merge * merge
        vision = None if model.grid_vision is None else model.grid_vision.at_patches(patches, merge)

        def activations(encoder: EncoderChoice) -> int:
            # measured at export (a bundle) > estimated from the tower's shapes > the per-pixel fallback
            if encoder.activation_points:
                return budget.grid_activation_bytes(encoder.activation_points, patches)
            if vision is not None:
                return vision.activation_bytes_per_tile(encoder.precision)
            return budget.ENCODER_ACTIVATION_BYTES_PER_PIXEL * patches * preprocess.patch_size**2

        return EncoderWork(images, None if vision is None else vision_flops_per_tile(vision),
                           budget.patch_input_bytes(patches, preprocess, model.channels), patches, activations)
    tile_h, tile_w = preprocess.tile_size
    per_run = CPU_TILES_PER_RUN if cpu else TILES_PER_RUN
    return EncoderWork(images * image.n_tiles, model.vision_flops_per_tile,
                       budget.image_input_bytes(image.n_tiles, model.channels, tile_h, tile_w), None,
                       lambda encoder: budget.encoder_activation_bytes(image.n_tiles, per_run, tile_h, tile_w,
                                                                       encoder.activation_bytes_per_tile))


def plan_options(model: PlanModel, decoders: list[DecoderChoice], encoders: list[EncoderChoice], device: Device,
                 request: PlanRequest) -> dict:
    """Every decoder x encoder option on the device: the itemised memory, its verdict, decode tok/s and TTFT. The
    arithmetic shared by bundle plans and plans made before export (plan/model.py)."""
    from ..runtimes.llamacpp import DEFAULT_N_BATCH, DEFAULT_N_CTX
    from ..runtimes.session import DEFAULT_EMBED_CACHE_BYTES, DEFAULT_PREFIX_CACHE_BYTES
    from .compute import device_compute, prefill_flops, ttft

    spec = model.decoder
    context = resolve_context(request.context, spec.context_length, DEFAULT_N_CTX)
    n_ctx = budget.llama_cpp_n_ctx(context, request.parallel)
    preprocess = budget.cap_tiles(model.preprocess, request.max_tiles)
    width, height = request.image_size or budget.largest_image(preprocess)
    try:
        image = budget.image_tokens(model.layout, preprocess, width, height, model.count_text)
    except ValueError as exc:  # e.g. an aspect ratio Qwen2-VL's resize refuses
        raise BadInputError(f"--image-size {width}x{height}: {exc}; plan another size") from None
    image_positions = request.images * image.positions if request.media_positions is None else request.media_positions
    if image_positions > context:
        hint = "or plan fewer or smaller images (--image-size WxH)" if model.layout.kind == "grid" else \
            "or plan fewer or smaller images"
        raise BadInputError(f"{request.images} image(s) of {width}x{height} take {image_positions} positions, more than "
                            f"the context of {context}; raise --context (the model supports {spec.context_length}) "
                            f"{hint}")
    cpu = device.target == "cpu"
    work = encoder_work(model, preprocess, image, request.images, cpu)
    embeddings = request.images * image.n_tiles * model.embed_tokens * model.embed_width * 4  # f32 [tiles, T, D]
    embed_bound = DEFAULT_EMBED_CACHE_BYTES if request.embed_cache_bytes is None else request.embed_cache_bytes
    prefix_bound = DEFAULT_PREFIX_CACHE_BYTES if request.prefix_cache_bytes is None else request.prefix_cache_bytes
    caches = embed_bound + prefix_bound
    shared = dict(
        kv_cache=sliding.kv_bytes(spec, n_ctx, KV_TYPE, n_ubatch=DEFAULT_N_BATCH),  # local layers: their window
        # flash attention: on where llama.cpp offloads to a GPU and for a pool of sequences (--parallel N > 1), off
        # for one sequence on CPU builds (runtimes/llamacpp/__init__.py; its per-CPU measurement is not known here)
        compute_buffer=budget.llama_cpp_compute_buffer_bytes(spec.vocab_size, spec.hidden_size, spec.n_heads, n_ctx,
                                                             DEFAULT_N_BATCH,
                                                             flash_attn=not cpu or request.parallel > 1,
                                                             n_outputs=request.parallel),
        caches=0 if device.kind == "discrete-gpu" else caches,
        runtime_overhead=budget.runtime_overhead_bytes(device.target, spec.vocab_size),
        margin=budget.default_margin_bytes(device.memory_bytes),
    )
    # one request (the bench's run): the images, its prompt and what it generates, in one sequence; the KV cache is
    # allocated and cleared whole at load (resident either way); the prefix cache holds the image prefix's KV state
    # (its embeddings are counted with the activations: the embedding cache keeps that same array)
    request_positions = min(context, image_positions + request.prompt_tokens + request.new_tokens)
    snapshot = sliding.kv_bytes(spec, image_positions, KV_TYPE, n_ubatch=DEFAULT_N_BATCH) if image_positions else 0
    one_request = dict(
        shared, margin=0, caches=0 if device.kind == "discrete-gpu" or snapshot > prefix_bound else snapshot,
        compute_buffer=budget.llama_cpp_compute_in_use_bytes(spec.vocab_size, spec.hidden_size, spec.n_heads,
                                                             max(1, request_positions), DEFAULT_N_BATCH,
                                                             flash_attn=not cpu))
    kv_read_images = sliding.kv_bytes(spec, max(1, image_positions), KV_TYPE, request.parallel, reading=True)
    kv_read_full = sliding.kv_bytes(spec, context, KV_TYPE, request.parallel, reading=True)
    compute = device_compute(device)
    prompt_positions = image_positions + request.prompt_tokens
    prefill = prefill_flops(model.decoder_params, max(1, prompt_positions))
    options, efficiencies = [], {}
    for decoder in decoders:
        efficiency = budget.decode_efficiency(decoder.precision, device.bandwidth_measured)
        efficiencies[decoder.name] = efficiency
        for encoder in encoders:
            items = dict(decoder_weights=decoder.weight_bytes, encoder_weights=encoder.weight_bytes,
                         encoder_activations=work.activations(encoder) + embeddings + work.pixels)
            memory = budget.MemoryPlan(**items, **shared)
            options.append(Option(
                decoder.name, encoder.name, memory, budget.MemoryPlan(**items, **one_request),
                memory.verdict(device.usable_bytes),
                budget.decode_tokens_per_second(decoder.bytes_per_token, kv_read_images, device.bandwidth_gbs,
                                                efficiency),
                budget.decode_tokens_per_second(decoder.bytes_per_token, kv_read_full, device.bandwidth_gbs, efficiency),
                decoder.bytes_per_token,
                ttft(compute, work.flops_per_call, work.calls, prefill, encoder.precision)))
    recommended = next((o for o in options if o.verdict == "fits"), None)
    return {
        "device": device.to_dict(),
        "usable_bytes": device.usable_bytes,
        "context": context,
        "n_ctx": n_ctx,
        "parallel": request.parallel,
        "one_request": {"prompt_tokens": request.prompt_tokens, "new_tokens": request.new_tokens,
                        "positions": request_positions},
        "kv_type": KV_TYPE,
        "images": {"count": request.images, "width": width, "height": height, "rows": image.rows, "cols": image.cols,
                   "n_tiles": image.n_tiles, "image_rows": image.image_rows, "text_tokens": image.text_tokens,
                   "positions_per_image": image.positions, "positions": image_positions,
                   "text_tokens_exact": image.exact, "max_tiles": model.max_tiles, "tile_cap": request.max_tiles,
                   "kind": model.layout.kind, "encoder_calls": work.calls, "patches": work.patches},
        "decode_efficiency": efficiencies,  # decoder -> the roofline fraction its tok/s assume
        "ttft_prompt_positions": prompt_positions,  # images + prompt text, as TTFT prefills them
        "options": [o.to_dict() for o in options],
        "recommended": None if recommended is None else f"{recommended.encoder} + {recommended.decoder}",
        "basis": dict(BASIS),
        "skipped": [],
    }


def recommendation(result: dict) -> tuple[str, str, str]:
    """(encoder, decoder, why) from a plan: the most accurate option that fits with its margin, and the reason the
    next more accurate decoder and encoder were passed over. Raises BadInputError when nothing fits."""
    mib = 1 << 20
    usable = result["usable_bytes"] / mib
    where = f"{result['device']['id']} at context {result['context']}, {result['images']['n_tiles']} tile(s)"
    if result["recommended"] is None:
        smallest = min(result["options"], key=lambda o: o["memory"]["total"])
        raise BadInputError(f"nothing fits {where}: the smallest option ({smallest['encoder']} + {smallest['decoder']}) "
                            f"needs {smallest['memory']['total'] / mib:,.0f} MiB of {usable:,.0f} usable; plan a "
                            "smaller context or image first (edgevlm plan), or pass --encoder/--decoder explicitly")
    chosen = next(o for o in result["options"] if o["verdict"] == "fits")  # what "recommended" names, for people
    encoder, decoder = chosen["encoder"], chosen["decoder"]
    options = {(o["encoder"], o["decoder"]): o for o in result["options"]}
    encoders = list(dict.fromkeys(o["encoder"] for o in result["options"]))
    decoders = list(dict.fromkeys(o["decoder"] for o in result["options"]))
    passed = []
    d, e = decoders.index(decoder), encoders.index(encoder)
    # the next more accurate decoder with the chosen encoder, and the next more accurate encoder with the chosen decoder
    for name, pair in ((decoders[d - 1], (encoder, decoders[d - 1])) if d else (None, None),
                       (encoders[e - 1], (encoders[e - 1], decoder)) if e else (None, None)):
        if name is not None:
            option = options[pair]
            passed.append(f"{name} needs {option['memory']['total'] / mib:,.0f} MiB: {option['verdict']}")
    why = "; ".join(passed) if passed else "the most accurate option fits"
    chosen = options[(encoder, decoder)]["memory"]["total"] / mib
    return encoder, decoder, (f"for {where}: {decoder} + {encoder} ({chosen:,.0f} MiB with margin of {usable:,.0f} "
                              f"usable; {why})")
