"""The decoder backend on llama.cpp (llama-cpp-python's low-level API), split as llama.cpp itself is: model (the
GGUF's weights, loaded once) -> context (n_ctx KV cells, n_seq sequences, batches, decode) -> sequence (the Decoder).
`open_decoder` opens all three and returns sequence 0; the context of the others is `decoder.context`."""
from __future__ import annotations

from pathlib import Path

from .context import DEFAULT_N_BATCH, DEFAULT_N_CTX, ContextSettings, LlamaContext
from .flash_choice import choose_flash_attention
from .model import LlamaModel
from .sequence import LlamaSequence

# Several sequences share one KV pool (serve --parallel N): the plain attention path runs over every cell in use, the
# other sequences' masked, while the CPU flash-attention kernel skips masked cells, so it wins there whatever the
# one-sequence measurement says. W1 serve on an Intel Xeon, 2 cores, --parallel 4, on against off (the measurement
# had chosen off, 72 against 73 tok/s): returning users' TTFT p50 207 against 239 ms, turn 1 1,142 against 1,614 ms,
# 4 clients 62.3 against 59.1 tok/s, stream gap p50 14.2 against 18.0 ms (docs/notes/2026-12-07-session-twelve.md).
POOL_FLASH_ATTENTION = True


def open_decoder(gguf_path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 n_batch: int = DEFAULT_N_BATCH, parity: bool = False, context_length: int | None = None,
                 flash_attn: bool | None = None, artifact_id: str | None = None, n_seq: int = 1,
                 image_attention: str = "causal") -> LlamaSequence:
    """Sequence 0 of a new context of `n_seq` sequences on the GGUF's weights. n_ctx defaults to the model's
    context_length, at most DEFAULT_N_CTX (the KV cache is allocated whole when the context opens). flash_attn None:
    on a CPU-only build, on for several sequences (one pool: POOL_FLASH_ATTENTION), else the faster of on and off as
    measured once on this CPU for one sequence (flash_choice); parity mode: off."""
    n_ctx = int(n_ctx or min(context_length or DEFAULT_N_CTX, DEFAULT_N_CTX))
    model = LlamaModel(gguf_path, artifact_id)
    if flash_attn is None and not parity and not model.lib.llama_supports_gpu_offload():
        if n_seq > 1:
            flash_attn = POOL_FLASH_ATTENTION
        else:
            flash_attn = choose_flash_attention(model, n_ctx, threads, int(n_batch))  # measured once per CPU, cached
    settings = ContextSettings(n_ctx, int(n_batch), threads, parity, flash_attn, image_attention)
    return LlamaContext(model, settings, n_seq).sequence(0)


__all__ = ["ContextSettings", "DEFAULT_N_BATCH", "DEFAULT_N_CTX", "LlamaContext", "LlamaModel", "LlamaSequence",
           "open_decoder"]
