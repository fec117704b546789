"""Hypothesis strategies for what users, files and clients hand edgevlm: crafted GGUF headers (decoders and mmprojs),
images, manifest edits, server request bodies and CLI options. Drawn structurally, so a failure shrinks to the one
field that breaks a reader. tests/fuzzers.py runs them; tests/conftest.py sets the example database."""
from __future__ import annotations

import base64
import io
import json
import struct
from dataclasses import replace
from typing import Any

from hypothesis import strategies as st

from gguf_craft import ARRAY, STRING, GGUFParts, KV, encode_value, serialize, u32, u64

# ---- crafted GGUF headers -------------------------------------------------------------------------------------------
# the lengths and counts that break readers: zero, off by one, past 2^31 / 2^32, and 2^60..2^64-1 (which must not
# allocate)
EDGE_U64 = [0, 1, 2, 3, 7, 8, 31, 32, 33, 255, 4096, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32,
            1 << 40, 1 << 60, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
VALUE_TYPES = list(range(14)) + [255, (1 << 31), (1 << 32) - 1]  # 0..12 known, 13+ unknown
GGML_TYPES = list(range(42)) + [255, 1 << 31, (1 << 32) - 1]  # 4, 5 and 31+ are removed or unknown
INT_RANGES = {0: (0, 255), 1: (-128, 127), 2: (0, 65535), 3: (-32768, 32767), 4: (0, (1 << 32) - 1),
              5: (-(1 << 31), (1 << 31) - 1), 7: (0, 1), 10: (0, (1 << 64) - 1), 11: (-(1 << 63), (1 << 63) - 1)}


def u64_values(near: int = 0) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(EDGE_U64), st.integers(max(0, near - 2), near + 2),
                     st.integers(0, (1 << 64) - 1))


def scalar_values() -> st.SearchStrategy[tuple[int, Any]]:
    ints = st.sampled_from(sorted(INT_RANGES)).flatmap(
        lambda k: st.tuples(st.just(k), st.integers(*INT_RANGES[k]) if k != 7 else st.booleans()))
    floats = st.tuples(st.sampled_from([6, 12]), st.floats(allow_nan=True, allow_infinity=True, width=32))
    return st.one_of(ints, floats)


def typed_values() -> st.SearchStrategy[tuple[int, Any]]:
    """(GGUF value type, value): scalars, strings (odd text, long), arrays (of scalars, strings, arrays)."""
    strings = st.tuples(st.just(STRING), st.one_of(st.text(max_size=40), st.binary(max_size=40),
                                                   st.sampled_from(["clip", "llama", "qwen2", "", "a" * 300])))
    leaf = st.one_of(scalar_values(), strings)

    def arrays(inner):
        return inner.flatmap(lambda first: st.tuples(
            st.just(ARRAY), st.tuples(st.just(first[0]), st.lists(st.just(first[1]), max_size=80))))
    return st.recursive(leaf, arrays, max_leaves=4)


def _pick(draw, items) -> int | None:
    return draw(st.integers(0, len(items) - 1)) if items else None


def _counts(draw, parts):
    which = draw(st.sampled_from(["n_kv", "n_tensors"]))
    real = len(parts.kvs) if which == "n_kv" else len(parts.tensors)
    return replace(parts, **{which: draw(u64_values(real))})


def _version(draw, parts):
    return replace(parts, version=draw(st.sampled_from([0, 1, 2, 4, 1 << 16, (1 << 32) - 1])))


def _string_length(draw, parts):
    strings = [i for i, kv in enumerate(parts.kvs) if kv.kind == STRING and len(kv.raw) >= 8]
    i = strings[_pick(draw, strings)] if strings else None
    if i is None:
        return parts
    kv = parts.kvs[i]
    return parts.with_kv(i, replace(kv, raw=u64(draw(u64_values(len(kv.raw) - 8))) + kv.raw[8:]))


def _key_length(draw, parts):
    i = _pick(draw, parts.kvs)
    return parts if i is None else parts.with_kv(i, replace(parts.kvs[i], key_length=draw(u64_values(len(parts.kvs[i].key)))))


def _array_header(draw, parts):
    arrays = [i for i, kv in enumerate(parts.kvs) if kv.kind == ARRAY and len(kv.raw) >= 12]
    if not arrays:
        return parts
    i = arrays[_pick(draw, arrays)]
    kv = parts.kvs[i]
    if draw(st.booleans()):
        (count,) = struct.unpack_from("<Q", kv.raw, 4)
        raw = kv.raw[:4] + u64(draw(u64_values(count))) + kv.raw[12:]
    else:
        raw = u32(draw(st.sampled_from(VALUE_TYPES))) + kv.raw[4:]
    return parts.with_kv(i, replace(kv, raw=raw))


def _value_type(draw, parts):
    i = _pick(draw, parts.kvs)
    return parts if i is None else parts.with_kv(i, replace(parts.kvs[i], kind=draw(st.sampled_from(VALUE_TYPES))))


def _value(draw, parts):
    """A key the readers use given a value of another type or out of range (or any key, any value)."""
    wanted = [i for i, kv in enumerate(parts.kvs) if kv.key.startswith((b"general.", b"clip.", b"tokenizer."))
              or kv.key.endswith((b"block_count", b"embedding_length", b"head_count", b"context_length"))]
    i = wanted[_pick(draw, wanted)] if wanted and draw(st.booleans()) else _pick(draw, parts.kvs)
    if i is None:
        return parts
    kind, value = draw(typed_values())
    return parts.with_kv(i, replace(parts.kvs[i], kind=kind, raw=encode_value(kind, value)))


def _alignment(draw, parts):
    kind, value = draw(st.one_of(st.tuples(st.just(4), st.sampled_from([0, 1, 3, 7, 48, 1 << 20, (1 << 32) - 1])),
                                 typed_values()))
    kv = KV(b"general.alignment", kind, encode_value(kind, value))
    i = parts.kv_index(b"general.alignment")
    return replace(parts, kvs=parts.kvs + (kv,)) if i is None else parts.with_kv(i, kv)


def _drop_or_copy_kv(draw, parts):
    i = _pick(draw, parts.kvs)
    if i is None:
        return parts
    if draw(st.booleans()):
        return replace(parts, kvs=parts.kvs[:i] + parts.kvs[i + 1:])
    return replace(parts, kvs=parts.kvs + (parts.kvs[i],))


def _tensor(draw, parts):
    i = _pick(draw, parts.tensors)
    if i is None:
        return parts
    t = parts.tensors[i]
    what = draw(st.sampled_from(["dim", "dims", "n_dims", "type", "offset", "name", "name_length", "drop", "copy"]))
    if what == "dim" and t.dims:
        j = draw(st.integers(0, len(t.dims) - 1))
        return parts.with_tensor(i, replace(t, dims=t.dims[:j] + (draw(u64_values(t.dims[j])),) + t.dims[j + 1:]))
    if what == "dims":
        return parts.with_tensor(i, replace(t, dims=tuple(draw(st.lists(u64_values(1), max_size=9)))))
    if what == "n_dims":
        return parts.with_tensor(i, replace(t, n_dims=draw(st.sampled_from([0, 1, 3, 4, 5, 9, 1 << 16, (1 << 32) - 1]))))
    if what == "type":
        return parts.with_tensor(i, replace(t, kind=draw(st.sampled_from(GGML_TYPES))))
    if what == "offset":
        others = [x.offset for x in parts.tensors]
        size = len(parts.data)
        return parts.with_tensor(i, replace(t, offset=draw(st.one_of(
            st.sampled_from(others + [t.offset + 1, t.offset + 31, size, size + 32, 1 << 40, (1 << 63), (1 << 64) - 32]),
            u64_values(t.offset)))))
    if what == "name":
        other = [x.name for x in parts.tensors]
        return parts.with_tensor(i, replace(t, name=draw(st.one_of(st.sampled_from(other + [b"", b"x" * 300, b"\xff\xfe"]),
                                                                  st.binary(max_size=70)))))
    if what == "name_length":
        return parts.with_tensor(i, replace(t, name_length=draw(u64_values(len(t.name)))))
    if what == "drop":
        return replace(parts, tensors=parts.tensors[:i] + parts.tensors[i + 1:])
    return replace(parts, tensors=parts.tensors + (t,))


def _truncate(draw, parts):
    return replace(parts, truncate=draw(st.integers(0, len(serialize(parts)))))


def _flips(draw, parts):
    flips = draw(st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), min_size=1, max_size=8))
    return replace(parts, flips=parts.flips + tuple(flips))


HEADER_CRAFTS = {"counts": _counts, "version": _version, "string length": _string_length, "key length": _key_length,
                 "array header": _array_header, "value type": _value_type, "value": _value, "alignment": _alignment,
                 "drop or copy a key": _drop_or_copy_kv, "tensor": _tensor, "truncate": _truncate,
                 "flipped bytes": _flips}


@st.composite
def crafted_ggufs(draw, template: GGUFParts, max_crafts: int = 3) -> tuple[list[str], GGUFParts]:
    """(the crafts applied, the crafted parts); no craft at all is the template itself, a valid file."""
    names = draw(st.lists(st.sampled_from(sorted(HEADER_CRAFTS)), max_size=max_crafts))
    parts = template
    for name in names:
        parts = HEADER_CRAFTS[name](draw, parts)
    return names, parts


# ---- images --------------------------------------------------------------------------------------------------------
IMAGE_FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "TGA"]
MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "F", "CMYK"]


@st.composite
def image_files(draw) -> bytes:
    """An image file of any size, mode and format, then maybe truncated, with flipped bytes or inserted noise."""
    import numpy as np
    from PIL import Image

    if draw(st.integers(0, 9)) == 0:
        width, height = draw(st.sampled_from([1, 2, 4000])), draw(st.sampled_from([1, 3, 2000]))
    else:
        width, height = draw(st.integers(1, 299)), draw(st.integers(1, 299))
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(IMAGE_FORMATS))
    pixels = np.random.default_rng(draw(st.integers(0, 1 << 16))).integers(0, 256, (height, width, 3), dtype=np.uint8)
    if mode == "I;16":  # 16-bit greys, as scanners and medical images write them
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    try:
        image.save(buffer, fmt)
    except (OSError, ValueError, KeyError):  # this format cannot hold this mode: a plain PNG instead
        image.convert("RGB").save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    damage = draw(st.sampled_from(["none", "none", "none", "truncated", "truncated", "flipped", "flipped", "noise"]))
    if damage == "truncated" and len(data) > 8:
        data = data[:draw(st.integers(1, len(data) - 1))]
    elif damage == "flipped":
        for at, mask in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=19)):
            data[at] ^= mask
    elif damage == "noise":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=200))
    return bytes(data)


# ---- manifests and request bodies: a valid JSON document with fields replaced ---------------------------------------
ODD_VALUES = [None, -1, 0, 10**12, -(10**12), "", [], {}, 3.5, True, "../x", "/etc/passwd", "a" * 300, "nan",
              float("nan"), float("inf"), "tiles", "{% bad", {"url": 1}, [1, 2]]
DELETE = object()


def leaves(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from leaves(item, path + (index,))


def mutate(data, path, new):
    import copy

    data = copy.deepcopy(data)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if new is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return data


def apply_edits(original, edits):
    data = original
    for path, value in edits:
        try:
            data = mutate(data, path, value)
        except (KeyError, IndexError, TypeError):  # an earlier edit removed this path's parent
            pass
    return data


def json_edits(original, values: st.SearchStrategy, min_size: int = 1, max_size: int = 2) -> st.SearchStrategy:
    """Lists of (path, new value or DELETE) over every path of `original`."""
    paths = [p for p in leaves(original) if p]
    return st.lists(st.tuples(st.sampled_from(paths), values), min_size=min_size, max_size=max_size)


MANIFEST_VALUES = [None, -1, 0, 10**12, "", [], {}, 3.5, True, "../x", "/etc/passwd", "a" * 300, "tiles", "{% bad"]


def manifest_values() -> st.SearchStrategy:
    return st.sampled_from(MANIFEST_VALUES + [DELETE])


def json_values(max_leaves: int = 6) -> st.SearchStrategy:
    """Any JSON value: odd scalars, numbers as strings, and small nests."""
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(),
                        st.text(max_size=20), st.sampled_from(["1", "2.5", "nan", "1e400", "-1", "0x10", "true"]),
                        st.sampled_from(ODD_VALUES))
    return st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=max_leaves)


def valid_body(image_png: bytes) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image_png).decode()
    return {"model": "m", "max_tokens": 2, "messages": [
        {"role": "system", "content": "Be short."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Colour?"}]}]}


BAD_URLS = ["data:image/png;base64,@@@", "data:image/png,abc", "data:;base64,", "http://x/y.png", "file:///nonexistent.png",
            "data:image/png;base64," + base64.b64encode(b"not an image").decode()]
TOP_LEVEL = ["temperature", "top_p", "seed", "max_tokens", "max_completion_tokens", "stream", "stream_options", "stop",
             "n", "messages", "model"]


DEEP = "\0deep:"  # a placeholder string encoded() expands: json.dumps (and Hypothesis's printer) stop near 1,000 levels


def deep(depth: int, kind: str) -> str:
    return f"{DEEP}{depth}:{kind}"


def _expand(match) -> str:
    depth, kind = int(match.group(1)), match.group(2)
    return ("[" * depth + '"x"' + "]" * depth) if kind == "list" else ('{"a": ' * depth + '"x"' + "}" * depth)


@st.composite
def request_bodies(draw, image_png: bytes):
    """An OpenAI chat request with fields replaced at every level (wrong types, numbers as strings, null, deep
    nesting, huge arrays), or not an object at all."""
    valid = valid_body(image_png)
    shape = draw(st.sampled_from(["edited"] * 6 + ["not an object", "deep", "huge array", "top-level field"]))
    if shape == "not an object":
        return draw(json_values())
    values = st.one_of(json_values(), st.sampled_from(BAD_URLS + [DELETE]))
    data = apply_edits(valid, draw(json_edits(valid, values, max_size=3)))
    if shape == "deep":
        path = draw(st.sampled_from([p for p in leaves(valid) if p]))
        data = apply_edits(data, [(path, deep(draw(st.sampled_from([10, 63, 65, 100, 1000, 5000, 100_000])),
                                               draw(st.sampled_from(["list", "dict"]))))])
    elif shape == "huge array":
        item = draw(st.sampled_from([{"type": "text", "text": "a"}, {"role": "user", "content": "a"}, 1, None, "x"]))
        path = draw(st.sampled_from([("messages",), ("messages", 1, "content"), ("stop",), ("messages", 0)]))
        data = apply_edits(data, [(path, [item] * draw(st.sampled_from([100, 5000, 50_000])))])
    elif shape == "top-level field" and isinstance(data, dict):
        data = {**data, draw(st.sampled_from(TOP_LEVEL)): draw(json_values())}
    return data


def encoded(body) -> bytes:
    """A body as a client sends it (NaN and Infinity as Python's json writes them; deep() nests expanded)."""
    import re

    return re.sub(r'"\\u0000deep:(\d+):(list|dict)"', _expand, json.dumps(body)).encode()


# ---- CLI options -----------------------------------------------------------------------------------------------------
NUMBERS = ["-1", "0", "1", "2", "3.5", "1e12", "nan", "abc", "", "99999999999999999999"]


def cli_commands(bundle, image_path) -> dict:
    return {
        "run": ([str(bundle), "--image", str(image_path), "--prompt", "Colour?", "--threads", "1", "--max-tokens", "2"],
                ["--max-tokens", "--temperature", "--top-k", "--top-p", "--repetition-penalty", "--seed", "--threads",
                 "--n-ctx", "--embed-cache-mb", "--prefix-cache-mb", "--encoder", "--decoder", "--provider"]),
        "verify": ([str(bundle), "--threads", "1"], ["--threads"]),
        "inspect": ([str(bundle)], []),
        "eval": ([str(bundle), "-n", "1", "--threads", "1"], ["-n", "--threads", "--n-ctx", "--decoder"]),
        "bench": ([str(bundle), "--repeats", "1", "--new-tokens", "2", "--prompt-tokens", "2", "--image-size", "32x32",
                   "--peers", "", "--threads", "1", "--in-process", "--decoder", "gguf:q8_0", "--encoder", "onnx:fp32"],
                  ["--repeats", "--new-tokens", "--prompt-tokens", "--image-size", "--threads", "--accuracy", "--n-ctx"]),
    }


@st.composite
def cli_argvs(draw, bundle, image_path) -> list[str]:
    commands = cli_commands(bundle, image_path)
    name = draw(st.sampled_from(sorted(commands)))
    base, options = commands[name]
    argv = [name, *base]
    for _ in range(draw(st.integers(1, 2))):
        if options and draw(st.integers(0, 99)) < 85:
            argv += [draw(st.sampled_from(options)),
                     draw(st.sampled_from(NUMBERS + ["gguf:q9", "onnx:int8", "cuda", "x" * 300]))]
        else:
            argv += ["--" + draw(st.text("abcxyz", min_size=5, max_size=5)), "1"]  # an unknown option
    return argv
