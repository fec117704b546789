"""Memory probes the planner's soft terms are measured with, each in a fresh Python process (a process's peak RSS
counts everything it ever held, so an exporter or a test cannot measure these in its own process).

    python -m edgevlm.plan.probe encoder GRAPH INPUT_NAME C H W [THREADS]
        ONNX Runtime (CPU provider, the runtime's session options) on one graph: the resident bytes the session adds
        when it opens the graph, and the activation bytes one tile adds to the peak (ORT's arena after CPU_TILES_PER_RUN
        tiles per run: it keeps the largest run's blocks). The exporter stores the latter as the artifact's
        details.activation_bytes_per_tile, which the planner prefers to budget.ENCODER_ACTIVATION_BYTES_PER_PIXEL.
    python -m edgevlm.plan.probe grid GRAPH VISION_GRID_JSON SIDE1,SIDE2 [THREADS]
        The same for a native-resolution (grid, Qwen2-VL) graph, one image per run: after a warm-up at the smallest
        grid, one square image of SIDE1 x SIDE1 patches, then one of SIDE2 x SIDE2 (SIDE1 < SIDE2, multiples of the
        merge size), each run's activation bytes over the warm-up's peak (ORT's arena keeps the largest run's blocks, so
        the second figure is the larger image's own). The exporter stores the (patches, bytes) pairs as the artifact's
        details.activation_bytes_at_patches; the planner fits bytes = a x P + b x P^2 through them (budget.
        grid_activation_bytes): the attention scores of every block are (P, P), quadratic in the image's patches.
    python -m edgevlm.plan.probe runtime
        The resident bytes of a runtime process before any model: Python, numpy, ONNX Runtime, llama.cpp (backend
        initialised) and edgevlm's runtime modules (budget.RUNTIME_BASELINE_BYTES is this figure, measured here).

Each prints one JSON object (bytes). Linux only (/proc/self/status); elsewhere the exporter records nothing."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")


def _status_bytes(key: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024  # kB
    raise OSError(f"{key} not in {STATUS}")


def rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def import_runtime() -> None:
    """What a runtime process imports before it loads a model (bundle_loader's ONNX Runtime + llama.cpp path)."""
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401

    from ..backends import require_llama_cpp
    from ..runtimes import bundle_loader, llamacpp, onnx_encoder, tokenizer  # noqa: F401

    require_llama_cpp().llama_backend_init()


def measure_runtime() -> dict:
    import_runtime()
    return {"runtime_baseline_bytes": rss_bytes(), "peak_bytes": peak_rss_bytes()}


def measure_encoder(graph: str, input_name: str, tile_shape: tuple[int, int, int], threads: int = 2,
                    runs: int = 2) -> dict:
    """Resident bytes of an ORT CPU session on `graph` (session_bytes) and what `runs` single-tile runs add to the
    peak on top of it (activation_bytes_per_tile). Options as runtimes/onnx_encoder.py sets them."""
    import numpy as np
    import onnxruntime as ort

    from ..runtimes.onnx_encoder import CPU_TILES_PER_RUN

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # the inputs exist before the session opens: the planner counts the pixels apart (budget.image_input_bytes)
    rng = np.random.default_rng(0)
    inputs = [np.zeros((CPU_TILES_PER_RUN, *tile_shape), dtype=np.float32)]
    inputs += [rng.standard_normal(inputs[0].shape, dtype=np.float32) for _ in range(runs - 1)]
    before = rss_bytes()
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    opened = rss_bytes()
    base_peak = peak_rss_bytes()  # opening may peak above `opened` (graph copies freed again)
    # any other input is an instruction's ids (InstructBLIP): a short one per tile
    extra = {i.name: np.ones((CPU_TILES_PER_RUN, 4), dtype=np.int64) for i in session.get_inputs() if i.name != input_name}
    for tiles in inputs:
        session.run(None, {input_name: tiles, **extra})
    peak = peak_rss_bytes()
    return {"session_bytes": opened - before,
            "activation_bytes_per_tile": max(0, peak - max(opened, base_peak)) // CPU_TILES_PER_RUN,
            "tiles_per_run": CPU_TILES_PER_RUN, "threads": threads, "peak_bytes": peak}


def grid_probe_sides(max_patches: int, merge: int, largest: int = 32) -> tuple[int, ...]:
    """The square grids (sides in patches) the grid probe runs: the largest within the graph's patch bound, at most
    `largest` (32 x 32 patches = 448 x 448 pixels at 14-px patches), and half of it; one side when they coincide."""
    top = min(largest, math.isqrt(max(0, max_patches))) // merge * merge
    if top < merge:
        return ()
    half = max(merge, top // 2 // merge * merge)
    return (top,) if half == top else (half, top)


def measure_grid_encoder(graph: str, vision_grid: dict, sides: tuple[int, ...], threads: int = 2) -> dict:
    """Resident bytes of an ORT CPU session on a grid graph (session_bytes) and the activation bytes one image of
    side x side patches adds to the peak over a warm-up at the smallest grid, for each side in increasing order."""
    import numpy as np
    import onnxruntime as ort

    from ..vision_grid import VisionGrid, encoder_feeds

    spec = VisionGrid.from_dict(vision_grid)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    rng = np.random.default_rng(0)
    grids = [(1, spec.merge_size, spec.merge_size)] + [(1, side, side) for side in sorted(sides)]
    # the inputs exist before the session opens: the planner counts the pixels apart (budget.patch_input_bytes)
    feeds = [encoder_feeds(rng.standard_normal((h * w, spec.patch_dim), dtype=np.float32), (t, h, w), spec)
             for t, h, w in grids]
    before = rss_bytes()
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    opened = rss_bytes()
    names = {i.name for i in session.get_inputs()}
    session.run(None, {k: v for k, v in feeds[0].items() if k in names})  # warm-up: one-time allocations
    base = max(opened, peak_rss_bytes())
    points = []
    for (_, h, w), feed in zip(grids[1:], feeds[1:]):
        session.run(None, {k: v for k, v in feed.items() if k in names})
        points.append([h * w, max(0, peak_rss_bytes() - base)])
    return {"session_bytes": opened - before, "points": points, "threads": threads, "peak_bytes": peak_rss_bytes()}


def run_probe(*args: str, timeout: float = 600) -> dict | None:
    """One probe in a fresh interpreter; None where it cannot run (not Linux, the probe failed)."""
    if not STATUS.is_file():
        return None
    try:
        done = subprocess.run([sys.executable, "-m", "edgevlm.plan.probe", *args], capture_output=True, text=True,
                              timeout=timeout, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def encoder_activation_details(graph: Path, input_name: str, tile_shape, threads: int | None = None) -> dict:
    """The exporter's record for an ONNX encoder: {"activation_bytes_per_tile", "session_resident_bytes",
    "activation_basis"}, or {} where the probe cannot run."""
    threads = int(threads or 2)
    c, h, w = (int(d) for d in tile_shape)
    result = run_probe("encoder", str(graph), input_name, str(c), str(h), str(w), str(threads))
    if not result or result.get("activation_bytes_per_tile", 0) <= 0:
        return {}
    return {"activation_bytes_per_tile": int(result["activation_bytes_per_tile"]),
            "session_resident_bytes": int(result["session_bytes"]),
            "activation_basis": f"measured at export (edgevlm.plan.probe, ORT CPU, {threads} threads): the resident "
                                f"bytes an ORT session on {graph.name} adds when it opens it, and the peak RSS "
                                f"{result['tiles_per_run']}-tile runs add over that"}


def grid_activation_details(graph: Path, encoder_spec, threads: int | None = None) -> dict:
    """The exporter's record for a grid (native-resolution) ONNX encoder: {"activation_bytes_at_patches": [[P, bytes],
    ...], "session_resident_bytes", "activation_basis"}, or {} where the probe cannot run."""
    threads = int(threads or 2)
    grid = encoder_spec.vision_grid
    bound = (encoder_spec.dynamic_axes.get("patches") or {}).get("max") or 32 * 32
    sides = grid_probe_sides(int(bound), int(grid["merge_size"]))
    if not sides:
        return {}
    result = run_probe("grid", str(graph), json.dumps(grid), ",".join(str(s) for s in sides), str(threads))
    if not result or not result.get("points") or result["points"][-1][1] <= 0:
        return {}
    points = [[int(p), int(b)] for p, b in result["points"]]
    return {"activation_bytes_at_patches": points, "session_resident_bytes": int(result["session_bytes"]),
            "activation_basis": f"measured at export (edgevlm.plan.probe grid, ORT CPU, {threads} threads): the "
                                f"resident bytes an ORT session on {graph.name} adds when it opens it, and the peak RSS "
                                f"one image of {' and then '.join(str(p) for p, _ in points)} patches adds over a "
                                "warm-up at the smallest grid"}


def encoder_memory_details(graph: Path, encoder_spec, threads: int | None = None) -> dict:
    """The exporter's probe for either encoder kind (manifest.EncoderSpec): per tile, or at two image sizes."""
    if encoder_spec.kind == "grid":
        return grid_activation_details(graph, encoder_spec, threads)
    return encoder_activation_details(graph, encoder_spec.input_name, encoder_spec.input_shape[1:], threads)


def main(argv: list[str]) -> int:
    if argv[:1] == ["runtime"]:
        print(json.dumps(measure_runtime()))
        return 0
    if argv[:1] == ["encoder"] and len(argv) in (6, 7):
        graph, input_name, c, h, w = argv[1:6]
        threads = int(argv[6]) if len(argv) == 7 else 2
        print(json.dumps(measure_encoder(graph, input_name, (int(c), int(h), int(w)), threads)))
        return 0
    if argv[:1] == ["grid"] and len(argv) in (4, 5):
        graph, grid, sides = argv[1:4]
        threads = int(argv[4]) if len(argv) == 5 else 2
        print(json.dumps(measure_grid_encoder(graph, json.loads(grid), tuple(int(s) for s in sides.split(",")),
                                              threads)))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
