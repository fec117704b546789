"""Vision half -> MLX (`--encoder mlx:fp16|8bit|4bit|fp32`): the torch vision module's weights renamed to mlx-vlm's
vision modules (edgevlm/mlx_vision.py), cast, optionally quantized with mlx.nn.quantize, saved as safetensors beside
a config.json. export/mlx.py exposes these under the "mlx" format, which the decoder writer shares."""
from __future__ import annotations

from ..backends import require_mlx
from ..errors import BadInputError
from ..manifest import Artifact
from .bundle import BundleWriter


def check_spec(spec) -> None:
    """Refused before the checkpoint loads: a family whose tower mlx-vlm has no vision module for."""
    from ..mlx_vision import refusal

    why = refusal(spec.family)
    if why:
        raise BadInputError(why)


def check_encoder(ckpt, precision: str) -> None:
    """Refused before anything is written: a tower mlx-vlm's module would compute differently, or a grid encoder."""
    from ..mlx_vision import tower_refusal

    require_mlx(mlx_lm=False)
    if getattr(ckpt.vision, "grid_spec", None) is not None or ckpt.spec.instruction is not None:
        raise BadInputError("--encoder mlx runs fixed-size tiles read from pixels only; export --encoder onnx:... here")
    config = ckpt.hf_model.config
    why = tower_refusal(ckpt.spec.family, config.vision_config.to_dict(), getattr(config, "projector_hidden_act", None))
    if why:
        raise BadInputError(why)


def vision_config(ckpt, precision: str):
    from ..mlx_vision import PRECISIONS, MlxVisionConfig

    config = ckpt.hf_model.config
    vision = config.vision_config.to_dict()
    common = dict(family=ckpt.spec.family, vision=vision, text_hidden=int(config.text_config.hidden_size),
                  dtype=PRECISIONS[precision][0])
    if ckpt.spec.family == "idefics3":
        return MlxVisionConfig(**common, scale_factor=int(config.scale_factor))
    return MlxVisionConfig(**common, feature_layers=tuple(ckpt.vision.feature_layers), drop_first=ckpt.vision.drop_first)


def mlx_weights(ckpt, family: str) -> dict:
    """The torch vision module's parameters as MLX arrays under mlx_vision's names (patch convolution NHWC)."""
    import mlx.core as mx

    from ..mlx_vision import RENAMES

    out = {}
    for name, tensor in ckpt.vision.state_dict().items():
        if name.endswith("position_ids"):  # a buffer, not a weight
            continue
        for old, new in RENAMES[family]:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        array = tensor.detach().float().cpu().numpy()
        if name.endswith("patch_embedding.weight"):  # torch (out, in, kh, kw) -> MLX (out, kh, kw, in)
            array = array.transpose(0, 2, 3, 1)
        out[name] = mx.array(array)
    return out


def export_encoder(ckpt, manifest, writer: BundleWriter, precision: str, log=print, group_size: int = 64,
                   **_) -> Artifact:
    import mlx.core as mx

    from ..mlx_vision import PRECISIONS, build, quantize, save

    dtype, bits = PRECISIONS[precision]
    config = vision_config(ckpt, precision)
    model = build(config)
    model.load_weights(list(mlx_weights(ckpt, config.family).items()), strict=True)  # a missing or extra name fails
    model.set_dtype(getattr(mx, dtype))
    quantization = None
    if bits:
        quantization = quantize(model, bits, group_size)
        log(f"  quantized {quantization['layers']} Linear layers of the vision half to {bits} bits (group {group_size})")
    config = type(config).from_dict({**config.to_dict(), "quantization": quantization})
    folder = writer.root / "encoder" / f"mlx-{precision}"
    log(f"  writing the vision half for MLX ({precision}) with mlx-vlm's {config.family} vision module")
    save(model, config, folder)
    details = {"dtype": dtype, "quantization": quantization, "mlx_vlm_module": f"models/{config.family}/vision.py"}
    return writer.artifact(f"mlx:{precision}", "encoder", "mlx", precision, f"encoder/mlx-{precision}", **details)
