"""Reference-model task accuracy per encoder x decoder of one bundle (a results file docs/benchmarks.md renders).

    .venv/bin/python benchmarks/accuracy.py [BUNDLE] [-n 200]

Without BUNDLE, exports the cached reference model with every encoder and decoder precision first."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import edgevlm
from edgevlm.reference.evaluate import evaluate
from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
from edgevlm.reference.train import cache_root, ensure_reference
from edgevlm.manifest import Manifest

PAIRS = [("torch", "torch")] + [("onnx:fp32", d) for d in (
    "gguf:f32", "gguf:f16", "gguf:q8_0", "gguf:q6_k", "gguf:q5_k_m", "gguf:q4_k_m", "gguf:q4_0",
    "mlx:fp32", "mlx:fp16", "mlx:8bit", "mlx:4bit")] + [("onnx:fp16", "gguf:f32"), ("onnx:int8", "gguf:f32"),
                                                        ("onnx:int8", "gguf:q8_0"), ("onnx:int8", "gguf:q4_k_m")]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", nargs="?")
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("-o", "--output", default="benchmarks/results/accuracy")
    args = parser.parse_args()
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        reference = ensure_reference()
        bundle = cache_root() / "bench" / f"accuracy-{reference.name}"
        if not bundle.exists():
            decoders = [ArtifactRequest("gguf", p) for p in ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")]
            decoders += [ArtifactRequest("mlx", p) for p in ("fp32", "fp16", "8bit", "4bit")]
            encoders = [ArtifactRequest("onnx", p) for p in ("fp32", "fp16", "int8")]
            export_checkpoint(reference, bundle, encoders, decoders, max_tiles=4)
    manifest = Manifest.load(bundle)
    rows = []
    for encoder, decoder in PAIRS:
        if decoder != "torch" and decoder not in manifest.names("decoder"):
            continue
        report = evaluate(edgevlm.load(bundle, encoder=encoder, decoder=decoder, threads=2), n=args.n)
        artifact = None if decoder == "torch" else manifest.find("decoder", decoder)
        rows.append({"encoder": encoder, "decoder": decoder, "accuracy": report["accuracy"], "per_type": report["per_type"],
                     "decoder_mib": artifact.bytes / 2**20 if artifact else None,
                     "k_quant_fallback": (artifact.details.get("k_quant_fallback") if artifact else None)})
        print(f"{encoder:10} {decoder:12} {report['accuracy']:.3f}", file=sys.stderr)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "bundle": str(bundle), "n": args.n,
              "rows": rows}
    (out / "accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    types = list(rows[0]["per_type"])
    lines = [f"Command: `.venv/bin/python benchmarks/accuracy.py -n {args.n}`  ", f"Date: {result['date']}", "",
             "| encoder | decoder | decoder MiB | accuracy | " + " | ".join(types) + " |",
             "|---|---|---|---|" + "---|" * len(types)]
    for r in rows:
        size = f"{r['decoder_mib']:.1f}" if r["decoder_mib"] else "-"
        lines.append(f"| {r['encoder']} | {r['decoder']} | {size} | {r['accuracy']:.3f} | "
                     + " | ".join(f"{r['per_type'][t]:.2f}" for t in types) + " |")
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
