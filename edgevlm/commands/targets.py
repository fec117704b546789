"""edgevlm targets [--json]: what this machine can run, and why not the rest."""
from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true")


def main(args) -> int:
    from ..runtimes.targets import detect, profiles
    from .common import print_json, table

    found = detect()
    rows = profiles(found)
    if args.json:
        print_json({"machine": found, "targets": rows})
        return 0
    table("this machine", ["component", "status"], [(k, v if isinstance(v, str) else str(v)) for k, v in found.items()
                                                    if k != "llama_cpp_system_info"])
    table("targets", ["target", "encoder", "decoder", "available", "why"],
          [(r["name"], r["encoder"], r["decoder"], "yes" if r["available"] else "no", r["why"]) for r in rows])
    return 0
