"""Small helpers shared by the subcommands: output for people (rich tables) and for machines (one JSON line)."""
from __future__ import annotations

import json
import sys
from typing import Any, Iterable


def print_json(data: Any) -> None:
    print(json.dumps(data, default=_default))


def _default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[Any]], file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    Console(file=file or sys.stdout).print(t)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def add_sampling_arguments(parser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)


def add_video_arguments(parser) -> None:
    parser.add_argument("--video", default=None, help="a video file (SmolVLM2, Qwen-VL): frames sampled as the model's "
                        "processor does")
    parser.add_argument("--max-frames", type=int, default=None, help="most video frames (default: the processor's)")
    parser.add_argument("--fps", type=float, default=None, help="video frames sampled per second (default: the "
                        "processor's)")


def video_request(args, images=()):
    """The --video request with its file's header read once, now (so a bad video fails before a model loads); the
    context's size, the prompt's layout and the decoding reuse that probe. None without --video."""
    from ..errors import BadInputError

    if args.video is None:
        if args.max_frames is not None or args.fps is not None:
            raise BadInputError("--max-frames and --fps apply to a video; pass --video FILE")
        return None
    if images:
        raise BadInputError("pass --video or --image, not both")
    from ..runtimes.video_prompt import VideoRequest

    return VideoRequest(args.video, args.max_frames, args.fps).probed()  # the limits' one-line errors, then the header


def sampling_kwargs(args) -> dict:
    from ..errors import BadInputError
    from ..runtimes.sampling import SamplingConfig

    try:
        SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    except ValueError as exc:
        raise BadInputError(f"{exc}; fix the sampling option") from None
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def add_backend_arguments(parser) -> None:
    parser.add_argument("--encoder", default=None, help="encoder artifact, e.g. onnx:int8 (bundle) or torch")
    parser.add_argument("--decoder", default=None, help="decoder artifact, e.g. gguf:q4_k_m, mlx:4bit (bundle) or torch")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every backend, the PyTorch reference included (default: physical cores)")
    parser.add_argument("--provider", default=None, help="force an ONNX Runtime provider (cpu, cuda, tensorrt, coreml)")
    parser.add_argument("--verify-hashes", action="store_true",
                        help="hash every artifact file before loading it (default: once per file version)")
    add_memory_arguments(parser)
    add_flash_attn_argument(parser)


def add_flash_attn_argument(parser) -> None:
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                        help="llama.cpp flash attention (default auto: on a CPU, the faster of on and off as measured "
                             "once on this CPU and cached under ~/.cache/edgevlm/flash-attn, and on for serve "
                             "--parallel N > 1, whose sequences share one KV pool; on a GPU, llama.cpp's own)")


def flash_attn_option(args) -> dict:
    """{"flash_attn": True/False} for --flash-attn on/off; {} for auto (the decoder chooses)."""
    choice = getattr(args, "flash_attn", "auto") or "auto"
    return {} if choice == "auto" else {"flash_attn": choice == "on"}


def add_memory_arguments(parser) -> None:
    parser.add_argument("--n-ctx", type=int, default=None,
                        help="decoder context in positions (default: run, eval and bench size llama.cpp's to the job, "
                             "prompt + images + max tokens rounded up to 256; otherwise the model's, at most 4096, "
                             "since llama.cpp allocates the KV cache whole at load)")
    parser.add_argument("--embed-cache-mb", type=float, default=None, help="image-embedding cache bound (default 256)")
    parser.add_argument("--prefix-cache-mb", type=float, default=None, help="prefix KV-state cache bound (default 512)")


def memory_options(args) -> dict:
    from ..errors import BadInputError

    options = {}
    if getattr(args, "n_ctx", None) is not None:
        if not 16 <= args.n_ctx <= MAX_N_CTX:
            raise BadInputError(f"--n-ctx must be 16..{MAX_N_CTX} (and at most the model's context), got {args.n_ctx}")
        options["n_ctx"] = args.n_ctx
    for flag, key in (("embed_cache_mb", "embed_cache_bytes"), ("prefix_cache_mb", "prefix_cache_bytes")):
        value = getattr(args, flag, None)
        if value is not None:
            if not 0 <= value <= 1 << 20:  # NaN fails too
                raise BadInputError(f"--{flag.replace('_', '-')} must be 0..{1 << 20} MiB, got {value}")
            options[key] = int(value * (1 << 20))
    return options


MAX_N_CTX = 1 << 20


def check_threads(threads: int | None) -> None:
    from ..backends import thread_count

    if threads is not None:
        thread_count(threads)


def backend_options(args) -> dict:
    from ..errors import BadInputError

    options = memory_options(args) | flash_attn_option(args)
    check_threads(getattr(args, "threads", None))
    for name in ("threads", "provider"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


def load_session_checked(args, options: dict):
    """Load the session of run/chat/serve. First, from the manifest alone, the planner's verdict on whether the pair
    that will run, at this context and these cache bounds, fits the memory available now: a warning line on stderr
    when it is tight, does not fit, or could not be checked (never silence for a failed check)."""
    from .. import hash_stamps, load
    from ..plan.fit import fit_check, machine_before_load

    if getattr(args, "verify_hashes", False):
        hash_stamps.always_rehash()
    encoder, decoder = chosen_pair(args.path, args.encoder, args.decoder)
    if encoder is not None:
        check = fit_check(args.path, machine_before_load(), encoder, decoder, options.get("n_ctx"),
                          options.get("embed_cache_bytes"), options.get("prefix_cache_bytes"),
                          options.get("n_seq", 1))  # serve --parallel N: N sequences in one context
        if check.message:
            print(check.message, file=sys.stderr)
    return load(args.path, encoder=encoder or args.encoder, decoder=decoder or args.decoder, **options)


def chosen_pair(path, encoder: str | None, decoder: str | None) -> tuple[str | None, str | None]:
    """The encoder and decoder a bundle will run (its defaults where not chosen); (None, None) for a checkpoint."""
    from pathlib import Path

    from ..manifest import MANIFEST, Manifest
    from ..runtimes.bundle_loader import DECODER_PREFERENCE, ENCODER_PREFERENCE, pick

    if not (Path(path) / MANIFEST).is_file():
        return None, None
    manifest = Manifest.load(path)
    return (pick(manifest, "encoder", encoder, ENCODER_PREFERENCE),
            pick(manifest, "decoder", decoder, DECODER_PREFERENCE))
