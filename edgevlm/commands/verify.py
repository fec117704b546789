"""edgevlm verify BUNDLE [--json]: every artifact against the PyTorch reference, as a parity table."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")


def main(args) -> int:
    from rich.console import Console

    from ..verify import verify_bundle
    from .common import print_json, table

    console = Console(stderr=True)
    with console.status("verifying") as status:
        rows = verify_bundle(args.bundle, threads=args.threads, progress=lambda m: status.update(m))
    if args.json:
        print_json({"bundle": args.bundle, "rows": rows})
    else:
        table(f"parity of {args.bundle} against the PyTorch reference",
              ["artifact", "max rel err", "cosine", "logits NMSE", "greedy agree", "criterion", "status"],
              [(r["artifact"], r.get("max_rel_err", "-"), r.get("cosine", "-"), r.get("nmse", "-"),
                r.get("greedy_agreement", "-"), r.get("criterion", r.get("note", "")), r["status"]) for r in rows])
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0
