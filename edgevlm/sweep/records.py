"""The sweep's records: one JSON object per finished stage, appended to records.jsonl as each finishes (under a file
lock, flushed and fsynced), so an interrupted sweep keeps everything it finished. The latest record of a stage wins;
a truncated last line (a killed writer) is skipped."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

RECORDS = "records.jsonl"


def append(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"
    with open(folder / RECORDS, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read(folder: Path) -> list[dict]:
    """Every complete record, in the order written."""
    path = Path(folder) / RECORDS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written line from a killed process
        if isinstance(record, dict) and "key" in record:
            out.append(record)
    return out


def latest(folder: Path) -> dict[str, dict]:
    """stage key -> its latest record."""
    return {r["key"]: r for r in read(folder)}


def done_keys(folder: Path) -> set[str]:
    """Stages that succeeded: a re-run skips them (failed ones run again)."""
    return {key for key, r in latest(folder).items() if r.get("status") == "ok"}
