"""Run edgevlm's fuzzers (tests/fuzzers.py, Hypothesis strategies in tests/strategies.py) with many cases each on tiny
models built here, and write one results file per fuzzer: every case must work or end in edgevlm's own one-line
error (a 4xx with one line for the server); a traceback, a 500 or a process that dies is a defect. Each fuzzer runs
in its own child process, so an abort inside llama.cpp is counted (with the case that caused it), not fatal.

    .venv/bin/python benchmarks/fuzz.py --cases 10000 --only gguf-decoder,gguf-mmproj [--out benchmarks/results/fuzz]
    .venv/bin/python benchmarks/fuzz.py --cases 10000 --only server

Fuzzers: gguf-decoder and gguf-mmproj (crafted GGUF headers through every reader: the header reader, the planner,
llama.cpp's and libmtmd's loaders behind edgevlm's checks), server (request bodies POSTed to `edgevlm serve` on
127.0.0.1), bodies (the same through the request path without a socket), images, manifests, cli."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
FUZZERS = ("gguf-decoder", "gguf-mmproj", "server", "bodies", "images", "manifests", "cli")
WHAT = {"gguf-decoder": "crafted decoder GGUF headers", "gguf-mmproj": "crafted mmproj GGUF files",
        "server": "structured request bodies over HTTP", "bodies": "request bodies through the request path",
        "images": "image files", "manifests": "manifest edits", "cli": "CLI options"}


def build(work: Path) -> None:
    """LLaVA-SigLIP (mmproj-capable) with onnx:fp32 + mmproj:f16 + gguf:q8_0, the crafted-file copy of it, a test
    image; LLaVA-CLIP and Idefics3 checkpoints for the images/manifests/cli fuzzers."""
    import builders
    import fuzzers
    import numpy as np
    from PIL import Image

    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    siglip = builders.build_llava(work / "llava-siglip", "siglip", seed=1)
    bundle = export_checkpoint(siglip, work / "bundle", [ArtifactRequest("onnx", "fp32"), ArtifactRequest("mmproj", "f16")],
                               [ArtifactRequest("gguf", "q8_0")], max_tiles=4)
    fuzzers.gguf_fuzz_bundle(bundle, work)
    builders.build_llava(work / "llava-clip", "clip")
    builders.build_idefics3(work / "idefics3", seed=2)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8)).save(work / "image.png")


def child(name: str, work: Path, cases: int, seed: int) -> dict:
    """One fuzzer in this process; its tally as a dict."""
    import fuzzers

    fuzzers.PROGRESS = work / f"{name}.progress"
    bundle, crafted = work / "bundle", work / "gguf-fuzz-bundle"
    png = (work / "image.png").read_bytes()
    if name == "gguf-decoder":
        return fuzzers.fuzz_ggufs(crafted, bundle / "decoder/q8_0.gguf", "decoder", cases, seed, strict=False).as_dict()
    if name == "gguf-mmproj":
        return fuzzers.fuzz_ggufs(crafted, bundle / "encoder/mmproj-f16.gguf", "mmproj", cases, seed, strict=False).as_dict()
    import edgevlm

    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:q8_0", threads=1, n_ctx=96)
    if name == "server":
        return _server(session, png, cases, seed)
    if name == "bodies":
        from edgevlm.serve import ChatService

        return fuzzers.fuzz_bodies(ChatService(session, "m"), png, cases, seed, strict=False).as_dict()
    from PIL import Image

    from edgevlm.families import load_checkpoint

    if name == "images":
        specs = [load_checkpoint(work / n).preprocess for n in ("llava-clip", "idefics3")]
        return fuzzers.fuzz_images(cases, seed, specs, strict=False).as_dict()
    if name == "manifests":
        return fuzzers.fuzz_manifests(bundle, Image.open(work / "image.png"), cases, seed, strict=False).as_dict()
    return fuzzers.fuzz_cli(bundle, work / "image.png", cases, seed, strict=False).as_dict()


def _server(session, png: bytes, cases: int, seed: int) -> dict:
    """The bodies POSTed to a server on 127.0.0.1 whose log (stderr) is kept: after them a valid request must still
    get its 200, and the log must hold no traceback."""
    import contextlib
    import io
    import threading
    import urllib.request

    import fuzzers
    from edgevlm.serve import ServerOptions, make_server

    server = make_server(session, "fuzz", port=0, options=ServerOptions())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base, log = f"http://127.0.0.1:{server.server_address[1]}", io.StringIO()
    try:
        with contextlib.redirect_stderr(log):
            result = fuzzers.fuzz_server(base, png, cases, seed, strict=False).as_dict()
            body = {"messages": [{"role": "user", "content": "Colour?"}], "max_tokens": 2}
            request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                result["serving_after"] = response.status
    finally:
        server.shutdown()
        server.server_close()
    lines = log.getvalue().splitlines()
    result["log_lines"], result["log_tracebacks"] = len(lines), sum("Traceback" in line for line in lines)
    return result


def run_child(name: str, work: Path, cases: int, seed: int) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", name, "--work", str(work), "--cases", str(cases),
                           "--seed", str(seed)], capture_output=True, text=True, cwd=ROOT)
    seconds = round(time.perf_counter() - start, 1)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return {**json.loads(lines[-1]), "seconds": seconds}
    progress = work / f"{name}.progress"
    return {"cases": None, "outcomes": {}, "seconds": seconds, "died": done.returncode,
            "last_case": progress.read_text() if progress.is_file() else None, "stderr_tail": done.stderr[-2000:]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--only", default="gguf-decoder,gguf-mmproj,server")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/fuzz"))
    parser.add_argument("--child", choices=FUZZERS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, Path(args.work), args.cases, args.seed)
        from edgevlm.machine import peak_rss_mb

        print(json.dumps({**result, "peak_rss_mib": round(peak_rss_mb())}))
        return 0
    names = args.only.split(",")
    unknown = [n for n in names if n not in FUZZERS]
    if unknown:
        raise SystemExit(f"unknown fuzzer(s) {unknown}; choose from {', '.join(FUZZERS)}")
    from edgevlm.machine import machine

    work = Path(tempfile.mkdtemp(prefix="edgevlm-fuzz-"))
    build(work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    failed = False
    for name in names:
        result = run_child(name, work, args.cases, args.seed)
        record = {"schema": "edgevlm-fuzz/1", "fuzzer": name, "what": WHAT[name], "command": shlex.join(
                      ["python", "benchmarks/fuzz.py", *sys.argv[1:]]),
                  "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": info.get("commit"),
                  "cpu": info.get("cpu"), "cpu_flags": info.get("cpu_flags"), "machine": info, "seed": args.seed,
                  "requested_cases": args.cases, **result}
        (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        bad = result.get("died") is not None or result["outcomes"].get("traceback", 0) or result.get("log_tracebacks")
        failed |= bool(bad)
        print(f"{name}: {result['cases']} cases, {result['outcomes']} in {result['seconds']} s"
              + (f"; DIED ({result['died']}) at {result['last_case']}" if result.get("died") is not None else ""),
              file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
