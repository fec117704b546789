"""The torch-free runtime: the bundle's tokenizer and chat template without transformers give transformers' ids,
text and rendering, and loading + running a bundle leaves torch and transformers unimported."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from edgevlm.runtimes.tokenizer import BundleTokenizer

TEXTS = [
    "", "Hello world", "  leading and trailing  ", "What colour is the circle?\nThe circle is red.\n\nEnd",
    "Ünïcödé 12345 \t tabs — and emoji 😀", "<image>What is this?<|im_end|>", "a<fake_token_around_image>b",
    "The quick brown fox jumps over the lazy dog 0123456789 !?., ;:'\"()[]{}", "\n\n\n", "don't I'm we're",
]
IMAGE = {"type": "image"}


def conversations() -> list[list[dict]]:
    def text(t):
        return {"type": "text", "text": t}

    return [
        [{"role": "user", "content": [IMAGE, text("What is in the picture?")]}],
        [{"role": "system", "content": [text("You are brief.")]},
         {"role": "user", "content": [IMAGE, text("Describe it.")]}],
        [{"role": "user", "content": [IMAGE, text("Colour?")]}, {"role": "assistant", "content": [text("Red.")]},
         {"role": "user", "content": [text("And the shape?")]}],
        [{"role": "user", "content": [IMAGE, IMAGE, text("Compare the two images.")]}],
        [{"role": "user", "content": [text("Before "), IMAGE, text(" after.")]}],
    ]


def _bundle_tokenizers(bundles) -> list[tuple[str, object, BundleTokenizer, str | None]]:
    from edgevlm.manifest import Manifest

    out = []
    for name, bundle in bundles.items():
        manifest = Manifest.load(bundle)
        folder = bundle / manifest.tokenizer["path"]
        out.append((name, AutoTokenizer.from_pretrained(folder, local_files_only=True), BundleTokenizer(folder),
                    manifest.tokenizer.get("chat_template")))
    return out


def test_ids_and_text_equal_transformers(bundles, ckpts, tmp_path):
    """Byte-level BPE (LLaVA, Idefics3) and SentencePiece with byte fallback (a Llama-2-style LLaVA): the same ids with
    and without special tokens, the same decoded text with and without skipping them."""
    import builders

    sentencepiece = builders.build_llava(tmp_path / "llava-sp", "clip", vocab="sentencepiece")
    hf_sp = AutoTokenizer.from_pretrained(sentencepiece)
    hf_sp.save_pretrained(tmp_path / "sp-tokenizer")
    cases = [(n, hf, ours) for n, hf, ours, _ in _bundle_tokenizers(bundles)]
    cases.append(("llava-sentencepiece", hf_sp, BundleTokenizer(tmp_path / "sp-tokenizer")))
    for name, hf, ours in cases:
        assert len(ours) == len(hf), name
        assert (ours.bos_token_id, ours.eos_token_id) == (hf.bos_token_id, hf.eos_token_id), name
        for text in TEXTS:
            for special in (True, False):
                ids = hf(text, add_special_tokens=special)["input_ids"]
                assert ours(text, add_special_tokens=special)["input_ids"] == ids, (name, text, special)
                for skip in (True, False):
                    assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (
                        name, text, skip)


def test_chat_templates_render_like_transformers(bundles):
    """Every family's template (ChatML for LLaVA, SmolVLM's for Idefics3, LLaVA-1.5's Vicuna format, the reference
    model's and the presets'), with images, a system message, multi-turn and two images."""
    from builders import LLAVA15_TEMPLATE

    from edgevlm.reference.tokenizers import CHATML_TEMPLATE, SMOLVLM_TEMPLATE

    import edgevlm.reference.tokenizers as reference_tokenizers

    templates = {"chatml": CHATML_TEMPLATE, "smolvlm": SMOLVLM_TEMPLATE, "llava-1.5": LLAVA15_TEMPLATE}
    templates |= {name: value for name, value in vars(reference_tokenizers).items()
                  if name.endswith("_TEMPLATE") and isinstance(value, str)}
    rendered = 0
    for name, hf, ours, bundle_template in _bundle_tokenizers(bundles):
        for template_name, template in {**templates, "bundle": bundle_template}.items():
            for messages in conversations():
                try:
                    expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                      add_generation_prompt=True)
                except Exception as exc:  # noqa: BLE001 - a template that refuses this conversation refuses in both
                    with pytest.raises(type(exc)):
                        ours.apply_chat_template(messages, chat_template=template, add_generation_prompt=True)
                    continue
                assert ours.apply_chat_template(messages, chat_template=template, add_generation_prompt=True) == \
                    expected, (name, template_name, messages)
                rendered += 1
    assert rendered >= 3 * 5 * 4


def test_loading_and_running_a_bundle_imports_neither_torch_nor_transformers(bundles, images, tmp_path):
    image = tmp_path / "image.png"
    images["small"].save(image)
    script = (
        "import json, sys\n"
        "import edgevlm\n"
        f"session = edgevlm.load({str(bundles['idefics3'])!r}, encoder='onnx:int8', decoder='gguf:q8_0', threads=1)\n"
        f"result = session.generate({str(image)!r}, 'What is in the picture?', max_tokens=4)\n"
        "print(json.dumps({'tokens': result.tokens, 'modules': sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'transformers'))}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["modules"] == [] and len(report["tokens"]) == 4


@pytest.mark.parametrize("command", ["run", "bench"])
def test_the_cli_runs_a_bundle_without_torch(command, bundles, images, tmp_path):
    """`edgevlm run` and `edgevlm bench` (without the PyTorch reference) on a bundle: Python's import log shows
    neither torch nor transformers."""
    image = tmp_path / "image.png"
    images["small"].save(image)
    args = {"run": ["--image", str(image), "--prompt", "What is it?", "--max-tokens", "3", "--threads", "1"],
            "bench": ["--peers", "llamacpp", "--repeats", "1", "--new-tokens", "2", "--prompt-tokens", "4",
                      "--image-size", "32x32", "--threads", "1", "--in-process", "-o", str(tmp_path / "bench")]}[command]
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgevlm", command, str(bundles["idefics3"]),
                          "--encoder", "onnx:int8", "--decoder", "gguf:q8_0", *args],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert not {"torch", "transformers"} & imported


def _imported(stderr: str) -> set[str]:
    """The modules Python's import log (-X importtime) shows as imported."""
    return {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def test_chat_runs_a_bundle_without_torch(bundles, images, tmp_path):
    """`edgevlm chat`: two turns (the first with an image) through stdin, then an empty line to quit."""
    image = tmp_path / "image.png"
    images["small"].save(image)
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgevlm", "chat", str(bundles["idefics3"]),
                          "--encoder", "onnx:int8", "--decoder", "gguf:q8_0", "--image", str(image),
                          "--max-tokens", "3", "--threads", "1"],
                         input="What is in the picture?\nAnd now?\n\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("vlm> ") == 2
    assert not {"torch", "transformers"} & _imported(run.stderr)


def test_serve_answers_without_torch(bundles, images):
    """`edgevlm serve` on 127.0.0.1 (a free port): one request with an image, then Ctrl-C; the import log covers
    start-up, the request and the shutdown."""
    import base64
    import io
    import re
    import signal
    import threading
    import urllib.request

    buffer = io.BytesIO()
    images["small"].save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "edgevlm", "serve", str(bundles["idefics3"]),
                                "--encoder", "onnx:int8", "--decoder", "gguf:q8_0", "--threads", "1",
                                "--host", "127.0.0.1", "--port", "0"], stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, process.kill)  # a server that never starts or never stops ends here
    watchdog.start()
    log = []
    try:
        for line in process.stderr:
            log.append(line)
            if "/v1/chat/completions" in line:
                break
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1/chat/completions", "".join(log[-1:]))
        assert match, "".join(log)[-2000:]
        body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "What is it?"}]}], "max_tokens": 3}
        request = urllib.request.Request(f"http://127.0.0.1:{match.group(1)}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            assert json.loads(response.read())["object"] == "chat.completion"
        process.send_signal(signal.SIGINT)
        log.append(process.communicate(timeout=60)[1])
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, "".join(log)[-2000:]
    assert not {"torch", "transformers"} & _imported("".join(log))


def test_device_install_does_not_pull_torch():
    """pyproject: the base dependencies and the `runtime` extra (what a device installs) name neither torch nor
    transformers; `export` does."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    device = names(project["dependencies"]) | names(project["optional-dependencies"]["runtime"])
    assert not device & {"torch", "transformers"}
    assert {"onnxruntime", "llama-cpp-python", "tokenizers", "jinja2"} <= device
    assert {"torch", "transformers"} <= names(project["optional-dependencies"]["export"])
    # nor opencv or datasets, with or without the MLX extra; mlx-vlm would pull all four (it is installed --no-deps)
    heavy = {"torch", "transformers", "opencv-python", "opencv-python-headless", "datasets", "mlx-vlm"}
    assert not (device | names(project["optional-dependencies"]["mlx"])) & heavy


def test_mlx_vlm_is_installed_without_its_dependencies():
    """scripts/setup-venv.sh (what `make setup` and CI run) installs mlx-vlm --no-deps at the version the seam pins;
    its declared dependencies are what that keeps out."""
    import re
    from importlib.metadata import requires, version
    from pathlib import Path

    from edgevlm.runtimes.mlx_vlm_seam import MLX_VLM_VERSION

    script = (Path(__file__).parents[1] / "scripts" / "setup-venv.sh").read_text()
    install = [line for line in script.splitlines() if "install" in line and "mlx-vlm==" in line]
    assert len(install) == 1 and "--no-deps" in install[0] and "MLX_VLM_VERSION" in install[0]
    # the version the line computes (its $(sed ...) read a file the pin had left, and pip got "mlx-vlm==")
    import subprocess

    command = re.search(r'mlx-vlm==\$\((.*)\)"', install[0]).group(1)
    computed = subprocess.run(["bash", "-c", command], cwd=Path(__file__).parents[1], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert computed == MLX_VLM_VERSION, (command, computed)
    assert version("mlx-vlm") == MLX_VLM_VERSION
    declared = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requires("mlx-vlm") or []}
    assert {"opencv-python", "datasets", "transformers"} <= declared


def test_mlx_vlm_language_modules_import_without_torch():
    """The seam loads mlx-vlm's qwen2_vl, qwen3_vl and gemma3 language modules with neither torch, transformers,
    opencv, datasets nor mlx-lm (through mlx_vlm's own packages they import transformers and torch)."""
    script = (
        "import json, sys, time\n"
        "start = time.perf_counter()\n"
        "from edgevlm.runtimes.mlx_vlm_seam import FAMILIES, import_language\n"
        "modules = [import_language(f) for f in FAMILIES.values()]\n"
        "seconds = time.perf_counter() - start\n"
        "print(json.dumps({'seconds': seconds, 'language': [m.__name__ for m in modules], 'heavy': sorted(m for m in "
        "sys.modules if m.split('.')[0] in ('torch', 'transformers', 'cv2', 'datasets', 'mlx_lm'))}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"mlx-vlm language modules imported in {report['seconds']:.2f} s")
    assert report["heavy"] == []
    assert report["language"] == [f"mlx_vlm.models.{f}.language" for f in ("qwen2_vl", "qwen3_vl", "gemma3")]


def test_a_runtime_only_install_names_the_extra_for_export(monkeypatch, capsys, tmp_path):
    """Without transformers (a device install), `edgevlm export` says which extra to install, in one line, exit 2."""
    import builtins

    from edgevlm.cli import main

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name.split(".")[0] == "transformers":
            raise ModuleNotFoundError("No module named 'transformers'", name="transformers")
        return real_import(name, *args, **kwargs)

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"architectures": ["Idefics3ForConditionalGeneration"]}')
    monkeypatch.setattr(builtins, "__import__", no_transformers)
    code = main(["export", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "edgevlm[export]" in err and "transformers" in err and "Traceback" not in err


def test_targets_imports_no_torch():
    """`edgevlm targets` (which every sweep node runs) names the GPU through CUDA's runtime or nvidia-smi, not torch."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgevlm", "targets", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not {"torch", "transformers"} & _imported(run.stderr)
    assert '"cuda_gpu"' in run.stdout
