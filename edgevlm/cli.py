"""The one entry point. Each subcommand lives in edgevlm/commands/<name>.py with `add_arguments` and `main`;
modules are imported only for the command that runs, and heavy libraries only inside `main`."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import EdgeVLMError

# name -> one-line help (the module edgevlm.commands.<name> is imported lazily)
COMMANDS = {
    "preset": "write a random-weight checkpoint with the exact shapes of a public model",
    "reference": "build (once) and train the small reference VLM on synthetic scenes",
    "inspect": "show family, parameters, shapes and image-token layout of a checkpoint or bundle",
    "export": "export a checkpoint to an edge bundle (ONNX encoder, GGUF/MLX decoder)",
    "run": "answer one prompt about one or more images",
    "watch": "answer over the last seconds of a video file or live stream, every few seconds (video models)",
    "chat": "multi-turn chat about an image (the KV cache is kept between turns)",
    "serve": "serve a bundle over an OpenAI-compatible HTTP API (/v1/chat/completions)",
    "eval": "task accuracy of the reference model on held-out synthetic scenes",
    "verify": "check every artifact and encoder x decoder pair of a bundle against the PyTorch reference",
    "build-engine": "build a TensorRT engine for the encoder on this device",
    "targets": "what this machine can run, and why not the rest",
    "bench": "benchmark a checkpoint or bundle: encode, TTFT, tokens/s, memory, roofline",
    "plan": "will a bundle, checkpoint or preset fit a device: memory item by item, verdict, tokens/s and TTFT",
    "sweep": "run the checkpoint x quantization x device matrix (locally or on a Ray cluster) into one report",
    "agent": "join this machine to a sweep's Ray cluster as a device or build host (or start the head)",
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgevlm", description="Export vision-language models as split graphs and run them on edge devices.")
    parser.add_argument("--version", action="version", version=f"edgevlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(f"edgevlm.commands.{name.replace('-', '_')}").add_arguments(sub_parser)
    return parser


EXPORT_ONLY_PACKAGES = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "sentencepiece")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(f"edgevlm.commands.{args.command.replace('-', '_')}")
    try:
        return int(module.main(args) or 0)
    except EdgeVLMError as exc:
        print(f"edgevlm {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        if exc.name not in EXPORT_ONLY_PACKAGES:
            raise
        # a runtime-only install (edgevlm[runtime]) has no torch or transformers: say which extra brings them
        print(f"edgevlm {args.command}: error: this needs {exc.name}, which a runtime-only install leaves out; "
              "pip install 'edgevlm[export]' (or run a bundle with --encoder/--decoder artifacts, not torch)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
