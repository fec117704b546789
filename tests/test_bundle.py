"""The bundle contract: atomic writes, hashes checked on load with the bad file named, versions checked."""
from __future__ import annotations

import json
import shutil

import pytest

import edgevlm
from edgevlm.errors import BadInputError, BundleError
from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
from edgevlm.manifest import FORMAT_VERSION, Manifest


def test_manifest_records_everything(bundles):
    manifest = Manifest.load(bundles["idefics3"])
    assert manifest.format_version == FORMAT_VERSION
    assert manifest.family == "idefics3"
    assert manifest.encoder.input_shape == ["tiles", 3, 32, 32]
    assert manifest.encoder.output_shape == ["tiles", 4, 64]
    assert manifest.image_layout.kind == "idefics3" and manifest.image_layout.tokens_per_tile == 4
    assert manifest.preprocess.resize_rule == "idefics3" and manifest.preprocess.longest_edge == 64
    assert manifest.decoder.n_layers == 2 and manifest.decoder.head_dim == 16
    assert set(manifest.names("encoder")) == {"onnx:fp32", "onnx:fp16", "onnx:int8"}
    assert set(manifest.names("decoder")) == {"gguf:f32", "gguf:q8_0"}
    for artifact in manifest.artifacts:
        assert artifact.files and all(len(f.sha256) == 64 for f in artifact.files)
        artifact.verify(bundles["idefics3"])
    assert not list(bundles["idefics3"].glob(".work"))


def test_tampered_onnx_refused_naming_the_file(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles["llava-clip"], copy)
    target = copy / "encoder" / "int8.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="int8.onnx"):
        edgevlm.load(copy, encoder="onnx:int8", decoder="gguf:q8_0")


def test_gguf_from_another_bundle_refused(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles["llava-clip"], copy)
    shutil.copy(bundles["llava-siglip"] / "decoder" / "q8_0.gguf", copy / "decoder" / "q8_0.gguf")
    with pytest.raises(BundleError, match=r"q8_0.gguf does not match its sha256"):
        edgevlm.load(copy, encoder="onnx:fp32", decoder="gguf:q8_0")


def test_missing_artifact_file(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles["llava-clip"], copy)
    (copy / "decoder" / "f32.gguf").unlink()
    with pytest.raises(BundleError, match="incomplete: decoder/f32.gguf is missing"):
        edgevlm.load(copy, decoder="gguf:f32")


def test_other_format_version_refused(bundles, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundles["llava-clip"], copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format version 99"):
        edgevlm.load(copy)


def test_unknown_artifact_choice_lists_what_exists(bundles):
    with pytest.raises(BadInputError, match="gguf:q8_0"):
        edgevlm.load(bundles["llava-clip"], decoder="gguf:q2_k")


def test_interrupted_export_leaves_nothing(ckpts, tmp_path, monkeypatch):
    import edgevlm.export.gguf as gguf_export

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_export, "quantize", explode)
    target = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(ckpts["llava-clip"], target, [ArtifactRequest("onnx", "fp32")], [ArtifactRequest("gguf", "q8_0")])
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_needs_force(ckpts, bundles):
    with pytest.raises(BadInputError, match="--force"):
        export_checkpoint(ckpts["llava-clip"], bundles["llava-clip"], [], [])
