"""The attention-fusion A/B tables of docs/benchmarks.md, from benchmarks/results/onnx-fusion/ (written by
benchmarks/onnx_fusion.py). Used by render_docs.py; standard library only."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = "benchmarks/results"
FUSION_NOTE = ("Every variant opens in ONNX Runtime's CPU session with its extended optimizations, as the runtime "
               "does; rounds alternate the variants in one process (ms: median). Peak RSS: a fresh process that "
               "opens the variant and runs it once (VmHWM). Error: max |out - unfused| / max |unfused|. "
               "onnxruntime.transformers' optimizer (what optimum's ORTOptimizer drives) fuses LayerNorm and GELU "
               "patterns ORT's session already fuses, and no attention in torch.onnx's dynamo graphs, so "
               "edgevlm/onnx_cpu.py keeps its own matcher; neither fuses Qwen2-VL's rotary attention.")


def onnx_fusion_body(root: Path, entry) -> list[str]:
    data = json.loads((root / RESULTS / entry.path).read_text())
    rows = data["results"]["rows"]
    out = [f"Input {data['results']['input']}; {len(next(iter(rows.values()))['ms_all'])} alternated rounds.", "",
           "| variant | fused attention nodes | Softmax left | ms (median) | speed vs ORT alone | peak RSS MiB | "
           "max rel. error |", "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        out.append(f"| {name} | {row['fused_attention']} | {row['softmax']} | {row['ms_median']:,.0f} | "
                   f"{row['speed_vs_session_only']:.2f}x | {row['peak_rss_bytes'] / 2**20:,.0f} | "
                   f"{row['max_rel_err']:.1e} |")
    return out
