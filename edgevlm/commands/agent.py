"""edgevlm agent: join this machine to a sweep's Ray cluster as a device (or a build host), or start the head.

    edgevlm agent --start-head                                  # on the build host: head + builder
    edgevlm agent --head HOST --device jetson-orin-nano-super-8gb   # on each device
    edgevlm agent --head HOST --builder                          # another build host

Prints the `ray start` command (--print) or runs it. Labels name the device, its target and the role; the
`edgevlm_bench` resource (1 per device) is the token every device stage takes, so nothing else runs there during a
bench."""
from __future__ import annotations

DEFAULT_PORT = 6379


def add_arguments(parser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--head", default=None, help="HOST[:PORT] of the sweep's head node")
    where.add_argument("--start-head", action="store_true", help="start the head here (a build host)")
    role = parser.add_mutually_exclusive_group()
    role.add_argument("--device", default=None, help="device id (from the device table, or ID=TARGET)")
    role.add_argument("--builder", action="store_true", help="join as a build host (exports, verify)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="head port (with --start-head)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule here (default: all)")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs (Jetson: give 1; Ray's NVML probe misses it)")
    parser.add_argument("--node-ip", default=None, help="this node's address as the others reach it (default: Ray's "
                                                        "guess; 127.0.0.1 for a cluster on one machine)")
    parser.add_argument("--print", action="store_true", help="print the command instead of running it")


def ray_start_command(args) -> list[str]:
    from ..errors import BadInputError
    from ..sweep.executors import (BENCH_RESOURCE, BUILDER_RESOURCE, LABEL_DEVICE, LABEL_ROLE, LABEL_TARGET,
                                   device_resource)
    from ..sweep.spec import parse_device

    command = ["ray", "start", "--disable-usage-stats"]
    if args.start_head:
        if not 1 <= args.port <= 65535:
            raise BadInputError(f"--port must be 1..65535, got {args.port}")
        command += ["--head", f"--port={args.port}", "--include-dashboard=false"]  # Ray core only: no dashboard
    else:
        host = args.head if ":" in args.head else f"{args.head}:{DEFAULT_PORT}"
        command += [f"--address={host}"]
    labels = {}
    resources = {}
    if args.device:
        device = parse_device(args.device)
        labels = {LABEL_ROLE: "device", LABEL_DEVICE: device.id, LABEL_TARGET: device.target}
        resources = {BENCH_RESOURCE: 1, device_resource(device.id): 1000}  # the numeric fallback for the label
    elif args.builder or args.start_head:
        labels = {LABEL_ROLE: "builder"}
        resources = {BUILDER_RESOURCE: 1000}
    else:
        raise BadInputError("say what this machine is: --device ID or --builder")
    command.append("--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()))
    if resources:
        import json

        command.append("--resources=" + json.dumps(resources, separators=(",", ":")))
    if args.node_ip:
        command.append(f"--node-ip-address={args.node_ip}")
    for flag, value in (("--num-cpus", args.num_cpus), ("--num-gpus", args.num_gpus)):
        if value is not None:
            if value < 0:
                raise BadInputError(f"{flag} must be >= 0, got {value}")
            command.append(f"{flag}={value}")
    return command


def main(args) -> int:
    import shlex
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from ..errors import BadInputError

    command = ray_start_command(args)
    if args.print:
        print(shlex.join(command))
        return 0
    beside = Path(sys.executable).with_name("ray")  # a venv's ray script, when the venv is not on PATH
    ray = shutil.which("ray") or (str(beside) if beside.is_file() else None)
    if not ray:
        raise BadInputError("the ray command is not installed here: pip install 'edgevlm[ray]' (or use --print)")
    return subprocess.run([ray, *command[1:]]).returncode
