"""`make demo`: the main job on the embedded default. Build the reference model if missing, export it as a bundle,
answer questions about fresh scenes with the PyTorch reference and with every encoder x decoder pair of the bundle,
and print accuracy per pair plus a short benchmark table."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

DEMO_SEED_BASE = 2_000_000_000  # fresh scenes, disjoint from training and from `edgevlm eval`
N_IMAGES = 4
N_EVAL = 100


def build_reference(console: Console) -> Path:
    from .reference.train import DEFAULT_RECIPE, ensure_reference, reference_path

    path = reference_path(DEFAULT_RECIPE)
    if (path / "edgevlm_reference.json").is_file():
        console.print(f"reference model: {path} (cached)")
        return path
    console.print("training the reference model once on this machine (a few minutes on 2 cores)")
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("train", total=DEFAULT_RECIPE.vision_steps + DEFAULT_RECIPE.steps, loss=float("nan"))
        path = ensure_reference(DEFAULT_RECIPE, progress=lambda s, n, loss: progress.update(task, completed=s, loss=loss))
    return path


def show_answers(console: Console, session, title: str) -> None:
    from .reference import scenes

    table = Table(title=title)
    for column in ("image", "question", "answer", "truth", ""):
        table.add_column(column)
    correct = total = 0
    for i in range(N_IMAGES):
        seed = DEMO_SEED_BASE + i
        scene = scenes.make_scene(seed)
        image = scenes.render(scene)
        for qa in scenes.questions(scene, scenes.question_rng(seed)).values():
            answer = session.generate(image, qa.question, max_tokens=32).text.strip()
            ok = scenes.normalize(answer) == scenes.normalize(qa.answer)
            correct += ok
            total += 1
            table.add_row(f"#{i}", qa.question, answer, qa.answer, "[green]ok[/]" if ok else "[red]wrong[/]")
    console.print(table)
    console.print(f"accuracy on these {total} questions: {correct / total:.2f}")


def main() -> int:
    from . import load
    from .errors import BackendUnavailableError
    from .reference.evaluate import evaluate
    from .backends import require_mlx
    from .export.exporter import ArtifactRequest, export_checkpoint
    from .reference.train import cache_root

    console = Console()
    ckpt = build_reference(console)
    show_answers(console, load(ckpt), "PyTorch reference runtime on fresh scenes")

    bundle = cache_root() / "demo" / f"bundle-{ckpt.name}"
    decoders = [ArtifactRequest("gguf", "q8_0"), ArtifactRequest("gguf", "q4_k_m")]
    try:
        require_mlx()
        decoders.append(ArtifactRequest("mlx", "4bit"))
    except BackendUnavailableError as exc:
        console.print(f"skipping the mlx:4bit decoder: {exc}")
    start = time.perf_counter()
    with console.status("exporting the bundle (ONNX fp32+int8 encoder, GGUF decoders)"):
        export_checkpoint(ckpt, bundle, [ArtifactRequest("onnx", "fp32"), ArtifactRequest("onnx", "int8")], decoders,
                          force=True, max_tiles=4)
    console.print(f"bundle: {bundle} (exported in {time.perf_counter() - start:.1f} s)")

    table = Table(title=f"reference-model accuracy per encoder x decoder ({N_EVAL} held-out questions, greedy)")
    for column in ("encoder", "decoder", "accuracy", "TTFT ms (median)", "decode tok/s (median)"):
        table.add_column(column)
    pairs = [("torch", "torch", ckpt)] + [(e, d.name, bundle) for e in ("onnx:fp32", "onnx:int8") for d in decoders]
    for encoder, decoder, path in pairs:
        session = load(path) if encoder == "torch" else load(path, encoder=encoder, decoder=decoder)
        ttft, rates = [], []
        original = session.generate

        def timed(*args, **kwargs):
            result = original(*args, **kwargs)
            ttft.append(result.timings["ttft_ms"])
            if result.timings["decode_tok_s"]:
                rates.append(result.timings["decode_tok_s"])
            return result

        session.generate = timed
        report = evaluate(session, N_EVAL)
        med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("nan")  # noqa: E731
        table.add_row(encoder, decoder, f"{report['accuracy']:.3f}", f"{med(ttft):.1f}", f"{med(rates):.0f}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
