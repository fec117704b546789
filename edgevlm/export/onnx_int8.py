"""The onnx:int8 encoder: every int8 method (dynamic and static QDQ, s7 and u8 weights) quantizes the fp32 graph,
each is judged by cosine to fp32 on held-out inputs (reference scenes and noise), and the fastest one accurate enough
is kept (`choose_int8`). No torch: it reads the fp32 graph onnx.py exported."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ExportError
from .memory import release_memory

CALIBRATION_TILES = 16  # reference-scene tiles for static QDQ calibration and for choosing the int8 method
# protobuf's 2 GiB limit, with room for the graph itself: larger graphs keep their weights in external data (onnx.py
# exports fp32 so; the static quantizer's calibration copy must too). Here, not in onnx.py, which imports this module.
EXTERNAL_DATA_BYTES = 1_800_000_000


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


STATIC_OP_TYPES = ["MatMul", "Gemm", "Conv"]


def calibrate_ranges(fp32_path: Path, calibration, cache: Path) -> Path:
    """Activation ranges on `calibration` (a list of feeds) by ONNX Runtime's MinMax calibrator, as quantize_static
    runs it, written as ORT's calibration cache (JSON) for quantize_static to read. One change: the calibrator puts a
    ReduceMin/ReduceMax pair on every tensor into or out of a MatMul, and ORT's default execution order runs those
    pairs late, so every attention layer's (heads, T, T) scores stay alive at once (idefics2-8b's tower at 980x980:
    27 layers of 1.5 GB, killed at 24 GiB); in priority-based order each tensor is reduced as it is made (8.4 GB)."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import CalibrationDataReader, MinMaxCalibrater, save_tensors_data

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    class Calibrater(MinMaxCalibrater):
        def create_inference_session(self):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's own calibrator
            options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
            self.infer_session = ort.InferenceSession(self.augmented_model_path, options,
                                                      providers=self.execution_providers)

    # the augmented copy goes beside the output, not to /tmp: it is as large as the fp32 graph
    with tempfile.TemporaryDirectory(prefix=".calibrate-", dir=cache.parent) as work:
        # over protobuf's 2 GB (idefics2-8b's tower) the augmented copy must be saved with external data
        calibrator = Calibrater(fp32_path, STATIC_OP_TYPES, str(Path(work) / "augmented.onnx"),
                                use_external_data_format=_needs_external_data(fp32_path))
        calibrator.augment_graph()
        calibrator.create_inference_session()
        calibrator.collect_data(Reader())
        ranges = calibrator.compute_data()
        del calibrator  # its model and session before the quantizer loads the graph again
    save_tensors_data(ranges, cache)
    return cache


def quantize_static_qdq_int8(fp32_path: Path, path: Path, calibration, weight: str = "s7") -> Path:
    """QDQ int8 with activation ranges calibrated on reference-scene tiles (same preprocessing as at run time)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    cache = path.with_name(path.name + ".ranges.json")
    restore = _quiet_root_logger()
    try:
        calibrate_ranges(fp32_path, calibration, cache)
        # over 2 GB the output goes to external data too (_place)
        quantize_static(str(fp32_path), str(path), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, op_types_to_quantize=STATIC_OP_TYPES,
                        use_external_data_format=_needs_external_data(fp32_path), calibration_cache_path=cache,
                        **_weight_options(weight))
    finally:
        restore()
        cache.unlink(missing_ok=True)
    return path


def _needs_external_data(graph: Path) -> bool:
    return sum(f.stat().st_size for f in {graph, *_external_files(graph)}) > EXTERNAL_DATA_BYTES


def _external_files(graph: Path) -> set[Path]:
    """The external data files a graph's initializers name (none for a self-contained graph)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    return {graph.parent / entry.value for tensor in model.graph.initializer for entry in tensor.external_data
            if entry.key == "location"}


def _place(candidate: Path, path: Path) -> None:
    """Move the chosen int8 graph to `path`; one with external data (ORT names its file at random) is saved again
    with its data beside it as `<name>.data`, the name the bundle's file list and the fp32 graph use."""
    import onnx

    files = _external_files(candidate)
    if not files:
        candidate.replace(path)
        return
    model = onnx.load(str(candidate))  # with its external data
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")
    del model
    _remove(candidate)


def _remove(graph: Path) -> None:
    if graph.exists():
        for data in _external_files(graph):
            data.unlink(missing_ok=True)
    graph.unlink(missing_ok=True)


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
            _remove(c["graph"])
        best = max(c["cosine"] for c in candidates.values())
        raise ExportError(f"the int8 encoder reaches cosine {best:.4f} < {INT8_MIN_COSINE} against fp32 on held-out "
                          f"{unit}s; this model does not quantize well to int8: export onnx:fp16 or onnx:fp32")
    _place(candidates[chosen]["graph"], path)
    for c in candidates.values():
        _remove(c.pop("graph"))
    return {"quantization": chosen, "weight_type": candidates[chosen]["weight_type"], "candidates": candidates,
            "rule": f"the first of {', '.join(INT8_METHODS)} with cosine >= {INT8_PREFERRED_COSINE}, else the most "
                    f"accurate if >= {INT8_MIN_COSINE} (timings are information only)",
            "calibration": f"{len(calibration)} reference-scene {unit}s; judged on {len(held_out)} held-out {unit}s"}
