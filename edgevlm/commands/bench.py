"""edgevlm bench PATH [...]: encode, TTFT (cold and warm), prefill and decode rates, memory, roofline."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("path", help="bundle (or checkpoint: PyTorch reference only)")
    parser.add_argument("--target", default=None, help="cpu | cuda | jetson-orin | apple-silicon (filters the decoders)")
    parser.add_argument("--encoder", default=None, help="comma list (default: every encoder but fp16)")
    parser.add_argument("--decoder", default=None, help="comma list (default: every decoder)")
    parser.add_argument("--image-size", default="512x512", help="WxH of the test image")
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads for every run, the PyTorch reference included")
    parser.add_argument("--peers", default="torch,llamacpp",
                        help="comma list of torch, llamacpp, mlx-vlm, ort-genai ('' for none)")
    parser.add_argument("--mlx-vlm-python", default=None,
                        help="the Python of the mlx-vlm peer's environment (default: the one "
                             "benchmarks/build_mlx_vlm_env.sh builds, or $EDGEVLM_MLX_VLM_PYTHON)")
    parser.add_argument("--peer-repeats", type=int, default=None,
                        help="repeats for the other libraries' peers (mlx-vlm; default --repeats)")
    parser.add_argument("--llamacpp-bin", default=None, help="folder with llama.cpp binaries (llama-bench, llama-mtmd-cli)")
    parser.add_argument("--encoder-only", action="store_true", help="per-tile encode latency of every encoder only")
    parser.add_argument("--accuracy", type=int, default=0, metavar="N",
                        help="also score N reference-scene questions per run (task accuracy drift; for the reference model)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every backend pair in this process (faster to start; peak RSS then accumulates)")
    parser.add_argument("--torch-dtype", default="float32", choices=("float32", "auto"),
                        help="the PyTorch reference's weights: float32, or auto (as the checkpoint stores them, e.g. "
                             "bf16 where a float32 copy would not fit in memory)")
    parser.add_argument("--video", default=None, help="the video workload on this clip (cold TTFT, a second "
                        "question, a stride run over the same file) instead of the image one")
    parser.add_argument("--video-seconds", type=float, default=None, help="the video workload on a generated clip of "
                        "this many seconds (moving shapes, 640x360 at 10 fps)")
    parser.add_argument("--video-stride-seconds", type=float, default=None, help="the generated clip the stride run "
                        "slides over (default 3x --video-seconds)")
    parser.add_argument("--video-every", default="2s", help="the stride run's answer interval (default 2s)")
    parser.add_argument("--video-window", default=None, help="the stride run's window (default: the clip's length, at "
                        "most what the processor samples whole)")
    parser.add_argument("-o", "--output", default=None, help="folder for bench.json, bench.md, bench.png")
    from .common import add_flash_attn_argument, add_memory_arguments

    add_memory_arguments(parser)
    add_flash_attn_argument(parser)


def main(args) -> int:
    import json
    import shlex
    import sys
    from pathlib import Path

    from rich.console import Console

    from ..bench import harness, report
    from ..bench.run import encoder_only, run_bench
    from .common import flash_attn_option, memory_options

    console = Console(stderr=True)
    command = "edgevlm bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"] else "edgevlm bench"
    from ..errors import BadInputError

    if not 0 <= args.accuracy <= 100_000:
        raise BadInputError(f"--accuracy must be 0..100000 questions, got {args.accuracy}")
    if args.video is not None or args.video_seconds is not None:
        return _video(args, console, command)
    with console.status("benchmarking") as status:
        def progress(message: str) -> None:
            status.update(message)

        if args.encoder_only:
            result = encoder_only(args.path, repeats=args.repeats, threads=args.threads, progress=progress)
        else:
            scenario = harness.Scenario(harness.parse_size(args.image_size), args.prompt_tokens, args.new_tokens,
                                        args.repeats, args.threads, torch_dtype=args.torch_dtype,
                                        **memory_options(args), **flash_attn_option(args))
            result = run_bench(args.path, scenario, args.encoder, args.decoder, args.peers, args.target,
                               args.llamacpp_bin, progress, isolate=not args.in_process,
                               accuracy_n=args.accuracy, mlx_vlm_python=args.mlx_vlm_python,
                               peer_repeats=args.peer_repeats)
    if args.encoder_only:
        from .common import table

        table(f"per-tile encode latency ({args.path}, {args.threads} threads, median of {args.repeats})",
              ["encoder", "backend", "ms/tile", "min", "max", "vs torch"],
              [(r["encoder"], r["backend"], r["ms_per_tile"]["median"], r["ms_per_tile"]["min"], r["ms_per_tile"]["max"],
                f"{r['vs_torch']:.2f}x") for r in result["runs"]], file=sys.stderr)
        if args.output:
            Path(args.output).mkdir(parents=True, exist_ok=True)
            (Path(args.output) / "encoder.json").write_text(json.dumps(result, indent=2) + "\n")
    else:
        report.print_table(result, Console(stderr=True, width=200))
        if args.output:
            files = report.write(result, Path(args.output), command)
            console.print("wrote " + ", ".join(str(p) for p in files.values()))
    print(json.dumps(result))  # the last stdout line is the JSON summary
    return 0


def _video(args, console, command: str) -> int:
    """The video workload (edgevlm/bench/video.py): its table, bench.json and bench.md, the JSON last on stdout."""
    import json
    from pathlib import Path

    from ..bench import harness, video
    from ..video.window import parse_seconds
    from .common import flash_attn_option, memory_options

    every = parse_seconds(args.video_every, "--video-every")
    window = parse_seconds(args.video_window, "--video-window") if args.video_window is not None else None
    scenario = harness.Scenario(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=args.repeats,
                                threads=args.threads, torch_dtype=args.torch_dtype, **memory_options(args),
                                **flash_attn_option(args))
    with video.scratch_folder() as scratch, console.status("benchmarking video") as status:
        workload = video.make_workload(Path(scratch), args.video, args.video_seconds, args.video_stride_seconds,
                                       every, window)
        result = video.run_video_bench(args.path, scenario, workload, args.encoder, args.decoder, args.peers,
                                       args.target, args.llamacpp_bin, status.update, isolate=not args.in_process)
    video.print_table(result, console)
    if args.output:
        files = video.write(result, Path(args.output), command)
        console.print("wrote " + ", ".join(str(p) for p in files.values()))
    print(json.dumps(result))  # the last stdout line is the JSON summary
    return 0
