"""benchmarks/plan_out_of_sample.py on the committed bench results: the runs named with --check are checked (W6,
SmolVLM2-2.2B shapes, among them) and the command it records re-runs the same check set. Standard library only."""
from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    if "plan_out_of_sample" not in sys.modules:
        spec = importlib.util.spec_from_file_location("plan_out_of_sample",
                                                      ROOT / "benchmarks" / "plan_out_of_sample.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["plan_out_of_sample"] = module
        spec.loader.exec_module(module)
    return sys.modules["plan_out_of_sample"]


def test_w6_is_checked_with_its_bytes_and_bandwidth(tmp_path):
    out = tmp_path / "oos.json"
    assert _script().main(["--check", "w3-q4", "w6-q4", "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["check"] == ["w3", "w2", "w3-q4", "w6-q4"]
    (row,) = [r for r in data["decode"] if r["workload"] == "w6-q4"]
    assert row["set"] == "check" and row["layers"] == 24 and row["class"] == "sub8bit"
    # read from W6's bench file (a re-run changes the numbers, not the arithmetic)
    bench = json.loads((ROOT / "benchmarks" / "results" / "w6-q4" / "bench.json").read_text())
    run = bench["runs"][0]
    per_token = run["roofline"]["weight_bytes"] + run["roofline"]["kv_bytes"]  # q4_k_m weights + f16 KV at depth
    assert run["roofline"]["weight_bytes"] == 1_054_042_112  # every tensor but the untied token_embd (56.8 MB)
    assert row["bytes_per_token"] == per_token
    assert row["decode_tok_s"] == run["metrics"]["decode_tok_s"]["median"]
    # the planner: 0.38 x the run's copy bandwidth / bytes per token
    assert row["planner_tok_s"] == pytest.approx(0.38 * bench["machine"]["bandwidth_gbs"] * 1e9 / per_token, rel=1e-12)
    assert row["planner_error"] == pytest.approx(row["planner_tok_s"] / row["decode_tok_s"] - 1, rel=1e-12)


def test_recorded_command_reruns_the_same_check_set(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    _script().main(["--check", "w3-q4", "w6-q4", "-o", str(first)])
    command = json.loads(first.read_text())["command"]
    argv = shlex.split(command)[2:]  # after "python benchmarks/plan_out_of_sample.py"
    _script().main(argv + ["-o", str(second)])
    assert json.loads(second.read_text())["check"] == json.loads(first.read_text())["check"]
