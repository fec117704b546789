"""edgevlm export CKPT -o BUNDLE --encoder onnx:fp32,onnx:int8 --decoder gguf:q8_0,gguf:q4_k_m"""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="Hugging Face checkpoint folder")
    parser.add_argument("-o", "--output", required=True, help="bundle folder to create")
    parser.add_argument("--encoder", default="onnx:fp32,onnx:int8", help="comma list of onnx:fp32|fp16|int8 and gguf:f16|f32|q8_0 (llama.cpp's mmproj, "
                        "for llama-mtmd-cli / llama-server / Ollama) ('' for none)")
    parser.add_argument("--decoder", default="gguf:q8_0,gguf:q4_k_m",
                        help="comma list of gguf:f32|f16|q8_0|q6_k|q5_k_m|q4_k_m|q4_0 and mlx:fp32|fp16|8bit|4bit")
    parser.add_argument("--max-tiles", type=int, default=17, help="largest tile batch the encoder graph accepts")
    parser.add_argument("--mlx-group-size", type=int, default=64, choices=(32, 64, 128))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    parser.add_argument("--json", action="store_true", help="print the manifest's artifact list as JSON")


def main(args) -> int:
    import time

    from rich.console import Console

    from ..export.exporter import DECODER_FORMATS, ENCODER_FORMATS, export_checkpoint, parse_requests
    from ..manifest import Manifest
    from .common import print_json, table

    encoders = parse_requests(args.encoder, ENCODER_FORMATS, "encoder")
    decoders = parse_requests(args.decoder, DECODER_FORMATS, "decoder")
    console = Console(stderr=True)
    start = time.perf_counter()
    with console.status("exporting") as status:
        def log(message: str) -> None:
            console.log(message)
            status.update(message.strip())

        def tensor_progress(done: int, total: int, name: str) -> None:
            status.update(f"writing tensors {done}/{total} ({name})")

        out = export_checkpoint(args.checkpoint, args.output, encoders, decoders, max_tiles=args.max_tiles,
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
