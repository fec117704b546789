"""A manifest is a file people copy, edit by hand and receive from others: every mutation of a real one either runs
or ends in edgevlm's own error naming the field; never a traceback, never a file outside the bundle."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import edgevlm
from edgevlm.errors import BundleError, EdgeVLMError
from edgevlm.manifest import Manifest, sha256_file
from fuzzers import DELETE, leaves, mutate

MUTATIONS = [None, -1, 0, 10**12, "", [], {}, 3.5, True, "../x", "/etc/passwd", "a" * 300, "tiles", "{% bad"]
@pytest.fixture(scope="module")
def fuzz_bundle(bundles, tmp_path_factory):
    return shutil.copytree(bundles["llava-clip"], tmp_path_factory.mktemp("fuzz") / "bundle")


def run_once(bundle, image) -> str:
    try:
        session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:q8_0", threads=1)
        session.generate(image, "What colour is the circle?", max_tokens=2)
        return "ran"
    except EdgeVLMError as exc:
        assert "\n" not in str(exc).strip(), str(exc)  # one line
        return "clean error"


def test_single_and_double_field_mutations_never_end_in_a_traceback(fuzz_bundle, images):
    original = json.loads((fuzz_bundle / "manifest.json").read_text())
    paths = [p for p in leaves(original) if p]
    rng = np.random.default_rng(20261130)  # fixed seed: the same cases on every run
    cases = []
    for _ in range(160):
        path = paths[rng.integers(len(paths))]
        choices = MUTATIONS + [DELETE]
        cases.append([(path, choices[rng.integers(len(choices))])])
    for _ in range(40):
        cases.append([(paths[rng.integers(len(paths))], MUTATIONS[rng.integers(len(MUTATIONS))]) for _ in range(2)])
    outcomes, tracebacks = {"ran": 0, "clean error": 0}, []
    try:
        for case in cases:
            data = original
            for path, new in case:
                try:
                    data = mutate(data, path, new)
                except (KeyError, IndexError, TypeError):  # the first mutation removed the second's parent
                    pass
            (fuzz_bundle / "manifest.json").write_text(json.dumps(data))
            try:
                outcomes[run_once(fuzz_bundle, images["small"])] += 1
            except Exception as exc:  # noqa: BLE001 - exactly what this test hunts
                tracebacks.append(f"{case}: {type(exc).__name__}: {exc}"[:300])
    finally:
        (fuzz_bundle / "manifest.json").write_text(json.dumps(original))
    assert tracebacks == [], "\n".join(tracebacks)
    assert outcomes["clean error"] > 100 and outcomes["ran"] > 5, outcomes  # both kinds of case were exercised


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
