"""The README's worked planner table: presets x devices, before any export (`edgevlm plan --preset`), from the device
table, not measured on these devices. For each pair: the most accurate option that fits with its margin at the
model's default context (4,096) and its largest image (most tiles); if nothing fits, the context is lowered first
(2,048, then 1,024), then the image to one tile. Prints a markdown table.

    python benchmarks/plan_table.py"""
from __future__ import annotations

import sys

from edgevlm.errors import BadInputError
from edgevlm.plan.bundle import PlanRequest, plan_model
from edgevlm.plan.devices import get_device
from edgevlm.plan.model import from_preset

PRESETS = ("smolvlm-256m", "smolvlm2-2.2b", "llava-1.5-7b")
DEVICES = ("jetson-orin-nano-8gb", "apple-m2-8gb", "rtx-4060-8gb")
CONTEXTS = (4096, 2048, 1024)
MIB = 1 << 20


def first_fit(shapes, device):
    """(plan, option) at the first setting where something fits; else the last plan tried and its smallest option."""
    tile = shapes.preprocess.tile_size
    for image_size in (None, (tile[1], tile[0])):  # the largest image, then one tile's size
        for context in CONTEXTS:
            try:
                plan = plan_model(shapes, device, PlanRequest(context=min(context, shapes.decoder.context_length),
                                                              image_size=image_size))
            except BadInputError:  # the image does not fit this context
                continue
            fits = [o for o in plan["options"] if o["verdict"] == "fits"]
            if fits:
                return plan, fits[0]
    return plan, min(plan["options"], key=lambda o: o["memory"]["total"])


def main() -> int:
    print("| model | device | context | image (tiles, positions) | recommended | MiB with margin / usable | "
          "decode tok/s | TTFT s (encode + prefill) |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in PRESETS:
        shapes = from_preset(preset)
        for device_id in DEVICES:
            plan, option = first_fit(shapes, get_device(device_id))
            images, t = plan["images"], option["ttft"]
            chosen = f"{option['encoder']} + {option['decoder']}" if option["verdict"] == "fits" else \
                f"nothing fits (smallest: {option['encoder']} + {option['decoder']})"
            print(f"| {preset} | {device_id} | {plan['context']:,} | {images['width']}x{images['height']} "
                  f"({images['n_tiles']}, {images['positions']:,}) | {chosen} | "
                  f"{option['memory']['total'] / MIB:,.0f} / {plan['usable_bytes'] / MIB:,.0f} | "
                  f"{option['decode_tok_s']:,.1f} | {t['ttft_s']:.2f} ({t['encode_s']:.2f} + {t['prefill_s']:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
