"""A GGUF file taken apart into its header fields and written back with any of them overridden: the counts, a key's
or a string's length, an array's length or element type, a value's type, a tensor's dims, type and offset, the
version, a truncation. tests/strategies.py draws the overrides; the parts come from a real exported GGUF, so an
unchanged file is a valid one. Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (version 3)."""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace

MAGIC = b"GGUF"
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class KV:
    key: bytes
    kind: int  # the value type written (may be one no reader knows)
    raw: bytes  # the value's bytes after its type, as written
    key_length: int | None = None  # written instead of len(key)


@dataclass(frozen=True)
class Tensor:
    name: bytes
    dims: tuple[int, ...]  # GGUF order (ne[0] first)
    kind: int  # ggml type id
    offset: int  # from the start of the data section
    n_dims: int | None = None  # written instead of len(dims)
    name_length: int | None = None


@dataclass(frozen=True)
class GGUFParts:
    version: int
    kvs: tuple[KV, ...]
    tensors: tuple[Tensor, ...]
    data: bytes  # the tensor data section
    n_kv: int | None = None  # claimed counts (None: the real ones)
    n_tensors: int | None = None
    truncate: int | None = None  # keep only this many bytes of the file
    flips: tuple[tuple[int, int], ...] = ()  # (byte position modulo the file's length, xor mask)

    def __repr__(self) -> str:  # Hypothesis prints the strategy's arguments: not the whole file
        return f"GGUFParts(version {self.version}, {len(self.kvs)} keys, {len(self.tensors)} tensors, ...)"

    def kv_index(self, key: bytes) -> int | None:
        return next((i for i, kv in enumerate(self.kvs) if kv.key == key), None)

    def with_kv(self, i: int, kv: KV) -> "GGUFParts":
        return replace(self, kvs=self.kvs[:i] + (kv,) + self.kvs[i + 1:])

    def with_tensor(self, i: int, tensor: Tensor) -> "GGUFParts":
        return replace(self, tensors=self.tensors[:i] + (tensor,) + self.tensors[i + 1:])


def u64(value: int) -> bytes:
    return struct.pack("<Q", value % (1 << 64))


def u32(value: int) -> bytes:
    return struct.pack("<I", value % (1 << 32))


def encode_value(kind: int, value) -> bytes:
    """A value of a known type as GGUF writes it; arrays as (element type, [values])."""
    if kind in SCALARS:
        return struct.pack(SCALARS[kind], value)
    if kind == STRING:
        data = value.encode() if isinstance(value, str) else bytes(value)
        return u64(len(data)) + data
    element, items = value
    return u32(element) + u64(len(items)) + b"".join(encode_value(element, item) for item in items)


def _value_length(data: bytes, at: int, kind: int) -> int:
    if kind in SCALARS:
        return struct.calcsize(SCALARS[kind])
    if kind == STRING:
        return 8 + struct.unpack_from("<Q", data, at)[0]
    element, count = struct.unpack_from("<IQ", data, at)
    end = at + 12
    for _ in range(count):
        end += _value_length(data, end, element)
    return end - at


def parse(data: bytes) -> GGUFParts:
    """A well-formed GGUF (an exported one) into its parts."""
    if data[:4] != MAGIC:
        raise ValueError("not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    at, kvs = 24, []
    for _ in range(n_kv):
        (length,) = struct.unpack_from("<Q", data, at)
        key = data[at + 8:at + 8 + length]
        at += 8 + length
        (kind,) = struct.unpack_from("<I", data, at)
        size = _value_length(data, at + 4, kind)
        kvs.append(KV(key, kind, data[at + 4:at + 4 + size]))
        at += 4 + size
    tensors = []
    for _ in range(n_tensors):
        (length,) = struct.unpack_from("<Q", data, at)
        name = data[at + 8:at + 8 + length]
        at += 8 + length
        (n_dims,) = struct.unpack_from("<I", data, at)
        dims = struct.unpack_from(f"<{n_dims}Q", data, at + 4)
        at += 4 + 8 * n_dims
        kind, offset = struct.unpack_from("<IQ", data, at)
        at += 12
        tensors.append(Tensor(name, tuple(dims), kind, offset))
    parts = GGUFParts(version, tuple(kvs), tuple(tensors), b"")
    start = _aligned(at, alignment(parts))
    return replace(parts, data=data[start:])


def alignment(parts: GGUFParts) -> int:
    """general.alignment when it is a sane u32, else the default (where the writer puts the data section)."""
    i = parts.kv_index(b"general.alignment")
    if i is None or parts.kvs[i].kind != 4 or len(parts.kvs[i].raw) != 4:
        return DEFAULT_ALIGNMENT
    (value,) = struct.unpack("<I", parts.kvs[i].raw)
    return value if 0 < value <= 1 << 16 else DEFAULT_ALIGNMENT


def _aligned(at: int, align: int) -> int:
    return at + (-at % align)


def serialize(parts: GGUFParts) -> bytes:
    out = bytearray(MAGIC + u32(parts.version))
    out += u64(len(parts.tensors) if parts.n_tensors is None else parts.n_tensors)
    out += u64(len(parts.kvs) if parts.n_kv is None else parts.n_kv)
    for kv in parts.kvs:
        out += u64(len(kv.key) if kv.key_length is None else kv.key_length) + kv.key + u32(kv.kind) + kv.raw
    for t in parts.tensors:
        out += u64(len(t.name) if t.name_length is None else t.name_length) + t.name
        out += u32(len(t.dims) if t.n_dims is None else t.n_dims) + b"".join(u64(d) for d in t.dims)
        out += u32(t.kind) + u64(t.offset)
    out += b"\0" * (_aligned(len(out), alignment(parts)) - len(out))
    out += parts.data
    if parts.truncate is not None:
        del out[parts.truncate:]
    for position, mask in parts.flips:
        if out:
            out[position % len(out)] ^= mask
    return bytes(out)
