"""The decode sections' notes of docs/benchmarks.md (W1 at default settings, W3 and W6 at q4_k_m) and the planner's
out-of-sample error table from benchmarks/plan_out_of_sample.py's results file. Used by render_docs.py; standard
library only."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = "benchmarks/results"
PLAN_OOS_NOTE = (
    "Derived from the committed bench files named in each row (their own headers above give each run's command, "
    "commit, CPU and flags; W2 and W6 ran on Intel Xeon VMs, the others on AMD EPYC VMs), nothing re-measured. The "
    "planner predicts decode as efficiency x copy bandwidth / bytes read per token, with 0.55 for 8-bit weights and "
    "0.38 below, fitted on small models (plan/budget.py). \"refit\" is the same form with its two efficiencies "
    "refitted on the fit rows only; \"time model\" is seconds per token = a x bytes / copy bandwidth + c x layers, "
    "fitted on the fit rows only (a per-layer cost that small models show and large ones hide). Check rows were "
    "fitted on by nothing here. An error is predicted / measured - 1. Memory: the planner's one-request peak that "
    "the bench recorded beside each run against its measured peak RSS; the memory constants were probed on W1's "
    "model and the reference model, so W1 is in sample.")


def plan_oos_body(root: Path, entry) -> list[str]:
    data = json.loads((root / RESULTS / entry.path).read_text())
    model = data["time_model"]
    out = [f"Fit on {', '.join(data['fit'])}; checked on {', '.join(data['check'])}. Refitted efficiencies: "
           + ", ".join(f"{k} {v:.2f}" for k, v in sorted(data["refit_efficiency"].items()))
           + f" (the planner's: wide {data['planner_efficiency']['wide']:.2f}, sub-8-bit "
           f"{data['planner_efficiency']['sub8bit']:.2f}); time model a = {model['a']:.2f}, c = "
           f"{model['ms_per_layer']:.2f} ms per layer.", "",
           "| set | workload (date) | decoder | measured tok/s | planner | error | refit | error | time model | error |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["decode"]:
        out.append(f"| {row['set']} | {row['workload']} ({row['date'][:10]}) | {row['decoder']} | "
                   f"{row['decode_tok_s']:,.1f} | {row['planner_tok_s']:,.1f} | {row['planner_error']:+.0%} | "
                   f"{row['refit_tok_s']:,.1f} | {row['refit_error']:+.0%} | {row['time_model_tok_s']:,.1f} | "
                   f"{row['time_model_error']:+.0%} |")
    out += ["", "| memory: workload | run | measured peak RSS MiB | planned MiB | error | in sample |",
            "|---|---|---|---|---|---|"]
    for row in data["memory"]:
        out.append(f"| {row['workload']} | {row['run']} | {row['measured_peak_mib']:,.0f} | "
                   f"{row['planned_peak_mib']:,.0f} | {row['error']:+.0%} | {'yes' if row['in_sample'] else 'no'} |")
    return out

W3_Q4_NOTE = (
    "Issue 32's 2B-class decode row: W3's checkpoint (`edgevlm preset qwen2-vl-2b`, random weights) exported with "
    "`--encoder onnx:fp32 --decoder gguf:q4_k_m --max-tiles 1` (the fp32 encoder only to keep the export short: "
    "decode does not depend on it), no PyTorch peer (`--peers llamacpp`), 32 new tokens and 3 repeats to keep the "
    "run within a few minutes. The roofline counts the bytes one decode step reads: every weight tensor (the tied "
    "embedding table once, as llama.cpp's output head multiplies by all of it) plus the f16 KV cache at the run's "
    "mean depth, against the read bandwidth measured on the run's 2 threads. The llama-bench row at edgevlm's depth "
    "runs at the same depth, flash-attention setting and (after llama.cpp's padding to 256) context. No mmproj in "
    "this bundle, so no mtmd peer. A 2-core VM shared with other sessions' work.")

W6_Q4_NOTE = (
    "Issue 32's second 2B-class decode row: SmolVLM2-2.2B shapes (`edgevlm preset smolvlm2-2.2b --single-tile`, "
    "random weights; 24 layers of 2,048 with 32 KV heads of 64 and an untied output head) exported with `--encoder "
    "onnx:int8 --decoder gguf:q4_k_m --max-tiles 1`, one 384x384 tile (81 image tokens), run as W3 at q4_k_m: no "
    "PyTorch peer, 32 new tokens, 3 repeats. The roofline counts the same bytes as W3's (every weight tensor but the "
    "token-embedding table, which is untied here and only gathered from, plus the f16 KV cache at the run's mean "
    "depth). It ran on an Intel Xeon VM, not W3's AMD EPYC: llama-bench runs a W3 q4_k_m GGUF (the same 980 MB a "
    "token reads) at half W3's AMD rate on this CPU (16.2 against 32.1 tok/s at W3's depth), 48% of this machine's "
    "read roofline (33.2 GB/s in the same sweep). The roofline miss is llama.cpp's per-core q4_K kernel here, not the"
    " bytes: one thread decodes 8.0 tok/s, reading 8.6 GB/s of a single core's 16.4 GB/s, and two threads scale it "
    "1.8x (docs/notes/2026-12-07-smol22.md has the llama-bench sweep over threads, flash attention, depth and "
    "quantization). The earlier run of the same command (retired below) gave 14.1 tok/s with both llama-bench rows "
    "lower too (13.3 and 14.0): the VM's run-to-run spread. No mmproj in this bundle, so no mtmd peer.")

W1_NOTE = (
    "At the default settings: the llama.cpp context sized to the job (prompt + image + new tokens, rounded up "
    "to 256) and flash attention as measured once on this CPU (cached under ~/.cache/edgevlm/flash-attn; the "
    "row of llama-bench at edgevlm's depth names the setting). The bundle is W1's checkpoint "
    "(`edgevlm preset smolvlm-256m --single-tile`) exported with `--encoder onnx:int8,gguf:f16 --decoder "
    "gguf:q8_0` (benchmarks/run_all.sh's w1-bundle-mmproj adds artifacts this command does not run). Decode "
    "tok/s is the median per-token step of the whole loop (decode, sampling, detokenizing). The llama.cpp mtmd "
    "row is llama.cpp's own multimodal path (libmtmd, in its own process) on the mmproj and the q8_0 GGUF of "
    "the same bundle, at a 4,096-position context with flash attention off; it encodes an overview tile as "
    "well, hence its image tokens. The two llama-bench rows are llama.cpp's benchmark binary on the same GGUF: "
    "with its defaults (flash attention auto, i.e. on for a CPU; generation from position 0), and at the depth "
    "and flash-attention setting edgevlm decoded with. A 2-core VM shared with other sessions' work: run-to-run "
    "spread is in bench.json (min/max).")
