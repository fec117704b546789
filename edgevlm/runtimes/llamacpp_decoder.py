"""Decoder backend on llama.cpp (llama-cpp-python's low-level API). Image rows go in through `llama_batch.embd`,
text through token batches, at explicit positions of one sequence; the KV of that sequence is truncated with
`llama_memory_seq_rm` and snapshotted/restored with `llama_state_seq_get/set_data`.

Parity mode (flash attention off, f32 KV) matches PyTorch to ~1e-6. Otherwise the KV cache is f16, and flash
attention is on where llama.cpp offloads to a GPU (it computes in f16, ~5e-3) and off on CPU-only builds, where
it is slower (see flash_attention_type)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, BundleError
from .base import DecoderState, Segment

GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1
FLASH_ATTN_DISABLED, FLASH_ATTN_ENABLED, FLASH_ATTN_AUTO = 0, 1, -1
DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 512

_LOG_CALLBACK = None


def _llama():
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendUnavailableError(
            f"llama-cpp-python is not installed ({exc}); `pip install llama-cpp-python==0.3.36` (see README)"
        ) from None
    return llama_cpp


def silence_llama_logs(llama_cpp) -> None:
    """llama.cpp logs every tensor at load; keep warnings and errors only."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        def callback(level, text, user_data):
            if level in (2, 4) and os.environ.get("EDGEVLM_LLAMA_LOG"):  # GGML_LOG_LEVEL_WARN / ERROR
                print(text.decode(errors="replace"), end="")

        _LOG_CALLBACK = llama_cpp.llama_log_callback(callback)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


def flash_attention_type(llama_cpp, wanted: bool | None) -> int:
    """Flash attention pays on GPUs. llama.cpp's CPU kernel decodes at long context at half the speed of the plain
    one here (SmolVLM-256M q8_0 after 1,088 image rows: 27 vs 61 tok/s; prefill 15% faster), so a CPU-only build
    gets it off unless asked for."""
    if wanted is None:
        return FLASH_ATTN_AUTO if llama_cpp.llama_supports_gpu_offload() else FLASH_ATTN_DISABLED
    return FLASH_ATTN_ENABLED if wanted else FLASH_ATTN_DISABLED


class LlamaCppDecoder:
    name = "llamacpp"

    def __init__(self, gguf_path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 n_batch: int = DEFAULT_N_BATCH, parity: bool = False, context_length: int | None = None,
                 flash_attn: bool | None = None):
        llama_cpp = _llama()
        self._lib = llama_cpp
        silence_llama_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        path = Path(gguf_path)
        model_params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise BundleError(f"llama.cpp could not load {path}: the GGUF is corrupt or not a llama model; re-export it")
        self.n_ctx = int(n_ctx or min(context_length or DEFAULT_N_CTX, DEFAULT_N_CTX))
        self.n_batch = int(n_batch)
        self.threads = int(threads or os.cpu_count() or 1)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.no_perf = True
        if parity:
            params.flash_attn_type = FLASH_ATTN_DISABLED
            params.type_k = GGML_TYPE_F32
            params.type_v = GGML_TYPE_F32
        else:
            params.flash_attn_type = flash_attention_type(llama_cpp, flash_attn)
        self.parity = parity
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise BackendUnavailableError(f"llama.cpp could not create a context of {self.n_ctx} positions for {path}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.model))
        self.model_bytes = int(llama_cpp.llama_model_size(self.model))
        self._tokens = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._embeds = llama_cpp.llama_batch_init(self.n_batch, self.n_embd, 1)
        self.n_past = 0

    def _decode(self, batch, n: int, start_pos: int, want_logits: bool) -> None:
        for i in range(n):
            batch.pos[i] = start_pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (want_logits and i == n - 1) else 0
        batch.n_tokens = n
        status = self._lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} at position {start_pos} (n={n}, n_ctx={self.n_ctx})")

    def prefill(self, segments: list[Segment]) -> np.ndarray:
        total = sum(len(s) for s in segments)
        if self.n_past + total > self.n_ctx:
            raise RuntimeError(f"{self.n_past + total} positions exceed the llama.cpp context of {self.n_ctx}")
        done = 0
        for segment in segments:
            for start in range(0, len(segment), self.n_batch):
                piece = segment.slice(start, start + self.n_batch)
                n = len(piece)
                last = done + n == total
                if piece.token_ids is not None:
                    ids = np.ascontiguousarray(piece.token_ids, dtype=np.int32)
                    ctypes.memmove(self._tokens.token, ids.ctypes.data, ids.nbytes)
                    self._decode(self._tokens, n, self.n_past, last)
                else:
                    rows = np.ascontiguousarray(piece.embeds, dtype=np.float32)  # (n, n_embd)
                    if rows.shape[1] != self.n_embd:
                        raise BundleError(f"image embeddings have width {rows.shape[1]} but the GGUF decoder expects "
                                          f"{self.n_embd}; the encoder and decoder come from different models")
                    ctypes.memmove(self._embeds.embd, rows.ctypes.data, rows.nbytes)
                    self._decode(self._embeds, n, self.n_past, last)
                self.n_past += n
                done += n
        # A view of llama.cpp's buffer, valid until the next decode: the session samples from it at once, and
        # copying 49k floats per token is measurable at ~100 tok/s. Callers that keep logits copy them.
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab_size,))

    def truncate(self, n_past: int) -> None:
        if n_past < self.n_past:
            if not self._lib.llama_memory_seq_rm(self.memory, 0, n_past, -1):
                raise RuntimeError("llama.cpp could not truncate the sequence")
            self.n_past = n_past

    def snapshot(self) -> DecoderState:
        size = self._lib.llama_state_seq_get_size(self.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = self._lib.llama_state_seq_get_data(self.ctx, buffer, size, 0)
        return DecoderState(bytes(buffer[:written]), self.n_past, int(written))

    def restore(self, state: DecoderState) -> None:
        self._lib.llama_memory_seq_rm(self.memory, 0, -1, -1)
        data = (ctypes.c_uint8 * state.nbytes).from_buffer_copy(state.payload)
        if self._lib.llama_state_seq_set_data(self.ctx, data, state.nbytes, 0) == 0:
            raise RuntimeError("llama.cpp refused a saved sequence state (different model or context settings)")
        self.n_past = state.n_past

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's own tokenizer (for checking that the GGUF vocabulary matches the HF one)."""
        raw = text.encode("utf-8")
        capacity = len(raw) + 16
        buffer = (self._lib.llama_token * capacity)()
        n = self._lib.llama_tokenize(self.vocab, raw, len(raw), buffer, capacity, add_special, parse_special)
        if n < 0:
            raise RuntimeError("llama_tokenize buffer too small")
        return list(buffer[:n])

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._lib.llama_batch_free(self._tokens)
            self._lib.llama_batch_free(self._embeds)
            self._lib.llama_free(self.ctx)
            self._lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass
