"""Load on `edgevlm serve` (in this process, on 127.0.0.1): memory over many sequential requests, and throughput and
latency with 1 and with N concurrent clients.

    .venv/bin/python benchmarks/serve_load.py BUNDLE [--requests 1000] [--clients 4] [--json RESULT.json]

Sequential: after a warm-up, `--requests` requests (alternately streamed), each about one of a few images; RSS
(this process: the server, its engine and the model) after the warm-up and at the end. Concurrent: the same
requests from 1 client, then from `--clients` clients at once: requests/s, generated tokens/s and median latency.
One sequence is decoded at a time (no --parallel batching yet), so N clients share one decode loop. Bounded in count
and time; nothing else should run meanwhile."""
from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> int:
    from edgevlm.bench.harness import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--concurrent-requests", type=int, default=200, help="requests in each concurrency run")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    if not (1 <= args.requests <= 100_000 and 1 <= args.clients <= 64 and 1 <= args.concurrent_requests <= 100_000):
        parser.error("--requests 1..100000, --clients 1..64, --concurrent-requests 1..100000")

    import numpy as np
    import psutil
    from PIL import Image

    import edgevlm
    from edgevlm.server import ServerOptions, make_server

    session = edgevlm.load(args.bundle, threads=args.threads)
    server = make_server(session, "bench", port=0, options=ServerOptions(capacity=max(8, 2 * args.clients)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    urls = []
    for seed in range(4):
        buffer = io.BytesIO()
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    questions = ["What colour is the circle?", "How many shapes are there?", "Describe the scene."]

    def ask(i: int) -> tuple[float, int]:
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[i % 4]}},
                                                          {"type": "text", "text": questions[i % 3]}]}],
                "max_tokens": args.max_tokens, "stream": i % 2 == 1, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        request = urllib.request.Request(base, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read().decode()
        if i % 2:
            usage = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith('data: {"id"')][-1]["usage"]
        else:
            usage = json.loads(raw)["usage"]
        return time.perf_counter() - start, usage["completion_tokens"]

    process = psutil.Process()
    for i in range(50):
        ask(i)
    rss_warm = process.memory_info().rss
    started = time.perf_counter()
    latencies = []
    for i in range(args.requests):
        latencies.append(ask(i)[0])
        if (i + 1) % 100 == 0:
            print(f"{i + 1}/{args.requests} sequential requests, RSS {process.memory_info().rss / 2**20:.1f} MiB",
                  file=sys.stderr)
    sequential = {"requests": args.requests, "seconds": time.perf_counter() - started,
                  "median_latency_ms": statistics.median(latencies) * 1e3,
                  "rss_after_warmup_mib": rss_warm / 2**20, "rss_end_mib": process.memory_info().rss / 2**20}
    sequential["rss_growth_mib"] = sequential["rss_end_mib"] - sequential["rss_after_warmup_mib"]

    concurrency = []
    for clients in (1, args.clients):
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(ask, range(args.concurrent_requests)))
        seconds = time.perf_counter() - started
        concurrency.append({"clients": clients, "requests": len(results), "seconds": seconds,
                            "requests_per_s": len(results) / seconds,
                            "generated_tok_s": sum(n for _, n in results) / seconds,
                            "median_latency_ms": statistics.median(t for t, _ in results) * 1e3})
    server.shutdown()
    server.server_close()
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
              "bundle": args.bundle, "encoder": session.encoder_name, "decoder": session.decoder_name,
              "max_tokens": args.max_tokens, "sequential": sequential, "concurrency": concurrency}
    print(f"sequential: {args.requests} requests in {sequential['seconds']:.1f} s, median {sequential['median_latency_ms']:.1f} ms, "
          f"RSS {sequential['rss_after_warmup_mib']:.1f} -> {sequential['rss_end_mib']:.1f} MiB "
          f"({sequential['rss_growth_mib']:+.1f})")
    for row in concurrency:
        print(f"{row['clients']} client(s): {row['requests_per_s']:.1f} req/s, {row['generated_tok_s']:.0f} tok/s, "
              f"median latency {row['median_latency_ms']:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
