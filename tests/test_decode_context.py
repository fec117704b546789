"""Issue 32 deliverable 5: llama.cpp decodes at its own benchmark's rate without the user choosing how. A job known
before loading (run, eval, bench) gets a context of its size; flash attention is measured once per CPU (keyed like
the llama-cpp-python wheel) and read back from its cache; --flash-attn on/off overrides it. Behaviour only: no timings
are asserted (the measurement's rates are whatever this machine gives)."""
from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("llama_cpp")

import edgevlm  # noqa: E402
from edgevlm.runtimes.job_context import CONTEXT_MULTIPLE, Job, round_context  # noqa: E402
from edgevlm.runtimes.llamacpp import flash_choice, open_decoder  # noqa: E402


@pytest.fixture()
def fa_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVLM_CACHE_DIR", str(tmp_path))
    return tmp_path / "flash-attn"


def _gguf(bundles, name="gguf:q8_0"):
    from edgevlm.manifest import Manifest

    bundle = bundles["llava-siglip"]
    return bundle / Manifest.load(bundle).find("decoder", name).path


def _enabled(decoder) -> bool:
    context = decoder.context
    return context.flash_attn_type != context.lib.LLAMA_FLASH_ATTN_TYPE_DISABLED


def test_round_context():
    assert round_context(1, 4096) == CONTEXT_MULTIPLE == 256
    assert round_context(256, 4096) == 256 and round_context(257, 4096) == 512
    assert round_context(5000, 4096) == 4096  # never past the model's context
    with pytest.raises(ValueError):
        round_context(0, 4096)


def test_a_job_refuses_what_it_cannot_size_in_one_line():
    """`run --max-tokens -1` reached Job before the session's own check and ended in a ValueError traceback (the CLI
    fuzz found it): a job's bad input is a one-line BadInputError, exit 2."""
    from edgevlm.errors import BadInputError
    from edgevlm.runtimes.job_context import Job

    with pytest.raises(BadInputError, match="--max-tokens 1 or more"):
        Job(("q",), (), -1)
    with pytest.raises(BadInputError, match="at least one question"):
        Job((), (), 8)


def test_the_context_is_sized_to_the_job(bundles, images, fa_cache):
    """The longest of the job's requests (template, text and image positions, as the session counts them) plus its
    max tokens, rounded up to 256: what `run`, `eval` and `bench` open instead of the default 4,096."""
    bundle = bundles["llava-siglip"]
    questions = ("What is this?", "Describe every shape, colour and position in the picture " * 6)
    job = Job(questions, (images["small"],), 100)
    session = edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:q8_0", job=job)
    longest = max(len(session.prepare([session.user_message(q, 1)], [images["small"]]).prompt) for q in questions)
    assert job.positions(session.spec) == longest + 100
    from edgevlm.manifest import Manifest

    model_context = Manifest.load(bundle).decoder.context_length
    assert session.decoder.n_ctx == min(-(-(longest + 100) // 256) * 256, model_context)
    assert longest + 100 <= session.decoder.n_ctx
    result = session.generate(images["small"], questions[1], max_tokens=100, stop_token_ids=[])
    assert result.timings["n_prompt_tokens"] == longest and len(result.tokens) == 100  # the job fits its context
    # --n-ctx wins over the job; no job: the default
    assert edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:q8_0", job=job, n_ctx=384).decoder.n_ctx == 384
    assert edgevlm.load(bundle, encoder="onnx:fp32", decoder="gguf:q8_0").decoder.n_ctx == min(4096, model_context)


def test_eval_job_lists_the_questions_evaluate_asks():
    from edgevlm.reference import evaluate

    job = evaluate.evaluation_job(9)
    asked = [qa.question for _, qa in evaluate.asked_questions(9)]
    assert len(asked) == 9 and set(job.questions) == set(asked) and len(job.images) == 1
    assert job.max_tokens == evaluate.MAX_ANSWER_TOKENS


def test_flash_attention_is_measured_once_and_read_back(bundles, fa_cache):
    gguf = _gguf(bundles)
    before = flash_choice.measurements_run
    first = open_decoder(gguf, n_ctx=256, threads=1)
    assert flash_choice.measurements_run == before + 1
    files = list(fa_cache.glob("*.json"))
    assert len(files) == 1
    key, parts = flash_choice.wheel_key(first.context.lib)
    assert files[0].name == f"{key}.json" and set(parts) == {"llama_cpp_python", "build", "cpu_flags", "arch"}
    data = json.loads(files[0].read_text())
    (entry_key, entry), = data["choices"].items()
    assert entry_key == flash_choice.entry_key(first.context.model, 256)
    assert entry["flash_attn"] == _enabled(first) and entry["on_tok_s"] > 0 and entry["off_tok_s"] > 0
    written = files[0].read_bytes()

    again = open_decoder(gguf, n_ctx=200, threads=1)  # the same context class: read back, not measured
    assert flash_choice.measurements_run == before + 1 and files[0].read_bytes() == written
    assert _enabled(again) == entry["flash_attn"]
    # what the file says is what the next context gets (the cache is the decision, whichever way it went)
    measured = entry["flash_attn"]
    data["choices"][entry_key]["flash_attn"] = not measured
    files[0].write_text(json.dumps(data))
    assert _enabled(open_decoder(gguf, n_ctx=256, threads=1)) is (not measured)
    assert flash_choice.measurements_run == before + 1

    open_decoder(gguf, n_ctx=1024, threads=1)  # another context class: its own entry
    assert flash_choice.measurements_run == before + 2
    assert len(json.loads(files[0].read_text())["choices"]) == 2


def test_a_shared_pool_of_sequences_gets_flash_attention_without_measuring(bundles, fa_cache):
    """serve --parallel N: the sequences share one KV pool, where the flash kernel skips the others' (masked) cells and
    the plain path does not: on, whatever a one-sequence measurement would say; an override still wins."""
    gguf = _gguf(bundles)
    before = flash_choice.measurements_run
    assert _enabled(open_decoder(gguf, n_ctx=256, threads=1, n_seq=4))
    assert not _enabled(open_decoder(gguf, n_ctx=256, threads=1, n_seq=4, flash_attn=False))
    assert flash_choice.measurements_run == before and not fa_cache.exists()


def test_the_override_and_parity_mode_measure_nothing(bundles, fa_cache):
    gguf = _gguf(bundles)
    before = flash_choice.measurements_run
    assert _enabled(open_decoder(gguf, n_ctx=256, threads=1, flash_attn=True))
    assert not _enabled(open_decoder(gguf, n_ctx=256, threads=1, flash_attn=False))
    assert not _enabled(open_decoder(gguf, n_ctx=256, threads=1, parity=True))
    assert flash_choice.measurements_run == before and not fa_cache.exists()
    # the flag as run/serve/eval/bench parse it, through load()
    from edgevlm.commands.common import flash_attn_option

    assert flash_attn_option(argparse.Namespace(flash_attn="auto")) == {}
    option = flash_attn_option(argparse.Namespace(flash_attn="off"))
    assert option == {"flash_attn": False}
    session = edgevlm.load(bundles["llava-siglip"], encoder="onnx:fp32", decoder="gguf:q8_0", **option)
    assert not _enabled(session.decoder)
    session = edgevlm.load(bundles["llava-siglip"], encoder="onnx:fp32", decoder="gguf:q8_0",
                           **flash_attn_option(argparse.Namespace(flash_attn="on")))
    assert _enabled(session.decoder) and flash_choice.measurements_run == before


def test_run_command_opens_the_job_sized_context(bundles, images, tmp_path, fa_cache, monkeypatch, capsys):
    """`edgevlm run` passes its prompt, images and --max-tokens as the job (no --n-ctx)."""
    from edgevlm.cli import main
    from edgevlm.runtimes import bundle_loader

    opened = []
    real = bundle_loader.make_decoder

    def recording(*args, **kwargs):
        opened.append(kwargs.get("n_ctx"))
        return real(*args, **kwargs)

    monkeypatch.setattr(bundle_loader, "make_decoder", recording)
    from edgevlm.manifest import Manifest

    path = tmp_path / "small.png"
    images["small"].save(path)
    bundle = bundles["llava-siglip"]
    assert main(["run", str(bundle), "--image", str(path), "--prompt", "What is this?", "--max-tokens", "8",
                 "--decoder", "gguf:q8_0", "--encoder", "onnx:fp32", "--json"]) == 0
    expected = Job(("What is this?",), (images["small"],), 8).positions(
        bundle_loader.runtime_spec(bundle, Manifest.load(bundle)))
    assert opened == [round_context(expected, Manifest.load(bundle).decoder.context_length)]
    assert opened[0] < Manifest.load(bundle).decoder.context_length  # not the default (the whole model context)


def test_eval_command_opens_the_job_sized_context(bundles, fa_cache, monkeypatch, capsys):
    """`edgevlm eval` sizes the context to the questions it will ask (all of them, with a scene image)."""
    from edgevlm.cli import main
    from edgevlm.manifest import Manifest
    from edgevlm.reference.evaluate import evaluation_job
    from edgevlm.runtimes import bundle_loader

    opened = []
    real = bundle_loader.make_decoder
    monkeypatch.setattr(bundle_loader, "make_decoder",
                        lambda *a, **k: opened.append(k.get("n_ctx")) or real(*a, **k))
    bundle = bundles["llava-siglip"]
    assert main(["eval", str(bundle), "--n", "3", "--json", "--encoder", "onnx:fp32", "--decoder", "gguf:q8_0"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 3
    manifest = Manifest.load(bundle)
    positions = evaluation_job(3).positions(bundle_loader.runtime_spec(bundle, manifest))
    assert opened == [round_context(positions, manifest.decoder.context_length)]
