"""Start-up as a user meets it: `edgevlm run` from process creation to the first streamed token, against the time
the run spent loading (fit check + bundle), encoding and prefilling; and llama.cpp's own CLI (llama-mtmd-cli with an
mmproj of the same model, or llama-cli on the same GGUF) from its process start to its first output, where built.

    .venv/bin/python benchmarks/startup.py BUNDLE [--encoder onnx:int8] [--decoder gguf:q8_0] [--runs 3]
        [--image-size 448x448] [--threads 2] [--mtmd-cli PATH --mmproj FILE] [--llama-cli PATH] [--out DIR]

Each run is a fresh process; the first run's artifacts are hashed unless stamped (an export stamps them), later
runs find them stamped. Medians over --runs after one warm-up run (the page cache warm, as on a device that ran the
model before). Writes startup.json and startup.md (command, date, commit, CPU model and flags) under --out."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def edgevlm_run(bundle: str, image: Path, args) -> dict:
    command = [sys.executable, "-m", "edgevlm", "run", str(Path(bundle).resolve()), "--image", str(image), "--prompt",
               "Describe the picture.", "--max-tokens", "4", "--threads", str(args.threads), "--json"]
    command += [flag for flag, value in (("--encoder", args.encoder), ("--decoder", args.decoder)) if value
                for flag in (flag, value)]
    env = {**os.environ, **({"PYTHONPATH": args.code} if args.code else {})}
    start = time.perf_counter()
    # the child starts in --code's folder: `python -m` puts the working folder first on sys.path
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=args.code)
    wall = (time.perf_counter() - start) * 1e3
    if done.returncode != 0:
        raise SystemExit(f"edgevlm run failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    timings = json.loads(done.stdout.strip().splitlines()[-1])["timings"]
    row = {"wall_ms": wall, **{key: timings.get(key) for key in ("process_start_to_first_token_ms", "load_ms",
                                                                  "preprocess_ms", "encode_ms", "prefill_ms")}}
    if row["load_ms"] is not None:  # an edgevlm older than this benchmark reports neither: its wall time only
        row["load_encode_prefill_ms"] = sum(row[k] for k in ("load_ms", "preprocess_ms", "encode_ms", "prefill_ms"))
        row["ratio"] = row["process_start_to_first_token_ms"] / row["load_encode_prefill_ms"]
    return row


def first_output_ms(command: list[str]) -> float:
    """Process start -> its first byte on stdout (llama.cpp's CLIs print the answer there, logs on stderr)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        if not process.stdout.read(1):
            raise SystemExit(f"{command[0]} printed nothing: {shlex.join(command)}")
        return (time.perf_counter() - start) * 1e3
    finally:
        process.kill()
        process.wait()


def main() -> int:
    from edgevlm.machine import cpu_flags, cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--encoder")
    parser.add_argument("--decoder")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--image-size", default="448x448")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mtmd-cli", help="llama-mtmd-cli binary (built from the vendored llama.cpp)")
    parser.add_argument("--mmproj", help="an mmproj GGUF of the same model, for --mtmd-cli")
    parser.add_argument("--llama-cli", help="llama-cli binary, where the family has no mmproj writer")
    parser.add_argument("--out", default="benchmarks/results/startup")
    parser.add_argument("--code", help="run the edgevlm checkout in this folder instead (e.g. an older commit's "
                        "worktree, for a before/after in one run)")
    parser.add_argument("--label", default="startup", help="results file name (startup.json / .md)")
    args = parser.parse_args()
    if not 1 <= args.runs <= 20:
        parser.error("--runs must be 1..20")
    from edgevlm.bench.harness import bench_image
    from edgevlm.machine import parse_size
    from edgevlm.manifest import Manifest

    manifest = Manifest.load(args.bundle)
    decoder = args.decoder or next(a.name for a in manifest.artifacts if a.format == "gguf")
    gguf = Path(args.bundle) / manifest.find("decoder", decoder).path
    with tempfile.TemporaryDirectory() as scratch:
        image = Path(scratch) / "image.png"
        bench_image(parse_size(args.image_size)).save(image)
        edgevlm_run(args.bundle, image, args)  # warm-up: page cache, hash stamps
        runs = [edgevlm_run(args.bundle, image, args) for _ in range(args.runs)]
        peers = {}
        prompt = "Describe the picture."
        if args.mtmd_cli and args.mmproj:
            peers["llama-mtmd-cli"] = [first_output_ms([args.mtmd_cli, "-m", str(gguf), "--mmproj", args.mmproj,
                                                        "--image", str(image), "-p", prompt, "-n", "4", "-t",
                                                        str(args.threads), "--temp", "0"])
                                       for _ in range(args.runs + 1)][1:]
        if args.llama_cli:
            peers["llama-cli"] = [first_output_ms([args.llama_cli, "-m", str(gguf), "-p", prompt, "-n", "4", "-t",
                                                   str(args.threads), "--temp", "0", "-no-cnv"])
                                  for _ in range(args.runs + 1)][1:]
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0] if runs[0][key] is not None}
    from edgevlm.machine import source_commit

    commit = source_commit()
    result = {"schema": "edgevlm-startup/1", "command": shlex.join(sys.argv), "date": dt.date.today().isoformat(),
              "commit": commit, "cpu": cpu_model(), "cpu_flags": cpu_flags(), "bundle": args.bundle,
              "decoder": decoder, "image_size": args.image_size, "threads": args.threads, "runs": runs,
              "median": median, "peers_first_output_ms": {k: statistics.median(v) for k, v in peers.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.label}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"`{result['command']}` — {result['date']}, commit {commit}, {result['cpu']} "
             f"({' '.join(result['cpu_flags'])}), {args.threads} threads, medians of {args.runs} runs after one",
             "", "| edgevlm run | ms |", "|---|---|"]
    lines += [f"| {key} | {value:,.0f} |" if key != "ratio" else f"| {key} | {value:.2f}x |"
              for key, value in median.items()]
    for name, value in result["peers_first_output_ms"].items():
        lines.append(f"| {name}: process start -> first output | {value:,.0f} |")
    (out / f"{args.label}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
