"""edgevlm export CKPT -o BUNDLE --encoder onnx:fp32,onnx:int8 --decoder gguf:q8_0,gguf:q4_k_m
edgevlm export CKPT -o BUNDLE --for DEVICE: the encoder precision and decoder quantization the planner recommends for
that device (the most accurate pair that fits with its margin, at the runtime's default context and the largest image
the preprocessing keeps), with one line saying which and why. An explicit --encoder or --decoder wins over --for's
choice for that role, and the line says so. When nothing fits at those settings, the planner's advice (plan/advise.py:
a lower tile cap, a smaller image, a shorter context) picks the option that then fits, and the line says what was
lowered: a tile cap is exported as --max-tiles (the encoder's tile batch) and named as the processor's knob that caps
the image's tiles; an image size (native-resolution models) and a context have no export setting, so the line says
what to use at run time (images at most WxH; run/serve --n-ctx N). When nothing fits even lowered: one line, exit 2."""
from __future__ import annotations

DEFAULT_ENCODER = "onnx:fp32,onnx:int8"
DEFAULT_DECODER = "gguf:q8_0,gguf:q4_k_m"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="Hugging Face checkpoint folder")
    parser.add_argument("-o", "--output", required=True, help="bundle folder to create")
    parser.add_argument("--encoder", default=None, help=f"(default {DEFAULT_ENCODER}) comma list of onnx:fp32|fp16|int8 and gguf:f16|f32|q8_0 (llama.cpp's mmproj, "
                        "for llama-mtmd-cli / llama-server / Ollama) and mlx:fp16|8bit|4bit|fp32 (the vision half on MLX, for a Mac) "
                        "('' for none)")
    parser.add_argument("--decoder", default=None,
                        help=f"(default {DEFAULT_DECODER}) comma list of gguf:f32|f16|q8_0|q6_k|q5_k_m|q4_k_m|q4_0 and mlx:fp32|fp16|8bit|4bit")
    parser.add_argument("--max-tiles", type=int, default=17, help="largest tile batch the encoder graph accepts")
    parser.add_argument("--mlx-group-size", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    parser.add_argument("--json", action="store_true", help="print the manifest's artifact list as JSON")
    parser.add_argument("--for", dest="for_device", default=None, metavar="DEVICE",
                        help="export what `edgevlm plan CKPT --device DEVICE` recommends (explicit --encoder/--decoder win)")
    parser.add_argument("--device-file", default=None, help="more devices for --for (schema: edgevlm/plan/devices.json)")


def main(args) -> int:
    import sys
    import time

    from rich.console import Console

    from ..export.exporter import DECODER_FORMATS, ENCODER_FORMATS, export_checkpoint, parse_requests
    from ..manifest import Manifest
    from .common import print_json, table

    encoder, decoder, max_tiles = args.encoder, args.decoder, args.max_tiles
    if args.for_device:
        from ..plan.for_device import plan_for_device

        chosen = plan_for_device(args.checkpoint, args.for_device, args.device_file, encoder, decoder)
        encoder, decoder = chosen["encoder"], chosen["decoder"]
        if chosen["max_tiles"] is not None:
            max_tiles = min(max_tiles, chosen["max_tiles"])
        print(chosen["line"], file=sys.stderr if args.json else sys.stdout)  # --json keeps stdout one JSON object
    encoders = parse_requests(DEFAULT_ENCODER if encoder is None else encoder, ENCODER_FORMATS, "encoder")
    decoders = parse_requests(DEFAULT_DECODER if decoder is None else decoder, DECODER_FORMATS, "decoder")
    console = Console(stderr=True)
    start = time.perf_counter()
    with console.status("exporting") as status:
        def log(message: str) -> None:
            console.log(message)
            status.update(message.strip())

        def tensor_progress(done: int, total: int, name: str) -> None:
            status.update(f"writing tensors {done}/{total} ({name})")

        out = export_checkpoint(args.checkpoint, args.output, encoders, decoders, max_tiles=max_tiles,
                                force=args.force, progress=log,
                                options={"threads": args.threads, "group_size": args.mlx_group_size,
                                         "tensor_progress": tensor_progress})
    manifest = Manifest.load(out)
    rows = [(a.name, a.role, a.precision, a.bytes / 2**20, a.path) for a in manifest.artifacts]
    if args.json:
        print_json({"bundle": str(out), "seconds": time.perf_counter() - start,
                    "artifacts": [{"name": r[0], "role": r[1], "precision": r[2], "mib": r[3], "path": r[4]} for r in rows]})
    else:
        table(f"{out} ({time.perf_counter() - start:.1f} s)", ["artifact", "role", "precision", "MiB", "path"], rows)
    return 0
