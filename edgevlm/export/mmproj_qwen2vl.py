"""Qwen2-VL / Qwen2.5-VL vision tower + merger -> llama.cpp's `qwen2vl_merger` / `qwen2.5vl_merger` mmproj.

What clip.cpp's qwen2vl graph (tools/mtmd/models/qwen2vl.cpp at the pinned llama.cpp) computes, and so what the
file must say: the Conv3d patch embedding as two Conv2d over the two temporal slices (`v.patch_embd.weight`,
`v.patch_embd.weight.1`: a still image is its own second frame), 2-D M-RoPE positions from the image grid (computed by
clip.cpp, nothing stored), q/k/v split from the fused qkv, LayerNorm + quick-GELU fc1/fc2 (Qwen2-VL) or RMSNorm +
SiLU-gated MLP (2.5, `clip.use_silu`), the merger's norm as `v.post_ln` and its MLP as `mm.0` / `mm.2` (erf GELU in
HF, tanh GELU in ggml). Qwen2.5-VL's window attention: clip.cpp windows every block but those with
(i + 1) % n_wa_pattern == 0 and fixes the window at 112 px (`attn_window_size` is not read for this type), with a
2x2 merge hard-wired; checkpoints that differ are refused by families/qwen2_vl.py's describe() (config.json says it). mtmd does not read min/max pixels from this type's file
(it bounds images to 8..4096 tokens unless llama-server / llama-mtmd-cli get --image-min-tokens / --image-max-tokens),
so the plan carries the processor's bounds for the manifest (`image_tokens`)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import BadInputError
from ..families.qwen2_vl import MTMD_MERGE, window_pattern
from .mmproj_plan import ERF_GELU_NOTE, MmprojPlan, activation_flags, common_u32, numpy_of
# clip.cpp's own image-token bounds for these types without --image-min-tokens / --image-max-tokens
MTMD_DEFAULT_TOKENS = (8, 4096)
NATIVE_IMAGE_SIZE = 560  # clip.vision.image_size: unused by the native-resolution graph; llama.cpp's converter's value


def _norm_tensors(norm, name: str) -> dict[str, np.ndarray]:
    tensors = {f"{name}.weight": numpy_of(norm.weight)}
    if getattr(norm, "bias", None) is not None:  # LayerNorm (Qwen2-VL); Qwen2.5-VL's RMSNorm has none
        tensors[f"{name}.bias"] = numpy_of(norm.bias)
    return tensors


def _eps(norm) -> float:
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))


def _linear(linear, name: str) -> dict[str, np.ndarray]:
    tensors = {f"{name}.weight": numpy_of(linear.weight)}
    if linear.bias is not None:
        tensors[f"{name}.bias"] = numpy_of(linear.bias)
    return tensors


def image_token_bounds(preprocess) -> tuple[int, int]:
    """The processor's min/max pixels as mtmd's token bounds (one token per merged (patch * merge)^2 block)."""
    area = (preprocess.patch_size * preprocess.merge_size) ** 2
    return max(1, math.ceil(preprocess.min_pixels / area)), preprocess.max_pixels // area


def plan_qwen2vl(ckpt) -> MmprojPlan:
    hf = ckpt.hf_model
    visual = hf.model.visual
    vc = visual.config
    gated = ckpt.spec.vision.gated  # Qwen2.5-VL; what clip.cpp cannot run is refused by the family's describe()
    projector_type = ckpt.spec.mmproj_projector
    blocks = visual.blocks
    depth, width, mlp = len(blocks), ckpt.spec.vision.width, ckpt.spec.vision.mlp
    flags, notes = activation_flags(vc.hidden_act, "vision tower")
    conv = visual.patch_embed.proj.weight  # (D, 3, T=2, p, p): one Conv2d per temporal slice
    tensors = {"v.patch_embd.weight": numpy_of(conv[:, :, 0]), "v.patch_embd.weight.1": numpy_of(conv[:, :, 1])}
    for i, block in enumerate(blocks):
        tensors |= _norm_tensors(block.norm1, f"v.blk.{i}.ln1") | _norm_tensors(block.norm2, f"v.blk.{i}.ln2")
        qkv_w, qkv_b = numpy_of(block.attn.qkv.weight), numpy_of(block.attn.qkv.bias)  # (3D, D), (3D,): q, k, v
        for j, short in enumerate(("attn_q", "attn_k", "attn_v")):
            tensors[f"v.blk.{i}.{short}.weight"] = qkv_w[j * width:(j + 1) * width]
            tensors[f"v.blk.{i}.{short}.bias"] = qkv_b[j * width:(j + 1) * width]
        tensors |= _linear(block.attn.proj, f"v.blk.{i}.attn_out")
        if gated:
            tensors |= (_linear(block.mlp.gate_proj, f"v.blk.{i}.ffn_gate") | _linear(block.mlp.up_proj, f"v.blk.{i}.ffn_up")
                        | _linear(block.mlp.down_proj, f"v.blk.{i}.ffn_down"))
        else:
            tensors |= _linear(block.mlp.fc1, f"v.blk.{i}.ffn_up") | _linear(block.mlp.fc2, f"v.blk.{i}.ffn_down")
    merger = visual.merger
    tensors |= _norm_tensors(merger.ln_q, "v.post_ln") | _linear(merger.mlp[0], "mm.0") | _linear(merger.mlp[2], "mm.2")
    eps = {_eps(block.norm1) for block in blocks} | {_eps(block.norm2) for block in blocks} | {_eps(merger.ln_q)}
    if len(eps) != 1:
        raise BadInputError(f"the tower's norms use several epsilons {sorted(eps)}; clip.cpp takes one for all")
    u32 = common_u32(NATIVE_IMAGE_SIZE, vc.patch_size, width, mlp, depth, ckpt.spec.vision.heads,
                     hf.config.text_config.hidden_size) | {"spatial_merge_size": MTMD_MERGE}
    if gated:
        u32["n_wa_pattern"] = window_pattern(vc.fullatt_block_indexes, depth)
    spec = ckpt.preprocess
    bounds = image_token_bounds(spec)
    notes += [f"the merger's erf GELU {ERF_GELU_NOTE}",
              f"mtmd bounds an image to {MTMD_DEFAULT_TOKENS[0]}..{MTMD_DEFAULT_TOKENS[1]} tokens unless told; this "
              f"checkpoint's processor to {bounds[0]}..{bounds[1]}: pass --image-min-tokens {bounds[0]} "
              f"--image-max-tokens {bounds[1]} to llama-server / llama-mtmd-cli",
              "mtmd resizes keeping the aspect ratio and pads with black (PAD_CEIL) where HF stretches the image to "
              "its smart-resized size: only images whose aspect ratio the resize keeps (e.g. sides that are multiples "
              "of patch x merge) see HF's pixels",
              "mtmd's smart resize rounds a side of (k + 0.5) x patch x merge px away from zero where HF rounds it to "
              "even: such sides get one more row or column of tokens in mtmd"]
    return MmprojPlan(projector_type, u32, {"layer_norm_epsilon": eps.pop()}, flags,
                      (list(spec.image_mean), list(spec.image_std)), None, tensors, notes, image_tokens=bounds)
