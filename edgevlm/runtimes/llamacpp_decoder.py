"""Decoder backend on llama.cpp (llama-cpp-python's low-level API). Image rows go in through `llama_batch.embd`,
text through token batches, at explicit positions of one sequence; the KV of that sequence is truncated with
`llama_memory_seq_rm` and snapshotted/restored with `llama_state_seq_get/set_data`.

Parity mode (flash attention off, f32 KV) matches PyTorch to ~1e-6. Otherwise the KV cache is f16, and flash
attention is on where llama.cpp offloads to a GPU (it computes in f16, ~5e-3) and off on CPU-only builds, where
it is slower (see flash_attention_type)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..backends import require_llama_cpp, silence_llama_logs, thread_count
from ..errors import BackendUnavailableError, BundleError
from .base import DecoderState, Segment

DEFAULT_N_CTX = 4096  # unless --n-ctx says otherwise: the KV cache is allocated whole at load
DEFAULT_N_BATCH = 512

def flash_attention_type(llama_cpp, wanted: bool | None) -> int:
    """Flash attention pays on GPUs. llama.cpp's CPU kernel decodes at long context at half the speed of the plain
    one here (SmolVLM-256M q8_0 after 1,088 image rows: 27 vs 61 tok/s; prefill 15% faster), so a CPU-only build
    gets it off unless asked for."""
    if wanted is None:
        gpu = llama_cpp.llama_supports_gpu_offload()
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if gpu else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if wanted else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp picks a random seed


def sampler_chain(llama_cpp, config, n_vocab: int, penalty_window: int, final: bool = True):
    """llama.cpp's sampler chain in the order edgevlm's numpy Sampler applies the same settings: repetition penalty
    (transformers' rule, over the whole history), then greedy; or temperature, top-k, top-p and a seeded draw.
    final=False leaves out the last step (greedy / draw), for comparing what each setting keeps."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = lambda sampler: llama_cpp.llama_sampler_chain_add(chain, sampler)  # noqa: E731
    if config.repetition_penalty != 1.0:
        add(llama_cpp.llama_sampler_init_penalties(n_vocab, penalty_window, config.repetition_penalty, 0.0, 0.0))
    if config.temperature == 0.0:
        if final:
            add(llama_cpp.llama_sampler_init_greedy())
        return chain
    add(llama_cpp.llama_sampler_init_temp(config.temperature))
    if config.top_k:
        add(llama_cpp.llama_sampler_init_top_k(config.top_k))
    if config.top_p < 1.0:
        add(llama_cpp.llama_sampler_init_top_p(config.top_p, 1))
    if final:
        add(llama_cpp.llama_sampler_init_dist(DEFAULT_SEED if config.seed is None else config.seed % 2**32))
    return chain


class NativeSampler:
    """Samples from the context's last logits with llama.cpp's chain: no copy of the vocabulary-sized logits into
    Python per token. Greedy picks equal the numpy Sampler's; seeded draws come from llama.cpp's own RNG."""

    def __init__(self, decoder: "LlamaCppDecoder", config, history: list[int]):
        self._lib, self._ctx = decoder._lib, decoder.ctx
        self.chain = sampler_chain(self._lib, config, decoder.vocab_size, decoder.n_ctx)
        if config.repetition_penalty != 1.0:  # the penalty sees the prompt too, as transformers' does
            for token in history:
                self._lib.llama_sampler_accept(self.chain, int(token))

    def sample(self, logits, history) -> int:  # the logits are already in llama.cpp's context
        return int(self._lib.llama_sampler_sample(self.chain, self._ctx, -1))

    def close(self) -> None:
        if self.chain:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None


class LlamaCppDecoder:
    name = "llamacpp"

    def __init__(self, gguf_path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 n_batch: int = DEFAULT_N_BATCH, parity: bool = False, context_length: int | None = None,
                 flash_attn: bool | None = None, artifact_id: str | None = None):
        llama_cpp = require_llama_cpp()
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
        self.threads = thread_count(threads)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = 1
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.no_perf = True
        if parity:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.type_k = llama_cpp.GGML_TYPE_F32
            params.type_v = llama_cpp.GGML_TYPE_F32
        else:
            params.flash_attn_type = flash_attention_type(llama_cpp, flash_attn)
        self.parity = parity
        self.artifact_id = artifact_id or f"gguf:{path.name}"
        # what a saved sequence state depends on: the weights, the KV type, the context and batch settings
        self.state_signature = (f"llama.cpp {llama_cpp.__version__}|{self.artifact_id}|n_ctx={self.n_ctx}|"
                                f"n_batch={self.n_batch}|kv={'f32' if parity else 'f16'}|fa={int(params.flash_attn_type)}")
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
        self._one = llama_cpp.llama_batch_init(1, 0, 1)  # the decode loop's batch: fixed fields set once
        self._one.n_tokens, self._one.n_seq_id[0], self._one.logits[0] = 1, 1, 1
        self._one.seq_id[0][0] = 0
        # M-RoPE (Qwen2-VL): an embedding batch takes 4 positions per row, section-major [t | row | col | 0];
        # llama_batch_init allocates one per row, so the embedding batch gets its own buffer (swapped back at close)
        self.mrope = llama_cpp.llama_model_rope_type(self.model) == llama_cpp.LLAMA_ROPE_TYPE_MROPE
        # the address itself: a pointer field read from a ctypes struct is a view of the struct, not a copy
        self._pos_one_per_row = ctypes.cast(self._embeds.pos, ctypes.c_void_p).value
        if self.mrope:
            self._pos4 = np.zeros(4 * self.n_batch, dtype=np.int32)
            self._embeds.pos = self._pos4.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        self.n_past = 0
        self.next_position = 0

    def _decode(self, batch, positions: np.ndarray, want_logits: bool) -> None:
        n = len(positions)
        if positions.ndim == 2:  # (n, 3) M-RoPE rows -> section-major [t... | row... | col... | 0...]
            self._pos4[: 4 * n] = 0
            self._pos4[: 3 * n] = positions.T.reshape(-1)
        for i in range(n):
            if positions.ndim == 1:
                batch.pos[i] = int(positions[i])
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (want_logits and i == n - 1) else 0
        batch.n_tokens = n
        status = self._lib.llama_decode(self.ctx, batch)
        if status != 0:
            # llama_decode: 1 = no KV slot for the batch, 2 = aborted, < 0 = error; the positions it did take stay
            raise RuntimeError(f"llama_decode failed with status {status} at position {int(positions[0])} "
                               f"(n={n}, n_ctx={self.n_ctx})")

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
                positions = self._positions(piece)
                if piece.token_ids is not None:
                    ids = np.ascontiguousarray(piece.token_ids, dtype=np.int32)
                    ctypes.memmove(self._tokens.token, ids.ctypes.data, ids.nbytes)
                    self._decode(self._tokens, positions, last)
                else:
                    rows = np.ascontiguousarray(piece.embeds, dtype=np.float32)  # (n, n_embd)
                    if rows.shape[1] != self.n_embd:
                        raise BundleError(f"image embeddings have width {rows.shape[1]} but the GGUF decoder expects "
                                          f"{self.n_embd}; the encoder and decoder come from different models")
                    ctypes.memmove(self._embeds.embd, rows.ctypes.data, rows.nbytes)
                    self._decode(self._embeds, positions, last)
                self.n_past += n
                self.next_position = max(self.next_position, int(piece.positions.max()) + 1)
                done += n
        # A view of llama.cpp's buffer, valid until the next decode: the session samples from it at once, and
        # copying 49k floats per token is measurable at ~100 tok/s. Callers that keep logits copy them.
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab_size,))

    def _positions(self, segment: Segment) -> np.ndarray:
        """What llama.cpp takes: one position per token (an M-RoPE text token's t; the graph repeats it on every
        axis), (n, 3) per M-RoPE image row; anything else is refused rather than run at the wrong positions."""
        positions = segment.positions
        if positions.ndim == 1 or (positions.shape[1] == 3 and self.mrope):
            if self.mrope and segment.embeds is not None and positions.ndim == 1:
                raise BundleError("this GGUF decoder uses M-RoPE: image rows need (t, row, col) positions; the "
                                  "manifest's position scheme does not give them (re-export the bundle)")
            if positions.ndim == 2 and segment.token_ids is not None:
                if not (np.array_equal(positions[:, 0], positions[:, 1]) and np.array_equal(positions[:, 0], positions[:, 2])):
                    raise BundleError("text tokens at M-RoPE positions whose axes differ; llama.cpp takes one per token")
                return np.ascontiguousarray(positions[:, 0])
            return positions
        raise BundleError(f"this GGUF decoder takes {'(n, 3) M-RoPE' if self.mrope else '1-D'} positions; the bundle "
                          f"gives {positions.shape[1]} per token (a position scheme that does not match the GGUF)")

    def step(self, token: int, position: int) -> np.ndarray:
        """One generated token at a 1-D position: what prefill does for a one-token segment, without building one."""
        if self.n_past >= self.n_ctx:
            raise RuntimeError(f"{self.n_past + 1} positions exceed the llama.cpp context of {self.n_ctx}")
        self._one.token[0], self._one.pos[0] = token, position
        status = self._lib.llama_decode(self.ctx, self._one)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} at position {position} (n_ctx={self.n_ctx})")
        self.n_past += 1
        self.next_position = max(self.next_position, position + 1)
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab_size,))

    def sampler(self, config, history: list[int]) -> NativeSampler:
        return NativeSampler(self, config, history)

    def truncate(self, n_past: int, next_position: int | None = None) -> None:
        """Keep the first n_past rows. llama.cpp removes by position: 1-D, rows 0..n_past-1 hold positions
        0..n_past-1; M-RoPE, the first removed row's t is `next_position` (text continues at max + 1 and an image
        starts there too; the session never cuts inside an image, whose rows share one t)."""
        if n_past < self.n_past:
            first_removed = next_position if self.mrope and next_position is not None and n_past > 0 else n_past
            if not self._lib.llama_memory_seq_rm(self.memory, 0, first_removed, -1):
                self._forget()
                raise RuntimeError("llama.cpp could not truncate the sequence; it was cleared")
            self.n_past = n_past
        self.next_position = n_past if next_position is None else next_position

    def _forget(self) -> None:
        self._lib.llama_memory_seq_rm(self.memory, 0, -1, -1)
        self.n_past = self.next_position = 0

    def snapshot(self) -> DecoderState:
        size = self._lib.llama_state_seq_get_size(self.ctx, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = self._lib.llama_state_seq_get_data(self.ctx, buffer, size, 0)
        # string_at copies once in C; bytes(buffer[:n]) went through a Python list of ints (~1 s per 25 MB)
        return DecoderState(ctypes.string_at(buffer, written), self.n_past, int(written), self.next_position)

    def restore(self, state: DecoderState) -> None:
        """Replace the sequence by a snapshot; if llama.cpp refuses it the sequence is left empty (n_past 0)."""
        self._forget()
        data = ctypes.cast(ctypes.c_char_p(state.payload), ctypes.POINTER(ctypes.c_uint8))  # read-only, no copy
        if self._lib.llama_state_seq_set_data(self.ctx, data, state.nbytes, 0) == 0:  # bytes read; 0 = refused
            self._forget()
            raise RuntimeError("llama.cpp refused a saved sequence state (different model or context settings)")
        self.n_past, self.next_position = state.n_past, state.next_position

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
            # llama_batch_free frees what llama_batch_init allocated
            self._embeds.pos = ctypes.cast(self._pos_one_per_row, ctypes.POINTER(self._lib.llama_pos))
            self._lib.llama_batch_free(self._embeds)
            self._lib.llama_batch_free(self._one)
            self._lib.llama_free(self.ctx)
            self._lib.llama_model_free(self.model)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass
