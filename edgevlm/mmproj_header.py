"""An mmproj GGUF checked before libmtmd loads it: clip.cpp reads its keys with getters that assert their type, and
builds its graph on tensors it never checked were loaded or shaped right, so a damaged file aborts the process
(found by tests/test_gguf_fuzz.py) instead of returning an error. Checked for the projector types edgevlm writes
(export/mmproj.py): every key clip.cpp reads has its type, every tensor the graph uses is present, block by block,
with the shape the hyperparameters give."""
from __future__ import annotations

from .errors import BundleError
from .gguf_header import ARRAY, STRING, U32, GGUFHeader, check_before_loading

BOOL, I32, F32 = 7, 5, 6
KEY_TYPES = {  # (value type, array element type) as clip.cpp reads them (and export/mmproj.py writes them)
    "general.architecture": (STRING, None), "general.name": (STRING, None), "general.type": (STRING, None),
    "general.file_type": (U32, None), "clip.has_vision_encoder": (BOOL, None), "clip.projector_type": (STRING, None),
    "clip.use_gelu": (BOOL, None), "clip.use_silu": (BOOL, None),
    "clip.vision.attention.layer_norm_epsilon": (F32, None), "clip.vision.image_mean": (ARRAY, F32),
    "clip.vision.image_std": (ARRAY, F32), "clip.vision.feature_layer": (ARRAY, I32),
    **{f"clip.vision.{name}": (U32, None) for name in (
        "projection_dim", "image_size", "patch_size", "embedding_length", "feed_forward_length", "block_count",
        "attention.head_count", "projector.scale_factor", "preproc_image_size")},
}
# every projector type edgevlm writes (export/mmproj.py PLANNERS); the first two have their whole layout checked, the
# others (their own block and merger tensors) the attention matrices every block holds
FULLY_CHECKED = ("mlp", "idefics3")
WRITTEN_TYPES = FULLY_CHECKED + ("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger", "internvl", "gemma3")
REQUIRED_KEYS = ("clip.projector_type", "clip.vision.embedding_length", "clip.vision.feed_forward_length",
                 "clip.vision.block_count", "clip.vision.projection_dim", "clip.vision.patch_size")


def _block_shapes(d: int, f: int) -> dict[str, tuple[int, ...]]:
    """PyTorch order (out, in), as GGUFTensorInfo.shape gives it."""
    shapes = {f"{n}.{p}": (d,) for n in ("ln1", "ln2") for p in ("weight", "bias")}
    shapes |= {f"{n}.weight": (d, d) for n in ("attn_q", "attn_k", "attn_v", "attn_out")}
    shapes |= {f"{n}.bias": (d,) for n in ("attn_q", "attn_k", "attn_v", "attn_out")}
    return shapes | {"ffn_up.weight": (f, d), "ffn_up.bias": (f,), "ffn_down.weight": (d, f), "ffn_down.bias": (d,)}


def _projector_shapes(kind: str, shapes: dict, d: int, out: int) -> dict[str, tuple[int, ...]]:
    if kind == "mlp":  # llava: mm.0 (hidden, d), GELU, mm.2 (out, hidden)
        hidden = shapes.get("mm.0.weight", (0,))[0]
        return {"mm.0.weight": (hidden, d), "mm.0.bias": (hidden,), "mm.2.weight": (out, hidden), "mm.2.bias": (out,)}
    fc = shapes.get("mm.model.fc.weight", (0, 0))  # idefics3: pixel shuffle (d * s^2), then one matrix
    return {"mm.model.fc.weight": (out, fc[1] if fc[1] and fc[1] % d == 0 else d)}


def check_mmproj(path) -> GGUFHeader:
    """The mmproj's header, refused in one line where libmtmd would abort on it."""
    header = check_before_loading(path)
    where, meta = header.path, header.metadata
    for key, wanted in KEY_TYPES.items():
        if key in header.types and header.types[key] != wanted:
            raise BundleError(f"{where}: key {key} has value type {header.types[key]}, not {wanted} as llama.cpp's "
                              "clip loader reads it; the file is damaged, re-export it")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise BundleError(f"{where}: the mmproj lacks {', '.join(missing)}; the file is damaged, re-export it")
    kind = meta["clip.projector_type"]
    if kind not in WRITTEN_TYPES:
        raise BundleError(f"{where}: projector type {kind!r} is not one edgevlm writes ({', '.join(WRITTEN_TYPES)}); "
                          "re-export it")
    d, f, n_blocks = (meta[f"clip.vision.{k}"] for k in ("embedding_length", "feed_forward_length", "block_count"))
    patch, out = meta["clip.vision.patch_size"], meta["clip.vision.projection_dim"]
    shapes = {t.name: t.shape for t in header.tensors}
    if not 0 < n_blocks <= len(shapes) // len(_block_shapes(d, f)):  # before building a table of n_blocks rows
        raise BundleError(f"{where}: clip.vision.block_count is {n_blocks:,} but the file holds {len(shapes)} tensors; "
                          "the file is damaged, re-export it")
    blocks = _block_shapes(d, f)
    if kind in FULLY_CHECKED:
        wanted = {f"v.blk.{i}.{name}": shape for i in range(n_blocks) for name, shape in blocks.items()}
        wanted |= {"v.patch_embd.weight": (d, 3, patch, patch)} | _projector_shapes(kind, shapes, d, out)
    else:  # the attention every block's graph multiplies by: q, k, v apart or fused (Qwen3-VL), and the output
        fused = "v.blk.0.attn_qkv.weight" in shapes
        per_block = {"attn_qkv": (3 * d, d)} if fused else {n: (d, d) for n in ("attn_q", "attn_k", "attn_v")}
        wanted = {f"v.blk.{i}.{name}.weight": shape for i in range(n_blocks)
                  for name, shape in (per_block | {"attn_out": (d, d)}).items()}
    for name, shape in wanted.items():
        if name not in shapes:
            raise BundleError(f"{where}: tensor {name} is missing (projector {kind}, {n_blocks} blocks); the file is "
                              "damaged, re-export it")
        if shapes[name] != shape:
            raise BundleError(f"{where}: tensor {name} has shape {shapes[name]}, not {shape}; the file is damaged, "
                              "re-export it")
    return header
