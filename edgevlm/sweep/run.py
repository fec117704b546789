"""The sweep driver: expand the spec, skip what earlier runs finished, run the rest through an executor, append each
record as it arrives and regenerate the report."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from . import records, report
from .matrix import expand
from .spec import SweepSpec
from ..machine import cpu_model
from .stages import STAGE_TIMEOUT_S


@dataclass
class SweepResult:
    folder: Path
    ran: list[dict]  # the records this run appended
    skipped: list[str]  # keys finished by an earlier run
    pending: list[str]  # keys that could not run (a device never joined)
    not_run: list[str]  # cells a device's target cannot run
    files: dict


def run_sweep(spec: SweepSpec, folder: Path, executor, store: Path | None = None, command: str = "edgevlm sweep",
              log: Callable[[str], None] = print, on_record: Callable[[dict], None] | None = None,
              on_start: Callable | None = None, on_plan: Callable[[int], None] | None = None,
              timeout_s: float = STAGE_TIMEOUT_S) -> SweepResult:
    """on_plan(n): the number of stages this run will try; on_start(stage) as each begins; on_record(record) as
    each ends (after it is appended to records.jsonl)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    expansion = expand(spec)
    done = records.done_keys(folder) & {s.key for s in expansion.stages}
    context = {"store": str(Path(store) if store else folder / "bundles"), "out": str(folder), "timeout_s": timeout_s,
               "threads": spec.bench.threads, "accuracy": spec.accuracy, "bench_args": spec.bench.bench_args(), "workload": asdict(spec.bench)}
    for line in expansion.not_run:
        log(f"not run: {line}")
    if done:
        log(f"{len(done)} of {len(expansion.stages)} stages already done (records in {folder}); running the rest")
    if on_plan:
        on_plan(len(expansion.stages) - len(done))
    ran: list[dict] = []

    def keep(record: dict) -> None:
        records.append(folder, record)
        ran.append(record)
        where = f" on {record['device']}" if record["device"] else ""
        outcome = "ok" if record["status"] == "ok" else f"{record['status']}: {record['error']}"
        log(f"{record['kind']} {record['cell']['encoder']} + {record['cell']['decoder']}{where} "
            f"({record['seconds']:.1f} s): {outcome}")
        if on_record:
            on_record(record)

    pending = executor.run(expansion.stages, context, done, keep, log, on_start)
    summary = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": command, "executor": executor.name,
               "cpu": cpu_model(), "stages": len(expansion.stages), "pending": pending, "not_run": expansion.not_run}
    files = report.write(folder, summary)
    return SweepResult(folder, ran, sorted(done), pending, expansion.not_run, files)
