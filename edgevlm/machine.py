"""This machine: CPU model and instruction sets, memory, this process's RSS, copy bandwidth, and the WxH size parser.
A leaf: plan/, bench/, sweep/ and the benchmarks read the machine from here, and it imports nothing of edgevlm's but
its errors."""
from __future__ import annotations

import os
import platform
import resource
import time
from pathlib import Path

from .errors import BadInputError

# The instruction sets that decide which kernels llama.cpp and ONNX Runtime run (and so every speed figure)
REPORTED_CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni",
                      "avx512_bf16", "amx_tile", "amx_int8", "neon", "asimd", "asimddp", "sve")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine())


def cpu_flags() -> list[str]:
    """The CPU's instruction-set flags among REPORTED_CPU_FLAGS (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as handle:
            line = next((l for l in handle if l.startswith(("flags", "Features"))), "")
    except OSError:
        return []
    have = set(line.partition(":")[2].split())
    return [flag for flag in REPORTED_CPU_FLAGS if flag in have]


def source_commit() -> str | None:
    """The git commit of the edgevlm that measured (a dirty tree marked '+'), or None outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+" if dirty else "") if commit else None


def machine() -> dict:
    """What a results file records about the machine (and the code) it was measured on."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "commit": source_commit()}
    if Path("/proc/cpuinfo").exists():
        info["cpu"] = cpu_model()
        info["cpu_flags"] = cpu_flags()
    try:
        with open("/proc/meminfo") as handle:
            info["memory_gib"] = round(int(handle.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def peak_rss_mb() -> float:
    """This process's peak RSS. On Linux /proc's VmHWM: ru_maxrss also counts the parent's peak at fork time,
    which a child started by a large benchmark process inherits through exec."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    scale = 1024 if platform.system() != "Darwin" else 1
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def current_rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        return float("nan")


def measure_bandwidth_gbs(n_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written per second), best of a few runs."""
    import numpy as np

    source = np.ones(n_bytes // 8, dtype=np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = max(best, 2 * n_bytes / (time.perf_counter() - start) / 1e9)
    return best


def measure_read_bandwidth_gbs(threads: int = 1, n_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Read bandwidth in GB/s with `threads` threads, each reducing its own part of one buffer (numpy releases the
    GIL in the loop), best of a few runs: what a decode step does with the weights (it reads them, writes nothing),
    on as many cores as the decoder runs. The copy figure above counts a written byte as a read one and runs on one
    core, so a decoder on two cores can read faster than it says."""
    import numpy as np
    from concurrent.futures import ThreadPoolExecutor

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    buffer = np.ones(n_bytes // 8, dtype=np.uint64)  # written once: the pages are faulted in before timing
    parts = np.array_split(buffer, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, parts))
            best = max(best, buffer.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BadInputError(f"--image-size must look like 512x512, got {text!r}") from None
    if width < 1 or height < 1:
        raise BadInputError(f"--image-size must be positive, got {text!r}")
    return width, height
