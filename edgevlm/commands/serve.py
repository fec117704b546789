"""edgevlm serve PATH: an OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, GET /health)."""
from __future__ import annotations

import sys

# Two users at once by default: on llama.cpp the slots share one KV pool of --n-ctx positions (no more memory than
# one), and two decode steps in one llama_decode cost little more than one on a memory-bound device; more slots
# split the same pool further, so larger N is a choice (--parallel 4 for a small team).
DEFAULT_PARALLEL = 2
# requests waiting beside the --parallel answering ones: a burst of 3x the slots is queued, never refused (issue 32)
DEFAULT_QUEUE_MIN = 8


def default_queue(parallel: int) -> int:
    return max(DEFAULT_QUEUE_MIN, 2 * parallel)


def add_arguments(parser) -> None:
    from .common import add_backend_arguments

    parser.add_argument("path", help="checkpoint folder or bundle")
    add_backend_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--queue", type=int, default=None,
                        help=f"requests that may wait beside the --parallel answering ones; more get 429 with "
                             f"Retry-After (default max({DEFAULT_QUEUE_MIN}, 2 x --parallel): a burst of 3x the slots)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take (504 after)")
    parser.add_argument("--socket-timeout", type=float, default=30.0,
                        help="seconds a client may stall sending or reading before its connection is dropped")
    parser.add_argument("--max-connections", type=int, default=64, help="open connections at once (503 beyond)")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set EDGEVLM_API_KEY) "
                                                        "on every route but the chat page")
    parser.add_argument("--public-metrics", action="store_true",
                        help="answer /health and /metrics without the API key (a scraper on a trusted network)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="keep image embeddings and image-prefix KV states here across restarts")
    parser.add_argument("--cache-dir-mb", type=float, default=2048.0, help="bound of --cache-dir (default 2048 MiB)")
    parser.add_argument("--conversation-cache-mb", type=float, default=256.0,
                        help="RAM for the sequence states of conversations whose slot went to another one, restored "
                             "when they continue instead of prefilled again (default 256 MiB; 0: off)")
    parser.add_argument("--parallel", type=int, default=None, metavar="N",
                        help=f"requests answered at once, their decode steps batched in one llama_decode and sharing "
                             f"one KV pool of --n-ctx positions (default {DEFAULT_PARALLEL} for a gguf decoder; MLX and "
                             "torch decoders serve one at a time and refuse N > 1)")
    parser.add_argument("--encode-threads", type=int, default=None, metavar="N",
                        help="threads of the image encoder, which runs beside the other slots' decodes with --parallel "
                             "N > 1; the decoder gives them up while an encode runs (default: half of --threads, at "
                             "least 1: on 2 cores, encode 1 + decode 1 during an encode, decode 2 otherwise; 0: "
                             "encode on the engine thread with all threads, pausing the other slots' decode)")
    parser.add_argument("--allow-local-images", default=None, metavar="DIR",
                        help="let requests name image files under DIR (default: data URLs only)")


def open_server(args):
    """The server `main` runs, listening but not yet serving, with its session, options and model name: the decoder's
    context opened once, with as many sequences as requests it answers at once (tests build it here too)."""
    import os
    from pathlib import Path

    from ..errors import BadInputError
    from ..loading import holds_sequences
    from ..serve import ServerOptions, make_server
    from .common import backend_options, load_session_checked

    if not 0 <= args.port <= 65535:
        raise BadInputError(f"--port must be 0..65535, got {args.port}")
    parallel = args.parallel
    if parallel is None:
        parallel = DEFAULT_PARALLEL if holds_sequences(args.path, args.decoder) else 1
    queue = default_queue(parallel) if args.queue is None else args.queue
    server_options = ServerOptions(queue, args.request_timeout, args.socket_timeout,
                                   args.api_key or os.environ.get("EDGEVLM_API_KEY") or None, args.allow_local_images,
                                   args.max_connections, args.cache_dir,
                                   int(args.cache_dir_mb * (1 << 20)) if args.cache_dir_mb == args.cache_dir_mb
                                   else -1,  # validated before the model loads (NaN is refused)
                                   parallel, public_metrics=args.public_metrics,
                                   conversation_cache_bytes=int(args.conversation_cache_mb * (1 << 20))
                                   if args.conversation_cache_mb == args.conversation_cache_mb else -1,
                                   encode_threads=args.encode_threads)
    options = {**backend_options(args), "n_seq": parallel}
    if parallel > 1 and args.encode_threads != 0:  # the encoder runs beside the decodes: its own share of the cores
        from ..backends import thread_count
        from ..runtimes.encode_worker import default_encode_threads

        options["encoder_threads"] = args.encode_threads or default_encode_threads(thread_count(args.threads))
    session = load_session_checked(args, options)
    model = f"{Path(args.path).resolve().name}:{session.decoder_name}"
    return make_server(session, model, args.host, args.port, server_options), session, server_options, model


def main(args) -> int:
    server, session, server_options, model = open_server(args)
    host, port = server.server_address[:2]
    if host not in ("127.0.0.1", "::1", "localhost") and not server_options.api_key:
        print(f"warning: listening on {host} without --api-key: anyone who reaches this port can use the model",
              file=sys.stderr)
    print(f"edgevlm serve: {model} ({session.encoder_name} encoder) on http://{host}:{port}/v1/chat/completions, "
          f"{server_options.parallel} at once (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
