"""`edgevlm export --for DEVICE`: the planner's choice of encoder and decoder for a device, before any export: the
recommendation at the runtime's default context and the largest image, or the advice's lowered settings when
nothing fits there. The decision lives here; the command prints it."""
from __future__ import annotations


def plan_for_device(checkpoint: str, device_id: str, device_file: str | None, encoder: str | None,
                    decoder: str | None) -> dict:
    """{"encoder", "decoder", "line", "max_tiles", "recommendation"}: the plan's recommendation for each role the user
    did not name, at the runtime's default context and the largest image the preprocessing keeps; when nothing fits
    there, the advice's lowered settings (max_tiles: the tile cap to export with, None to keep --max-tiles). Raises
    BadInputError (one line) when nothing fits even lowered."""
    from ..errors import BadInputError
    from .advise import recommend
    from .before_export import plan_model
    from .options import PlanRequest, recommendation
    from .devices import get_device
    from .model import from_checkpoint

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

    from .budget import image_tokens, largest_image
    from .options import PlanRequest, resolve_context
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
    """The processor's setting that caps an image at `cap` tiles (advise.py's wording)."""
    from .advise import cap_knob
    from .budget import cap_tiles

    return cap_knob(cap_tiles(preprocess, cap))
