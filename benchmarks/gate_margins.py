"""What correct and damaged exports measure against verify's gates (docs/parity-ladder.md's margin table).

Exports the trained reference model at every precision, runs `verify_report` on it, then on copies damaged the ways
tests/damage.py damages them (the same damage the tests in tests/test_verify_damage.py build), and writes every row
to benchmarks/results/gates/reference-{correct,encoder,decoder}.json. With --tiny it does the mmproj damage on the tiny random-weight Idefics3
model instead (the reference model's CLIP tower has no mmproj: llama.cpp issue 25814).

    PYTHONPATH=$PWD python benchmarks/gate_margins.py --part correct|encoder|decoder [--tiny] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

GGUF_QUANTS = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")
MLX_PRECISIONS = ("fp32", "fp16", "8bit", "4bit")
DECODER_ATTENTION = ("attn_q.weight", "attn_k.weight")


def _rows(bundle, pairs=True) -> dict:
    from edgevlm.verify import verify_report

    t0 = time.time()
    report = verify_report(bundle, threads=2, pairs=pairs,
                           progress=lambda m: print(f"  {time.time() - t0:6.1f}s {m}", flush=True))
    rows = {r["artifact"]: {k: v for k, v in r.items() if k not in ("checks", "role")} for r in report["rows"]}
    return {"weights": report["weights"], "rows": rows, "seconds": round(time.time() - t0, 1)}


def measure_reference(out: Path, work: Path, part: str) -> dict:
    import damage
    from edgevlm.export import gguf as gguf_export
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
    from edgevlm.reference.train import DEFAULT_RECIPE, ensure_reference

    reference = ensure_reference(DEFAULT_RECIPE)
    encoders = [ArtifactRequest("onnx", p) for p in ("fp32", "fp16", "int8")]
    decoders = [ArtifactRequest("gguf", q) for q in GGUF_QUANTS] + [ArtifactRequest("mlx", p) for p in MLX_PRECISIONS]
    results: dict = {}
    if part == "correct":
        correct = export_checkpoint(reference, work / "correct", encoders, decoders, max_tiles=4)
        results["correct"] = _rows(correct)
        return results
    if part == "decoder":
        return _damaged_decoders(reference, work)

    # encoders, each damage on a bundle of the three encoders + the F32 GGUF (so that the pairs run too)
    enc_only = export_checkpoint(reference, work / "enc", encoders, [ArtifactRequest("gguf", "f32")], max_tiles=4)
    for label, do in {
        "encoder: attention layers 0 and 1 swapped": lambda b, n: damage.swap_onnx_attention_layers(b, n, 0, 1),
        "encoder: projector weight x1.02": lambda b, n: damage.scale_onnx_projector(b, n, 1.02),
        "encoder: projector weight x1.5": lambda b, n: damage.scale_onnx_projector(b, n, 1.5),
        "encoder: attention layers 1 and 2 swapped": lambda b, n: damage.swap_onnx_attention_layers(b, n, 1, 2),
    }.items():
        bundle = shutil.copytree(enc_only, work / f"enc-{len(results)}")
        for name in ("onnx:fp32", "onnx:fp16", "onnx:int8"):
            do(bundle, name)
        results[label] = _rows(bundle)
        print(label, results[label]["seconds"], "s", flush=True)
    return results


def _damaged_decoders(reference, work: Path) -> dict:
    import damage
    from edgevlm.export import gguf as gguf_export
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    results: dict = {}
    # GGUF decoders: two layers' attention swapped inside the files; Q/K written unpermuted at export
    gguf_requests = [ArtifactRequest("gguf", q) for q in GGUF_QUANTS]
    swapped = export_checkpoint(reference, work / "swapped", [], gguf_requests)
    for q in GGUF_QUANTS:
        damage.swap_gguf_layers(swapped, f"gguf:{q}", DECODER_ATTENTION)
    results["gguf: layers 0 and 1 attn_q/attn_k swapped"] = _rows(swapped)
    original = gguf_export.permute_rope
    gguf_export.permute_rope = lambda array, n_head: array  # the classic converter bug
    try:
        unpermuted = export_checkpoint(reference, work / "unpermuted", [], gguf_requests)
    finally:
        gguf_export.permute_rope = original
    results["gguf: Q/K written without the RoPE permutation"] = _rows(unpermuted)

    # MLX: two layers' q_proj swapped
    mlx = export_checkpoint(reference, work / "mlx", [], [ArtifactRequest("mlx", p) for p in MLX_PRECISIONS])
    for p in MLX_PRECISIONS:
        damage.swap_mlx_layers(mlx, f"mlx:{p}")
    results["mlx: layers 0 and 1 q_proj swapped"] = _rows(mlx)
    return results


def measure_tiny_mmproj(out: Path, work: Path) -> dict:
    import builders
    import damage
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    ckpt = builders.build_idefics3(work / "idefics3", seed=2)
    encoders = [ArtifactRequest("mmproj", p) for p in ("f32", "f16", "q8_0")]
    correct = export_checkpoint(ckpt, work / "correct", encoders, [ArtifactRequest("gguf", "f32")], max_tiles=4)
    results = {"correct": _rows(correct)}
    for label, do in {
        "mmproj: attention layers 0 and 1 swapped":
            lambda b, n: damage.swap_gguf_layers(b, n, ("attn_q.weight", "attn_k.weight", "attn_v.weight",
                                                        "attn_out.weight"), prefix="v.blk"),
        "mmproj: projector weight x1.02": lambda b, n: damage.scale_gguf_artifact(b, n, "mm.model.fc.weight", 1.02),
    }.items():
        bundle = shutil.copytree(correct, work / f"mm-{len(results)}")
        for p in ("f32", "f16", "q8_0"):
            do(bundle, f"mmproj:{p}")
        results[label] = _rows(bundle)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gates"))
    parser.add_argument("--tiny", action="store_true", help="the mmproj damage on the tiny Idefics3 model")
    parser.add_argument("--part", choices=("correct", "encoder", "decoder"), default="correct")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import datetime as dt
    import shlex

    from edgevlm.machine import cpu_flags, cpu_model, source_commit

    with tempfile.TemporaryDirectory() as work:
        if args.tiny:
            results, name = measure_tiny_mmproj(out, Path(work)), "tiny-mmproj.json"
        else:
            results, name = measure_reference(out, Path(work), args.part), f"reference-{args.part}.json"
    run = {"command": shlex.join(sys.argv), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": source_commit(), "cpu": cpu_model(), "cpu_flags": cpu_flags()}
    (out / name).write_text(json.dumps({"run": run, "results": results}, indent=1, default=float) + "\n")
    print(json.dumps({k: {a: r.get("status") for a, r in v["rows"].items()} for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
