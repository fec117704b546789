"""Decoder backend on llama.cpp (llama-cpp-python's low-level API). Image rows go in through `llama_batch.embd`,
text through token batches, at explicit positions of one sequence; the KV of that sequence is truncated with
`llama_memory_seq_rm` and snapshotted/restored with `llama_state_seq_get/set_data`.

Several sequences (`edgevlm serve --parallel N`): `with_sequences(N)` opens a context of N sequences on the same
weights, one unified KV pool of n_ctx cells that any sequence may fill; `sequence(i)` is a Decoder of sequence i (one
Session per slot), and `step_many` decodes one generated token of several sequences in one `llama_decode`.

Parity mode (flash attention off, f32 KV) matches PyTorch to ~1e-6. Otherwise the KV cache is f16, and flash
attention is on where llama.cpp offloads to a GPU (it computes in f16, ~5e-3) and off on CPU-only builds, where
it is slower (see flash_attention_type)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from ..backends import require_llama_cpp, silence_llama_logs, thread_count
from ..errors import BackendUnavailableError, BadInputError, BundleError
from .base import DecoderState, Segment

DEFAULT_N_CTX = 4096  # unless --n-ctx says otherwise: the KV cache is allocated whole at load
DEFAULT_N_BATCH = 512
MAX_SEQUENCES = 64  # llama.cpp allows 256 (LLAMA_MAX_SEQ); a device serves a few users

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

    def __init__(self, decoder: "LlamaCppDecoder | LlamaCppSequence", config, history: list[int]):
        self._lib, self._ctx, self._decoder = decoder._lib, decoder.ctx, decoder
        self.chain = sampler_chain(self._lib, config, decoder.vocab_size, decoder.n_ctx)
        if config.repetition_penalty != 1.0:  # the penalty sees the prompt too, as transformers' does
            for token in history:
                self._lib.llama_sampler_accept(self.chain, int(token))

    def sample(self, logits, history) -> int:  # the logits are already in llama.cpp's context, at this row
        return int(self._lib.llama_sampler_sample(self.chain, self._ctx, self._decoder.logits_row))

    def close(self) -> None:
        if self.chain:
            self._lib.llama_sampler_free(self.chain)
            self.chain = None


class LlamaCppDecoder:
    """The context, and itself the Decoder of its sequence 0 (the one-sequence case everyone but the server uses)."""

    name = "llamacpp"
    seq_id = 0
    logits_row = -1  # where the sampler reads this sequence's logits: the last output of its own decode

    def __init__(self, gguf_path: str | Path, n_ctx: int | None = None, threads: int | None = None,
                 n_batch: int = DEFAULT_N_BATCH, parity: bool = False, context_length: int | None = None,
                 flash_attn: bool | None = None, artifact_id: str | None = None, n_seq_max: int = 1,
                 _model=None):
        llama_cpp = require_llama_cpp()
        self._lib = llama_cpp
        silence_llama_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        path = Path(gguf_path)
        self._init_args = dict(gguf_path=path, n_ctx=n_ctx, threads=threads, n_batch=n_batch, parity=parity,
                               context_length=context_length, flash_attn=flash_attn, artifact_id=artifact_id)
        self._owns_model = _model is None  # a context opened by with_sequences shares its parent's weights
        if _model is None:
            _model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        self.model = _model
        if not self.model:
            raise BundleError(f"llama.cpp could not load {path}: the GGUF is corrupt or not a llama model; re-export it")
        if not 1 <= n_seq_max <= MAX_SEQUENCES:
            raise BadInputError(f"n_seq_max must be 1..{MAX_SEQUENCES}, got {n_seq_max}")
        self.n_seq_max = int(n_seq_max)
        self.n_ctx = int(n_ctx or min(context_length or DEFAULT_N_CTX, DEFAULT_N_CTX))
        self.n_batch = int(n_batch)
        self.threads = thread_count(threads)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq_max
        # one KV pool for all sequences: any one may use the whole n_ctx (not n_ctx / N), and memory stays that of
        # one sequence; the server keeps the sum within n_ctx. With one sequence it is the same layout (one stream),
        # so a state saved here restores into a one-sequence context and back.
        params.kv_unified = self.n_seq_max > 1
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
            if self._owns_model:
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
        self._many = llama_cpp.llama_batch_init(self.n_seq_max, 0, 1)  # step_many: one row per sequence
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

    def _decode(self, batch, positions: np.ndarray, want_logits: bool, seq_id: int = 0) -> None:
        n = len(positions)
        if positions.ndim == 2:  # (n, 3) M-RoPE rows -> section-major [t... | row... | col... | 0...]
            self._pos4[: 4 * n] = 0
            self._pos4[: 3 * n] = positions.T.reshape(-1)
        for i in range(n):
            if positions.ndim == 1:
                batch.pos[i] = int(positions[i])
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = 1 if (want_logits and i == n - 1) else 0
        batch.n_tokens = n
        status = self._lib.llama_decode(self.ctx, batch)
        if status != 0:
            # llama_decode: 1 = no KV slot for the batch, 2 = aborted, < 0 = error; the positions it did take stay
            raise RuntimeError(f"llama_decode failed with status {status} at position {int(positions[0])} "
                               f"(n={n}, n_ctx={self.n_ctx})")

    def prefill(self, segments: list[Segment]) -> np.ndarray:
        return self._prefill(self, segments)

    def _prefill(self, seq: "LlamaCppDecoder | LlamaCppSequence", segments: list[Segment]) -> np.ndarray:
        """Append segments to `seq` (this context's sequence 0, or a LlamaCppSequence of it)."""
        total = sum(len(s) for s in segments)
        if seq.n_past + total > self.n_ctx:
            raise RuntimeError(f"{seq.n_past + total} positions exceed the llama.cpp context of {self.n_ctx}")
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
                    self._decode(self._tokens, positions, last, seq.seq_id)
                else:
                    rows = np.ascontiguousarray(piece.embeds, dtype=np.float32)  # (n, n_embd)
                    if rows.shape[1] != self.n_embd:
                        raise BundleError(f"image embeddings have width {rows.shape[1]} but the GGUF decoder expects "
                                          f"{self.n_embd}; the encoder and decoder come from different models")
                    ctypes.memmove(self._embeds.embd, rows.ctypes.data, rows.nbytes)
                    self._decode(self._embeds, positions, last, seq.seq_id)
                seq.n_past += n
                seq.next_position = max(seq.next_position, int(piece.positions.max()) + 1)
                done += n
        seq.logits_row = -1
        # A view of llama.cpp's buffer, valid until the next decode: the session samples from it at once, and
        # copying 49k floats per token is measurable at ~100 tok/s. Callers that keep logits copy them.
        return self.logits(-1)

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

    def step(self, token: int, position: int, logits: bool = True) -> np.ndarray | None:
        """One generated token at one position (1-D, or an M-RoPE text token's t): what prefill does for a one-token
        segment, without building one. logits=False: no view of them (the native sampler reads them in place)."""
        return self._step(self, token, position, logits)

    def _step(self, seq: "LlamaCppDecoder | LlamaCppSequence", token: int, position: int,
              logits: bool = True) -> np.ndarray | None:
        if seq.n_past >= self.n_ctx:
            raise RuntimeError(f"{seq.n_past + 1} positions exceed the llama.cpp context of {self.n_ctx}")
        self._one.token[0], self._one.pos[0], self._one.seq_id[0][0] = token, position, seq.seq_id
        status = self._lib.llama_decode(self.ctx, self._one)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} at position {position} (n_ctx={self.n_ctx})")
        seq.n_past += 1
        seq.next_position = max(seq.next_position, position + 1)
        seq.logits_row = -1
        return self.logits(-1) if logits else None

    def step_many(self, seqs: list["LlamaCppSequence"], tokens: list[int], positions: list[int]) -> None:
        """One generated token for each of several sequences in ONE llama_decode (row i: seqs[i] at positions[i], a
        1-D position or an M-RoPE text token's t, which llama.cpp repeats on every axis); afterwards seqs[i] samples
        from row i (its logits_row). On failure every sequence of the batch is in doubt: the caller empties them."""
        n = len(seqs)
        if not 1 <= n <= self.n_seq_max or len({s.seq_id for s in seqs}) != n:
            raise ValueError(f"step_many takes 1..{self.n_seq_max} distinct sequences, got {[s.seq_id for s in seqs]}")
        batch = self._many
        for i, (seq, token, position) in enumerate(zip(seqs, tokens, positions)):
            if seq.n_past >= self.n_ctx:
                raise RuntimeError(f"{seq.n_past + 1} positions exceed the llama.cpp context of {self.n_ctx}")
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(token), int(position), 1
            batch.seq_id[i][0], batch.logits[i] = seq.seq_id, 1
        batch.n_tokens = n
        status = self._lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode of {n} sequences failed with status {status} (n_ctx={self.n_ctx}, "
                               f"{self.kv_used()} cells in use)")
        for i, (seq, position) in enumerate(zip(seqs, positions)):
            seq.n_past += 1
            seq.next_position = max(seq.next_position, int(position) + 1)
            seq.logits_row = i

    def logits(self, row: int) -> np.ndarray:
        """A view of the logits of an output row of the last decode (-1: the last one), valid until the next decode."""
        return np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.ctx, row), shape=(self.vocab_size,))

    def sampler(self, config, history: list[int]) -> NativeSampler:
        return NativeSampler(self, config, history)

    def truncate(self, n_past: int, next_position: int | None = None) -> None:
        self._truncate(self, n_past, next_position)

    def _truncate(self, seq, n_past: int, next_position: int | None = None) -> None:
        """Keep the first n_past rows. llama.cpp removes by position: 1-D, rows 0..n_past-1 hold positions
        0..n_past-1; M-RoPE, the first removed row's t is `next_position` (text continues at max + 1 and an image
        starts there too; the session never cuts inside an image, whose rows share one t)."""
        if n_past < seq.n_past:
            first_removed = next_position if self.mrope and next_position is not None and n_past > 0 else n_past
            if not self._lib.llama_memory_seq_rm(self.memory, seq.seq_id, first_removed, -1):
                self._forget(seq)
                raise RuntimeError("llama.cpp could not truncate the sequence; it was cleared")
            seq.n_past = n_past
        seq.next_position = n_past if next_position is None else next_position

    def _forget(self, seq=None) -> None:
        seq = self if seq is None else seq
        self._lib.llama_memory_seq_rm(self.memory, seq.seq_id, -1, -1)
        seq.n_past = seq.next_position = 0

    def snapshot(self) -> DecoderState:
        return self._snapshot(self)

    def _snapshot(self, seq) -> DecoderState:
        size = self._lib.llama_state_seq_get_size(self.ctx, seq.seq_id)
        buffer = (ctypes.c_uint8 * size)()
        written = self._lib.llama_state_seq_get_data(self.ctx, buffer, size, seq.seq_id)
        # string_at copies once in C; bytes(buffer[:n]) went through a Python list of ints (~1 s per 25 MB)
        return DecoderState(ctypes.string_at(buffer, written), seq.n_past, int(written), seq.next_position)

    def restore(self, state: DecoderState) -> None:
        self._restore(self, state)

    def _restore(self, seq, state: DecoderState) -> None:
        """Replace the sequence by a snapshot (taken from any sequence of a context with the same state_signature);
        if llama.cpp refuses it the sequence is left empty (n_past 0)."""
        self._forget(seq)
        data = ctypes.cast(ctypes.c_char_p(state.payload), ctypes.POINTER(ctypes.c_uint8))  # read-only, no copy
        if self._lib.llama_state_seq_set_data(self.ctx, data, state.nbytes, seq.seq_id) == 0:  # 0 = refused
            self._forget(seq)
            raise RuntimeError("llama.cpp refused a saved sequence state (different model or context settings)")
        seq.n_past, seq.next_position = state.n_past, state.next_position

    # ---- several sequences (serve --parallel) ------------------------------------------------------------------
    def with_sequences(self, n: int) -> "LlamaCppDecoder":
        """A new context of `n` sequences on these weights (not copied), with this one's settings, so states saved
        in either restore into the other. This decoder must stay open while it is used (it owns the weights)."""
        pool = LlamaCppDecoder(**self._init_args, n_seq_max=n, _model=self.model)
        pool._parent = self  # the weights live as long as any context on them
        self._children = getattr(self, "_children", 0) + 1
        return pool

    def sequence(self, seq_id: int) -> "LlamaCppSequence":
        if not 0 <= seq_id < self.n_seq_max:
            raise ValueError(f"sequence {seq_id} of a context of {self.n_seq_max}")
        return LlamaCppSequence(self, seq_id)

    def kv_used(self) -> int:
        """KV cells in use by all sequences: positions, since no two sequences share a cell here."""
        total = 0
        for seq_id in range(self.n_seq_max):
            top = int(self._lib.llama_memory_seq_pos_max(self.memory, seq_id))
            low = int(self._lib.llama_memory_seq_pos_min(self.memory, seq_id))
            total += 0 if top < 0 else top - low + 1
        return total

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's own tokenizer (for checking that the GGUF vocabulary matches the HF one)."""
        raw = text.encode("utf-8")
        capacity = len(raw) + 16
        buffer = (self._lib.llama_token * capacity)()
        n = self._lib.llama_tokenize(self.vocab, raw, len(raw), buffer, capacity, add_special, parse_special)
        if n < 0:
            raise RuntimeError("llama_tokenize buffer too small")
        return list(buffer[:n])

    def release_context(self) -> None:
        """Free the context (its KV cache and batches) but keep the weights: `edgevlm serve --parallel` keeps only
        the context of its sequences. This decoder cannot decode afterwards."""
        if getattr(self, "ctx", None):
            self._lib.llama_batch_free(self._tokens)
            # llama_batch_free frees what llama_batch_init allocated
            self._embeds.pos = ctypes.cast(self._pos_one_per_row, ctypes.POINTER(self._lib.llama_pos))
            self._lib.llama_batch_free(self._embeds)
            self._lib.llama_batch_free(self._one)
            self._lib.llama_batch_free(self._many)
            self._lib.llama_free(self.ctx)
            self.ctx = None

    def close(self) -> None:
        if getattr(self, "ctx", None) and getattr(self, "_parent", None) is not None:
            self._parent._children -= 1  # a context on the parent's weights is gone
        self.release_context()
        if getattr(self, "model", None) and self._owns_model and not getattr(self, "_children", 0):
            self._lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


class LlamaCppSequence:
    """The Decoder protocol on one sequence of a multi-sequence LlamaCppDecoder: its own n_past / next_position,
    the context's buffers and settings (only the engine thread calls it, as for any llama.cpp context)."""

    name = "llamacpp"

    def __init__(self, pool: LlamaCppDecoder, seq_id: int):
        self.pool, self.seq_id = pool, seq_id
        self._lib, self.ctx = pool._lib, pool.ctx
        self.n_ctx, self.vocab_size, self.n_batch = pool.n_ctx, pool.vocab_size, pool.n_batch
        self.state_signature, self.artifact_id = pool.state_signature, pool.artifact_id
        self.n_past = self.next_position = 0
        self.logits_row = -1

    def prefill(self, segments: list[Segment]) -> np.ndarray:
        return self.pool._prefill(self, segments)

    def step(self, token: int, position: int, logits: bool = True) -> np.ndarray | None:
        return self.pool._step(self, token, position, logits)

    def truncate(self, n_past: int, next_position: int | None = None) -> None:
        self.pool._truncate(self, n_past, next_position)

    def snapshot(self) -> DecoderState:
        return self.pool._snapshot(self)

    def restore(self, state: DecoderState) -> None:
        self.pool._restore(self, state)

    def sampler(self, config, history: list[int]) -> NativeSampler:
        return NativeSampler(self, config, history)

    def logits(self) -> np.ndarray:
        return self.pool.logits(self.logits_row)
