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
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
TENSOR_ALIGNMENT = 32  # ggml asserts (aborts the process) when a mapped tensor buffer is not aligned to this
U32 = 4
VOCABULARY = "tokenizer.ggml.tokens"
LLAMA_MAX_LAYERS = 512  # llama.cpp src/llama-hparams.h; load_hparams asserts n_layer within it


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
    path: str = ""
    file_size: int = 0
    data_offset: int = 0  # where the tensor data starts: the header's end padded to the alignment
    alignment: int = DEFAULT_ALIGNMENT
    alignment_type: int | None = None  # general.alignment's value type (None: the key is absent)
    duplicate_token: str | None = None  # the first token the vocabulary lists twice
    types: dict = field(default_factory=dict, repr=False)  # key -> (value type, array element type or None)

    @property
    def weight_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    def bytes_per_token(self) -> int:
        """Bytes one decode step reads: every tensor but the embedding table, which is read in full only when it
        doubles as the output matrix (tied embeddings)."""
        tied = all(t.name != "output.weight" for t in self.tensors)
        return sum(t.n_bytes for t in self.tensors if tied or t.name != "token_embd.weight")

    def check_for_llama_cpp(self) -> None:
        """What llama.cpp's loader would abort the process on (a GGML_ASSERT, not an error it returns), refused as
        one line: an alignment that is not a u32 power of two, a tensor not 32-byte aligned in the file (found by
        tests/test_gguf_fuzz.py: general.alignment 1), tensor data past the file's end, a vocabulary that lists a
        token twice (found by the same: one flipped byte), a layer count past LLAMA_MAX_LAYERS (benchmarks/fuzz.py)."""
        arch = self.metadata.get("general.architecture")
        layers = self.metadata.get(f"{arch}.block_count") if isinstance(arch, str) else None
        if isinstance(layers, int) and not 0 < layers <= LLAMA_MAX_LAYERS:
            raise BundleError(f"{self.path}: {arch}.block_count is {layers:,}; llama.cpp takes 1..{LLAMA_MAX_LAYERS} "
                              "layers; the file is damaged, re-export it")
        if self.duplicate_token is not None:
            raise BundleError(f"{self.path}: its vocabulary (tokenizer.ggml.tokens) lists the token "
                              f"{self.duplicate_token[:40]!r} twice; the file is damaged, re-export it")
        if self.alignment_type is not None and (self.alignment_type != U32 or not isinstance(self.alignment, int)
                                                or self.alignment <= 0 or self.alignment & (self.alignment - 1)):
            raise BundleError(f"{self.path}: general.alignment is {self.alignment!r} (value type "
                              f"{self.alignment_type}); GGUF needs a u32 power of two; the file is damaged, re-export it")
        for t in self.tensors:
            start = self.data_offset + t.offset
            if t.offset % self.alignment or start % TENSOR_ALIGNMENT:
                raise BundleError(f"{self.path}: tensor {t.name!r} starts at byte {start:,}, not aligned to "
                                  f"{max(self.alignment, TENSOR_ALIGNMENT)} bytes; the file is damaged, re-export it")
            if start + t.n_bytes > self.file_size:
                raise BundleError(f"{self.path}: tensor {t.name!r} ({t.n_bytes:,} bytes at byte {start:,}) runs past "
                                  f"the end of the file ({self.file_size:,} bytes); the file is damaged, re-export it")

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

    def first_duplicate(self, count: int) -> str | None:
        """Skip a string array, returning the first string that repeats (llama.cpp aborts on a vocabulary with a
        repeated token); one bytes object per string, no decoding."""
        data, at, end, seen, duplicate = self.data, self.at, len(self.data), set(), None
        for _ in range(count):
            if at + 8 > end:
                raise BundleError(f"{self.where} is truncated inside a GGUF string array; re-export it")
            length = struct.unpack_from("<Q", data, at)[0]
            if at + 8 + length > end:
                raise BundleError(f"{self.where}: a GGUF string array runs past the file; re-export it")
            token = bytes(data[at + 8:at + 8 + length])
            if duplicate is None and token in seen:
                duplicate = token.decode("utf-8", errors="replace")
            seen.add(token)
            at += 8 + length
        self.at = at
        return duplicate

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
    try:
        handle = open(path, "rb")
    except OSError as exc:  # a folder, or no permission
        raise BundleError(f"cannot read {where} ({exc.strerror}); re-export it") from None
    with handle:
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
            raise BundleError(f"{where} is GGUF version {version}; edgevlm reads versions 2 and 3 (a corrupt file, or "
                              "one newer than this edgevlm); re-export it")
        n_tensors, n_kv = cursor.unpack("<Q"), cursor.unpack("<Q")
        if n_tensors > len(data) // 24 or n_kv > len(data) // 12:  # each entry takes at least that many bytes
            raise BundleError(f"{where}: its header claims {n_tensors:,} tensors and {n_kv:,} metadata entries, more "
                              "than the file can hold; the file is damaged, re-export it")
        metadata, types, alignment_type, duplicate = {}, {}, None, None
        for _ in range(n_kv):
            key = cursor.string()
            kind = cursor.unpack("<I")
            if key == VOCABULARY and kind == ARRAY and cursor.unpack("<I") == STRING:
                count = cursor.unpack("<Q")
                duplicate = cursor.first_duplicate(count)
                metadata[key], types[key] = ("array", STRING, count), (ARRAY, STRING)
                continue
            if key == VOCABULARY and kind == ARRAY:
                cursor.at -= 4  # not strings: read as any array
            types[key] = (kind, cursor.unpack("<I") if kind == ARRAY else None)
            cursor.at -= 4 if kind == ARRAY else 0
            metadata[key] = cursor.value(kind)
            alignment_type = kind if key == "general.alignment" else alignment_type
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
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        step = alignment if alignment_type == U32 and isinstance(alignment, int) and alignment > 0 else DEFAULT_ALIGNMENT
        return GGUFHeader(version, metadata, tuple(tensors), where, len(data), cursor.at + (-cursor.at % step),
                          alignment, alignment_type, duplicate, types)
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


def check_before_loading(path: str | Path) -> GGUFHeader:
    """The header, read and checked for what would make llama.cpp abort the process instead of returning an error:
    run before every llama.cpp or libmtmd load of a GGUF (decoders and mmprojs)."""
    header = read_header(path)
    header.check_for_llama_cpp()
    return header
