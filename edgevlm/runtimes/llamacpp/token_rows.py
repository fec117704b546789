"""Token embedding rows read from a GGUF's `token_embd.weight` (dequantized by gguf-py, only the rows asked for): a
prefix-LM prompt goes into llama.cpp as one micro-batch with causal attention off, and a llama.cpp batch holds token
ids or embedding rows, never both, so the prompt's text enters as its embedding rows beside the image rows."""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from ...errors import BundleError
from ...gguf_header import GGUFHeader

TOKEN_EMBD = "token_embd.weight"


class TokenRows:
    def __init__(self, path: str | Path, header: GGUFHeader):
        import gguf

        info = next((t for t in header.tensors if t.name == TOKEN_EMBD), None)
        if info is None or len(info.shape) != 2:
            raise BundleError(f"{path} has no 2-D {TOKEN_EMBD}; re-export the bundle")
        self._gguf = gguf
        self.qtype = gguf.GGMLQuantizationType[info.type_name]
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        self.n_vocab, self.n_embd = info.shape  # outermost first: (vocab, n_embd)
        self.row_bytes = self.n_embd // block * type_size
        self.start = header.data_offset + info.offset
        with open(path, "rb") as file:  # the mapping outlives the file object; pages are read on demand
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """(n,) token ids -> (n, n_embd) float32 rows as stored (llama.cpp's graph applies any input scaling)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            raise BundleError(f"token id {int(ids.max())} is outside the GGUF's vocabulary of {self.n_vocab}")
        raw = np.stack([np.frombuffer(self._map, np.uint8, self.row_bytes, self.start + int(i) * self.row_bytes)
                        for i in ids]) if ids.size else np.zeros((0, self.row_bytes), np.uint8)
        rows = self._gguf.quants.dequantize(raw, self.qtype)
        return np.ascontiguousarray(rows.reshape(len(ids), self.n_embd), dtype=np.float32)
