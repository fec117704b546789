"""Qwen3-VL's vision half as llama.cpp's mmproj (projector type `qwen3vl_merger`; tools/mtmd/models/qwen3vl.cpp at
the pinned llama.cpp): the Conv3d patch embedding as its two temporal slices (`v.patch_embd.weight` and `.weight.1`,
the image frame being repeated), the learned position table (clip.cpp resamples it to each image's grid), fused
qkv blocks, the merger's norm as `v.post_ln` with its two linears as `mm.0` / `mm.2`, and each DeepStack merger as
`v.deepstack.{block}` after the vision block it reads. libmtmd then emits rows n_embd x (1 + k) wide, which
llama.cpp's qwen3vl decoder takes as edgevlm's runtime does. Returns the plan's fields; mmproj.py (which this
module does not import: no cycle) adds the tower's activation flags and builds its MmprojPlan."""
from __future__ import annotations

import numpy as np

from ..errors import BadInputError

BLOCK_TENSORS = {"ln1": "norm1", "ln2": "norm2", "attn_qkv": "attn.qkv", "attn_out": "attn.proj",
                 "ffn_up": "mlp.linear_fc1", "ffn_down": "mlp.linear_fc2"}


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").float().numpy()


def plan_fields(ckpt) -> dict:
    """MmprojPlan's fields for a Qwen3-VL checkpoint, but its activation flags."""
    hf = ckpt.hf_model
    visual, vision_config = hf.model.visual, hf.config.vision_config
    notes = []
    notes.append("the mergers' erf GELU runs as tanh GELU in mtmd (<= 4.7e-4 per activation)")
    notes.append("mtmd keeps an image's aspect ratio and pads where transformers' smart_resize stretches it, and at the "
                 "min_pixels bound it makes more tokens: only sizes smart_resize keeps in shape (whole 32-px blocks, "
                 "above min_pixels) see the checkpoint's pixels in llama.cpp")
    conv = visual.patch_embed.proj.weight  # (D, C, T, p, p)
    if conv.shape[2] != 2:
        raise BadInputError(f"clip.cpp's qwen3vl graph takes a temporal patch of 2 frames; this tower has {conv.shape[2]}")
    tensors = {"v.patch_embd.weight": _numpy(conv[:, :, 0]), "v.patch_embd.weight.1": _numpy(conv[:, :, 1]),
               "v.patch_embd.bias": _numpy(visual.patch_embed.proj.bias),
               "v.position_embd.weight": _numpy(visual.pos_embed.weight)}  # (side^2, D)
    n_layers = len(visual.blocks)
    for i, block in enumerate(visual.blocks):
        for short, attr in BLOCK_TENSORS.items():
            module = block.get_submodule(attr)
            tensors[f"v.blk.{i}.{short}.weight"] = _numpy(module.weight)
            tensors[f"v.blk.{i}.{short}.bias"] = _numpy(module.bias)
    merger = visual.merger
    tensors |= {"v.post_ln.weight": _numpy(merger.norm.weight), "v.post_ln.bias": _numpy(merger.norm.bias),
                "mm.0.weight": _numpy(merger.linear_fc1.weight), "mm.0.bias": _numpy(merger.linear_fc1.bias),
                "mm.2.weight": _numpy(merger.linear_fc2.weight), "mm.2.bias": _numpy(merger.linear_fc2.bias)}
    deepstack = [int(i) for i in visual.deepstack_visual_indexes]
    for block, ds in zip(deepstack, visual.deepstack_merger_list):
        for short, module in (("norm", ds.norm), ("fc1", ds.linear_fc1), ("fc2", ds.linear_fc2)):
            tensors[f"v.deepstack.{block}.{short}.weight"] = _numpy(module.weight)
            tensors[f"v.deepstack.{block}.{short}.bias"] = _numpy(module.bias)
    spec, patch = ckpt.preprocess, int(vision_config.patch_size)
    side = int(round(int(vision_config.num_position_embeddings) ** 0.5))
    u32 = {"projection_dim": int(vision_config.out_hidden_size), "image_size": side * patch, "patch_size": patch,
           "embedding_length": int(vision_config.hidden_size),
           "feed_forward_length": int(vision_config.intermediate_size), "block_count": n_layers,
           "head_count": int(vision_config.num_heads), "spatial_merge_size": int(vision_config.spatial_merge_size),
           "min_pixels": int(spec.min_pixels), "max_pixels": int(spec.max_pixels)}
    return {"projector_type": "qwen3vl_merger", "u32": u32, "f32": {"layer_norm_epsilon": 1e-6},
            "mean_std": (list(spec.image_mean), list(spec.image_std)), "feature_layers": None, "tensors": tensors,
            "notes": notes,
            "bool_arrays": {"clip.vision.is_deepstack_layers": [i in deepstack for i in range(n_layers)]}}
