"""edgevlm serve PATH: an OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models, GET /health)."""
from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    from .common import add_backend_arguments

    parser.add_argument("path", help="checkpoint folder or bundle")
    add_backend_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000)


def main(args) -> int:
    from pathlib import Path

    from .. import load
    from ..server import make_server
    from .common import backend_options

    from ..plan.fit import fit_warning, machine_before_load

    machine = machine_before_load()
    options = backend_options(args)
    session = load(args.path, encoder=args.encoder, decoder=args.decoder, **options)
    warning = fit_warning(args.path, machine, session.encoder_name, session.decoder_name, options.get("n_ctx"),
                          options.get("embed_cache_bytes"), options.get("prefix_cache_bytes"))
    if warning:
        print(warning, file=sys.stderr)
    model = f"{Path(args.path).resolve().name}:{session.decoder_name}"
    server = make_server(session, model, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"edgevlm serve: {model} ({session.encoder_name} encoder) on http://{host}:{port}/v1/chat/completions "
          "(Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
