"""Flash attention on a CPU, chosen by measuring it once. llama.cpp's CPU flash-attention kernel decodes faster than the
plain path on some CPUs and depths and slower on others (the plain path reads a transposed V whose rows are n_ctx
apart), so neither default is right everywhere: at first use a short decode with it on and off, on the model being
opened, picks the faster, and the choice is cached on disk keyed like the llama-cpp-python wheel (its version, the
build's instruction sets as the library reports them, the CPU's flags and architecture). One entry per KV shape and
context class, since the kernels' balance moves with head size and depth. `--flash-attn on|off` overrides it."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SCHEMA = "edgevlm-flash-attn/1"
MEASURE_ROUNDS = 3  # on/off alternated, so drift on a shared machine hits both
MEASURE_STEPS = 8  # decode steps per round and setting
MAX_DEPTH = 512  # deeper contexts are measured here: a 2B model prefills ~50 tok/s on 2 cores
measurements_run = 0  # how many measurements this process ran (tests: the cache is read back, not re-measured)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEVLM_CACHE_DIR") or Path.home() / ".cache" / "edgevlm") / "flash-attn"


def wheel_key(llama_cpp) -> tuple[str, dict]:
    """(key, what it hashes): the wheel's version, the instruction sets it was built with (llama_print_system_info),
    the CPU's flags and the architecture, as scripts/setup-venv.sh keys the wheel it builds."""
    from ...machine import cpu_flags

    system_info = llama_cpp.llama_print_system_info()
    parts = {"llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
             "build": system_info.decode(errors="replace").strip() if isinstance(system_info, bytes) else str(system_info),
             "cpu_flags": " ".join(cpu_flags()), "arch": platform.machine()}
    digest = hashlib.sha256("|".join(parts.values()).encode()).hexdigest()[:16]
    return digest, parts


def context_class(n_ctx: int) -> int:
    """Contexts of the same power of two (at least 256) share a choice."""
    return max(256, 1 << (max(int(n_ctx), 1) - 1).bit_length())


def entry_key(model, n_ctx: int) -> str:
    return f"head_dim={model.head_dim}|kv_heads={model.n_head_kv}|ctx={context_class(n_ctx)}"


def measure_depth(n_ctx: int) -> int:
    """Where the measurement decodes: a quarter of the context class (the middle of a typical job), at most MAX_DEPTH."""
    return max(min(context_class(n_ctx) // 4, MAX_DEPTH, int(n_ctx) - MEASURE_ROUNDS * MEASURE_STEPS - 1), 1)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and data.get("schema") == SCHEMA else {}


def cached_choice(llama_cpp, model, n_ctx: int) -> bool | None:
    key, _ = wheel_key(llama_cpp)
    entry = _read(cache_dir() / f"{key}.json").get("choices", {}).get(entry_key(model, n_ctx))
    return entry["flash_attn"] if isinstance(entry, dict) and isinstance(entry.get("flash_attn"), bool) else None


def choose_flash_attention(model, n_ctx: int, threads: int | None, n_batch: int) -> bool:
    """The cached choice for this wheel, CPU, KV shape and context class; measured and cached when there is none."""
    lib = model.lib
    cached = cached_choice(lib, model, n_ctx)
    if cached is not None:
        return cached
    key, parts = wheel_key(lib)
    path = cache_dir() / f"{key}.json"
    print(f"edgevlm: measuring llama.cpp flash attention on this CPU once (cached in {path})", file=sys.stderr)
    entry = measure(model, n_ctx, threads, n_batch)
    data = _read(path) or {"schema": SCHEMA, "key": parts, "choices": {}}
    data["choices"][entry_key(model, n_ctx)] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps(data, indent=1))
        os.replace(scratch, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as exc:  # a read-only home: the choice holds for this process only
        print(f"edgevlm: could not cache the flash-attention choice in {path}: {exc}", file=sys.stderr)
    return entry["flash_attn"]


def measure(model, n_ctx: int, threads: int | None, n_batch: int) -> dict:
    """Decode rate with flash attention on and off after the same prompt of measure_depth(n_ctx) tokens, each in its
    own context of n_ctx positions on the model's weights, rounds alternated; the faster wins (off on a tie)."""
    global measurements_run
    from .context import ContextSettings, LlamaContext

    depth = measure_depth(n_ctx)
    ids = ((np.arange(depth, dtype=np.int64) * 7919 + 13) % max(model.vocab_size, 1)).astype(np.int32)
    sequences = {}
    for flash in (True, False):
        context = LlamaContext(model, ContextSettings(int(n_ctx), int(n_batch), threads, False, flash))
        sequences[flash] = _prefilled(context, model, ids)
    steps: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(MEASURE_ROUNDS):  # each round decodes on from the last (no truncation: SWA caches forbid it)
        for flash in ((True, False) if round_ % 2 == 0 else (False, True)):
            seq = sequences[flash]
            for i in range(MEASURE_STEPS):
                start = time.perf_counter()
                seq.step(int(ids[i % len(ids)]), seq.n_past, False)
                steps[flash].append(time.perf_counter() - start)
    for seq in sequences.values():
        seq.context.close()
    model.contexts_opened -= len(sequences)  # the count is of the contexts the caller opened (tests of serve read it)
    measurements_run += 1
    on, off = (1.0 / statistics.median(steps[f]) for f in (True, False))
    return {"flash_attn": bool(on > off), "on_tok_s": on, "off_tok_s": off, "depth": depth, "n_ctx": int(n_ctx),
            "threads": threads, "model": str(model.path.name), "measured": dt.datetime.now(dt.timezone.utc)
            .isoformat(timespec="seconds")}


def _prefilled(context, model, ids: np.ndarray):
    from ...positions import text_positions
    from ..base import Segment

    seq = context.sequence(0)
    positions = text_positions("mrope" if model.mrope else "1d", 0, len(ids))
    for _ in seq.prefill_chunks([Segment(positions, token_ids=ids)]):
        pass
    return seq
