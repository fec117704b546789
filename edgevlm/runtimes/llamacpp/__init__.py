"""The decoder backend on llama.cpp (llama-cpp-python's low-level API), split as llama.cpp itself is: model (the
GGUF's weights, loaded once) -> context (n_ctx KV cells, n_seq sequences, batches, decode) -> sequence (the Decoder).
`open_decoder` opens all three and returns sequence 0; the context of the others is `decoder.context`."""
from __future__ import annotations

from pathlib import Path

from .context import DEFAULT_N_BATCH, DEFAULT_N_CTX, ContextSettings, LlamaContext
from .flash_choice import choose_flash_attention
from .model import LlamaModel
from .sequence import LlamaSequence


def open_decoder(gguf_path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 n_batch: int = DEFAULT_N_BATCH, parity: bool = False, context_length: int | None = None,
                 flash_attn: bool | None = None, artifact_id: str | None = None, n_seq: int = 1,
                 image_attention: str = "causal") -> LlamaSequence:
    """Sequence 0 of a new context of `n_seq` sequences on the GGUF's weights. n_ctx defaults to the model's
    context_length, at most DEFAULT_N_CTX (the KV cache is allocated whole when the context opens). flash_attn None:
    on a CPU-only build, the faster of on and off as measured once on this CPU (flash_choice); parity mode: off."""
    n_ctx = int(n_ctx or min(context_length or DEFAULT_N_CTX, DEFAULT_N_CTX))
    model = LlamaModel(gguf_path, artifact_id)
    if flash_attn is None and not parity and not model.lib.llama_supports_gpu_offload():
        flash_attn = choose_flash_attention(model, n_ctx, threads, int(n_batch))  # measured once per CPU, cached
    settings = ContextSettings(n_ctx, int(n_batch), threads, parity, flash_attn, image_attention)
    return LlamaContext(model, settings, n_seq).sequence(0)


__all__ = ["ContextSettings", "DEFAULT_N_BATCH", "DEFAULT_N_CTX", "LlamaContext", "LlamaModel", "LlamaSequence",
           "open_decoder"]
