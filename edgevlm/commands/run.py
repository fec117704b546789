"""edgevlm run PATH --image IMG --prompt TEXT  (or --video FILE [--max-frames N] [--fps F])"""
from __future__ import annotations

import sys
import time


def add_arguments(parser) -> None:
    from .common import add_backend_arguments, add_sampling_arguments, add_video_arguments

    parser.add_argument("path", help="checkpoint folder or bundle")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    parser.add_argument("--prompt", required=True, help="the question; <image> marks where each image goes")
    add_video_arguments(parser)
    add_sampling_arguments(parser)
    add_backend_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and timings")
    parser.add_argument("--verbose", action="store_true", help="print timings and cache hits after the answer")


def main(args) -> int:
    from ..errors import BadInputError
    from ..images import load_image
    from .common import backend_options, load_session_checked, print_json, sampling_kwargs, table, video_request

    if not args.prompt.strip():
        raise BadInputError("the prompt is empty; pass a question with --prompt")
    kwargs = sampling_kwargs(args)
    images = [load_image(p) for p in args.image]  # fail on a bad image before loading any model
    video = video_request(args, images)  # and on a bad video (its header is read once, here; no frame decoded)
    started = time.perf_counter()
    from ..runtimes.job_context import Job

    # sizes llama.cpp's context unless --n-ctx (a video's positions counted from its header)
    job = Job((args.prompt,), tuple(images), kwargs["max_tokens"], video)
    session = load_session_checked(args, {**backend_options(args), "job": job})
    load_ms = (time.perf_counter() - started) * 1e3
    first_token: list[float] = []

    def on_text(text: str) -> None:
        if not first_token:
            first_token.append(time.time())
        if not args.json:
            print(text, end="", flush=True)

    result = session.generate(images or None, args.prompt, on_text=on_text, video=video, **kwargs)
    # start-up as a user sees it: from the process's creation (the interpreter and imports included) to the first
    # streamed text, beside the load (fit check + bundle) it spent before the request (benchmarks/startup.py)
    timings = {**result.timings, "load_ms": load_ms}
    since_start = _ms_since_process_start(first_token[0]) if first_token else None
    if since_start is not None:
        timings["process_start_to_first_token_ms"] = since_start
    if args.json:
        print_json({"text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason,
                    "timings": timings})
        return 0
    print()
    if args.verbose:
        table("timings", ["metric", "value"], sorted(timings.items()), file=sys.stderr)
    return 0


def _ms_since_process_start(at: float) -> float | None:
    """Milliseconds from this process's creation to the wall-clock time `at` (psutil; None without it)."""
    try:
        import psutil
    except ImportError:
        return None
    return (at - psutil.Process().create_time()) * 1e3
