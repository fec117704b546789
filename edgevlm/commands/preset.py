"""edgevlm preset NAME -o DIR"""
from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    from ..reference.presets import PRESETS

    parser.add_argument("name", choices=sorted(PRESETS), help="public model whose shapes to copy")
    parser.add_argument("-o", "--output", required=True, help="checkpoint folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing folder")
    parser.add_argument("--single-tile", action="store_true",
                        help="resize every image to one tile (no splitting): the one-tile benchmark workload")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights made and saved in this dtype (bfloat16: as the public checkpoints ship)")


def main(args) -> int:
    import shutil
    import tempfile

    from rich.console import Console

    from ..errors import BadInputError
    from ..reference.presets import build_preset

    out = Path(args.output).absolute()
    if out.exists() and not args.force:
        raise BadInputError(f"{out} already exists; choose another -o or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    with console.status(f"building {args.name} (random weights, exact shapes)"):
        temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        try:
            build_preset(args.name, temp, seed=args.seed, single_tile=args.single_tile, dtype=args.dtype)
            if out.exists():
                shutil.rmtree(out)
            temp.rename(out)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
    console.print(f"wrote {out}")
    return 0
