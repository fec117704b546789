"""The vision half (tower, bridge, projector) on MLX: mlx-vlm's vision modules with the checkpoint's weights, for a
Mac to run the whole split graph on MLX (`--encoder mlx:fp16|8bit|4bit|fp32`). Torch-free; the exporter builds it
to cast and quantize the weights (export/mlx_vision.py), the runtime to run them (runtimes/mlx_encoder.py).

A bundle's MLX encoder is a folder: config.json (MlxVisionConfig) + model.safetensors (MLX layout: NHWC patch
convolution, quantized Linear layers as weight/scales/biases). Written and verified on mlx[cpu] (Linux); not run on
Apple Silicon."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
# precision -> (dtype of the weights and of the computation, bits of the quantized Linear layers or None)
PRECISIONS = {"fp16": ("float16", None), "8bit": ("float16", 8), "4bit": ("float16", 4), "fp32": ("float32", None)}
# edgevlm family -> mlx-vlm's vision module (models/<folder>/vision.py) that runs its tower
TOWERS = {"idefics3": "idefics3", "llava": "llava"}
# the torch vision module's parameter names (families/towers.py) -> this module's, first matching prefix wins;
# transformers 5's LLaVA tower has no "vision_model." level (4.x had one), mlx-vlm's ClipVisionModel has
RENAMES = {
    "idefics3": (("patch_embedding.", "tower.embeddings.patch_embedding."),
                 ("position_embedding.", "tower.embeddings.position_embedding."),
                 ("encoder.", "tower.encoder."), ("post_layernorm.", "tower.post_layernorm."),
                 ("connector.modality_projection.proj.", "connector.proj.")),
    "llava": (("tower.vision_model.", "tower.vision_model."), ("tower.", "tower.vision_model.")),
}
TILE_BATCH = 4  # tiles per MLX call: bounds the activations (a 17-tile SmolVLM image would otherwise run at once)


def refusal(family: str) -> str | None:
    """Why `--encoder mlx` cannot be written for this family (None: it can)."""
    if family in TOWERS:
        return None
    return (f"--encoder mlx runs the vision towers of {', '.join(TOWERS)} only (mlx-vlm's vision modules); {family} "
            "has none there: export --encoder onnx:fp32|fp16|int8 for it")


def tower_refusal(family: str, vision: dict, projector_act: str | None) -> str | None:
    """What mlx-vlm's module of a supported family would compute differently from the checkpoint (None: nothing)."""
    if refusal(family):
        return refusal(family)
    act = vision.get("hidden_act")
    wanted = {"idefics3": "gelu_pytorch_tanh", "llava": "quick_gelu"}[family]
    if vision.get("model_type") == "siglip_vision_model" and family == "llava":
        return ("--encoder mlx: mlx-vlm's llava vision module runs a SigLIP tower with CLIP's quick GELU and no head; "
                "export --encoder onnx:... for a LLaVA with a SigLIP tower")
    if act != wanted:
        return f"--encoder mlx: mlx-vlm's {family} vision module computes {wanted}, this tower's activation is {act!r}"
    if family == "llava" and projector_act != "gelu":
        return f"--encoder mlx: the LLaVA projector is computed with exact GELU, this one's is {projector_act!r}"
    return None


@dataclass(frozen=True)
class MlxVisionConfig:
    family: str  # edgevlm's family ("idefics3" | "llava")
    vision: dict  # the tower's HF vision config (mlx-vlm's VisionConfig takes the keys it declares)
    text_hidden: int  # the decoder's width: the projector's output
    scale_factor: int = 1  # idefics3: the pixel shuffle's factor
    feature_layers: tuple[int, ...] = (-1,)  # llava: the tower's hidden states the projector reads
    drop_first: bool = False  # llava "default" strategy: drop row 0 (CLIP's CLS)
    dtype: str = "float32"
    quantization: dict | None = None  # {"bits", "group_size", "mode"} of the Linear layers that carry scales

    def __post_init__(self) -> None:
        if self.family not in TOWERS:
            raise BundleError(refusal(self.family))
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise BundleError(f"MLX vision dtype {self.dtype!r} is not float32, float16 or bfloat16")
        if self.scale_factor < 1 or self.text_hidden < 1 or not self.feature_layers:
            raise BundleError(f"bad MLX vision config: scale {self.scale_factor}, width {self.text_hidden}, "
                              f"layers {self.feature_layers}")
        object.__setattr__(self, "feature_layers", tuple(int(i) for i in self.feature_layers))

    def to_dict(self) -> dict:
        return {**asdict(self), "feature_layers": list(self.feature_layers)}

    @classmethod
    def from_dict(cls, data: dict) -> "MlxVisionConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _nn():
    import mlx.nn as nn

    return nn


def build(config: MlxVisionConfig):
    """The MLX module (random weights): pixels (tiles, H, W, C) -> (tiles, T, D)."""
    import mlx.core as mx

    from .mlx_vlm_modules import import_module

    nn = _nn()
    folder = TOWERS[config.family]
    vision_config = import_module(folder, "config").VisionConfig.from_dict(config.vision)
    tower = import_module(folder, "vision").VisionModel(vision_config)
    if config.family == "idefics3":
        # mlx-vlm builds post_layernorm with MLX's default eps (1e-5); the checkpoint's is layer_norm_eps (1e-6)
        tower.post_layernorm = nn.LayerNorm(vision_config.hidden_size, eps=vision_config.layer_norm_eps)

    class PixelShuffleConnector(nn.Module):
        """Idefics3's bridge: (tiles, P, Dv) -> (tiles, P / s^2, s^2 Dv) -> Linear. mlx-vlm's Idefics3Connector sits in
        idefics3.py, which imports its transformers processor: the same reshapes, here."""

        def __init__(self, width: int, out: int, scale: int):
            super().__init__()
            self.scale = scale
            self.proj = nn.Linear(width * scale * scale, out, bias=False)

        def __call__(self, x):
            tiles, seq, dim = x.shape
            side, s = int(round(seq**0.5)), self.scale
            x = x.reshape(tiles, side, side // s, dim * s).transpose(0, 2, 1, 3)  # (tiles, side/s, side, s Dv)
            x = x.reshape(tiles, side // s, side // s, dim * s * s).transpose(0, 2, 1, 3)
            return self.proj(x.reshape(tiles, seq // (s * s), dim * s * s))  # (tiles, P / s^2, D)

    class LlavaProjector(nn.Module):
        """LLaVA's two-layer GELU MLP (mlx-vlm's LlavaMultiModalProjector sits in llava.py, which imports its
        transformers processor)."""

        def __init__(self, width: int, out: int):
            super().__init__()
            self.linear_1, self.gelu, self.linear_2 = nn.Linear(width, out), nn.GELU(), nn.Linear(out, out)

        def __call__(self, x):
            return self.linear_2(self.gelu(self.linear_1(x)))

    class TiledVision(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = tower
            width = vision_config.hidden_size
            if config.family == "idefics3":
                self.connector = PixelShuffleConnector(width, config.text_hidden, config.scale_factor)
            else:
                self.projector = LlavaProjector(width * len(config.feature_layers), config.text_hidden)

        def __call__(self, pixels):
            pixels = pixels.astype(mx.float32 if config.dtype == "float32" else getattr(mx, config.dtype))
            if config.family == "idefics3":
                return self.connector(self.tower(pixels)[0])  # post_layernorm(last hidden state) -> bridge
            states = self.tower(pixels, output_hidden_states=True)[2]  # (embeddings, layer 1, ..., layer n)
            selected = [states[i][:, 1:] if config.drop_first else states[i] for i in config.feature_layers]
            return self.projector(mx.concatenate(selected, axis=-1))

    return TiledVision()


def quantize(model, bits: int, group_size: int) -> dict:
    """The Linear layers whose input width the group size divides, affine; the rest stay in the model's dtype
    (patch convolution, norms, embeddings). Returns what was done, for the manifest."""
    nn = _nn()
    chosen = []

    def predicate(path: str, module) -> bool:
        if isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0:
            chosen.append(path)
            return True
        return False

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    return {"bits": bits, "group_size": group_size, "mode": "affine", "layers": len(chosen)}


def save(model, config: MlxVisionConfig, folder: Path) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / WEIGHTS_FILE), dict(tree_flatten(model.parameters())))
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))


def load(folder: Path) -> tuple[Any, MlxVisionConfig]:
    """The bundle folder's module with its weights (quantized layers where the file has scales), evaluated."""
    import mlx.core as mx

    nn = _nn()
    try:
        config = MlxVisionConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
        weights = mx.load(str(folder / WEIGHTS_FILE))
        model = build(config)
        if config.quantization:
            q = config.quantization
            nn.quantize(model, group_size=q["group_size"], bits=q["bits"], mode=q.get("mode", "affine"),
                        class_predicate=lambda path, m: hasattr(m, "to_quantized") and f"{path}.scales" in weights)
        model.load_weights(list(weights.items()), strict=True)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"the MLX vision encoder cannot load {folder} ({type(exc).__name__}: {str(exc)[:200]}); "
                          "re-export it") from None
    mx.eval(model.parameters())
    model.eval()
    return model, config
