"""edgevlm plan (BUNDLE | CHECKPOINT | --preset NAME) --device ID [--images N] [--image-size WxH] [--context N]
[--max-tiles N] [--parallel N] [--prompt-tokens N] [--new-tokens N] [--video-seconds S [--fps F] [--max-frames N]
[--video-size WxH]] [--json] [--png F]:
will each decoder x encoder fit the device, item by item, and how fast will it decode and answer (TTFT). A bundle is
planned from its files; a checkpoint or a preset before any export, for every quantization `edgevlm export` writes.
Ends with a recommendation (plan/advise.py): the most accurate option that fits with its margin, else what to lower
first (the image's tile cap or size, then the context) and which option then fits.
With --video-seconds (a bundle with a video section), one request about a clip that long: its frames x tokens per
frame (per temporal patch for Qwen), the positions, and the longest clip that fits the context and each option's
memory (plan/video.py). `--device this-machine` measures this machine; `--device-file F` adds devices (schema:
edgevlm/plan/devices.json)."""
from __future__ import annotations

MIB = 1 << 20
ITEMS = ("decoder_weights", "encoder_weights", "encoder_activations", "kv_cache", "compute_buffer", "caches",
         "runtime_overhead", "margin")


def add_arguments(parser) -> None:
    parser.add_argument("path", nargs="?", default=None,
                        help="an edge bundle (folder with manifest.json) or a checkpoint folder (config.json)")
    parser.add_argument("--preset", default=None, help="plan a preset's shapes instead (edgevlm preset --list)")
    parser.add_argument("--device", required=True, help="device id from the table (or this-machine, measured here)")
    parser.add_argument("--device-file", default=None, help="a JSON file of more devices (same schema as the table)")
    parser.add_argument("--images", type=int, default=1, help="images in one conversation (default 1)")
    parser.add_argument("--image-size", default=None,
                        help="WIDTHxHEIGHT of each image (default: the largest the preprocessing keeps)")
    parser.add_argument("--context", type=int, default=None,
                        help="positions per sequence (default: the runtime's, at most 4096 and the model's)")
    parser.add_argument("--max-tiles", type=int, default=None,
                        help="tile cap per image, global view included (tiled models; default: the preprocessing's)")
    parser.add_argument("--parallel", type=int, default=1, help="sequences decoded together (default 1)")
    parser.add_argument("--embed-cache-mb", type=float, default=None, help="image-embedding cache bound (default 256)")
    parser.add_argument("--prefix-cache-mb", type=float, default=None, help="prefix KV-state cache bound (default 512)")
    parser.add_argument("--prompt-tokens", type=int, default=24,
                        help="text tokens of the one request the one-request peak describes (default 24, as bench)")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="tokens that request generates (default 64, as bench)")
    parser.add_argument("--video-seconds", type=float, default=None,
                        help="plan one question about a clip this long (a bundle with a video section)")
    parser.add_argument("--fps", type=float, default=None, help="video frames sampled per second (default: the "
                        "processor's; with --video-seconds)")
    parser.add_argument("--max-frames", type=int, default=None, help="most video frames (default: the processor's)")
    parser.add_argument("--video-size", default=None, help="WIDTHxHEIGHT of the clip's frames (default 1280x720)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    parser.add_argument("--png", default=None, metavar="FILE",
                        help="also draw the plan: stacked memory bars per option with the device's usable line")


def main(args) -> int:
    from ..plan.advise import recommend
    from ..plan.bundle import PlanRequest, parse_image_size
    from ..plan.devices import get_device
    from .common import memory_options, print_json

    plan, preprocess = planner(args.path, args.preset)
    device = get_device(args.device, args.device_file)
    caches = memory_options(args)  # validates the two cache bounds the way run/serve do
    request = PlanRequest(images=args.images, image_size=parse_image_size(args.image_size) if args.image_size else None,
                          context=args.context, parallel=args.parallel,
                          embed_cache_bytes=caches.get("embed_cache_bytes"),
                          prefix_cache_bytes=caches.get("prefix_cache_bytes"),
                          prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, max_tiles=args.max_tiles)
    video = video_query(args)
    if video is not None:
        from ..plan.video import VideoCounter, plan_video

        result, section, request = plan_video(VideoCounter(args.path), video, plan, device, request)
        result["video"] = section  # its recommendation lowers the clip, not the image
    else:
        result = plan(device, request)
        result["recommendation"] = recommend(lambda lowered: plan(device, lowered), request, result, preprocess)
    if args.png:
        plot(result, args.png)
    if args.json:
        print_json(result)
    else:
        show(result)
    return 0


def video_query(args):
    """The clip --video-seconds asks about, or None; the video options without it, or on a checkpoint, refused."""
    from pathlib import Path

    from ..errors import BadInputError

    if args.video_seconds is None:
        if args.fps is not None or args.max_frames is not None or args.video_size is not None:
            raise BadInputError("--fps, --max-frames and --video-size plan a video; pass --video-seconds S")
        return None
    if args.path is None or not (Path(args.path) / "manifest.json").is_file():
        raise BadInputError("--video-seconds plans a bundle's video section; pass an exported BUNDLE folder")
    from ..plan.bundle import parse_image_size
    from ..plan.video import DEFAULT_VIDEO_SIZE, VideoQuery

    size = parse_image_size(args.video_size) if args.video_size else DEFAULT_VIDEO_SIZE
    return VideoQuery(args.video_seconds, args.fps, args.max_frames, size)


def planner(path: str | None, preset: str | None):
    """((device, request) -> plan, the preprocessing) for a bundle, a checkpoint or a preset; bad input is refused
    before any probe. The preprocessing is what the recommendation lowers the image by."""
    from pathlib import Path

    from ..errors import BadInputError
    from ..plan.bundle import plan_bundle, plan_model
    from ..plan.model import from_checkpoint, from_preset

    if (path is None) == (preset is None):
        raise BadInputError("plan one thing: a BUNDLE or CHECKPOINT folder, or --preset NAME (not both)")
    if preset is not None:
        shapes = from_preset(preset)
        return (lambda device, request: plan_model(shapes, device, request)), shapes.preprocess
    if (Path(path) / "manifest.json").is_file():
        from ..manifest import Manifest

        return (lambda device, request: plan_bundle(path, device, request)), Manifest.load(path).preprocess
    if not (Path(path) / "config.json").is_file():
        raise BadInputError(f"{path} is neither a bundle (manifest.json) nor a checkpoint folder (config.json); pass "
                            "one of those, or --preset NAME")
    shapes = from_checkpoint(path)
    return (lambda device, request: plan_model(shapes, device, request)), shapes.preprocess


def title(result: dict) -> str:
    return result["bundle"] if "bundle" in result else f"{result['model']['name']} ({result['model']['source']})"


def images_text(images: dict) -> str:
    """The images line: tiles of a tiled model, the merged-patch grid of a native-resolution one."""
    head = f"{images['count']} x {images['width']}x{images['height']}"
    if images["kind"] == "grid":
        return (f"{head}: {images['rows']}x{images['cols']} = {images['n_tiles']} image tokens ({images['patches'] or 0} "
                f"patches, one encoder call per image; at most {images['max_tiles']} tokens)")
    cap = f", capped at {images['tile_cap']}" if images["tile_cap"] else ""
    return (f"{head}: {images['n_tiles']} tiles ({images['rows']}x{images['cols']} + global) of {images['max_tiles']} "
            f"max{cap}")


def ttft_text(option: dict) -> str:
    t = option["ttft"]
    if t["ttft_s"] is None:
        return "-" if t["prefill_s"] is None else f"? + {t['prefill_s']:.2f} prefill"
    return f"{t['ttft_s']:.2f} ({t['encode_s']:.2f} + {t['prefill_s']:.2f})"


def show(result: dict) -> None:
    from .common import table

    device, images = result["device"], result["images"]
    table(f"{device['name']} ({device['id']})", ["field", "value"], [
        ("usable memory MiB", result["usable_bytes"] / MIB), ("basis", device["usable_basis"]),
        ("bandwidth GB/s", device["bandwidth_gbs"]), ("decode efficiency",
                                                     ", ".join(f"{d} {e}" for d, e in result["decode_efficiency"].items())),
        ("context / sequence", result["context"]), ("sequences", result["parallel"]),
        ("KV positions (llama.cpp, padded)", result["n_ctx"]),
        ("images", images_text(images)),
        ("positions per image", f"{images['positions_per_image']} ({images['image_rows']} image rows + "
                                f"{images['text_tokens']} text, {'counted' if images['text_tokens_exact'] else 'assumed'})"),
    ])
    if "model" in result:
        model = result["model"]
        per_tile, per_image = model["vision_gflops_per_tile"], model.get("vision_gflops_per_image")
        flops = f"{per_tile:,.1f} GFLOP per tile" if per_tile is not None else \
            f"{per_image or 0:,.1f} GFLOP for this image, quadratic in its patches"
        print(f"{model['family']}: decoder blocks {model['decoder_params'] / 1e6:,.1f} M parameters, vision "
              f"{model['vision_params'] / 1e6:,.1f} M ({flops}); encoder terms are estimates, not measured (export, "
              "then plan the bundle to measure them)")
    if "video" in result:
        show_video(result["video"])
    options = result["options"]
    if len(options) > 6:  # a plan before export: one row per option
        show_rows(result)
        return
    rows = [(item.replace("_", " "), *[o["memory"][item] / MIB for o in options]) for item in ITEMS]
    one = result["one_request"]
    rows += [("total", *[o["memory"]["total"] / MIB for o in options]), ("verdict", *[o["verdict"] for o in options]),
             (f"one request's peak ({one['positions']} positions; bench's peak RSS)",
              *[o["peak_one_request"] / MIB for o in options]),
             ("decode tok/s (after the images)", *[o["decode_tok_s"] for o in options]),
             ("decode tok/s (full context)", *[o["decode_tok_s_full_context"] for o in options]),
             (f"TTFT s, estimate ({result['ttft_prompt_positions']} positions: encode + prefill)",
              *[ttft_text(o) for o in options])]
    table(f"memory (MiB) and speed: {title(result)}",
          ["item", *[f"{o['encoder']} + {o['decoder']}" for o in options]], rows)
    footer(result)


def show_video(video: dict) -> None:
    from .common import table

    unit, units = video["unit"], f"{video['unit']}es" if video["unit"].endswith("h") else f"{video['unit']}s"

    def longest(key: str) -> str:
        value = video["largest_clip_s"][key]
        return "none" if value is None else "any length" if key in video["any_length"] else f"{value:g} s"

    table(f"video: {video['seconds']:g} s of {video['width']}x{video['height']} at {video['source_fps']:g} fps",
          ["field", "value"], [
              ("sampling", f"{video['sampling_fps']:g} fps, at most {video['max_frames']} frames"),
              ("frames", f"{video['frames']} = {video['units']} {units}" if video["units"] != video["frames"]
               else str(video["frames"])),
              (f"tokens per {unit}", video["tokens_per_unit"]),
              ("video tokens", f"{video['units']} x {video['tokens_per_unit']} = {video['video_tokens']}"),
              ("positions (prompt + question + answer)", video["positions"]),
              ("context", f"{video['context']} ({'fits' if video['fits_context'] else 'does not fit'})"),
              *[(f"longest clip: {key}", longest(key)) for key in video["largest_clip_s"]],
          ])
    print(f"video basis: {video['basis']}")


def show_rows(result: dict) -> None:
    """One row per option, the fixed items summed into "rest" (the JSON has them one by one)."""
    from .common import table

    rest = ("compute_buffer", "caches", "runtime_overhead", "margin")
    rows = []
    for o in result["options"]:
        m = o["memory"]
        t = o["ttft"]["ttft_s"]
        rows.append((f"{o['encoder'].split(':')[1]} + {o['decoder'].split(':')[1]}", m["decoder_weights"] / MIB,
                     m["encoder_weights"] / MIB, m["encoder_activations"] / MIB, m["kv_cache"] / MIB,
                     sum(m[i] for i in rest) / MIB, m["total"] / MIB, o["verdict"], o["decode_tok_s"],
                     "-" if t is None else t))
    table(f"MiB, tok/s, TTFT s: {title(result)} (onnx + gguf; rest = compute buffer, caches, runtime, margin)",
          ["option", "decoder", "encoder", "activ.", "KV", "rest", "total", "verdict", "tok/s", "TTFT"], rows)
    footer(result)


def footer(result: dict) -> None:
    from .common import table

    table("how each item is sized", ["item", "basis"], list(result["basis"].items()))
    print(f"TTFT basis: {result['options'][0]['ttft']['basis']}")
    print(f"recommendation: {result['recommendation']['line']}")
    for line in result["skipped"]:
        print(f"skipped {line}")


def png_title(result: dict) -> str:
    """Two short lines (one long line overflowed the narrow axes on the left: the legend takes the right); a
    native-resolution image counts image tokens, not tiles."""
    from pathlib import Path

    images = result["images"]
    unit = "image tokens" if images["kind"] == "grid" else "tiles"
    return (f"{Path(title(result)).name} on {result['device']['name']}\ncontext {result['context']}, "
            f"{images['count']} x {images['width']}x{images['height']} ({images['n_tiles']} {unit} each)")


def plot(result: dict, path) -> None:
    """Stacked memory bars, one per encoder + decoder option, item by item, with the device's usable memory as a line
    (an option whose bar crosses it does not fit; one that crosses only with its margin is tight)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..errors import BadInputError

    path = Path(path)
    if path.suffix.lower() != ".png" or not path.parent.is_dir():
        raise BadInputError(f"--png wants a .png file in an existing folder, got {path}")
    options = result["options"]
    names = [f"{o['encoder']}\n+ {o['decoder']}" for o in options]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(options) + 3), 5))
    bottom = [0.0] * len(options)
    for i, item in enumerate(ITEMS):
        heights = [o["memory"][item] / MIB for o in options]
        ax.bar(names, heights, bottom=bottom, color=f"C{i}", label=item.replace("_", " "),
               hatch="//" if item == "margin" else None, alpha=0.6 if item == "margin" else 1.0)
        bottom = [b + h for b, h in zip(bottom, heights)]
    usable = result["usable_bytes"] / MIB
    ax.axhline(usable, color="black", linestyle="--", label=f"usable: {usable:,.0f} MiB")
    for x, (o, top) in enumerate(zip(options, bottom)):
        ax.text(x, top, o["verdict"], ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(png_title(result), fontsize=9, loc="left")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
