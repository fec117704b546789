"""Attention fusion for the CPU encoder graph: edgevlm's matcher (edgevlm/onnx_cpu.py `fuse_attention`) against ONNX
Runtime's own transformer optimizer (`onnxruntime.transformers.optimizer.optimize_model`, the library optimum's
ORTOptimizer drives) and against ORT's session optimizations alone, on one bundle's fp32 encoder graph.

For each variant: the fused attention nodes it produced (MultiHeadAttention / Attention) and the Softmax nodes left,
encoder ms per call (median of alternated rounds in one process: every variant runs once per round, so drift and
neighbours hit them alike), the worst relative error against the unfused graph, and the peak RSS of a fresh process
that loads the variant and runs it once.

    PYTHONPATH=$PWD python benchmarks/onnx_fusion.py BUNDLE [--rounds 7] [--image-size 448x448] -o OUT.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORT_MODEL_TYPES = ("vit", "clip")  # onnxruntime.transformers' fusions for vision towers


def _inputs(encoder: dict, image_size: tuple[int, int]) -> dict:
    """Random feeds for one call: one tile, or one image's patches for a native-resolution (grid) tower."""
    import numpy as np

    from edgevlm.vision_grid import VisionGrid, encoder_feeds

    rng = np.random.default_rng(0)
    if encoder.get("vision_grid"):
        grid = VisionGrid.from_dict(encoder["vision_grid"])
        unit = grid.patch_size * grid.merge_size
        h, w = (image_size[1] // unit) * grid.merge_size, (image_size[0] // unit) * grid.merge_size
        patches = rng.standard_normal((h * w, grid.patch_dim)).astype(np.float32)  # (P, C*T*p*p)
        return encoder_feeds(patches, (1, h, w), grid)
    shape = [1, *encoder["input_shape"][1:]]  # (1, 3, H, W)
    return {encoder["input_name"]: rng.standard_normal(shape).astype(np.float32)}


def _variants(graph: Path, work: Path) -> dict[str, Path]:
    """name -> an ONNX file ORT's CPU session loads (its own optimizations applied at load, as the runtime does)."""
    import onnx

    from edgevlm.onnx_cpu import fuse_attention

    out = {"ort session only": graph}
    model = onnx.load(str(graph))
    if fuse_attention(model):
        path = work / "edgevlm-mha.onnx"
        onnx.save(model, str(path))
        out["edgevlm fuse_attention"] = path
    from onnxruntime.transformers.optimizer import optimize_model

    for model_type in ORT_MODEL_TYPES:
        optimized = optimize_model(str(graph), model_type=model_type, num_heads=0, hidden_size=0,
                                   opt_level=0)  # 0, 0: detected from the graph
        path = work / f"ort-{model_type}.onnx"
        optimized.save_model_to_file(str(path))
        out[f"onnxruntime.transformers ({model_type})"] = path
    return out


def _counts(path: Path) -> dict:
    import onnx

    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return {"fused_attention": ops.count("MultiHeadAttention") + ops.count("Attention"),
            "softmax": ops.count("Softmax"), "nodes": len(ops)}


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _peak_rss(path: Path, feeds_file: Path, threads: int) -> int:
    """Peak RSS (bytes) of a fresh process that opens the variant and runs it once."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report this process's peak
    code = ("import numpy as np, onnxruntime as ort\n"
            "o = ort.SessionOptions(); o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED\n"
            f"o.intra_op_num_threads = {threads}\n"
            f"s = ort.InferenceSession({str(path)!r}, o, providers=['CPUExecutionProvider'])\n"
            f"f = dict(np.load({str(feeds_file)!r}))\n"
            "s.run(None, f)\n"
            "line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "print(int(line.split()[1]) * 1024)\n")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def measure(bundle: Path, encoder: str, rounds: int, threads: int, image_size: tuple[int, int]) -> dict:
    import numpy as np

    manifest = json.loads((bundle / "manifest.json").read_text())
    artifact = next(a for a in manifest["artifacts"] if a["role"] == "encoder" and a["name"] == encoder)
    graph = bundle / artifact["path"]
    feeds = _inputs(manifest["encoder"], image_size)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        feeds_file = work / "feeds.npz"
        np.savez(feeds_file, **feeds)
        variants = _variants(graph, work)
        sessions = {name: _session(path, threads) for name, path in variants.items()}
        reference = sessions["ort session only"].run(None, feeds)[0]
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for name, session in sessions.items():  # warm-up
            session.run(None, feeds)
        for _ in range(rounds):
            for name, session in sessions.items():
                t0 = time.perf_counter()
                session.run(None, feeds)
                times[name].append((time.perf_counter() - t0) * 1000)
        rows = {}
        for name, path in variants.items():
            out = sessions[name].run(None, feeds)[0]
            rows[name] = {**_counts(path), "ms_median": round(statistics.median(times[name]), 2),
                          "ms_all": [round(t, 2) for t in times[name]],
                          "max_rel_err": float(np.abs(out - reference).max() / (np.abs(reference).max() + 1e-12)),
                          "peak_rss_bytes": _peak_rss(path, feeds_file, threads)}
    base = rows["ort session only"]["ms_median"]
    for row in rows.values():
        row["speed_vs_session_only"] = round(base / row["ms_median"], 3)
    return {"encoder": encoder, "graph": artifact["path"], "input": {k: list(v.shape) for k, v in feeds.items()},
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    from edgevlm.machine import cpu_flags, cpu_model, source_commit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--encoder", default="onnx:fp32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", default="448x448", help="WxH, for a native-resolution (grid) encoder")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    results = measure(Path(args.bundle), args.encoder, args.rounds, args.threads, (width, height))
    run = {"command": shlex.join(["python", "benchmarks/onnx_fusion.py", *(argv or sys.argv[1:])]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": source_commit(),
           "cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": args.threads}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"run": run, "results": results}, indent=1) + "\n")
    for name, row in results["rows"].items():
        print(f"{name:36s} fused {row['fused_attention']:3d} softmax {row['softmax']:3d} "
              f"{row['ms_median']:9.2f} ms  x{row['speed_vs_session_only']:.2f}  "
              f"rss {row['peak_rss_bytes'] / 2**20:7.0f} MiB  err {row['max_rel_err']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
