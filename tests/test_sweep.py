"""edgevlm sweep: spec validation, the stage matrix, and real sweeps of the reference model (gguf:q8_0,q4_0 x
onnx:fp32,int8 x two "devices" that are both this machine) with the local executor and on a real multi-node Ray
cluster started here (ray.cluster_utils.Cluster: a builder head and one worker node per device, labelled as
`edgevlm agent` labels them); a device that never joins, a node killed mid-sweep, and a re-run that completes only
what is missing."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from edgevlm.errors import BadInputError
from edgevlm.sweep import records
from edgevlm.sweep.executors import (BENCH_RESOURCE, BUILDER_RESOURCE, LABEL_DEVICE, LABEL_ROLE, LABEL_TARGET,
                                     LocalExecutor, RayExecutor, device_resource)
from edgevlm.sweep.matrix import expand
from edgevlm.sweep.run import run_sweep
from edgevlm.sweep.spec import SweepDevice, SweepSpec, Workload, parse_device, read_spec

ENCODERS = ("onnx:fp32", "onnx:int8")
DECODERS = ("gguf:q8_0", "gguf:q4_0")
WORKLOAD = Workload(repeats=1, new_tokens=8, prompt_tokens=16, threads=2)
ACCURACY_N = 20


@pytest.fixture(scope="module")
def reference() -> Path:
    from edgevlm.reference.train import DEFAULT_RECIPE, ensure_reference

    return ensure_reference(DEFAULT_RECIPE)


def tiny_spec(reference: Path, devices=("dev-a", "dev-b"), encoders=ENCODERS, decoders=DECODERS, accuracy=ACCURACY_N):
    return SweepSpec((str(reference),), tuple(encoders), tuple(decoders), tuple(SweepDevice(d, "cpu") for d in devices),
                     accuracy, WORKLOAD, max_tiles=4)


def overlapping(intervals: list[tuple[float, float]]) -> list:
    intervals = sorted(intervals)
    return [(a, b) for a, b in zip(intervals, intervals[1:]) if b[0] < a[1]]


# --- spec and matrix -------------------------------------------------------------------------------------------------


def test_spec_refuses_bad_entries_with_the_valid_choices(reference, tmp_path):
    good = dict(checkpoints=[str(reference)], encoders=["onnx:int8"], decoders=["gguf:q8_0"], devices=["a=cpu"])
    assert SweepSpec.from_dict(good).devices == (SweepDevice("a", "cpu"),)
    cases = {
        "encoders": (["onnx:int4"], "unknown encoder 'onnx:int4'; choose from onnx:fp32"),
        "decoders": (["gguf:q3"], "decoder gguf has no precision 'q3'; choose from"),
        "devices": (["a=tpu"], "unknown target 'tpu'; choose from cpu, cuda"),
        "checkpoints": (["/nonexistent"], "checkpoint /nonexistent has no config.json"),
    }
    for key, (value, message) in cases.items():
        with pytest.raises(BadInputError, match=message.replace("(", r"\(")):
            SweepSpec.from_dict({**good, key: value})
    with pytest.raises(BadInputError, match="unknown sweep spec keys \\['quant'\\]"):
        SweepSpec.from_dict({**good, "quant": 1})
    with pytest.raises(BadInputError, match="device ids must be unique"):
        SweepSpec.from_dict({**good, "devices": ["a=cpu", "a=cuda"]})
    with pytest.raises(BadInputError, match="bench repeats must be an integer in 1..100"):
        SweepSpec.from_dict({**good, "bench": {"repeats": 0}})
    with pytest.raises(BadInputError, match="is not in the device table; write it as nano=TARGET"):
        parse_device("nano")
    published = parse_device("jetson-orin-nano-super-8gb")
    assert (published.target, published.plan_device) == ("jetson-orin", "jetson-orin-nano-super-8gb")
    # a YAML file, relative checkpoint paths taken from its folder
    (tmp_path / "ckpt").symlink_to(reference)
    (tmp_path / "sweep.yaml").write_text("checkpoints: [ckpt]\nencoders: onnx:fp32,onnx:int8\ndecoders: [gguf:q8_0]\n"
                                         "devices: [{id: a, target: cpu}, b=cpu]\naccuracy: 5\nbench: {repeats: 2}\n")
    spec = read_spec(tmp_path / "sweep.yaml")
    assert spec.checkpoints == (str(tmp_path / "ckpt"),) and spec.encoders == ENCODERS and spec.bench.repeats == 2
    (tmp_path / "bad.yaml").write_text("checkpoints: [ckpt\n")
    with pytest.raises(BadInputError, match="sweep spec .*bad.yaml does not parse"):
        read_spec(tmp_path / "bad.yaml")


def test_matrix_stages_placement_and_dependencies(reference):
    expansion = expand(tiny_spec(reference))
    kinds = [s.kind for s in expansion.stages]
    # 4 bundles (export + verify each); per bundle and device one eval and one bench
    assert {k: kinds.count(k) for k in set(kinds)} == {"export": 4, "verify": 4, "eval": 8, "bench": 8}
    assert len({s.key for s in expansion.stages}) == len(expansion.stages)
    assert len({s.bundle for s in expansion.stages}) == 4
    by_key = {s.key: s for s in expansion.stages}
    for stage in expansion.stages:
        assert stage.exclusive == (stage.kind in ("eval", "bench"))
        for need in stage.after:
            assert by_key[need].kind == "export" and by_key[need].bundle == stage.bundle
    # a TensorRT cell shares the fp32 ONNX bundle and builds its engine on the device first; MLX is not run on CUDA
    mixed = SweepSpec((str(reference),), ("onnx:fp32", "tensorrt:fp16"), ("gguf:q8_0", "mlx:4bit"),
                      (SweepDevice("gpu", "cuda"),), 0, WORKLOAD)
    stages = expand(mixed).stages
    gguf_bundles = {s.bundle for s in stages if s.cell["decoder"] == "gguf:q8_0"}
    assert len(gguf_bundles) == 1  # onnx:fp32 and tensorrt:fp16 export the same bundle
    engine = [s for s in stages if s.kind == "build-engine"]
    assert len(engine) == 1 and engine[0].device_id == "gpu" and engine[0].cell["encoder"] == "tensorrt:fp16"
    trt_bench = [s for s in stages if s.kind == "bench" and s.cell["encoder"] == "tensorrt:fp16"]
    assert trt_bench[0].after == (engine[0].key,)
    assert sorted(expand(mixed).not_run) == [
        f"{reference.name} onnx:fp32 + mlx:4bit on gpu: target cuda does not run decoder mlx:4bit",
        f"{reference.name} tensorrt:fp16 + mlx:4bit on gpu: target cuda does not run decoder mlx:4bit"]


# --- real sweeps -----------------------------------------------------------------------------------------------------


def check_records(folder: Path, spec: SweepSpec, device_label_key: str | None) -> dict[str, dict]:
    latest = records.latest(folder)
    expected = {s.key for s in expand(spec).stages}
    assert set(latest) == expected
    failed = {k: r["error"] for k, r in latest.items() if r["status"] != "ok"}
    assert not failed
    for device in ("dev-a", "dev-b"):
        device_stages = [(r["started"], r["ended"]) for r in latest.values() if r["device"] == device]
        assert len(device_stages) == 8  # 4 cells x (eval + bench)
        assert not overlapping(device_stages), f"stages on {device} overlapped in time"
    for record in latest.values():
        labels = record["node"]["labels"]
        if record["device"]:
            assert labels[device_label_key] == record["device"]  # ran on the device's own node
            assert record["fingerprint"]["cores"] >= 1 and record["fingerprint"]["memory_total_mib"] > 0
        else:
            assert labels[LABEL_ROLE] == "builder"
    for record in latest.values():
        if record["kind"] == "eval":
            # the reference model answers most questions after any of these quantizations (DESIGN: accuracy ladder)
            assert record["result"]["n"] == ACCURACY_N and record["result"]["accuracy"] >= 0.8
        if record["kind"] == "bench":
            metrics = record["result"]["metrics"]
            assert metrics["decode_tok_s"] > 0 and metrics["ttft_cold_ms"] > 0 and metrics["n_new_tokens"] == 8
            assert record["result"]["prediction"]["run_mib"] > 0
            # the planner is asked about the bench's own workload, not its default (the largest image)
            assert record["result"]["prediction"]["image_size"] == WORKLOAD.image_size
        if record["kind"] == "verify":
            assert record["result"]["status"] == "pass"
    return latest


def test_local_sweep_runs_the_matrix_records_it_and_skips_it_on_rerun(reference, tmp_path):
    spec = tiny_spec(reference)
    logs: list[str] = []
    result = run_sweep(spec, tmp_path / "local", LocalExecutor(jobs=2), log=logs.append)
    latest = check_records(tmp_path / "local", spec, LABEL_DEVICE)
    assert result.pending == [] and len(result.ran) == 24
    # nothing else runs during a device stage here (every device is this machine)
    device_intervals = [(r["started"], r["ended"]) for r in latest.values() if r["device"]]
    for record in latest.values():
        if not record["device"]:
            assert not overlapping(device_intervals + [(record["started"], record["ended"])])
    report = json.loads((tmp_path / "local" / "report.json").read_text())
    assert len(report["rows"]) == 8 and all(r["status"] == "ok" and r["accuracy"] >= 0.8 for r in report["rows"])
    assert (tmp_path / "local" / "report.png").stat().st_size > 10_000
    assert "| onnx:int8 | gguf:q4_0 | dev-a | ok |" in (tmp_path / "local" / "report.md").read_text()
    # idempotent: a re-run runs nothing and keeps the records
    again = run_sweep(spec, tmp_path / "local", LocalExecutor(), log=logs.append)
    assert again.ran == [] and len(again.skipped) == 24
    assert records.latest(tmp_path / "local") == latest


def test_local_sweep_records_a_failed_stage_and_blocks_what_needs_it(reference, tmp_path):
    spec = tiny_spec(reference, devices=("dev-a",), encoders=("onnx:fp32",), decoders=("gguf:q8_0",), accuracy=0)
    store = tmp_path / "store"
    store.mkdir()
    export_key = next(s.key for s in expand(spec).stages if s.kind == "export")
    bundle = export_key.split(":")[1]
    (store / bundle).write_text("not a folder")  # the export cannot put its bundle here
    result = run_sweep(spec, tmp_path / "sweep", LocalExecutor(), store=store, log=lambda m: None)
    latest = records.latest(tmp_path / "sweep")
    assert latest[export_key]["status"] == "failed" and latest[export_key]["error"]
    blocked = [r for r in latest.values() if r["status"] == "blocked"]
    assert {r["kind"] for r in blocked} == {"verify", "bench"} and all(export_key in r["error"] for r in blocked)
    assert len(result.ran) == 3
    (store / bundle).unlink()  # fixed: a re-run completes what failed
    again = run_sweep(spec, tmp_path / "sweep", LocalExecutor(), store=store, log=lambda m: None)
    assert sorted(r["kind"] for r in again.ran) == ["bench", "export", "verify"]
    assert all(r["status"] == "ok" for r in again.ran)


# --- Ray ------------------------------------------------------------------------------------------------------------
# Ray binds the machine's interface address, not loopback, even when told 127.0.0.1 (FACTS.md). So every test that
# starts Ray runs again in a child pytest inside its own network and PID namespaces (`unshare`, root): only `lo`
# exists there, so Ray can listen on nothing else, and every Ray process ends with the namespace.
IN_NAMESPACE = os.environ.get("EDGEVLM_TEST_NAMESPACE") == "1"


def rerun_isolated(test: str, file: str = __file__) -> bool:
    """Outside the namespace: run `test` of `file` (this one by default) inside a fresh one and assert it passed
    (True: the caller returns). Inside: False, the caller runs its body."""
    if IN_NAMESPACE:
        return False
    import subprocess
    import sys

    inner = f"ip link set lo up && exec {sys.executable} -m pytest -q -x -p no:cacheprovider {file}::{test}"
    done = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-c", inner],
                          env={**os.environ, "EDGEVLM_TEST_NAMESPACE": "1", "RAY_USAGE_STATS_ENABLED": "0"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{test} in its namespace: {done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-2000:]
    return True


@pytest.fixture
def ray_cluster():
    """A builder head and one labelled worker node per device (add_device), started only inside the namespace."""
    if not IN_NAMESPACE:
        yield None  # the test re-runs itself in its namespace, where the cluster starts
        return
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, object_store_memory=75 << 20, include_dashboard=False, labels={LABEL_ROLE: "builder"},
        resources={BUILDER_RESOURCE: 1000}))
    nodes = {}

    def add_device(device: str):
        nodes[device] = cluster.add_node(
            num_cpus=1, object_store_memory=75 << 20, resources={BENCH_RESOURCE: 1, device_resource(device): 1000},
            labels={LABEL_DEVICE: device, LABEL_TARGET: "cpu", LABEL_ROLE: "device"})
        cluster.wait_for_nodes()
        return nodes[device]

    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        yield cluster, add_device, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_sweep_on_a_multi_node_cluster_gives_the_expected_records(reference, tmp_path, ray_cluster, request):
    """The same records as the local sweep (check_records: every stage of the matrix, all ok), each on its node."""
    if rerun_isolated(request.node.name):
        return
    import ray

    cluster, add_device, nodes = ray_cluster
    for device in ("dev-a", "dev-b"):
        add_device(device)
    device_node_ids = {d: n.node_id for d, n in nodes.items()}
    spec = tiny_spec(reference)
    result = run_sweep(spec, tmp_path / "ray", RayExecutor(wait_s=30), log=lambda m: None)
    latest = check_records(tmp_path / "ray", spec, LABEL_DEVICE)
    assert result.pending == [] and len(result.ran) == 24
    head = ray.get_runtime_context().get_node_id()
    for record in latest.values():
        expected = device_node_ids[record["device"]] if record["device"] else head
        assert record["node"]["node_id"] == expected


def test_ray_sweep_waits_for_a_missing_device_then_a_killed_node_fails_its_stage_and_a_rerun_completes(
        reference, tmp_path, ray_cluster, request):
    if rerun_isolated(request.node.name):
        return
    cluster, add_device, nodes = ray_cluster
    add_device("dev-a")
    spec = tiny_spec(reference, encoders=("onnx:int8",), decoders=("gguf:q8_0",), accuracy=ACCURACY_N)
    folder, store = tmp_path / "sweep", tmp_path / "store"
    logs: list[str] = []
    start = time.monotonic()
    # this test routes by the numeric resources `edgevlm agent` sets beside the labels (Ray before 2.49)
    first = run_sweep(spec, folder, RayExecutor(wait_s=2, poll_s=0.2, routing="resources"), store=store,
                      log=logs.append)
    # dev-b never joined: its stages stay pending with a clear line, and the sweep ends by itself
    assert time.monotonic() - start < 120
    assert "waiting for device dev-b: no node labelled edgevlm.io/device=dev-b has joined" in logs
    assert sorted(k.split(":")[0] for k in first.pending) == ["bench", "eval"]
    assert all(k.endswith("@dev-b") for k in first.pending)
    assert {r["status"] for r in first.ran} == {"ok"} and len(first.ran) == 4  # export, verify, dev-a's eval + bench
    assert all(r["node"]["labels"].get(LABEL_DEVICE) == r["device"] for r in first.ran if r["device"])
    assert all(r["node"]["labels"].get(LABEL_ROLE) == "builder" for r in first.ran if not r["device"])

    # dev-b joins, and its node is killed while its first stage runs: its stages are recorded as failed (device
    # stages are not retried and no other node is dev-b), the earlier records stay as they were
    node_b = add_device("dev-b")
    before = records.latest(folder)
    killer: list[threading.Timer] = []

    def kill_on_start(stage):
        if stage.device_id == "dev-b" and not killer:
            killer.append(threading.Timer(0.3, cluster.remove_node, args=(node_b,)))
            killer[0].start()

    second = run_sweep(spec, folder, RayExecutor(wait_s=2, poll_s=0.2, routing="resources"), store=store, log=logs.append,
                       on_start=kill_on_start)
    killer[0].join()
    assert second.ran and {(r["status"], r["device"]) for r in second.ran} == {("failed", "dev-b")}
    assert {r["key"] for r in second.ran} | set(second.pending) == set(first.pending)
    after = records.latest(folder)
    assert {k: after[k] for k in before} == before

    # a re-run with dev-b back completes only what is missing
    add_device("dev-b")
    third = run_sweep(spec, folder, RayExecutor(wait_s=30), store=store, log=logs.append)
    assert sorted(r["key"] for r in third.ran) == sorted(first.pending)
    assert all(r["status"] == "ok" for r in third.ran)
    assert all(r["status"] == "ok" for r in records.latest(folder).values())


# --- CLI ------------------------------------------------------------------------------------------------------------


def test_sweep_and_agent_cli(reference, tmp_path, capsys):
    from edgevlm.cli import main

    assert main(["sweep", "--checkpoints", str(reference), "--encoder", "onnx:int4", "-o", str(tmp_path / "x")]) == 2
    assert "unknown encoder 'onnx:int4'" in capsys.readouterr().err
    assert main(["sweep", "-o", str(tmp_path / "x"), "--report-only"]) == 2
    assert "has no records.jsonl; run the sweep first" in capsys.readouterr().err
    assert main(["agent", "--head", "10.0.0.5", "--device", "jetson-orin-nano-super-8gb", "--num-gpus", "1",
                 "--print"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == ("ray start --disable-usage-stats --address=10.0.0.5:6379 "
                    "--labels=edgevlm.io/role=device,edgevlm.io/device=jetson-orin-nano-super-8gb,"
                    "edgevlm.io/target=jetson-orin "
                    "'--resources={\"edgevlm_bench\":1,\"edgevlm_device:jetson-orin-nano-super-8gb\":1000}' --num-gpus=1")
    assert main(["agent", "--start-head", "--print"]) == 0
    assert capsys.readouterr().out.strip() == ("ray start --disable-usage-stats --head --port=6379 "
                                               "--include-dashboard=false --labels=edgevlm.io/role=builder "
                                               "'--resources={\"edgevlm_builder\":1000}'")
    assert main(["agent", "--head", "h", "--print"]) == 2
    assert "say what this machine is: --device ID or --builder" in capsys.readouterr().err


def test_agent_starts_a_head_and_a_device_that_ray_accepts(tmp_path, request):
    """The commands `edgevlm agent` runs are ones Ray 2.60's `ray start` accepts, and give the labels and the bench
    token the executor routes by (in its own namespaces: the Ray processes end with them)."""
    if rerun_isolated(request.node.name):
        return
    import subprocess
    import sys

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    agent = [sys.executable, "-m", "edgevlm", "agent", "--num-cpus", "1", "--node-ip", "127.0.0.1"]
    subprocess.run(agent + ["--start-head", "--port", "6379"], check=True, env=env, timeout=120, capture_output=True)
    subprocess.run(agent + ["--head", "127.0.0.1", "--device", "dev-c=cpu"], check=True, env=env, timeout=120,
                   capture_output=True)
    probe_nodes = ("import json, ray; ray.init(address='auto', log_to_driver=False, logging_level='ERROR'); "
                   "print(json.dumps([[n['Labels'], n['Resources'], n['NodeManagerAddress']] for n in ray.nodes() "
                   "if n['Alive']]))")
    out = subprocess.run([sys.executable, "-c", probe_nodes], env={**env, "RAY_ADDRESS": "127.0.0.1:6379"},
                         check=True, timeout=120, capture_output=True, text=True).stdout
    nodes = json.loads(out.strip().splitlines()[-1])
    roles = sorted((labels.get(LABEL_ROLE), labels.get(LABEL_DEVICE), labels.get(LABEL_TARGET),
                    resources.get(BENCH_RESOURCE)) for labels, resources, _ in nodes)
    assert roles == [("builder", None, None, None), ("device", "dev-c", "cpu", 1.0)]
    assert {address for _, _, address in nodes} == {"127.0.0.1"}
