"""llama.cpp's `llama_context` on a LlamaModel: n_ctx KV cells shared by n_seq sequences, the batches, decode. Image rows
go in through `llama_batch.embd`, text through token batches, at explicit positions of one sequence; a sequence's KV
is removed with `llama_memory_seq_rm` and saved/restored with `llama_state_seq_get/set_data`. `step_many` decodes one
generated token of several sequences in one `llama_decode` (`edgevlm serve --parallel N`).

Parity mode (flash attention off, f32 KV) matches PyTorch to ~1e-6. Otherwise the KV cache is f16, and flash
attention (f16, ~5e-3) is on where llama.cpp offloads to a GPU; on a CPU-only build open_decoder measures it once per
CPU and context class (flash_choice.py) and a context opened with no choice gets it off."""
from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ...backends import thread_count
from ...errors import BackendUnavailableError, BadInputError, BundleError
from ..base import BatchedContext, Segment, chunks
from .model import FreedWhenCollected, LlamaModel
from .sequence import LlamaSequence

DEFAULT_N_CTX = 4096  # unless --n-ctx says otherwise: the KV cache is allocated whole at load
DEFAULT_N_BATCH = 512
MAX_SEQUENCES = 64  # llama.cpp allows 256 (LLAMA_MAX_SEQ); a device serves a few users


def flash_attention_type(llama_cpp, wanted: bool | None) -> int:
    """Flash attention pays on GPUs. On CPUs it depends on the CPU and the depth (an AVX2 EPYC, SmolVLM-256M q8_0
    after 1,088 image rows: 27 vs 61 tok/s off; an AVX-512 EPYC after 3,072 positions: 52 vs 47 tok/s on), so a
    context opened with no choice gets it off on a CPU-only build and open_decoder passes the measured one
    (flash_choice.choose_flash_attention)."""
    if wanted is None:
        gpu = llama_cpp.llama_supports_gpu_offload()
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if gpu else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    return llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if wanted else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


@dataclass(frozen=True)
class ContextSettings:
    """What a context is opened with; two contexts with the same settings on the same weights exchange states."""

    n_ctx: int = DEFAULT_N_CTX
    n_batch: int = DEFAULT_N_BATCH
    threads: int | None = None  # None: backends.thread_count's default
    parity: bool = False  # flash attention off, f32 KV: matches PyTorch to ~1e-6
    flash_attn: bool | None = None  # None: on where llama.cpp offloads to a GPU (flash_attention_type)
    # "bidirectional": each image segment is decoded in one micro-batch with causal attention off (Gemma 3);
    # "prefix": the prompt (a prefill into an empty sequence) is, text and images together (decode_prefix)
    image_attention: str = "causal"

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.n_batch < 1:
            raise BadInputError(f"a llama.cpp context needs n_ctx >= 1 and n_batch >= 1, got {self.n_ctx}, {self.n_batch}")
        thread_count(self.threads)  # validated here, resolved when the context opens
        if self.image_attention not in ("causal", "bidirectional", "prefix"):
            raise BadInputError(f"image_attention {self.image_attention!r}: llama.cpp runs 'causal', 'bidirectional' "
                                "or 'prefix'")


class LlamaContext(BatchedContext, FreedWhenCollected):
    """n_seq sequences in one KV pool of n_ctx cells that any sequence may fill (not n_ctx / n_seq each); only one
    thread at a time may call it, as for any llama.cpp context."""

    def __init__(self, model: LlamaModel, settings: ContextSettings, n_seq: int = 1):
        if not 1 <= n_seq <= MAX_SEQUENCES:
            raise BadInputError(f"a llama.cpp context holds 1..{MAX_SEQUENCES} sequences, got {n_seq}")
        lib = model.lib
        self.lib, self.model, self.settings = lib, model, settings
        self.n_ctx, self.n_batch, self.n_seq = int(settings.n_ctx), int(settings.n_batch), int(n_seq)
        self.threads = thread_count(settings.threads)
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_seq_max = self.n_seq
        # one KV pool for all sequences: memory stays that of one sequence, and the server keeps the sum within
        # n_ctx. With one sequence it is the same layout (one stream), so states move between the two kinds.
        params.kv_unified = self.n_seq > 1
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        # local layers keep only their window (llama.cpp's SWA cache) instead of n_ctx cells each; the price: the
        # sequence cannot be cut back behind the window it dropped (LlamaSequence.can_truncate)
        params.swa_full = False
        self.n_swa = model.n_swa
        if settings.parity:
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.type_k = params.type_v = lib.GGML_TYPE_F32
        else:
            params.flash_attn_type = flash_attention_type(lib, settings.flash_attn)
        self.kv_type = "f32" if settings.parity else "f16"
        self.flash_attn_type = int(params.flash_attn_type)
        # what a saved sequence state depends on: the weights, the KV type, the context and batch settings
        self.state_signature = (f"llama.cpp {lib.__version__}|{model.artifact_id}|n_ctx={self.n_ctx}|"
                                f"n_batch={self.n_batch}|kv={self.kv_type}|fa={self.flash_attn_type}"
                                + (f"|swa={self.n_swa}" if self.n_swa else ""))
        self.pointer = lib.llama_init_from_model(model.pointer, params)
        if not self.pointer:
            raise BackendUnavailableError(f"llama.cpp could not create a context of {self.n_ctx} positions for "
                                          f"{model.path}")
        model.contexts_opened += 1
        self.memory = lib.llama_get_memory(self.pointer)
        self._tokens = lib.llama_batch_init(self.n_batch, 0, 1)
        self._embeds = lib.llama_batch_init(self.n_batch, model.n_embd_inp, 1)  # DeepStack rows are wider
        self._one = lib.llama_batch_init(1, 0, 1)  # the decode loop's batch: fixed fields set once
        self._one.n_tokens, self._one.n_seq_id[0], self._one.logits[0] = 1, 1, 1
        self._many = lib.llama_batch_init(self.n_seq, 0, 1)  # step_many: one row per sequence
        # an M-RoPE embedding batch takes 4 positions per row, section-major [t | row | col | 0]; llama_batch_init
        # allocates one per row, so it gets its own buffer (the address itself is kept, swapped back at close)
        self._pos_one_per_row = ctypes.cast(self._embeds.pos, ctypes.c_void_p).value
        if model.mrope:
            self._pos4 = np.zeros(4 * self.n_batch, dtype=np.int32)
            self._embeds.pos = self._pos4.ctypes.data_as(ctypes.POINTER(lib.llama_pos))
        self._sequences: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def set_threads(self, threads: int) -> None:
        """The threads of every later decode and prefill (a server lends some to the image encoder meanwhile)."""
        self.lib.llama_set_n_threads(self.pointer, thread_count(threads), thread_count(threads))

    @property
    def contexts_opened(self) -> int:
        return self.model.contexts_opened

    def sequence(self, index: int) -> LlamaSequence:
        if not 0 <= index < self.n_seq:
            raise ValueError(f"sequence {index} of a context of {self.n_seq}")
        seq = self._sequences.get(index)
        if seq is None:  # nobody holds it: whatever its cells hold belongs to no record, so it starts empty
            self.forget(index)
            seq = self._sequences[index] = LlamaSequence(self, index)
        return seq

    # ---- decoding --------------------------------------------------------------------------------------------
    def decode_chunks(self, seq_id: int, segments: list[Segment], want_logits: bool = True) -> Iterator[Segment]:
        """Decode the segments into sequence seq_id in pieces of at most n_batch rows, yielding each piece once it is
        in the KV; the last row of the last piece gets logits when want_logits (read them with `logits_at(-1)`)."""
        total, done = sum(len(s) for s in segments), 0
        bidirectional = self.settings.image_attention == "bidirectional"
        if bidirectional:
            self._check_whole_images(segments)
        for piece in chunks(segments, self.n_batch):
            done += len(piece)
            positions = self._positions(piece)
            if piece.token_ids is not None:
                ids = np.ascontiguousarray(piece.token_ids, dtype=np.int32)
                ctypes.memmove(self._tokens.token, ids.ctypes.data, ids.nbytes)
                self._decode(self._tokens, positions, want_logits and done == total, seq_id)
            else:
                rows = np.ascontiguousarray(piece.embeds * self.model.input_row_scale, dtype=np.float32)  # (n, n_embd_inp)
                if rows.shape[1] != self.model.n_embd_inp:
                    raise BundleError(f"image embeddings have width {rows.shape[1]} but the GGUF decoder expects "
                                      f"{self.model.n_embd_inp}; the encoder and decoder come from different models")
                ctypes.memmove(self._embeds.embd, rows.ctypes.data, rows.nbytes)
                if bidirectional:  # every row of the image sees the whole image (and everything before it)
                    self.lib.llama_set_causal_attn(self.pointer, False)
                try:
                    self._decode(self._embeds, positions, want_logits and done == total, seq_id)
                finally:
                    if bidirectional:
                        self.lib.llama_set_causal_attn(self.pointer, True)
            yield piece

    def decode_prefix(self, seq_id: int, segments: list[Segment]) -> int:
        """A prefix-LM prompt (PaliGemma): every row sees every other, so it goes in as one micro-batch of embedding
        rows (its text as the GGUF's token rows) with causal attention off; the answer after it is causal. Refused,
        in one line, when it cannot fit the micro-batch or is longer than the sliding window (llama.cpp would hide
        from a prefix row what lies more than a window behind it, which HF's prefix mask lets it see)."""
        n, fits = sum(len(s) for s in segments), min(self.n_batch, self.n_ctx)  # llama.cpp caps n_ubatch at n_ctx
        if n > fits:
            raise BadInputError(f"a prefix-LM prompt of {n} positions attends bidirectionally and must fit one "
                                f"llama.cpp micro-batch, but it holds {fits}; open the decoder with n_batch (and "
                                f"n_ctx) >= {n} or shorten the prompt")
        if self.n_swa and n > self.n_swa:
            raise BadInputError(f"a prefix-LM prompt of {n} positions is longer than the local layers' window of "
                                f"{self.n_swa}; llama.cpp would not let its first rows see its last: shorten the prompt")
        scale = self.model.input_row_scale
        rows = np.ascontiguousarray(np.concatenate(
            [self.model.token_rows(s.token_ids) if s.token_ids is not None else s.embeds * scale for s in segments]),
            dtype=np.float32)
        if rows.shape[1] != self.model.n_embd_inp:
            raise BundleError(f"image embeddings have width {rows.shape[1]} but the GGUF decoder expects "
                              f"{self.model.n_embd_inp}; the encoder and decoder come from different models")
        positions = self._positions(Segment(np.concatenate([s.positions for s in segments]), embeds=rows))
        ctypes.memmove(self._embeds.embd, rows.ctypes.data, rows.nbytes)
        self.lib.llama_set_causal_attn(self.pointer, False)
        try:
            self._decode(self._embeds, positions, True, seq_id)
        finally:
            self.lib.llama_set_causal_attn(self.pointer, True)
        return n

    def _check_whole_images(self, segments: list[Segment]) -> None:
        """A bidirectional image goes into llama.cpp in one micro-batch (n_ubatch = n_batch here): refuse one that
        cannot fit rather than run it causally in pieces."""
        largest = max((len(s) for s in segments if s.embeds is not None), default=0)
        if largest > self.n_batch:
            raise BadInputError(f"an image block of {largest} rows attends bidirectionally and must fit one llama.cpp "
                                f"micro-batch, but n_batch is {self.n_batch}; open the decoder with n_batch >= {largest}")

    def _decode(self, batch, positions: np.ndarray, want_logits: bool, seq_id: int) -> None:
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
        status = self.lib.llama_decode(self.pointer, batch)
        if status != 0:
            # llama_decode: 1 = no KV slot for the batch, 2 = aborted, < 0 = error; the positions it did take stay
            raise RuntimeError(f"llama_decode failed with status {status} at position {int(positions[0])} "
                               f"(n={n}, n_ctx={self.n_ctx})")

    def _positions(self, segment: Segment) -> np.ndarray:
        """What llama.cpp takes: one position per token (an M-RoPE text token's t; the graph repeats it on every
        axis), (n, 3) per M-RoPE image row; anything else is refused rather than run at the wrong positions."""
        positions, mrope = segment.positions, self.model.mrope
        if positions.ndim == 1 or (positions.shape[1] == 3 and mrope):
            if mrope and segment.embeds is not None and positions.ndim == 1:
                raise BundleError("this GGUF decoder uses M-RoPE: image rows need (t, row, col) positions; the "
                                  "manifest's position scheme does not give them (re-export the bundle)")
            if positions.ndim == 2 and segment.token_ids is not None:
                if not (np.array_equal(positions[:, 0], positions[:, 1]) and np.array_equal(positions[:, 0], positions[:, 2])):
                    raise BundleError("text tokens at M-RoPE positions whose axes differ; llama.cpp takes one per token")
                return np.ascontiguousarray(positions[:, 0])
            return positions
        raise BundleError(f"this GGUF decoder takes {'(n, 3) M-RoPE' if mrope else '1-D'} positions; the bundle "
                          f"gives {positions.shape[1]} per token (a position scheme that does not match the GGUF)")

    def decode_one(self, seq_id: int, token: int, position: int) -> None:
        """One token at one position (1-D, or an M-RoPE text token's t) with its logits, through the batch whose
        fixed fields are set once (the decode loop's fast path)."""
        self._one.token[0], self._one.pos[0], self._one.seq_id[0][0] = token, position, seq_id
        status = self.lib.llama_decode(self.pointer, self._one)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} at position {position} (n_ctx={self.n_ctx})")

    def step_many(self, sequences: Sequence[LlamaSequence], tokens: Sequence[int], positions: Sequence[int]) -> None:
        """Row i: sequences[i]'s token at positions[i] (1-D, or an M-RoPE text token's t, which llama.cpp repeats
        on every axis); afterwards sequences[i] samples from row i (its logits_row)."""
        n = len(sequences)
        ids = [s.seq_id for s in sequences]
        if not 1 <= n <= self.n_seq or len(set(ids)) != n or any(s.context is not self for s in sequences):
            raise ValueError(f"step_many takes 1..{self.n_seq} distinct sequences of this context, got {ids}")
        batch = self._many
        for i, (seq, token, position) in enumerate(zip(sequences, tokens, positions)):
            if seq.n_past >= self.n_ctx:
                raise RuntimeError(f"{seq.n_past + 1} positions exceed the llama.cpp context of {self.n_ctx}")
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(token), int(position), 1
            batch.seq_id[i][0], batch.logits[i] = seq.seq_id, 1
        batch.n_tokens = n
        status = self.lib.llama_decode(self.pointer, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode of {n} sequences failed with status {status} (n_ctx={self.n_ctx}, "
                               f"{self.kv_used()} cells in use)")
        for row, (seq, position) in enumerate(zip(sequences, positions)):
            seq.decoded(1, int(position) + 1, row)

    def logits_at(self, row: int) -> np.ndarray:
        """A view of the logits of an output row of the last decode (-1: the last one), valid until the next decode."""
        return np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.pointer, row), shape=(self.model.vocab_size,))

    # ---- the KV of one sequence ------------------------------------------------------------------------------
    def remove(self, seq_id: int, first: int) -> bool:
        """Drop the sequence's cells at positions >= first (llama.cpp removes by position); False if refused."""
        return bool(self.lib.llama_memory_seq_rm(self.memory, seq_id, first, -1))

    def oldest_kept(self, seq_id: int) -> int:
        """The first position every layer of the sequence still holds (the SWA window's start; -1: empty)."""
        return int(self.lib.llama_memory_seq_pos_min(self.memory, seq_id))

    def forget(self, seq_id: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def save(self, seq_id: int) -> bytes:
        size = self.lib.llama_state_seq_get_size(self.pointer, seq_id)
        buffer = (ctypes.c_uint8 * size)()
        written = self.lib.llama_state_seq_get_data(self.pointer, buffer, size, seq_id)
        # string_at copies once in C; bytes(buffer[:n]) went through a Python list of ints (~1 s per 25 MB)
        return ctypes.string_at(buffer, written)

    def load(self, seq_id: int, payload: bytes, nbytes: int) -> bool:
        """Write a saved state into the (emptied) sequence; False if llama.cpp refuses it."""
        data = ctypes.cast(ctypes.c_char_p(payload), ctypes.POINTER(ctypes.c_uint8))  # read-only, no copy
        return self.lib.llama_state_seq_set_data(self.pointer, data, nbytes, seq_id) != 0  # 0 = refused

    def kv_used(self) -> int:
        """KV cells in use by all sequences: positions, since no two sequences share a cell here."""
        total = 0
        for seq_id in range(self.n_seq):
            top = int(self.lib.llama_memory_seq_pos_max(self.memory, seq_id))
            # with an SWA cache pos_min is the window's start; the global layers still hold from position 0
            low = 0 if self.n_swa else int(self.lib.llama_memory_seq_pos_min(self.memory, seq_id))
            total += 0 if top < 0 else top - low + 1
        return total

    # ---- lifetime --------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the KV cache and batches (the weights go with the last context on them); no decoding afterwards."""
        if getattr(self, "pointer", None):
            lib = self.lib
            lib.llama_batch_free(self._tokens)
            self._embeds.pos = ctypes.cast(self._pos_one_per_row, ctypes.POINTER(lib.llama_pos))  # what init allocated
            lib.llama_batch_free(self._embeds)
            lib.llama_batch_free(self._one)
            lib.llama_batch_free(self._many)
            lib.llama_free(self.pointer)
            self.pointer = None
