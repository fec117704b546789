"""llama.cpp's own multimodal path (libmtmd, through llama_cpp.mtmd_cpp) over a decoder GGUF and an mmproj GGUF:
mtmd's tokenizer and preprocessing, its vision encoder, its helpers that put image chunks into the KV cache, and
llama.cpp's sampler. This is what llama-mtmd-cli and llama-server --mmproj run; edgevlm uses it as the benchmark
peer and to check mmproj artifacts. The decoder's weights and context are edgevlm's own llama.cpp model and context
(runtimes/llamacpp), opened with the settings llama-server uses; mtmd drives them. Torch-free."""
from __future__ import annotations

import ctypes
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...backends import require_mtmd, silence_mtmd_logs
from ...errors import BundleError
from ...mmproj_header import check_mmproj
from ...runtimes.base import Segment
from ...runtimes.llamacpp import DEFAULT_N_BATCH, ContextSettings, LlamaContext, LlamaModel
from ...runtimes.llamacpp.model import FreedWhenCollected


@dataclass(frozen=True)
class Chunk:
    """One piece of mtmd's tokenized prompt: text tokens, or one image (one tile for slicing projectors)."""

    kind: str  # "text" | "image"
    n_tokens: int
    n_pos: int
    token_ids: tuple[int, ...] | None = None  # text chunks
    image_id: str | None = None  # image chunks: the bitmap's id (a hash of its pixels, as llama-server sets it)


@dataclass
class Tokenized:
    handle: object  # mtmd_input_chunks*
    chunks: list[Chunk]

    @property
    def n_pos(self) -> int:
        return sum(c.n_pos for c in self.chunks)


# the text mtmd writes around each image itself (mtmd.cpp img_beg / img_end) where a chat template writes it too
MTMD_IMAGE_WRAPPERS = {"qwen2vl_merger": ("<|vision_start|>", "<|vision_end|>"),
                       "qwen2.5vl_merger": ("<|vision_start|>", "<|vision_end|>"),
                       "qwen3vl_merger": ("<|vision_start|>", "<|vision_end|>")}
# the text edgevlm's layout writes around an image that mtmd does not (Gemma3Processor's blank lines; mtmd writes
# only <start_of_image> / <end_of_image>)
MTMD_TEXT_AROUND_IMAGE = {"gemma3": ("\n\n", "\n\n")}


def media_prompt(text: str, placeholder: str, projector_type: str, marker: str) -> str:
    """edgevlm's rendered prompt for mtmd: its media marker where edgevlm expands an image's placeholder, without the
    delimiters mtmd adds around the image itself, with the text edgevlm's layout adds around it."""
    begin, end = MTMD_IMAGE_WRAPPERS.get(projector_type, ("", ""))
    before, after = MTMD_TEXT_AROUND_IMAGE.get(projector_type, ("", ""))
    return text.replace(begin + placeholder + end, placeholder).replace(placeholder, before + marker + after)


def image_token_bounds(details: dict) -> tuple[int, int] | None:
    """An mmproj artifact's image-token bounds for mtmd (llama-server --image-min-tokens / --image-max-tokens)."""
    if "image_min_tokens" not in details:
        return None
    return int(details["image_min_tokens"]), int(details["image_max_tokens"])


class MtmdPipeline(FreedWhenCollected):
    def __init__(self, decoder_gguf: str | Path, mmproj: str | Path, n_ctx: int = 4096, threads: int | None = None,
                 n_batch: int = DEFAULT_N_BATCH, parity: bool = False, image_tokens: tuple[int, int] | None = None):
        """parity: flash attention off in the vision encoder and the decoder, f32 KV (as edgevlm's parity mode).
        image_tokens: (min, max) image tokens, what llama-server's --image-min-tokens / --image-max-tokens set."""
        mtmd = require_mtmd()
        check_mmproj(mmproj)  # what libmtmd would abort on (not return from) is refused in one line
        self.model = LlamaModel(decoder_gguf)  # llama.cpp's defaults otherwise, as llama-server runs
        self.context = LlamaContext(self.model, ContextSettings(int(n_ctx), int(n_batch), threads, parity))
        llama_cpp = self.model.lib
        self._lib, self._mtmd = llama_cpp, mtmd
        silence_mtmd_logs(llama_cpp, mtmd)
        self.threads, self.n_batch, self.n_ctx = self.context.threads, self.context.n_batch, self.context.n_ctx
        self.n_embd, self.vocab_size = self.model.n_embd, self.model.vocab_size
        mparams = mtmd.mtmd_context_params_default()
        mparams.use_gpu = bool(llama_cpp.llama_supports_gpu_offload())
        mparams.n_threads = self.threads
        mparams.print_timings = False
        mparams.warmup = False
        mparams.flash_attn_type = self.context.flash_attn_type  # the decoder's choice (off in parity mode)
        if image_tokens is not None:
            mparams.image_min_tokens, mparams.image_max_tokens = (int(v) for v in image_tokens)
        self.mctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), self.model.pointer, mparams)
        if not self.mctx:
            self._free_llama()
            raise BundleError(f"llama.cpp's mtmd could not load the mmproj {mmproj} with {decoder_gguf} (a corrupt file, "
                              "or an mmproj whose output width is not the decoder's); re-export the bundle")
        self.marker = mtmd.mtmd_default_marker().decode()
        self.sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(self.sampler, llama_cpp.llama_sampler_init_greedy())
        self.cached: list[Chunk] = []  # what the sequence holds now, for llama-server-style prefix reuse
        self.n_past = 0

    # -- prompt ---------------------------------------------------------------------------------------------------
    def tokenize(self, text: str, images: list[np.ndarray]) -> Tokenized:
        """text holds one `self.marker` per image; images are (H, W, 3) uint8 RGB (decoded once, by the caller)."""
        mtmd = self._mtmd
        bitmaps = []
        for rgb in images:
            rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            height, width, _ = rgb.shape  # (H, W, 3)
            data = (ctypes.c_uint8 * rgb.nbytes).from_buffer_copy(rgb.tobytes())
            bitmap = mtmd.mtmd_bitmap_init(width, height, data)
            mtmd.mtmd_bitmap_set_id(bitmap, hashlib.sha256(rgb.tobytes()).hexdigest()[:32].encode())
            bitmaps.append(bitmap)
        handle = mtmd.mtmd_input_chunks_init()
        raw = text.encode()
        text_input = mtmd.mtmd_input_text(raw, len(raw), True, True)  # add_special, parse_special (as mtmd-cli)
        array = (mtmd.mtmd_bitmap_p_ctypes * max(len(bitmaps), 1))(*bitmaps)
        try:
            status = mtmd.mtmd_tokenize(self.mctx, handle, ctypes.byref(text_input), array, len(bitmaps))
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)
        if status != 0:
            mtmd.mtmd_input_chunks_free(handle)
            raise RuntimeError(f"mtmd_tokenize failed with status {status} (1: markers and images differ in number, "
                               "2: image preprocessing failed)")
        chunks = []
        for i in range(mtmd.mtmd_input_chunks_size(handle)):
            chunk = mtmd.mtmd_input_chunks_get(handle, i)
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
            if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t()
                tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                chunks.append(Chunk("text", n_tokens, n_pos, tuple(tokens[i] for i in range(count.value))))
            else:
                image_id = mtmd.mtmd_input_chunk_get_id(chunk)
                chunks.append(Chunk("image", n_tokens, n_pos, image_id=image_id.decode() if image_id else None))
        return Tokenized(handle, chunks)

    def free(self, tokenized: Tokenized) -> None:
        if tokenized.handle:
            self._mtmd.mtmd_input_chunks_free(tokenized.handle)
            tokenized.handle = None

    # -- vision -----------------------------------------------------------------------------------------------------
    def _encode_chunk(self, tokenized: Tokenized, i: int):
        """mtmd's encoder on image chunk i; its embeddings stay in mtmd's output buffer (mtmd_get_output_embd)."""
        chunk = self._mtmd.mtmd_input_chunks_get(tokenized.handle, i)
        if self._mtmd.mtmd_encode_chunk(self.mctx, chunk) != 0:
            raise RuntimeError(f"mtmd_encode_chunk failed on chunk {i}")
        return chunk

    def encode(self, tokenized: Tokenized) -> tuple[list[np.ndarray], list[float]]:
        """Every image chunk through mtmd's encoder: embeddings (n_tokens, n_embd) and milliseconds per chunk."""
        out, times = [], []
        for i, info in enumerate(tokenized.chunks):
            if info.kind != "image":
                continue
            start = time.perf_counter()
            self._encode_chunk(tokenized, i)
            times.append((time.perf_counter() - start) * 1e3)
            pointer = self._mtmd.mtmd_get_output_embd(self.mctx)
            width = self.model.n_embd_inp  # n_embd x (1 + k) with DeepStack (qwen3vl)
            out.append(np.ctypeslib.as_array(pointer, shape=(info.n_tokens * width,))
                       .reshape(info.n_tokens, width).copy())  # (n_tokens, n_embd_inp)
        return out, times

    # -- decoding -----------------------------------------------------------------------------------------------------
    def clear(self) -> None:
        self._lib.llama_memory_clear(self.context.memory, True)
        self.cached, self.n_past = [], 0

    def _common_prefix(self, chunks: list[Chunk]) -> tuple[int, int, int]:
        """(whole chunks reused, text tokens reused of the next chunk, positions reused): llama-server's rule, text
        tokens compared one by one and images by their id, an image never cut."""
        n_chunks = n_pos = 0
        for old, new in zip(self.cached, chunks):
            if old == new:
                n_chunks, n_pos = n_chunks + 1, n_pos + new.n_pos
                continue
            if old.kind == new.kind == "text":
                same = 0
                for a, b in zip(old.token_ids, new.token_ids):
                    if a != b:
                        break
                    same += 1
                return n_chunks, same, n_pos + same
            break
        return n_chunks, 0, n_pos

    def prefill(self, tokenized: Tokenized, reuse: bool = True) -> dict:
        """Put the prompt into the sequence (reusing what it already holds, like llama-server's prompt cache when
        `reuse`), with mtmd's helpers: image chunks are encoded and decoded there. Returns what was computed."""
        lib, mtmd = self._lib, self._mtmd
        chunks = tokenized.chunks
        n_chunks, n_text, n_keep = self._common_prefix(chunks) if reuse else (0, 0, 0)
        if n_keep >= tokenized.n_pos:  # the whole prompt is cached: recompute its last token for fresh logits
            n_chunks, n_text, n_keep = self._common_prefix(chunks[:-1]) if len(chunks) > 1 else (0, 0, 0)
        if not self.context.remove(0, n_keep):
            self.clear()
            n_chunks = n_text = n_keep = 0
        n_past = n_keep
        encode_ms: list[float] = []
        decode_ms = 0.0
        for i in range(n_chunks, len(chunks)):
            last = i == len(chunks) - 1
            info = chunks[i]
            start = time.perf_counter()
            if info.kind == "text":  # only the first chunk computed can be partly cached
                n_past = self._decode_tokens(info.token_ids[n_text if i == n_chunks else 0:], n_past, last)
            else:  # what mtmd_helper_eval_chunk_single does, timed in its two steps
                try:
                    chunk = self._encode_chunk(tokenized, i)
                except RuntimeError:
                    self.clear()
                    raise
                encoded = time.perf_counter()
                encode_ms.append((encoded - start) * 1e3)
                new_n_past = lib.llama_pos(0)
                status = mtmd.mtmd_helper_decode_image_chunk(
                    self.mctx, self.context.pointer, chunk, mtmd.mtmd_get_output_embd(self.mctx), n_past, 0, self.n_batch,
                    ctypes.byref(new_n_past), mtmd.mtmd_helper_post_decode_callback(), None)
                if status != 0:
                    self.clear()
                    raise RuntimeError(f"mtmd_helper_decode_image_chunk failed with status {status} on chunk {i}")
                n_past = int(new_n_past.value)
                start = encoded
            decode_ms += (time.perf_counter() - start) * 1e3
        self.cached, self.n_past = list(chunks), n_past
        return {"reused_positions": n_keep, "encoded_tiles": len(encode_ms), "encode_ms": encode_ms,
                "decode_ms": decode_ms, "n_positions": n_past}

    def _decode_tokens(self, tokens, n_past: int, logits_last: bool) -> int:
        """Text tokens at n_past, n_past + 1, ... of sequence 0, in the context's batches of n_batch."""
        for _ in self.context.decode_chunks(0, [Segment.tokens(list(tokens), n_past)], want_logits=logits_last):
            pass
        return n_past + len(tokens)

    def generate(self, max_tokens: int, stop_token_ids: tuple[int, ...] = ()) -> tuple[list[int], list[float]]:
        """llama.cpp's sampler chain (greedy) from the logits prefill left; token ids and the time each was ready."""
        lib = self._lib
        tokens, stamps = [], []
        token_array = (lib.llama_token * 1)()
        for step in range(max_tokens):
            token = int(lib.llama_sampler_sample(self.sampler, self.context.pointer, -1))
            stamps.append(time.perf_counter())
            tokens.append(token)
            if token in stop_token_ids or step == max_tokens - 1:
                break
            token_array[0] = token
            if lib.llama_decode(self.context.pointer, lib.llama_batch_get_one(token_array, 1)) != 0:
                raise RuntimeError(f"llama_decode failed at position {self.n_past}")
            self.n_past += 1
        return tokens, stamps  # `cached` still describes the prompt: the next prefill drops what follows it

    def logits(self) -> np.ndarray:
        return self.context.logits_at(-1).copy()

    # -- lifetime -----------------------------------------------------------------------------------------------------
    def _free_llama(self) -> None:
        self.context.close()
        self.model.close()

    def close(self) -> None:
        if getattr(self, "mctx", None):
            self._lib.llama_sampler_free(self.sampler)
            self._mtmd.mtmd_free(self.mctx)
            self._free_llama()
            self.mctx = None
