"""The bridge families' sections of docs/benchmarks.md (issue 31): the note under each bench table, one constant per
row. Used by render_docs.py; standard library only."""
from __future__ import annotations

ONEVISION_NOTE = (
    "Issue 31's bench row for the anyres-max bridge: onnx:int8 + gguf:q4_k_m against PyTorch eager (float32) "
    "in the same run, two repeats after a warm-up. llama.cpp has no LLaVA-OneVision projector, so there is "
    "no mtmd peer; the llama-cpp-python row decodes after a short text prompt, not after 2,963 positions, so "
    "its decode figure is not like for like. Random weights: the top-1 column says nothing about quality.")
PALIGEMMA_NOTE = (
    "Issue 31's bench row for the prefix-LM bridge: onnx:int8 + gguf:q4_k_m against PyTorch eager (float32) in "
    "the same run, two repeats after a warm-up. Warm TTFT stays near cold by design: a prefix-LM prompt is "
    "re-prefilled whole (image rows from the cache), since a new question changes what the prefix attends to. "
    "llama.cpp has no PaliGemma projector, so there is no mtmd peer. The roofline of this run is against the "
    "one-core copy bandwidth, which two cores reading outrun, so it can read above 100% (the tied embedding "
    "table is the output head, read whole every token). Random weights: the top-1 column says "
    "nothing about quality.")
