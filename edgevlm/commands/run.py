"""edgevlm run PATH --image IMG --prompt TEXT"""
from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    from .common import add_backend_arguments, add_sampling_arguments

    parser.add_argument("path", help="checkpoint folder or bundle")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    parser.add_argument("--prompt", required=True, help="the question; <image> marks where each image goes")
    add_sampling_arguments(parser)
    add_backend_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and timings")
    parser.add_argument("--verbose", action="store_true", help="print timings and cache hits after the answer")


def main(args) -> int:
    from ..errors import BadInputError
    from ..images import load_image
    from .common import backend_options, load_session_checked, print_json, sampling_kwargs, table

    if not args.prompt.strip():
        raise BadInputError("the prompt is empty; pass a question with --prompt")
    kwargs = sampling_kwargs(args)
    images = [load_image(p) for p in args.image]  # fail on a bad image before loading any model
    session = load_session_checked(args, backend_options(args))
    if args.json:
        result = session.generate(images or None, args.prompt, **kwargs)
        print_json({"text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason,
                    "timings": result.timings})
        return 0
    result = session.generate(images or None, args.prompt, on_text=lambda s: print(s, end="", flush=True), **kwargs)
    print()
    if args.verbose:
        table("timings", ["metric", "value"], sorted(result.timings.items()), file=sys.stderr)
    return 0
