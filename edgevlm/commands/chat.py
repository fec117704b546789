"""edgevlm chat PATH [--image IMG | --video FILE [--max-frames N] [--fps F]]: a multi-turn REPL; the decoder keeps
the sequence between turns. The image or the video is the first turn's attachment."""
from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    from .common import add_backend_arguments, add_sampling_arguments, add_video_arguments

    parser.add_argument("path", help="checkpoint folder or bundle")
    parser.add_argument("--image", action="append", default=[], help="image for the first turn (repeatable)")
    add_video_arguments(parser)
    add_sampling_arguments(parser)
    add_backend_arguments(parser)
    parser.add_argument("--verbose", action="store_true", help="show timings and cache hits after each answer")


def main(args) -> int:
    from ..images import load_image
    from .common import load_session_checked, sampling_kwargs, video_request

    kwargs = sampling_kwargs(args)
    images = [load_image(p) for p in args.image]
    video = video_request(args, images)  # a bad video fails before the model loads
    session = load_session_checked(args, _options(args))
    conversation = None
    if video is not None:
        from ..video.chat import VideoConversation

        conversation = VideoConversation(session, video)

    def show(text: str) -> None:
        print(text, end="", flush=True)

    print(f"edgevlm chat: {session.encoder_name} encoder + {session.decoder_name} decoder. "
          "Empty line or Ctrl-D to quit, /reset to start over.", file=sys.stderr)
    first = True
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            session.reset()
            if conversation is not None:
                conversation.reset()
            first = True
            continue
        print("vlm> ", end="", flush=True)
        if conversation is not None:
            result = conversation.ask(line, on_text=show, **kwargs)
        else:
            result = session.chat(line, image=images if first and images else None, on_text=show, **kwargs)
        print()
        first = False
        if args.verbose:
            t = result.timings
            print(f"  [ttft {t['ttft_ms']:.0f} ms, prefill {t['prefill_ms']:.0f} ms for {t['n_prefilled_positions']} "
                  f"new positions ({t['n_reused_positions']} reused), encode {t['encode_ms']:.0f} ms, "
                  f"{t['decode_tok_s']:.1f} tok/s, embed cache hits {t['embed_cache_hits']}, "
                  f"prefix cache hits {t['prefix_cache_hits']}, video units encoded {t['video_units_encoded']} "
                  f"reused {t['video_units_reused']}]", file=sys.stderr)
    return 0


def _options(args) -> dict:
    from .common import backend_options

    return backend_options(args)
