"""The llama-server interop table (benchmarks/llama_server_interop.py's report.json): used by render_docs.py for
docs/benchmarks.md and by the interop script for its own report.md. Standard library only."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = "benchmarks/results"
INTEROP_NOTE = ("Each family's bundle is the tiny random checkpoint its tests build (tests/builders.py), exported with "
                "`--encoder onnx:fp32,gguf:f16 --decoder gguf:f32`. llama-server (built by "
                "benchmarks/build_llama_bin.sh from the llama.cpp llama-cpp-python 0.3.36 vendors) ran the command "
                "`edgevlm inspect` prints for the bundle, with 1 thread, flash attention off and an f32 KV cache, "
                "and answered one `/v1/chat/completions` request (the image as a PNG data URL, temperature 0). "
                "\"tokens = edgevlm's\": its greedy token ids (from the response's logprobs) equal edgevlm's "
                "(onnx:fp32 encoder + the same GGUF, parity mode) up to the first stop token; \"= libmtmd\": equal to "
                "llama.cpp's multimodal library run in-process on the prompt llama-server rendered; \"prompt\": that "
                "prompt, laid out by libmtmd, has edgevlm's token ids.")


def interop_table(report: dict) -> list[str]:
    out = [f"Question \"{report['question']}\", at most {report['max_tokens']} new tokens; llama.cpp "
           f"{report['llama_cpp'].get('version', '?')}.", "",
           "| family | projector | image | answered | tokens = edgevlm's | = libmtmd in process | prompt = edgevlm's | "
           "llama-server's answer |", "|---|---|---|---|---|---|---|---|"]

    def yes(row: dict, key: str) -> str:
        return "-" if key not in row else ("yes" if row[key] else "no")

    for row in report["rows"]:
        server = row["server"]
        answer = server.get("text") if server["answered"] else f"(error: {server.get('error', '')})"
        answer = json.dumps(answer, ensure_ascii=False)[:70].replace("|", "\\|")
        out.append(f"| {row['family']} | {row['projector']} | {row['image']} | {'yes' if server['answered'] else 'no'} "
                   f"| {yes(row, 'tokens_equal')} | {yes(row, 'server_equals_mtmd')} | {yes(row, 'prompt_equal')} | "
                   f"{answer} |")
    notes = [f"- {row['family']}: {row['explanation']}" for row in report["rows"] if row.get("explanation")]
    return out + ([""] + notes if notes else [])


def interop_body(root: Path, entry) -> list[str]:
    return interop_table(json.loads((root / RESULTS / entry.path / "report.json").read_text()))
