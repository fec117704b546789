"""edgevlm reference [-o DIR] [--force]: build and train the reference model once per machine (cached)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("-o", "--output", default=None, help="folder (default: ~/.cache/edgevlm/reference/<recipe hash>)")
    parser.add_argument("--force", action="store_true", help="retrain even if a cached copy exists")
    parser.add_argument("--json", action="store_true", help="print the training facts as JSON")


def main(args) -> int:
    import json
    from pathlib import Path

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..reference.train import DEFAULT_RECIPE, ensure_reference, reference_path
    from .common import print_json

    out = Path(args.output) if args.output else reference_path(DEFAULT_RECIPE)
    cached = (out / "edgevlm_reference.json").is_file() and not args.force
    with Progress(TextColumn("training the reference model"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  transient=True) as progress:
        task = progress.add_task("train", total=DEFAULT_RECIPE.vision_steps + DEFAULT_RECIPE.steps, loss=float("nan"))
        path = ensure_reference(DEFAULT_RECIPE, out, force=args.force,
                                progress=lambda step, total, loss: progress.update(task, completed=step, loss=loss))
    facts = json.loads((path / "edgevlm_reference.json").read_text())
    if args.json:
        print_json({"path": str(path), "cached": cached, **facts})
    else:
        state = "cached" if cached else f"trained in {facts['train_seconds']} s"
        print(f"{path} ({state}; {facts['parameters'] / 1e6:.1f}M parameters)")
    return 0
