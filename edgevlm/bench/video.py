"""`edgevlm bench --video FILE | --video-seconds S`: the video workload. Per backend pair (and the PyTorch eager
reference, as the image bench runs it): cold TTFT on a clip (decoding the file included, as `run --video`), TTFT of
a second question on the same clip (its frames come from the embedding cache), and a stride run over a longer clip
(`edgevlm watch`'s rolling window: frames encoded and TTFT per answer). llama.cpp's own video path
(`llama-mtmd-cli`, which pipes frames from an `ffmpeg` executable) is a row (edgevlm/bench/mtmd_video.py), skipped
with its reason where either is missing."""
from __future__ import annotations

import datetime as dt
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..errors import BadInputError
from . import harness

MAX_SECONDS = 3600.0


@dataclass(frozen=True)
class VideoWorkload:
    """The clips (paths) and the stride run's window: `window_s` None = the clip's length, at most what the
    processor samples whole (max_frames / fps)."""

    clip: str
    stride_clip: str
    every_s: float = 2.0
    window_s: float | None = None
    generated: dict | None = None  # how the clips were written, when they were ({"seconds", "stride_seconds", ...})


def make_workload(folder: Path, video: str | None, seconds: float | None, stride_seconds: float | None,
                  every_s: float, window_s: float | None) -> VideoWorkload:
    """Check the options (one line each) and write the generated clips into `folder`."""
    if (video is None) == (seconds is None):
        raise BadInputError("pass --video FILE or --video-seconds S (a generated clip), one of them")
    for name, value in (("--video-seconds", seconds), ("--video-stride-seconds", stride_seconds)):
        if value is not None and not 0 < value <= MAX_SECONDS:
            raise BadInputError(f"{name} must be in (0, {MAX_SECONDS:g}], got {value}")
    if video is not None:
        from ..video.decode import probe_video

        probe_video(video)  # a bad file fails here, before any model loads
        if stride_seconds is not None:
            raise BadInputError("--video-stride-seconds applies to a generated clip; with --video FILE the stride "
                                "run slides over FILE")
        return VideoWorkload(str(video), str(video), every_s, window_s)
    from ..video.synthetic import DEFAULT_FPS, DEFAULT_SIZE, write_clip

    stride_seconds = stride_seconds or 3 * seconds
    clip = write_clip(Path(folder) / "clip.mp4", seconds)
    stride = write_clip(Path(folder) / "stride.mp4", stride_seconds, seed=1)
    generated = {"seconds": seconds, "stride_seconds": stride_seconds, "fps": DEFAULT_FPS,
                 "size": list(DEFAULT_SIZE), "content": "moving shapes (edgevlm.video.synthetic)"}
    return VideoWorkload(str(clip), str(stride), every_s, window_s, generated)


def default_window(video_spec, clip: str, window_s: float | None) -> float:
    if window_s is not None:
        return window_s
    from ..video.decode import probe_video

    return min(probe_video(clip).duration_s, video_spec.max_frames / video_spec.fps)


def measure_video(path: str | Path, encoder: str, decoder: str, scenario: harness.Scenario, workload: VideoWorkload,
                  progress: Callable[[str], None] = lambda m: None) -> dict:
    """One backend pair on the video workload: its run record."""
    import edgevlm

    from ..video.window import StreamSource, frame_counts, plan_window, watch

    reference = (encoder, decoder) == ("torch", "torch")
    label = "torch" if reference else f"{encoder} + {decoder}"
    extra = {"torch_dtype": scenario.torch_dtype} if reference else {}
    session = edgevlm.load(path, encoder=encoder, decoder=decoder, threads=scenario.threads, **extra,
                           **scenario.session_options())
    if session.spec.video is None:
        raise BadInputError("this model takes no video (video input: SmolVLM2, and Qwen2-VL/2.5-VL/3-VL where "
                            "supported); bench its images instead")
    questions = [harness.prompt_of(session.spec.tokenizer, scenario.prompt_tokens, v) for v in (0, 1)]
    kwargs = dict(max_tokens=scenario.new_tokens, stop_token_ids=[])
    progress(f"{label}: video warm-up")
    session.clear_caches()
    session.generate(prompt=questions[0], video=workload.clip, **kwargs)
    cold, second = [], []
    for i in range(scenario.repeats):
        progress(f"{label}: video repeat {i + 1}/{scenario.repeats}")
        session.clear_caches()
        session.forget_sequence()
        cold.append(session.generate(prompt=questions[0], video=workload.clip, **kwargs).timings)
        session.forget_sequence()  # a new request about the same clip: only the caches may help
        second.append(session.generate(prompt=questions[1], video=workload.clip, **kwargs).timings)
    plan = plan_window(session.spec.video, default_window(session.spec.video, workload.clip, workload.window_s),
                       workload.every_s)
    session.clear_caches()
    session.forget_sequence()

    def on_answer(answer) -> None:
        progress(f"{label}: stride answer {answer.index} at {answer.stream_time_s:.1f} s")

    with StreamSource(workload.stride_clip) as source:
        stride = watch(session, source.frames(), questions[0], plan, on_answer, generate_kwargs=kwargs)
    answers = [{k: a.to_dict()[k] for k in ("stream_time_s", "ttft_ms", "frames_encoded", "frames_reused",
                                            "reused_positions", "tokens")} for a in stride.answers]
    first = cold[0]
    metrics = {
        "n_frames": sum(frame_counts(first)), "n_image_tokens": first["n_image_tokens"],
        "n_prompt_tokens": first["n_prompt_tokens"],
        "ttft_cold_ms": harness.summary([t["ttft_ms"] for t in cold]),
        "encode_ms_cold": harness.summary([t["encode_ms"] for t in cold]),
        "prefill_ms_cold": harness.summary([t["prefill_ms"] for t in cold]),
        "ttft_second_question_ms": harness.summary([t["ttft_ms"] for t in second]),
        # the same clip: its frames' KV comes back from the prefix cache (positions unchanged), else their embeddings
        "second_question": {**dict(zip(("frames_encoded", "frames_reused"), frame_counts(second[0]))),
                            "prefix_cache_hits": int(second[0].get("prefix_cache_hits", 0)),
                            "reused_positions": int(second[0].get("n_reused_positions", 0))},
        "decode_tok_s": harness.summary([t["decode_tok_s"] for t in cold]),
        "stride": {"window_frames": plan.window_frames, "stride_frames": plan.stride_frames, "rate_fps": plan.rate,
                   "window_s": plan.window_s, "every_s": plan.every_s, "answers": answers,
                   "frames_encoded_per_answer": [a["frames_encoded"] for a in answers],
                   "ttft_ms_after_first": harness.summary([a["ttft_ms"] for a in answers[1:]])},
        "peak_rss_mb": harness.peak_rss_mb(),
    }
    if reference:
        dtype = str(session.decoder.model.dtype).removeprefix("torch.")
        name = "torch (transformers eager)" if dtype == "float32" else f"torch (transformers eager, {dtype})"
        return {"name": name, "kind": "reference", "encoder": "torch", "decoder": "torch", "metrics": metrics}
    return {"name": label, "kind": "edgevlm", "encoder": encoder, "decoder": decoder, "metrics": metrics}


def run_video_bench(path: str | Path, scenario: harness.Scenario, workload: VideoWorkload, encoders: str | None = None,
                    decoders: str | None = None, peers: str | None = "torch,llamacpp", target: str | None = None,
                    llamacpp_bin: str | None = None, progress: Callable[[str], None] = lambda m: None,
                    isolate: bool = True) -> dict:
    from ..loading import is_bundle
    from .run import checked_path_and_peers, plan_pairs, run_child

    path, peer_list = checked_path_and_peers(path, peers)
    pairs = plan_pairs(path, encoders, decoders, target)
    runs = []
    for encoder, decoder in ([("torch", "torch")] if "torch" in peer_list or not pairs else []) + pairs:
        progress("PyTorch reference (video)" if encoder == "torch" else f"{encoder} + {decoder} (video)")
        if isolate:
            request = {"workload": "video", "path": str(path), "encoder": encoder, "decoder": decoder,
                       "scenario": asdict(scenario), "video": asdict(workload)}
            runs.append(run_child(request, f"{encoder} + {decoder} (video)", progress))
        else:
            runs.append(measure_video(path, encoder, decoder, scenario, workload, progress))
    peer_rows = []
    if "llamacpp" in peer_list and is_bundle(path):
        from .mtmd_video import mtmd_video_row

        progress("llama-mtmd-cli (video)")
        gguf = next((d for _, d in pairs if d.startswith("gguf:")), None)
        frames = next((r["metrics"]["n_frames"] for r in runs if r["kind"] == "edgevlm"), None)
        peer_rows.append(mtmd_video_row(path, gguf, workload.clip, scenario, llamacpp_bin, frames, progress))
    reference = runs[0]["metrics"] if runs and runs[0]["kind"] == "reference" else None
    for run in runs[1:] if reference else []:
        m = run["metrics"]
        run["vs_reference"] = {key: _ratio(m, reference, key) for key in ("ttft_cold_ms", "ttft_second_question_ms")}
        run["vs_reference"]["stride_ttft_ms"] = (m["stride"]["ttft_ms_after_first"]["median"]
                                                 / reference["stride"]["ttft_ms_after_first"]["median"])
    return {
        "schema": harness.SCHEMA + "/video",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "path": str(path), "target": target or "cpu",
        "scenario": {"prompt_tokens": scenario.prompt_tokens, "new_tokens": scenario.new_tokens,
                     "repeats": scenario.repeats, "threads": scenario.threads, "torch_dtype": scenario.torch_dtype,
                     **scenario.session_options()},
        "video": {**asdict(workload), "clip": Path(workload.clip).name if workload.generated else workload.clip,
                  "stride_clip": (Path(workload.stride_clip).name if workload.generated else workload.stride_clip)},
        "machine": {**harness.machine(), "versions": harness.environment_versions()},
        "runs": runs, "peers": peer_rows,
    }


def _ratio(m: dict, reference: dict, key: str) -> float:
    return m[key]["median"] / reference[key]["median"]


COLUMNS = ("run", "frames", "prompt tok", "TTFT cold ms", "encode ms", "TTFT 2nd question ms", "2nd q. frames encoded",
           "2nd q. positions reused",
           "stride: frames encoded per answer", "stride: TTFT ms per answer", "stride TTFT median (after 1st)")


def rows(result: dict) -> list[list[str]]:
    out = []
    for run in result["runs"]:
        m, s = run["metrics"], run["metrics"]["stride"]
        out.append([run["name"], str(m["n_frames"]), str(m["n_prompt_tokens"]), f"{m['ttft_cold_ms']['median']:.0f}",
                    f"{m['encode_ms_cold']['median']:.0f}", f"{m['ttft_second_question_ms']['median']:.0f}",
                    str(m["second_question"]["frames_encoded"]), str(m["second_question"]["reused_positions"]),
                    " ".join(str(n) for n in s["frames_encoded_per_answer"]),
                    " ".join(f"{a['ttft_ms']:.0f}" for a in s["answers"]),
                    f"{s['ttft_ms_after_first']['median']:.0f}"])
    for peer in result["peers"]:
        if "skipped" in peer:
            out.append([peer["name"], "skipped: " + peer["skipped"], *["-"] * (len(COLUMNS) - 2)])
            continue
        m = peer["metrics"]  # one question per process: no second question, no stride run
        out.append([f"{peer['name']} ({peer['encoder']} + {peer['decoder']})", str(m["n_frames"]),
                    str(m["n_prompt_tokens"]), f"{m['ttft_cold_ms']['median']:.0f}",
                    f"{m['encode_ms_cold']['median']:.0f}", *["-"] * (len(COLUMNS) - 5)])
    return out


def ratios(result: dict) -> list[str]:
    lines = []
    for run in result["runs"]:
        v = run.get("vs_reference")
        if v:
            lines.append(f"{run['name']}: cold TTFT {v['ttft_cold_ms']:.2f}x, second question TTFT "
                         f"{v['ttft_second_question_ms']:.2f}x, stride TTFT {v['stride_ttft_ms']:.2f}x the PyTorch "
                         "reference")
    reference = next((r["metrics"] for r in result["runs"] if r["kind"] == "reference"), None)
    for peer in result["peers"]:
        if "metrics" in peer:
            m = peer["metrics"]
            against = (f" ({m['ttft_cold_ms']['median'] / reference['ttft_cold_ms']['median']:.2f}x the PyTorch "
                       "reference's)") if reference else ""
            lines.append(f"{peer['name']}: a fresh process per question, cold TTFT from process start{against}; "
                         f"{m['n_image_tokens']} image tokens, decode {m['decode_tok_s']['median']:.1f} tok/s, peak "
                         f"RSS {m['peak_rss_mb']:.0f} MB; {peer['sampling']}")
    return lines


def title(result: dict) -> str:
    v, s = result["video"], result["scenario"]
    clips = (f"generated {v['generated']['seconds']:g} s clip, stride over {v['generated']['stride_seconds']:g} s"
             if v["generated"] else f"{v['clip']}")
    stride = result["runs"][0]["metrics"]["stride"] if result["runs"] else None
    window = (f", window {stride['window_frames']} frames ({stride['window_s']:g} s at {stride['rate_fps']:g} fps) "
              f"every {stride['every_s']:g} s") if stride else ""
    return (f"{result['path']} | video: {clips}{window} | ~{s['prompt_tokens']} prompt tokens, {s['new_tokens']} new, "
            f"{s['threads']} threads, medians of {s['repeats']}")


def print_table(result: dict, console) -> None:
    from .report import show_table

    show_table(console, title(result), COLUMNS, rows(result), ratios(result))


def write(result: dict, out: Path, command: str) -> dict[str, Path]:
    import json

    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "bench.json", "markdown": out / "bench.md"}
    files["json"].write_text(json.dumps(result, indent=2) + "\n")
    machine = result["machine"]
    lines = [f"Command: `{command}`  ", f"Date: {result['date']}  ",
             f"Machine: {machine.get('cpu', machine.get('processor'))}, {machine['cpu_count']} cores, "
             f"{machine.get('memory_gib', '?')} GiB", "", title(result), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(result)] + [""] + [f"- {line}" for line in ratios(result)]
    files["markdown"].write_text("\n".join(lines) + "\n")
    return files


def scratch_folder():
    return tempfile.TemporaryDirectory(prefix="edgevlm-bench-video-")
