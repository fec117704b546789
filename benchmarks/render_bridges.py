"""The bridge families' sections of docs/benchmarks.md (issue 31): each bench row and export-memory run as render_docs.py's
Shown arguments (results path, title, kind, note), the note one constant per row. Standard library only."""
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
INSTRUCTBLIP_NOTE = (
    "Issue 31's bench row for the Q-Former bridge: onnx:int8 + gguf:q4_k_m against PyTorch eager in the "
    "checkpoint's bf16 (`--torch-dtype auto`: a float32 copy, 32 GB, does not fit in 24 GiB), one request each after "
    "a warm-up (`--repeats 1`: each figure is one run, not a median). Each pair runs in its own process, one after the "
    "other, so the reference's 15.5 GB and edgevlm's 8.3 GB are never resident together. This run is on an Intel "
    "Xeon VM with AMX (flags in the header), not the AMD EPYC of the rows above: PyTorch's bf16 prefill of the 54 "
    "positions took 1.4 s against llama.cpp's q4_k_m 2.7 s (not profiled; oneDNN's bf16 matmuls can use AMX here), "
    "so edgevlm's cold TTFT is 1.65x PyTorch's, while decode is 2.8x and the peak 0.54x. Warm TTFT equals cold by "
    "design: the Q-Former reads the instruction, so a new question encodes the image again and no prefix is reused "
    "(0 prefix-cache hits in both runs). llama.cpp has no BLIP-2 projector, so there is no mtmd peer. The planner "
    "under-estimates the peak (5,351 against 8,337 MiB: ONNX Runtime's int8 ViT-g session holds 1.2 GB of graph and "
    "most of the 3.0 GB beyond the known parts). Random weights (`edgevlm preset instructblip-vicuna-7b --dtype "
    "bfloat16`, query tokens and ViT randomised): the top-1 column says nothing about a trained model's quality.")
INSTRUCTBLIP_EXPORT_NOTE = (
    "Peak RSS sampled during each step (children included), as for SmolVLM2-2.2B above; on the Intel Xeon VM of the "
    "InstructBLIP bench row. Issue 30's goal (the whole export below 1.5x the checkpoint on disk) holds for a 7B "
    "preset too: 1.17x, highest while writing the BF16 GGUF that llama.cpp's quantizer reads; the quantizer "
    "(3.4 min) runs after the decoder is freed, the vision export and int8 choice (3.2 min; dynamic int8, cosine "
    "0.9985 on held-out inputs, 384 ms a 224x224 image) after that.")

# (path under benchmarks/results, section title, kind, note): render_docs.py makes each a Shown
BRIDGE_BENCH_ROWS = (
    ("bridges-onevision", "Bridges: LLaVA-OneVision 0.5B shapes (random weights, `edgevlm preset "
     "llava-onevision-0.5b`), one 640x480 image (anyres-max: 4 tiles + the base view, 2,929 image rows), "
     "24-token prompt, 64 new tokens, 2 threads", "bench", ONEVISION_NOTE),
    ("bridges-paligemma", "Bridges: PaliGemma 2 3B-448 shapes (random weights, `edgevlm preset "
     "paligemma2-3b-448`), one 448x448 image (1,024 image rows), 24-token prompt, 64 new tokens, 2 threads",
     "bench", PALIGEMMA_NOTE),
    ("bridges-instructblip", "Bridges: InstructBLIP-Vicuna-7B shapes (random weights, bf16 on disk), one "
     "224x224 image (Q-Former: 32 image rows), 24-token prompt, 64 new tokens, 2 threads", "bench",
     INSTRUCTBLIP_NOTE),
)
BRIDGE_EXPORT_ROWS = (
    ("export-memory/instructblip-vicuna-7b-bf16.json", "Export memory: InstructBLIP-Vicuna-7B shapes (random "
     "weights, bf16 on disk), ONNX int8 encoder (ViT-g + Q-Former), GGUF q4_k_m decoder, one process",
     "export-memory", INSTRUCTBLIP_EXPORT_NOTE),
)
