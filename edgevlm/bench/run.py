"""`edgevlm bench`: run every requested backend pair and the peers, then write JSON, markdown and a plot."""
from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import BadInputError
from . import harness
from ..machine import measure_bandwidth_gbs, measure_read_bandwidth_gbs
from ..plan.roofline import gguf_weight_bytes_per_token, kv_bytes_per_token, roofline, torch_weight_bytes_per_token

PEERS = ("torch", "llamacpp", "mlx-vlm", "ort-genai")
CHILD_PROGRESS = "edgevlm-progress: "  # prefix of the progress lines an isolated run writes to its stderr


def _list(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def checked_path_and_peers(path: str | Path, peers: str | None) -> tuple[Path, list[str]]:
    """The bench's path (it must exist) and its --peers list (each one of PEERS), or a one-line error."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(f"{path} does not exist; pass a checkpoint folder or a bundle")
    peer_list = _list(peers)
    for peer in peer_list:
        if peer not in PEERS:
            raise BadInputError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    return path, peer_list


def plan_pairs(path: Path, encoders: str | None, decoders: str | None, target: str | None) -> list[tuple[str, str]]:
    from ..loading import is_bundle
    from ..manifest import Manifest

    if not is_bundle(path):
        return []
    manifest = Manifest.load(path)
    runnable = manifest.names("encoder", runnable=True)
    enc = _list(encoders) or [n for n in runnable if n != "onnx:fp16"] or runnable
    dec = _list(decoders) or manifest.names("decoder")
    if target == "cpu":
        dec = [d for d in dec if d.startswith("gguf")]
    elif target == "apple-silicon":
        dec = [d for d in dec if d.startswith("mlx")]
    for name in enc:
        if name not in runnable + manifest.names("engine"):
            raise BadInputError(f"the bundle has no encoder {name!r} edgevlm runs; it has {', '.join(runnable)} (an "
                                "mmproj is measured as the llama.cpp mtmd peer)")
    for name in dec:
        if name not in manifest.names("decoder"):
            raise BadInputError(f"the bundle has no decoder {name!r}; it has {', '.join(manifest.names('decoder'))}")
    return [(e, d) for e in enc for d in dec]


def roofline_for(session, bandwidth: float, bundle: Path | None, decoder_name: str, context: int,
                 measured_tok_s: float) -> dict | None:
    """Bytes one decode step reads against the read bandwidth measured on the decoder's threads: the weights it
    multiplies by (every tensor but the token-embedding table it gathers one row from; a tied table is counted once,
    as llama.cpp's output head reads all of it) and the KV cache at `context` positions."""
    if decoder_name == "torch":
        weights = torch_weight_bytes_per_token(session.decoder.model)
        kv_value_bytes = float(session.decoder.model.dtype.itemsize)  # the KV cache holds the weights' dtype
    elif decoder_name.startswith("gguf"):
        from ..manifest import Manifest

        weights = gguf_weight_bytes_per_token(bundle / Manifest.load(bundle).find("decoder", decoder_name).path)
        kv_value_bytes = 2.0  # llama.cpp's default f16 KV
    else:
        return None
    d = _decoder_shape(session, bundle)
    kv = kv_bytes_per_token(d["n_layers"], d["n_kv_heads"], d["head_dim"], context, kv_value_bytes)
    return roofline(bandwidth, weights, kv, measured_tok_s).to_dict()


def _decoder_shape(session, bundle: Path | None) -> dict:
    if bundle is not None:
        from ..manifest import Manifest

        d = Manifest.load(bundle).decoder
        return {"n_layers": d.n_layers, "n_kv_heads": d.n_kv_heads, "head_dim": d.head_dim}
    c = session.decoder.model.config
    return {"n_layers": c.num_hidden_layers, "n_kv_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads}


def measure(path: str | Path, encoder: str, decoder: str, scenario: harness.Scenario, bandwidth: float,
            progress: Callable[[str], None] = lambda m: None, trace: str | None = None, accuracy_n: int = 0) -> dict:
    """One backend pair: load, warm up, repeat; returns its run record.

    trace: a .npz path. The PyTorch reference writes its greedy tokens and logits on the bench prompt there; every
    other run reads them and reports its drift (top-1 agreement and logit NMSE, teacher-forced on those tokens).
    accuracy_n: also score this many reference-scene questions (`edgevlm eval`; meaningful for the reference model)."""
    import edgevlm
    from ..loading import is_bundle

    path = Path(path)
    bundle = path if is_bundle(path) else None
    image = harness.bench_image(scenario.image_size)
    reference = (encoder, decoder) == ("torch", "torch")
    label = "torch" if reference else f"{encoder} + {decoder}"
    rss_before_load = harness.current_rss_mb()
    if reference:
        session = edgevlm.load(path, encoder="torch", decoder="torch", threads=scenario.threads,  # same threads as ours
                               torch_dtype=scenario.torch_dtype, **scenario.session_options())
    else:
        job = None
        if bundle is not None and scenario.n_ctx is None:  # the context sized to the bench's requests
            from ..manifest import Manifest
            from ..runtimes.bundle_loader import runtime_spec

            job = scenario.job(runtime_spec(bundle, Manifest.load(bundle)))
        session = edgevlm.load(path, encoder=encoder, decoder=decoder, threads=scenario.threads, job=job,
                               **scenario.session_options())
    rss_after_load = harness.current_rss_mb()
    metrics = harness.run_session(session, scenario, image, label, progress)
    metrics["memory"] = harness.memory_breakdown(session, bundle, encoder, decoder, rss_before_load, rss_after_load,
                                                 metrics["peak_rss_mb"])
    context = metrics["n_prompt_tokens"] + scenario.new_tokens // 2
    rl = roofline_for(session, bandwidth, bundle, decoder, context, metrics["decode_tok_s"]["median"])
    if trace:
        progress(f"{label}: drift")
        if reference:
            harness.save_trace(session, scenario, image, trace)
        elif Path(trace).is_file():
            metrics["drift"] = harness.drift(session, scenario, image, trace)
    if accuracy_n:
        from ..reference.evaluate import evaluate

        progress(f"{label}: {accuracy_n} reference-scene questions")
        report = evaluate(session, n=accuracy_n)
        metrics["task_accuracy"] = {"accuracy": report["accuracy"], "n": report["n"], "per_type": report["per_type"]}
    if reference:
        dtype = str(session.decoder.model.dtype).removeprefix("torch.")
        name = "torch (transformers eager)" if dtype == "float32" else f"torch (transformers eager, {dtype})"
        return {"name": name, "kind": "reference", "encoder": "torch", "decoder": "torch", "torch_dtype": dtype,
                "metrics": metrics, "roofline": rl, "sizes": {}}
    return {"name": label, "kind": "edgevlm", "encoder": encoder, "decoder": decoder,
            "encoder_backend": session.encoder.name, "metrics": metrics, "roofline": rl,
            "sizes": {"encoder_bytes": harness.artifact_bytes(bundle, encoder),
                      "decoder_bytes": harness.artifact_bytes(bundle, decoder)}}


def measure_isolated(path: str | Path, encoder: str, decoder: str, scenario: harness.Scenario, bandwidth: float,
                     progress: Callable[[str], None] = lambda m: None, trace: str | None = None,
                     accuracy_n: int = 0) -> dict:
    """`measure` in a child process (edgevlm.bench.child): progress comes back on its stderr, the record on stdout."""
    import dataclasses

    request = {"path": str(path), "encoder": encoder, "decoder": decoder, "bandwidth": bandwidth,
               "scenario": dataclasses.asdict(scenario), "trace": trace, "accuracy_n": accuracy_n}
    return run_child(request, f"{encoder} + {decoder}", progress)


def run_child(request: dict, label: str, progress: Callable[[str], None]) -> dict:
    """One request to edgevlm.bench.child in a fresh process: progress comes back on its stderr, the record on
    stdout."""
    import json
    import subprocess
    import sys

    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen([sys.executable, "-m", "edgevlm.bench.child", json.dumps(request)], stdout=out,
                                 stderr=subprocess.PIPE, text=True)
        tail: list[str] = []
        for line in child.stderr:
            if line.startswith(CHILD_PROGRESS):
                progress(line[len(CHILD_PROGRESS):].strip())
            else:
                tail = (tail + [line.rstrip()])[-8:]
        child.wait()
        out.seek(0)
        lines = out.read().strip().splitlines()
    if child.returncode != 0 or not lines:
        detail = "\n".join(tail)
        raise RuntimeError(f"the benchmark run {label} failed in its child process (exit {child.returncode}):\n{detail}")
    record = json.loads(lines[-1])
    if "error" in record:
        from .. import errors

        raise getattr(errors, record.get("type", ""), BadInputError)(record["error"])
    record["isolated"] = True
    return record


def mtmd_peers(bundle: Path, pairs: list[tuple[str, str]], scenario: harness.Scenario, isolate: bool,
               progress: Callable[[str], None]) -> list[dict]:
    """llama.cpp's own multimodal path on each benchmarked GGUF decoder with the bundle's mmproj (f16 first, as
    llama.cpp's converter writes it by default)."""
    import dataclasses

    from ..manifest import Manifest

    mmprojs = Manifest.load(bundle).mmproj_names()
    decoders = sorted({d for _, d in pairs if d.startswith("gguf")})
    if not decoders:
        return []
    if not mmprojs:
        how = "export it with --encoder gguf:f16 to measure llama.cpp's own multimodal path"
        return [{"name": "llama.cpp mtmd (in-process)", "skipped": f"the bundle has no mmproj; {how}"}]
    texts, placeholder = harness.mtmd_prompts(bundle, scenario)
    runs = []
    for decoder in decoders:
        label = f"llama.cpp mtmd ({mmprojs[0]} + {decoder})"
        progress(label)
        if isolate:
            request = {"peer": "mtmd", "path": str(bundle), "decoder": decoder, "mmproj": mmprojs[0], "texts": texts,
                       "placeholder": placeholder, "scenario": dataclasses.asdict(scenario)}
            metrics = run_child(request, label, progress)
            metrics.pop("isolated", None)
        else:
            metrics = harness.mtmd_peer(bundle, decoder, mmprojs[0], texts, placeholder, scenario, progress)
        runs.append({"name": label, "kind": "llama.cpp mtmd", "decoder": decoder, "encoder": mmprojs[0],
                     "metrics": metrics, "isolated": isolate})
    return runs


def other_library_peers(path: Path, bundle: Path | None, peer_list: list[str], scenario: harness.Scenario, trace: str,
                        mlx_vlm_python: str | None, repeats: int, progress: Callable[[str], None]) -> list[dict]:
    """mlx-vlm and ONNX Runtime GenAI on the bundle's source checkpoint, each in its own environment and process
    (edgevlm.bench.peers.external), or their rows with the reason they did not run."""
    from .peers import external

    if not {"mlx-vlm", "ort-genai"} & set(peer_list):
        return []
    checkpoint = path
    if bundle is not None:
        from ..manifest import Manifest

        checkpoint = Path(Manifest.load(bundle).source["path"])
    if not (checkpoint / "config.json").is_file():
        reason = f"the source checkpoint {checkpoint} is gone (these peers build their own model from it)"
        names = {"mlx-vlm": "mlx-vlm", "ort-genai": "onnxruntime-genai"}
        return [{"name": names[p], "kind": names[p], "skipped": reason} for p in peer_list if p in names]
    rows = []
    if "mlx-vlm" in peer_list:
        python, why_not = external.find_mlx_vlm_python(mlx_vlm_python)
        if bundle is None:
            python, why_not = None, "runs on a bundle (its chat template renders the bench's prompts)"
        texts = harness.mtmd_prompts(bundle, scenario)[0] if python else []
        progress("mlx-vlm peer")
        rows.append(external.mlx_vlm_row(checkpoint, texts, harness.bench_image(scenario.image_size),
                                         scenario.new_tokens, repeats, trace, python, why_not, progress))
    if "ort-genai" in peer_list:
        rows.append(external.ort_genai_row(checkpoint))
    return rows


def planner_prediction(bundle: Path, encoder: str, decoder: str, scenario: harness.Scenario,
                       context: int | None = None) -> dict | None:
    """`edgevlm plan`'s figures for this pair on this machine and the bench's workload (at the context the run
    opened), beside what it measured ({"error": ...} where the planner cannot say)."""
    from ..errors import EdgeVLMError
    from ..plan.bundle import PlanRequest, predict_pair
    from ..plan.devices import THIS_MACHINE, get_device

    try:
        request = PlanRequest(image_size=tuple(scenario.image_size), prompt_tokens=scenario.prompt_tokens,
                              new_tokens=scenario.new_tokens, context=context or scenario.n_ctx,
                              embed_cache_bytes=scenario.embed_cache_bytes,
                              prefix_cache_bytes=scenario.prefix_cache_bytes)
        return predict_pair(bundle, encoder, decoder, get_device(THIS_MACHINE), request)
    except (EdgeVLMError, OSError, ValueError) as exc:
        return {"error": str(exc)}


def edgevlm_flash_attention() -> bool:
    """Whether a llama.cpp context opened without a choice runs flash attention here (runs that recorded the
    choice their decoder made, measured per CPU, use that instead)."""
    from ..backends import require_llama_cpp
    from ..runtimes.llamacpp.context import flash_attention_type

    llama_cpp = require_llama_cpp()
    return flash_attention_type(llama_cpp, None) != llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED


def run_bench(path: str | Path, scenario: harness.Scenario, encoders: str | None = None, decoders: str | None = None,
              peers: str | None = "torch,llamacpp", target: str | None = None, llamacpp_bin: str | None = None,
              progress: Callable[[str], None] = lambda m: None, isolate: bool = True, accuracy_n: int = 0,
              mlx_vlm_python: str | None = None, peer_repeats: int | None = None) -> dict:
    """isolate: each backend pair runs in a fresh Python process, so its peak RSS is its own (ru_maxrss covers a
    whole process: in one process every run would inherit the peaks of the runs before it).
    mlx_vlm_python: the Python of the mlx-vlm peer's environment (default: benchmarks/build_mlx_vlm_env.sh's);
    peer_repeats: repeats of the other libraries' peers (mlx-vlm), default the scenario's."""
    from ..loading import is_bundle

    path, peer_list = checked_path_and_peers(path, peers)
    if target not in (None, "cpu", "cuda", "jetson-orin", "apple-silicon"):
        raise BadInputError(f"unknown target {target!r}; see `edgevlm targets`")
    if accuracy_n < 0:
        raise BadInputError(f"--accuracy must be a number of questions >= 0, got {accuracy_n}")
    if peer_repeats is not None and not 1 <= peer_repeats <= 1000:
        raise BadInputError(f"--peer-repeats must be 1..1000, got {peer_repeats}")
    bundle = path if is_bundle(path) else None
    pairs = plan_pairs(path, encoders, decoders, target)
    progress("measuring memory bandwidth")
    bandwidth = measure_bandwidth_gbs()  # copy, one core: the figure the planner's efficiencies were fitted against
    read_bandwidth = measure_read_bandwidth_gbs(scenario.threads)  # the roofline's: what decoding does
    plan = [("torch", "torch")] if "torch" in peer_list or not pairs else []
    runs: list[dict] = []
    library_peers: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgevlm-bench-") as scratch:
        trace = str(Path(scratch) / "reference-trace.npz")
        for encoder, decoder in plan + pairs:
            label = "PyTorch reference" if (encoder, decoder) == ("torch", "torch") else f"{encoder} + {decoder}"
            progress(label)
            run = measure_isolated if isolate else measure
            runs.append(run(path, encoder, decoder, scenario, read_bandwidth, progress, trace, accuracy_n))
        library_peers = other_library_peers(path, bundle, peer_list, scenario, trace, mlx_vlm_python,
                                            peer_repeats or scenario.repeats, progress)
    peer_runs = []
    if "llamacpp" in peer_list and bundle is not None:
        from ..manifest import Manifest

        manifest = Manifest.load(bundle)
        for decoder in sorted({d for _, d in pairs if d.startswith("gguf")}):
            gguf = bundle / manifest.find("decoder", decoder).path
            progress(f"llama-cpp-python peer on {decoder}")
            peer_runs.append({"name": f"llama-cpp-python generate ({decoder})", "decoder": decoder,
                              "metrics": harness.llamacpp_python_peer(gguf, scenario, progress)})
            bench_binary = shutil.which("llama-bench", path=llamacpp_bin) if llamacpp_bin else shutil.which("llama-bench")
            if bench_binary:
                peer_runs.append({"name": f"llama-bench ({decoder})", "decoder": decoder,
                                  "metrics": harness.llama_bench_peer(bench_binary, gguf, scenario)})
                # the same where edgevlm decodes: after its prompt (image rows included), its flash-attention setting
                ours = [r["metrics"] for r in runs if r.get("decoder") == decoder]
                depth = max((m["n_prompt_tokens"] for m in ours), default=0)
                if depth:
                    fa = next((m["flash_attn"] for m in ours if "flash_attn" in m), None)
                    fa = edgevlm_flash_attention() if fa is None else fa
                    peer_runs.append({"name": f"llama-bench ({decoder}, tg after {depth} positions, flash attention "
                                              f"{'on' if fa else 'off'} as edgevlm)", "decoder": decoder,
                                      "depth": depth, "flash_attn": fa,
                                      "metrics": harness.llama_bench_peer(bench_binary, gguf, scenario, depth, fa)})
            else:
                peer_runs.append({"name": f"llama-bench ({decoder})", "decoder": decoder, "skipped":
                                  "llama-bench not found on PATH (pass --llamacpp-bin DIR)"})
        peer_runs += mtmd_peers(bundle, pairs, scenario, isolate, progress)
    peer_runs += library_peers
    reference = runs[0]["metrics"] if runs and runs[0]["kind"] == "reference" else None
    if reference:
        for run in runs[1:]:
            m = run["metrics"]
            run["vs_reference"] = {
                "ttft_cold": m["ttft_cold_ms"]["median"] / reference["ttft_cold_ms"]["median"],
                "decode_tok_s": m["decode_tok_s"]["median"] / reference["decode_tok_s"]["median"],
                "encode_ms_per_tile": m["encode_ms_per_tile"]["median"] / reference["encode_ms_per_tile"]["median"],
            }
            if "task_accuracy" in m and "task_accuracy" in reference:
                run["vs_reference"]["accuracy_points"] = 100 * (m["task_accuracy"]["accuracy"]
                                                                - reference["task_accuracy"]["accuracy"])
    for run in runs:
        if run["kind"] != "edgevlm":
            continue
        run["prediction"] = planner_prediction(path, run["encoder"], run["decoder"], scenario,
                                               run["metrics"].get("n_ctx"))
        m = run["metrics"]
        for peer in peer_runs:
            whole_model = peer.get("kind") in ("llama.cpp mtmd", "mlx-vlm")  # image to tokens, as edgevlm's runs
            if (peer.get("decoder") != run["decoder"] and peer.get("kind") != "mlx-vlm") or "metrics" not in peer:
                continue
            ratios = {"decode_tok_s": m["decode_tok_s"]["median"] / peer["metrics"]["decode_tok_s"]["median"]}
            if whole_model:  # edgevlm over the peer's own multimodal path: < 1 is faster
                pm = peer["metrics"]
                ratios |= {"ttft_cold": m["ttft_cold_ms"]["median"] / pm["ttft_cold_ms"]["median"],
                           "ttft_warm": m["ttft_warm_ms"]["median"] / pm["ttft_warm_ms"]["median"],
                           "peak_rss": m["peak_rss_mb"] / pm["peak_rss_mb"]}
            run.setdefault("vs_peers", {})[peer["name"]] = ratios
    return {
        "schema": harness.SCHEMA,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "path": str(path),
        "target": target or "cpu",
        "scenario": {"image_size": list(scenario.image_size), "prompt_tokens": scenario.prompt_tokens,
                     "new_tokens": scenario.new_tokens, "repeats": scenario.repeats, "threads": scenario.threads,
                     "torch_dtype": scenario.torch_dtype, **scenario.session_options()},
        "machine": {**harness.machine(), "bandwidth_gbs": bandwidth, "read_bandwidth_gbs": read_bandwidth,
                    "read_bandwidth_threads": scenario.threads, "versions": harness.environment_versions()},
        "runs": runs,
        "peers": peer_runs,
    }


def encoder_only(path: str | Path, tiles: int = 1, repeats: int = 5, threads: int = 2, progress=lambda m: None) -> dict:
    """Per-tile encode latency: PyTorch eager vs every ONNX encoder of the bundle, same inputs, one run."""
    import numpy as np
    import torch

    from ..manifest import Manifest
    from ..runtimes.bundle_loader import make_encoder, source_checkpoint

    path = Path(path)
    manifest = Manifest.load(path)
    ckpt = source_checkpoint(manifest)
    torch.set_num_threads(threads)
    pixels = np.random.default_rng(0).normal(size=(tiles, *manifest.encoder.input_shape[1:])).astype(np.float32)
    rows = []
    encoders = [("torch eager fp32", make_encoder(path, manifest, "torch", ckpt=ckpt))]
    encoders += [(n, make_encoder(path, manifest, n, threads=threads)) for n in manifest.names("encoder", runnable=True)]
    import time

    for label, encoder in encoders:
        progress(label)
        encoder.encode(pixels)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            encoder.encode(pixels)
            times.append((time.perf_counter() - start) * 1e3 / tiles)
        rows.append({"encoder": label, "backend": encoder.name, "ms_per_tile": harness.summary(times)})
    base = rows[0]["ms_per_tile"]["median"]
    for row in rows:
        row["vs_torch"] = row["ms_per_tile"]["median"] / base
    return {"schema": harness.SCHEMA + "/encoder", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "path": str(path), "tiles": tiles, "repeats": repeats, "threads": threads,
            "machine": {**harness.machine(), "versions": harness.environment_versions()}, "runs": rows}
