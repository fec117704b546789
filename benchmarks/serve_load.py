"""Load on `edgevlm serve` (in this process, on 127.0.0.1): memory over many sequential requests, and throughput and
latency with 1 and with N concurrent clients, served one at a time and with --parallel N.

    .venv/bin/python benchmarks/serve_load.py BUNDLE [--requests 1000] [--clients 4] [--parallel 4] [--runs 3]
                                              [--json RESULT.json]

Sequential (skipped with --requests 0): after a warm-up, `--requests` requests (alternately streamed), each about one
of a few images; RSS (this process: the server, its engine and the model) after the warm-up and at the end.
Throughput: `--concurrent-requests` requests from 1 client and from `--clients` clients at once, on a server with
--parallel 1 and one with --parallel N: aggregate generated tokens/s (all answers' tokens / wall time), requests/s
and median latency, each the median of `--runs` runs after a warm-up that caches every image. Bounded in count and
time; nothing else should run meanwhile."""
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
    from edgevlm.machine import cpu_flags, cpu_model, source_commit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--concurrent-requests", type=int, default=200, help="requests in each concurrency run")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4, help="slots of the batched server (against --parallel 1)")
    parser.add_argument("--runs", type=int, default=3, help="throughput runs per configuration (median reported)")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    if not (0 <= args.requests <= 100_000 and 1 <= args.clients <= 64 and 1 <= args.concurrent_requests <= 100_000
            and 1 <= args.parallel <= 64 and 1 <= args.runs <= 20):
        parser.error("--requests 0..100000, --clients 1..64, --concurrent-requests 1..100000, --parallel 1..64, "
                     "--runs 1..20")

    import numpy as np
    import psutil
    from PIL import Image

    import edgevlm
    from edgevlm.serve import ServerOptions, make_server

    session = edgevlm.load(args.bundle, threads=args.threads)

    def serve(parallel: int):
        server = make_server(session, "bench", port=0,
                             options=ServerOptions(capacity=max(8, 2 * args.clients), parallel=parallel))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"

    server, base = serve(1)
    urls = []
    for seed in range(4):
        buffer = io.BytesIO()
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    questions = ["What colour is the circle?", "How many shapes are there?", "Describe the scene."]

    def ask(i: int, base: str = base) -> tuple[float, int]:
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
    sequential = None
    if args.requests:
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
    server.shutdown()
    server.server_close()

    def load(base: str, clients: int) -> dict:
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda i: ask(i, base), range(args.concurrent_requests)))
        seconds = time.perf_counter() - started
        return {"requests_per_s": len(results) / seconds, "generated_tok_s": sum(n for _, n in results) / seconds,
                "median_latency_ms": statistics.median(t for t, _ in results) * 1e3}

    concurrency = []
    for parallel in sorted({1, args.parallel}):
        server, base = serve(parallel)
        for i in range(12):  # every image x question once: embeddings and image prefixes cached, as in a warm server
            ask(i, base)
        for clients in (1, args.clients):
            runs = [load(base, clients) for _ in range(args.runs)]
            row = {"parallel": parallel, "clients": clients, "requests": args.concurrent_requests, "runs": runs}
            row.update({key: statistics.median(r[key] for r in runs) for key in runs[0]})
            concurrency.append(row)
            print(f"--parallel {parallel}, {clients} client(s): {row['requests_per_s']:.1f} req/s, "
                  f"{row['generated_tok_s']:.0f} tok/s, median latency {row['median_latency_ms']:.1f} ms", file=sys.stderr)
        server.shutdown()
        server.server_close()
    rate = {(r["parallel"], r["clients"]): r["generated_tok_s"] for r in concurrency}
    speedup = {"parallel_n_clients_n_vs_1_client": rate[(args.parallel, args.clients)] / rate[(args.parallel, 1)],
               "parallel_n_vs_parallel_1_at_n_clients": rate[(args.parallel, args.clients)] / rate[(1, args.clients)]}
    result = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
              "cpu_flags": cpu_flags(), "commit": source_commit(),
              "bundle": args.bundle, "encoder": session.encoder_name, "decoder": session.decoder_name,
              "max_tokens": args.max_tokens, "threads": args.threads, "sequential": sequential,
              "concurrency": concurrency, "speedup": speedup}
    if sequential:
        print(f"sequential: {args.requests} requests in {sequential['seconds']:.1f} s, median "
              f"{sequential['median_latency_ms']:.1f} ms, RSS {sequential['rss_after_warmup_mib']:.1f} -> "
              f"{sequential['rss_end_mib']:.1f} MiB ({sequential['rss_growth_mib']:+.1f})")
    for row in concurrency:
        print(f"--parallel {row['parallel']}, {row['clients']} client(s): {row['requests_per_s']:.1f} req/s, "
              f"{row['generated_tok_s']:.0f} tok/s, median latency {row['median_latency_ms']:.1f} ms")
    print(f"{args.clients} clients on --parallel {args.parallel}: {speedup['parallel_n_clients_n_vs_1_client']:.2f}x one "
          f"client, {speedup['parallel_n_vs_parallel_1_at_n_clients']:.2f}x --parallel 1")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
