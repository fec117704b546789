"""InternVL (InternViT + pixel shuffle + LayerNorm/MLP projector) -> llama.cpp's `internvl` mmproj.

What clip.cpp's internvl graph (tools/mtmd/models/internvl.cpp at the pinned llama.cpp) computes: the patches with
the CLS embedding appended *after* them (`v.class_embd`), learned positions added row by row, a pre-norm ViT with
layer scales (`ls1`, `ls2`), the last row (CLS) dropped, the pixel shuffle by `projector.scale_factor`, then
LayerNorm (eps 1e-5) -> Linear -> GELU -> Linear as `mm.model.mlp.0 / .1 / .3`. HF puts the CLS first and gives it
position row 0, so the file stores the position rows CLS-last (patch rows 1..P, then row 0): each token then gets
HF's row. What clip.cpp cannot run (q/k norms, a norm type other than the one it picks by shape, ...) is refused by
families/internvl.py's describe(). Tiles: mtmd's internvl
preprocessor takes min/max tiles from the file but picks the grid as llava-next does (best fit, letterboxed), where
InternVL picks the closest aspect ratio; the notes say which images differ."""
from __future__ import annotations

import numpy as np

from ..errors import BadInputError
from .mmproj_plan import ERF_GELU_NOTE, MmprojPlan, activation_flags, common_u32, numpy_of

PROJECTOR_NORM_EPS = 1e-5  # clip.cpp's internvl projector LayerNorm epsilon (hard-coded)


def _linear(linear, name: str) -> dict[str, np.ndarray]:
    tensors = {f"{name}.weight": numpy_of(linear.weight)}
    if linear.bias is not None:
        tensors[f"{name}.bias"] = numpy_of(linear.bias)
    return tensors


def plan_internvl(ckpt) -> MmprojPlan:
    hf = ckpt.hf_model
    config = hf.config
    vc = config.vision_config
    tower, projector = hf.model.vision_tower, hf.model.multi_modal_projector
    # what config.json shows mtmd cannot run is refused by the family's describe(); the loaded modules' rest here
    if abs(projector.layer_norm.eps - PROJECTOR_NORM_EPS) > 1e-12:
        raise BadInputError(f"the projector's LayerNorm epsilon is {projector.layer_norm.eps}; llama.cpp's internvl "
                            f"graph uses {PROJECTOR_NORM_EPS}: export onnx:fp32 / onnx:int8 instead")
    flags, notes = activation_flags(vc.hidden_act, "vision tower")
    notes.append(f"the projector's erf GELU {ERF_GELU_NOTE}")
    n_total = int(vc.num_hidden_layers)
    layer = int(config.vision_feature_layer)
    n_layers = n_total + 1 + layer if layer < 0 else layer  # HF hidden_states index: layers after it never run
    embeddings = tower.embeddings
    positions = numpy_of(embeddings.position_embeddings)[0]  # (1 + P, D), CLS row first
    tensors = {"v.patch_embd.weight": numpy_of(embeddings.patch_embeddings.projection.weight),  # (D, 3, p, p)
               "v.patch_embd.bias": numpy_of(embeddings.patch_embeddings.projection.bias),
               "v.class_embd": numpy_of(embeddings.cls_token).reshape(-1),  # (D,)
               "v.position_embd.weight": np.concatenate([positions[1:], positions[:1]])}  # CLS-last, as clip.cpp
    for i in range(n_layers):
        block = tower.encoder.layer[i]
        attention = block.attention
        for short, module in (("ln1", block.layernorm_before), ("ln2", block.layernorm_after)):
            tensors[f"v.blk.{i}.{short}.weight"] = numpy_of(module.weight)
            tensors[f"v.blk.{i}.{short}.bias"] = numpy_of(module.bias)
        for short, linear in (("attn_q", attention.q_proj), ("attn_k", attention.k_proj), ("attn_v", attention.v_proj),
                              ("attn_out", attention.projection_layer), ("ffn_up", block.mlp.fc1),
                              ("ffn_down", block.mlp.fc2)):
            tensors |= _linear(linear, f"v.blk.{i}.{short}")
        tensors[f"v.blk.{i}.ls1.weight"] = numpy_of(block.lambda_1)
        tensors[f"v.blk.{i}.ls2.weight"] = numpy_of(block.lambda_2)
    tensors |= {"mm.model.mlp.0.weight": numpy_of(projector.layer_norm.weight),
                "mm.model.mlp.0.bias": numpy_of(projector.layer_norm.bias)}
    tensors |= _linear(projector.linear_1, "mm.model.mlp.1") | _linear(projector.linear_2, "mm.model.mlp.3")
    spec = ckpt.preprocess
    u32 = common_u32(spec.tile_size[0], ckpt.spec.vision.patch_size, vc.hidden_size, vc.intermediate_size, n_layers,
                     vc.num_attention_heads, config.text_config.hidden_size)
    u32 |= {"scale_factor": round(1 / float(config.downsample_ratio)), "preproc_min_tiles": int(spec.min_tiles),
            "preproc_max_tiles": int(spec.max_tiles)}
    notes += ["mtmd picks the tile grid by best fit (llava-next's rule, letterboxed) where InternVL picks the closest "
              "aspect ratio: images whose aspect ratio is no w x h grid's within the tile limits, and images smaller "
              "than a tile that InternVL would still split, get other tiles (and token counts) in mtmd",
              "the position rows are stored CLS-last because clip.cpp appends the CLS token after the patches (the "
              "layout of upstream llama.cpp issue 25814); files in HF's order give every patch its neighbour's position"]
    return MmprojPlan("internvl", u32, {"layer_norm_epsilon": float(vc.layer_norm_eps)}, flags,
                      (list(spec.image_mean), list(spec.image_std)), None, tensors, notes)
