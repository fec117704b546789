"""Executors: where and when each stage runs. One interface, `run(stages, context, on_record, log) -> pending keys`.

- `local`: this machine; stages run in a small pool of subprocesses, a device stage (bench, eval, build-engine) runs
  alone, so benchmarks measure nothing but themselves. A device whose target this machine lacks stays pending.
- `ray`: a Ray cluster (Ray core). Devices join with `edgevlm agent`: node labels name the device, its target and
  role, and a `edgevlm_bench` resource of 1 is the device's exclusive token, which every device stage takes. Build
  stages go to nodes labelled role=builder. A device with no live node leaves its stages pending ("waiting for
  device X"); the sweep stops after `wait_s` of waiting with nothing running, never hangs. Before Ray is asked to
  connect, the head is probed (`ray_head_or_hint`): with no head there, the sweep ends in seconds with one line
  saying how to start one, instead of Ray's minutes of connection retries.

Both schedule from the driver: a stage is submitted once the stages it needs have succeeded; one whose need failed
is recorded as blocked. `on_start(stage)` is called as each stage is handed to a worker (progress display)."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Callable, Iterator

from .matrix import Stage
from .stages import fingerprint, run_stage, unrun_record

LABEL_DEVICE = "edgevlm.io/device"
LABEL_TARGET = "edgevlm.io/target"
LABEL_ROLE = "edgevlm.io/role"
BENCH_RESOURCE = "edgevlm_bench"  # 1 per device node: the token that makes device stages exclusive there
LABELS_SINCE = (2, 49)  # Ray's node labels (beta) and label_selector; before that, routing uses numeric resources
PROBE_TIMEOUT_S = 5.0  # a head on a LAN answers in milliseconds; Ray itself retries for minutes
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
START_HINT = ("start one with `edgevlm agent --start-head` (on the build host), or give --address HOST:PORT of "
              "a running head")


def device_resource(device_id: str) -> str:
    """The numeric fallback for the device label: a device node carries 1000 of it (never the limit)."""
    return f"edgevlm_device:{device_id}"


BUILDER_RESOURCE = "edgevlm_builder"


class Scheduler:
    """The dependency bookkeeping both executors share."""

    def __init__(self, stages: list[Stage], done: set[str], on_record: Callable[[dict], None]):
        self.todo = [s for s in stages if s.key not in done]
        self.ok = set(done)
        self.failed: set[str] = set()
        self.on_record = on_record

    def finish(self, record: dict) -> None:
        (self.ok if record["status"] == "ok" else self.failed).add(record["key"])
        self.on_record(record)

    def ready(self) -> list[Stage]:
        """Stages whose needs all succeeded (taken off the to-do list by `take`); blocked ones are recorded."""
        out = []
        for stage in list(self.todo):
            broken = [k for k in stage.after if k in self.failed]
            if broken:
                self.todo.remove(stage)
                self.finish(unrun_record(stage.to_dict(), time.time(), "blocked",
                                         f"needs {', '.join(broken)}, which failed"))
            elif all(k in self.ok for k in stage.after):
                out.append(stage)
        return out

    def take(self, stage: Stage) -> None:
        self.todo.remove(stage)


class LocalExecutor:
    name = "local"

    def __init__(self, jobs: int = 1):
        if not 1 <= jobs <= 64:
            raise ValueError(f"jobs must be 1..64, got {jobs}")
        self.jobs = jobs

    def missing_device(self, stage: Stage, context: dict) -> str | None:
        """Every device is this machine here: one whose target this machine cannot run waits."""
        if not stage.device:
            return None
        available = fingerprint(context["timeout_s"])["available_targets"]
        target = stage.device["target"]
        if target in available:
            return None
        return f"waiting for device {stage.device_id}: this machine (local executor) has no {target} target"

    def run(self, stages: list[Stage], context: dict, done: set[str], on_record, log=print,
            on_start=None) -> list[str]:
        scheduler = Scheduler(stages, done, on_record)
        waiting: dict[str, str] = {}
        running: dict[Future, Stage] = {}
        host = socket.gethostname()
        with ThreadPoolExecutor(self.jobs) as pool:
            while True:
                exclusive_running = any(s.exclusive for s in running.values())
                for stage in scheduler.ready():
                    why = self.missing_device(stage, context)
                    if why:
                        if stage.key not in waiting:
                            log(why)
                        waiting[stage.key] = why
                        continue
                    if exclusive_running or len(running) >= self.jobs or (stage.exclusive and running):
                        continue
                    scheduler.take(stage)
                    node = {"node_id": "local", "hostname": host,
                            "labels": {LABEL_ROLE: "device" if stage.device else "builder",
                                       LABEL_DEVICE: stage.device_id}}
                    running[pool.submit(run_stage, stage.to_dict(), context, node)] = stage
                    if on_start:
                        on_start(stage)
                    exclusive_running = stage.exclusive
                if not running:
                    return [s.key for s in scheduler.todo]
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for future in finished:
                    running.pop(future)
                    scheduler.finish(future.result())


def _remote_stage(stage: dict, context: dict) -> dict:
    """Runs on the node Ray chose: the node's id and labels go into the record."""
    import ray

    runtime = ray.get_runtime_context()
    node = {"node_id": runtime.get_node_id(), "hostname": socket.gethostname(),
            "labels": dict(runtime.get_node_labels())}
    return run_stage(stage, context, node)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, wait_s: float = 300.0, poll_s: float = 1.0, routing: str = "auto"):
        if routing not in ("auto", "labels", "resources"):
            raise ValueError(f"routing must be auto, labels or resources, got {routing!r}")
        self.routing = routing
        self.address = address
        self.wait_s = wait_s
        self.poll_s = poll_s
        self._orphaned: dict[str, float] = {}  # stage key -> when its node was first seen gone
        self.connected_here = False  # this executor called ray.init (so it shuts Ray down when interrupted)

    def connect(self):
        import ray

        if not ray.is_initialized():
            ray_head_or_hint(self.address)
            ray.init(address=self.address or "auto", log_to_driver=False, logging_level="ERROR")
            self.connected_here = True
            sigterm_interrupts()  # ray.init set its own handler: a sys.exit from wherever the driver happens to be
        return ray

    @staticmethod
    def live_nodes(ray) -> list[dict]:
        """Each live node's labels, with its custom resources as keys too (the fallback route)."""
        return [{**dict(n.get("Resources") or {}), **dict(n.get("Labels") or {})} for n in ray.nodes() if n.get("Alive")]

    def placement(self, stage: Stage, labels: bool = True) -> dict:
        """Ray options: device stages to the device's node, holding its bench token; builds to builder nodes. By
        label, or (labels=False, a Ray without label_selector) by the numeric resources `edgevlm agent` also sets."""
        if stage.device:
            route = ({"label_selector": {LABEL_DEVICE: stage.device_id}, "resources": {BENCH_RESOURCE: 1}} if labels
                     else {"resources": {BENCH_RESOURCE: 1, device_resource(stage.device_id): 1}})
            return {**route, "num_cpus": 0, "max_retries": 0}  # a bench is never retried: a failure is a record
        route = {"label_selector": {LABEL_ROLE: "builder"}} if labels else {"resources": {BUILDER_RESOURCE: 1}}
        return {**route, "num_cpus": 1, "max_retries": 1}

    def missing_node(self, stage: Stage, nodes: list[dict]) -> str | None:
        if stage.device:
            if any(n.get(LABEL_DEVICE) == stage.device_id or device_resource(stage.device_id) in n for n in nodes):
                return None
            return f"waiting for device {stage.device_id}: no node labelled {LABEL_DEVICE}={stage.device_id} has joined"
        if any(n.get(LABEL_ROLE) == "builder" or BUILDER_RESOURCE in n for n in nodes):
            return None
        return f"waiting for a build host: no node labelled {LABEL_ROLE}=builder has joined"

    def run(self, stages: list[Stage], context: dict, done: set[str], on_record, log=print,
            on_start=None) -> list[str]:
        ray = self.connect()
        running: dict = {}  # ObjectRef -> (stage, submitted at)
        try:
            return self._run(ray, running, stages, context, done, on_record, log, on_start)
        except BaseException:  # Ctrl-C, SIGTERM: what was submitted is cancelled, and Ray let go of
            for ref in running:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - a node already gone; the rest are still cancelled
                    pass
            if self.connected_here:
                ray.shutdown()
                self.connected_here = False
            raise

    def _run(self, ray, running: dict, stages: list[Stage], context: dict, done: set[str], on_record, log,
             on_start) -> list[str]:
        labels = (tuple(int(p) for p in ray.__version__.split(".")[:2]) >= LABELS_SINCE if self.routing == "auto"
                  else self.routing == "labels")
        remote = ray.remote(_remote_stage)
        scheduler = Scheduler(stages, done, on_record)
        waiting: dict[str, str] = {}
        waited_since = None
        while True:
            nodes = self.live_nodes(ray)
            for stage in scheduler.ready():
                why = self.missing_node(stage, nodes)
                if why:
                    if waiting.get(stage.key) != why:
                        log(why)
                    waiting[stage.key] = why
                    continue
                waiting.pop(stage.key, None)
                scheduler.take(stage)
                ref = remote.options(**self.placement(stage, labels)).remote(stage.to_dict(), context)
                running[ref] = (stage, time.time())
                if on_start:
                    on_start(stage)
            if not running:
                if not waiting:
                    return [s.key for s in scheduler.todo]
                waited_since = waited_since or time.time()
                if time.time() - waited_since >= self.wait_s:
                    log(f"gave up after {self.wait_s:.0f} s; still waiting: " + "; ".join(sorted(set(waiting.values()))))
                    return [s.key for s in scheduler.todo]
                time.sleep(self.poll_s)
                continue
            waited_since = None
            self.withdraw_orphans(ray, running, nodes, scheduler, log)
            if not running:
                continue
            finished, _ = ray.wait(list(running), num_returns=1, timeout=self.poll_s)
            for ref in finished:
                stage, submitted = running.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the node or worker died under the stage
                    first_line = str(exc).splitlines()[0] if str(exc) else ""
                    record = unrun_record(stage.to_dict(), submitted, "failed", f"{type(exc).__name__}: {first_line}")
                scheduler.finish(record)


    def withdraw_orphans(self, ray, running: dict, nodes: list[dict], scheduler: Scheduler, log) -> None:
        """A stage whose node left while it was submitted would wait in Ray forever (a queued one) or until Ray
        notices (a running one): after `wait_s` without the node it is cancelled and recorded as failed; a re-run
        completes it."""
        now = time.time()
        for ref, (stage, submitted) in list(running.items()):
            why = self.missing_node(stage, nodes)
            if not why:
                self._orphaned.pop(stage.key, None)
                continue
            if now - self._orphaned.setdefault(stage.key, now) < self.wait_s:
                continue
            ray.cancel(ref, force=True)
            running.pop(ref)
            self._orphaned.pop(stage.key, None)
            where = stage.device_id or "the build host"
            log(f"{stage.key}: the node for {where} left the cluster; recorded as failed")
            scheduler.finish(unrun_record(stage.to_dict(), submitted, "failed",
                                          f"NodeLost: the node for {where} left the cluster and did not come back "
                                          f"within {self.wait_s:.0f} s"))


def ray_head_or_hint(address: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """The host:port Ray would connect to for `address` (None/"auto": RAY_ADDRESS, else the cluster `ray start` last
    recorded here), once a gRPC server answers there within `timeout_s`; else a BadInputError (exit 2) whose one line
    says how to start a head."""
    from ..errors import BadInputError

    given = address or "auto"
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die

        with fd2_silenced():  # offline, Ray's C++ logs its failed guess of this node's address there
            target = canonicalize_bootstrap_address_or_die(given)
    except (ConnectionError, ValueError, OSError) as exc:
        why = str(exc).split(". ")[0]
        raise BadInputError(f"no Ray cluster found (--address {given}: {why}); {START_HINT}") from None
    except ImportError:  # an older or newer Ray without this helper: ray.init reports it
        return given
    host, _, port = target.rpartition(":")
    why = grpc_server_answers(host.strip("[]"), int(port), timeout_s)
    if why:
        raise BadInputError(f"no Ray cluster at {target} (--address {given}: {why}); {START_HINT}")
    return target


@contextmanager
def fd2_silenced() -> Iterator[None]:
    """Standard error (the file descriptor, which native code writes to) goes to /dev/null for a moment."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def grpc_server_answers(host: str, port: int, timeout_s: float) -> str | None:
    """None when an HTTP/2 (gRPC) server, as a Ray head's GCS is, answers the client preface with a SETTINGS frame
    within `timeout_s`; else why not, in a few words."""
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(HTTP2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # + an empty SETTINGS frame
            header = b""
            while len(header) < 9:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                piece = sock.recv(9 - len(header))
                if not piece:
                    return "it closed the connection: not a Ray head"
                header += piece
    except ConnectionRefusedError:
        return "connection refused: nothing listens there"
    except (TimeoutError, socket.timeout):
        return f"no answer within {timeout_s:.0f} s"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    return None if header[3] == 0x04 else "it does not speak gRPC: not a Ray head"


def sigterm_interrupts() -> None:
    """SIGTERM ends the sweep as Ctrl-C does: a KeyboardInterrupt in the driver (submitted stages cancelled, exit
    130), wherever it is waiting."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def make_executor(name: str, **options):
    if name == "local":
        return LocalExecutor(jobs=options.get("jobs", 1))
    if name == "ray":
        return RayExecutor(address=options.get("address"), wait_s=options.get("wait_s", 300.0))
    raise ValueError(f"unknown executor {name!r}; choose local or ray")
