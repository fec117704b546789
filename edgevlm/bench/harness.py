"""Benchmark scenarios: one bundle x target x image size x prompt length x new tokens, measured per backend pair
with warm-up first and medians over repeats; the PyTorch reference and llama.cpp peers in the same run."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import BadInputError
from ..machine import cpu_model, current_rss_mb, machine, parse_size, peak_rss_mb  # noqa: F401 - the bench's names

SCHEMA = "edgevlm-bench/1"
TORCH_DTYPES = ("float32", "auto")
FILLER = "Please look at the picture carefully and describe every shape, colour and position you can see in it"


@dataclass(frozen=True)
class Scenario:
    image_size: tuple[int, int] = (512, 512)  # (width, height)
    prompt_tokens: int = 24
    new_tokens: int = 64
    repeats: int = 5
    threads: int = 2
    n_ctx: int | None = None  # --n-ctx, --embed-cache-mb, --prefix-cache-mb: as for run/chat/serve
    embed_cache_bytes: int | None = None
    prefix_cache_bytes: int | None = None
    # the PyTorch reference's weights: "float32", or "auto" (as the checkpoint stores them: a 4B model's float32
    # copy, 17 GB, does not fit beside the rest on a 24 GiB machine)
    torch_dtype: str = "float32"
    flash_attn: bool | None = None  # --flash-attn on/off; None: the decoder's own choice (measured per CPU)

    def session_options(self) -> dict:
        names = ("n_ctx", "embed_cache_bytes", "prefix_cache_bytes", "flash_attn")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def job(self, spec):
        """The bench's requests as a job (runtimes/job_context.py): its two questions about its image, new_tokens
        each; a llama.cpp context opened without --n-ctx is sized to it."""
        from ..runtimes.job_context import Job

        questions = tuple(prompt_of(spec.tokenizer, self.prompt_tokens, v) for v in (0, 1))
        return Job(questions, (bench_image(self.image_size),), self.new_tokens)

    def __post_init__(self) -> None:
        if min(self.image_size) < 1 or self.prompt_tokens < 1 or self.new_tokens < 2 or self.repeats < 1 or self.threads < 1:
            raise BadInputError(f"invalid scenario {self}: sizes, tokens, repeats and threads must be positive "
                                "(new tokens >= 2, to time decoding)")
        if self.torch_dtype not in TORCH_DTYPES:
            raise BadInputError(f"--torch-dtype {self.torch_dtype!r}: choose from {', '.join(TORCH_DTYPES)}")
        limits = {"image side": (max(self.image_size), 16384), "prompt tokens": (self.prompt_tokens, 65536),
                  "new tokens": (self.new_tokens, 65536), "repeats": (self.repeats, 1000), "threads": (self.threads, 1024)}
        for name, (value, limit) in limits.items():
            if value > limit:
                raise BadInputError(f"{name} {value} is beyond what a benchmark can run (at most {limit})")


def bench_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    from ..reference import scenes

    return scenes.render(scenes.make_scene(7_000_000_000 + seed), size=max(size)).resize(size)


def prompt_of(tokenizer, n_tokens: int, variant: int = 0) -> str:
    """A question of about n_tokens text tokens (variant changes the first words, for warm-cache runs)."""
    words = (f"Question {variant}: " + FILLER + " ").split() * (n_tokens + 8)
    text = ""
    for word in words:
        candidate = (text + " " + word).strip()
        if len(tokenizer(candidate, add_special_tokens=False)["input_ids"]) > n_tokens:
            break
        text = candidate
    return text + "?"


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summary(values: list[float]) -> dict:
    return {"median": median(values), "min": min(values, default=float("nan")), "max": max(values, default=float("nan"))}


def memory_breakdown(session, bundle: Path | None, encoder: str, decoder: str, rss_before_load: float,
                     rss_after_load: float, peak_rss: float) -> dict:
    """Where a run's memory goes, in MiB: what the process held before loading (Python and the libraries it
    imported), what loading added, the parts edgevlm knows the size of (the decoder's weights as llama.cpp or the
    file holds them, its KV cache as allocated, the encoder graph file, the caches' contents), and the rest of the peak
    (ONNX Runtime's arena and activations, llama.cpp's compute buffers, Python objects)."""
    mib = 2**20
    out = {"before_load": rss_before_load, "load_added": rss_after_load - rss_before_load, "peak": peak_rss}
    from ..runtimes.llamacpp import LlamaSequence

    dec = session.decoder
    model_bytes = dec.model_bytes
    if model_bytes is None and bundle is not None and decoder != "torch":
        model_bytes = artifact_bytes(bundle, decoder)
    if model_bytes:
        out["decoder_weights"] = model_bytes / mib
    if bundle is not None and decoder.startswith("gguf"):
        from ..manifest import Manifest

        from ..plan.budget import kv_cache_bytes

        d = Manifest.load(bundle).decoder
        kv_type = dec.context.kv_type if isinstance(dec, LlamaSequence) else "f16"  # f32 in parity mode
        out["kv_cache_allocated"] = kv_cache_bytes(d.n_layers, d.n_kv_heads, d.head_dim, dec.n_ctx, kv_type) / mib
    graph_bytes = session.encoder.graph_bytes  # the one graph ONNX Runtime loaded
    if graph_bytes:
        out["encoder_graph"] = graph_bytes / mib
    out["caches_in_use"] = (session.embed_cache.bytes + session.prefix_cache.bytes) / mib
    known = sum(out.get(k, 0.0) for k in ("decoder_weights", "kv_cache_allocated", "encoder_graph", "caches_in_use"))
    out["rest_of_peak"] = peak_rss - rss_before_load - known
    return out


def run_session(session, scenario: Scenario, image: Image.Image, label: str, progress: Callable[[str], None]) -> dict:
    tokenizer = session.spec.tokenizer
    question, other = prompt_of(tokenizer, scenario.prompt_tokens, 0), prompt_of(tokenizer, scenario.prompt_tokens, 1)
    kwargs = dict(max_tokens=scenario.new_tokens, stop_token_ids=[])
    progress(f"{label}: warm-up")
    session.clear_caches()
    session.generate(image, question, **kwargs)
    cold, warm = [], []
    for i in range(scenario.repeats):
        progress(f"{label}: repeat {i + 1}/{scenario.repeats}")
        session.clear_caches()
        cold.append(session.generate(image, question, **kwargs).timings)
        session.forget_sequence()  # a new request: only the caches may help
        warm.append(session.generate(image, other, **kwargs).timings)  # same image, new question
    t0 = cold[0]
    n_prefill = t0["n_prompt_tokens"]
    prefill_ms = [t["prefill_ms"] for t in cold]
    metrics = {
        "preprocess_ms": summary([t["preprocess_ms"] for t in cold]),
        "encode_ms": summary([t["encode_ms"] for t in cold]),
        "encode_ms_per_tile": summary([t["encode_ms"] / max(t["n_tiles"], 1) for t in cold]),
        "n_tiles": t0["n_tiles"],
        "n_image_tokens": t0["n_image_tokens"],
        "n_prompt_tokens": n_prefill,
        "prefill_ms": summary(prefill_ms),
        "snapshot_ms": summary([t["snapshot_ms"] for t in cold]),  # saving the image prefix's KV state, cold runs
        "prefill_tok_s": n_prefill / (median(prefill_ms) / 1e3),
        "ttft_cold_ms": summary([t["ttft_ms"] for t in cold]),
        "ttft_warm_ms": summary([t["ttft_ms"] for t in warm]),
        "warm_prefix_cache_hits": sum(t["prefix_cache_hits"] for t in warm),
        "decode_tok_s": summary([t["decode_tok_s"] for t in cold]),
        # the warm requests' decode: the same loop, not right after a full-load encode (decode_tok_s is)
        "decode_tok_s_warm": summary([t["decode_tok_s"] for t in warm]),
        "n_new_tokens": t0["n_new_tokens"],
        "end_to_end_ms": summary([t["total_ms"] for t in cold]),
        "rss_mb": current_rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
    }
    context = getattr(session.decoder, "context", None)  # llama.cpp's: the context size and attention it ran with
    if context is not None and hasattr(context, "flash_attn_type"):
        metrics["n_ctx"] = context.n_ctx
        metrics["flash_attn"] = context.flash_attn_type != context.lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ab = decode_loop_vs_llama_decode(session, scenario, image, scenario.repeats)
    if ab is not None:
        metrics["decode_loop_vs_llama_decode"] = ab
    metrics["ttft_warm_over_cold"] = metrics["ttft_warm_ms"]["median"] / metrics["ttft_cold_ms"]["median"]
    metrics["snapshot_over_ttft_cold"] = metrics["snapshot_ms"]["median"] / metrics["ttft_cold_ms"]["median"]
    return metrics


def decode_loop_vs_llama_decode(session, scenario: Scenario, image: Image.Image, repeats: int) -> dict | None:
    """The session's per-token loop (decode, sampling, detokenizing) against llama_decode alone on the same context
    at the same positions, alternated in this process: what the loop adds, free of the drift between processes
    that a ratio to another program's run carries. None for decoders other than llama.cpp's."""
    from ..runtimes.llamacpp import LlamaSequence

    decoder = session.decoder
    if not isinstance(decoder, LlamaSequence):
        return None
    step, truncate = decoder.step, decoder.truncate
    question = prompt_of(session.spec.tokenizer, scenario.prompt_tokens, 0)
    loop, bare = [], []
    for _ in range(repeats):
        session.forget_sequence()
        result = session.generate(image, question, max_tokens=scenario.new_tokens, stop_token_ids=[])
        loop.append(result.timings["decode_tok_s"])
        depth = result.timings["n_prompt_tokens"]
        first = decoder.next_position - (decoder.n_past - depth)  # the prompt's next position (M-RoPE: its t)
        truncate(depth, first)
        times = []
        for i in range(max(scenario.new_tokens - 1, 1)):  # the loop's steps: the first token comes from prefill
            t0 = time.perf_counter()
            step(result.tokens[i % len(result.tokens)] if result.tokens else 0, first + i, False)
            times.append(time.perf_counter() - t0)
        bare.append(1 / median(times))
    session.forget_sequence()  # what the decoder holds is no longer the record's
    return {"loop_tok_s": summary(loop), "llama_decode_tok_s": summary(bare),
            "ratio": median([a / b for a, b in zip(loop, bare)])}


def save_trace(session, scenario: Scenario, image: Image.Image, path: str) -> None:
    """The reference's greedy tokens and logits on the bench prompt (what the other runs' drift is measured on)."""
    question = prompt_of(session.spec.tokenizer, scenario.prompt_tokens, 0)
    result = session.generate(image, question, max_tokens=scenario.new_tokens, stop_token_ids=[], return_logits=True)
    np.savez(path, tokens=np.asarray(result.tokens, dtype=np.int64), logits=np.stack(result.logits))  # (new, vocab)


def drift(session, scenario: Scenario, image: Image.Image, path: str) -> dict:
    """Teacher-forced on the reference's tokens: how often our top-1 equals the reference's, and the logit NMSE."""
    from ..metrics import nmse

    trace = np.load(path)
    question = prompt_of(session.spec.tokenizer, scenario.prompt_tokens, 0)
    logits = np.stack(session.teacher_forced_logits(image, question, trace["tokens"].tolist()))  # (new, vocab)
    reference = trace["logits"]
    return {"n_tokens": int(len(trace["tokens"])),
            "top1_agreement": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
            "logits_nmse": nmse(logits, reference)}


def environment_versions() -> dict:
    """Installed versions, read from package metadata: importing torch or transformers just to report their versions
    would put them in a torch-free run's process."""
    from importlib import metadata

    versions = {}
    for name, distribution in (("torch", "torch"), ("transformers", "transformers"), ("onnxruntime", "onnxruntime"),
                               ("llama_cpp", "llama-cpp-python"), ("mlx", "mlx"), ("mlx_lm", "mlx-lm"),
                               ("mlx_vlm", "mlx-vlm")):
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def llamacpp_python_peer(gguf: Path, scenario: Scenario, progress) -> dict:
    """llama.cpp's own generation loop through llama-cpp-python's high-level API, text only, same GGUF and threads."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=scenario.threads, n_threads_batch=scenario.threads,
                n_batch=512, verbose=False)
    prompt = " ".join(["shape"] * scenario.prompt_tokens)
    rates, ttfts = [], []
    for i in range(scenario.repeats + 1):
        progress(f"llama-cpp-python peer: {i}/{scenario.repeats}")
        llm.reset()
        start = time.perf_counter()
        stamps = []
        for _ in llm.create_completion(prompt, max_tokens=scenario.new_tokens, temperature=0.0, stream=True,
                                       logit_bias=None):
            stamps.append(time.perf_counter())
        if i == 0 or len(stamps) < 3:
            continue  # warm-up
        ttfts.append((stamps[0] - start) * 1e3)
        rates.append(1.0 / median(list(np.diff(stamps))))
    return {"decode_tok_s": summary(rates), "ttft_text_only_ms": summary(ttfts), "n_new_tokens": scenario.new_tokens}


def mtmd_prompts(bundle: Path, scenario: Scenario) -> tuple[list[str], str]:
    """The bench's two questions rendered by the bundle's chat template, with mtmd's media marker where edgevlm puts
    the image (rendered here, so that the peer's own process never imports transformers)."""
    from ..manifest import Manifest
    from ..runtimes.bundle_loader import runtime_spec
    from ..runtimes.prompt import render, user_message

    manifest = Manifest.load(bundle)
    spec = runtime_spec(bundle, manifest)
    texts = []
    for variant in (0, 1):
        question = prompt_of(spec.tokenizer, scenario.prompt_tokens, variant)
        texts.append(render(spec, [user_message(spec, question, 1)]))
    return texts, spec.layout.placeholder


def mtmd_peer(bundle: Path, decoder: str, mmproj: str, texts: list[str], placeholder: str, scenario: Scenario,
              progress: Callable[[str], None]) -> dict:
    """llama.cpp's own multimodal path in this process (edgevlm.bench.peers.mtmd: what llama-mtmd-cli and llama-server
    run) on the bundle's decoder GGUF and mmproj, same image, questions and threads as edgevlm's runs. Cold: an
    empty KV cache; warm: the same image with the other question, the prefix reused as llama-server's prompt cache
    does (mtmd still tokenizes and preprocesses the image, as the server does per request)."""
    from ..manifest import Manifest
    from .peers.mtmd import MtmdPipeline, image_token_bounds, media_prompt

    manifest = Manifest.load(bundle)
    gguf, projector = manifest.find("decoder", decoder), manifest.find("encoder", mmproj)
    gguf.verify(bundle)
    projector.verify(bundle)
    pipeline = MtmdPipeline(bundle / gguf.path, bundle / projector.path, n_ctx=scenario.n_ctx or 4096,
                            threads=scenario.threads, image_tokens=image_token_bounds(projector.details))
    rgb = np.asarray(bench_image(scenario.image_size))  # (H, W, 3) uint8, decoded once like edgevlm's runs
    kind = projector.details.get("projector_type", "")
    prompts = [media_prompt(text, placeholder, kind, pipeline.marker) for text in texts]

    def ask(text: str, reuse: bool) -> dict:
        start = time.perf_counter()
        tokenized = pipeline.tokenize(text, [rgb])
        tokenized_at = time.perf_counter()
        done = pipeline.prefill(tokenized, reuse=reuse)
        tokens, stamps = pipeline.generate(scenario.new_tokens)
        steps = np.diff(stamps) * 1e3
        result = {"tokenize_ms": (tokenized_at - start) * 1e3, "ttft_ms": (stamps[0] - start) * 1e3,
                  "decode_tok_s": 1e3 / median(list(steps)) if len(steps) else 0.0, "n_new_tokens": len(tokens),
                  "n_tiles": sum(c.kind == "image" for c in tokenized.chunks),
                  "n_image_tokens": sum(c.n_tokens for c in tokenized.chunks if c.kind == "image"),
                  "n_prompt_tokens": tokenized.n_pos, **done}
        pipeline.free(tokenized)
        return result

    progress(f"llama.cpp mtmd peer ({mmproj} + {decoder}): warm-up")
    pipeline.clear()
    ask(prompts[0], reuse=False)
    cold, warm = [], []
    for i in range(scenario.repeats):
        progress(f"llama.cpp mtmd peer: repeat {i + 1}/{scenario.repeats}")
        pipeline.clear()
        cold.append(ask(prompts[0], reuse=False))
        warm.append(ask(prompts[1], reuse=True))  # same image, new question
    pipeline.close()
    first = cold[0]
    return {
        "tokenize_ms": summary([c["tokenize_ms"] for c in cold]),  # mtmd's tokenizer + image preprocessing
        "encode_ms_per_tile": summary([sum(c["encode_ms"]) / max(c["encoded_tiles"], 1) for c in cold]),
        "n_tiles": first["n_tiles"], "n_image_tokens": first["n_image_tokens"],
        "n_prompt_tokens": first["n_prompt_tokens"],
        "prefill_decode_ms": summary([c["decode_ms"] for c in cold]),
        "ttft_cold_ms": summary([c["ttft_ms"] for c in cold]),
        "ttft_warm_ms": summary([w["ttft_ms"] for w in warm]),
        "warm_reused_positions": warm[0]["reused_positions"],  # the same every repeat
        "warm_encoded_tiles": sum(w["encoded_tiles"] for w in warm),
        "decode_tok_s": summary([c["decode_tok_s"] for c in cold]),
        "n_new_tokens": first["n_new_tokens"],
        "rss_mb": current_rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
    }


def llama_bench_peer(binary: str, gguf: Path, scenario: Scenario, depth: int = 0, flash_attn: bool | None = None) -> dict:
    """llama-bench on the GGUF: pp (prompt tokens) and tg (new tokens) rates. Its defaults generate from position 0
    with flash attention auto (on for a CPU); depth / flash_attn run it where edgevlm's decode runs instead (after
    `depth` positions, flash attention as edgevlm sets it)."""
    import json
    import subprocess

    command = [binary, "-m", str(gguf), "-p", str(scenario.prompt_tokens), "-n", str(scenario.new_tokens),
               "-t", str(scenario.threads), "-r", str(scenario.repeats), "-o", "json"]
    if depth:
        command += ["-d", str(int(depth))]
    if flash_attn is not None:
        command += ["-fa", "on" if flash_attn else "off"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600)
    rows = json.loads(out.stdout)
    result = {}
    for row in rows:
        key = "decode_tok_s" if row.get("n_gen") else "prefill_tok_s"
        result[key] = {"median": row["avg_ts"], "min": row["avg_ts"] - row["stddev_ts"], "max": row["avg_ts"] + row["stddev_ts"]}
    return result


def artifact_bytes(bundle: Path | None, name: str) -> int | None:
    if bundle is None or name == "torch":
        return None
    from ..manifest import Manifest

    manifest = Manifest.load(bundle)
    role = "decoder" if name.split(":")[0] in ("gguf", "mlx") else ("engine" if name.startswith("tensorrt") else "encoder")
    return manifest.find(role, name).bytes
