"""Serving side by side: llama.cpp's llama-server and `edgevlm serve`, one at a time on 127.0.0.1, with the same
decoder GGUF and edgevlm's mmproj (llama-server), the same threads, context and slots, driven by the official `openai`
client with streaming. llama-server runs with --kv-unified: its slots share one KV pool of n_ctx positions, as
edgevlm's do.

    .venv/bin/python benchmarks/serve_vs_llama_server.py BUNDLE [--bin DIR] [--threads 2] [--slots 4] [--n-ctx 4096]
        [--max-tokens 48] [--encoder onnx:int8] [--decoder gguf:q8_0] [--workloads a,b,c,d] [--scale 1] [--out DIR]

Workloads (each on a freshly started server, so its peak RSS is its own):
  a1/a4/a8  1, 4 and 8 clients, every request about a fresh image
  b         4 clients sharing 4 images
  c         users holding 3-turn conversations about their own image, 2 more users than slots (eviction); turn 1
            and turns 2-3 reported apart (a returning user's TTFT); the assistant turns sent back are one fixed
            sentence, so both servers get the same prompts
  d         a burst of 3 x slots requests at once (refusals counted: 429s)
  e         encodes beside a stream: one client streams text-only answers while another sends fresh images one after
            the other; the streaming client's inter-token gaps are reported apart (p50, p95, max): an encode that
            pauses the other slots' decode shows as a gap p95 far above the median
  f         returning users on idle slots (serve_returning.py): slots + 2 users take 3 turns one request at a time,
            every user's turn 1 before anyone's turn 2, so nothing queues and each return finds an idle slot holding
            another user's conversation; turn 1 is the image and ~300 tokens of notes; turn 1 and turns 2-3 TTFT
            p50/p95, the positions each server reused (its own timings) and edgevlm's conversation-cache hits
            (/metrics before and after)
Per server and workload: aggregate completion tok/s (completion tokens from the stream's usage / wall time), TTFT
p50/p95, inter-token gap p95 (between streamed chunks), peak RSS (VmHWM of the server process), failures, 429s.
--scale multiplies the request counts (0.25 for a short run). --edgevlm-args adds flags to `edgevlm serve` (e.g.
"--encode-threads 0" for encodes on the engine thread); its results are then keyed "edgevlm serve [flags]", so
--merge keeps runs with different flags side by side. Bounded: every request has a timeout, every workload a
deadline, and every server is killed by its own process id. Images are seeded noise at --image-size. Writes
report.json and report.md (command, date, commit, CPU, flags, both servers' versions) under --out."""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_returning.py beside this file
from serve_returning import render_returning, run_returning, scrape, summarize_returning  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Describe the image in detail."
FOLLOW_UPS = ("What colours are there?", "Anything else?")
# the assistant turns a conversation sends back: a fixed sentence, not the answer (a random-weight model's answer
# re-tokenizes into hundreds of tokens, and the two servers' prompts would differ)
ASSISTANT_TURN = "The image shows a few coloured shapes on a plain background."


@dataclass
class Outcome:
    """One request as the client saw it."""
    ok: bool
    status: str = "ok"  # ok | 429 | error: ...
    ttft_ms: float | None = None
    gaps_ms: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    text: str = ""
    label: str = ""
    sent: float = 0.0  # time.perf_counter() when the request went out
    stamps: list[float] = field(default_factory=list)  # perf_counter of each content chunk
    timings: dict | None = None  # the server's own timings from the stream's last chunk (both servers send them)


def image_url(seed: int, size: tuple[int, int]) -> str:
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """One server process on 127.0.0.1; `with` starts it (waits for /health) and always kills it."""

    def __init__(self, name: str, command: list[str], port: int, log: Path, start_timeout: float = 300):
        self.name, self.command, self.port, self.log, self.start_timeout = name, command, port, log, start_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.25)
        self.__exit__()
        raise RuntimeError(f"{self.name} not healthy within {self.start_timeout:.0f} s; see {self.log}")

    def peak_rss_mib(self) -> float | None:
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        found = re.search(r"VmHWM:\s+(\d+)", status)
        return int(found.group(1)) / 1024 if found else None

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # the one process this object started
        if self.process is not None:
            self.process.wait(timeout=30)


def stream_chat(client, messages: list[dict], max_tokens: int, label: str = "") -> Outcome:
    """One streamed chat request; TTFT = first chunk with content, gaps between content chunks."""
    import openai

    start = time.perf_counter()
    stamps, text, usage, timings = [], [], None, None
    try:
        stream = client.chat.completions.create(model="bundle", messages=messages, max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        for event in stream:
            if event.usage is not None:
                usage = event.usage
            timings = (event.model_extra or {}).get("timings") or timings
            for choice in event.choices:
                if choice.delta and choice.delta.content:
                    stamps.append(time.perf_counter())
                    text.append(choice.delta.content)
    except openai.RateLimitError:
        return Outcome(False, "429", label=label)
    except (openai.APIError, OSError) as exc:
        return Outcome(False, f"error: {type(exc).__name__}: {str(exc)[:200]}", label=label)
    if not stamps:
        return Outcome(False, "error: no content streamed", label=label)
    gaps = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    tokens = usage.completion_tokens if usage is not None else len(stamps)
    return Outcome(True, "ok", (stamps[0] - start) * 1e3, gaps, tokens, "".join(text), label, start, stamps, timings)


def user_turn(url: str, question: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": question}]}


@dataclass(frozen=True)
class Workload:
    name: str
    clients: int
    requests: int  # per client (conversations: turns)
    images: str  # fresh | shared | own | encode | returning
    what: str


def workloads(slots: int, scale: float) -> dict[str, Workload]:
    n = lambda count: max(1, round(count * scale))  # noqa: E731
    return {"a1": Workload("a1", 1, n(3), "fresh", "1 client, fresh images one at a time"),
            "a4": Workload("a4", 4, n(4), "fresh", "4 clients, fresh images"),
            "a8": Workload("a8", 8, n(2), "fresh", "8 clients, fresh images"),
            "b": Workload("b", 4, n(4), "shared", "4 clients sharing 4 images"),
            "c": Workload("c", slots + 2, 3, "own", f"{slots + 2} users x 3-turn conversations, {slots} slots"),
            "d": Workload("d", 3 * slots, 1, "shared", f"burst of {3 * slots} requests at once"),
            "e": Workload("e", 2, n(4), "encode", "1 client streaming text-only answers, 1 sending fresh images"),
            "f": Workload("f", slots + 2, 3, "returning", f"{slots + 2} users x 3 turns one request at a time on "
                          f"{slots} slots (each return on an idle slot holding another user's conversation)")}


def run_workload(port: int, work: Workload, max_tokens: int, size: tuple[int, int], seed: int, timeout: float,
                 deadline: float) -> tuple[list[Outcome], float]:
    """deadline (time.monotonic()): no request starts after it; those left are counted as failures."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=timeout)
    if work.images == "returning":
        start = time.perf_counter()
        outcomes = run_returning(
            work.clients, work.requests, deadline,
            ask=lambda messages, label: (Outcome(False, "error: workload deadline", label=label) if messages is None
                                         else stream_chat(client, messages, max_tokens, label=label)),
            first_turn=lambda index, text: user_turn(image_url(seed + 1000 + index, size), f"{text} {QUESTION}"),
            follow_ups=FOLLOW_UPS, assistant=ASSISTANT_TURN)
        return outcomes, time.perf_counter() - start
    shared = [image_url(seed + i, size) for i in range(4)] if work.images == "shared" else []
    barrier = threading.Barrier(work.clients)

    def one_client(index: int) -> list[Outcome]:
        out = []
        own = image_url(seed + 1000 + index, size) if work.images == "own" else None
        history: list[dict] = []
        barrier.wait()  # every client starts at once (the burst, the concurrent runs)
        for turn in range(work.requests):
            if time.monotonic() > deadline:
                out += [Outcome(False, "error: workload deadline", label=f"turn{t + 1}") for t in range(turn, work.requests)]
                break
            if work.images == "encode":  # client 0 streams text only; client 1 sends a fresh image each turn
                messages = ([{"role": "user", "content": QUESTION}] if index == 0
                            else [user_turn(image_url(seed + 100 * index + turn, size), QUESTION)])
            elif work.images == "fresh":
                messages = [user_turn(image_url(seed + 100 * index + turn, size), QUESTION)]
            elif work.images == "shared":
                messages = [user_turn(shared[(index + turn) % len(shared)], QUESTION)]
            else:  # a conversation: the image once, then follow-ups with the answers so far
                history.append(user_turn(own, QUESTION) if turn == 0
                               else {"role": "user", "content": FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]})
                messages = list(history)
            label = "stream" if work.images == "encode" and index == 0 else f"turn{turn + 1}"
            outcome = stream_chat(client, messages, max_tokens, label=label)
            out.append(outcome)
            if work.images == "own":
                if not outcome.ok:
                    break
                history.append({"role": "assistant", "content": ASSISTANT_TURN})
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(work.clients) as pool:
        results = [o for outcomes in pool.map(one_client, range(work.clients)) for o in outcomes]
    return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(outcomes: list[Outcome], wall: float, rss: float | None) -> dict:
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft_ms for o in ok]
    gaps = [g for o in ok for g in o.gaps_ms]
    out = {"requests": len(outcomes), "answered": len(ok), "failures": sum(o.status.startswith("error") for o in outcomes),
           "refused_429": sum(o.status == "429" for o in outcomes), "wall_s": round(wall, 2),
           "completion_tokens": sum(o.completion_tokens for o in ok),
           "aggregate_tok_s": round(sum(o.completion_tokens for o in ok) / wall, 2) if wall else None,
           "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95), "gap_p50_ms": pct(gaps, 50),
           "gap_p95_ms": pct(gaps, 95), "peak_rss_mib": rss,
           "errors": sorted({o.status for o in outcomes if o.status.startswith("error")})[:3]}
    streamed = [g for o in ok if o.label == "stream" for g in o.gaps_ms]
    if streamed:  # workload e: the streaming client's gaps while the other client's images are encoded
        out["stream_gap_p50_ms"], out["stream_gap_p95_ms"] = pct(streamed, 50), pct(streamed, 95)
        out["stream_gap_max_ms"] = max(streamed)
        # the gaps that overlap another request's wait for its first token (its image's encode and prefill)
        windows = [(o.sent, o.stamps[0]) for o in ok if o.label != "stream"]
        during = [(b - a) * 1e3 for o in ok if o.label == "stream" for a, b in zip(o.stamps, o.stamps[1:])
                  if any(a < hi and b > lo for lo, hi in windows)]
        out["stream_gaps_during_image"] = len(during)
        out["image_ttft_p50_ms"] = pct([o.ttft_ms for o in ok if o.label != "stream"], 50)
        out["stream_gap_during_p50_ms"], out["stream_gap_during_p95_ms"] = pct(during, 50), pct(during, 95)
    later = [o.ttft_ms for o in ok if o.label in ("turn2", "turn3")]
    if later:
        out["ttft_turn1_p50_ms"] = pct([o.ttft_ms for o in ok if o.label == "turn1"], 50)
        out["ttft_turns23_p50_ms"], out["ttft_turns23_p95_ms"] = pct(later, 50), pct(later, 95)
    return out


def commands(args, manifest, bundle: Path, port: int) -> dict[str, list[str]]:
    mmproj = manifest.find("encoder", args.mmproj)
    decoder = bundle / manifest.find("decoder", args.decoder).path
    bounds = (["--image-min-tokens", str(mmproj.details["image_min_tokens"]), "--image-max-tokens",
               str(mmproj.details["image_max_tokens"])] if "image_min_tokens" in mmproj.details else [])
    threads, slots, ctx = str(args.threads), str(args.slots), str(args.n_ctx)
    return {
        "llama-server": [str(Path(args.bin) / "llama-server"), "-m", str(decoder), "--mmproj", str(bundle / mmproj.path),
                         *bounds, "--threads", threads, "--threads-batch", threads, "--ctx-size", ctx, "--parallel",
                         # one KV pool of n_ctx positions shared by the slots, as edgevlm's (without it each slot
                         # gets n_ctx / slots, and a 3-turn conversation overflows its slot)
                         slots, "--kv-unified", "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
        "edgevlm serve": [sys.executable, "-m", "edgevlm", "serve", str(bundle), "--encoder", args.encoder, "--decoder",
                          args.decoder, "--threads", threads, "--n-ctx", ctx, "--parallel", slots, "--host",
                          "127.0.0.1", "--port", str(port), *shlex.split(args.edgevlm_args)]}


def render_md(report: dict) -> str:
    lines = ["# llama-server vs edgevlm serve", "", f"Command: `{report['command']}`", "",
             f"Date {report['date']} · commit {report['commit']} · CPU {report['cpu']} · flags "
             f"{' '.join(report['cpu_flags'])} · llama-server {report['versions']['llama-server']} · edgevlm "
             f"{report['versions']['edgevlm serve']}", "", f"Bundle {report['bundle']}: {report['setup']}", "",
             "| workload | server | requests | answered | 429 | failures | agg tok/s | TTFT p50 / p95 ms | gap p95 ms | "
             "turns 2-3 TTFT p50 ms | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, digits=0: "-" if v is None else f"{v:,.{digits}f}"  # noqa: E731
    for name, per_server in report["workloads"].items():
        for server, m in per_server.items():
            if server == "_run":
                continue
            if "error" in m:
                lines.append(f"| {name} | {server} | - | - | - | - | - | - | - | - | - ({m['error'][:80]}) |")
                continue
            lines.append(f"| {name} | {server} | {m['requests']} | {m['answered']} | {m['refused_429']} | "
                         f"{m['failures']} | {m['aggregate_tok_s']:.1f} | {fmt(m['ttft_p50_ms'])} / "
                         f"{fmt(m['ttft_p95_ms'])} | {fmt(m['gap_p95_ms'], 1)} | {fmt(m.get('ttft_turns23_p50_ms'))} | "
                         f"{fmt(m['peak_rss_mib'])} |")
    lines += render_returning([(name, server, m) for name, per_server in report["workloads"].items()
                                for server, m in per_server.items() if server != "_run" and "ttft_turn1_p95_ms" in m],
                               fmt)
    streams = [(name, server, m) for name, per_server in report["workloads"].items() for server, m in per_server.items()
               if server != "_run" and "stream_gap_p50_ms" in m]
    if streams:
        lines += ["", "The streaming client of workload e (gaps between its content chunks while the other client's "
                  "images are encoded; 'during': the gaps overlapping an image request's wait for its first token, "
                  "i.e. its encode and prefill):", "",
                  "| workload | server | stream gap p50 ms | p95 ms | max ms | gaps during | during p50 / p95 ms | "
                  "during p95 / overall p50 | image TTFT p50 ms |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {server} | {m['stream_gap_p50_ms']:.1f} | {m['stream_gap_p95_ms']:.1f} | "
                  f"{m['stream_gap_max_ms']:.1f} | {m['stream_gaps_during_image']} | {fmt(m['stream_gap_during_p50_ms'], 1)}"
                  f" / {fmt(m['stream_gap_during_p95_ms'], 1)} | "
                  f"{(m['stream_gap_during_p95_ms'] or 0) / m['stream_gap_p50_ms']:.2f}x | {fmt(m['image_ttft_p50_ms'])} |"
                  for name, server, m in streams]
    return "\n".join(lines + [""] + [f"- {w['name']}: {w['what']}" for w in report["workload_defs"]]) + "\n"


def write_report(args, bundle: Path, wanted: list[Workload], results: dict, out: Path) -> None:
    from edgevlm.machine import cpu_flags, cpu_model, source_commit

    version = subprocess.run([str(Path(args.bin) / "llama-server"), "--version"], capture_output=True, text=True)
    commands = dict.fromkeys([m["command"] for w in results.values() for k, m in w.items() if k != "_run"
                              and "command" in m] + [w["_run"]["command"] for w in results.values() if "_run" in w])
    report = {"command": " ; ".join(commands) or shlex.join(["python", *sys.argv]),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": source_commit(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
              "bundle": str(bundle), "versions": {
                  "llama-server": " ".join((version.stdout + version.stderr).split())[:120],
                  "edgevlm serve": source_commit()},
              "setup": f"{args.threads} threads, {args.slots} slots, n_ctx {args.n_ctx}, {args.max_tokens} new tokens, "
                       f"{args.image_size} images; llama-server: {args.decoder} + {args.mmproj}; edgevlm serve: "
                       f"{args.encoder} + {args.decoder}; scale {args.scale}",
              "workload_defs": [vars(w) for w in workloads(args.slots, args.scale).values() if w.name in results],
              "workloads": results}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(render_md(report))


def main() -> int:
    from edgevlm.machine import parse_size
    from edgevlm.manifest import Manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--bin", help="folder with llama-server (default: benchmarks/build_llama_bin.sh --print)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--encoder", default="onnx:int8", help="edgevlm serve's encoder")
    parser.add_argument("--decoder", default="gguf:q8_0", help="the GGUF both servers run")
    parser.add_argument("--mmproj", default="mmproj:f16", help="the mmproj llama-server runs")
    parser.add_argument("--image-size", default="512x512")
    parser.add_argument("--workloads", default="a1,a4,a8,b,c,d")
    parser.add_argument("--servers", default="llama-server,edgevlm serve")
    parser.add_argument("--edgevlm-args", default="", help="more flags for edgevlm serve (results keyed by them)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the request counts")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--workload-timeout", type=float, default=600, help="no request starts after this (s)")
    parser.add_argument("--out", default="benchmarks/results/serve-vs-llama-server")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other workloads of an earlier report in --out (each records its command)")
    parser.add_argument("--log-dir", default=str(Path(tempfile.gettempdir()) / "serve-vs-llama-server-logs"),
                        help="the servers' own logs (appended)")
    args = parser.parse_args()
    args.bin = args.bin or subprocess.run([str(ROOT / "benchmarks/build_llama_bin.sh"), "--print"], capture_output=True,
                                          text=True).stdout.strip()
    if not args.bin or not (Path(args.bin) / "llama-server").is_file():
        raise SystemExit("no llama-server: run benchmarks/build_llama_bin.sh (or pass --bin DIR)")
    bundle = Path(args.bundle).resolve()
    manifest = Manifest.load(bundle)
    size = parse_size(args.image_size)
    defs = workloads(args.slots, args.scale)
    wanted = [defs[name] for name in args.workloads.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(args.log_dir)
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    earlier = out / "report.json"
    if args.merge and earlier.is_file():
        results = json.loads(earlier.read_text())["workloads"]
    for index, work in enumerate(wanted):
        run = {"command": shlex.join(["python", *sys.argv]),
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        results[work.name] = {**(results.get(work.name, {}) if args.merge else {}), "_run": run}
        for name in args.servers.split(","):
            port = free_port()
            command = commands(args, manifest, bundle, port)[name]
            server_name = f"{name} [{args.edgevlm_args}]" if name == "edgevlm serve" and args.edgevlm_args else name
            try:
                with Server(server_name, command, port, logs / f"{server_name.replace(' ', '-')}.log") as server:
                    before = scrape(port)
                    outcomes, wall = run_workload(port, work, args.max_tokens, size, seed=10_000 * (index + 1),
                                                  timeout=args.request_timeout,
                                                  deadline=time.monotonic() + args.workload_timeout)
                    results[work.name][server_name] = summarize(outcomes, wall, server.peak_rss_mib())
                    if work.images == "returning":
                        results[work.name][server_name] |= summarize_returning(outcomes, before, scrape(port), pct)
            except RuntimeError as exc:
                results[work.name][server_name] = {"error": str(exc)}
            results[work.name][server_name]["command"] = run["command"]
            print(json.dumps({"workload": work.name, "server": server_name} | results[work.name][server_name]),
                  flush=True)
            write_report(args, bundle, wanted, results, out)  # after each run: a run cut short keeps what it measured
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
