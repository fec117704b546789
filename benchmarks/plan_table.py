"""A worked planner table: presets x devices, before any export (`edgevlm plan --preset`), from the device
table, not measured on these devices. For each pair, the plan's own recommendation (edgevlm/plan/advise.py): the most
accurate option that fits with its margin at the model's default context (4,096) and its largest image (most tiles;
a native-resolution model: the image size given below); if nothing fits, the first change that makes one fit, in the
recommendation's order (the image's tile cap or size, then the context halved to 1,024, then both). Prints a markdown
table.

    python benchmarks/plan_table.py"""
from __future__ import annotations

import sys

from edgevlm.plan.advise import recommend
from edgevlm.plan.bundle import PlanRequest, plan_model
from edgevlm.plan.devices import get_device
from edgevlm.plan.model import from_preset

# preset -> the image planned (None: the largest the preprocessing keeps). Qwen2-VL's largest (max_pixels, 3584x3584:
# 16,384 image tokens) is past the 4,096 context, so it is planned on a 1024x768 photo at its native resolution.
PRESETS = {"smolvlm-256m": None, "smolvlm2-2.2b": None, "llava-1.5-7b": None, "qwen2-vl-2b": (1024, 768)}
DEVICES = ("jetson-orin-nano-8gb", "apple-m2-8gb", "rtx-4060-8gb")
MIB = 1 << 20


def row(preset: str, image_size, device_id: str) -> str:
    shapes, device = from_preset(preset), get_device(device_id)
    request = PlanRequest(image_size=image_size)
    plan = plan_model(shapes, device, request)
    rec = recommend(lambda lowered: plan_model(shapes, device, lowered), request, plan, shapes.preprocess)
    settings = rec["settings"]
    option = f"{rec['encoder']} + {rec['decoder']}"
    chosen = {"fits": option, "lowered": f"{option}, after lowering {' and '.join(_short(c) for c in rec['changes'])}",
              "nothing fits": f"nothing fits (smallest: {option})"}[rec["status"]]
    unit = "image tokens" if plan["images"]["kind"] == "grid" else "tile(s)"
    width, height = settings["image_size"]
    ttft = "-" if rec["ttft_s"] is None else f"{rec['ttft_s']:.2f} ({rec['encode_s']:.2f} + {rec['prefill_s']:.2f})"
    return (f"| {preset} | {device_id} | {settings['context']:,} | {width}x{height} ({settings['tiles']:,} {unit}, "
            f"{settings['image_positions']:,} positions) | {chosen} | {rec['total_bytes'] / MIB:,.0f} / "
            f"{rec['usable_bytes'] / MIB:,.0f} | {rec['decode_tok_s']:,.1f} | {ttft} |")


def _short(change: str) -> str:
    """'the tile cap 17 -> 10 (--max-tiles 10; ...)' -> 'tile cap 17 -> 10'."""
    return change.split(" (")[0].removeprefix("the ")


def main() -> int:
    print("| model | device | context | image (tiles or image tokens, positions) | recommended | MiB with margin / "
          "usable | decode tok/s | TTFT s (encode + prefill) |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, image_size in PRESETS.items():
        for device_id in DEVICES:
            print(row(preset, image_size, device_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
