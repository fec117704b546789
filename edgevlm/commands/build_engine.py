"""edgevlm build-engine BUNDLE --precision fp16|int8 [--max-tiles N]"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("bundle")
    parser.add_argument("--precision", default="fp16", choices=("fp16", "int8"))
    parser.add_argument("--max-tiles", type=int, default=None, help="largest tile batch of the optimization profile")
    parser.add_argument("--opt-tiles", type=int, default=None, help="tile batch TensorRT tunes for (default min(max, 5))")


def main(args) -> int:
    from pathlib import Path

    from ..export.tensorrt import build_engine

    plan = build_engine(Path(args.bundle), args.precision, args.max_tiles, args.opt_tiles)
    print(f"wrote {plan}; use it with --encoder tensorrt:{args.precision}")
    return 0
