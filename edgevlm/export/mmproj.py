"""Vision half -> llama.cpp's mmproj GGUF (general.architecture "clip"): the file libmtmd (llama-mtmd-cli,
llama-server --mmproj, Ollama, LM Studio) loads beside the decoder GGUF.

Written with gguf-py's GGUFWriter and key constants, tensor by tensor from the family's vision module (not from
on-disk names, which transformers 5 renamed). clip.cpp asserts every key's type (u32 / f32 / bool / f32[3] / i32[])
and looks tensors up by exact name; the one name table is TENSORS below. What mtmd at the pinned llama.cpp cannot
compute like the checkpoint is refused with the reason: the family's FamilySpec (families/*.describe, torch-free)
names the projector type or why there is none; what only the loaded tokenizer and tower show is checked here. Research and upstream references:
../shared/notes/mmproj-feasibility.md."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BadInputError
from ..families.spec import PINNED_LLAMA_CPP, FamilySpec
from ..manifest import Artifact
from .bundle import BundleWriter
from .mmproj_internvl import plan_internvl
from .mmproj_plan import MmprojPlan, activation_flags, common_u32, numpy_of, vit_tensors
from .mmproj_qwen2vl import plan_qwen2vl

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
Q8_0_BLOCK = 32  # ggml's Q8_0 block: rows must be a multiple of it
# The separators mtmd inserts around idefics3 tiles, looked up as single tokens by their exact text (lookup_token in
# mtmd.cpp); a missing one becomes token -1 in the prompt and llama_decode fails.
IDEFICS3_PIECES = ("\n", "\n\n", "<fake_token_around_image>", "<global-img>")
# the u32 keys a plan may carry beyond the common ones -> gguf-py's GGUFWriter method that writes each
OPTIONAL_U32 = {"scale_factor": "add_vision_projector_scale_factor", "preproc_image_size": "add_vision_preproc_image_size",
                "n_wa_pattern": "add_vision_n_wa_pattern", "spatial_merge_size": "add_vision_spatial_merge_size",
                "preproc_min_tiles": "add_vision_preproc_min_tiles", "preproc_max_tiles": "add_vision_preproc_max_tiles",
                "min_pixels": "add_vision_min_pixels", "max_pixels": "add_vision_max_pixels"}

def _tower_u32(vision_config, text_hidden: int, n_layers: int) -> dict[str, int]:
    vc = vision_config
    return common_u32(vc.image_size, vc.patch_size, vc.hidden_size, vc.intermediate_size, n_layers,
                      vc.num_attention_heads, text_hidden)


def single_token_pieces(tokenizer, pieces: tuple[str, ...]) -> list[str]:
    """The pieces that are not one token of the vocabulary (mtmd finds them by their exact decoded text)."""
    missing = []
    for piece in pieces:
        ids = tokenizer.encode(piece, add_special_tokens=False)
        if not (len(ids) == 1 and tokenizer.decode(ids) == piece):
            missing.append(piece)
    return missing


def plan_idefics3(ckpt) -> MmprojPlan:
    hf = ckpt.hf_model
    config, vision_config = hf.config, hf.config.vision_config
    vision_model = hf.model.vision_model
    missing = single_token_pieces(ckpt.tokenizer, IDEFICS3_PIECES)
    if missing:
        raise BadInputError(f"llama.cpp's mtmd inserts {', '.join(map(repr, missing))} around each tile as single "
                            "tokens, but this tokenizer has no such token; an mmproj of this checkpoint could not run in "
                            "llama.cpp (export --encoder onnx:... instead)")
    flags, notes = activation_flags(vision_config.hidden_act, "vision tower")
    scale = int(config.scale_factor)  # 2 or 4: describe() refuses the rest
    n_layers = int(vision_config.num_hidden_layers)
    tensors = vit_tensors(vision_model.embeddings, vision_model.encoder.layers, n_layers)
    tensors["v.post_ln.weight"] = numpy_of(vision_model.post_layernorm.weight)
    tensors["v.post_ln.bias"] = numpy_of(vision_model.post_layernorm.bias)
    tensors["mm.model.fc.weight"] = numpy_of(hf.model.connector.modality_projection.proj.weight)  # (T, D * s^2)
    spec = ckpt.preprocess
    u32 = _tower_u32(vision_config, config.text_config.hidden_size, n_layers)
    u32 |= {"scale_factor": scale, "preproc_image_size": int(spec.longest_edge)}
    if not spec.image_splitting:
        notes.append("the checkpoint does not split images but mtmd always does (a grid of at least 1x1 plus the "
                     "overview): mtmd gives images twice the tokens edgevlm does")
    notes.append("mtmd always adds the overview tile, also for images no larger than one tile, where HF gives one tile")
    return MmprojPlan("idefics3", u32, {"layer_norm_epsilon": float(vision_config.layer_norm_eps)}, flags,
                      (list(spec.image_mean), list(spec.image_std)), None, tensors, notes)


def plan_llava(ckpt) -> MmprojPlan:
    hf = ckpt.hf_model
    config, vision_config = hf.config, hf.config.vision_config
    # a CLIP tower, a dropped first patch and a projector activation mtmd lacks: refused by llava.describe()
    projector_act = getattr(config, "projector_hidden_act", "gelu")
    flags, notes = activation_flags(vision_config.hidden_act, "vision tower")
    if projector_act == "gelu":
        notes.append("the projector's erf GELU runs as tanh GELU in mtmd (<= 4.7e-4 per activation)")
    n_total = int(vision_config.num_hidden_layers)
    requested = config.vision_feature_layer
    requested = [requested] if isinstance(requested, int) else list(requested)
    # HF indexes hidden_states (0 = embeddings, n = last layer); clip.cpp takes the same non-negative index
    feature_layers = [layer if layer >= 0 else n_total + 1 + layer for layer in requested]
    if feature_layers != sorted(feature_layers) or not all(0 < f <= n_total for f in feature_layers):
        raise BadInputError(f"vision_feature_layer {requested} must be ascending layers of the tower for mtmd "
                            "(it concatenates feature layers in ascending order)")
    n_layers = max(feature_layers)  # layers after the deepest feature layer are never run
    tower = hf.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    tensors = vit_tensors(tower.embeddings, tower.encoder.layers, n_layers)
    projector = hf.model.multi_modal_projector
    for gguf_index, linear in ((0, projector.linear_1), (2, projector.linear_2)):  # mtmd reads mm.0 and mm.2, never mm.1
        tensors[f"mm.{gguf_index}.weight"] = numpy_of(linear.weight)
        bias = linear.bias if linear.bias is not None else np.zeros(linear.weight.shape[0], np.float32)
        tensors[f"mm.{gguf_index}.bias"] = bias if isinstance(bias, np.ndarray) else numpy_of(bias)
    spec = ckpt.preprocess
    if spec.tile_size[0] != spec.tile_size[1]:
        raise BadInputError(f"mtmd's llava graph takes square images only; this checkpoint's tile is {spec.tile_size}")
    notes.append("mtmd pads non-square images to a square (LLaVA-1.5's expand2square); edgevlm resizes them like the "
                 "checkpoint's processor, so only square images see the same pixels")
    return MmprojPlan("mlp", _tower_u32(vision_config, config.text_config.hidden_size, n_layers),
                      {"layer_norm_epsilon": float(vision_config.layer_norm_eps)}, flags,
                      (list(spec.image_mean), list(spec.image_std)), feature_layers, tensors, notes)


def plan_gemma3(ckpt) -> MmprojPlan:
    from .mmproj_gemma3 import gemma3_parts  # Gemma 3's own tensors (a leaf module)

    config, vision_config = ckpt.hf_model.config, ckpt.hf_model.config.vision_config
    tower, projector, extra_u32, notes = gemma3_parts(ckpt)
    flags, more = activation_flags(vision_config.hidden_act, "vision tower")
    n_layers = int(vision_config.num_hidden_layers)
    tensors = vit_tensors(tower.embeddings, tower.encoder.layers, n_layers) | projector
    spec = ckpt.preprocess
    return MmprojPlan("gemma3", _tower_u32(vision_config, config.text_config.hidden_size, n_layers) | extra_u32,
                      {"layer_norm_epsilon": float(vision_config.layer_norm_eps)}, flags,
                      (list(spec.image_mean), list(spec.image_std)), None, tensors, more + notes)


def _plan_qwen3vl(ckpt) -> MmprojPlan:
    from .mmproj_qwen3vl import plan_fields  # Qwen3-VL's tensor table, in its own module

    flags, notes = activation_flags(ckpt.hf_model.config.vision_config.hidden_act, "vision tower")
    fields = plan_fields(ckpt)
    return MmprojPlan(**{**fields, "flags": flags, "notes": notes + fields["notes"]})


# clip.cpp projector type -> the planner of its file (one line per type; the families' describe() name the type)
PLANNERS = {
    "idefics3": plan_idefics3,
    "mlp": plan_llava,
    "qwen2vl_merger": plan_qwen2vl,
    "qwen2.5vl_merger": plan_qwen2vl,
    "internvl": plan_internvl,
    "qwen3vl_merger": _plan_qwen3vl,
    "gemma3": plan_gemma3,
}


def plan_mmproj(ckpt) -> MmprojPlan:
    check_spec(ckpt.spec)
    return PLANNERS[ckpt.spec.mmproj_projector](ckpt)


def check_spec(spec: FamilySpec) -> None:
    """What the family's description refuses (no writer for the family, or a checkpoint mtmd cannot compute like
    transformers) is refused before the checkpoint loads."""
    if spec.mmproj_refusal:
        raise BadInputError(spec.mmproj_refusal)
    if spec.mmproj_projector not in PLANNERS:
        raise BadInputError(f"no mmproj writer for projector type {spec.mmproj_projector!r} ({', '.join(PLANNERS)})")


def stored(name: str, array: np.ndarray, precision: str) -> tuple[np.ndarray, object | None, str]:
    """(data, raw ggml type or None, ggml type name) for one tensor: only 2-D matrices of the blocks are stored
    below F32 (clip.cpp's convention: norms, biases, embeddings and the patch conv stay F32)."""
    import gguf

    matrix = array.ndim == 2 and name.startswith(("v.blk.", "mm.")) and name.endswith(".weight")
    if precision == "f32" or not matrix:
        return np.ascontiguousarray(array, np.float32), None, "F32"
    if precision == "q8_0" and array.shape[1] % Q8_0_BLOCK == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(np.ascontiguousarray(array, np.float32), q8), q8, "Q8_0"
    return np.ascontiguousarray(array, np.float16), None, "F16"


def write_mmproj(plan: MmprojPlan, path: Path, precision: str, name: str = "edgevlm mmproj") -> dict[str, int]:
    """Write the GGUF; returns how many tensors went in at each ggml type."""
    import gguf

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])  # "clip"
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[precision])
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(plan.projector_type)
    u32 = plan.u32
    writer.add_vision_projection_dim(u32["projection_dim"])
    writer.add_vision_image_size(u32["image_size"])
    writer.add_vision_patch_size(u32["patch_size"])
    writer.add_vision_embedding_length(u32["embedding_length"])
    writer.add_vision_feed_forward_length(u32["feed_forward_length"])
    writer.add_vision_block_count(u32["block_count"])
    writer.add_vision_head_count(u32["head_count"])
    writer.add_vision_attention_layernorm_eps(plan.f32["layer_norm_epsilon"])
    writer.add_vision_image_mean([float(v) for v in plan.mean_std[0]])  # FLOAT32[3], as clip.cpp asserts
    writer.add_vision_image_std([float(v) for v in plan.mean_std[1]])
    if plan.flags.get("use_gelu"):
        writer.add_vision_use_gelu(True)
    if plan.flags.get("use_silu"):
        writer.add_vision_use_silu(True)
    for key, method in OPTIONAL_U32.items():
        if key in u32:
            getattr(writer, method)(int(u32[key]))
    for key, values in plan.bool_arrays.items():  # e.g. clip.vision.is_deepstack_layers
        writer.add_array(key, [bool(v) for v in values])
    if plan.feature_layers is not None:
        # INT32[] (python ints); gguf 0.19 has no helper. Explicit layers also avoid upstream issue 25817 (one layer
        # lost when the key is absent).
        writer.add_array("clip.vision.feature_layer", [int(v) for v in plan.feature_layers])
    counts: dict[str, int] = {}
    for tensor_name, array in plan.tensors.items():
        data, raw_dtype, type_name = stored(tensor_name, array, precision)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        counts[type_name] = counts.get(type_name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def check_encoder(ckpt, precision: str) -> None:
    """Refuse before any artifact is written (the export would otherwise fail after the slow ones)."""
    plan_mmproj(ckpt)


def export_encoder(ckpt, manifest, writer: BundleWriter, precision: str, log=print, **_) -> Artifact:
    plan = plan_mmproj(ckpt)
    folder = writer.root / "encoder"
    folder.mkdir(exist_ok=True)
    path = folder / f"mmproj-{precision}.gguf"
    log(f"  writing the llama.cpp mmproj ({plan.projector_type}, {len(plan.tensors)} tensors, {precision})")
    counts = write_mmproj(plan, path, precision, name=f"{manifest.family} vision ({Path(str(ckpt.path)).name})")
    return writer.artifact(f"mmproj:{precision}", "encoder", "gguf-mmproj", precision, f"encoder/{path.name}",
                           consumer="llama.cpp mtmd (llama-mtmd-cli, llama-server --mmproj)",
                           projector_type=plan.projector_type, tensor_types=counts, tested_with=PINNED_LLAMA_CPP,
                           notes=plan.notes, **_image_token_details(plan))


def _image_token_details(plan: MmprojPlan) -> dict:
    """The checkpoint's image-token bounds for mtmd (llama-server --image-min-tokens / --image-max-tokens), when
    this projector type's file cannot carry them."""
    if plan.image_tokens is None:
        return {}
    return {"image_min_tokens": plan.image_tokens[0], "image_max_tokens": plan.image_tokens[1]}
