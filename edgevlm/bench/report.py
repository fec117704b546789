"""Benchmark output: a table for people (rich and markdown), the JSON for machines, a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("run", "encode ms/tile", "image tok", "prefill ms", "TTFT cold ms", "TTFT warm ms", "decode tok/s",
           "roofline", "e2e ms", "peak RSS MiB", "top-1 vs ref")
ACCURACY_COLUMN = "task accuracy"


def columns(result: dict) -> tuple[str, ...]:
    with_accuracy = any("task_accuracy" in r["metrics"] for r in result["runs"])
    return COLUMNS + ((ACCURACY_COLUMN,) if with_accuracy else ())


def _drift(m: dict, reference: bool) -> str:
    if reference:
        return "ref"
    d = m.get("drift")
    return f"{d['top1_agreement']:.0%} (NMSE {d['logits_nmse']:.1e})" if d else "-"


def _accuracy(m: dict) -> str:
    a = m.get("task_accuracy")
    return f"{a['accuracy']:.3f} (n={a['n']})" if a else "-"


def _m(metric) -> float | None:
    return metric["median"] if isinstance(metric, dict) else metric


def rows(result: dict) -> list[list[str]]:
    width = len(columns(result))
    with_accuracy = width > len(COLUMNS)
    out = []
    for run in result["runs"]:
        m = run["metrics"]
        rl = run.get("roofline")
        out.append([
            run["name"], f"{_m(m['encode_ms_per_tile']):.1f}", str(m["n_image_tokens"]), f"{_m(m['prefill_ms']):.1f}",
            f"{_m(m['ttft_cold_ms']):.1f}", f"{_m(m['ttft_warm_ms']):.1f}", f"{_m(m['decode_tok_s']):.1f}",
            f"{rl['fraction']:.0%} of {rl['ceiling_tok_s']:.0f}" if rl else "-", f"{_m(m['end_to_end_ms']):.0f}",
            f"{m['peak_rss_mb']:.0f}", _drift(m, run.get("kind") == "reference"),
        ] + ([_accuracy(m)] if with_accuracy else []))
    for peer in result.get("peers", []):
        if peer.get("kind") == "llama.cpp mtmd" and "metrics" in peer:  # a full multimodal run: every column it has
            m = peer["metrics"]
            out.append([peer["name"], f"{_m(m['encode_ms_per_tile']):.1f}", str(m["n_image_tokens"]),
                        f"{_m(m['prefill_decode_ms']):.1f}", f"{_m(m['ttft_cold_ms']):.1f}", f"{_m(m['ttft_warm_ms']):.1f}",
                        f"{_m(m['decode_tok_s']):.1f}", "-", "-", f"{m['peak_rss_mb']:.0f}", "-"]
                       + (["-"] if with_accuracy else []))
        elif peer.get("kind") == "mlx-vlm" and "metrics" in peer:  # its own processor, encoder and generate loop
            m = peer["metrics"]
            out.append([peer["name"], "-", "-", "-", f"{_m(m['ttft_cold_ms']):.1f}", f"{_m(m['ttft_warm_ms']):.1f}",
                        f"{_m(m['decode_tok_s']):.1f}", "-", "-", f"{m['peak_rss_mb']:.0f}", _drift(m, False)]
                       + (["-"] if with_accuracy else []))
        elif "metrics" in peer:  # text-only peers: llama-cpp-python's loop (TTFT of a text prompt), llama-bench (pp rate)
            m = peer["metrics"]
            prefill = f"pp {_m(m['prefill_tok_s']):.0f} tok/s" if "prefill_tok_s" in m else "-"
            ttft = f"{_m(m['ttft_text_only_ms']):.1f} (text)" if "ttft_text_only_ms" in m else "-"
            out.append([peer["name"], "-", "-", prefill, ttft, "-", f"{_m(m['decode_tok_s']):.1f}", *["-"] * (width - 7)])
        else:
            out.append([peer["name"], "skipped: " + peer["skipped"], *["-"] * (width - 2)])
    return out


def print_table(result: dict, console) -> None:
    s = result["scenario"]
    show_table(console, f"{result['path']} | image {s['image_size'][0]}x{s['image_size'][1]}, ~{s['prompt_tokens']} "
               f"prompt tokens, {s['new_tokens']} new, {s['threads']} threads, medians of {s['repeats']}",
               columns(result), rows(result), ratios(result))


def show_table(console, title: str, column_names, table_rows, ratio_lines) -> None:
    """A bench's rich table and the ratio lines under it (the image and the video bench print the same way)."""
    from rich.table import Table

    table = Table(title=title)
    for column in column_names:
        table.add_column(column)
    for row in table_rows:
        table.add_row(*row)
    console.print(table)
    for line in ratio_lines:
        console.print(line)


def ratios(result: dict) -> list[str]:
    """One line per edgevlm run: its ratios to the PyTorch reference and to the llama.cpp peers of the same run."""
    lines = []
    for run in result["runs"]:
        if run.get("kind") != "edgevlm":
            continue
        v = run.get("vs_reference")
        extra = "".join(_peer_ratios(name, r) for name, r in run.get("vs_peers", {}).items())
        ab, warm = run["metrics"].get("decode_loop_vs_llama_decode"), run["metrics"].get("decode_tok_s_warm")
        if warm:
            extra += f"; decode in the warm requests (no encode just before) {warm['median']:.1f} tok/s"
        if ab:
            extra += f"; decode loop {ab['ratio']:.3f}x llama_decode alone (same process, alternated)"
        if v is None:  # no PyTorch peer in this run (--peers llamacpp): the peers' ratios still count
            if extra:
                lines.append(f"{run['name']}: warm/cold TTFT {run['metrics']['ttft_warm_over_cold']:.3f}{extra}")
            continue
        if "accuracy_points" in v:
            extra += f"; task accuracy {v['accuracy_points']:+.1f} points vs the reference"
        decode = f"{v['decode_tok_s']:.1f}" if v["decode_tok_s"] >= 1 else f"{v['decode_tok_s']:.2f}"
        lines.append(f"{run['name']}: cold TTFT {v['ttft_cold']:.2f}x, decode {decode}x, encode "
                     f"{v['encode_ms_per_tile']:.2f}x the PyTorch reference; warm/cold TTFT "
                     f"{run['metrics']['ttft_warm_over_cold']:.3f}{extra}")
    for run in result["runs"]:
        if run.get("prediction"):
            lines.append(prediction_line(run))
    return lines


def prediction_line(run: dict) -> str:
    """The planner's figures for the run beside the measured ones."""
    p, m = run["prediction"], run["metrics"]
    if "error" in p:
        return f"{run['name']}: `edgevlm plan` could not predict it: {p['error']}"

    def seconds(value) -> str:
        return "-" if value is None else f"{value:.1f} s"

    return (f"{run['name']}: `edgevlm plan` ({p['device']}, {p['image_size']}) predicted TTFT {seconds(p['ttft_s'])} "
            f"(encode {seconds(p['encode_s'])}, prefill {seconds(p['prefill_s'])}; measured cold "
            f"{_m(m['ttft_cold_ms']) / 1e3:.1f} s), decode {p['decode_tok_s']:.1f} tok/s (measured "
            f"{_m(m['decode_tok_s']):.1f}), one request's peak {p['run_mib']:.0f} MiB (measured peak RSS "
            f"{m['peak_rss_mb']:.0f} MiB)")


def _peer_ratios(name: str, r: dict) -> str:
    if "ttft_cold" not in r:
        return f"; decode {r['decode_tok_s']:.2f}x {name}"
    return (f"; vs {name}: cold TTFT {r['ttft_cold']:.2f}x, warm TTFT {r['ttft_warm']:.2f}x, decode "
            f"{r['decode_tok_s']:.2f}x, peak RSS {r['peak_rss']:.2f}x")


def bandwidths(machine: dict) -> str:
    """The bandwidth figures a results file records; the roofline column is against the read one where it has one."""
    text = f"copy bandwidth {machine['bandwidth_gbs']:.1f} GB/s"
    if machine.get("read_bandwidth_gbs"):
        text += (f", read bandwidth {machine['read_bandwidth_gbs']:.1f} GB/s on {machine.get('read_bandwidth_threads')}"
                 " threads (the roofline's)")
    return text


def markdown(result: dict, command: str) -> str:
    lines = [f"Command: `{command}`  ", f"Date: {result['date']}  ",
             f"Machine: {result['machine'].get('cpu', result['machine']['processor'])}, {result['machine']['cpu_count']} cores, "
             f"{result['machine'].get('memory_gib', '?')} GiB, {bandwidths(result['machine'])}", "",
             "| " + " | ".join(columns(result)) + " |", "|" + "---|" * len(columns(result))]
    lines += ["| " + " | ".join(r) + " |" for r in rows(result)]
    lines += [""] + [f"- {line}" for line in ratios(result)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multimodal = result["runs"] + [p for p in result.get("peers", []) if "ttft_cold_ms" in p.get("metrics", {})]
    names = [r["name"] for r in multimodal]
    cold = [_m(r["metrics"]["ttft_cold_ms"]) for r in multimodal]
    warm = [_m(r["metrics"]["ttft_warm_ms"]) for r in multimodal]
    rate = [_m(r["metrics"]["decode_tok_s"]) for r in multimodal]
    text_peers = [p for p in result.get("peers", []) if "metrics" in p and p not in multimodal]
    peer_names = [p["name"] for p in text_peers]
    peer_rate = [_m(p["metrics"]["decode_tok_s"]) for p in text_peers]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.6 * (len(names) + len(peer_names)) + 2.5))
    y = range(len(names))
    ax1.barh([i + 0.2 for i in y], cold, height=0.4, label="cold")
    ax1.barh([i - 0.2 for i in y], warm, height=0.4, label="warm (same image)")
    ax1.set_yticks(list(y), names)
    ax1.set_xscale("log")
    ax1.set_xlabel("TTFT, ms (log)")
    ax1.legend()
    all_names, all_rates = names + peer_names, rate + peer_rate
    ax2.barh(range(len(all_names)), all_rates, color=["C2"] * len(names) + ["C7"] * len(peer_names))
    ax2.set_yticks(range(len(all_names)), all_names)
    ax2.set_xlabel("decode tokens/s (median)")
    fig.suptitle(f"edgevlm bench: {Path(result['path']).name} ({result['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: dict, out: Path, command: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "bench.json", "markdown": out / "bench.md", "plot": out / "bench.png"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    files["markdown"].write_text(markdown(result, command))
    plot(result, files["plot"])
    return files
