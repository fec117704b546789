"""Encoder + projector -> ONNX: fp32 (torch.onnx dynamo exporter, one dynamic axis `tiles`), fp16 (fp32 IO kept),
int8 (onnxruntime dynamic quantization). One portable graph per precision; the CPU provider's optimized copy is built
on the machine that runs it (onnx_cpu.py)."""
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
    args, names, shapes = (dummy,), [encoder_spec.input_name], ({0: tiles},)
    if encoder_spec.instruction:  # InstructBLIP: (tiles, n) ids + mask, n the instruction's own axis
        n = torch.export.Dim("instruction_tokens", min=2, max=int(encoder_spec.instruction["max_tokens"]))
        ids = torch.ones(len(dummy), 5, dtype=torch.long)  # not 2: the exporter would specialise a size it met twice
        args, names = (dummy, ids, torch.ones_like(ids)), names + list(encoder_spec.instruction["inputs"])
        shapes = ({0: tiles}, {0: tiles, 1: n}, {0: tiles, 1: n})
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            vision, args, str(path), dynamo=True, input_names=names,
            output_names=[encoder_spec.output_name], dynamic_shapes=shapes,
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

    def forward(self, pixel_values, vision_pos=None, window_ids=None, table_weights=None):
        # (an instruction-reading encoder's ids and mask come in the same places: integers, passed on as they are)
        # a grid encoder's positions and window ids are integers: only the pixels change dtype. Named parameters, not
        # *args: torch.export matches dynamic_shapes to the signature's parameters. The inputs after the pixels are
        # passed on in order whatever they are (Qwen3-VL: positions, table ids, table weights; its module casts them)
        grid_inputs = [t for t in (vision_pos, window_ids, table_weights) if t is not None]
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
    extra = instruction_feeds(manifest.encoder, 1)
    return ([{name: calibration[i : i + 1], **extra} for i in range(len(calibration))],
            [{name: held_out[i : i + 1], **extra} for i in range(len(held_out))])


def instruction_feeds(encoder_spec, tiles: int) -> dict:
    """An instruction-reading graph's other inputs (InstructBLIP): the contract's default instruction per tile."""
    import numpy as np

    if not encoder_spec.instruction:
        return {}
    ids = np.tile(np.asarray(encoder_spec.instruction["default_ids"], dtype=np.int64), (tiles, 1))
    first, second = encoder_spec.instruction["inputs"]
    return {first: ids, second: np.ones_like(ids)}


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


def choose_cpu_fusion(graph: Path, staged: Path, encoder_spec, log=print, reference: Path | None = None) -> bool:
    """Should the CPU graph run attention fused (onnx_cpu.fuse_attention)? For a tiles encoder, yes when on a probe
    tile the fused graph is as close to `reference` (the fp32 graph a quantized one came from; else the graph itself)
    as the unfused graph, within ATTENTION_FUSION_TOLERANCE (an int8 graph quantizes its activations at run time, so
    fusing moves its output by ~1e-4 in cosine, as much closer to fp32 as farther). The fused candidate is built at
    `staged` (the caller keeps it when chosen)."""
    import numpy as np
    import onnxruntime as ort

    from ..metrics import cosine
    from ..onnx_cpu import ATTENTION_FUSION_TOLERANCE, build_cpu_graph

    if encoder_spec is None or encoder_spec.kind != "tiles":
        return False
    if not build_cpu_graph(graph, staged, fuse=True):
        return False  # nothing matched
    tile = np.random.default_rng(0).normal(size=(1, *encoder_spec.input_shape[1:])).astype(np.float32)
    feed = {encoder_spec.input_name: tile, **instruction_feeds(encoder_spec, 1)}

    def output(source: Path):
        return ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feed)[0]

    expected = output(reference or graph)
    unfused = cosine(output(graph), expected) if reference else 1.0
    try:
        agreement, reason = cosine(output(staged), expected), ""
    except Exception as exc:  # noqa: BLE001 - e.g. no CPU kernel of the fused op for this graph's dtype
        agreement, reason = float("nan"), str(exc).splitlines()[0][:120]
    fused = sum(1 for _ in _fused_ops(staged))
    if agreement != agreement:
        log(f"  attention fusion not used: ONNX Runtime cannot run the fused graph ({reason})")
        return False
    if agreement >= unfused - ATTENTION_FUSION_TOLERANCE:
        log(f"  fused {fused} attention blocks into MultiHeadAttention for the CPU graph (cosine {agreement:.6f}, "
            f"unfused {unfused:.6f}, against {'fp32' if reference else 'the unfused graph'} on a probe tile)")
        return True
    log(f"  attention fusion gave cosine {agreement:.6f} (unfused {unfused:.6f}) on a probe tile; not used")
    return False


def _fused_ops(graph: Path):
    import onnx

    return (n for n in onnx.load(str(graph), load_external_data=False).graph.node if n.op_type == "MultiHeadAttention")


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
    extras = tuple(p.relative_to(writer.root).as_posix() for p in folder.glob(f"{precision}.*") if p != graph)
    artifact = writer.artifact(f"onnx:{precision}", "encoder", "onnx", precision, f"encoder/{precision}.onnx",
                               extra_files=extras, **details)
    # the CPU provider's copy is built where it runs (onnx_cpu.cached_cpu_graph); here to decide the attention fusion
    # and to measure the planner's activation term (per tile; a grid encoder: at two image sizes) on the graph the CPU
    # runtime will open, in a fresh process (plan/probe.py). Built in this machine's cache: its first load reuses it.
    from ..onnx_cpu import artifact_key, cached_cpu_graph, cpu_graph_path
    from ..plan.probe import encoder_memory_details

    key = artifact_key([f.sha256 for f in artifact.files])
    candidate = cpu_graph_path(key, fuse=True)  # the fused candidate is built where the cache keeps it when chosen
    fuse = False
    try:
        fuse = choose_cpu_fusion(graph, candidate, manifest.encoder, log,
                                 reference=None if precision == "fp32" else fp32)
    finally:
        if not fuse:
            for path in (candidate, candidate.with_name(f"{candidate.name}.data")):
                path.unlink(missing_ok=True)
    cpu_graph = cached_cpu_graph(graph, key, fuse)  # chosen: the candidate itself; else the plain graph, built now
    log("  measuring its activation memory (ONNX Runtime CPU)")
    artifact.details.update({**encoder_memory_details(cpu_graph, manifest.encoder, threads),
                             "cpu_attention_fusion": fuse})
    return artifact


def release_intermediates(writer: BundleWriter) -> None:
    """The fp32 graph every variant starts from, deleted once all are written."""
    for path in (writer.root / ".work").glob("fp32.onnx*"):
        path.unlink()
