"""Damage done to an exported bundle on purpose, the way real converter bugs damage files, with the manifest's hashes
brought in line so that only verify's numbers can catch it (tests/test_verify*.py and the gate calibration).

- ONNX encoders: two attention layers' weights swapped; the projector's last weight off by a factor.
- mmproj (GGUF): the same two damages in llama.cpp's vision tensors.
- GGUF decoders: two layers' tensors swapped (Q/K written unpermuted is done at export: monkeypatch permute_rope).
- MLX decoders: two layers' q_proj swapped."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgevlm.manifest import Manifest, sha256_file


def rehash(bundle: Path, relative: str) -> None:
    """Make the manifest agree with a file changed on purpose."""
    manifest = Manifest.load(bundle)
    for artifact in manifest.artifacts:
        for entry in artifact.files:
            if entry.path == relative:
                entry.sha256, entry.bytes = sha256_file(bundle / relative), (bundle / relative).stat().st_size
    (bundle / "manifest.json").write_text(manifest.to_json())


# ---- ONNX -----------------------------------------------------------------------------------------------------------
WEIGHTS_PER_LAYER = 6  # q, k, v, out, fc1, fc2: the tower's weight MatMuls per layer, in graph order


def _weight_names(graph_path: Path) -> list[str]:
    """The base names of the weight initializers of the fp32/int8 graph's MatMuls, in graph order (the dynamo exporter
    names them val_N; the int8 graph adds _quantized/_scale/_zero_point to the same N)."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    names = {i.name for i in model.graph.initializer}
    bases = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "MatMulInteger") and len(node.input) > 1:
            weight = node.input[1]
            base = weight.removesuffix("_quantized") if node.op_type == "MatMulInteger" else weight
            if weight in names:
                bases.append(base)
    return bases


def _edit_initializers(path: Path, edit) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    changed = edit(arrays)
    for init in model.graph.initializer:
        if init.name in changed:
            init.CopyFrom(numpy_helper.from_array(changed[init.name].astype(arrays[init.name].dtype), init.name))
    onnx.save(model, str(path))


def _graph_files(bundle: Path, name: str) -> list[str]:
    """Every graph file of an ONNX artifact (the portable graph and the CPU-optimized copy the runtime loads)."""
    return [f.path for f in Manifest.load(bundle).find("encoder", name).files if f.path.endswith(".onnx")]


def _suffixes(arrays: dict, base: str) -> list[str]:
    return [s for s in ("", "_quantized", "_scale", "_zero_point") if base + s in arrays]


def swap_onnx_attention_layers(bundle: Path, name: str, a: int = 0, b: int = 1,
                               weights: tuple[int, ...] = (0, 1, 2, 3)) -> None:
    """Layers a and b's attention weights (`weights` of q, k, v, out: 0..3) swapped in every graph file of the
    artifact."""
    files = _graph_files(bundle, name)
    bases = _weight_names(bundle / files[0])
    pairs = [(bases[WEIGHTS_PER_LAYER * a + j], bases[WEIGHTS_PER_LAYER * b + j]) for j in weights]

    def edit(arrays):
        changed = {}
        for x, y in pairs:
            for suffix in _suffixes(arrays, x):
                changed[x + suffix], changed[y + suffix] = arrays[y + suffix], arrays[x + suffix]
        return changed

    for relative in files:
        _edit_initializers(bundle / relative, edit)
        rehash(bundle, relative)


def scale_onnx_projector(bundle: Path, name: str, factor: float = 1.02) -> None:
    """The projector's last weight (linear_2 of LLaVA's) times `factor` (for int8: its scale)."""
    files = _graph_files(bundle, name)
    last = _weight_names(bundle / files[0])[-1]

    def edit(arrays):
        key = last + "_scale" if last + "_scale" in arrays else last
        return {key: arrays[key] * np.float32(factor)}

    for relative in files:
        _edit_initializers(bundle / relative, edit)
        rehash(bundle, relative)


# ---- GGUF (decoder and mmproj) --------------------------------------------------------------------------------------
def swap_gguf_tensors(path: Path, a: str, b: str) -> None:
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    tensors = {t.name: t for t in reader.tensors}
    first, second = tensors[a].data, tensors[b].data
    held = np.array(first, copy=True)
    first[...] = second
    second[...] = held
    reader.data.flush()


def scale_gguf_tensor(path: Path, name: str, factor: float) -> None:
    """One tensor times `factor`, in place: F32/F16 directly, Q8_0 through each block's fp16 scale."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    data = tensor.data
    if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        data[...] = (data.astype(np.float32) * factor).astype(data.dtype)
    elif tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:  # blocks of (fp16 d, 32 x int8)
        blocks = data.reshape(-1, 34)
        d = blocks[:, :2].copy().view(np.float16)
        blocks[:, :2] = (d.astype(np.float32) * factor).astype(np.float16).view(np.uint8)
    else:
        raise ValueError(f"no scaling for {tensor.tensor_type.name}")
    reader.data.flush()


def swap_gguf_layers(bundle: Path, name: str, tensors: tuple[str, ...], a: int = 0, b: int = 1,
                     prefix: str = "blk") -> None:
    """Layers a and b's named tensors swapped inside the GGUF of artifact `name` (decoder or mmproj)."""
    manifest = Manifest.load(bundle)
    artifact = next(x for x in manifest.artifacts if x.name == name)
    for tensor in tensors:
        swap_gguf_tensors(bundle / artifact.path, f"{prefix}.{a}.{tensor}", f"{prefix}.{b}.{tensor}")
    rehash(bundle, artifact.path)


def scale_gguf_artifact(bundle: Path, name: str, tensor: str, factor: float = 1.02) -> None:
    manifest = Manifest.load(bundle)
    artifact = next(x for x in manifest.artifacts if x.name == name)
    scale_gguf_tensor(bundle / artifact.path, tensor, factor)
    rehash(bundle, artifact.path)


# ---- MLX ------------------------------------------------------------------------------------------------------------
def swap_mlx_layers(bundle: Path, name: str, module: str = "self_attn.q_proj", a: int = 0, b: int = 1) -> None:
    """Layers a and b's `module` (weight, and for quantized files its scales and biases) swapped."""
    import mlx.core as mx

    artifact = Manifest.load(bundle).find("decoder", name)
    for entry in artifact.files:
        if not entry.path.endswith(".safetensors"):
            continue
        arrays, metadata = mx.load(str(bundle / entry.path), return_metadata=True)
        prefix = next(k.split("layers.")[0] for k in arrays if "layers." in k)
        for part in ("weight", "scales", "biases"):
            x, y = f"{prefix}layers.{a}.{module}.{part}", f"{prefix}layers.{b}.{module}.{part}"
            if x in arrays:
                arrays[x], arrays[y] = arrays[y], arrays[x]
        mx.save_safetensors(str(bundle / entry.path), arrays, metadata=metadata)
        rehash(bundle, entry.path)
