"""A bundle's plan on one device: for every GGUF decoder x ONNX encoder in the bundle, the memory it needs (exact
weight bytes from the manifest or the files, the rest from budget.py through options.py), the verdict against the
device's usable memory, and the predicted decode speed."""
from __future__ import annotations

from pathlib import Path

from ..errors import BadInputError, BundleError
from . import budget
from .before_export import plan_model  # noqa: F401 - the planner's entry points, from one place
from .devices import Device
from .options import (  # noqa: F401 - re-exported: the planner's entry points and types
    BASIS, DECODER_ACCURACY, ENCODER_ACCURACY, KV_TYPE, DecoderChoice, EncoderChoice, Option, PlanModel, PlanRequest,
    _ordered, parse_image_size, plan_options, recommendation, resolve_context,
)


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


def _resident_bytes(artifact, cpu: bool) -> int:
    """The encoder's weights as a CPU ORT session holds them (measured at export), else the files it opens."""
    measured = artifact.details.get("session_resident_bytes")
    if cpu and isinstance(measured, int) and not isinstance(measured, bool) and measured > 0:
        return measured
    return _onnx_bytes(artifact, cpu)


def plan_bundle(bundle: str | Path, device: Device, request: PlanRequest, memory_only: bool = False) -> dict:
    """memory_only (the start-up fit check): the manifest and GGUF headers only, never the source checkpoint (its
    tower's shapes feed TTFT) or the tokenizer (exact marker-token counts; assumed one per marker instead)."""
    from ..manifest import Manifest

    bundle = Path(bundle)
    manifest = Manifest.load(bundle)
    grid = getattr(manifest.encoder, "kind", "tiles") == "grid"
    cpu = device.target == "cpu"
    decoders = []
    for name in _ordered([a.name for a in manifest.artifacts if a.format == "gguf"], DECODER_ACCURACY):
        decoders.append(_gguf_choice(bundle, manifest.find("decoder", name)))
    encoders = []
    for name in _ordered([a.name for a in manifest.artifacts if a.format == "onnx"], ENCODER_ACCURACY):
        artifact = manifest.find("encoder", name)
        per_tile = artifact.details.get("activation_bytes_per_tile")  # a measured figure, when the exporter kept one
        encoders.append(EncoderChoice(name, artifact.precision, _resident_bytes(artifact, cpu),
                                      int(per_tile) if isinstance(per_tile, int) and per_tile > 0 else None,
                                      _measured_points(artifact.details.get("activation_bytes_at_patches"))))
    if not decoders or not encoders:
        raise BadInputError(f"{bundle} has no GGUF decoder and ONNX encoder pair to plan (decoders: "
                            f"{', '.join(d.name for d in decoders) or 'none'}; encoders: "
                            f"{', '.join(e.name for e in encoders) or 'none'})")
    block_params = _gguf_block_params(bundle, manifest.find("decoder", decoders[0].name))
    vision = None if memory_only else _source_vision(manifest)
    count_text = None if memory_only else _text_counter(bundle, manifest)
    if grid:
        model = _grid_bundle_model(manifest, block_params, vision, count_text)
    else:
        model = PlanModel(manifest.decoder, manifest.preprocess, manifest.image_layout,
                          int(manifest.encoder.output_shape[1]), int(manifest.encoder.output_shape[2]),
                          int(manifest.encoder.input_shape[1]), manifest.encoder.max_tiles, block_params,
                          _vision_flops(vision), count_text)
    result = {"bundle": str(bundle), **plan_options(model, decoders, encoders, device, request)}
    if grid:
        result["basis"].update(_grid_basis(encoders, vision, manifest))
        patches = result["images"]["patches"]
        result["vision"] = {"kind": "grid", "shapes_from": None if vision is None else manifest.source.get("path"),
                            "gflops_per_image": None if vision is None or not patches else
                            _vision_flops(vision.at_patches(patches, manifest.preprocess.merge_size)) / 1e9}
    result["skipped"] = [f"{a.name}: planning {a.format} artifacts is not implemented yet" for a in manifest.artifacts
                         if a.format in ("mlx", "tensorrt", "gguf-mmproj")]
    return result


GGUF_SIZE_DETAILS = ("weight_bytes", "bytes_per_token", "block_params")  # recorded at export (export/gguf.py)


def gguf_sizes(bundle: Path, artifact) -> dict[str, int]:
    """A GGUF decoder's weight bytes, bytes read per decode step and block parameters: from the manifest where the
    export recorded them, else from the file's header (bundles written before they were recorded)."""
    recorded = {key: artifact.details.get(key) for key in GGUF_SIZE_DETAILS}
    if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in recorded.values()):
        return recorded
    from ..gguf_header import read_header

    path = bundle / artifact.path
    if not path.is_file():
        raise BundleError(f"bundle {bundle} is incomplete: {path.name} ({artifact.name}) is missing; re-export it")
    header = read_header(path)
    return {"weight_bytes": header.weight_bytes, "bytes_per_token": header.bytes_per_token(),
            "block_params": header.block_params()}


def _gguf_choice(bundle: Path, artifact) -> DecoderChoice:
    sizes = gguf_sizes(bundle, artifact)
    return DecoderChoice(artifact.name, artifact.precision, sizes["weight_bytes"], sizes["bytes_per_token"])


def _gguf_block_params(bundle: Path, artifact) -> int:
    """The transformer blocks' parameters (the prefill FLOPs)."""
    return gguf_sizes(bundle, artifact)["block_params"]


def _source_vision(manifest):
    """The vision tower's shapes (plan.model.VisionShape) from the source checkpoint (manifest source.path), when it
    is still there and is the same family; a bundle alone does not say how deep or wide its vision tower is."""
    from ..errors import EdgeVLMError
    from .model import from_checkpoint

    try:
        shapes = from_checkpoint(manifest.source.get("path", ""))
    except (EdgeVLMError, OSError, ValueError, KeyError, TypeError):
        return None
    return shapes.vision if shapes.family == manifest.family else None


def _vision_flops(vision) -> int | None:
    from .compute import vision_flops_per_tile

    return None if vision is None else vision_flops_per_tile(vision)


def _measured_points(value) -> tuple | None:
    """details.activation_bytes_at_patches as ((patches, bytes), ...), or None when absent or malformed."""
    try:
        points = tuple((int(p), int(b)) for p, b in value)
    except (TypeError, ValueError):
        return None
    return points if points and all(p > 0 and b >= 0 for p, b in points) and points[-1][1] > 0 else None


def _grid_bundle_model(manifest, block_params: int, vision, count_text) -> PlanModel:
    """A native-resolution (Qwen2-VL) bundle: one merged-token row of the decoder's width per image token, image
    tokens from the manifest's preprocessing (smart_resize), the largest image from its max_pixels."""
    from ..preprocess import max_merged_tokens

    encoder = manifest.encoder
    merged = (encoder.dynamic_axes.get("merged") or {}).get("max")
    channels = int((encoder.vision_grid or {}).get("in_channels", 3))
    return PlanModel(manifest.decoder, manifest.preprocess, manifest.image_layout, 1, int(encoder.output_shape[1]),
                     channels, int(merged) if merged else max_merged_tokens(manifest.preprocess), block_params, None,
                     count_text, grid_vision=vision)


def _grid_basis(encoders: list, vision, manifest) -> dict:
    """How a grid bundle's encoder terms were sized, encoder by encoder."""
    per_encoder = []
    for encoder in encoders:
        if encoder.activation_points:
            points = " and ".join(f"{p:,} patches {b / (1 << 20):,.1f} MiB" for p, b in encoder.activation_points)
            per_encoder.append(f"{encoder.name}: measured at export ({points}), fitted a x P + b x P^2 "
                               "(budget.grid_activation_fit)")
        elif vision is not None:
            per_encoder.append(f"{encoder.name}: estimate from the source checkpoint's tower shapes (not measured)")
        else:
            per_encoder.append(f"{encoder.name}: fallback, not measured: {budget.ENCODER_ACTIVATION_BYTES_PER_PIXEL} B "
                               "per input pixel, linear (under-estimates large images)")
    vision_text = (f"the tower's shapes from the source checkpoint {manifest.source.get('path')}" if vision is not None
                   else "the bundle does not record its tower's depth and width and its source checkpoint is not "
                        "here: TTFT is the prefill only")
    return {
        "encoder_activations": "one image per encoder call at its patch count P (smart_resize of the image, "
                               "merged tokens x merge^2); attention is quadratic in P (the ONNX graph masks windows "
                               "over all P patches, so every block has (P, P) scores): " + "; ".join(per_encoder)
                               + "; plus the image's embeddings and its preprocessed pixels and patches",
        "ttft": BASIS["ttft"] + f" ({vision_text})",
    }


def predict_pair(bundle: str | Path, encoder: str, decoder: str, device, request: PlanRequest) -> dict | None:
    """The planner's figures for one encoder x decoder pair of the bundle, to set beside a measurement (the bench's
    and the sweep's): run_mib, the peak of one request in a fresh process (the caches at what it stores, the
    compute buffer it writes, no safety margin), the figure to set beside a measured peak RSS; memory_mib, the total
    the verdict is judged on; decode tok/s; TTFT, encode and prefill seconds (None where it cannot say). None when the
    plan has no such pair."""
    plan = plan_bundle(str(bundle), device, request)
    for option in plan["options"]:
        if option["encoder"] == encoder and option["decoder"] == decoder:
            images, ttft = plan["images"], option["ttft"]
            return {"device": device.id, "image_size": f"{images['width']}x{images['height']}",
                    "memory_mib": round(option["memory"]["total"] / 2**20, 1),
                    "run_mib": round(option["peak_one_request"] / 2**20, 1), "verdict": option["verdict"],
                    "decode_tok_s": option["decode_tok_s"], "ttft_s": ttft["ttft_s"], "encode_s": ttft["encode_s"],
                    "prefill_s": ttft["prefill_s"]}
    return None
