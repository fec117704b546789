"""Gemma 3's vision half as llama.cpp's mmproj (projector type "gemma3"), as llama.cpp's own converter writes it
(Gemma3VisionModel): the SigLIP tower (no pooling head), its post-LayerNorm, `mm.soft_emb_norm` with the (1 + w) of
Gemma's RMSNorm folded in, and `mm.input_projection` in transformers' (vision, text) orientation (clip.cpp transposes
it). clip.cpp average-pools patches by `projector.scale_factor` per side (4 unless written)."""
from __future__ import annotations

from ..errors import BadInputError
from .mmproj import MmprojPlan, _activation_flags, _common_u32, _numpy, _vit_tensors


def plan_gemma3(ckpt) -> MmprojPlan:
    hf = ckpt.hf_model
    config, vision_config = hf.config, hf.config.vision_config
    tower = hf.model.vision_tower
    tower = getattr(tower, "vision_model", tower)  # SiglipVisionModel wraps a SiglipVisionTransformer
    projector = hf.model.multi_modal_projector
    flags, notes = _activation_flags(vision_config.hidden_act, "vision tower")
    n_layers = int(vision_config.num_hidden_layers)
    tensors = _vit_tensors(tower.embeddings, tower.encoder.layers, n_layers)
    tensors["v.post_ln.weight"] = _numpy(tower.post_layernorm.weight)
    tensors["v.post_ln.bias"] = _numpy(tower.post_layernorm.bias)
    tensors["mm.soft_emb_norm.weight"] = _numpy(projector.mm_soft_emb_norm.weight) + 1.0
    tensors["mm.input_projection.weight"] = _numpy(projector.mm_input_projection_weight)  # (Dv, D)
    if projector.mm_soft_emb_norm.eps != vision_config.layer_norm_eps:
        raise BadInputError("clip.cpp normalises the soft embeddings with the tower's layer-norm epsilon; this "
                            f"checkpoint's is {projector.mm_soft_emb_norm.eps}, not {vision_config.layer_norm_eps}")
    spec = ckpt.preprocess
    u32 = _common_u32(vision_config, config.text_config.hidden_size, n_layers) | {"scale_factor": int(projector.kernel_size)}
    if spec.image_splitting:
        notes.append("mtmd does not pan-and-scan: it encodes the whole image only, where this checkpoint's "
                     "preprocessing adds crops of wide or tall images")
    return MmprojPlan("gemma3", u32, {"layer_norm_epsilon": float(vision_config.layer_norm_eps)}, flags,
                      (list(spec.image_mean), list(spec.image_std)), None, tensors, notes)
