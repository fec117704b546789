"""Bad input at the command line: exit code 2, one line naming the problem, no traceback, nothing written."""
from __future__ import annotations

import json
import shutil

import pytest

from bundle_checks import assert_clean_error, run_cli


@pytest.fixture()
def image_file(tmp_path, images):
    path = tmp_path / "img.png"
    images["small"].save(path)
    return path


def test_missing_image(capsys, ckpts):
    code, _, err = run_cli(capsys, "run", str(ckpts["llava-clip"]), "--image", "/no/such.png", "--prompt", "hi")
    assert_clean_error(code, err, "image not found", "/no/such.png")


def test_corrupt_image(capsys, ckpts, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    code, _, err = run_cli(capsys, "run", str(ckpts["llava-clip"]), "--image", str(bad), "--prompt", "hi")
    assert_clean_error(code, err, "bad.png")


def test_empty_prompt(capsys, ckpts, image_file):
    code, _, err = run_cli(capsys, "run", str(ckpts["llava-clip"]), "--image", str(image_file), "--prompt", "  ")
    assert_clean_error(code, err, "prompt is empty")


def test_prompt_longer_than_context(capsys, ckpts, image_file):
    long_prompt = "circle " * 600  # the tiny decoder has 512 positions
    code, _, err = run_cli(capsys, "run", str(ckpts["llava-clip"]), "--image", str(image_file), "--prompt", long_prompt)
    assert_clean_error(code, err, "decoder context is 512", "shorten the prompt")


@pytest.mark.parametrize("remove,needle", [
    ("config.json", "no config.json"),
    ("model.safetensors", "has no weights"),
    ("tokenizer.json", "has no tokenizer"),
    ("processor_config.json", "has no preprocessor_config.json"),
])
def test_incomplete_checkpoint(capsys, ckpts, tmp_path, image_file, remove, needle):
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpts["llava-clip"], broken)
    (broken / remove).unlink()
    code, _, err = run_cli(capsys, "run", str(broken), "--image", str(image_file), "--prompt", "hi")
    assert_clean_error(code, err, needle)


def test_unsupported_architecture(capsys, ckpts, tmp_path, image_file):
    other = tmp_path / "mllama"
    shutil.copytree(ckpts["llava-clip"], other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["MllamaForConditionalGeneration"]
    (other / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "run", str(other), "--image", str(image_file), "--prompt", "hi")
    assert_clean_error(code, err, "unsupported architecture MllamaForConditionalGeneration",
                       "Idefics3ForConditionalGeneration", "LlavaForConditionalGeneration")


def test_missing_checkpoint_folder(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nope"))
    assert_clean_error(code, err, "not found")


def test_bad_sampling_option(capsys, ckpts, image_file):
    code, _, err = run_cli(capsys, "run", str(ckpts["llava-clip"]), "--image", str(image_file), "--prompt", "hi",
                           "--top-p", "0")
    assert_clean_error(code, err, "top_p")


def test_run_json_output(capsys, ckpts, image_file):
    code, out, _ = run_cli(capsys, "run", str(ckpts["idefics3"]), "--image", str(image_file), "--prompt", "hi",
                           "--max-tokens", "5", "--json")
    assert code == 0
    data = json.loads(out.strip().splitlines()[-1])
    assert len(data["tokens"]) <= 5
    for key in ("preprocess_ms", "encode_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "n_image_tokens",
                "n_prompt_tokens", "embed_cache_hits", "prefix_cache_hits"):
        assert key in data["timings"]
    assert data["timings"]["n_image_tokens"] == 4 * 5  # 50x70 -> 2x2 tiles + global, 4 tokens each


def test_export_bad_options_write_nothing(capsys, ckpts, tmp_path):
    out = tmp_path / "bundle"
    code, _, err = run_cli(capsys, "export", str(ckpts["llava-clip"]), "-o", str(out), "--encoder", "onnx:int3")
    assert_clean_error(code, err, "int3", "fp32")
    code, _, err = run_cli(capsys, "export", str(ckpts["llava-clip"]), "-o", str(out), "--decoder", "safetensors:q4")
    assert_clean_error(code, err, "safetensors", "gguf")
    assert not out.exists()
    assert not list(tmp_path.glob(".bundle.partial-*"))
