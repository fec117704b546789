"""Every gate against damage (issue 29): on the model each gate is meant for, the correct export passes and a damaged
one fails. The quantized gates and the pair gate are calibrated on the trained reference model (slow: built once,
cached under ~/.cache/edgevlm); the exact encoder gates judge any weights and are damaged on a tiny model too. The
numbers these tests see are docs/parity-ladder.md's margin table (benchmarks/gate_margins.py measures them all)."""
from __future__ import annotations

import shutil

import pytest

import damage
from edgevlm.export.exporter import ArtifactRequest, export_checkpoint
from edgevlm.verify import verify_report

GGUF_QUANTS = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


def _rows(bundle, **options) -> dict:
    report = verify_report(bundle, threads=2, **options)
    return {r["artifact"]: r for r in report["rows"]}


def _statuses(rows: dict) -> dict:
    return {name: row["status"] for name, row in rows.items()}


@pytest.fixture(scope="module")
def reference():
    from edgevlm.reference.train import DEFAULT_RECIPE, ensure_reference

    return ensure_reference(DEFAULT_RECIPE)


@pytest.fixture(scope="module")
def shipped(reference, tmp_path_factory):
    """What a user ships from the reference model: fp32 and int8 encoders, an exact and a 4-bit GGUF decoder."""
    return export_checkpoint(reference, tmp_path_factory.mktemp("shipped") / "bundle",
                             [ArtifactRequest("onnx", "fp32"), ArtifactRequest("onnx", "int8")],
                             [ArtifactRequest("gguf", "f32"), ArtifactRequest("gguf", "q4_0")], max_tiles=4)


@pytest.mark.slow
def test_the_reference_models_shipped_pairs_pass_every_gate(shipped):
    report = verify_report(shipped, threads=2)
    rows = {r["artifact"]: r for r in report["rows"]}
    assert report["weights"]["trained"] and report["weights"]["reference_model"], report["weights"]
    assert set(_statuses(rows).values()) == {"pass"}, rows
    pairs = [r for r in rows.values() if r["role"] == "pair"]
    assert len(pairs) == 4
    for row in pairs:
        if "accuracy" in row:  # every pair with a quantized part is judged on task accuracy too
            assert row["accuracy_drop"] <= 0.05 and row["reference_accuracy"] >= 0.9, row
    assert "accuracy" in rows["onnx:int8 + gguf:q4_0"]


@pytest.mark.slow
@pytest.mark.parametrize("label", ["attention layers 0 and 1 swapped", "projector weight x1.02"])
def test_damaged_encoders_fail_on_the_reference_model(label, shipped, tmp_path):
    bundle = shutil.copytree(shipped, tmp_path / "b")
    for name in ("onnx:fp32", "onnx:int8"):
        if label.startswith("attention"):
            damage.swap_onnx_attention_layers(bundle, name, 0, 1)
        else:
            damage.scale_onnx_projector(bundle, name, 1.02)
    rows = _rows(bundle, decoders=False)
    assert rows["onnx:fp32"]["status"] == rows["onnx:int8"]["status"] == "FAIL", rows


# Swaps of layers 0 and 1's attention, strongest first: how far one moves the int8 tower depends on the trained weights,
# which differ between CPUs (the whole swap: worst-tile cosine 0.992 on the EPYC that calibrated the gates, 0.972 on an
# Intel Xeon; q+k only 0.9925 there)
SWAPS_STRONGEST_FIRST = ((0, 1, 2, 3), (0, 1), (2, 3), (1,), (0,))


@pytest.mark.slow
def test_the_pair_gate_fails_a_damaged_int8_encoder_whose_cosine_clears_0_99(shipped, tmp_path):
    """Layers 0 and 1's attention swapped in the int8 graph only, as much of it as keeps the worst tile's cosine >= 0.99
    (the old int8 gate, and the exporter's floor, would pass it): the pairs it is shipped in move far from the
    reference and fail."""
    for i, weights in enumerate(SWAPS_STRONGEST_FIRST):
        bundle = shutil.copytree(shipped, tmp_path / f"b{i}")
        damage.swap_onnx_attention_layers(bundle, "onnx:int8", 0, 1, weights)
        if _rows(bundle, decoders=False)["onnx:int8"]["cosine"] >= 0.99:
            break
    rows = _rows(bundle)
    assert rows["onnx:int8"]["cosine"] >= 0.99, (weights, rows["onnx:int8"])
    assert rows["onnx:int8 + gguf:f32"]["status"] == rows["onnx:int8 + gguf:q4_0"]["status"] == "FAIL", (weights, rows)
    assert rows["onnx:fp32 + gguf:f32"]["status"] == rows["onnx:fp32 + gguf:q4_0"]["status"] == "pass"


@pytest.mark.slow
def test_every_gguf_quantization_fails_when_damaged_on_the_reference_model(reference, tmp_path, monkeypatch):
    """Two layers' attn_q/attn_k swapped inside each file, and each written without the Q/K RoPE permutation."""
    from edgevlm.export import gguf as gguf_export

    requests = [ArtifactRequest("gguf", q) for q in GGUF_QUANTS]
    swapped = export_checkpoint(reference, tmp_path / "swapped", [], requests)
    assert set(_statuses(_rows(swapped)).values()) == {"pass"}  # the correct export of every quantization
    for q in GGUF_QUANTS:
        damage.swap_gguf_layers(swapped, f"gguf:{q}", ("attn_q.weight", "attn_k.weight"))
    rows = _rows(swapped)
    assert {f"gguf:{q}" for q in GGUF_QUANTS} == {n for n, r in rows.items() if r["status"] == "FAIL"}, rows
    monkeypatch.setattr(gguf_export, "permute_rope", lambda array, n_head: array)  # the classic converter bug
    unpermuted = export_checkpoint(reference, tmp_path / "unpermuted", [], requests)
    rows = _rows(unpermuted)
    assert {f"gguf:{q}" for q in GGUF_QUANTS} == {n for n, r in rows.items() if r["status"] == "FAIL"}, rows


@pytest.mark.slow
def test_every_mlx_precision_fails_when_damaged_on_the_reference_model(reference, tmp_path):
    pytest.importorskip("mlx.core", reason="MLX is not installed here")  # CI: fails (conftest)
    precisions = ("fp32", "fp16", "8bit", "4bit")
    bundle = export_checkpoint(reference, tmp_path / "mlx", [], [ArtifactRequest("mlx", p) for p in precisions])
    assert set(_statuses(_rows(bundle)).values()) == {"pass"}
    for p in precisions:
        damage.swap_mlx_layers(bundle, f"mlx:{p}")
    rows = _rows(bundle)
    assert {f"mlx:{p}" for p in precisions} == {n for n, r in rows.items() if r["status"] == "FAIL"}, rows


@pytest.mark.parametrize("label", ["attention layers 0 and 1 swapped", "projector weight x1.02"])
def test_damaged_encoders_fail_on_random_weights_too(label, bundles, tmp_path):
    """On the tiny random Idefics3 model (two tower layers): fp32's gate, which judges any weights, fails both damages;
    fp16's and int8's are measured, not judged, there (a swap keeps cosine 1.0 on random weights)."""
    bundle = shutil.copytree(bundles["idefics3"], tmp_path / "b")
    names = ("onnx:fp32", "onnx:fp16", "onnx:int8")
    rows = _rows(bundle, decoders=False)
    assert [rows[n]["status"] for n in names] == ["pass", "unjudged", "unjudged"], rows
    for name in names:
        if label.startswith("attention"):
            damage.swap_onnx_attention_layers(bundle, name, 0, 1)
        else:
            damage.scale_onnx_projector(bundle, name, 1.02)
    rows = _rows(bundle, decoders=False)
    assert [rows[n]["status"] for n in names] == ["FAIL", "unjudged", "unjudged"], rows
    if label.startswith("projector"):  # measured all the same: a scale error shows at every precision
        assert all(rows[n]["norm_err"] > 0.015 for n in names)
