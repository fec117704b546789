"""llama.cpp's `llama_model`: a GGUF's weights, loaded once; every context (and so every sequence) decodes on them.
The weights are freed when the last context on them is gone (each context holds a reference to its model)."""
from __future__ import annotations

from pathlib import Path

from ...backends import require_llama_cpp, silence_llama_logs
from ...errors import BundleError
from ...gguf_header import check_before_loading

IMROPE = 40  # llama.h LLAMA_ROPE_TYPE_IMROPE = GGML_ROPE_TYPE_IMROPE (interleaved M-RoPE), not bound in Python


def _n_embd_inp(llama_cpp, pointer, n_embd: int) -> int:
    """llama_model_n_embd_inp from the library itself (exported by the vendored llama.cpp; n_embd where absent)."""
    import ctypes

    function = getattr(llama_cpp.llama_cpp._lib, "llama_model_n_embd_inp", None)
    if function is None:
        return n_embd
    function.argtypes, function.restype = [ctypes.c_void_p], ctypes.c_int32
    return int(function(pointer))


class FreedWhenCollected:
    """close() frees native llama.cpp memory; an object dropped without it is freed when collected."""

    def close(self) -> None:
        raise NotImplementedError

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass


class LlamaModel(FreedWhenCollected):
    def __init__(self, gguf_path: str | Path, artifact_id: str | None = None):
        llama_cpp = require_llama_cpp()
        self.lib = llama_cpp
        silence_llama_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        self.path = Path(gguf_path)
        header = check_before_loading(self.path)  # what llama.cpp would abort on (not return from): one line
        self.pointer = llama_cpp.llama_model_load_from_file(str(self.path).encode(),
                                                            llama_cpp.llama_model_default_params())
        if not self.pointer:
            raise BundleError(f"llama.cpp could not load {self.path}: the GGUF is corrupt or not a llama model; "
                              "re-export it")
        self.artifact_id = artifact_id or f"gguf:{self.path.name}"
        self.vocab = llama_cpp.llama_model_get_vocab(self.pointer)
        self.vocab_size = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.pointer))
        # an embedding row's width: n_embd x (1 + k) for a DeepStack decoder (arch qwen3vl: the main embedding, then
        # the slice added after each of its first k layers); llama-cpp-python 0.3.36 does not bind the call
        self.n_embd_inp = _n_embd_inp(llama_cpp, self.pointer, self.n_embd)
        self.model_bytes = int(llama_cpp.llama_model_size(self.pointer))
        # M-RoPE (Qwen2-VL; interleaved: Qwen3-VL): image rows take (t, row, col) positions, four per row in an
        # embedding batch
        self.mrope = llama_cpp.llama_model_rope_type(self.pointer) in (llama_cpp.LLAMA_ROPE_TYPE_MROPE, IMROPE)
        # local (sliding-window) attention layers keep only this many past positions in llama.cpp's SWA cache (0: none)
        self.n_swa = int(llama_cpp.llama_model_n_swa(self.pointer))
        self.contexts_opened = 0  # counted by LlamaContext (tests: `serve --parallel N` opens one)
        # image rows go in divided by sqrt(n_embd) where the arch's graph scales every input row by it (gemma2)
        from ...decoder_arch import ARCHITECTURES

        arch = header.metadata.get("general.architecture")
        scaled = any(row.llama_scales_input_rows and row.gguf_arch.lower() == arch for row in ARCHITECTURES.values())
        self.input_row_scale = self.n_embd ** -0.5 if scaled else 1.0
        # the KV's shape per position (the flash-attention choice is cached per shape: flash_choice.entry_key)
        self.n_head_kv = int(llama_cpp.llama_model_n_head_kv(self.pointer))
        key_length = header.metadata.get(f"{arch}.attention.key_length")
        n_head = max(int(llama_cpp.llama_model_n_head(self.pointer)), 1)
        self.head_dim = int(key_length) if isinstance(key_length, int) else self.n_embd // n_head
        self._token_rows = None
        self._header = header

    def token_rows(self, ids) -> "np.ndarray":
        """(n,) token ids -> (n, n_embd) float32 embedding rows as the GGUF stores them (a prefix-LM prompt's text)."""
        if self._token_rows is None:
            from .token_rows import TokenRows

            self._token_rows = TokenRows(self.path, self._header)
        return self._token_rows(ids)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's own tokenizer (for checking that the GGUF vocabulary matches the HF one)."""
        raw = text.encode("utf-8")
        capacity = len(raw) + 16
        buffer = (self.lib.llama_token * capacity)()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buffer, capacity, add_special, parse_special)
        if n < 0:
            raise RuntimeError("llama_tokenize buffer too small")
        return list(buffer[:n])

    def close(self) -> None:
        """Free the weights; only once no context uses them (a context holds its model, so __del__ comes after)."""
        if getattr(self, "pointer", None):
            self.lib.llama_model_free(self.pointer)
            self.pointer = None
