"""`edgevlm sweep --executor ray` at the edges (issue 32): with no reachable Ray head it exits 2 within seconds with
one line saying how to start one (not minutes of Ray's connection retries), and SIGTERM ends it cleanly while it
waits on a real cluster. Each runs in its own network and PID namespaces (test_sweep.rerun_isolated): nothing
listens there unless the test starts it, and every Ray process ends with the namespace."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_sweep import rerun_isolated

from edgevlm.sweep.executors import grpc_server_answers

HINT = "start one with `edgevlm agent --start-head`"


def sweep_command(tmp_path: Path, *extra: str) -> list[str]:
    checkpoint = tmp_path / "ckpt"  # the sweep stops before anything reads more than its config.json
    checkpoint.mkdir(exist_ok=True)
    (checkpoint / "config.json").write_text("{}")
    return [sys.executable, "-m", "edgevlm", "sweep", "--checkpoints", str(checkpoint), "-o", str(tmp_path / "out"),
            "--executor", "ray", *extra]


def env_without_ray_address() -> dict:
    return {k: v for k, v in {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}.items() if k != "RAY_ADDRESS"}


class SilentListener:
    """A port that accepts connections and never answers (not a Ray head); what it accepted stays open."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.server.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.server.close()
        for connection in self.accepted:
            connection.close()


def test_the_probe_tells_a_closed_port_and_a_silent_one_from_a_head():
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    assert "connection refused" in grpc_server_answers("127.0.0.1", port, 2)
    server = SilentListener()
    try:
        started = time.monotonic()
        assert "no answer within 1 s" in grpc_server_answers("127.0.0.1", server.port, 1)
        assert time.monotonic() - started < 5
    finally:
        server.close()


def test_a_sweep_without_a_cluster_exits_2_in_seconds_with_the_hint(tmp_path, request):
    if rerun_isolated(request.node.name, __file__):
        return
    server = SilentListener()
    try:
        for extra in ((), ("--address", "127.0.0.1:6379"), ("--address", f"127.0.0.1:{server.port}")):
            started = time.monotonic()
            done = subprocess.run(sweep_command(tmp_path, *extra), env=env_without_ray_address(), capture_output=True,
                                  text=True, timeout=60)
            took = time.monotonic() - started
            assert done.returncode == 2, (extra, done.stderr[-2000:])
            assert took < 30, (extra, took)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and HINT in lines[0], (extra, done.stderr[-2000:])
            assert not (tmp_path / "out").exists()  # refused before anything was written
    finally:
        server.close()


def test_sigterm_ends_a_ray_sweep_that_waits_for_a_build_host(tmp_path, request):
    """A real head with no build host: the sweep waits (up to --wait 300 s); SIGTERM ends it within seconds, as
    Ctrl-C does (exit 130, 'interrupted'), not after Ray's own handler or a kill -9."""
    if rerun_isolated(request.node.name, __file__):
        return
    ray = Path(sys.executable).with_name("ray")
    env = env_without_ray_address()
    subprocess.run([str(ray), "start", "--head", "--port=6379", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", "--disable-usage-stats"], check=True, env=env, timeout=120,
                   capture_output=True)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        sweep = subprocess.Popen(sweep_command(tmp_path, "--address", "127.0.0.1:6379", "--wait", "300"), env=env,
                                 stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while "waiting for a build host" not in log.read_text() and time.monotonic() < deadline:
            assert sweep.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        assert "waiting for a build host" in log.read_text(), log.read_text()[-2000:]
        sweep.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert sweep.wait(timeout=30) == 130, log.read_text()[-2000:]
        assert time.monotonic() - started < 10
        assert log.read_text().strip().splitlines()[-1] == "interrupted"
    finally:
        if sweep.poll() is None:
            sweep.kill()
