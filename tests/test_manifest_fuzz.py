"""A manifest is a file people copy, edit by hand and receive from others: every mutation of a real one either runs
or ends in edgevlm's own error naming the field; never a traceback, never a file outside the bundle."""
from __future__ import annotations

import json
import os
import shutil

import pytest

import edgevlm
from edgevlm.errors import BundleError
from edgevlm.manifest import Manifest, sha256_file

import fuzzers
from strategies import mutate


@pytest.fixture(scope="module")
def fuzz_bundle(bundles, tmp_path_factory):
    return shutil.copytree(bundles["llava-clip"], tmp_path_factory.mktemp("fuzz") / "bundle")


def test_single_and_double_field_mutations_never_end_in_a_traceback(fuzz_bundle, images):
    """One or two fields of a real manifest replaced (Hypothesis, fixed seed; a failure shrinks to one edit). Every
    case runs or ends in a one-line EdgeVLMError (a multi-line one counts as a traceback)."""
    tally = fuzzers.fuzz_manifests(fuzz_bundle, images["small"], 200, seed=20261130)
    assert tally.tracebacks == [], "\n".join(tally.tracebacks)
    assert tally.counts["clean error"] > 100 and tally.counts["ok"] > 5, tally.counts  # both kinds exercised
    Manifest.load(fuzz_bundle)  # the fuzzer puts the real manifest back


@pytest.mark.parametrize("where", ["relative", "absolute", "symlink"])
def test_an_artifact_path_outside_the_bundle_is_refused_before_it_is_opened(where, bundles, tmp_path):
    """The outside file is a valid GGUF with matching hashes: had the path been followed, the run would succeed."""
    bundle = shutil.copytree(bundles["llava-clip"], tmp_path / "bundle")
    outside = tmp_path / "outside.gguf"
    shutil.copy(bundle / "decoder" / "q8_0.gguf", outside)
    data = json.loads((bundle / "manifest.json").read_text())
    artifact = next(a for a in data["artifacts"] if a["name"] == "gguf:q8_0")
    if where == "symlink":
        (bundle / "decoder" / "q8_0.gguf").unlink()
        os.symlink(outside, bundle / "decoder" / "q8_0.gguf")
    else:
        path = "../outside.gguf" if where == "relative" else str(outside)
        artifact["path"] = artifact["files"][0]["path"] = path
        artifact["files"][0]["sha256"] = sha256_file(outside)
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="outside the bundle|relative path inside the bundle"):
        edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:q8_0", threads=1)


def test_wrong_types_are_named_with_field_and_value(bundles, images, tmp_path):
    bundle = shutil.copytree(bundles["llava-clip"], tmp_path / "bundle")
    original = json.loads((bundle / "manifest.json").read_text())
    for path, value, message, at_run in [
        (("encoder", "max_tiles"), "abc", "encoder.max_tiles is 'abc'; expected an integer >= 1", False),
        (("decoder", "context_length"), "512", "decoder.context_length is '512'; expected an integer >= 1", False),
        (("image_layout", "image_token_id"), 10**6, "image_layout.image_token_id is 1000000; expected an integer >= 0 <=", False),
        (("tokenizer", "path"), "elsewhere", "tokenizer.path 'elsewhere' is not the tokenizer artifact's path", False),
        (("artifacts", 1, "format"), "mlx", "has format 'mlx' and role 'encoder'", False),
        (("encoder", "input_shape"), ["tiles", 3, 10**12, 32], "encoder.input_shape is", False),
        # found by benchmarks/fuzz.py at 10,000 cases: a huge resize, a detail used as a path, a name too long
        (("preprocess", "shortest_edge"), 10**12, "preprocess.shortest_edge is 1000000000000", False),
        (("artifacts", 1, "details", "cpu_optimized"), 3.5, "details.cpu_optimized is 3.5", False),
        (("artifacts", 1, "path"), "a" * 300, "expected a relative path inside the bundle", False),
        (("encoder", "output_name"), "logits", "but the manifest names 'pixel_values' and 'logits'", True),
        (("tokenizer", "chat_template"), "{% bad", "the chat template cannot be rendered", True),
    ]:
        (bundle / "manifest.json").write_text(json.dumps(mutate(original, path, value)))
        with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)")):
            if at_run:
                edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:q8_0", threads=1).generate(
                    images["small"], "hi", max_tokens=2)
            else:
                Manifest.load(bundle)


@pytest.mark.parametrize("relative,artifact,decoder,needle", [
    ("decoder/q8_0.gguf", "gguf:q8_0", "gguf:q8_0", "q8_0.gguf"),
    ("encoder/fp32.onnx", "onnx:fp32", "gguf:q8_0", "fp32.onnx"),  # the graph the CPU copy is built from
    ("decoder/mlx-8bit/model.safetensors", "mlx:8bit", "mlx:8bit", "mlx-8bit"),
])
def test_a_truncated_artifact_with_a_recomputed_hash_is_a_clear_error(relative, artifact, decoder, needle, ckpts,
                                                                        tmp_path, images, capsys):
    """Written by another tool: the hash matches, the content does not; the runtime's own error is wrapped."""
    from edgevlm.cli import main
    from edgevlm.export.exporter import ArtifactRequest, export_checkpoint

    bundle = export_checkpoint(ckpts["llava-clip"], tmp_path / "b", [ArtifactRequest("onnx", "fp32")],
                               [ArtifactRequest("gguf", "q8_0"), ArtifactRequest("mlx", "8bit")], max_tiles=4)
    data = (bundle / relative).read_bytes()
    (bundle / relative).write_bytes(data[: len(data) * 2 // 3])
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in next(a for a in manifest["artifacts"] if a["name"] == artifact)["files"]:
        if entry["path"] == relative:
            entry["sha256"], entry["bytes"] = sha256_file(bundle / relative), (bundle / relative).stat().st_size
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    images["small"].save(tmp_path / "i.png")
    code = main(["run", str(bundle), "--image", str(tmp_path / "i.png"), "--prompt", "hi", "--encoder", "onnx:fp32",
                 "--decoder", decoder, "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
