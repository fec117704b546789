"""Gemma 3's part of its llama.cpp mmproj (projector type "gemma3"), as llama.cpp's own converter writes it
(Gemma3VisionModel): beside the SigLIP tower's blocks (mmproj.py writes those, as for every SigLIP family), the
tower's post-LayerNorm, `mm.soft_emb_norm` with the (1 + w) of Gemma's RMSNorm folded in, and `mm.input_projection`
in transformers' (vision, text) orientation (clip.cpp transposes it). clip.cpp average-pools the patches by
`projector.scale_factor` per side (4 unless written). A leaf: mmproj.py imports it, never the reverse."""
from __future__ import annotations

import numpy as np

from ..errors import BadInputError


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").float().numpy()


def gemma3_parts(ckpt) -> tuple[object, dict[str, np.ndarray], dict[str, int], list[str]]:
    """(the SigLIP vision transformer, the projector's tensors, extra u32 keys, notes)."""
    hf = ckpt.hf_model
    tower = hf.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # SiglipVisionModel wraps a SiglipVisionTransformer
    projector = hf.model.multi_modal_projector
    eps = hf.config.vision_config.layer_norm_eps
    if projector.mm_soft_emb_norm.eps != eps:
        raise BadInputError("clip.cpp normalises the soft embeddings with the tower's layer-norm epsilon; this "
                            f"checkpoint's is {projector.mm_soft_emb_norm.eps}, not {eps}")
    tensors = {"v.post_ln.weight": _numpy(tower.post_layernorm.weight),
               "v.post_ln.bias": _numpy(tower.post_layernorm.bias),
               "mm.soft_emb_norm.weight": _numpy(projector.mm_soft_emb_norm.weight) + 1.0,
               "mm.input_projection.weight": _numpy(projector.mm_input_projection_weight)}  # (Dv, D)
    notes = []
    if ckpt.preprocess.image_splitting:
        notes.append("mtmd does not pan-and-scan: it encodes the whole image only, where this checkpoint's "
                     "preprocessing adds crops of wide or tall images")
    return tower, tensors, {"scale_factor": int(projector.kernel_size)}, notes
