"""The other libraries' benchmark peers (edgevlm.bench.peers.external): mlx-vlm converting and generating the
checkpoint itself in its own process, ONNX Runtime GenAI's model builder. A peer that cannot run is a row with its
reason; a peer that runs has the row shape of the bench's multimodal peers. No timing thresholds.

The mlx-vlm peer runs here with edgevlm's own Python as the peer's (setup-venv.sh installs mlx-vlm there without its
declared dependencies; its convert/load/generate path needs none of them), on the tiny Idefics3 checkpoint: the
peer's full environment (benchmarks/build_mlx_vlm_env.sh, ~1.1 GB) is the benchmark's, not CI's."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from edgevlm.bench.harness import Scenario
from edgevlm.bench.peers import external
from edgevlm.bench.report import rows
from edgevlm.bench.run import other_library_peers
from edgevlm.cli import main

PEER_METRICS = ("ttft_cold_ms", "ttft_warm_ms", "decode_tok_s", "decode_tok_s_warm", "peak_rss_mb", "rss_mb",
                "n_prompt_tokens", "n_new_tokens", "warm_reused_tokens", "drift", "convert_s", "mlx_device")


def test_missing_mlx_vlm_environment_is_a_skip_line_with_its_reason(bundles, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVLM_PEER_CACHE", str(tmp_path / "no-peers"))  # nothing built there
    monkeypatch.delenv(external.MLX_VLM_ENV_VARIABLE, raising=False)
    scenario = Scenario((64, 32), 8, 4, 1, 1)
    found = other_library_peers(bundles["idefics3"], bundles["idefics3"], ["mlx-vlm", "ort-genai"], scenario,
                                str(tmp_path / "trace.npz"), None, 1, lambda m: None)
    mlx, ort = found
    assert mlx["kind"] == "mlx-vlm" and "metrics" not in mlx
    assert mlx["skipped"].startswith("no mlx-vlm environment at ") and "build_mlx_vlm_env.sh" in mlx["skipped"]
    # an explicit Python that is not there: the same kind of line, naming it
    mlx = other_library_peers(bundles["idefics3"], bundles["idefics3"], ["mlx-vlm"], scenario, "", "/nowhere/python",
                              1, lambda m: None)[0]
    assert "/nowhere/python is not an executable Python" in mlx["skipped"]
    # ONNX Runtime GenAI's builder has no Idefics3 (SmolVLM): its row says so, with the architectures it has
    assert ort["kind"] == "onnxruntime-genai" and ort["architecture"] == "Idefics3ForConditionalGeneration"
    assert ort["skipped"].startswith("its model builder has no Idefics3ForConditionalGeneration")
    assert "Qwen2_5_VLForConditionalGeneration" in ort["skipped"]
    table = rows({"runs": [], "peers": found})
    assert [r[0] for r in table] == [found[0]["name"], ort["name"]]
    assert all(r[1].startswith("skipped: ") for r in table)
    assert other_library_peers(bundles["idefics3"], bundles["idefics3"], ["torch", "llamacpp"], scenario, "", None, 1,
                               lambda m: None) == []  # not asked for: no rows


def test_ort_genai_row_for_a_builder_family_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    row = external.ort_genai_row(tmp_path)
    assert "builds only Qwen2_5_VLForConditionalGeneration's text decoder" in row["skipped"]


def test_the_checkpoint_is_adapted_for_mlx_vlm_without_changing_the_model(tmp_path):
    """mlx-vlm 0.7.10's idefics3 has no tied head and reads rope_theta only at the top of text_config: the peer hands
    its converter the checkpoint with lm_head.weight written as a copy of the embedding and rope_theta copied out
    of transformers 5's rope_parameters (the same model), the other files linked, the original untouched."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from edgevlm.bench.peers.mlx_vlm_child import adapted_checkpoint

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    embedding = np.arange(12, dtype=np.float32).reshape(4, 3)
    save_file({"model.text_model.embed_tokens.weight": embedding}, str(ckpt / "model.safetensors"))
    config = {"model_type": "idefics3", "tie_word_embeddings": True,
              "text_config": {"tie_word_embeddings": True, "rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}}
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "tokenizer.json").write_text("{}")
    source, adapted = adapted_checkpoint(ckpt, tmp_path / "adapted")
    assert source == tmp_path / "adapted" and "model.text_model.embed_tokens.weight" in adapted
    assert "rope_theta 100000 copied out of rope_parameters" in adapted
    weights = load_file(str(source / "model.safetensors"))
    assert np.array_equal(weights["lm_head.weight"], embedding)
    written = json.loads((source / "config.json").read_text())
    assert not written["tie_word_embeddings"] and not written["text_config"]["tie_word_embeddings"]
    assert written["text_config"]["rope_theta"] == 1e5
    assert (source / "tokenizer.json").is_symlink() and json.loads((ckpt / "config.json").read_text()) == config
    # a checkpoint with its own head and rope_theta where mlx-vlm reads it: converted as it is
    save_file({"model.text_model.embed_tokens.weight": embedding, "lm_head.weight": embedding},
              str(ckpt / "model.safetensors"))
    config["text_config"]["rope_theta"] = 1e5
    (ckpt / "config.json").write_text(json.dumps(config))
    assert adapted_checkpoint(ckpt, tmp_path / "again") == (ckpt, None)


def test_mlx_vlm_peer_row_in_the_bench(bundles, tmp_path, monkeypatch, capsys):
    """mlx-vlm converts the tiny checkpoint itself (its tied head written out: mlx-vlm's idefics3 has none),
    generates through its stream_generate and reports the row the bench's multimodal peers have, with top-1
    agreement against the PyTorch reference of the same run."""
    monkeypatch.setenv("EDGEVLM_PEER_CACHE", str(tmp_path / "peers"))
    out = tmp_path / "bench"
    code = main(["bench", str(bundles["idefics3"]), "--image-size", "64x32", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--repeats", "1", "--threads", "1", "--encoder", "onnx:fp32", "--decoder", "gguf:f32",
                 "--peers", "torch,mlx-vlm,ort-genai", "--mlx-vlm-python", sys.executable, "-o", str(out)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    peers = {p["kind"]: p for p in result["peers"]}
    assert set(peers) == {"mlx-vlm", "onnxruntime-genai"} and "skipped" in peers["onnxruntime-genai"]
    mlx = peers["mlx-vlm"]
    assert "skipped" not in mlx, mlx.get("skipped")
    assert mlx["isolated"] and mlx["python"] == sys.executable and mlx["name"].startswith("mlx-vlm 0.7.10 generate")
    m = mlx["metrics"]
    for metric in PEER_METRICS:
        assert metric in m, metric
    for metric in ("ttft_cold_ms", "ttft_warm_ms", "decode_tok_s"):
        assert set(m[metric]) == {"median", "min", "max"} and m[metric]["median"] > 0
    assert m["n_new_tokens"] == 4 and m["peak_rss_mb"] > 0 and m["mlx_device"].startswith("Device(cpu")
    assert "rope_theta" in m["checkpoint_adapted"]  # transformers 5 wrote the tiny checkpoint's in rope_parameters
    assert m["convert_s"] > 0  # converted by mlx-vlm in this run (cached for the next)
    drift = m["drift"]  # teacher-forced on the reference's 4 greedy tokens: float32 on both sides, so parity
    assert drift["n_tokens"] == 4 and drift["top1_agreement"] == 1.0 and drift["logits_nmse"] <= 1e-6, drift
    assert m["greedy_tokens_same_as_reference"] == 4  # (with rope_theta left at mlx-vlm's default: 0.75, 4e-5)
    # the same image with another question: what mlx-vlm's prompt cache kept (it reuses a prefix only when the rest
    # of the prompt is text: here the questions differ before the image, so nothing; on W1 the image comes first)
    assert 0 <= m["warm_reused_tokens"] < m["n_prompt_tokens"]
    ours = result["runs"][1]
    ratios = ours["vs_peers"][mlx["name"]]
    assert set(ratios) == {"decode_tok_s", "ttft_cold", "ttft_warm", "peak_rss"}
    md = (out / "bench.md").read_text()
    assert mlx["name"] in md and f"vs {mlx['name']}: cold TTFT" in md
    assert any(Path(p).name.startswith("idefics3-dtype-") for p in (tmp_path / "peers" / "mlx-vlm-models").iterdir())
