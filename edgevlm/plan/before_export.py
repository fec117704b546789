"""The plan before any export, from a checkpoint's or a preset's shapes (plan/model.py): every GGUF quantization x
ONNX precision `edgevlm export` can write, with the same arithmetic as a bundle's plan (options.py)."""
from __future__ import annotations

from . import budget
from .devices import Device
from .options import DecoderChoice, EncoderChoice, PlanModel, PlanRequest, plan_options

GGUF_PRECISIONS = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")  # what `edgevlm export` writes
ONNX_PRECISIONS = ("fp32", "fp16", "int8")
MODEL_BASIS = {
    "decoder_weights": "exact: the tensor bytes llama.cpp's quantizer gives each GGUF tensor (budget.gguf_tensor_types, "
                       "K-quant fallbacks included) from the checkpoint's or preset's tensor shapes",
    "encoder_weights": "estimate: vision parameters x bytes per parameter (fp32 4, fp16 2, int8 1.06), x ORT's CPU "
                       "resident factor (1.65 / 1.59) on a CPU target (plan/model.py)",
    "encoder_activations": "estimate, not measured (the bundle path measures it at export): one ViT layer's f32 "
                           "tensors x ORT's arena factor (plan/model.py), tiles per run (a native-resolution tower: "
                           "one image per run, its attention scores quadratic in the image's patches), plus the "
                           "images' embeddings and one image's preprocessed pixels",
}


def plan_model(shapes, device: Device, request: PlanRequest) -> dict:
    """The plan before any export, for every GGUF quantization x ONNX precision `edgevlm export` can write: the same
    budget as plan_bundle, with the decoder's bytes from its tensor shapes and the encoder's terms estimated from the
    vision tower's shapes (shapes: plan.model.ModelShapes)."""
    from .compute import vision_flops_per_tile
    from .model import MMPROJ_BYTES_PER_PARAM

    cpu = device.target == "cpu"
    tensors = list(shapes.decoder_tensors)
    tied = all(name != "output.weight" for name, _ in tensors)
    decoders = []
    for precision in GGUF_PRECISIONS:
        sizes = budget.gguf_weight_bytes(tensors, precision)
        # a decode step reads every tensor but the embedding table, which is read whole only when it is the output
        per_token = sum(size for name, size in sizes.items() if tied or name != "token_embd.weight")
        decoders.append(DecoderChoice(f"gguf:{precision}", precision, sum(sizes.values()), per_token))
    vision = shapes.vision
    grid = shapes.layout.kind == "grid"  # native resolution: the per-image terms come from grid_vision
    encoders = [EncoderChoice(f"onnx:{p}", p, vision.onnx_bytes(p, cpu),
                              None if grid else vision.activation_bytes_per_tile(p)) for p in ONNX_PRECISIONS]
    model = PlanModel(shapes.decoder, shapes.preprocess, shapes.layout, shapes.layout.tokens_per_tile,
                      shapes.decoder.hidden_size, 3, _max_tiles(shapes), shapes.decoder_params,
                      None if grid else vision_flops_per_tile(vision), grid_vision=vision if grid else None)
    options = plan_options(model, decoders, encoders, device, request)
    result = {"model": {"name": shapes.name, "source": shapes.source, "family": shapes.family,
                        "decoder_params": shapes.decoder_params, "vision_params": vision.params,
                        "vision_gflops_per_tile": None if grid else vision_flops_per_tile(vision) / 1e9},
              **options}
    if grid:
        result["model"]["vision_gflops_per_image"] = _grid_gflops(vision, options["images"]["patches"],
                                                                  shapes.preprocess.merge_size)
    result["basis"].update(MODEL_BASIS)
    mmproj = ", ".join(f"mmproj:{p} {vision.params * b / (1 << 20):,.0f} MiB"
                       for p, b in MMPROJ_BYTES_PER_PARAM.items())
    result["skipped"] = [f"llama.cpp mmproj encoders (weights: {mmproj}): edgevlm's runtime runs the ONNX encoder",
                         "mlx decoders: not planned yet"]
    return result


def _grid_gflops(vision, patches: int | None, merge: int) -> float | None:
    """A native-resolution tower's GFLOP for one image of the plan (None without an image)."""
    from .compute import vision_flops_per_tile

    return None if not patches else vision_flops_per_tile(vision.at_patches(patches, merge)) / 1e9


def _max_tiles(shapes) -> int:
    """The most tiles the preprocessing makes for one image (its largest image); a native-resolution model: the
    most merged tokens any image can make (preprocess.max_merged_tokens)."""
    if shapes.preprocess.resize_rule == "qwen2vl":
        from ..preprocess import max_merged_tokens

        return max_merged_tokens(shapes.preprocess)
    if shapes.preprocess.resize_rule == "anyres":  # the largest pinpoint's grid + the base view (the largest image
        tile = shapes.preprocess.tile_size[0]  # by rows is another: pooling shrinks the large grids' rows)
        return 1 + max((h // tile) * (w // tile) for h, w in shapes.preprocess.grid_pinpoints)
    width, height = budget.largest_image(shapes.preprocess)
    return budget.image_tokens(shapes.layout, shapes.preprocess, width, height).n_tiles
