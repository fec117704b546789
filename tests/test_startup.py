"""Start-up proportional to nothing: artifact hashes checked once and remembered by a stamp, the GGUF header read
without gguf-py's per-field views, the fit check from the manifest before the load, and its four verdicts."""
from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from edgevlm import hash_stamps
from edgevlm.cli import main as cli_main


@pytest.fixture()
def own_bundle(bundles, tmp_path, monkeypatch):
    """A private copy of a bundle (new inodes: no stamps yet) and a private stamp folder."""
    monkeypatch.setenv("EDGEVLM_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "bundle"
    shutil.copytree(bundles["idefics3"], copy)
    return copy


def _count_hashes(monkeypatch) -> list:
    calls = []
    real = hash_stamps.sha256_file

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(hash_stamps, "sha256_file", counting)
    return calls


def _run(bundle, tmp_path, *extra) -> int:
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), "red").save(image)
    return cli_main(["run", str(bundle), "--image", str(image), "--prompt", "What is it?", "--max-tokens", "2",
                     "--encoder", "onnx:int8", "--decoder", "gguf:q8_0", "--threads", "1", *extra])


def test_a_second_load_hashes_nothing_and_a_changed_artifact_is_still_caught(own_bundle, tmp_path, monkeypatch):
    calls = _count_hashes(monkeypatch)
    assert _run(own_bundle, tmp_path) == 0
    first = sorted(calls)
    assert "q8_0.gguf" in first and "int8.onnx" in first  # no stamp yet: every file in use is hashed once
    assert len(first) == len(set(first))
    calls.clear()
    assert _run(own_bundle, tmp_path) == 0
    assert calls == []  # the second load reads no artifact to hash it
    assert _run(own_bundle, tmp_path, "--verify-hashes") == 0
    assert sorted(calls) == first  # --verify-hashes hashes them all again
    hash_stamps.always_rehash(False)
    # same size, one byte changed, new mtime: the stamp no longer matches and the hash catches it
    gguf = own_bundle / "decoder" / "q8_0.gguf"
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))
    assert _run(own_bundle, tmp_path) == 2  # a BundleError: one line, exit 2


def test_an_export_stamps_its_files(ckpts, tmp_path, monkeypatch):
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    monkeypatch.setenv("EDGEVLM_CACHE_DIR", str(tmp_path / "cache"))
    out = export_checkpoint(ckpts["llava-clip"], tmp_path / "b", [ArtifactRequest("onnx", "fp32")],
                            [ArtifactRequest("gguf", "q8_0")])
    calls = _count_hashes(monkeypatch)
    assert _run(out, tmp_path, "--encoder", "onnx:fp32") == 0
    assert calls == []  # hashed once at export; the first load trusts that stamp


def test_gguf_header_agrees_with_gguf_py(bundles):
    import gguf

    from edgevlm.gguf_header import read_header

    path = bundles["idefics3"] / "decoder" / "q8_0.gguf"
    header = read_header(path)
    reader = gguf.GGUFReader(str(path))
    assert [(t.name, t.shape, t.type_name, t.n_bytes) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in reversed(list(t.shape))), t.tensor_type.name, int(t.n_bytes))
        for t in reader.tensors]
    assert header.metadata["general.architecture"] == reader.fields["general.architecture"].contents()
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert header.metadata["tokenizer.ggml.tokens"] == ("array", 8, len(tokens.data))  # counted, not materialised
    assert header.metadata["llama.block_count"] == reader.fields["llama.block_count"].contents()
    assert read_header(path) is header  # parsed once per process while the file is unchanged


@pytest.mark.parametrize("damage", ["truncated", "tensor count", "string length", "magic"])
def test_a_damaged_gguf_header_is_one_line(bundles, tmp_path, damage):
    import struct

    from edgevlm.errors import BundleError
    from edgevlm.gguf_header import read_header

    data = bytearray((bundles["idefics3"] / "decoder" / "q8_0.gguf").read_bytes()[: 1 << 20])
    if damage == "truncated":
        data = data[:4096]
    elif damage == "tensor count":
        data[8:16] = struct.pack("<Q", 1 << 60)
    elif damage == "string length":
        data[24:32] = struct.pack("<Q", 1 << 40)  # the first key's length
    else:
        data[:4] = b"GGUX"
    path = tmp_path / f"{damage.replace(' ', '-')}.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        read_header(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_the_fit_check_says_fits_tight_does_not_fit_or_could_not_check(bundles, ckpts, tmp_path):
    from edgevlm.plan.devices import get_device
    from edgevlm.plan.fit import fit_check

    bundle = bundles["idefics3"]
    assert fit_check(bundle, get_device("rtx-4090-24gb"), "onnx:int8", "gguf:q8_0").verdict == "fits"
    assert fit_check(bundle, get_device("rtx-4090-24gb"), "onnx:int8", "gguf:q8_0").message is None
    unmeasured = fit_check(bundle, None, "onnx:int8", "gguf:q8_0")
    assert unmeasured.verdict == "unchecked" and "psutil" in unmeasured.message
    assert fit_check(bundle, get_device("rtx-4090-24gb"), "onnx:int8", "mlx:4bit").verdict == "not applicable"
    assert fit_check(ckpts["idefics3"], get_device("rtx-4090-24gb"), "torch", "torch").verdict == "not applicable"
    # the planner failing is a warning line, never "fits" (it used to return None for both)
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        for key in ("weight_bytes", "bytes_per_token", "block_params"):
            artifact["details"].pop(key, None)  # sizes from the header, which is now gone
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / "decoder" / "q8_0.gguf").write_bytes(b"GGUF")
    failed = fit_check(broken, get_device("rtx-4090-24gb"), "onnx:int8", "gguf:q8_0")
    assert failed.verdict == "unchecked" and failed.message.startswith("warning: could not check")
    assert "the planner failed" in failed.message and "\n" not in failed.message


def test_the_fit_check_reads_sizes_from_the_manifest_before_loading(bundles):
    """The export records the GGUF sizes; the check opens no GGUF and no source checkpoint."""
    from edgevlm.gguf_header import read_header
    from edgevlm.manifest import Manifest
    from edgevlm.plan.bundle import gguf_sizes

    bundle = bundles["idefics3"]
    artifact = Manifest.load(bundle).find("decoder", "gguf:q8_0")
    header = read_header(bundle / artifact.path)
    assert gguf_sizes(bundle, artifact) == {"weight_bytes": header.weight_bytes,
                                            "bytes_per_token": header.bytes_per_token(),
                                            "block_params": header.block_params()}
    assert {key: artifact.details[key] for key in ("weight_bytes", "bytes_per_token", "block_params")} == \
        gguf_sizes(bundle, artifact)
    file_bytes = (bundle / artifact.path).stat().st_size
    assert 0.5 * file_bytes < header.weight_bytes < file_bytes  # the tensors, without the header and the vocabulary
