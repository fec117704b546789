"""A model's shapes before any export, for the planner: from a checkpoint folder (config.json, the processor config,
tokenizer.json and the safetensors headers; no weight is read and torch is never imported) or from a preset
(edgevlm/reference/presets.py: shapes without any file).

What the bundle path reads from files, this module derives: the decoder's GGUF tensor list (names and shapes, which
budget.gguf_weight_bytes turns into exact bytes per quantization), the vision tower's parameter count and shape
(encoder bytes per precision, activations and FLOPs per tile: estimates), the preprocessing and the image layout.
The family's own facts (preprocessing, image layout and token ids, tokens per tile, the tower's positions, the
decoder's architecture row) come from its torch-free describe() (edgevlm/families), from the checkpoint's files or
from the files a preset stands for (reference/preset_configs.py); this module adds what only the weights say."""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import BadInputError, CheckpointError
from ..families import describe
from ..families.files import read_config, read_processor_config, read_vocabulary
from ..families.spec import FamilySpec, text_config, usable_context
from ..layout import ImageLayout
from ..manifest import DecoderSpec
from ..preprocess import PreprocessSpec
from . import budget

# transformers' defaults for text_config keys a Hub config.json may omit (LlamaConfig / Qwen2Config)
TEXT_DEFAULTS = {"llama": {"num_attention_heads": 32, "max_position_embeddings": 2048, "rope_theta": 10000.0,
                           "rms_norm_eps": 1e-6},
                 "qwen2": {"num_attention_heads": 32, "max_position_embeddings": 32768, "rope_theta": 10000.0,
                           "rms_norm_eps": 1e-6}}
TEXT_DEFAULTS["qwen2vl"] = TEXT_DEFAULTS["qwen2"]  # Qwen2-VL's text config is a Qwen2Config's
# Qwen3VLTextConfig's defaults
TEXT_DEFAULTS["qwen3vl"] = {"num_attention_heads": 32, "max_position_embeddings": 128000, "rope_theta": 500000.0,
                            "rms_norm_eps": 1e-6}
# Gemma3TextConfig's (rope_theta: the global layers'; the local ones use rope_parameters["sliding_attention"])
TEXT_DEFAULTS["gemma3"] = {"num_attention_heads": 8, "max_position_embeddings": 131072, "rope_theta": 1e6,
                           "rms_norm_eps": 1e-6}
# Gemma2Config's (PaliGemma 2)
TEXT_DEFAULTS["gemma2"] = {"num_attention_heads": 8, "max_position_embeddings": 8192, "rope_theta": 10000.0,
                           "rms_norm_eps": 1e-6}

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
    """A preset's shapes: its family's description of the files build_preset would write, the decoder's GGUF tensor
    list from the row the description names, the tower's parameters from its formula (_preset_vision)."""
    from ..decoder_arch import architecture
    from ..reference.preset_configs import preset_files
    from ..reference.presets import PRESETS

    from ..reference.preset_gemma3 import TEXT_ONLY_PRESETS

    if name in TEXT_ONLY_PRESETS:
        from ..families.gemma3 import text_only_refusal

        raise BadInputError(text_only_refusal(TEXT_ONLY_PRESETS[name]))
    if name not in PRESETS:
        raise BadInputError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    shape = PRESETS[name]
    spec = describe(*preset_files(shape))
    arch = architecture(spec.decoder_architecture)
    tied = getattr(shape, "tied", False)
    head_dim = getattr(shape, "head_dim", None) or shape.text_hidden // shape.text_heads
    config = preset_files(shape)[0]
    text = text_config(config)
    local = _local_attention(text, shape.text_layers, arch) if arch.swa_global_every else {}
    decoder = DecoderSpec(architecture=arch.name, hidden_size=shape.text_hidden, n_layers=shape.text_layers,
                          n_heads=shape.text_heads, n_kv_heads=shape.text_kv_heads, head_dim=head_dim,
                          intermediate_size=shape.text_mlp, vocab_size=shape.vocab,
                          context_length=usable_context(text, arch.name, shape.context),
                          rms_norm_eps=1e-5, rope_theta=shape.rope_theta, tie_word_embeddings=tied, **local)
    tensors = budget.llama_decoder_tensors(shape.text_hidden, shape.text_layers, shape.text_heads, shape.text_kv_heads,
                                           head_dim, shape.text_mlp, shape.vocab, tied, arch.bias_tensors)
    # Gemma 3: QK-norm and the sandwich norms, four more vectors per block; Gemma 2: the sandwich norms
    extra = {"gemma3": ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"),
             "gemma2": ("post_attention_norm", "post_ffw_norm")}.get(arch.name, ())
    tensors += [(f"blk.{i}.{n}.weight", (head_dim if n.startswith("attn_") else shape.text_hidden,))
                for i in range(shape.text_layers) for n in extra]
    vision = _preset_vision(spec, shape)
    return ModelShapes(name, "preset", spec.family, decoder, tuple(tensors), vision, spec.preprocess, spec.layout)


def perceiver_params(s) -> int:
    """Idefics2's Perceiver resampler: the latents, per layer two RMSNorms in, Q (d -> heads*hd), K/V (d -> kv*hd), O,
    the post-attention RMSNorm and a SwiGLU MLP of 4d, no biases; a final RMSNorm."""
    d, hd = s.text_hidden, s.resampler_head_dim
    attention = d * s.resampler_heads * hd * 2 + 2 * d * s.resampler_kv_heads * hd
    return s.latents * d + s.resampler_depth * (3 * d + attention + 3 * d * 4 * d) + d


def vit_layer_params(width: int, mlp: int, qkv_bias: bool = True, layer_scale: bool = False) -> int:
    """One pre-norm ViT block: Q/K/V/O (+ biases), the MLP's two matrices with biases, two LayerNorms (+ InternViT's
    two layer-scale vectors)."""
    attention = 4 * width * width + (4 if qkv_bias else 1) * width
    return attention + 2 * width * mlp + mlp + width + 4 * width + (2 * width if layer_scale else 0)


def qwen_vision_params(version: str, width: int, mlp: int, layers: int, out: int, patch: int = 14, temporal: int = 2,
                       merge: int = 2, channels: int = 3) -> tuple[int, int]:
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


def qwen3_vision_params(width: int, mlp: int, layers: int, out: int, table: int, deepstack: int, patch: int = 16,
                        temporal: int = 2, merge: int = 2, channels: int = 3) -> tuple[int, int]:
    """(tower, mergers) parameters of a Qwen3-VL vision tower (transformers' modeling_qwen3_vl): a Conv3d patch
    embedding with bias, the learned position table (table x width; a lookup, which the FLOP formula counts as a
    matmul: +0.6% on the 2B), pre-norm blocks as vit_layer_params; the merger LayerNorm(width) + Linear(4w -> 4w) +
    Linear(4w -> out), each DeepStack merger the same with its LayerNorm over 4w."""
    wide = width * merge * merge
    tower = width * channels * temporal * patch * patch + width + table * width + layers * vit_layer_params(width, mlp)
    linears = wide * wide + wide + wide * out + out
    return tower, 2 * width + linears + deepstack * (2 * wide + linears)


def _preset_vision(spec: FamilySpec, s) -> VisionShape:
    """The tower + projector's parameter count by formula (the shapes without weights); the tower's positions and
    rows per tile are the family description's."""
    v, d = spec.vision, s.text_hidden
    if spec.family == "qwen3_vl":
        tower, projector = qwen3_vision_params(v.width, v.mlp, v.layers, d, s.position_embeddings, len(s.deepstack),
                                               v.patch_size, spec.preprocess.temporal_patch_size, v.merge_size)
        return VisionShape(tower + projector, projector, v.layers, v.width, v.mlp, v.heads, v.sequence,
                           v.tokens_per_tile)
    if spec.family == "qwen2_vl":  # native resolution: one merge block's worth, the smallest image unit
        tower, projector = qwen_vision_params(s.version, v.width, v.mlp, v.layers, d, v.patch_size,
                                              spec.preprocess.temporal_patch_size, v.merge_size)
        return VisionShape(tower + projector, projector, v.layers, v.width, v.mlp, v.heads, v.sequence,
                           v.tokens_per_tile, gated=v.gated)
    side, dv = v.image_size // v.patch_size, v.width
    patch_embed = dv * 3 * v.patch_size * v.patch_size
    layers = v.layers * vit_layer_params(dv, v.mlp, qkv_bias=spec.family != "internvl",
                                         layer_scale=spec.family == "internvl")
    if spec.family == "idefics3":  # SigLIP: conv with bias, no CLS, post-LN; connector Linear(dv*s^2 -> d), no bias
        tower = patch_embed + dv + side * side * dv + layers + 2 * dv
        projector = dv * s.scale_factor**2 * d
    elif spec.family == "gemma3":  # SigLIP without its pooling head; soft-embedding RMSNorm(dv) + Linear(dv -> d)
        tower = patch_embed + dv + side * side * dv + layers + 2 * dv
        projector = dv + dv * d
    elif spec.family == "paligemma":  # SigLIP without its pooling head; Linear(dv -> d) with bias
        tower = patch_embed + dv + side * side * dv + layers + 2 * dv
        projector = dv * d + d
    elif spec.family == "idefics2":  # SigLIP as above; bridge: SwiGLU MLP(dv -> text_mlp -> d) + perceiver_params
        tower = patch_embed + dv + side * side * dv + layers + 2 * dv
        projector = 2 * dv * s.text_mlp + s.text_mlp * d + perceiver_params(s)
    elif spec.family == "llava_onevision":  # SigLIP as above; MLP projector Linear(dv -> d) + Linear(d -> d) + newline
        tower = patch_embed + dv + side * side * dv + layers + 2 * dv
        projector = dv * d + d + d * d + d + d
    elif spec.family == "blip2":  # EVA ViT: CLS, conv with bias, a fused qkv bias (k's part zero), post-LN; Q-Former
        from ..reference.preset_instructblip import qformer_params

        tower = dv + patch_embed + dv + (side * side + 1) * dv + layers + 2 * dv
        projector = qformer_params(s, instruct=spec.instruction is not None)
    elif spec.family == "llava":  # CLIP: class embedding, conv without bias, pre- and post-LN; 2-layer MLP projector
        tower = dv + patch_embed + (side * side + 1) * dv + 2 * dv + layers + 2 * dv
        projector = dv * d + d + d * d + d
    else:  # InternViT: CLS, conv with bias, Q/K/V without bias; projector LN(4dv) + Linear(4dv -> d) + Linear(d -> d)
        tower = dv + patch_embed + dv + (side * side + 1) * dv + layers
        projector = 2 * 4 * dv + 4 * dv * d + d + d * d + d
    return VisionShape(tower + projector, projector, v.layers, dv, v.mlp, v.heads, v.sequence, v.tokens_per_tile)


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


def from_checkpoint(path: str | Path) -> ModelShapes:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise BadInputError(f"{path} has no config.json; pass a Hugging Face checkpoint folder (save_pretrained)")
    config = read_config(path)
    spec = describe(config, read_processor_config(path), read_vocabulary(path))
    from ..decoder_arch import architecture

    refusal = architecture(spec.decoder_architecture).export_refusal
    if refusal:  # nothing the planner prices (GGUF/MLX decoders) can be written for this decoder (BLIP-2's OPT)
        raise CheckpointError(refusal)
    shapes = safetensors_shapes(path)
    decoder, tensors, decoder_keys = _checkpoint_decoder(config, spec, shapes)
    vision_keys = [k for k in shapes if k not in decoder_keys]  # tower (a SigLIP pooling head included) + projector
    vision = _checkpoint_vision(spec, shapes, vision_keys)
    return ModelShapes(str(path), "checkpoint", spec.family, decoder, tuple(tensors), vision, spec.preprocess,
                       spec.layout)


def _checkpoint_decoder(config: dict, spec: FamilySpec, shapes: dict):
    from ..decoder_arch import architecture

    embed = [k for k in shapes if k.endswith("embed_tokens.weight")]
    if len(embed) != 1:
        raise CheckpointError(f"cannot find the text decoder's embed_tokens.weight among the checkpoint's tensors "
                              f"(found {embed or 'none'})")
    prefix = embed[0][: -len("embed_tokens.weight")]
    heads = [k for k in shapes if k.endswith("lm_head.weight")]
    keys = [k for k in shapes if k.startswith(prefix)] + heads
    text = text_config(config)
    arch = architecture(spec.decoder_architecture)
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
    local = _local_attention(text, n_layers, arch) if arch.swa_global_every else {}
    rope = rope.get("full_attention", rope)  # Gemma 3: one entry per layer type
    head_dim = q_rows // n_heads
    decoder = DecoderSpec(
        architecture=arch.name, hidden_size=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        head_dim=head_dim, intermediate_size=shapes[f"{prefix}layers.0.mlp.gate_proj.weight"][1][0],
        vocab_size=vocab, context_length=usable_context(text, arch.name, text.get("max_position_embeddings",
                                                                                defaults["max_position_embeddings"])),
        rms_norm_eps=float(text.get("rms_norm_eps", defaults["rms_norm_eps"])),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", defaults["rope_theta"]))),
        tie_word_embeddings=not heads, **local)
    tensors = []
    for key in keys:  # the HF decoder's own names (families/base.decoder_from), then gguf-py's
        hf_name = "lm_head.weight" if key in heads else "model." + key[len(prefix):]
        tensors.append((arch.gguf_tensor_name(hf_name, n_layers), shapes[key][1]))
    return decoder, tensors, set(keys)


def _local_attention(text: dict, n_layers: int, arch) -> dict:
    """The sliding-window fields from a text config (transformers' defaults: window 4096; Gemma 3: every sixth layer
    global, local RoPE base 10k; Gemma 2: every second layer, one RoPE base for all)."""
    if arch.name == "gemma2":
        rope = text.get("rope_parameters") or {}
        return {"sliding_window": int(text.get("sliding_window") or 4096), "global_every": 2,
                "rope_local_theta": float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))}
    every = int(text.get("sliding_window_pattern", arch.swa_global_every))
    local = (text.get("rope_parameters") or {}).get("sliding_attention") or {}
    return {"sliding_window": int(text.get("sliding_window") or 4096), "global_every": every,
            "rope_local_theta": float(local.get("rope_theta", 10000.0))}


def _checkpoint_vision(spec: FamilySpec, shapes: dict, keys: list[str]) -> VisionShape:
    """The tower's parameters, width, depth and MLP width from the weights (the projector's tensors are those the
    description names); its positions, rows per tile and heads from the description, checked against the weights."""
    v = spec.vision
    projector = [k for k in keys if any(p in k for p in v.projector_prefixes)]
    numel = {k: math.prod(shapes[k][1]) for k in keys}
    if spec.layout.kind == "grid":  # Qwen2-VL: a Conv3d patch embedding (5-D), blocks, an MLP or a SwiGLU
        embed = [k for k in keys if len(shapes[k][1]) == 5]
        if len(embed) != 1:
            raise CheckpointError(f"cannot find the vision tower's Conv3d patch embedding (found {embed or 'no 5-D tensor'})")
        width, _, _, patch, _ = shapes[embed[0]][1]
        layer_ids = {int(m.group(1)) for k in keys if (m := re.search(r"blocks\.(\d+)\.", k))}
        gate = next((shapes[k][1][0] for k in keys if re.search(r"blocks\.0\.mlp\.gate_proj\.weight$", k)), None)
        mlp = gate or next((shapes[k][1][0] for k in keys if re.search(r"blocks\.0\.mlp\.(linear_)?fc1\.weight$", k)),
                   4 * width)  # Qwen2-VL: fc1; Qwen3-VL: linear_fc1
    else:
        conv = [k for k in keys if len(shapes[k][1]) == 4 and k not in projector]
        if len(conv) != 1:
            raise CheckpointError(f"cannot find the vision tower's patch embedding (found {conv or 'no 4-D tensor'})")
        width, _, patch, _ = shapes[conv[0]][1]
        table = next((k for k in keys if "position_embedding" in k and k not in projector), None)  # not a Q-Former's
        if table and shapes[table][1][-2] != v.sequence:
            raise CheckpointError(f"the vision tower's position table has {shapes[table][1][-2]} rows but config.json "
                                  f"makes {v.sequence} positions per tile; the files do not belong together")
        layer_ids = {int(m.group(1)) for k in keys if k not in projector and (m := re.search(r"layers?\.(\d+)\.", k))}
        mlp = next((shapes[k][1][0] for k in keys if re.search(r"layers?\.0\..*fc1\.weight$", k)), 4 * width)
        gate = None
    if (width, patch) != (v.width, v.patch_size):
        raise CheckpointError(f"the vision tower's patch embedding is {width} wide with {patch}-px patches but "
                              f"config.json says {v.width} / {v.patch_size}; the files do not belong together")
    return VisionShape(sum(numel.values()), sum(numel[k] for k in projector), len(layer_ids), width, mlp, v.heads,
                       v.sequence, v.tokens_per_tile, gated=gate is not None)
