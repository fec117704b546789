"""One stage, run on whatever node the executor chose: the matching `edgevlm` command in a subprocess (its memory is
its own and freed when it ends; a crash is a failed record, not a dead worker), its JSON output kept in the record,
with the node, the times and, on devices, the device's fingerprint and the planner's prediction."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from ..machine import cpu_model
from .bundles import IDENTITY, is_exported, verified_bundle

STAGE_TIMEOUT_S = 6 * 3600


class StageFailed(RuntimeError):
    pass


def run_edgevlm(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`python -m edgevlm ARGS` in a subprocess; past `timeout` it is a StageFailed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        return subprocess.run([sys.executable, "-m", "edgevlm", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise StageFailed(f"edgevlm {args[0]} ran past {timeout:.0f} s") from None


def failure(done: subprocess.CompletedProcess) -> StageFailed:
    """What went wrong, in the command's own words: its last stderr line."""
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    return StageFailed(errors[-1] if errors else f"exit status {done.returncode}")


def edgevlm_command(args: list[str], timeout: float) -> dict | list:
    """Run `python -m edgevlm ARGS`; the last stdout line is its JSON. A failure raises with stderr's last line."""
    done = run_edgevlm(args, timeout)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0:
        if done.returncode == 1 and lines:  # verify reports a FAIL row with exit 1 and its JSON
            try:
                return {"exit_status": 1, **json.loads(lines[-1])}
            except json.JSONDecodeError:
                pass
        raise failure(done)
    if not lines:
        raise StageFailed(f"edgevlm {args[0]} printed nothing")
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        try:
            return json.loads(done.stdout)  # print_json writes one indented document
        except json.JSONDecodeError:
            raise StageFailed(f"edgevlm {args[0]} did not end with JSON: {lines[-1][:200]}") from None


_FINGERPRINT: dict = {}


def fingerprint(timeout: float) -> dict:
    """What this node is, once per process: `edgevlm targets`, memory, CPU, and the power mode where there is one."""
    if not _FINGERPRINT:
        import psutil

        found = edgevlm_command(["targets", "--json"], timeout)
        machine = found.get("machine", {}) if isinstance(found, dict) else {}
        _FINGERPRINT.update({
            "hostname": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(),
            "memory_total_mib": round(psutil.virtual_memory().total / 2**20),
            "targets": {k: v for k, v in machine.items() if k != "llama_cpp_system_info"},
            "available_targets": [t["name"] for t in found.get("targets", []) if t.get("available")],
            "power_mode": _power_mode(),
        })
    import psutil

    return {**_FINGERPRINT, "memory_available_mib": round(psutil.virtual_memory().available / 2**20)}


def _power_mode() -> str | None:
    """Jetson's nvpmodel mode (benchmarks depend on it); None elsewhere."""
    if not shutil.which("nvpmodel"):
        return None
    try:
        out = subprocess.run(["nvpmodel", "-q"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return " ".join(out.split())[:200] or None


def device_bundle(stage: dict, context: dict) -> Path:
    """The bundle as the device uses it: the store's copy (checked against its sha256s), or for a TensorRT cell the
    device's own linked copy, where build-engine writes the engine (engines are per device)."""
    store = Path(context["store"])
    shared = verified_bundle(store, stage["bundle"])
    if not stage["cell"]["encoder"].startswith("tensorrt:"):
        return shared
    local = Path(context["out"]) / "devices" / stage["device"]["id"] / stage["bundle"]
    if not local.exists():
        partial = local.with_name(f".{local.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(shared, partial, copy_function=_link_or_copy)
        partial.rename(local)
    return local


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_export(stage: dict, context: dict) -> dict:
    store = Path(context["store"])
    final = store / stage["bundle"]
    if is_exported(store, stage["bundle"]):
        return {"cached": True, "bundle_path": str(final)}
    store.mkdir(parents=True, exist_ok=True)
    partial = store / f".{stage['bundle']}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    cell = stage["cell"]
    try:
        artifacts = edgevlm_command(["export", cell["checkpoint"], "-o", str(partial), "--encoder", cell["encoder"],
                                     "--decoder", cell["decoder"], "--max-tiles", str(cell["identity"]["max_tiles"]),
                                     "--json"], context["timeout_s"])
        (partial / IDENTITY).write_text(json.dumps(cell["identity"], indent=2, sort_keys=True) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # a bundle without its identity file is a leftover
        partial.rename(final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return {"cached": False, "bundle_path": str(final), "artifacts": artifacts}


def run_verify(stage: dict, context: dict) -> dict:
    bundle = verified_bundle(Path(context["store"]), stage["bundle"])
    # --allow-skips: a row verify could not check here (a backend absent on the build host, a trained-only gate on a
    # random-weight preset) does not fail the cell; the record keeps the list
    result = edgevlm_command(["verify", str(bundle), "--json", "--allow-skips", "--threads", str(context["threads"])],
                             context["timeout_s"])
    if result.get("status") not in ("pass", "pass with skips"):
        failed = [r["artifact"] for r in result.get("rows", []) if r.get("status") == "FAIL"]
        raise StageFailed(f"verify failed for {', '.join(failed) or 'the bundle'}")
    return {"status": result["status"], "rows": result["rows"], "not_checked": result.get("not_checked", [])}


def run_build_engine(stage: dict, context: dict) -> dict:
    bundle = device_bundle(stage, context)
    precision = stage["cell"]["encoder"].split(":", 1)[1]
    done = run_edgevlm(["build-engine", str(bundle), "--precision", precision], context["timeout_s"])
    if done.returncode != 0:
        raise failure(done)
    return {"bundle_path": str(bundle), "output": done.stdout.strip()[-500:]}


def run_eval(stage: dict, context: dict) -> dict:
    bundle = device_bundle(stage, context)
    cell = stage["cell"]
    result = edgevlm_command(["eval", str(bundle), "--n", str(context["accuracy"]), "--encoder", cell["encoder"],
                              "--decoder", cell["decoder"], "--threads", str(context["threads"]), "--json"],
                             context["timeout_s"])
    return {"accuracy": result["accuracy"], "n": result["n"], "per_type": result.get("per_type")}


def run_bench(stage: dict, context: dict) -> dict:
    bundle = device_bundle(stage, context)
    cell = stage["cell"]
    result = edgevlm_command(["bench", str(bundle), "--encoder", cell["encoder"], "--decoder", cell["decoder"],
                              "--peers", "", *context["bench_args"]], context["timeout_s"])
    runs = [r for r in result.get("runs", []) if r.get("kind") != "reference"]
    if not runs:
        raise StageFailed(f"bench ran no {cell['encoder']} + {cell['decoder']} pair")
    metrics = runs[0]["metrics"]
    median = {k: (v["median"] if isinstance(v, dict) and "median" in v else v) for k, v in metrics.items()
              if isinstance(v, (int, float)) or (isinstance(v, dict) and "median" in v)}
    return {"run": runs[0]["name"], "metrics": median, "date": result.get("date"),
            "prediction": prediction(bundle, stage, context["workload"])}


def prediction(bundle: Path, stage: dict, workload: dict) -> dict | None:
    """The planner's memory, verdict, decode tok/s and TTFT for this pair on this device, for the bench's own
    workload (image size, prompt and new tokens) (None if it cannot say; plan.bundle.predict_pair)."""
    from ..errors import EdgeVLMError
    from ..plan.bundle import PlanRequest, parse_image_size, predict_pair
    from ..plan.devices import THIS_MACHINE, get_device

    try:
        device = get_device(stage["device"].get("plan_device") or THIS_MACHINE)
        request = PlanRequest(image_size=parse_image_size(workload["image_size"]),
                              prompt_tokens=workload["prompt_tokens"], new_tokens=workload["new_tokens"])
        return predict_pair(bundle, stage["cell"]["encoder"], stage["cell"]["decoder"], device, request)
    except (EdgeVLMError, OSError, ValueError) as exc:
        return {"error": str(exc)}


RUNNERS = {"export": run_export, "verify": run_verify, "build-engine": run_build_engine, "eval": run_eval,
           "bench": run_bench}


def record_of(stage: dict, started: float, node: dict | None) -> dict:
    """The fields every record of `stage` (Stage.to_dict()) starts with."""
    return {"key": stage["key"], "kind": stage["kind"], "bundle": stage["bundle"],
            "cell": {k: stage["cell"][k] for k in ("checkpoint", "encoder", "decoder")},
            "device": stage["device"]["id"] if stage["device"] else None, "node": node, "started": started}


def unrun_record(stage: dict, started: float, status: str, error: str) -> dict:
    """The record of a stage that did not run to its end here: blocked by a failed need, or its node lost."""
    now = time.time()
    return {**record_of(stage, started, None), "ended": now, "seconds": round(now - started, 3), "status": status,
            "error": error[:2000]}


def run_stage(stage: dict, context: dict, node: dict) -> dict:
    """Run one stage and return its record (a failure is a record with its error, never an exception)."""
    started = time.time()
    record = record_of(stage, started, node)
    try:
        if stage["device"]:
            record["fingerprint"] = fingerprint(context["timeout_s"])
        record["result"] = RUNNERS[stage["kind"]](stage, context)
        record["status"], record["error"] = "ok", None
    except Exception as exc:  # noqa: BLE001 - recorded with its message; the sweep goes on with the rest
        record["status"], record["error"] = "failed", f"{type(exc).__name__}: {exc}"[:2000]
    record["ended"] = time.time()
    record["seconds"] = round(record["ended"] - started, 3)
    return record
