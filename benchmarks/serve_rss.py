"""`edgevlm serve --parallel N`'s peak RSS with one request answered, this code against an older checkout, in one run:
the server opens the decoder's llama.cpp context once with N sequences (before issue 28: a one-sequence context,
then an N-sequence one beside it, so two KV caches at the peak).

    .venv/bin/python benchmarks/serve_rss.py BUNDLE [--parallel 4] [--before DIR] [--runs 3] [--out DIR]

Each server is its own process on 127.0.0.1 (a free port), asked one question about one image, then stopped; its
peak RSS is /proc/PID/status VmHWM. Writes serve-rss.json (command, date, commit, CPU, flags)."""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path


def peak_rss(bundle: str, parallel: int, code: str | None, image_url: str) -> float:
    command = [sys.executable, "-m", "edgevlm", "serve", str(Path(bundle).resolve()), "--parallel", str(parallel),
               "--threads", "2", "--host", "127.0.0.1", "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=code)  # cwd: `-m` imports from it
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        log = []
        for line in process.stderr:
            log.append(line)
            if "/v1/chat/completions" in line:
                break
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", "".join(log))
        if not found:
            raise SystemExit("the server did not start: " + "".join(log)[-1000:])
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                          {"type": "text", "text": "What is it?"}]}], "max_tokens": 8}
        request = urllib.request.Request(f"http://127.0.0.1:{found.group(1)}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=240) as response:
            assert response.status == 200
        time.sleep(0.2)
        status = Path(f"/proc/{process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
    finally:
        watchdog.cancel()
        process.kill()
        process.wait()


def main() -> int:
    from edgevlm.bench.harness import bench_image
    from edgevlm.machine import cpu_flags, cpu_model, source_commit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--before", help="an older edgevlm checkout to measure beside this one")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/serve-rss")
    args = parser.parse_args()
    buffer = io.BytesIO()
    bench_image((512, 512)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    codes = {"this commit": None, **({"before": args.before} if args.before else {})}
    runs = {label: [] for label in codes}
    for _ in range(args.runs):  # alternated, so drift hits both alike
        for label, code in codes.items():
            runs[label].append(peak_rss(args.bundle, args.parallel, code, url))
    median = {label: statistics.median(values) for label, values in runs.items()}
    result = {"command": shlex.join(sys.argv), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "commit": source_commit(), "cpu": cpu_model(), "cpu_flags": cpu_flags(), "bundle": args.bundle,
              "parallel": args.parallel, "before": args.before, "peak_rss_mib": runs, "median_peak_rss_mib": median}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve-rss.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(median))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
