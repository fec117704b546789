"""edgevlm verify BUNDLE [--json] [--allow-skips]: every artifact, then every encoder x decoder pair, against the
PyTorch reference, each judged by its gate in edgevlm/metrics.py (docs/parity-ladder.md).

Exit 0: every artifact and pair was checked and passed; 1: any FAIL; 2: bad input (no bundle, no checkpoint); 3: no
FAIL, but something was not checked (its backend is absent here, or its gate needs trained weights and these are
random): the list is printed. --allow-skips turns 3 into 0 and still lists them."""
from __future__ import annotations

EXIT_INCOMPLETE = 3


def add_arguments(parser) -> None:
    parser.add_argument("bundle")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true",
                        help="every check (measured value, gate, verdict) and the overall status as JSON on stdout")
    parser.add_argument("--allow-skips", action="store_true",
                        help="exit 0 when nothing failed though some artifacts could not be checked here (listed)")


def _value(row: dict, key: str):
    return row.get(key, "-")


def main(args) -> int:
    from rich.console import Console

    from ..verify import outcome, verify_report
    from .common import check_threads, print_json, table

    check_threads(args.threads)
    console = Console(stderr=True)
    with console.status("verifying") as status:
        report = verify_report(args.bundle, threads=args.threads, progress=lambda m: status.update(m))
    rows = report["rows"]
    verdict, code = outcome(rows, args.allow_skips)
    unchecked = [{"artifact": r["artifact"], "status": r["status"], "why": r.get("note", "")}
                 for r in rows if r["status"] in ("skipped", "unjudged")]
    if args.json:
        print_json({"bundle": args.bundle, "status": verdict, "exit_code": code, "weights": report["weights"],
                    "not_checked": unchecked, "rows": rows})
        return code
    table(f"parity of {args.bundle} against the PyTorch reference",
          ["artifact", "max rel err", "cosine", "norm err", "logits NMSE", "agreement", "accuracy", "criterion",
           "status"],
          [(r["artifact"], _value(r, "max_rel_err"), _value(r, "cosine"), _value(r, "norm_err"), _value(r, "nmse"),
            _value(r, "greedy_agreement"), _value(r, "accuracy"), r.get("criterion", r.get("note", "")), r["status"])
           for r in rows])
    weights = report["weights"]
    if weights is not None:
        console.print(f"weights: {'trained' if weights['trained'] else 'random'} (the reference's mean top-1 "
                      f"probability {weights['reference_top1_probability']:.3g}; {weights['gate']})", highlight=False)
    for row in rows:
        if row["status"] == "FAIL":
            console.print(f"FAIL {row['artifact']}: {row.get('note') or row['criterion']}", highlight=False,
                          soft_wrap=True)
    for row in unchecked:
        label = "SKIPPED" if row["status"] == "skipped" else "NOT JUDGED"
        console.print(f"{label} {row['artifact']}: {row['why']}", highlight=False, soft_wrap=True)
    if code == EXIT_INCOMPLETE:
        console.print(f"not every artifact was checked ({len(unchecked)} not checked, listed above): exit "
                      f"{EXIT_INCOMPLETE}; --allow-skips accepts that", highlight=False)
    return code
