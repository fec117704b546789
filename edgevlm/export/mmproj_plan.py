"""What an mmproj GGUF will hold (`MmprojPlan`) and the helpers every family's planner shares: tensors as float32
arrays in torch order from the loaded modules, the tower activation as clip.cpp's flag, the u32 keys every
projector type carries. Each family's planner (export/mmproj.py's idefics3 and llava, mmproj_qwen2vl.py,
mmproj_internvl.py) builds one plan; export/mmproj.py writes it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import BadInputError

# per ViT layer: GGUF suffix -> attribute path in a transformers CLIP/SigLIP/Idefics3 encoder layer
LAYER_TENSORS = {
    "ln1": "layer_norm1", "ln2": "layer_norm2",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2",
}
# tower activation (transformers name) -> the clip.cpp flag that selects its FFN op (neither flag = quick GELU)
TOWER_ACTIVATIONS = {"gelu_pytorch_tanh": "use_gelu", "gelu_new": "use_gelu", "gelu": "use_gelu",
                     "quick_gelu": None, "silu": "use_silu"}
ERF_GELU_NOTE = "runs as tanh GELU in clip.cpp (<= 4.7e-4 per activation)"


@dataclass
class MmprojPlan:
    """Everything the file will hold, decided before a byte is written."""

    projector_type: str  # clip.cpp's projector type ("idefics3", "mlp", "qwen2vl_merger", ...)
    u32: dict[str, int]  # the keys every type has, plus optional ones export/mmproj.py's OPTIONAL_U32 names
    f32: dict[str, float]
    flags: dict[str, bool]
    mean_std: tuple[list[float], list[float]]
    feature_layers: list[int] | None
    tensors: dict[str, np.ndarray]  # GGUF name -> float32 array in torch order (the writer reverses to ggml's ne)
    notes: list[str] = field(default_factory=list)
    bool_arrays: dict[str, list[bool]] = field(default_factory=dict)  # e.g. clip.vision.is_deepstack_layers
    # image-token bounds mtmd cannot read from this projector type's file (llama-server --image-min-tokens /
    # --image-max-tokens): the checkpoint's processor limits, to pass wherever mtmd runs
    image_tokens: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.image_tokens is not None and not 0 < self.image_tokens[0] <= self.image_tokens[1]:
            raise ValueError(f"image token bounds {self.image_tokens} must be 0 < min <= max")


def numpy_of(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").float().numpy()


def vit_tensors(embeddings, layers, n_layers: int) -> dict[str, np.ndarray]:
    """A CLIP/SigLIP-style tower (learned positions, q/k/v/out projections, fc1/fc2 MLP) up to n_layers."""
    tensors = {"v.patch_embd.weight": numpy_of(embeddings.patch_embedding.weight),  # (D, 3, p, p)
               "v.position_embd.weight": numpy_of(embeddings.position_embedding.weight)}  # (P [+1], D)
    if embeddings.patch_embedding.bias is not None:
        tensors["v.patch_embd.bias"] = numpy_of(embeddings.patch_embedding.bias)
    for i in range(n_layers):
        for short, attr in LAYER_TENSORS.items():
            module = layers[i].get_submodule(attr)
            tensors[f"v.blk.{i}.{short}.weight"] = numpy_of(module.weight)
            tensors[f"v.blk.{i}.{short}.bias"] = numpy_of(module.bias)
    return tensors


def activation_flags(hidden_act: str, where: str) -> tuple[dict[str, bool], list[str]]:
    if hidden_act not in TOWER_ACTIVATIONS:
        raise BadInputError(f"the {where} activation {hidden_act!r} has no counterpart in llama.cpp's clip.cpp "
                            f"(it has tanh GELU, quick GELU and SiLU); this checkpoint cannot be written as an mmproj")
    flag = TOWER_ACTIVATIONS[hidden_act]
    notes = [f"the tower's erf GELU {ERF_GELU_NOTE}"] if hidden_act == "gelu" else []
    return ({flag: True} if flag else {}), notes


def common_u32(image_size: int, patch_size: int, width: int, mlp: int, n_layers: int, heads: int,
               text_hidden: int) -> dict[str, int]:
    return {"projection_dim": int(text_hidden), "image_size": int(image_size), "patch_size": int(patch_size),
            "embedding_length": int(width), "feed_forward_length": int(mlp), "block_count": int(n_layers),
            "head_count": int(heads)}

