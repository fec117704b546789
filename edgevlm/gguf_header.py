"""A GGUF file's header read once per process: its scalar metadata and its tensor table, without materialising the
vocabulary. gguf-py's GGUFReader builds a numpy view per field part (1.4 M calls for a 151,936-token vocabulary:
23 s of a 30 s `edgevlm run` start-up); the planner needs a few scalars and the tensor sizes, so large arrays are
skipped by their lengths here. Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (version 2 and 3)."""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import BundleError

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
# value type -> struct format of one scalar (STRING and ARRAY are read by length)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
KEPT_ARRAY_LENGTH = 64  # arrays up to this length are kept (e.g. rope sections); longer ones only counted
MAX_DIMS = 8  # GGML_MAX_DIMS is 4; a crafted header beyond this is refused
MAX_STRING = 1 << 24


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # outermost first (as in PyTorch), reversed from GGUF's ne[]
    type_name: str  # ggml type, e.g. "Q8_0"
    n_bytes: int  # exact stored bytes
    offset: int  # from the start of the tensor data


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict = field(repr=False)  # key -> scalar, short list, or ("array", element type, length) for long arrays
    tensors: tuple[GGUFTensorInfo, ...] = field(repr=False)

    @property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def bytes_per_token(self) -> int:
        """Bytes one decode step reads: every tensor but the embedding table, which is read in full only when it
        doubles as the output matrix (tied embeddings)."""
        tied = all(t.name != "output.weight" for t in self.tensors)
        return sum(t.n_bytes for t in self.tensors if tied or t.name != "token_embd.weight")

    def block_params(self) -> int:
        """The transformer blocks' parameters (the prefill FLOPs)."""
        return sum(math.prod(t.shape) for t in self.tensors if t.name.startswith("blk."))


class _Cursor:
    def __init__(self, data, where: str):
        self.data, self.at, self.where = data, 0, where

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise BundleError(f"{self.where} is truncated inside its GGUF header (at byte {self.at}); re-export it")
        value = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > MAX_STRING or self.at + length > len(self.data):
            raise BundleError(f"{self.where}: a GGUF string of {length} bytes at byte {self.at} runs past the file; "
                              "the file is damaged, re-export it")
        raw = bytes(self.data[self.at:self.at + length])
        self.at += length
        return raw.decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        data, at, end = self.data, self.at, len(self.data)
        for _ in range(count):  # one length read per string: no str objects for a whole vocabulary
            if at + 8 > end:
                raise BundleError(f"{self.where} is truncated inside a GGUF string array; re-export it")
            at += 8 + struct.unpack_from("<Q", data, at)[0]
        if at > end:
            raise BundleError(f"{self.where}: a GGUF string array runs past the file; re-export it")
        self.at = at

    def value(self, kind: int, depth: int = 0):
        if kind in SCALARS:
            return self.unpack(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY or depth > 2:
            raise BundleError(f"{self.where}: unknown GGUF value type {kind} at byte {self.at}; the file is damaged "
                              "or newer than this edgevlm")
        element, count = self.unpack("<I"), self.unpack("<Q")
        if count <= KEPT_ARRAY_LENGTH:
            return [self.value(element, depth + 1) for _ in range(count)]
        if element in SCALARS:
            size = struct.calcsize(SCALARS[element]) * count
            if self.at + size > len(self.data):
                raise BundleError(f"{self.where}: a GGUF array of {count:,} values runs past the file; re-export it")
            self.at += size
        elif element == STRING:
            self.skip_strings(count)
        else:
            for _ in range(count):
                self.value(element, depth + 1)
        return ("array", element, count)


def _type_sizes() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size, bytes per block), from gguf-py's table (llama.cpp's own)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}


def _parse(path: Path) -> GGUFHeader:
    where = str(path)
    with open(path, "rb") as handle:
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)  # only the header's pages are read
        except ValueError:  # an empty file
            raise BundleError(f"{where} is empty, not a GGUF file; re-export it") from None
    view = memoryview(data)
    try:
        cursor = _Cursor(view, where)
        if bytes(data[:4]) != MAGIC:
            raise BundleError(f"{where} is not a GGUF file (magic {bytes(data[:4])!r}); re-export it")
        cursor.at = 4
        version = cursor.unpack("<I")
        if version not in (2, 3):
            raise BundleError(f"{where} is GGUF version {version}; edgevlm reads versions 2 and 3")
        n_tensors, n_kv = cursor.unpack("<Q"), cursor.unpack("<Q")
        if n_tensors > len(data) // 24 or n_kv > len(data) // 12:  # each entry takes at least that many bytes
            raise BundleError(f"{where}: its header claims {n_tensors:,} tensors and {n_kv:,} metadata entries, more "
                              "than the file can hold; the file is damaged, re-export it")
        metadata = {}
        for _ in range(n_kv):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.unpack("<I"))
        sizes = _type_sizes()
        tensors = []
        for _ in range(n_tensors):
            name = cursor.string()
            n_dims = cursor.unpack("<I")
            if n_dims > MAX_DIMS:
                raise BundleError(f"{where}: tensor {name!r} claims {n_dims} dimensions; the file is damaged")
            dims = [cursor.unpack("<Q") for _ in range(n_dims)]
            kind, offset = cursor.unpack("<I"), cursor.unpack("<Q")
            if kind not in sizes:
                raise BundleError(f"{where}: tensor {name!r} has unknown ggml type {kind}; the file is damaged or "
                                  "newer than this edgevlm")
            type_name, block, block_bytes = sizes[kind]
            elements = math.prod(dims)
            tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), type_name, elements // block * block_bytes,
                                          offset))
        return GGUFHeader(version, metadata, tuple(tensors))
    finally:
        cursor = None  # the last reference to a slice of the view goes before the map is closed
        view.release()
        data.close()


@lru_cache(maxsize=16)
def _cached(path: str, size: int, mtime_ns: int, inode: int) -> GGUFHeader:
    return _parse(Path(path))


def read_header(path: str | Path) -> GGUFHeader:
    """The GGUF's header, parsed once per process for as long as the file is unchanged (size, mtime, inode)."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise BundleError(f"cannot read {path} ({exc.strerror}); re-export it") from None
    return _cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
