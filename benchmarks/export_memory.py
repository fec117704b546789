"""Peak RSS and wall time of each step of `edgevlm export` (one process, as the CLI runs it).

    .venv/bin/python benchmarks/export_memory.py CHECKPOINT -o OUT --encoder onnx:fp32,onnx:int8 \
        --decoder gguf:q8_0,gguf:q4_k_m,mlx:4bit [--json RESULT.json]

A sampler thread reads this process's RSS (psutil, children included: there are none today) every 20 ms; a step
runs from one exporter log line to the next ("loading", "decoder gguf:q8_0: writing ...", "encoder onnx:int8",
...). The whole run's peak is also the kernel's (getrusage ru_maxrss), which /usr/bin/time -v reports too. Nothing
else should run meanwhile."""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import threading
import time
from pathlib import Path


class Sampler(threading.Thread):
    def __init__(self, period: float = 0.02):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process()
        self.period = period
        self.peak = 0
        self.stop = threading.Event()

    def rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # noqa: BLE001 - a child that just exited
                pass
        return total

    def take_peak(self) -> int:
        peak, self.peak = self.peak, self.rss()
        return max(peak, self.peak)

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)


def main() -> int:
    from edgevlm.machine import cpu_flags, cpu_model, source_commit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--encoder", default="onnx:fp32,onnx:int8")
    parser.add_argument("--decoder", default="gguf:q8_0,gguf:q4_k_m")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()

    from edgevlm.export.exporter import DECODER_FORMATS, ENCODER_FORMATS, export_checkpoint, parse_requests

    checkpoint = Path(args.checkpoint)
    on_disk = sum(f.stat().st_size for f in checkpoint.resolve().iterdir() if f.is_file())
    steps: list[dict] = []
    sampler = Sampler()
    sampler.start()
    started = time.perf_counter()
    current = {"step": "start", "t0": started}

    def log(message: str) -> None:
        nonlocal current
        message = message.strip()
        if message.startswith(("loading", "decoder ", "encoder ")):
            now = time.perf_counter()
            steps.append({"step": current["step"], "seconds": now - current["t0"], "peak_rss_mib": sampler.take_peak() / 2**20})
            current = {"step": message, "t0": now}
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", file=sys.stderr, flush=True)

    if Path(args.output).exists():
        shutil.rmtree(args.output)
    export_checkpoint(checkpoint, args.output, parse_requests(args.encoder, ENCODER_FORMATS, "encoder"),
                      parse_requests(args.decoder, DECODER_FORMATS, "decoder"), progress=log)
    now = time.perf_counter()
    steps.append({"step": current["step"], "seconds": now - current["t0"], "peak_rss_mib": sampler.take_peak() / 2**20})
    sampler.stop.set()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_model(),
        "cpu_flags": cpu_flags(), "commit": source_commit(),
        "checkpoint_mib": on_disk / 2**20, "seconds": now - started, "peak_rss_mib": peak,
        "peak_over_checkpoint": peak / (on_disk / 2**20), "steps": steps[1:],
    }
    print(f"{'step':60s} {'s':>8s} {'peak RSS MiB':>13s}")
    for step in result["steps"]:
        print(f"{step['step'][:60]:60s} {step['seconds']:8.1f} {step['peak_rss_mib']:13.0f}")
    print(f"total {result['seconds']:.1f} s, peak RSS {peak:.0f} MiB = {result['peak_over_checkpoint']:.2f}x the "
          f"checkpoint on disk ({on_disk / 2**20:.0f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
