"""The plan's recommendation: the most accurate option that fits with its margin at the asked settings; when none does,
the first change that makes one fit, tried in a fixed order (ORDER), with the option that then fits and the new
settings. `edgevlm plan` prints it and puts it in --json as "recommendation"; benchmarks/plan_table.py builds the
worked table from it.

Options are tried most accurate first at every setting (decoder quantization, then encoder precision: the order the
plan lists them in), so at the asked settings a smaller quant is always tried before anything else is lowered; only
when no quant fits is the image lowered, then the context. Each step is a fresh plan of the same model on the same
device (plan/bundle.py), so every figure in the recommendation is one the plan itself would print."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

from ..errors import BadInputError
from . import budget
from .bundle import PlanRequest

MIB = 1 << 20
# Lower the context by halving, not below this (nor below what the request's own positions need): under 1,024
# positions a conversation holds little more than one image and its answer.
CONTEXT_FLOOR = 1024
# Lower a native-resolution image (Qwen2-VL) by halving its area, not below this many merged tokens (224x224 at
# 14-px patches merged 2x2): fewer tokens than that is a thumbnail.
NATIVE_MIN_TOKENS = 64
ORDER = (
    "the asked settings, options most accurate first (a smaller quant or encoder precision before anything else)",
    "the image: a tiled model's tile cap one step at a time (idefics3: longest_edge one tile shorter; internvl: fewer "
    "max_patches), a native-resolution model's image area halved (not below 64 merged tokens); fixed-size models skip",
    f"the context halved, at the asked image (not below {CONTEXT_FLOOR:,} or the request's own positions)",
    "both: the image at its floor, the context halved",
)

Plan = Callable[[PlanRequest], dict]


def most_accurate_fit(result: dict) -> dict | None:
    """The first option whose verdict is "fits" (the plan lists options most accurate first)."""
    return next((o for o in result["options"] if o["verdict"] == "fits"), None)


def settings(result: dict) -> dict:
    """The settings a plan was made at, as the recommendation reports them."""
    images = result["images"]
    return {"context": result["context"], "image_size": [images["width"], images["height"]],
            "tiles": images["n_tiles"], "tile_cap": images["tile_cap"], "image_positions": images["positions"]}


def _needed_positions(result: dict) -> int:
    one = result["one_request"]
    return result["images"]["positions"] + one["prompt_tokens"] + one["new_tokens"]


def image_steps(plan: Plan, request: PlanRequest, result: dict, preprocess) -> list[tuple[str, dict]]:
    """(change, plan) for each smaller image setting, at the asked context, largest first."""
    images = result["images"]
    if not images["count"]:
        return []
    if preprocess.resize_rule == "qwen2vl":
        return _smaller_images(plan, request, result)
    return _lower_tile_caps(plan, request, result, preprocess)


def _lower_tile_caps(plan: Plan, request: PlanRequest, result: dict, preprocess) -> list[tuple[str, dict]]:
    """Every tile cap below the asked image's tile count that gives it fewer tiles (one-tile models: none)."""
    images = result["images"]
    steps, tiles = [], images["n_tiles"]
    for cap in range(tiles - 1, 0, -1):
        capped = budget.cap_tiles(preprocess, cap)
        if capped == preprocess:
            break  # a one-tile rule: nothing to cap
        rows, cols = budget.tile_grid(images["height"], images["width"], capped)
        predicted = 1 if rows == cols == 0 else rows * cols + 1  # the split + its global view / thumbnail
        if predicted >= tiles:
            continue  # this cap does not change the image's tiles
        # the same image, fewer tiles (without a size, the plan's default image would shrink with the cap)
        lowered = _plan_or_none(plan, replace(request, max_tiles=predicted,
                                              image_size=(images["width"], images["height"])))
        if lowered is None:
            continue
        tiles = lowered["images"]["n_tiles"]
        steps.append((f"the tile cap {images['n_tiles']} -> {tiles} (--max-tiles {tiles}; {cap_knob(capped)})",
                      lowered))
    return steps


def cap_knob(preprocess) -> str:
    """How the processor sets that cap, for the user who applies it."""
    if preprocess.resize_rule == "idefics3":
        return f"the processor's size.longest_edge {preprocess.longest_edge}"
    return f"the processor's max_patches {preprocess.max_tiles}"


def _smaller_images(plan: Plan, request: PlanRequest, result: dict) -> list[tuple[str, dict]]:
    """The asked image's area halved (sides / sqrt 2, aspect kept) while it keeps NATIVE_MIN_TOKENS merged tokens."""
    images = result["images"]
    width, height, tokens = images["width"], images["height"], images["n_tiles"]
    steps = []
    while True:
        width, height = max(1, round(width / math.sqrt(2))), max(1, round(height / math.sqrt(2)))
        lowered = _plan_or_none(plan, replace(request, image_size=(width, height)))
        if lowered is None or lowered["images"]["n_tiles"] >= tokens or lowered["images"]["n_tiles"] < NATIVE_MIN_TOKENS:
            return steps
        tokens = lowered["images"]["n_tiles"]
        steps.append((f"the image {images['width']}x{images['height']} -> {width}x{height} ({images['n_tiles']} -> "
                      f"{tokens} image tokens; --image-size {width}x{height}: resize images to it, or set the "
                      f"processor's max_pixels to {width * height})", lowered))


def context_steps(plan: Plan, request: PlanRequest, result: dict) -> list[tuple[str, dict]]:
    """The context halved, down to max(CONTEXT_FLOOR, the request's positions)."""
    floor = max(CONTEXT_FLOOR, _needed_positions(result))
    steps, context = [], result["context"]
    while context // 2 >= floor:
        context //= 2
        lowered = _plan_or_none(plan, replace(request, context=context))
        if lowered is not None:
            steps.append((f"the context {result['context']:,} -> {context:,} (--context {context}; run/serve "
                          f"--n-ctx {context})", lowered))
    return steps


def _plan_or_none(plan: Plan, request: PlanRequest) -> dict | None:
    try:
        return plan(request)
    except BadInputError:  # e.g. the image no longer fits that context: not a candidate
        return None


def _searched(plan: Plan, request: PlanRequest, result: dict, preprocess):
    """(changes, plan) in ORDER's order, lazily: each step is planned only if the ones before it found nothing."""
    smaller = image_steps(plan, request, result, preprocess)
    for change, lowered in smaller:
        yield [change], lowered
    for change, lowered in context_steps(plan, request, result):
        yield [change], lowered
    if smaller:
        floor_change, floor = smaller[-1]
        floor_request = replace(request, max_tiles=floor["images"]["tile_cap"],
                                image_size=(floor["images"]["width"], floor["images"]["height"]))
        for change, lowered in context_steps(plan, floor_request, floor):
            yield [floor_change, change], lowered


def recommend(plan: Plan, request: PlanRequest, result: dict, preprocess) -> dict:
    """The recommendation for `result` (plan(request)); plan makes the plans of the lowered settings."""
    fit = most_accurate_fit(result)
    if fit is not None:
        return recommendation_line("fits", result, result, [], fit)
    last = result
    for changes, lowered in _searched(plan, request, result, preprocess):
        last = lowered
        fit = most_accurate_fit(lowered)
        if fit is not None:
            return recommendation_line("lowered", result, lowered, changes, fit)
    smallest = min(last["options"], key=lambda o: o["memory"]["total"])
    return recommendation_line("nothing fits", result, last, [], smallest)


def recommendation_line(status: str, asked: dict, final: dict, changes: list[str], option: dict) -> dict:
    """The recommendation's record: `status` fits / lowered / nothing fits, the plans asked and final, the changes
    that lead from one to the other and the option recommended."""
    usable = final["usable_bytes"]
    total = option["memory"]["total"]
    pair = f"{option['encoder']} + {option['decoder']}"
    where = _where(asked)
    need = f"{total / MIB:,.0f} of {usable / MIB:,.0f} MiB usable with margin"
    if status == "fits":
        line = f"{pair} fits as asked ({where}): {need}"
    elif status == "lowered":
        line = (f"nothing fits as asked ({where}); lower {' and '.join(changes)}: then {pair} fits ({_where(final)}: "
                f"{need})")
    else:
        line = (f"nothing fits, as asked ({where}) or lowered to {_where(final)}: the smallest option ({pair}) needs "
                f"{total / MIB:,.0f} MiB with margin of {usable / MIB:,.0f} usable; use a device with more memory or "
                "a smaller model")
    return {"status": status, "encoder": option["encoder"], "decoder": option["decoder"],
            "verdict": option["verdict"], "total_bytes": total, "usable_bytes": usable,
            "decode_tok_s": option["decode_tok_s"], "ttft_s": option["ttft"]["ttft_s"],
            "encode_s": option["ttft"]["encode_s"], "prefill_s": option["ttft"]["prefill_s"], "changes": changes,
            "asked": settings(asked), "settings": settings(final), "order": list(ORDER), "line": line}


def _where(result: dict) -> str:
    images = result["images"]
    unit = "image tokens" if images["kind"] == "grid" else "tile(s)"
    return f"context {result['context']:,}, {images['n_tiles']} {unit}"
