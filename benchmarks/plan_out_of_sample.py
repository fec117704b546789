"""The planner's decode and memory predictions checked out of sample, from committed bench results only.

    python benchmarks/plan_out_of_sample.py [-o benchmarks/results/plan-out-of-sample/plan-oos.json]

Decode. The planner predicts tok/s = efficiency x copy bandwidth / bytes read per token (plan/budget.py), with one
efficiency for 8-bit-and-wider weights and one below, fitted on small models (SmolVLM-256M, the reference model). Here
every llama.cpp run of the committed bench files is predicted three ways: by the planner's constants as they are; by
the same form refitted on the FIT workloads only (median roofline fraction per precision class); and by a time model
fitted on FIT only, seconds per token = a x bytes / bandwidth + c x layers (a per-layer cost of launching the graph's
small operations, which small models show and large ones hide). Each is checked on the CHECK workloads, which no
constant here was fitted on: W3 (Qwen2-VL-2B shapes), W2 (the reference model) and whatever runs are named on the
command line.

Memory. Where a run recorded the planner's prediction beside it (`prediction.run_mib`, one request's peak), the error
of that against the measured peak RSS. The memory constants come from probes of W1's model and the reference model
(budget.py), so W1 is in sample and the others are not.

Standard library only; writes one results file with its command, date, commit and the inputs' provenance."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIT = ("w1", "w4", "bridges-onevision", "bridges-paligemma")
CHECK = ("w3", "w2")
WIDE = ("q8_0", "f16", "bf16", "f32")
PLANNER_EFFICIENCY = {"wide": 0.55, "sub8bit": 0.38}  # plan/budget.py DECODE_EFFICIENCY_MEASURED[_SUB8BIT]
# decoder layers of each workload's model (the bundles' manifest decoder.n_layers; W2: the reference model's config):
# the bench files do not record them
LAYERS = {"w1": 30, "w1-split": 30, "w3": 28, "w3-q4": 28, "w4": 34, "bridges-onevision": 24,
          "bridges-paligemma": 26, "w2": 3, "w6-q4": 24}


def precision_class(decoder: str) -> str:
    return "wide" if decoder.split(":")[-1] in WIDE else "sub8bit"


def runs_of(workload: str) -> list[dict]:
    """The llama.cpp runs of one results folder: bytes per token, copy bandwidth, measured decode and peak."""
    data = json.loads((RESULTS / workload / "bench.json").read_text())
    copy = data["machine"]["bandwidth_gbs"]
    out = []
    for run in data["runs"]:
        roofline = run.get("roofline")
        if run.get("kind") != "edgevlm" or not run.get("decoder", "").startswith("gguf") or not roofline:
            continue
        prediction = run.get("prediction") or {}
        out.append({"workload": workload, "date": data["date"], "commit": data["machine"].get("commit"),
                    "cpu": data["machine"].get("cpu"), "run": run["name"], "decoder": run["decoder"],
                    "class": precision_class(run["decoder"]), "copy_bandwidth_gbs": copy, "layers": LAYERS[workload],
                    "bytes_per_token": roofline["weight_bytes"] + roofline["kv_bytes"],
                    "decode_tok_s": run["metrics"]["decode_tok_s"]["median"],
                    "peak_rss_mib": run["metrics"]["peak_rss_mb"],
                    "planned_peak_mib": prediction.get("run_mib"), "planned_tok_s": prediction.get("decode_tok_s")})
    return out


def ceiling(row: dict) -> float:
    return row["copy_bandwidth_gbs"] * 1e9 / row["bytes_per_token"]


def fit_time_model(rows: list[dict]) -> tuple[float, float]:
    """Least squares (no intercept) of seconds per token = a x (bytes / bandwidth) + c x layers over the rows."""
    xs = [(1 / ceiling(r), float(r["layers"])) for r in rows]
    ys = [1 / r["decode_tok_s"] for r in rows]
    s11 = sum(x1 * x1 for x1, _ in xs)
    s12 = sum(x1 * x2 for x1, x2 in xs)
    s22 = sum(x2 * x2 for _, x2 in xs)
    t1 = sum(x1 * y for (x1, _), y in zip(xs, ys))
    t2 = sum(x2 * y for (_, x2), y in zip(xs, ys))
    det = s11 * s22 - s12 * s12
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


def error(predicted: float, measured: float) -> float:
    return predicted / measured - 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", nargs="*", default=[], help="more results folders to check (not fitted on)")
    parser.add_argument("-o", "--output", default=str(RESULTS / "plan-out-of-sample" / "plan-oos.json"))
    args = parser.parse_args(argv)
    check = CHECK + tuple(args.check)
    fit_rows = [r for w in FIT for r in runs_of(w)]
    check_rows = [r for w in check for r in runs_of(w)]
    refit = {c: statistics.median(r["decode_tok_s"] / ceiling(r) for r in fit_rows if r["class"] == c)
             for c in {r["class"] for r in fit_rows}}
    a, c = fit_time_model(fit_rows)
    decode = []
    for row in fit_rows + check_rows:
        measured = row["decode_tok_s"]
        planner = PLANNER_EFFICIENCY[row["class"]] * ceiling(row)
        refitted = refit[row["class"]] * ceiling(row)
        timed = 1 / (a / ceiling(row) + c * row["layers"])
        decode.append({**row, "set": "fit" if row in fit_rows else "check", "planner_tok_s": planner,
                       "planner_error": error(planner, measured), "refit_tok_s": refitted,
                       "refit_error": error(refitted, measured), "time_model_tok_s": timed,
                       "time_model_error": error(timed, measured)})
    memory = [{"workload": r["workload"], "run": r["run"], "measured_peak_mib": r["peak_rss_mib"],
               "planned_peak_mib": r["planned_peak_mib"], "error": error(r["planned_peak_mib"], r["peak_rss_mib"]),
               "in_sample": r["workload"].startswith("w1")}
              for r in fit_rows + check_rows if r["planned_peak_mib"]]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    # one --check naming them all: argparse keeps only the last of repeated ones, so the command would not re-run
    check_flag = f" --check {' '.join(args.check)}" if args.check else ""
    result = {"schema": "edgevlm-plan-oos/1", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/plan_out_of_sample.py" + check_flag,
              "commit": commit, "fit": list(FIT), "check": list(check),
              "planner_efficiency": PLANNER_EFFICIENCY, "refit_efficiency": refit,
              "time_model": {"a": a, "ms_per_layer": c * 1e3}, "decode": decode, "memory": memory}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for row in decode:
        print(f"{row['set']:5} {row['workload']:18} {row['decoder']:12} measured {row['decode_tok_s']:7.1f}  planner "
              f"{row['planner_error']:+.0%}  refit {row['refit_error']:+.0%}  time model {row['time_model_error']:+.0%}")
    for row in memory:
        print(f"memory {row['workload']:18} measured {row['measured_peak_mib']:7.0f} planned {row['planned_peak_mib']:7.0f}"
              f" {row['error']:+.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
