"""Run edgevlm's fuzzers (tests/fuzzers.py) with many cases each, on tiny models built here, and print the counts:
every case must work or end in edgevlm's own one-line error; a traceback is a defect. Takes a while: manifests and CLI
options load a bundle per case. The last line is JSON.

    .venv/bin/python benchmarks/fuzz.py --cases 10000 [--only images,manifests,bodies,cli]
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import builders  # noqa: E402
import fuzzers  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--only", default="images,manifests,bodies,cli")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    import edgevlm
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
    from edgevlm.families import load_checkpoint
    from edgevlm.serve import ChatService

    work = Path(tempfile.mkdtemp(prefix="edgevlm-fuzz-"))
    llava = builders.build_llava(work / "llava", "clip")
    idefics3 = builders.build_idefics3(work / "idefics3", seed=2)
    bundle = export_checkpoint(llava, work / "bundle", [ArtifactRequest("onnx", "fp32")], [ArtifactRequest("gguf", "q8_0")])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8))
    image.save(work / "image.png")
    png = io.BytesIO()
    image.save(png, "PNG")
    results = {}
    for name in args.only.split(","):
        start = time.perf_counter()
        if name == "images":
            specs = [load_checkpoint(p).preprocess for p in (llava, idefics3)]
            tally = fuzzers.fuzz_images(args.cases, args.seed, specs)
        elif name == "manifests":
            tally = fuzzers.fuzz_manifests(bundle, image, args.cases, args.seed)
        elif name == "bodies":
            session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:q8_0", threads=1, n_ctx=96)
            tally = fuzzers.fuzz_bodies(ChatService(session, "m"), png.getvalue(), args.cases, args.seed)
        elif name == "cli":
            tally = fuzzers.fuzz_cli(bundle, work / "image.png", args.cases, args.seed)
        else:
            raise SystemExit(f"unknown fuzzer {name!r}")
        results[name] = {**tally.counts, "seconds": round(time.perf_counter() - start, 1), "tracebacks": tally.tracebacks[:10]}
        print(f"{name}: {tally.counts} in {results[name]['seconds']} s", file=sys.stderr, flush=True)
    print(json.dumps({"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cases": args.cases,
                      "seed": args.seed, "machine": platform.processor() or platform.machine(), "results": results}))
    return 1 if any(r["traceback"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
