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
                        "for llama-mtmd-cli / llama-server / Ollama) ('' for none)")
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


def choose_for_device(checkpoint: str, device_id: str, device_file: str | None, encoder: str | None,
                      decoder: str | None) -> tuple[str, str, str]:
    """(encoder, decoder, the line to print): plan_for_device without the tile cap."""
    chosen = plan_for_device(checkpoint, device_id, device_file, encoder, decoder)
    return chosen["encoder"], chosen["decoder"], chosen["line"]


def plan_for_device(checkpoint: str, device_id: str, device_file: str | None, encoder: str | None,
                    decoder: str | None) -> dict:
    """{"encoder", "decoder", "line", "max_tiles", "recommendation"}: the plan's recommendation for each role the user
    did not name, at the runtime's default context and the largest image the preprocessing keeps; when nothing fits
    there, the advice's lowered settings (max_tiles: the tile cap to export with, None to keep --max-tiles). Raises
    BadInputError (one line) when nothing fits even lowered."""
    from ..errors import BadInputError
    from ..plan.advise import recommend
    from ..plan.bundle import PlanRequest, plan_model, recommendation
    from ..plan.devices import get_device
    from ..plan.model import from_checkpoint

    shapes = from_checkpoint(checkpoint)  # refuses a missing or unsupported checkpoint before any probe
    device = get_device(device_id, device_file)
    request, note = _default_request(shapes, device)
    result = plan_model(shapes, device, request)
    advice = recommend(lambda lowered: plan_model(shapes, device, lowered), request, result, shapes.preprocess)
    mib = 1 << 20
    asked, final = advice["asked"], advice["settings"]
    grid = result["images"]["kind"] == "grid"
    where = f"{_image_text(asked, grid)} and {asked['context']:,} positions"
    max_tiles = None
    if advice["status"] == "fits":
        chosen_encoder, chosen_decoder, line = recommendation(result)
    elif advice["status"] == "lowered":
        chosen_encoder, chosen_decoder = advice["encoder"], advice["decoder"]
        knobs, run_time = [], []
        if final["tiles"] < asked["tiles"] and not grid:
            max_tiles = final["tile_cap"] or final["tiles"]
            knobs.append(f"--max-tiles {max_tiles}")
            run_time.append(f"images of at most {max_tiles} tile(s) ({_cap_knob(shapes.preprocess, max_tiles)}: "
                            f"set it in {checkpoint}/preprocessor_config.json before exporting to cap every image; "
                            "--max-tiles bounds the encoder's tile batch only)")
        elif final["image_size"] != asked["image_size"]:
            width, height = final["image_size"]
            knobs.append(f"images of {width}x{height} ({final['tiles']:,} image tokens)")
            run_time.append(f"images of at most {width}x{height} pixels (resize them, or set max_pixels {width * height} "
                            f"in {checkpoint}/preprocessor_config.json before exporting; export has no image-size "
                            "setting)")
        if final["context"] != asked["context"]:
            knobs.append(f"--n-ctx {final['context']}")
            run_time.append(f"run/serve --n-ctx {final['context']} (export has no context setting)")
        knobs = knobs or advice["changes"]
        line = (f"nothing fits {device.id} at {where}; with {' and '.join(knobs)}: {chosen_decoder} + {chosen_encoder} "
                f"fits ({advice['total_bytes'] / mib:,.0f} MiB with its margin, of {advice['usable_bytes'] / mib:,.0f} "
                f"MiB usable); exporting {chosen_decoder} + {chosen_encoder}"
                + (f" with --max-tiles {max_tiles}" if max_tiles is not None else "")
                + f"; at run time use {'; '.join(run_time)}")
    else:
        raise BadInputError(f"nothing fits {device.id} at {where}, nor lowered to {_image_text(final, grid)} and "
                            f"{final['context']:,} positions: the smallest option ({advice['decoder']} + "
                            f"{advice['encoder']}) needs {advice['total_bytes'] / mib:,.0f} MiB with margin of "
                            f"{advice['usable_bytes'] / mib:,.0f} usable; use a device with more memory or a smaller "
                            "model (edgevlm plan CHECKPOINT --device ID shows every option)")
    kept = [f"--{role} {value} as given (the plan chose {chosen})" for role, value, chosen in
            (("encoder", encoder, chosen_encoder), ("decoder", decoder, chosen_decoder)) if value is not None]
    line = f"{note}{line}" + (f"; exporting {'; '.join(kept)}" if kept else "")
    return {"encoder": encoder or chosen_encoder, "decoder": decoder or chosen_decoder, "line": line,
            "max_tiles": max_tiles, "recommendation": advice}


def _default_request(shapes, device):
    """(request, note): the runtime's default context and the largest image the preprocessing keeps; a
    native-resolution model whose largest image takes more positions than that context (Qwen2-VL's default
    max_pixels: 16,384 image tokens) is asked at that image's area halved until it fits, and the note says so."""
    import math
    from dataclasses import replace

    from ..plan.budget import image_tokens, largest_image
    from ..plan.bundle import PlanRequest, resolve_context
    from ..runtimes.llamacpp import DEFAULT_N_CTX

    request = PlanRequest()
    if shapes.preprocess.resize_rule != "qwen2vl":
        return request, ""
    context = resolve_context(None, shapes.decoder.context_length, DEFAULT_N_CTX)
    room = context - request.prompt_tokens - request.new_tokens  # the image, its prompt and its answer in the context

    def count(width: int, height: int) -> int:
        return image_tokens(shapes.layout, shapes.preprocess, width, height).positions

    first = width, height = largest_image(shapes.preprocess)
    while count(width, height) > room and min(width, height) > shapes.preprocess.tile_size[0]:
        width, height = round(width / math.sqrt(2)), round(height / math.sqrt(2))
    if (width, height) == first:
        return request, ""
    return replace(request, image_size=(width, height)), (
        f"the largest image ({first[0]}x{first[1]}, {count(*first):,} image tokens) takes more than the default context; "
        f"planned at {width}x{height}: ")


def _image_text(settings: dict, grid: bool) -> str:
    if grid:
        width, height = settings["image_size"]
        return f"a {width}x{height} image ({settings['tiles']:,} image tokens)"
    return f"{settings['tiles']} tile(s)"


def _cap_knob(preprocess, cap: int) -> str:
    """The processor's setting that caps an image at `cap` tiles (plan/advise.py's wording)."""
    from ..plan.advise import _cap_knob as knob
    from ..plan.budget import cap_tiles

    return knob(cap_tiles(preprocess, cap))
