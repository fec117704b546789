"""The encoder graph ONNX Runtime's CPU provider runs: attention fused into com.microsoft MultiHeadAttention (where
the export found it as accurate) and ORT's offline graph optimizations, saved once. The bundle ships one portable
graph per precision (what TensorRT, CoreML and CUDA open too); this CPU-only copy is built on the machine that runs
it, on first load, and cached by the graph's sha256 and the ONNX Runtime version (as TensorRT engines are built on
the device). Torch-free: the exporter (to decide the fusion and measure the graph) and the runtime both use it."""
from __future__ import annotations

import os
from pathlib import Path

ATTENTION_FUSION_TOLERANCE = 1e-4  # cosine the fused CPU graph may lose against the unfused one (fp32 attention both)
EXTERNAL_INITIALIZERS_MIN_BYTES = 1024  # the optimized copy keeps large weights in a .data file: protobuf's 2 GiB cap


def _scalar(initializers: dict, name: str) -> float | None:
    from onnx import numpy_helper

    if name not in initializers or initializers[name].data_location == 1:  # external data: not a small constant
        return None
    value = numpy_helper.to_array(initializers[name])
    return float(value) if value.size == 1 else None


def fuse_attention(model) -> int:
    """torch.onnx (dynamo) writes unmasked scaled-dot-product attention as Reshape/Transpose of q, k, v, a chain of
    shape ops that transposes k, Mul by sqrt(scale) on q and k, MatMul, Softmax, MatMul, Transpose, Reshape; ONNX
    Runtime's own fusions (and onnxruntime.transformers' ViT/CLIP ones) do not recognise it. Each match becomes one
    com.microsoft MultiHeadAttention over the (batch, tokens, hidden) projections: on the CPU provider it runs MLAS's
    flash-attention kernel, without the (heads, tokens, tokens) score and probability tensors (2 x 48 MiB per layer
    for a 1,024-token SigLIP tile) or the transposes. In place; returns how many it fused (0: nothing matched)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    initializers = {i.name: i for i in graph.initializer}

    def follow(name: str, ops: tuple[str, ...], perms: dict[int, list[int]] | None = None) -> str | None:
        """Walk producers through exactly these ops (first input each); the tensor before them, or None."""
        for i, op in enumerate(ops):
            node = producer.get(name)
            if node is None or node.op_type != op:
                return None
            if perms and i in perms:
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                if perm != perms[i]:
                    return None
            name = node.input[0]
        return name

    def heads_of(name: str) -> int | None:  # q's Reshape to (batch, tokens, heads, head_dim)
        reshape = producer.get(producer[name].input[0]) if name in producer else None
        if reshape is None or reshape.op_type != "Reshape" or reshape.input[1] not in initializers:
            return None
        shape = numpy_helper.to_array(initializers[reshape.input[1]])
        if shape.shape != (4,):
            return None
        if shape[2] > 0:
            return int(shape[2])
        # with batch and tokens static the exporter writes (1, tokens, -1, head_dim): heads = q's width / head_dim
        width = projection_width(reshape.input[0])
        return width // int(shape[3]) if width and shape[3] > 0 and width % int(shape[3]) == 0 else None

    def projection_width(name: str) -> int | None:  # q = x @ W (+ b): W's output columns
        node = producer.get(name)
        if node is not None and node.op_type == "Add":
            node = producer.get(node.input[0])
        if node is None or node.op_type != "MatMul" or node.input[1] not in initializers:
            return None
        dims = list(initializers[node.input[1]].dims)
        return int(dims[1]) if len(dims) == 2 else None

    heads_first = [0, 2, 1, 3]
    replaced: dict[int, object] = {}
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        scores = producer.get(softmax.input[0])
        after = consumers.get(softmax.output[0], [])
        if scores is None or scores.op_type != "MatMul" or len(after) != 1 or after[0].op_type != "MatMul":
            continue
        attend = after[0]
        if attend.input[0] != softmax.output[0]:
            continue
        q_mul, k_mul = producer.get(scores.input[0]), producer.get(scores.input[1])
        if q_mul is None or k_mul is None or q_mul.op_type != "Mul" or k_mul.op_type != "Mul":
            continue
        q_scale, k_scale = _scalar(initializers, q_mul.input[1]), _scalar(initializers, k_mul.input[1])
        q = follow(q_mul.input[0], ("Transpose", "Reshape"), {0: heads_first})
        k = follow(k_mul.input[0], ("Reshape", "Transpose", "Reshape", "Transpose", "Reshape"), {3: heads_first})
        v = follow(attend.input[1], ("Transpose", "Reshape"), {0: heads_first})
        out = consumers.get(attend.output[0], [])
        if None in (q_scale, k_scale, q, k, v) or len(out) != 1 or out[0].op_type != "Transpose":
            continue
        merge = consumers.get(out[0].output[0], [])
        if len(merge) != 1 or merge[0].op_type != "Reshape" or follow(merge[0].output[0], ("Reshape", "Transpose"),
                                                                         {1: heads_first}) is None:
            continue
        heads = heads_of(q_mul.input[0])
        if not heads:
            continue
        replaced[id(merge[0])] = helper.make_node(
            "MultiHeadAttention", [q, k, v], [merge[0].output[0]], domain="com.microsoft", num_heads=heads,
            scale=q_scale * k_scale, name=f"{merge[0].name or 'attention'}_fused_mha")
    if not replaced:
        return 0
    nodes = [replaced.get(id(n), n) for n in graph.node]
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):  # drop what only the replaced chains used
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    for unused in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(unused)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replaced)


def build_cpu_graph(graph: Path, out: Path, fuse: bool) -> bool:
    """ORT's offline-optimized CPU graph of `graph` at `out` (+ out.data for the large weights), attention fused
    first when `fuse`. Written in a staging folder under the final names and moved in (the .data first), so a crash
    leaves no half graph. Returns whether attention was fused (False when asked but onnx is not installed or the
    bundle's folder is read-only: ORT's own optimizations only)."""
    import shutil
    import tempfile

    import onnxruntime as ort

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out.parent))
    source, staged_fused, fused = graph, None, False
    try:
        if fuse:
            staged_fused = _fused_beside(graph)
            source, fused = (staged_fused, True) if staged_fused is not None else (graph, False)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(staging / out.name)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"{out.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         str(EXTERNAL_INITIALIZERS_MIN_BYTES))
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        data = staging / f"{out.name}.data"
        if data.exists():
            os.replace(data, out.with_name(data.name))
        os.replace(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if staged_fused is not None:
            staged_fused.unlink(missing_ok=True)
    return fused


def _fused_beside(graph: Path) -> Path | None:
    """`graph` with its attention fused, saved beside it (its external data paths stay valid); None when onnx is
    missing, nothing matched, or the folder is read-only."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(graph), load_external_data=False)  # structure only: weights stay in their files
    if not fuse_attention(model):
        return None
    staged = graph.with_name(f".fused.{os.getpid()}.{graph.name}")
    try:
        onnx.save(model, str(staged))
    except OSError:
        return None
    return staged


def cache_folder() -> Path:
    from .hash_stamps import cache_root

    return cache_root() / "ort-cpu"


def artifact_key(file_sha256s: list[str]) -> str:
    """The cache key of an encoder artifact: every file's hash (the graph and its external data)."""
    import hashlib

    return hashlib.sha256("|".join(file_sha256s).encode()).hexdigest()[:32]


def cpu_graph_path(key: str, fuse: bool) -> Path:
    """Where the CPU graph of an artifact (artifact_key) is cached, per fusion choice and ONNX Runtime version."""
    import onnxruntime as ort

    return cache_folder() / f"{key}-{'mha' if fuse else 'plain'}-ort{ort.__version__}.onnx"


def cached_cpu_graph(graph: Path, key: str, fuse: bool, log=None) -> Path:
    """The CPU graph of a bundle's `graph`, built on first use and then reused: keyed by the artifact's files
    (artifact_key), the fusion choice and this ONNX Runtime's version."""
    out = cpu_graph_path(key, fuse)
    if not out.is_file():
        if log:
            log(f"building the CPU-optimized copy of {graph.name} once (cached in {out.parent})")
        build_cpu_graph(graph, out, fuse)
    return out
