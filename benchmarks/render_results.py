"""Reading one committed results file for the docs: its JSON, the file an entry is dated by, its date to the minute,
a field wherever the file's layout put it, and the CPU flags that decide which kernels run. Used by render_docs.py
and render_headline.py; standard library only."""
from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = "benchmarks/results"
NOT_RECORDED = "not recorded in the results file"


def load(path: Path):
    return json.loads(path.read_text())


def data_file(root: Path, entry_path: str) -> Path:
    """The JSON file a results entry is dated and described by."""
    path = root / RESULTS / entry_path
    if path.is_file():
        return path
    for name in ("bench.json", "encoder.json", "report.json", "accuracy.json", "startup-w3.json", "gguf-decoder.json"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no bench.json, encoder.json, report.json or accuracy.json")


def minute(date: str) -> str:
    """'2026-12-01T11:18:16+00:00' and '2026-12-01 11:18' both -> '2026-12-01 11:18' (every file is UTC)."""
    return date.replace("T", " ")[:16]


def field(data: dict, *names: str):
    machine, run = data.get("machine") or {}, data.get("run") or {}  # run: {"run": {...}, "results": {...}} files
    for name in names:
        for place in (data, machine, run):
            if place.get(name):
                return place[name]
    return None


def cpu_flags(value) -> str:
    """The instruction-set flags that decide which kernels run, from a recorded flag list or string."""
    flags = value.split() if isinstance(value, str) else list(value)
    wanted = re.compile(r"^(sse4_2|f16c|fma|bmi2|avx.*|amx.*|neon|asimd.*|sve.*|dotprod|i8mm|bf16)$")
    return " ".join(f for f in flags if wanted.match(f)) or " ".join(flags)
