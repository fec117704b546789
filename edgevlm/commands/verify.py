"""edgevlm verify BUNDLE [--json]: every artifact against the PyTorch reference, each judged by its gate in
edgevlm/metrics.py (docs/parity-ladder.md). Exit 0: all pass; 1: any FAIL; 2: bad input (no bundle, no checkpoint)."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="rows and the overall status as JSON on stdout")


def main(args) -> int:
    from rich.console import Console

    from ..verify import verify_bundle
    from .common import print_json, table

    from .common import check_threads

    check_threads(args.threads)
    console = Console(stderr=True)
    with console.status("verifying") as status:
        rows = verify_bundle(args.bundle, threads=args.threads, progress=lambda m: status.update(m))
    failed = [r for r in rows if r["status"] == "FAIL"]
    if args.json:
        print_json({"bundle": args.bundle, "status": "FAIL" if failed else "pass", "rows": rows})
    else:
        table(f"parity of {args.bundle} against the PyTorch reference",
              ["artifact", "max rel err", "cosine", "logits NMSE", "greedy agree", "criterion", "status"],
              [(r["artifact"], r.get("max_rel_err", "-"), r.get("cosine", "-"), r.get("nmse", "-"),
                r.get("greedy_agreement", "-"), r.get("criterion", r.get("note", "")), r["status"]) for r in rows])
        for row in failed:
            console.print(f"FAIL {row['artifact']}: {row.get('note') or row['criterion']}", highlight=False, soft_wrap=True)
    return 1 if failed else 0
