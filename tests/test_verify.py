"""`edgevlm verify` is a gate: tampered files and damaged quantizations FAIL (exit 1) and name what failed; only a
backend that is not installed here is "skipped"."""
from __future__ import annotations

import json
import shutil

import pytest

from damage import rehash, swap_gguf_tensors  # tests/damage.py: the damage every gate test builds

from edgevlm.cli import main
from edgevlm.export.exporter import ArtifactRequest, export_checkpoint


def _verify(bundle, capsys) -> tuple[int, dict]:
    code = main(["verify", str(bundle), "--threads", "1", "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return code, out


@pytest.fixture(scope="module")
def every_kind(ckpts, tmp_path_factory):
    """One small bundle with each artifact kind: ONNX, GGUF, MLX safetensors, tokenizer."""
    return export_checkpoint(ckpts["llava-clip"], tmp_path_factory.mktemp("kinds") / "bundle",
                             [ArtifactRequest("onnx", "fp32")], [ArtifactRequest("gguf", "q8_0"), ArtifactRequest("mlx", "8bit")],
                             max_tiles=4)


# What the tiny random-weight models measured against the gates they were judged by before issue 29 (the quantized
# gates now judge trained weights only): still asserted, so that no tolerance a test held is loosened.
RANDOM_WEIGHT_BOUNDS = {"gguf:q8_0": (2e-3, 0.9), "mlx:8bit": (2e-3, 0.9), "gguf:q6_k": (5e-3, 0.85),
                        "gguf:q5_k_m": (1e-2, 0.75), "gguf:q4_k_m": (5e-2, 0.5), "gguf:q4_0": (5e-2, 0.5),
                        "mlx:4bit": (5e-2, 0.5)}


def test_an_intact_bundle_passes_every_row_it_can_judge_and_lists_the_rest(every_kind, capsys):
    """Random weights: the exact rows pass; the quantized decoders and their pairs are measured but not judged, so
    the outcome is "incomplete" (exit 3), and --allow-skips accepts it (exit 0) while still listing them."""
    code, out = _verify(every_kind, capsys)
    assert code == 3 and out["status"] == "incomplete" and out["weights"]["trained"] is False
    assert out["weights"]["reference_top1_probability"] < 0.05
    assert {r["artifact"]: r["status"] for r in out["rows"]} == {
        "tokenizer": "pass", "onnx:fp32": "pass", "gguf:q8_0": "unjudged", "mlx:8bit": "unjudged",
        "onnx:fp32 + gguf:q8_0": "unjudged", "onnx:fp32 + mlx:8bit": "unjudged"}
    rows = {r["artifact"]: r for r in out["rows"]}
    for name in ("gguf:q8_0", "mlx:8bit"):
        max_nmse, min_agreement = RANDOM_WEIGHT_BOUNDS[name]
        assert rows[name]["nmse"] <= max_nmse and rows[name]["greedy_agreement"] >= min_agreement
        assert {c["verdict"] for c in rows[name]["checks"]} == {"not judged"} and "random" in rows[name]["note"]
    assert {n["artifact"] for n in out["not_checked"]} == {n for n, r in rows.items() if r["status"] == "unjudged"}
    for row in out["rows"]:  # every check says what it measured, against what, and the verdict
        assert row["checks"] and all(set(c) == {"metric", "value", "gate", "verdict"} for c in row["checks"]), row
    assert rows["onnx:fp32"]["checks"][0]["metric"] == "max_rel_err" and "worst of 5 tiles" in rows["onnx:fp32"]["criterion"]
    code = main(["verify", str(every_kind), "--threads", "1", "--json", "--allow-skips"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["status"] == "pass with skips" and len(out["not_checked"]) == 4


@pytest.mark.parametrize("relative,artifact", [
    ("encoder/fp32.onnx", "onnx:fp32"),
    ("decoder/q8_0.gguf", "gguf:q8_0"),
    ("decoder/mlx-8bit/model.safetensors", "mlx:8bit"),
    ("tokenizer/tokenizer.json", "tokenizer"),
])
def test_one_flipped_byte_fails_verify_naming_the_file(relative, artifact, every_kind, tmp_path, capsys):
    bundle = shutil.copytree(every_kind, tmp_path / "b")
    data = bytearray((bundle / relative).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / relative).write_bytes(bytes(data))
    code, out = _verify(bundle, capsys)
    assert code == 1 and out["status"] == "FAIL"
    rows = {r["artifact"]: r for r in out["rows"]}
    assert rows[artifact]["status"] == "FAIL" and relative in rows[artifact]["note"]
    failed = {name for name, row in rows.items() if row["status"] == "FAIL"}
    # a damaged tokenizer takes the decoders down with it (they cannot run without it); nothing else fails
    assert failed == ({artifact, "gguf:q8_0", "mlx:8bit"} if artifact == "tokenizer" else {artifact})
    code = main(["verify", str(bundle), "--threads", "1"])  # the table form names it too
    assert code == 1 and f"FAIL {artifact}" in capsys.readouterr().err


def test_an_f32_gguf_without_the_qk_permutation_fails_and_the_correct_one_passes(ckpts, tmp_path, capsys, monkeypatch):
    """On random weights attention is nearly uniform, so only the exact rung sees a missing RoPE permutation; the
    quantized rungs are damaged on the trained reference model below."""
    from edgevlm.export import gguf as gguf_export

    decoders = [ArtifactRequest("gguf", "f32")]
    good = export_checkpoint(ckpts["llava-siglip"], tmp_path / "good", [], decoders)
    monkeypatch.setattr(gguf_export, "permute_rope", lambda array, n_head: array)  # the classic converter bug
    bad = export_checkpoint(ckpts["llava-siglip"], tmp_path / "bad", [], decoders)
    code, out = _verify(good, capsys)
    assert code == 0, out
    code, out = _verify(bad, capsys)
    rows = {r["artifact"]: r for r in out["rows"]}
    assert code == 1 and rows["gguf:f32"]["status"] == "FAIL", rows


@pytest.mark.parametrize("family", ["llava-clip", "idefics3"])
def test_every_precision_the_cli_offers_passes_its_gate_on_a_tiny_model(family, ckpts, tmp_path, capsys):
    """The parity ladder for every encoder and decoder precision `edgevlm export` accepts."""
    from edgevlm.export.exporter import DECODER_FORMATS, ENCODER_FORMATS
    from edgevlm.metrics import DECODER_GATES, ENCODER_GATES, MMPROJ_GATES

    # "gguf" on the encoder side is an alias of "mmproj" (llama.cpp's mmproj, run through libmtmd by verify)
    encoders = [ArtifactRequest(f, p) for f, (_, precisions) in ENCODER_FORMATS.items() if f != "gguf" for p in precisions]
    if family == "llava-clip":  # no mmproj for a CLIP tower (refused: upstream llama.cpp issue 25814, test_mmproj.py)
        encoders = [r for r in encoders if r.format != "mmproj"]
    decoders = [ArtifactRequest(f, p) for f, (_, precisions) in DECODER_FORMATS.items() for p in precisions]
    assert {r.name for r in decoders} == set(DECODER_GATES)  # one gate per offered precision, no more
    assert {r.precision for r in encoders if r.format == "onnx"} <= set(ENCODER_GATES)
    assert {r.precision for r in encoders if r.format == "mlx"} <= set(ENCODER_GATES)
    assert {r.precision for r in encoders if r.format == "mmproj"} <= set(MMPROJ_GATES)
    bundle = export_checkpoint(ckpts[family], tmp_path / "all", encoders, decoders, max_tiles=4)
    code, out = _verify(bundle, capsys)
    # keyed by role too: "mlx:fp32" names the MLX vision half and the MLX decoder alike
    rows = {(r["role"], r["artifact"]): r for r in out["rows"]}
    # random weights: every gate that holds on any weights passes; the trained-only ones are measured, not judged
    runnable = [r.name for r in encoders if r.format in ("onnx", "mlx")]
    pairs = [f"{e} + {d.name}" for e in runnable for d in decoders]
    trained_only = {("decoder", d.name) for d in decoders if DECODER_GATES[d.name].trained_only}
    trained_only |= {("encoder", r.name) for r in encoders
                     if r.format in ("onnx", "mlx") and ENCODER_GATES[r.precision].trained_only}
    trained_only |= {("encoder", r.name) for r in encoders
                     if r.format == "mmproj" and MMPROJ_GATES[r.precision].trained_only}
    exact_pairs = {f"{fmt}:fp32 + {d.name}" for fmt in ("onnx", "mlx") for d in decoders
                   if not DECODER_GATES[d.name].trained_only}
    judged_pairs = {("pair", p) for p in set(pairs) - exact_pairs}
    assert {key for key, row in rows.items() if row["status"] != "pass"} == trained_only | judged_pairs
    assert {row["status"] for row in rows.values()} == {"pass", "unjudged"}, rows
    assert code == 3 and len(rows) == 1 + len(encoders) + len(decoders) + len(pairs)
    for name in ("gguf:f32", "gguf:f16", "mlx:fp32"):
        assert rows[("decoder", name)]["greedy_agreement"] == 1.0
    assert rows[("pair", "onnx:fp32 + gguf:f32")]["greedy_agreement"] == 1.0
    assert rows[("pair", "mlx:fp32 + gguf:f32")]["greedy_agreement"] == 1.0
    for role, name in trained_only & {("decoder", n) for n in RANDOM_WEIGHT_BOUNDS}:
        max_nmse, min_agreement = RANDOM_WEIGHT_BOUNDS[name]
        row = rows[(role, name)]
        assert row["nmse"] <= max_nmse and row["greedy_agreement"] >= min_agreement, row


def test_verify_without_a_bundle_is_bad_input(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err


@pytest.mark.slow
def test_damaged_quantized_ggufs_fail_verify_on_the_reference_model(tmp_path, capsys, monkeypatch):
    """Two layers' attn_q swapped inside the quantized files, and an export that skips the Q/K permutation: FAIL;
    the correct export of the same model: pass."""
    from edgevlm.export import gguf as gguf_export
    from edgevlm.reference.train import DEFAULT_RECIPE, ensure_reference

    reference = ensure_reference(DEFAULT_RECIPE)
    decoders = [ArtifactRequest("gguf", p) for p in ("q8_0", "q4_k_m", "q4_0")]
    bundle = export_checkpoint(reference, tmp_path / "ref", [], decoders)
    code, out = _verify(bundle, capsys)
    assert code == 0, out["rows"]
    for quant in ("q8_0", "q4_k_m"):
        swap_gguf_tensors(bundle / "decoder" / f"{quant}.gguf", "blk.0.attn_q.weight", "blk.1.attn_q.weight")
        rehash(bundle, f"decoder/{quant}.gguf")
    code, out = _verify(bundle, capsys)
    rows = {r["artifact"]: r for r in out["rows"]}
    assert code == 1 and rows["gguf:q8_0"]["status"] == rows["gguf:q4_k_m"]["status"] == "FAIL", rows
    assert rows["gguf:q4_0"]["status"] == "pass"  # untouched
    monkeypatch.setattr(gguf_export, "permute_rope", lambda array, n_head: array)
    unpermuted = export_checkpoint(reference, tmp_path / "unpermuted", [], [ArtifactRequest("gguf", "q8_0")])
    code, out = _verify(unpermuted, capsys)
    assert code == 1 and out["rows"][-1]["artifact"] == "gguf:q8_0" and out["rows"][-1]["status"] == "FAIL", out
