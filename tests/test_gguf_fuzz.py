"""Crafted GGUF headers (Hypothesis over a real exported decoder and mmproj: counts, key/string/array lengths, value
types, alignment, tensor dims/types/offsets, truncation, flipped bytes) through every place edgevlm reads a GGUF: the
header reader (start-up, `plan`), the planner's tensor table and plan, llama.cpp's loader (`run`, `serve`, `verify`)
and libmtmd's (mmproj: `verify`, the bench peer). Each ends in success or a one-line BundleError naming the file;
never a traceback, an abort inside llama.cpp, or an allocation the size of a crafted length."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from dataclasses import replace

import pytest

import fuzzers
import gguf_craft


@pytest.fixture(scope="module")
def mmproj_bundle(ckpts, tmp_path_factory):
    """LLaVA-SigLIP (a tower llama.cpp's mmproj computes like transformers) with an mmproj and a q8_0 decoder, and
    its copy prepared for crafted files (fuzzers.gguf_fuzz_bundle)."""
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    root = tmp_path_factory.mktemp("gguf-fuzz")
    bundle = export_checkpoint(ckpts["llava-siglip"], root / "bundle",
                               [ArtifactRequest("onnx", "fp32"), ArtifactRequest("mmproj", "f16")],
                               [ArtifactRequest("gguf", "q8_0")], max_tiles=4)
    return bundle, fuzzers.gguf_fuzz_bundle(bundle, root)


def _report(tally) -> str:
    return f"{tally.as_dict()}\n" + "\n".join(tally.tracebacks[:5])


def test_the_template_round_trips_and_passes_every_reader(mmproj_bundle):
    bundle, work = mmproj_bundle
    for relative in ("decoder/q8_0.gguf", "encoder/mmproj-f16.gguf"):
        data = (bundle / relative).read_bytes()
        assert gguf_craft.serialize(gguf_craft.parse(data)) == data
    shutil.copy(bundle / "decoder/q8_0.gguf", work / "decoder/crafted.gguf")
    shutil.copy(bundle / "encoder/mmproj-f16.gguf", work / "encoder/crafted-mmproj.gguf")
    for kind, relative in (("decoder", "decoder/crafted.gguf"), ("mmproj", "encoder/crafted-mmproj.gguf")):
        for name, read in fuzzers.gguf_readers(work, kind).items():
            read(work / relative)  # an unchanged file is valid for every reader


def test_crafted_decoder_headers(mmproj_bundle):
    bundle, work = mmproj_bundle
    tally = fuzzers.fuzz_ggufs(work, bundle / "decoder/q8_0.gguf", "decoder", 150, seed=5)
    assert tally.counts["traceback"] == 0, _report(tally)
    assert tally.counts["ok"] > 40 and tally.counts["clean error"] > 200, tally.as_dict()  # 4 readers per case


def test_crafted_mmproj_headers(mmproj_bundle):
    bundle, work = mmproj_bundle
    tally = fuzzers.fuzz_ggufs(work, bundle / "encoder/mmproj-f16.gguf", "mmproj", 100, seed=6)
    assert tally.counts["traceback"] == 0, _report(tally)
    assert tally.counts["ok"] > 20 and tally.counts["clean error"] > 60, tally.as_dict()


def _aligned_to_one(parts):
    """general.alignment 1 with a header whose length is not a multiple of 32: the tensor data sits unaligned."""
    kv = gguf_craft.KV(b"general.alignment", 4, gguf_craft.u32(1))
    padded = replace(parts, kvs=parts.kvs + (kv,))
    for extra in range(1, 40):  # a key name long enough to move the data off a 32-byte boundary
        crafted = replace(padded, kvs=padded.kvs + (gguf_craft.KV(b"x" * extra, 0, b"\0"),))
        if len(gguf_craft.serialize(crafted)) % 32:
            return crafted
    raise AssertionError("no unaligned layout found")


def _duplicate_token(parts):
    """Two vocabulary entries made equal (what one flipped byte did)."""
    i = parts.kv_index(b"tokenizer.ggml.tokens")
    element, count = struct.unpack_from("<IQ", parts.kvs[i].raw)
    tokens, at = [], 12
    for _ in range(count):
        (length,) = struct.unpack_from("<Q", parts.kvs[i].raw, at)
        tokens.append(parts.kvs[i].raw[at + 8:at + 8 + length])
        at += 8 + length
    tokens[-1] = tokens[-2]
    return parts.with_kv(i, replace(parts.kvs[i], raw=gguf_craft.encode_value(9, (8, tokens))))


def _fifty_million_layers(parts):
    """What a flipped byte in llama.block_count did (benchmarks/fuzz.py, 10,000 cases)."""
    i = parts.kv_index(b"llama.block_count")
    return parts.with_kv(i, replace(parts.kvs[i], raw=gguf_craft.u32(0x03000002)))


@pytest.mark.parametrize("craft,needle", [(_aligned_to_one, "not aligned to 32 bytes"),
                                          (_duplicate_token, "lists the token"),
                                          (_fifty_million_layers, "llama.block_count is 50,331,650")])
def test_what_llama_cpp_would_abort_on_is_a_one_line_error(craft, needle, mmproj_bundle, tmp_path, images):
    """Found by the decoder fuzzer: llama.cpp asserts (GGML_ASSERT, the process aborts with a C stack dump) on
    tensor data not 32-byte aligned, on a vocabulary with a repeated token and on a layer count past 512. `edgevlm run` on such a GGUF (its
    hash recomputed, as another tool would write it) now exits 2 with one line. In a child process: before the fix
    the abort took the interpreter with it."""
    from edgevlm.manifest import sha256_file

    bundle, _ = mmproj_bundle
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    path = copy / "decoder/q8_0.gguf"
    path.write_bytes(gguf_craft.serialize(craft(gguf_craft.parse(path.read_bytes()))))
    manifest = json.loads((copy / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        for entry in artifact["files"]:
            if entry["path"] == "decoder/q8_0.gguf":
                entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))
    images["small"].save(tmp_path / "i.png")
    done = subprocess.run([sys.executable, "-m", "edgevlm", "run", str(copy), "--image", str(tmp_path / "i.png"),
                           "--prompt", "hi", "--encoder", "onnx:fp32", "--decoder", "gguf:q8_0", "--threads", "1",
                           "--max-tokens", "2"], capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and needle in err and str(path.name) in err, (done.returncode, err[-2000:])
    assert len(err.splitlines()) == 1, err[-2000:]


def _gelu_as_array(parts):
    i = parts.kv_index(b"clip.use_gelu")
    return parts.with_kv(i, replace(parts.kvs[i], kind=9, raw=gguf_craft.encode_value(9, (7, [True, True]))))


def _projector_tensor_gone(parts):
    return replace(parts, tensors=tuple(t for t in parts.tensors if t.name != b"mm.2.weight"))


def _patch_size_as_u64(parts):
    i = parts.kv_index(b"clip.vision.patch_size")
    return parts.with_kv(i, replace(parts.kvs[i], kind=10, raw=gguf_craft.encode_value(10, 8)))


@pytest.mark.parametrize("craft,needle", [(_gelu_as_array, "key clip.use_gelu has value type"),
                                          (_patch_size_as_u64, "key clip.vision.patch_size has value type"),
                                          (_projector_tensor_gone, "tensor mm.2.weight is missing")])
def test_what_libmtmd_would_abort_on_is_a_one_line_error(craft, needle, mmproj_bundle, tmp_path):
    """Found by the mmproj fuzzer: clip.cpp's getters assert a key's type (an array where it reads a scalar, a u64
    where it reads a u32) and its graph uses a projector tensor it never checked was loaded; each aborted the process
    (verify's mmproj row, the bench peer). Now a one-line BundleError; in a child process for the same reason."""
    bundle, _ = mmproj_bundle
    path = tmp_path / "crafted-mmproj.gguf"
    path.write_bytes(gguf_craft.serialize(craft(gguf_craft.parse((bundle / "encoder/mmproj-f16.gguf").read_bytes()))))
    code = ("import sys\nfrom edgevlm.bench.peers.mtmd import MtmdPipeline\nfrom edgevlm.errors import BundleError\n"
            "try:\n    MtmdPipeline(sys.argv[1], sys.argv[2], n_ctx=256, threads=1)\n"
            "except BundleError as exc:\n    print(exc)\n    sys.exit(2)\n")
    done = subprocess.run([sys.executable, "-c", code, str(bundle / "decoder/q8_0.gguf"), str(path)],
                          capture_output=True, text=True, timeout=300)
    out = done.stdout.strip()
    assert done.returncode == 2 and needle in out and path.name in out, (done.returncode, out, done.stderr[-2000:])
    assert len(out.splitlines()) == 1, out
