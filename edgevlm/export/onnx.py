"""Encoder + projector -> ONNX: fp32 (torch.onnx dynamo exporter, one dynamic axis `tiles`), fp16 (fp32 IO kept),
int8 (onnxruntime dynamic quantization). Each also gets an ORT-optimized CPU graph saved offline."""
from __future__ import annotations

import gc
import logging
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import ExportError
from ..manifest import Artifact
from .bundle import BundleWriter
from .memory import release_memory

EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GiB limit, with room for the graph itself
CALIBRATION_TILES = 16  # reference-scene tiles for static QDQ calibration and for choosing the int8 method


def _quiet_exporter() -> None:
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.onnx._internal.exporter._registration"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torch.onnx")
    warnings.filterwarnings("ignore", category=FutureWarning)  # pytree deprecations inside torch.export


def export_graph(vision, encoder_spec, path: Path) -> Path:
    """Export a module with the encoder signature (fp32 in, fp32 out); its compute dtype is the module's."""
    import onnx

    _quiet_exporter()
    if encoder_spec.kind == "grid":
        return export_grid_graph(vision, encoder_spec, path)
    _, channels, height, width = encoder_spec.input_shape
    dummy = torch.zeros(min(2, encoder_spec.max_tiles), channels, height, width)
    n_bytes = sum(p.numel() * p.element_size() for p in vision.parameters())
    tiles = torch.export.Dim("tiles", min=1, max=max(2, encoder_spec.max_tiles))
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            vision, (dummy,), str(path), dynamo=True, input_names=[encoder_spec.input_name],
            output_names=[encoder_spec.output_name], dynamic_shapes=({0: tiles},),
            external_data=n_bytes > EXTERNAL_DATA_BYTES, verbose=False,
        )
    _drop_rewriter_state()
    onnx.checker.check_model(str(path), full_check=False)
    return path


# The example image the grid graph is traced with: merged tokens 4 x 6 (not square, not 1, several windows), so that
# torch.export keeps the patch axis symbolic instead of specialising it.
GRID_EXAMPLE_MERGED = (4, 6)


def export_grid_graph(vision, encoder_spec, path: Path) -> Path:
    """One graph for every image size: each input's patch axis is merge^2 x the dynamic merged-token axis (a derived
    dim, so the merger's reshape to (merged, merge^2 * C) needs no guard). `vision` is the family's grid encoder (its
    export_module() is traced) or an export module already."""
    import onnx

    from ..vision_grid import VisionGrid, encoder_feeds

    grid_spec = VisionGrid.from_dict(encoder_spec.vision_grid)
    module = vision.export_module() if hasattr(vision, "export_module") else vision
    merge = grid_spec.merge_size
    grid = (1, GRID_EXAMPLE_MERGED[0] * merge, GRID_EXAMPLE_MERGED[1] * merge)
    patches = torch.zeros(grid[1] * grid[2], grid_spec.patch_dim).numpy()
    feeds = encoder_feeds(patches, grid, grid_spec)
    names = [i["name"] for i in encoder_spec.inputs]
    axis = encoder_spec.dynamic_axes["merged"]
    merged = torch.export.Dim("merged", min=1, max=max(int(axis["max"]), 2 * GRID_EXAMPLE_MERGED[0] * GRID_EXAMPLE_MERGED[1]))
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            module, tuple(torch.from_numpy(feeds[n]) for n in names), str(path), dynamo=True, input_names=names,
            output_names=[encoder_spec.output_name], dynamic_shapes=tuple({0: merge * merge * merged} for _ in names),
            external_data=n_bytes > EXTERNAL_DATA_BYTES, verbose=False,
        )
    _drop_rewriter_state()
    _tidy_grid_graph(path, encoder_spec.output_name, "merged")
    onnx.checker.check_model(str(path), full_check=False)
    return path


def _tidy_grid_graph(path: Path, output: str, axis: str) -> None:
    """Two fixes to what the exporter writes. Its value_info also lists the weights: with 2-D activations every
    Linear is a Gemm (transB=1), ORT's dynamic quantizer turns those into MatMul by transposing the weight, and the
    stale (out, in) shape then fails its shape inference. And the output's first axis is named after an internal
    symbol (s85); the manifest calls it `axis`."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    for value in model.graph.output:
        if value.name == output and not value.type.tensor_type.shape.dim[0].dim_value:
            value.type.tensor_type.shape.dim[0].dim_param = axis
    onnx.save(model, str(path))


def _drop_rewriter_state() -> None:
    """onnxscript's rewrite rules are module-level objects whose pattern matchers keep the last graph they matched,
    and through it every weight the exporter put in that graph: the fp32 vision tower (SmolVLM2-2.2B: 1.66 GB) stayed
    alive after the torch weights were freed. A matcher sets all of these again at the start of each match."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to clear
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            for attr in ("_graph", "_match", "_current_node", "_tracer"):
                obj.__dict__.pop(attr, None)


class HalfPrecision(torch.nn.Module):
    """fp16 weights and compute behind the fp32 signature callers use."""

    def __init__(self, vision):
        super().__init__()
        import copy

        self.inner = copy.deepcopy(vision).half()  # never mutate the caller's module

    def forward(self, pixel_values, vision_pos=None, window_ids=None):
        # a grid encoder's positions and window ids are integers: only the pixels change dtype. Named parameters, not
        # *args: torch.export matches dynamic_shapes to the signature's parameters
        grid_inputs = [t for t in (vision_pos, window_ids) if t is not None]
        return self.inner(pixel_values.half(), *grid_inputs).float()


def _quiet_root_logger():
    # ORT's quantizer logs a pre-processing hint on the root logger; the graph is ORT-optimized at load anyway
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    return lambda: root.setLevel(level)


# Every int8 graph the exporter writes computes the same numbers on all of ONNX Runtime's x86 kernel paths, so the
# accuracy measured here holds on the device. Activations are u8. With full-range s8 weights, the kernels for CPUs
# without VNNI (AVX2, AVX-512 before Cascade Lake) add pairs of u8 x s8 products in saturating int16 (vpmaddubsw):
# 2 x 255 x 127 overflows, and the tiny SigLIP test model gave cosine 0.983 there against 0.9999 with VNNI. Two
# portable forms remain:
# - "s7": s8 weights limited to 7 bits (reduce_range); 2 x 255 x 63 < 32767, so no sum saturates, and the fast
#   kernels stay (SmolVLM-256M's tower on a VNNI Xeon: 578 ms/tile, vs 518 for full s8 and 1,592 for u8).
# - "u8": u8 weights; u8 x u8 widens to int16 before multiplying and is exact everywhere, one bit more precise than
#   s7, but ~3x slower where VNNI would have run s8.
WEIGHT_TYPES = {"s7": "int8 (7-bit range)", "u8": "uint8"}


def _weight_options(weight: str) -> dict:
    from onnxruntime.quantization import QuantType

    return {"s7": dict(weight_type=QuantType.QInt8, reduce_range=True), "u8": dict(weight_type=QuantType.QUInt8)}[weight]


def quantize_dynamic_int8(fp32_path: Path, path: Path, _calibration=None, weight: str = "s7") -> Path:
    """MatMul/Gemm weights to int8 with per-channel scales; activations quantized on the fly."""
    from onnxruntime.quantization import quantize_dynamic

    restore = _quiet_root_logger()
    try:
        quantize_dynamic(str(fp32_path), str(path), per_channel=True, op_types_to_quantize=["MatMul", "Gemm"],
                         **_weight_options(weight))
    finally:
        restore()
    return path


def quantize_static_qdq_int8(fp32_path: Path, path: Path, calibration, weight: str = "s7") -> Path:
    """QDQ int8 with activation ranges calibrated on reference-scene tiles (same preprocessing as at run time)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    restore = _quiet_root_logger()
    try:
        quantize_static(str(fp32_path), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                        **_weight_options(weight))
    finally:
        restore()
    return path


# method -> (quantizer, weight form), in the order they run fastest on every x86 path
INT8_METHODS = {
    "dynamic": (quantize_dynamic_int8, "s7"),
    "static_qdq": (quantize_static_qdq_int8, "s7"),
    "dynamic_u8": (quantize_dynamic_int8, "u8"),
}
INT8_MIN_COSINE = 0.99  # DESIGN ladder: below this on held-out tiles, no int8 graph is shipped
INT8_PREFERRED_COSINE = 0.995  # the first method (fastest first) at or above this wins


def choose_int8(cosines: dict[str, float]) -> str | None:
    """The deterministic rule (accuracy only, never timing): the fastest method that reaches INT8_PREFERRED_COSINE on
    the held-out tiles; failing that the most accurate one if it reaches INT8_MIN_COSINE; else None."""
    for method in INT8_METHODS:
        if cosines[method] >= INT8_PREFERRED_COSINE:
            return method
    best = max(INT8_METHODS, key=lambda m: cosines[m])
    return best if cosines[best] >= INT8_MIN_COSINE else None


def calibration_tiles(manifest, n: int = CALIBRATION_TILES, seed: int | None = None):
    """The int8 calibration set (ONNX static QDQ and TensorRT): reference-scene tiles, (n, 3, H, W) float32."""
    from ..reference import scenes

    return scenes.scene_tiles(manifest.preprocess, n, scenes.CALIBRATION_SEED if seed is None else seed)


def grid_feeds(manifest, images) -> list[dict]:
    """A grid encoder's graph inputs for each image (RGB PIL), preprocessed as at run time."""
    from ..preprocess import preprocess
    from ..vision_grid import VisionGrid, encoder_feeds

    grid_spec, names = VisionGrid.from_dict(manifest.encoder.vision_grid), [i["name"] for i in manifest.encoder.inputs]
    feeds = []
    for image in images:
        pre = preprocess(image, manifest.preprocess)
        all_inputs = encoder_feeds(pre.pixel_values, pre.grid, grid_spec)
        feeds.append({name: all_inputs[name] for name in names})
    return feeds


# Image sizes (width, height) of the grid encoder's calibration and held-out scenes; smart_resize brings each inside
# the checkpoint's pixel budget, so a small budget sees them downscaled
GRID_SIZES = ((224, 224), (308, 224), (224, 336), (280, 280))


def grid_int8_feeds(manifest) -> tuple[list[dict], list[dict]]:
    """(calibration, held-out) inputs of a grid encoder: reference scenes at several sizes and aspect ratios, plus
    Gaussian-noise patches (at a scene's grid) in the held-out set."""
    import numpy as np

    from ..reference import scenes

    def images(n: int, seed: int):
        for i in range(n):
            width, height = GRID_SIZES[i % len(GRID_SIZES)]
            yield scenes.render(scenes.make_scene(seed + i), size=max(width, height)).resize((width, height))

    calibration = grid_feeds(manifest, images(8, scenes.CALIBRATION_SEED))
    held_out = grid_feeds(manifest, images(6, 3_500_000_000))
    rng = np.random.default_rng(0)
    for feeds in held_out[:2]:
        noise = dict(feeds)
        noise[manifest.encoder.input_name] = rng.normal(size=feeds[manifest.encoder.input_name].shape).astype(np.float32)
        held_out.append(noise)
    return calibration, held_out


def int8_feeds(manifest) -> tuple[list[dict], list[dict]]:
    """(calibration, held-out) graph inputs, one run each: reference-scene tiles for calibration; fresh scenes plus
    Gaussian noise held out, since users' images are not our scenes and static ranges clip what calibration never saw."""
    import numpy as np

    if manifest.encoder.kind == "grid":
        return grid_int8_feeds(manifest)
    name = manifest.encoder.input_name
    calibration = calibration_tiles(manifest)
    fresh = calibration_tiles(manifest, 8, seed=3_500_000_000)
    noise = np.random.default_rng(0).normal(size=(4, *fresh.shape[1:])).astype(np.float32)
    held_out = np.concatenate([fresh, noise])
    return ([{name: calibration[i : i + 1]} for i in range(len(calibration))],
            [{name: held_out[i : i + 1]} for i in range(len(held_out))])


def run_per_tile(session, feeds: list[dict]) -> tuple:
    """One input (a tile, or a grid encoder's image) per run, after a warm-up: the outputs, concatenated along the
    first axis, and the ms of each run."""
    import time

    import numpy as np

    session.run(None, feeds[0])
    times, outputs = [], []
    for feed in feeds:
        start = time.perf_counter()
        outputs.append(session.run(None, feed)[0])
        times.append((time.perf_counter() - start) * 1e3)
    return np.concatenate(outputs), times


def measure(graph: Path, feeds: list[dict], reference) -> dict:
    """Median ms per run (tile or image) and cosine to the fp32 graph's outputs."""
    import statistics

    import onnxruntime as ort

    from ..metrics import cosine

    outputs, times = run_per_tile(ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]), feeds)
    return {"ms_per_tile": statistics.median(times), "cosine": cosine(outputs, reference)}


def quantize_int8(fp32_path: Path, path: Path, manifest, log=print) -> dict:
    """Every int8 method, judged on held-out inputs (`int8_feeds`: tiles, or a grid encoder's images), chosen by
    `choose_int8`; an int8 graph below the ladder's cosine is refused rather than shipped."""
    import onnxruntime as ort

    calibration, held_out = int8_feeds(manifest)
    unit = "image" if manifest.encoder.kind == "grid" else "tile"
    fp32 = ort.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
    reference, _ = run_per_tile(fp32, held_out)
    del fp32  # a second copy of the weights while the quantizers hold theirs
    release_memory()
    candidates = {}
    for method, (quantize, weight) in INT8_METHODS.items():
        if any(c["cosine"] >= INT8_PREFERRED_COSINE for c in candidates.values()):
            break  # choose_int8 takes the first method at the preferred cosine: the rest cannot change the choice
        candidate = path.with_name(f".{method}.{path.name}")
        quantize(fp32_path, candidate, calibration, weight=weight)
        candidates[method] = {**measure(candidate, held_out, reference), "weight_type": WEIGHT_TYPES[weight],
                              "graph": candidate}
        release_memory()  # the quantizer's copies of the model
        log(f"  int8 {method} ({WEIGHT_TYPES[weight]} weights): cosine {candidates[method]['cosine']:.4f} on held-out "
            f"{unit}s ({candidates[method]['ms_per_tile']:.1f} ms/{unit} here)")
    chosen = choose_int8({m: c["cosine"] for m, c in candidates.items()})
    if chosen is None:
        for c in candidates.values():
            c["graph"].unlink(missing_ok=True)
        best = max(c["cosine"] for c in candidates.values())
        raise ExportError(f"the int8 encoder reaches cosine {best:.4f} < {INT8_MIN_COSINE} against fp32 on held-out "
                          f"{unit}s; this model does not quantize well to int8: export onnx:fp16 or onnx:fp32")
    candidates[chosen]["graph"].replace(path)
    for c in candidates.values():
        c.pop("graph").unlink(missing_ok=True)
    return {"quantization": chosen, "weight_type": candidates[chosen]["weight_type"], "candidates": candidates,
            "rule": f"the first of {', '.join(INT8_METHODS)} with cosine >= {INT8_PREFERRED_COSINE}, else the most "
                    f"accurate if >= {INT8_MIN_COSINE} (timings are information only)",
            "calibration": f"{len(calibration)} reference-scene {unit}s; judged on {len(held_out)} held-out {unit}s"}


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
        return int(shape[2]) if shape.shape == (4,) and shape[2] > 0 else None

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


ATTENTION_FUSION_TOLERANCE = 1e-4  # cosine the fused CPU graph may lose against the unfused one (fp32 attention both)


def save_cpu_optimized(graph: Path, optimized: Path, encoder_spec=None, log=print, reference: Path | None = None) -> Path:
    """ORT's offline-optimized graph for the CPU provider (CPU-specific fused ops: used only with CPU). For a tiles
    encoder, attention is fused first (`fuse_attention`) and kept only if, on a probe tile, the fused graph is as close
    to `reference` (the fp32 graph a quantized one came from; else the graph itself) as the unfused graph, within
    ATTENTION_FUSION_TOLERANCE (an int8 graph quantizes its activations at run time, so fusing moves its output by
    ~1e-4 in cosine, as much closer to fp32 as farther)."""
    import onnx
    import onnxruntime as ort

    def optimize(source: Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        return ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])

    if encoder_spec is None or encoder_spec.kind != "tiles":
        optimize(graph)
        return optimized
    model = onnx.load(str(graph), load_external_data=False)  # structure only: weights stay in their files
    fused = fuse_attention(model)
    if not fused:
        optimize(graph)
        return optimized
    staged = graph.with_name(f".fused.{graph.name}")  # beside the graph: its external data paths stay valid
    reason = ""
    try:
        onnx.save(model, str(staged))
        del model
        import numpy as np

        from ..metrics import cosine

        tile = np.random.default_rng(0).normal(size=(1, *encoder_spec.input_shape[1:])).astype(np.float32)
        feed = {encoder_spec.input_name: tile}

        def output(source: Path):
            return ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feed)[0]

        expected = output(reference or graph)
        unfused = cosine(output(graph), expected) if reference else 1.0
        try:
            agreement = cosine(optimize(staged).run(None, feed)[0], expected)
        except Exception as exc:  # noqa: BLE001 - e.g. no CPU kernel of the fused op for this graph's dtype
            agreement, reason = float("nan"), str(exc).splitlines()[0][:120]
    finally:
        staged.unlink(missing_ok=True)
    if agreement != agreement:
        log(f"  attention fusion not used: ONNX Runtime cannot run the fused graph ({reason})")
        optimize(graph)
    elif agreement >= unfused - ATTENTION_FUSION_TOLERANCE:
        log(f"  fused {fused} attention blocks into MultiHeadAttention for the CPU graph (cosine {agreement:.6f}, "
            f"unfused {unfused:.6f}, against {'fp32' if reference else 'the unfused graph'} on a probe tile)")
    else:
        log(f"  attention fusion gave cosine {agreement:.6f} (unfused {unfused:.6f}) on a probe tile; not used")
        optimize(graph)
    return optimized


def ensure_fp32_graph(ckpt, manifest, writer: BundleWriter, log=print) -> Path:
    """The fp32 graph every variant starts from, exported once (the only step of onnx:int8 that needs torch)."""
    scratch = writer.root / ".work"
    scratch.mkdir(exist_ok=True)
    fp32 = scratch / "fp32.onnx"
    if not fp32.exists():
        log("  exporting the vision module to ONNX (fp32)")
        export_graph(ckpt.vision, manifest.encoder, fp32)
    return fp32


def export_encoder(ckpt, manifest, writer: BundleWriter, precision: str, log=print, threads=None, **_) -> Artifact:
    folder = writer.root / "encoder"
    folder.mkdir(exist_ok=True)
    fp32 = ensure_fp32_graph(ckpt, manifest, writer, log)
    scratch = fp32.parent
    graph = folder / f"{precision}.onnx"
    if precision == "fp32":
        shutil.copy(fp32, graph)
        for data in scratch.glob("fp32.onnx.data"):
            shutil.copy(data, folder / data.name)
        details = {}
    elif precision == "fp16":
        log("  exporting an fp16 graph (fp32 inputs and outputs)")
        vision = ckpt.vision.export_module() if manifest.encoder.kind == "grid" else ckpt.vision
        export_graph(HalfPrecision(vision).eval(), manifest.encoder, graph)
        details = {"io_dtype": "float32", "compute_dtype": "float16"}
    else:
        log("  quantizing to int8 (onnxruntime: dynamic and static QDQ, chosen by accuracy on held-out inputs)")
        details = {**quantize_int8(fp32, graph, manifest, log), "activation_type": "uint8", "per_channel": True}
    optimized = folder / f"{precision}.ort-cpu.onnx"
    save_cpu_optimized(graph, optimized, manifest.encoder, log, reference=None if precision == "fp32" else fp32)
    # the planner's activation term (per tile; a grid encoder: at two image sizes), measured on the graph the CPU
    # runtime opens, in a fresh process (plan/probe.py)
    from ..plan.probe import encoder_memory_details

    log("  measuring its activation memory (ONNX Runtime CPU)")
    details = {**details, **encoder_memory_details(optimized, manifest.encoder, threads)}
    extras = tuple(p.relative_to(writer.root).as_posix() for p in folder.glob(f"{precision}.*") if p != graph)
    artifact = writer.artifact(f"onnx:{precision}", "encoder", "onnx", precision, f"encoder/{precision}.onnx",
                               extra_files=extras, cpu_optimized=f"encoder/{precision}.ort-cpu.onnx", **details)
    return artifact


def release_intermediates(writer: BundleWriter) -> None:
    """The fp32 graph every variant starts from, deleted once all are written."""
    for path in (writer.root / ".work").glob("fp32.onnx*"):
        path.unlink()
