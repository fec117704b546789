"""The sweep's report, regenerated from its records: one row per (cell, device) with accuracy, TTFT, decode rate,
memory and the planner's prediction beside them (report.json, report.md, report.png)."""
from __future__ import annotations

import json
from pathlib import Path

from . import records as records_mod

COLUMNS = ("checkpoint", "encoder", "decoder", "device", "status", "accuracy", "ttft cold ms", "ttft warm ms",
           "decode tok/s", "encode ms/tile", "peak RSS MiB", "plan MiB", "plan tok/s", "node")
# the terminal's table: the columns a person compares (the markdown and JSON keep every one)
SHORT = ("encoder", "decoder", "device", "status", "accuracy", "ttft cold ms", "decode tok/s", "peak RSS MiB",
         "plan MiB", "plan tok/s")


def rows(records: list[dict]) -> list[dict]:
    """One row per bench (cell x device), with its eval's accuracy; failed or blocked stages show their error."""
    latest = {r["key"]: r for r in records}
    evals = {(r["bundle"], r["cell"]["encoder"], r["device"]): r for r in latest.values() if r["kind"] == "eval"}
    out = []
    for record in latest.values():
        if record["kind"] != "bench":
            continue
        cell = record["cell"]
        result = record.get("result") or {}
        metrics = result.get("metrics", {})
        plan = result.get("prediction") or {}
        evaluation = evals.get((record["bundle"], cell["encoder"], record["device"]))
        accuracy = ((evaluation or {}).get("result") or {}).get("accuracy")
        status = record["status"] if record["status"] == "ok" else f"{record['status']}: {record['error']}"
        out.append({
            "checkpoint": Path(cell["checkpoint"]).name, "encoder": cell["encoder"], "decoder": cell["decoder"],
            "device": record["device"], "bundle": record["bundle"], "status": status, "accuracy": accuracy,
            "ttft_cold_ms": metrics.get("ttft_cold_ms"), "ttft_warm_ms": metrics.get("ttft_warm_ms"),
            "decode_tok_s": metrics.get("decode_tok_s"), "encode_ms_per_tile": metrics.get("encode_ms_per_tile"),
            "peak_rss_mib": metrics.get("peak_rss_mb"), "plan_run_mib": plan.get("run_mib"),
            "plan_memory_mib": plan.get("memory_mib"),
            "plan_decode_tok_s": plan.get("decode_tok_s"), "plan_verdict": plan.get("verdict"),
            "node": (record.get("node") or {}).get("node_id"),
        })
    return sorted(out, key=lambda r: (r["device"], r["checkpoint"], r["decoder"], r["encoder"]))


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table_rows(report_rows: list[dict]) -> list[list[str]]:
    return [[r["checkpoint"], r["encoder"], r["decoder"], r["device"], r["status"], _cell(r["accuracy"], 3),
             _cell(r["ttft_cold_ms"]), _cell(r["ttft_warm_ms"]), _cell(r["decode_tok_s"]),
             _cell(r["encode_ms_per_tile"]), _cell(r["peak_rss_mib"], 0), _cell(r["plan_run_mib"], 0),
             _cell(r["plan_decode_tok_s"]), (r["node"] or "-")[:12]] for r in report_rows]


def short_rows(report_rows: list[dict]) -> list[list[str]]:
    keep = [COLUMNS.index(c) for c in SHORT]
    return [[row[i] for i in keep] for row in table_rows(report_rows)]


def markdown(report_rows: list[dict], summary: dict) -> str:
    lines = [f"# edgevlm sweep ({summary['date']})", "", f"Command: `{summary['command']}`  ",
             f"Executor: {summary['executor']}; CPU of the driver: {summary['cpu']}", "",
             "plan MiB is the planner's prediction of one run's memory (weights, activations, KV, buffers, runtime; "
             "no cache contents, no margin), to set beside the measured peak RSS.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report_rows)]
    return "\n".join(lines) + "\n"


def plot(report_rows: list[dict], path: Path) -> Path | None:
    """Per device: accuracy (or cold TTFT, without an eval) against decode tok/s and against cold TTFT; one marker per
    decoder quantization, one colour per encoder."""
    measured = [r for r in report_rows if r["decode_tok_s"] is not None]
    if not measured:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({r["device"] for r in measured})
    decoders = sorted({r["decoder"] for r in measured})
    encoders = sorted({r["encoder"] for r in measured})
    markers = "osD^v<>Pp*hX"
    with_accuracy = any(r["accuracy"] is not None for r in measured)
    fig, axes = plt.subplots(len(devices), 2, figsize=(11, 3.6 * len(devices)), squeeze=False)
    for row, device in enumerate(devices):
        for col, (x_key, x_label) in enumerate((("decode_tok_s", "decode tok/s"), ("ttft_cold_ms", "cold TTFT ms"))):
            ax = axes[row][col]
            for r in (r for r in measured if r["device"] == device):
                y = r["accuracy"] if with_accuracy else r["ttft_warm_ms"]
                if y is None or r[x_key] is None:
                    continue
                ax.scatter(r[x_key], y, marker=markers[decoders.index(r["decoder"]) % len(markers)],
                           color=f"C{encoders.index(r['encoder'])}", s=60,
                           label=f"{r['encoder']} + {r['decoder']}")
            ax.set_xlabel(x_label)
            ax.set_ylabel("task accuracy" if with_accuracy else "warm TTFT ms")
            ax.set_title(device)
            ax.grid(alpha=0.3)
            handles, labels = ax.get_legend_handles_labels()
            if handles:
                unique = dict(zip(labels, handles))
                ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write(folder: Path, summary: dict) -> dict[str, Path]:
    """report.json (rows + summary), report.md and report.png in the sweep folder, from its records."""
    report_rows = rows(records_mod.read(folder))
    files = {"json": folder / "report.json", "markdown": folder / "report.md"}
    files["json"].write_text(json.dumps({**summary, "rows": report_rows}, indent=2, default=str) + "\n")
    files["markdown"].write_text(markdown(report_rows, summary))
    png = plot(report_rows, folder / "report.png")
    if png:
        files["plot"] = png
    return files
