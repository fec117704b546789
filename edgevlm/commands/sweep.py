"""edgevlm sweep [SPEC.yaml|json] [flags]: the checkpoint x encoder x decoder x device matrix, run by the local
executor or on a Ray cluster, gathered into records.jsonl and a report (table, JSON, PNG)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("spec", nargs="?", default=None, help="a YAML or JSON sweep file (flags below override it)")
    parser.add_argument("--checkpoints", default=None, help="comma list of checkpoint folders")
    parser.add_argument("--encoder", default=None, help="comma list: onnx:fp32|fp16|int8, tensorrt:fp16|int8")
    parser.add_argument("--decoder", default=None, help="comma list: gguf:<quant>, mlx:<quant>")
    parser.add_argument("--devices", default=None,
                        help="comma list of device ids from the device table, or ID=TARGET (default: this-machine=cpu)")
    parser.add_argument("--accuracy", type=int, default=None, metavar="N",
                        help="eval N reference-scene questions per cell and device (reference-model checkpoints)")
    parser.add_argument("--image-size", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-tiles", type=int, default=None)
    parser.add_argument("-o", "--output", required=True, help="sweep folder: records.jsonl, report.*, bundles/")
    parser.add_argument("--store", default=None, help="bundle store every node reaches (default OUTPUT/bundles)")
    parser.add_argument("--executor", default="local", choices=("local", "ray"))
    parser.add_argument("--address", default=None, help="Ray cluster address (default: auto, the running cluster)")
    parser.add_argument("--jobs", type=int, default=1, help="local executor: build stages at once (default 1)")
    parser.add_argument("--wait", type=float, default=300.0,
                        help="ray: seconds to wait for a device that has not joined before giving up (default 300)")
    parser.add_argument("--report-only", action="store_true", help="regenerate the report from the records")
    parser.add_argument("--json", action="store_true", help="print the report rows as JSON")


def build_spec(args):
    from pathlib import Path

    from ..errors import BadInputError
    from ..sweep.spec import SweepSpec, read_spec

    data = read_spec(Path(args.spec)).to_dict() if args.spec else {}
    for flag, key in (("checkpoints", "checkpoints"), ("encoder", "encoders"), ("decoder", "decoders"),
                      ("devices", "devices"), ("accuracy", "accuracy"), ("max_tiles", "max_tiles")):
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    bench = dict(data.get("bench") or {})
    for key in ("image_size", "prompt_tokens", "new_tokens", "repeats", "threads"):
        if getattr(args, key) is not None:
            bench[key] = getattr(args, key)
    data["bench"] = bench
    data.setdefault("devices", ["this-machine=cpu"])
    data.setdefault("encoders", "onnx:fp32,onnx:int8")
    data.setdefault("decoders", "gguf:q8_0,gguf:q4_k_m")
    if not data.get("checkpoints"):
        raise BadInputError("give checkpoints: a sweep file or --checkpoints DIR[,DIR...]")
    return SweepSpec.from_dict(data)


def main(args) -> int:
    import shlex
    import sys
    from pathlib import Path

    from rich.console import Console

    from ..errors import BadInputError
    from ..sweep import records, report
    from ..sweep.executors import make_executor, ray_head_or_hint, sigterm_interrupts
    from ..sweep.run import run_sweep
    from .common import print_json, table

    sigterm_interrupts()  # SIGTERM ends it as Ctrl-C does, at any time
    console = Console(stderr=True)
    folder = Path(args.output)
    command = "edgevlm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.report_only:
        if not (folder / records.RECORDS).is_file():
            raise BadInputError(f"{folder} has no {records.RECORDS}; run the sweep first")
        files = report.write(folder, {"date": "", "command": command, "executor": "-", "cpu": "-"})
    else:
        if not 1 <= args.jobs <= 64:
            raise BadInputError(f"--jobs must be 1..64, got {args.jobs}")
        if not 0 <= args.wait <= 7 * 86400:
            raise BadInputError(f"--wait must be 0..604800 seconds, got {args.wait}")
        spec = build_spec(args)
        executor = make_executor(args.executor, jobs=args.jobs, address=args.address, wait_s=args.wait)
        if args.executor == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise BadInputError("the ray executor needs Ray: pip install 'edgevlm[ray]'") from None
            ray_head_or_hint(args.address)  # no head: one line and exit 2 in seconds, before anything is written
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("sweep", total=None)
            started: dict[str, str] = {}

            def on_start(stage) -> None:
                where = f" on {stage.device_id}" if stage.device else ""
                started[stage.key] = f"{stage.kind} {stage.cell['encoder']} + {stage.cell['decoder']}{where}"
                progress.update(task, description="running: " + "; ".join(started.values()))

            def on_record(record) -> None:
                started.pop(record["key"], None)
                progress.update(task, advance=1, description="running: " + ("; ".join(started.values()) or "-"))

            result = run_sweep(spec, folder, executor, args.store, command,
                               log=lambda m: progress.console.print(m, markup=False), on_record=on_record,
                               on_start=on_start, on_plan=lambda n: progress.update(task, total=n))
        files = result.files
        for key in result.pending:
            console.print(f"pending: {key}", markup=False)
    rows = report.rows(records.read(folder))
    if args.json:
        print_json({"folder": str(folder), "rows": rows, "files": {k: str(v) for k, v in files.items()}})
    else:
        table(f"sweep {folder}", report.SHORT, report.short_rows(rows))
        console.print("wrote " + ", ".join(str(p) for p in files.values()), markup=False)
    return 0
