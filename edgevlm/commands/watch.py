"""edgevlm watch PATH SOURCE --every 2s --window 6s --prompt TEXT: answer over the last seconds of a video file or a
live stream, again every few seconds of stream time, encoding only the frames that are new since the last answer
(edgevlm/video/window.py). A live source (stdin, a URL, or a file with --realtime) is answered over its newest window
each time, dropping the frames an answer had no time for; a file is answered at every stride."""
from __future__ import annotations

import sys

DEFAULT_EVERY = "2s"
DEFAULT_WINDOW = "6s"


def add_arguments(parser) -> None:
    from .common import add_backend_arguments, add_sampling_arguments

    parser.add_argument("path", help="bundle or checkpoint of a model that takes video (SmolVLM2)")
    parser.add_argument("source", help="video file, '-' for stdin (a streamable container: MKV, MPEG-TS), or a URL "
                        "PyAV opens (rtsp://...)")
    parser.add_argument("--prompt", required=True, help="the question asked about every window")
    parser.add_argument("--every", default=DEFAULT_EVERY, help=f"answer every this much stream time (default "
                        f"{DEFAULT_EVERY}; 500ms, 2s, 1m)")
    parser.add_argument("--window", default=DEFAULT_WINDOW, help=f"each answer covers the last this much (default "
                        f"{DEFAULT_WINDOW})")
    parser.add_argument("--fps", type=float, default=None, help="frames kept per second of stream (default: the "
                        "processor's sampling rate)")
    parser.add_argument("--max-frames", type=int, default=None, help="most frames in a window (default: the "
                        "processor's)")
    parser.add_argument("--max-answers", type=int, default=None, help="stop after this many answers")
    parser.add_argument("--realtime", action="store_true", help="read a file at its own pace, as a camera, and "
                        "answer it as a live source: over the newest window, dropping frames answers had no time for "
                        "(default: as fast as answers allow, every stride answered)")
    parser.add_argument("--json", action="store_true", help="one JSON line per answer (and a last summary line)")
    add_sampling_arguments(parser)
    add_backend_arguments(parser)


def main(args) -> int:
    from ..errors import BadInputError
    from ..video.window import StreamSource, check_context, parse_seconds, plan_window, watch
    from .common import backend_options, load_session_checked, print_json, sampling_kwargs

    if not args.prompt.strip():
        raise BadInputError("the prompt is empty; pass a question with --prompt")
    if args.max_answers is not None and args.max_answers < 1:
        raise BadInputError(f"--max-answers must be >= 1, got {args.max_answers}")
    every, window_s = parse_seconds(args.every, "--every"), parse_seconds(args.window, "--window")
    kwargs = sampling_kwargs(args)
    with StreamSource(args.source) as source:  # a bad source fails here, before any model loads
        session = load_session_checked(args, backend_options(args))
        if session.spec.video is None:
            raise BadInputError("this model takes no video (video input: SmolVLM2, and Qwen2-VL/2.5-VL/3-VL where "
                                "supported); watch a stream with a model that does")
        plan = plan_window(session.spec.video, window_s, every, args.fps, args.max_frames)
        n_prompt = check_context(session, args.prompt, plan)  # before any frame is decoded
        live = source.live or args.realtime
        printer = _Printer(args.json, plan, n_prompt, live)
        result = watch(session, source.frames(), args.prompt, plan, printer, args.max_answers, args.realtime,
                       kwargs, live=live)
    summary = {"answers": len(result.answers), "frames_decoded": result.frames_seen,
               "frames_encoded": sum(a.frames_encoded for a in result.answers),
               "frames_reused": sum(a.frames_reused for a in result.answers),
               "frames_dropped": sum(a.frames_dropped for a in result.answers), "live": live,
               "interrupted": result.interrupted}
    if args.json:
        print_json({"summary": summary})
    else:
        print(f"{summary['answers']} answers, {summary['frames_encoded']} frames encoded, "
              f"{summary['frames_reused']} reused" + (f", {summary['frames_dropped']} dropped" if live else "") +
              (" (stopped by Ctrl-C)" if result.interrupted else ""), file=sys.stderr)
    return 130 if result.interrupted else 0


class _Printer:
    """Each answer as it comes: a JSON line, or a row of a rich table (the header once)."""

    COLUMNS = (("stream time", 11), ("TTFT ms", 8), ("encoded", 7), ("reused", 6), ("dropped", 7), ("answer", None))

    def __init__(self, as_json: bool, plan, n_prompt: int, live: bool = False):
        self.as_json, self.plan, self.n_prompt, self.live, self.first = as_json, plan, n_prompt, live, True

    def __call__(self, answer) -> None:
        from .common import print_json

        if self.as_json:
            print_json(answer.to_dict())
            sys.stdout.flush()
            return
        from rich import box
        from rich.console import Console
        from rich.table import Table

        console = Console(file=sys.stdout)
        if self.first:
            console.print(f"watching: a {self.plan.window_frames}-frame window ({self.plan.window_s:g} s at "
                          f"{self.plan.rate:g} fps, {self.n_prompt} prompt tokens), an answer every "
                          f"{self.plan.every_s:g} s of stream" + (" (live: the newest window each time, frames an "
                          "answer had no time for dropped)" if self.live else ""), highlight=False)
        table = Table(box=box.SIMPLE_HEAD, show_header=self.first, show_edge=False, pad_edge=False)
        for name, width in self.COLUMNS:
            table.add_column(name, width=width, justify="left" if width is None else "right", overflow="fold")
        table.add_row(f"{answer.stream_time_s:.1f} s", f"{answer.ttft_ms:.0f}", str(answer.frames_encoded),
                      str(answer.frames_reused), str(answer.frames_dropped), answer.text.strip())
        console.print(table)
        self.first = False
