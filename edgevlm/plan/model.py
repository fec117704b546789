"""A model's shapes before any export, for the planner: from a checkpoint folder (config.json, the processor config,
tokenizer.json and the safetensors headers; no weight is read and torch is never imported) or from a preset
(edgevlm/reference/presets.py: shapes without any file).

What the bundle path reads from files, this module derives: the decoder's GGUF tensor list (names and shapes, which
budget.gguf_weight_bytes turns into exact bytes per quantization), the vision tower's parameter count and shape
(encoder bytes per precision, activations and FLOPs per tile: estimates), the preprocessing and the image layout.
The per-family rules mirror edgevlm/families/*.py (which import torch at module level); tests check both agree on
checkpoints built in the test session."""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import BadInputError, CheckpointError
from ..layout import ImageLayout
from ..manifest import DecoderSpec
from ..preprocess import PreprocessSpec
from . import budget

# config.json "architectures" -> family, as edgevlm.families.FAMILIES (test_plan checks they stay equal)
FAMILIES = {"LlavaForConditionalGeneration": "llava", "Idefics3ForConditionalGeneration": "idefics3",
            "SmolVLMForConditionalGeneration": "idefics3", "InternVLForConditionalGeneration": "internvl",
            "Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_vl"}
# transformers' defaults for text_config keys a Hub config.json may omit (LlamaConfig / Qwen2Config)
TEXT_DEFAULTS = {"llama": {"num_attention_heads": 32, "max_position_embeddings": 2048, "rope_theta": 10000.0,
                           "rms_norm_eps": 1e-6},
                 "qwen2": {"num_attention_heads": 32, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                           "rms_norm_eps": 1e-6}}
TEXT_DEFAULTS["qwen2vl"] = TEXT_DEFAULTS["qwen2"]  # Qwen2-VL's text config is a Qwen2Config's
PROJECTOR_KEYS = ("multi_modal_projector.", "connector.")

# The ONNX encoder's weights per parameter (file bytes), measured on the W1 bundle (SigLIP-B/16 + connector, 93.6 M
# parameters): fp32 374.6 MB = 4.0 B, int8 98.9 MB = 1.06 B (weights s8 + fp32 scales, norms and biases); fp16: 2 B.
ONNX_BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "int8": 1.06}
# What an ORT CPU session keeps resident over the file (prepacked weights beside the initializers), measured at export
# on the same bundle (details.session_resident_bytes): fp32 618.9 / 374.6 MB = 1.65, int8 157.5 / 98.9 MB = 1.59;
# fp16 not measured, fp32's figure used.
ORT_CPU_RESIDENT_FACTOR = {"fp32": 1.65, "fp16": 1.65, "int8": 1.59}
# llama.cpp mmproj bytes per parameter (matrices at the precision, norms/biases F32: ~0 of the total)
MMPROJ_BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}
# The encoder's activation peak per tile is estimated from the tower's shapes: the f32 tensors live in one layer
# (attention scores and softmax 2*H*T^2, the MLP's two T*M, residual + Q/K/V 4*T*D), times the factor by which ORT's
# CPU arena exceeds them, calibrated on the one tower measured (SigLIP-B/16 at 512: 138.4 MB of tensors; the probe
# measured 293.8 MB fp32 and 226.5 MB int8 per tile, EPYC VM, 2026-12-01, W1 bundle): 2.12 and 1.64; fp16 as fp32.
ACTIVATION_ARENA_FACTOR = {"fp32": 2.12, "fp16": 2.12, "int8": 1.64}


@dataclass(frozen=True)
class VisionShape:
    """The vision tower + projector as the encoder graph holds them."""

    params: int  # tower + projector
    projector_params: int
    layers: int
    width: int
    mlp: int
    heads: int
    sequence: int  # positions through the tower per tile (patches, plus CLS where the tower has one)
    tokens_out: int  # embedding rows per tile after the projector (the layout's tokens_per_tile)
    gated: bool = False  # a SwiGLU MLP (gate, up, their product: three [T, mlp] tensors live, not two)

    def activation_bytes_per_tile(self, precision: str) -> int:
        """Estimate (ACTIVATION_ARENA_FACTOR): one layer's live f32 tensors x ORT's arena factor."""
        t = self.sequence
        mlp = (3 if self.gated else 2) * t * self.mlp
        tensors = 4 * (2 * self.heads * t * t + mlp + 4 * t * self.width)
        return int(tensors * ACTIVATION_ARENA_FACTOR[precision])

    def at_patches(self, patches: int, merge: int) -> "VisionShape":
        """A native-resolution tower (Qwen2-VL) on one image of `patches` patches: its sequence is the image's patch
        count and the merger gives one row per merge x merge block. The "tile" of the per-tile methods is then the
        whole image (one image per encoder call)."""
        if patches <= 0 or patches % (merge * merge):
            raise ValueError(f"{patches} patches are not whole {merge}x{merge} merge blocks")
        return replace(self, sequence=patches, tokens_out=patches // (merge * merge))

    def onnx_bytes(self, precision: str, cpu: bool) -> int:
        """Estimate: parameters x ONNX_BYTES_PER_PARAM, x ORT_CPU_RESIDENT_FACTOR on a CPU target."""
        file_bytes = self.params * ONNX_BYTES_PER_PARAM[precision]
        return int(file_bytes * (ORT_CPU_RESIDENT_FACTOR[precision] if cpu else 1.0))


@dataclass(frozen=True)
class ModelShapes:
    name: str  # the preset's name or the checkpoint folder
    source: str  # "preset" | "checkpoint"
    family: str
    decoder: DecoderSpec
    decoder_tensors: tuple  # (GGUF name, numpy-order shape) of every tensor the GGUF holds
    vision: VisionShape
    preprocess: PreprocessSpec
    layout: ImageLayout

    @property
    def decoder_params(self) -> int:
        """The transformer blocks' parameters (every prompt position multiplies them; the embedding lookup does not)."""
        return sum(math.prod(shape) for name, shape in self.decoder_tensors if name.startswith("blk."))


# --- presets ---------------------------------------------------------------------------------------------------


def from_preset(name: str) -> ModelShapes:
    from ..reference.presets import PRESETS, InternVLShape, LlavaShape, QwenVLShape

    if name not in PRESETS:
        raise BadInputError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    shape = PRESETS[name]
    if isinstance(shape, LlavaShape):
        family, arch, tied, biases = "llava", "llama", False, ()
    elif isinstance(shape, InternVLShape):
        family, arch, tied, biases = "internvl", "qwen2", shape.tied, ("attn_q", "attn_k", "attn_v")
    elif isinstance(shape, QwenVLShape):  # GGUF arch qwen2vl: qwen2's tensor list (q/k/v biases), M-RoPE positions
        family, arch, tied, biases = "qwen2_vl", "qwen2vl", shape.tied, ("attn_q", "attn_k", "attn_v")
    else:
        family, arch, tied, biases = "idefics3", "llama", shape.tied, ()
    head_dim = shape.text_hidden // shape.text_heads
    decoder = DecoderSpec(architecture=arch, hidden_size=shape.text_hidden, n_layers=shape.text_layers,
                          n_heads=shape.text_heads, n_kv_heads=shape.text_kv_heads, head_dim=head_dim,
                          intermediate_size=shape.text_mlp, vocab_size=shape.vocab, context_length=shape.context,
                          rms_norm_eps=1e-5, rope_theta=shape.rope_theta, tie_word_embeddings=tied)
    tensors = budget.llama_decoder_tensors(shape.text_hidden, shape.text_layers, shape.text_heads, shape.text_kv_heads,
                                           head_dim, shape.text_mlp, shape.vocab, tied, biases)
    if family == "qwen2_vl":
        vision, preprocess, layout = _preset_qwen_vision(shape)
    else:
        vision, preprocess, layout = _preset_vision(family, shape)
    return ModelShapes(name, "preset", family, decoder, tuple(tensors), vision, preprocess, layout)


def vit_layer_params(width: int, mlp: int, qkv_bias: bool = True, layer_scale: bool = False) -> int:
    """One pre-norm ViT block: Q/K/V/O (+ biases), the MLP's two matrices with biases, two LayerNorms (+ InternViT's
    two layer-scale vectors)."""
    attention = 4 * width * width + (4 if qkv_bias else 1) * width
    return attention + 2 * width * mlp + mlp + width + 4 * width + (2 * width if layer_scale else 0)


# Qwen2-VL's vision constants (Qwen2VLVisionConfig / Qwen2VLImageProcessor defaults; the presets do not vary them)
QWEN_PATCH, QWEN_TEMPORAL, QWEN_MERGE, QWEN_MIN_PIXELS = 14, 2, 2, 56 * 56
QWEN_IMAGE_TOKEN, QWEN_IMAGE_TOKEN_ID = "<|image_pad|>", 151655


def qwen_vision_params(version: str, width: int, mlp: int, layers: int, out: int, patch: int = QWEN_PATCH,
                       temporal: int = QWEN_TEMPORAL, merge: int = QWEN_MERGE, channels: int = 3) -> tuple[int, int]:
    """(tower, merger) parameters of a Qwen2-VL ("2") or Qwen2.5-VL ("2.5") vision tower (transformers'
    modeling_qwen2_vl / modeling_qwen2_5_vl): the patch embedding is a Conv3d without bias (channels x temporal x
    patch^2 = 1176 inputs per patch); each block has qkv + proj with biases and, for "2", two LayerNorms and a GELU
    MLP fc1/fc2 at width x mlp_ratio (vit_layer_params), for "2.5" two RMSNorms and a SwiGLU gate/up/down at
    intermediate_size with biases; the merger: a norm over the width (LayerNorm / RMSNorm), then Linear(4w -> 4w) and
    Linear(4w -> out), with biases."""
    if version not in ("2", "2.5"):
        raise ValueError(f"Qwen-VL version {version!r}: '2' or '2.5'")
    patch_embed = width * channels * temporal * patch * patch
    if version == "2":
        block, norm = vit_layer_params(width, mlp), 2 * width
    else:
        block, norm = 4 * width * width + 4 * width + 3 * width * mlp + 2 * mlp + width + 2 * width, width
    wide = width * merge * merge
    return patch_embed + layers * block, norm + wide * wide + wide + wide * out + out


def qwen_preprocess(min_pixels: int, max_pixels: int, patch: int = QWEN_PATCH, temporal: int = QWEN_TEMPORAL,
                    merge: int = QWEN_MERGE) -> PreprocessSpec:
    """The "qwen2vl" resize rule's sizes (families/qwen2_vl.preprocess_spec; the mean, std and resample do not change
    a plan): the tile is the resize factor, patch x merge."""
    return PreprocessSpec("qwen2vl", (patch * merge, patch * merge), patch_size=patch, temporal_patch_size=temporal,
                          merge_size=merge, min_pixels=min_pixels, max_pixels=max_pixels)


def _qwen_vision(version: str, width: int, mlp: int, layers: int, heads: int, out: int) -> VisionShape:
    """A native-resolution tower: sequence and tokens_out are per image (VisionShape.at_patches); here one merge
    block's worth, the smallest image unit."""
    tower, merger = qwen_vision_params(version, width, mlp, layers, out)
    return VisionShape(tower + merger, merger, layers, width, mlp, heads, QWEN_MERGE**2, 1, gated=version == "2.5")


def _preset_qwen_vision(s) -> tuple[VisionShape, PreprocessSpec, ImageLayout]:
    vision = _qwen_vision(s.version, s.vision_hidden, s.vision_mlp, s.vision_layers, s.vision_heads, s.text_hidden)
    layout = ImageLayout("grid", QWEN_IMAGE_TOKEN, QWEN_IMAGE_TOKEN, QWEN_IMAGE_TOKEN_ID, 1)
    return vision, qwen_preprocess(QWEN_MIN_PIXELS, s.max_pixels), layout


def _preset_vision(family: str, s) -> tuple[VisionShape, PreprocessSpec, ImageLayout]:
    side = s.image // s.patch
    patch_embed = s.vision_hidden * 3 * s.patch * s.patch
    layers = s.vision_layers * vit_layer_params(s.vision_hidden, s.vision_mlp, qkv_bias=family != "internvl",
                                                layer_scale=family == "internvl")
    d, dv = s.text_hidden, s.vision_hidden
    if family == "idefics3":  # SigLIP: conv with bias, no CLS, post-LN; connector Linear(dv*s^2 -> d), no bias
        tower = patch_embed + dv + side * side * dv + layers + 2 * dv
        projector = dv * s.scale_factor**2 * d
        tokens, sequence = side * side // s.scale_factor**2, side * side
        preprocess = PreprocessSpec("idefics3", (s.image, s.image), resample="lanczos", longest_edge=4 * s.image,
                                    image_splitting=True)
        layout = ImageLayout("idefics3", "<image>", "<image>", 49190, tokens, fake_token="<fake_token_around_image>",
                             global_token="<global-img>", row_col_format="<row_{row}_col_{col}>")
    elif family == "llava":  # CLIP: class embedding, conv without bias, pre- and post-LN; 2-layer MLP projector
        tower = dv + patch_embed + (side * side + 1) * dv + 2 * dv + layers + 2 * dv
        projector = dv * d + d + d * d + d
        tokens, sequence = side * side, side * side + 1  # "default": the CLS row dropped
        preprocess = PreprocessSpec("shortest_edge_crop", (s.image, s.image), shortest_edge=s.image,
                                    image_mean=(0.48145466, 0.4578275, 0.40821073),
                                    image_std=(0.26862954, 0.26130258, 0.27577711))
        layout = ImageLayout("repeat", "<image>", "<image>", 32000, tokens)
    else:  # InternViT: CLS, conv with bias, Q/K/V without bias; projector LN(4dv) + Linear(4dv -> d) + Linear(d -> d)
        tower = dv + patch_embed + dv + (side * side + 1) * dv + layers
        projector = 2 * 4 * dv + 4 * dv * d + d + d * d + d
        tokens, sequence = side * side // 4, side * side + 1
        preprocess = PreprocessSpec("internvl", (s.image, s.image), image_mean=(0.485, 0.456, 0.406),
                                    image_std=(0.229, 0.224, 0.225), max_tiles=s.max_patches)
        layout = ImageLayout("wrapped", "<IMG_CONTEXT>", "<IMG_CONTEXT>", 151667, tokens, start_token="<img>",
                             end_token="</img>")
    vision = VisionShape(tower + projector, projector, s.vision_layers, dv, s.vision_mlp, s.vision_heads, sequence,
                         tokens)
    return vision, preprocess, layout


# --- checkpoints -----------------------------------------------------------------------------------------------


def safetensors_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from every *.safetensors header in the folder (8-byte length + JSON; no data read)."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors files; the planner reads tensor shapes from their headers "
                              "(re-save the checkpoint with safe_serialization=True)")
    shapes: dict = {}
    for file in files:
        try:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, struct.error, ValueError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc}); re-save the checkpoint") from None
        shapes.update({k: (v["dtype"], tuple(int(d) for d in v["shape"])) for k, v in header.items()
                       if k != "__metadata__"})
    return shapes


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); re-save the checkpoint") from None


def from_checkpoint(path: str | Path) -> ModelShapes:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BadInputError(f"{path} has no config.json; pass a Hugging Face checkpoint folder (save_pretrained)")
    config = _read_json(path / "config.json")
    family = next((FAMILIES[a] for a in config.get("architectures") or [] if a in FAMILIES), None)
    if family is None:
        raise CheckpointError(f"unsupported architecture {config.get('architectures')}; supported: "
                              f"{', '.join(sorted(FAMILIES))}")
    shapes = safetensors_shapes(path)
    decoder, tensors, decoder_keys = _checkpoint_decoder(config, shapes)
    vision_keys = [k for k in shapes if k not in decoder_keys]  # tower (a SigLIP pooling head included) + projector
    processor = {}
    for name in ("preprocessor_config.json", "processor_config.json"):  # families/base.read_processor_config's order
        loaded = _read_json(path / name)
        processor.update(loaded.get("image_processor", loaded) if name == "processor_config.json" else loaded)
        if name == "processor_config.json":
            processor.update({k: v for k, v in loaded.items() if k != "image_processor"})
    vision, preprocess, layout = _checkpoint_vision(path, family, config, processor, shapes, vision_keys)
    return ModelShapes(str(path), "checkpoint", family, decoder, tuple(tensors), vision, preprocess, layout)


def _checkpoint_decoder(config: dict, shapes: dict):
    from ..decoder_arch import architecture_for_model_type

    embed = [k for k in shapes if k.endswith("embed_tokens.weight")]
    if len(embed) != 1:
        raise CheckpointError(f"cannot find the text decoder's embed_tokens.weight among the checkpoint's tensors "
                              f"(found {embed or 'none'})")
    prefix = embed[0][: -len("embed_tokens.weight")]
    heads = [k for k in shapes if k.endswith("lm_head.weight")]
    keys = [k for k in shapes if k.startswith(prefix)] + heads
    text = _text_config(config)
    arch = architecture_for_model_type(text.get("model_type", "llama"))
    defaults = TEXT_DEFAULTS[arch.name]
    vocab, hidden = shapes[embed[0]][1]
    layer_ids = {int(m.group(1)) for k in keys if (m := re.search(r"layers\.(\d+)\.", k))}
    n_layers = len(layer_ids)
    n_heads = int(text.get("num_attention_heads", defaults["num_attention_heads"]))
    n_kv_heads = int(text.get("num_key_value_heads") or n_heads)
    q_rows = shapes[f"{prefix}layers.0.self_attn.q_proj.weight"][1][0]
    if q_rows % n_heads:
        raise CheckpointError(f"q_proj has {q_rows} rows, not a multiple of num_attention_heads {n_heads}; the "
                              "config.json does not match the weights")
    rope = text.get("rope_parameters") or {}
    decoder = DecoderSpec(
        architecture=arch.name, hidden_size=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=q_rows // n_heads, intermediate_size=shapes[f"{prefix}layers.0.mlp.gate_proj.weight"][1][0],
        vocab_size=vocab, context_length=int(text.get("max_position_embeddings", defaults["max_position_embeddings"])),
        rms_norm_eps=float(text.get("rms_norm_eps", defaults["rms_norm_eps"])),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", defaults["rope_theta"]))),
        tie_word_embeddings=not heads)
    tensors = []
    for key in keys:  # the HF decoder's own names (families/base.decoder_from), then gguf-py's
        hf_name = "lm_head.weight" if key in heads else "model." + key[len(prefix):]
        tensors.append((arch.gguf_tensor_name(hf_name, n_layers), shapes[key][1]))
    return decoder, tensors, set(keys)


def _text_config(config: dict) -> dict:
    """The decoder's config: text_config, or for a Qwen2-VL config.json in the Hub's older layout (the text keys at the
    top level, model_type "qwen2_vl") those keys, typed as transformers 5 types the nested one ("qwen2_vl_text")."""
    if config.get("text_config"):
        return config["text_config"]
    if config.get("model_type") in ("qwen2_vl", "qwen2_5_vl"):
        return {**config, "model_type": config["model_type"] + "_text"}
    return {}


def _token_text(path: Path, token_id: int, fallback: str) -> str:
    """The added token with this id in tokenizer.json (image tokens are added tokens), else the family's usual one."""
    data = _read_json(path / "tokenizer.json")
    return next((t["content"] for t in data.get("added_tokens", []) if t.get("id") == token_id), fallback)


def _checkpoint_vision(path: Path, family: str, config: dict, processor: dict, shapes: dict, keys: list[str]):
    vision_config = config.get("vision_config") or {}
    if family == "qwen2_vl":
        return _checkpoint_qwen_vision(path, config, processor, shapes, keys)
    projector = [k for k in keys if any(p in k for p in PROJECTOR_KEYS)]
    conv = [k for k in keys if len(shapes[k][1]) == 4 and k not in projector]
    if len(conv) != 1:
        raise CheckpointError(f"cannot find the vision tower's patch embedding (found {conv or 'no 4-D tensor'})")
    width, _, patch, _ = shapes[conv[0]][1]
    table = next((k for k in keys if "position_embedding" in k), None)
    rows = shapes[table][1][-2] if table else (int(vision_config.get("image_size", 224)) // patch) ** 2
    side = math.isqrt(rows)
    has_cls = side * side != rows
    side = math.isqrt(rows - 1) if has_cls else side
    layer_ids = {int(m.group(1)) for k in keys if k not in projector and (m := re.search(r"layers?\.(\d+)\.", k))}
    fc1 = next((shapes[k][1][0] for k in keys if re.search(r"layers?\.0\..*fc1\.weight$", k)), 4 * width)
    heads = int(vision_config.get("num_attention_heads") or max(1, width // 64))
    image = side * patch
    if family == "idefics3":
        scale = int(config.get("scale_factor", 2))
        tokens = int(processor.get("image_seq_len", side * side // scale**2))
        tile = int(processor.get("max_image_size", {}).get("longest_edge", image))
        preprocess = PreprocessSpec("idefics3", (tile, tile), longest_edge=int(processor.get("size", {}).get(
            "longest_edge", 4 * tile)), image_splitting=bool(processor.get("do_image_splitting", True)))
        image_id = int(config.get("image_token_id") or 49190)
        token = _token_text(path, image_id, "<image>")
        layout = ImageLayout("idefics3", token, token, image_id, tokens, fake_token="<fake_token_around_image>",
                             global_token="<global-img>", row_col_format="<row_{row}_col_{col}>")
    elif family == "llava":
        strategy = config.get("vision_feature_select_strategy", "default")
        tokens = side * side + (1 if has_cls else 0) - (1 if strategy == "default" else 0)
        preprocess = _llava_preprocess(processor, image)
        image_id = int(config.get("image_token_id") or config.get("image_token_index"))
        token = _token_text(path, image_id, "<image>")
        layout = ImageLayout("repeat", token, token, image_id, tokens)
    else:
        shrink = round(1 / float(config.get("downsample_ratio", 0.5)))
        tokens = side * side // shrink**2
        size = processor.get("size", image)
        tile = int(size.get("height") or size.get("shortest_edge") or size.get("longest_edge")) \
            if isinstance(size, dict) else int(size[0] if isinstance(size, (list, tuple)) else size)
        preprocess = PreprocessSpec("internvl", (tile, tile), min_tiles=int(processor.get("min_patches", 1)),
                                    max_tiles=int(processor.get("max_patches", 12)))
        image_id = int(config["image_token_id"])
        token = _token_text(path, image_id, "<IMG_CONTEXT>")
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        layout = ImageLayout("wrapped", token, token, image_id, tokens,
                             start_token=tokenizer_config.get("start_image_token") or "<img>",
                             end_token=tokenizer_config.get("end_image_token") or "</img>")
    numel = {k: math.prod(shapes[k][1]) for k in keys}
    vision = VisionShape(sum(numel.values()), sum(numel[k] for k in projector), len(layer_ids), width, fc1, heads,
                         rows, tokens)
    return vision, preprocess, layout


def _processor_pixels(processor: dict, key: str, size_key: str, default: int) -> int:
    """Qwen2VLImageProcessor: an explicit min_pixels / max_pixels wins over size.shortest_edge / longest_edge."""
    if processor.get(key) is not None:
        return int(processor[key])
    size = processor.get("size") or {}
    return int(size.get(size_key) or default)


def _checkpoint_qwen_vision(path: Path, config: dict, processor: dict, shapes: dict, keys: list[str]):
    """Qwen2-VL / Qwen2.5-VL: the tower's width from the Conv3d patch embedding (5-D), depth from its blocks, the MLP
    width from fc1 (GELU) or gate_proj (SwiGLU), the merger as the projector; the parameter count is the tensors'."""
    vision_config = config.get("vision_config") or {}
    embed = [k for k in keys if len(shapes[k][1]) == 5]
    if len(embed) != 1:
        raise CheckpointError(f"cannot find the vision tower's Conv3d patch embedding (found {embed or 'no 5-D tensor'})")
    width, channels, temporal, patch, _ = shapes[embed[0]][1]
    merge = int(vision_config.get("spatial_merge_size", QWEN_MERGE))
    projector = [k for k in keys if ".merger." in k or k.startswith("merger.")]
    layer_ids = {int(m.group(1)) for k in keys if (m := re.search(r"blocks\.(\d+)\.", k))}
    gate = next((shapes[k][1][0] for k in keys if re.search(r"blocks\.0\.mlp\.gate_proj\.weight$", k)), None)
    fc1 = next((shapes[k][1][0] for k in keys if re.search(r"blocks\.0\.mlp\.fc1\.weight$", k)), 4 * width)
    heads = int(vision_config.get("num_heads") or max(1, width // 64))
    preprocess = qwen_preprocess(_processor_pixels(processor, "min_pixels", "shortest_edge", QWEN_MIN_PIXELS),
                                 _processor_pixels(processor, "max_pixels", "longest_edge", 28 * 28 * 1280),
                                 int(processor.get("patch_size", patch)),
                                 int(processor.get("temporal_patch_size", temporal)),
                                 int(processor.get("merge_size", merge)))
    if (preprocess.patch_size, preprocess.merge_size) != (patch, merge):
        raise CheckpointError(f"preprocessor_config.json says patch {preprocess.patch_size} / merge "
                              f"{preprocess.merge_size} but the vision tower uses {patch} / {merge}; the files do not "
                              "belong together")
    image_id = int(config.get("image_token_id") or QWEN_IMAGE_TOKEN_ID)
    token = _token_text(path, image_id, QWEN_IMAGE_TOKEN)
    layout = ImageLayout("grid", token, token, image_id, 1)
    numel = {k: math.prod(shapes[k][1]) for k in keys}
    vision = VisionShape(sum(numel.values()), sum(numel[k] for k in projector), len(layer_ids), width,
                         gate or fc1, heads, merge * merge, 1, gated=gate is not None)
    return vision, preprocess, layout


def _llava_preprocess(processor: dict, image: int) -> PreprocessSpec:
    """families/llava.preprocess_spec's sizes (the resample, mean and std do not change a plan)."""
    kind = processor.get("image_processor_type", "CLIPImageProcessor").removesuffix("Fast").removesuffix("Pil")
    size = processor.get("size", {})
    if kind in ("CLIPImageProcessor", "LlavaImageProcessor") and "shortest_edge" in size:
        crop = processor.get("crop_size", {"height": size["shortest_edge"], "width": size["shortest_edge"]})
        return PreprocessSpec("shortest_edge_crop", (crop["height"], crop["width"]), shortest_edge=size["shortest_edge"])
    if "height" in size:
        return PreprocessSpec("fixed", (size["height"], size["width"]))
    return PreprocessSpec("fixed", (image, image))
