"""The mlx-vlm benchmark peer, run as a script by the peer's own Python (benchmarks/build_mlx_vlm_env.sh builds that
environment): mlx-vlm converts the checkpoint itself (`mlx_vlm.convert`), loads it (`mlx_vlm.load`) and generates
through its own `stream_generate` (what `mlx_vlm.generate` drives), with its own processor and prompt cache.

It imports nothing from edgevlm (the peer's environment does not have it): argv[1] is a JSON request, progress lines
go to stderr with the bench's prefix, the record is the last stdout line.
Request: checkpoint, mlx_path (the converted model, made here when missing), quantize (null | 4 | 8 bits), image (a
PNG path), texts (the bench's two prompts, rendered by edgevlm's chat template with the image placeholder), new_tokens,
repeats, trace (the PyTorch reference's .npz of greedy tokens and logits, or null)."""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

PROGRESS = "edgevlm-progress: "  # edgevlm.bench.run.CHILD_PROGRESS (this file cannot import it)


def progress(message: str) -> None:
    print(PROGRESS + message, file=sys.stderr, flush=True)


def summary(values: list[float]) -> dict:
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def peak_rss_mb() -> float:
    """VmHWM, as edgevlm.machine.peak_rss_mb: ru_maxrss would also count the bench's peak at fork time."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # bytes on macOS


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def adapted_checkpoint(checkpoint: Path, scratch: Path) -> tuple[Path, str | None]:
    """The checkpoint as mlx-vlm 0.7.10 can read it, the model unchanged: (folder to convert, what was changed or None).
    - rope_theta: its configs read `rope_theta` at the top of text_config and ignore transformers 5's
      `rope_parameters` (idefics3 then silently runs with its default 1e6, not SmolVLM's 1e5): copied up.
    - a tied head: its idefics3/smolvlm language model always has its own lm_head, so a checkpoint without
      lm_head.weight fails to load ("Missing 1 parameters: language_model.lm_head.weight"): written out as a copy
      of the embedding, the same function.
    The changed copy lives in `scratch` (other files linked); the checkpoint itself is never touched."""
    config = json.loads((checkpoint / "config.json").read_text())
    changes = []
    for section in (config, config.get("text_config")):
        rope = (section or {}).get("rope_parameters") or {}
        if "rope_theta" in rope and "rope_theta" not in section:
            section["rope_theta"] = rope["rope_theta"]
            changes.append(f"rope_theta {rope['rope_theta']:g} copied out of rope_parameters")
    text = config.get("text_config") or {}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    files = sorted(checkpoint.glob("*.safetensors"))
    weights, embedding = None, []
    if tied and len(files) == 1:
        from safetensors.numpy import load_file

        weights = load_file(str(files[0]))
        embedding = [k for k in weights if k.endswith("embed_tokens.weight")]
        if any(k.endswith("lm_head.weight") for k in weights) or len(embedding) != 1:
            weights = None
    if weights is not None:
        weights["lm_head.weight"] = weights[embedding[0]]
        config["tie_word_embeddings"] = False
        if text:
            text["tie_word_embeddings"] = False
        changes.append(f"lm_head.weight written as a copy of the tied {embedding[0]}")
    if not changes:
        return checkpoint, None
    scratch.mkdir(parents=True, exist_ok=True)
    rewritten = {"config.json"} | ({files[0].name} if weights is not None else set())
    for item in checkpoint.iterdir():
        if item.name not in rewritten and not (scratch / item.name).exists():
            (scratch / item.name).symlink_to(item.resolve())
    if weights is not None:
        from safetensors.numpy import save_file

        save_file(weights, str(scratch / files[0].name), metadata={"format": "pt"})
    (scratch / "config.json").write_text(json.dumps(config, indent=2))
    return scratch, "; ".join(changes) + f" (for mlx-vlm's {config.get('model_type')})"


def convert_once(checkpoint: str, mlx_path: Path, quantize: int | None) -> tuple[float | None, str | None]:
    """mlx-vlm's own converter on the checkpoint: (seconds it took, or None when the converted model was already
    there; the adaptation adapted_checkpoint made, if any). The adaptation is remembered beside the converted model."""
    note = mlx_path / "edgevlm-peer-note.json"
    if (mlx_path / "config.json").is_file():
        return None, json.loads(note.read_text())["adapted"] if note.is_file() else None
    import shutil

    from mlx_vlm.convert import convert

    start = time.perf_counter()
    partial = mlx_path.with_name(mlx_path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    source, adapted = adapted_checkpoint(Path(checkpoint), mlx_path.with_name(mlx_path.name + ".adapted"))
    convert(hf_path=str(source), mlx_path=str(partial), quantize=quantize is not None, q_bits=quantize or 4)
    note_text = json.dumps({"checkpoint": checkpoint, "adapted": adapted})
    (partial / note.name).write_text(note_text)
    if adapted:
        shutil.rmtree(source)
    partial.rename(mlx_path)  # an interrupted conversion leaves no half model behind under the final name
    return time.perf_counter() - start, adapted


class NeverStop:
    """A stopping criterion that never fires: every run generates exactly new_tokens, as edgevlm's runs do."""

    def __call__(self, token) -> bool:
        return False

    def reset(self, eos_token_ids=None) -> None:
        pass


def ask(model, processor, text: str, image, new_tokens: int, state) -> dict:
    """One request through mlx-vlm's stream_generate (greedy); the time of each token as it is yielded."""
    from mlx_vlm import stream_generate

    processor.tokenizer.stopping_criteria = NeverStop()
    start = time.perf_counter()
    stamps, tokens, last = [], [], None
    for response in stream_generate(model, processor, text, image=[image], max_tokens=new_tokens, temperature=0.0,
                                    prompt_cache_state=state):
        last = response
        if response.finish_reason is None:  # the closing response repeats the last token with the finish reason
            stamps.append(time.perf_counter())
            tokens.append(int(response.token))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft_ms": (stamps[0] - start) * 1e3, "decode_tok_s": 1.0 / statistics.median(steps) if steps else 0.0,
            "tokens": tokens, "n_prompt_tokens": int(last.prompt_tokens), "cached_tokens": int(last.cached_tokens)}


def teacher_forced_drift(model, processor, text: str, image, trace: str) -> dict:
    """The reference's greedy tokens fed after the prompt in one forward: how often mlx-vlm's top-1 is the
    reference's, and the logit NMSE (the bench's drift, as edgevlm's runs report it)."""
    import mlx.core as mx
    import numpy as np
    from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

    reference = np.load(trace)
    ref_tokens, ref_logits = reference["tokens"], reference["logits"]  # (new,), (new, vocab)
    inputs = prepare_inputs(processor, images=[image], prompts=text,
                            image_token_index=getattr(model.config, "image_token_index", None),
                            add_special_tokens=should_add_special_tokens(model.config.model_type, processor))
    prompt_ids = inputs["input_ids"]  # (1, n_prompt)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    fed = mx.concatenate([prompt_ids, mx.array(ref_tokens[None, :-1].astype(np.int32))], axis=1)
    out = model(fed, inputs["pixel_values"], mask=None, **extra)
    n = prompt_ids.shape[1]
    logits = np.array(out.logits[0, n - 1:n - 1 + len(ref_tokens)].astype(mx.float32))  # (new, vocab)
    if logits.shape[-1] != ref_logits.shape[-1]:  # a padded vocabulary: compare the reference's ids only
        logits = logits[:, :ref_logits.shape[-1]]
    err = float(np.sum((logits - ref_logits) ** 2) / max(np.sum(ref_logits ** 2), 1e-30))
    return {"n_tokens": int(len(ref_tokens)), "top1_agreement": float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1))),
            "logits_nmse": err}


def run(request: dict) -> dict:
    import importlib.util
    from importlib import metadata

    import mlx.core as mx

    from mlx_vlm import load
    from mlx_vlm.generate import PromptCacheState
    from PIL import Image

    mlx_path = Path(request["mlx_path"])
    model_type = json.loads((Path(request["checkpoint"]) / "config.json").read_text()).get("model_type")
    if importlib.util.find_spec(f"mlx_vlm.models.{model_type}") is None:
        return {"skipped": f"mlx-vlm {metadata.version('mlx-vlm')} has no model {model_type!r}"}
    progress(f"mlx-vlm: converting {request['checkpoint']}" if not (mlx_path / "config.json").is_file()
             else "mlx-vlm: loading")
    convert_s, adapted = convert_once(request["checkpoint"], mlx_path, request.get("quantize"))
    rss_before_load = current_rss_mb()
    model, processor = load(str(mlx_path))
    rss_after_load = current_rss_mb()
    image = Image.open(request["image"]).convert("RGB")
    texts, new_tokens = request["texts"], int(request["new_tokens"])
    trace = request.get("trace") if request.get("trace") and Path(request["trace"]).is_file() else None
    drift = None
    if trace:  # the drift pass runs the image and the prompt once more: it is also the warm-up
        progress("mlx-vlm: drift (and warm-up)")
        drift = teacher_forced_drift(model, processor, texts[0], image, trace)
    else:
        progress("mlx-vlm: warm-up")
        ask(model, processor, texts[0], image, 2, None)
    cold, warm = [], []
    for i in range(int(request["repeats"])):
        progress(f"mlx-vlm: repeat {i + 1}/{request['repeats']}")
        state = PromptCacheState()  # cold: an empty prompt cache
        cold.append(ask(model, processor, texts[0], image, new_tokens, state))
        warm.append(ask(model, processor, texts[1], image, new_tokens, state))  # same image, new question
    record = {
        "ttft_cold_ms": summary([c["ttft_ms"] for c in cold]),
        "ttft_warm_ms": summary([w["ttft_ms"] for w in warm]),
        "warm_reused_tokens": warm[0]["cached_tokens"],  # mlx-vlm's PromptCacheState: the shared prefix it kept
        "decode_tok_s": summary([c["decode_tok_s"] for c in cold]),
        "decode_tok_s_warm": summary([w["decode_tok_s"] for w in warm]),
        "n_prompt_tokens": cold[0]["n_prompt_tokens"],
        "n_new_tokens": len(cold[0]["tokens"]),
        "load_added_mb": rss_after_load - rss_before_load,
        "rss_mb": current_rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
        "convert_s": convert_s,  # null: converted by an earlier run (cached)
        "checkpoint_adapted": adapted,
        "quantize_bits": request.get("quantize"),
        "mlx_device": str(mx.default_device()),
        "versions": {name: metadata.version(name) for name in ("mlx", "mlx-vlm", "transformers")},
    }
    if drift is not None:
        import numpy as np

        record["drift"] = drift
        reference_tokens = [int(t) for t in np.load(trace)["tokens"]]
        same = next((i for i, (a, b) in enumerate(zip(cold[0]["tokens"], reference_tokens)) if a != b),
                    min(len(cold[0]["tokens"]), len(reference_tokens)))
        record["greedy_tokens_same_as_reference"] = same  # how many leading greedy tokens equal the reference's
    return record


def main() -> int:
    record = run(json.loads(sys.argv[1]))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
