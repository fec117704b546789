"""The benchmark harness on a tiny bundle: every metric present, roofline arithmetic, clear errors (no timing
thresholds: speed goals live in benchmarks/, not in tests)."""
from __future__ import annotations

import json

import pytest

from edgevlm.bench.harness import Scenario, parse_size
from edgevlm.plan.roofline import kv_bytes_per_token, roofline
from edgevlm.cli import main
from edgevlm.errors import BadInputError

METRICS = ("preprocess_ms", "encode_ms", "encode_ms_per_tile", "n_tiles", "n_image_tokens", "n_prompt_tokens",
           "prefill_ms", "prefill_tok_s", "ttft_cold_ms", "ttft_warm_ms", "decode_tok_s", "decode_tok_s_warm",
           "end_to_end_ms", "rss_mb", "peak_rss_mb", "ttft_warm_over_cold", "n_new_tokens", "snapshot_ms", "snapshot_over_ttft_cold")


def test_roofline_arithmetic():
    # 10 GB/s over (1e8 weight bytes + KV) per token
    kv = kv_bytes_per_token(n_layers=2, n_kv_heads=2, head_dim=16, context=100, bytes_per_value=2)
    assert kv == 2 * 2 * 2 * 16 * 100 * 2
    r = roofline(10.0, 100_000_000 - kv, kv, measured_tok_s=80.0)
    assert r.ceiling_tok_s == pytest.approx(100.0)
    assert r.fraction == pytest.approx(0.8)
    with pytest.raises(ValueError):
        roofline(0.0, 1, 0, 1.0)


def test_bench_json_has_every_metric(bundles, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", str(bundles["idefics3"]), "--image-size", "64x32", "--prompt-tokens", "8", "--new-tokens",
                 "6", "--repeats", "2", "--threads", "1", "--encoder", "onnx:int8", "--decoder", "gguf:q8_0", "-o", str(out)])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result == json.loads((out / "bench.json").read_text())
    assert result["schema"] == "edgevlm-bench/1" and result["machine"]["bandwidth_gbs"] > 0
    names = [r["name"] for r in result["runs"]]
    assert names == ["torch (transformers eager)", "onnx:int8 + gguf:q8_0"]
    for run in result["runs"]:
        for metric in METRICS:
            assert metric in run["metrics"], metric
        for metric in ("ttft_cold_ms", "ttft_warm_ms", "decode_tok_s", "prefill_ms"):
            assert set(run["metrics"][metric]) == {"median", "min", "max"}
        assert run["metrics"]["n_tiles"] == 3 and run["metrics"]["n_image_tokens"] == 12  # 64x32 -> 1x2 tiles + global
        assert run["metrics"]["warm_prefix_cache_hits"] == 2  # the warm run skipped encoder and image prefill
        assert 0 < run["metrics"]["snapshot_over_ttft_cold"] < 1  # each cold run saved the image prefix once
        assert run["roofline"]["ceiling_tok_s"] > 0 and 0 < run["roofline"]["fraction"]
    ours = result["runs"][1]
    assert ours["sizes"]["decoder_bytes"] > 0 and ours["sizes"]["encoder_bytes"] > 0
    memory = ours["metrics"]["memory"]  # where the peak goes, MiB
    assert memory["before_load"] > 0 and memory["peak"] == ours["metrics"]["peak_rss_mb"]
    assert 0 < memory["decoder_weights"] < 5 and 0 < memory["encoder_graph"] < 5 and memory["kv_cache_allocated"] > 0
    assert memory["before_load"] + memory["decoder_weights"] + memory["encoder_graph"] <= memory["peak"]
    assert set(ours["vs_reference"]) == {"ttft_cold", "decode_tok_s", "encode_ms_per_tile"}
    ab = ours["metrics"]["decode_loop_vs_llama_decode"]  # the loop against llama_decode alone, alternated
    assert ab["loop_tok_s"]["median"] > 0 and ab["llama_decode_tok_s"]["median"] > 0 and ab["ratio"] > 0
    assert "decode_loop_vs_llama_decode" not in result["runs"][0]["metrics"]  # torch has no llama.cpp step
    assert "llama_decode alone" in (out / "bench.md").read_text()
    prediction = ours["prediction"]  # the planner's figures for the same pair and workload, beside the measured ones
    assert prediction["run_mib"] > 0 and prediction["decode_tok_s"] > 0 and prediction["image_size"] == "64x32"
    assert "`edgevlm plan` (this-machine, 64x32) predicted TTFT" in (out / "bench.md").read_text()
    assert "prediction" not in result["runs"][0]  # the reference is not a bundle pair
    peers = {p["name"]: p for p in result["peers"]}
    assert peers["llama-cpp-python generate (gguf:q8_0)"]["metrics"]["decode_tok_s"]["median"] > 0
    assert "gguf:q8_0" in " ".join(peers)
    assert (out / "bench.png").stat().st_size > 1000 and "| run |" in (out / "bench.md").read_text()
    assert all(run["isolated"] for run in result["runs"])  # each pair measured in its own process
    drift = ours["metrics"]["drift"]  # teacher-forced on the reference's 6 greedy tokens
    # int8 encoder + Q8_0 decoder against the reference on its own tokens: within the q8_0 gate's nmse x 10 (the
    # int8 image rows add their own error) and the same tokens at most positions
    assert drift["n_tokens"] == 6 and drift["logits_nmse"] <= 1e-2 and drift["top1_agreement"] >= 0.5, drift
    assert "top-1 vs ref" in (out / "bench.md").read_text()
    assert all(run["metrics"]["peak_rss_mb"] > 0 for run in result["runs"])


def test_bench_in_process_and_errors_from_the_child(bundles, capsys):
    from edgevlm.bench.run import measure_isolated

    code = main(["bench", str(bundles["llava-clip"]), "--image-size", "32x32", "--prompt-tokens", "4", "--new-tokens",
                 "4", "--repeats", "1", "--threads", "1", "--encoder", "onnx:fp32", "--decoder", "gguf:f32",
                 "--peers", "torch", "--in-process", "--accuracy", "5"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reference, ours = result["runs"]
    assert ours["name"] == "onnx:fp32 + gguf:f32" and "isolated" not in ours
    # fp32 ONNX + F32 GGUF follow the reference token for token on the bench prompt; the bench runs llama.cpp as
    # users do (f16 KV cache), hence 1e-3 and not the parity mode's 1e-5
    assert ours["metrics"]["drift"]["top1_agreement"] == 1.0 and ours["metrics"]["drift"]["logits_nmse"] < 1e-3
    for run in (reference, ours):
        assert run["metrics"]["task_accuracy"]["n"] == 5
    # the same answers, so the same task accuracy (whatever a random-weight model scores)
    assert ours["metrics"]["task_accuracy"]["accuracy"] == reference["metrics"]["task_accuracy"]["accuracy"]
    assert "accuracy_points" in ours["vs_reference"]
    with pytest.raises(BadInputError, match="mlx:3bit"):  # the child's clear error comes back as the same error
        measure_isolated(bundles["llava-clip"], "onnx:fp32", "mlx:3bit", Scenario((32, 32), 4, 2, 1, 1), 20.0)


def test_encoder_only_bench(bundles, capsys):
    assert main(["bench", str(bundles["llava-clip"]), "--encoder-only", "--repeats", "2", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["encoder"] for r in result["runs"]][0] == "torch eager fp32"
    assert {r["encoder"] for r in result["runs"][1:]} == {"onnx:fp32", "onnx:fp16", "onnx:int8"}
    assert all(r["ms_per_tile"]["median"] > 0 for r in result["runs"])


@pytest.mark.parametrize("argv,needle", [
    (["--image-size", "big"], "--image-size must look like"),
    (["--peers", "ollama"], "unknown peer 'ollama'"),
    (["--decoder", "gguf:q2_k"], "no decoder 'gguf:q2_k'"),
    (["--target", "tpu"], "unknown target 'tpu'"),
    (["--new-tokens", "1"], "new tokens >= 2"),
])
def test_bad_bench_options(argv, needle, bundles, capsys):
    code = main(["bench", str(bundles["llava-clip"]), *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_parse_size_and_scenario_validation():
    assert parse_size("800x600") == (800, 600)
    with pytest.raises(BadInputError):
        Scenario(repeats=0)


def test_bench_passes_memory_flags_to_every_run(bundles, capsys):
    """--prefix-cache-mb 0 reaches the child processes: no warm run can restore an image prefix."""
    code = main(["bench", str(bundles["llava-clip"]), "--image-size", "32x32", "--prompt-tokens", "4", "--new-tokens",
                 "2", "--repeats", "1", "--threads", "1", "--encoder", "onnx:fp32", "--decoder", "gguf:q8_0",
                 "--peers", "torch", "--prefix-cache-mb", "0", "--n-ctx", "256"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [run["metrics"]["warm_prefix_cache_hits"] for run in result["runs"]] == [0, 0]
    assert result["scenario"]["prefix_cache_bytes"] == 0 and result["scenario"]["n_ctx"] == 256


def test_report_rows_show_llama_bench_prompt_rate_not_nan():
    """llama-bench reports a prompt-processing rate and no TTFT: its row shows the rate (it showed "nan (text)")."""
    from edgevlm.bench.report import rows

    rate = {"median": 250.0, "min": 240.0, "max": 260.0}
    result = {"runs": [], "peers": [
        {"name": "llama-bench (gguf:q8_0)", "metrics": {"decode_tok_s": {**rate, "median": 95.0}, "prefill_tok_s": rate}},
        {"name": "llama-cpp-python generate (gguf:q8_0)",
         "metrics": {"decode_tok_s": rate, "ttft_text_only_ms": {"median": 120.0, "min": 1.0, "max": 2.0}}}]}
    bench, loop = rows(result)
    assert bench[3] == "pp 250 tok/s" and bench[4] == "-" and bench[6] == "95.0" and "nan" not in " ".join(bench)
    assert loop[3] == "-" and loop[4] == "120.0 (text)"


def test_report_keeps_peer_ratios_without_a_pytorch_peer():
    """A run benched with --peers llamacpp (no PyTorch reference) still reports its decode against llama-bench: the
    ratios line was written only beside the reference's (W3 q4_k_m's bench.md lost it)."""
    from edgevlm.bench.report import ratios

    run = {"name": "onnx:fp32 + gguf:q4_k_m", "kind": "edgevlm",
           "metrics": {"ttft_warm_over_cold": 0.03, "decode_tok_s_warm": {"median": 26.2}},
           "vs_peers": {"llama-bench (gguf:q4_k_m)": {"decode_tok_s": 0.81}}}
    lines = ratios({"runs": [run], "peers": []})
    assert len(lines) == 1 and "decode 0.81x llama-bench (gguf:q4_k_m)" in lines[0] and "PyTorch" not in lines[0]


def test_llama_bench_also_runs_where_edgevlm_decodes(bundles, tmp_path, capsys):
    """Besides its default (tg from position 0, flash attention auto), llama-bench runs after edgevlm's prompt length
    with edgevlm's flash-attention setting (the one its run recorded; --flash-attn off here): the like-for-like
    decode comparison."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "bin" / "llama-bench"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                    "echo '[{\"n_gen\": 0, \"avg_ts\": 500.0, \"stddev_ts\": 1.0}, "
                    "{\"n_gen\": 2, \"avg_ts\": 150.0, \"stddev_ts\": 2.0}]'\n")
    fake.chmod(0o755)
    code = main(["bench", str(bundles["llava-clip"]), "--image-size", "32x32", "--prompt-tokens", "4", "--new-tokens",
                 "2", "--repeats", "1", "--threads", "1", "--encoder", "onnx:fp32", "--decoder", "gguf:q8_0",
                 "--peers", "llamacpp", "--llamacpp-bin", str(fake.parent), "--flash-attn", "off"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    depth = result["runs"][0]["metrics"]["n_prompt_tokens"]
    assert result["runs"][0]["metrics"]["flash_attn"] is False
    benches = [p for p in result["peers"] if p["name"].startswith("llama-bench")]
    assert [p.get("depth") for p in benches] == [None, depth] and benches[1]["flash_attn"] is False
    default, matched = calls.read_text().splitlines()
    assert "-d" not in default.split() and "-fa" not in default.split()
    assert f"-d {depth} -fa off" in matched and benches[1]["metrics"]["decode_tok_s"]["median"] == 150.0
    assert set(result["runs"][0]["vs_peers"]) >= {p["name"] for p in benches}


def test_torch_reference_in_the_checkpoints_bf16(tmp_path, capsys):
    """--torch-dtype auto runs the PyTorch reference in the dtype the checkpoint stores (bf16 here, as a 4B model's
    float32 copy does not fit beside the rest in 24 GiB): pixels and image rows are cast to the weights' dtype."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from builders import build_llava

    ckpt = build_llava(tmp_path / "llava-bf16", "clip", seed=11)
    LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16).save_pretrained(ckpt)
    code = main(["bench", str(ckpt), "--image-size", "32x32", "--prompt-tokens", "4", "--new-tokens", "3",
                 "--repeats", "1", "--threads", "1", "--peers", "torch", "--in-process", "--torch-dtype", "auto"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run,) = result["runs"]
    assert run["name"] == "torch (transformers eager, bfloat16)" and run["torch_dtype"] == "bfloat16"
    assert result["scenario"]["torch_dtype"] == "auto" and run["metrics"]["n_new_tokens"] == 3
    assert run["roofline"]["kv_bytes"] > 0
