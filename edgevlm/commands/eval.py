"""edgevlm eval PATH [--n N] [--json] [--encoder E] [--decoder D]: reference-model task accuracy."""
from __future__ import annotations


def add_arguments(parser) -> None:
    from .common import add_backend_arguments

    parser.add_argument("path", nargs="?", default=None, help="checkpoint or bundle (default: the cached reference model)")
    parser.add_argument("--n", type=int, default=200, help="number of questions (default 200)")
    add_backend_arguments(parser)
    parser.add_argument("--examples", type=int, default=0, help="show this many question/answer examples")
    parser.add_argument("--json", action="store_true", help="one JSON object with accuracy, n and per-type accuracy")


def main(args) -> int:
    import sys

    from rich.progress import Progress

    from .. import load
    from ..errors import BadInputError
    from ..reference.evaluate import evaluate, evaluation_job
    from ..reference.train import reference_path
    from .common import backend_options, print_json, table

    if not 1 <= args.n <= 100_000:
        raise BadInputError(f"--n must be 1..100000, got {args.n}")
    path = args.path or reference_path()
    session = load(path, encoder=args.encoder, decoder=args.decoder, job=evaluation_job(args.n),  # sizes llama.cpp's
                   **backend_options(args))  # context unless --n-ctx
    with Progress(transient=True, console=None) as progress:
        task = progress.add_task("evaluating", total=args.n)
        report = evaluate(session, args.n, progress=lambda done, total: progress.update(task, completed=done),
                          keep_examples=args.examples)
    if args.json:
        print_json(report)
        return 0
    rows = [(t, report["per_type_n"][t], acc) for t, acc in report["per_type"].items()]
    rows.append(("overall", report["n"], report["accuracy"]))
    table(f"accuracy of {path} ({report['encoder']} + {report['decoder']})", ["question type", "n", "accuracy"], rows)
    for ex in report.get("examples", []):
        print(f"{'ok ' if ex['correct'] else 'BAD'} {ex['question']} -> {ex['answer']!r} (truth {ex['truth']!r})",
              file=sys.stdout)
    return 0
