"""llama.cpp's own video path as a row of `edgevlm bench --video`: `llama-mtmd-cli --video CLIP` on the bundle's
decoder GGUF and mmproj. What that path does, read from tools/mtmd/mtmd-helper.cpp and mtmd-cli.cpp of the llama.cpp
that llama-cpp-python 0.3.36 vendors:

- `--video` is an alias of `--image`: a file stb_image cannot read falls through to the video helper, which runs
  `ffprobe` (size, frame rate, duration) and then `ffmpeg -nostdin -i CLIP -vf fps=F -f rawvideo -pix_fmt rgb24 pipe:1`
  and reads whole RGB frames from the pipe. F is `--video-fps` (default 4); every sampled frame is kept, no cap.
- The frames go into the prompt where the media marker is: the text "Video:", then each frame as an ordinary image
  (for SmolVLM2's idefics3 projector: the global view plus the longest-edge tiles, as a still image is laid out), and a
  "[0m5.00s]" text every 5 s of clip (`--video-timestamp-interval`). HF's SmolVLMVideoProcessor samples 1 fps, at
  most 64 frames, one 512 px view per frame with "Frame from 00:00:" texts: the row says where the counts differ.

The CLI answers one question and exits, so every run is a fresh process and cold: TTFT is process start to the first
answer byte on stdout (mtmd-cli prints a newline there once the prompt is evaluated, then the answer; its logs go to
stderr), decode tok/s and prompt tokens come from its llama_perf lines, frames and image tokens from mtmd's
"encoding mtmd batch" / "decoding image batch" lines, peak RSS from wait4 (the CLI alone, not its ffmpeg child)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from . import harness

NAME = "llama-mtmd-cli video (llama.cpp's own path)"
KIND = "llama.cpp video"
DEFAULT_FPS = 4.0  # common_params::video_fps in the vendored llama.cpp
TIMEOUT_S = 600

_EVAL = re.compile(r"llama_perf_context_print:\s+eval time =\s*([\d.]+) ms /\s*(\d+) runs")
_PROMPT = re.compile(r"llama_perf_context_print:\s+prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_FRAME = re.compile(r"read_next_frame: frame \d+ read OK")  # mtmd-helper's debug line, one per frame piped in
_BATCH = re.compile(r"encoding mtmd batch, n_chunks = (\d+)")  # one chunk per view (tile) of a frame
_ENCODED = re.compile(r"mtmd batch encoding done in (\d+) ms")
_ERROR = re.compile(r"^[\d.]+ E (.*)$")  # common_log's prefix: time, level
_IMAGE_BATCH = re.compile(r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)")


def locate(llamacpp_bin: str | None) -> tuple[str | None, str | None]:
    """(llama-mtmd-cli's path, None), or (None, why the row is skipped): the video path needs ffprobe and ffmpeg."""
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            return None, (f"no {tool} executable on PATH (llama-mtmd-cli's video path probes the clip with ffprobe "
                          "and pipes frames from ffmpeg; apt-get install ffmpeg, brew install ffmpeg)")
    binary = shutil.which("llama-mtmd-cli", path=llamacpp_bin) if llamacpp_bin else shutil.which("llama-mtmd-cli")
    if binary is None:
        return None, "llama-mtmd-cli not found (pass --llamacpp-bin DIR; benchmarks/build_llama_bin.sh builds it)"
    return binary, None


def command(binary: str, gguf: Path, mmproj: Path, clip: str, question: str, fps: float, frame_tokens: int,
            threads: int, new_tokens: int) -> list[str]:
    """One greedy answer of `new_tokens` tokens (EOS ignored, so every run decodes as many) about the clip.
    --image-max-tokens caps each frame's tiling (the default tiles a 640x360 frame into 12 tiles + the global view,
    832 tokens a frame: 10 frames overflow SmolVLM2's 8,192 positions); -lv 5 makes mtmd-helper log each frame it
    reads (and llama_perf its timings), all on stderr."""
    return [binary, "-m", str(gguf), "--mmproj", str(mmproj), "--video", str(clip), "--video-fps", f"{fps:g}",
            "--image-max-tokens", str(frame_tokens), "-p", question, "-n", str(new_tokens), "--temp", "0",
            "--ignore-eos", "-t", str(threads), "-lv", "5"]


def faststart(clip: str | Path, folder: Path) -> Path:
    """The clip with its index (moov atom) first, streams copied (the same frames). mtmd-cli reads the file into
    memory and runs ffprobe on it through a pipe, which cannot seek to an index at the end (PyAV writes it there):
    ffprobe then reports width=0 and the CLI fails with "ffprobe failed on buffer". Other containers pass as they
    are."""
    clip = Path(clip)
    if clip.suffix.lower() not in (".mp4", ".mov", ".m4v"):
        return clip
    out = Path(folder) / f"faststart-{clip.name}"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(clip), "-c", "copy", "-movflags", "+faststart",
                    str(out)], check=True, capture_output=True, timeout=120)
    return out


def first_token_ms(chunks: list[tuple[float, bytes]], start: float) -> float | None:
    """Stdout as (arrival time, bytes) chunks -> ms from `start` to the first byte after the newline mtmd-cli prints
    once the prompt is evaluated (the answer's first token); None when no answer came."""
    seen_newline = False
    for stamp, data in chunks:
        for byte in data:
            if seen_newline:
                return (stamp - start) * 1e3
            seen_newline = byte == 0x0A
    return None


def parse_log(stderr: str) -> dict:
    """mtmd-cli's stderr -> frames, image tokens, encode ms, prompt tokens and decode rate (None where absent)."""
    views = [int(n) for n in _BATCH.findall(stderr)]
    frames = len(_FRAME.findall(stderr))
    image_tokens = [int(n) for n in _IMAGE_BATCH.findall(stderr)]
    evaluated, prompt = _EVAL.search(stderr), _PROMPT.search(stderr)
    eval_ms, runs = (float(evaluated.group(1)), int(evaluated.group(2))) if evaluated else (0.0, 0)
    return {"n_frames": frames or None, "n_views": sum(views) or None,
            "n_image_tokens": sum(image_tokens) if image_tokens else None,
            "encode_ms": float(sum(int(ms) for ms in _ENCODED.findall(stderr))) if views else None,
            "n_prompt_tokens": int(prompt.group(2)) if prompt else None,
            "decode_tok_s": runs / eval_ms * 1e3 if runs and eval_ms > 0 else None, "n_decoded": runs}


def failure_line(stderr: str) -> str:
    """The last error line of mtmd-cli's log without its timestamp (its debug lines would hide the cause), else its
    last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [m.group(1) for line in lines if (m := _ERROR.match(line))]
    return (errors or lines or ["no output"])[-1][:300]


def run_cli(argv: list[str], timeout_s: float = TIMEOUT_S) -> dict:
    """One llama-mtmd-cli process: its TTFT, parsed log, answer and peak RSS; raises RuntimeError with its last log
    line when it fails."""
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        chunks = []
        try:
            while data := os.read(process.stdout.fileno(), 4096):
                chunks.append((time.perf_counter(), data))
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
        finally:
            timer.cancel()
            process.stdout.close()
        log.seek(0)
        stderr = log.read().decode("utf-8", "replace")
    if process.returncode != 0:
        raise RuntimeError(f"exit {process.returncode}: {failure_line(stderr)}")
    ttft = first_token_ms(chunks, start)
    if ttft is None:
        raise RuntimeError("it printed no answer")
    return {"ttft_ms": ttft, **parse_log(stderr), "answer": b"".join(d for _, d in chunks).decode("utf-8", "replace"),
            "peak_rss_mb": usage.ru_maxrss / 1024}  # ru_maxrss: KiB on Linux


def sampling_note(fps: float, frames: int | None, processor_frames: int | None) -> str:
    """How llama.cpp's sampling and layout differ from the HF processor's, with the frame counts where they differ."""
    note = (f"--video-fps {fps:g} (the processor's rate; llama.cpp's default is {DEFAULT_FPS:g}), every frame at that "
            "rate with no frame cap; each frame laid out as a still image (the global view + tiles: --image-max-tokens "
            "caps it at one tile), \"Video:\" and a timestamp text every 5 s")
    if frames is not None and processor_frames is not None and frames != processor_frames:
        note += f": {frames} frames against the HF processor's {processor_frames}"
    return note


def mtmd_video_row(bundle: Path | None, decoder: str | None, clip: str, scenario: harness.Scenario,
                   llamacpp_bin: str | None, processor_frames: int | None = None,
                   progress: Callable[[str], None] = lambda m: None) -> dict:
    """The row: medians over `scenario.repeats` fresh processes after one warm-up (the page cache warm, as for the
    other runs), or a skip line saying why."""
    row = {"name": NAME, "kind": KIND}
    binary, reason = locate(llamacpp_bin)
    if reason is None and (bundle is None or decoder is None):
        reason = "no GGUF decoder in this run (llama-mtmd-cli reads the bundle's GGUF decoder and mmproj)"
    if reason is not None:
        return {**row, "skipped": reason}
    from ..manifest import Manifest
    from ..runtimes.bundle_loader import runtime_spec

    manifest = Manifest.load(bundle)
    mmprojs = manifest.mmproj_names()
    if not mmprojs:
        return {**row, "skipped": "the bundle has no mmproj (export it with --encoder gguf:f16 as well)"}
    gguf, projector = manifest.find("decoder", decoder), manifest.find("encoder", mmprojs[0])
    spec = runtime_spec(bundle, manifest)
    question = harness.prompt_of(spec.tokenizer, scenario.prompt_tokens, 0)  # the question edgevlm's runs ask
    fps = float(spec.video.fps) if spec.video is not None and spec.video.fps else DEFAULT_FPS
    frame_tokens = spec.video.tokens_per_frame(spec.layout.tokens_per_tile) if spec.video else 64
    runs = []
    try:
        with tempfile.TemporaryDirectory(prefix="edgevlm-mtmd-video-") as scratch:
            argv = command(binary, bundle / gguf.path, bundle / projector.path, str(faststart(clip, Path(scratch))),
                           question, fps, frame_tokens, scenario.threads, scenario.new_tokens)
            for i in range(scenario.repeats + 1):
                progress(f"llama-mtmd-cli video: {'warm-up' if i == 0 else f'repeat {i}/{scenario.repeats}'}")
                runs.append(run_cli(argv))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:  # a skip line, never a traceback
        return {**row, "skipped": f"{Path(binary).name} failed ({error})"}
    cold, first = runs[1:], runs[1]
    # bundle-relative paths: the record names no local folder
    shown = command("llama-mtmd-cli", Path(gguf.path), Path(projector.path), Path(argv[6]).name, question, fps,
                    frame_tokens, scenario.threads, scenario.new_tokens)
    return {**row, "encoder": mmprojs[0], "decoder": decoder, "command": shown,
            "metrics": {"n_frames": first["n_frames"], "n_views": first["n_views"],
                        "n_image_tokens": first["n_image_tokens"],
                        "n_prompt_tokens": first["n_prompt_tokens"], "video_fps": fps,
                        "ttft_cold_ms": harness.summary([r["ttft_ms"] for r in cold]),
                        "encode_ms_cold": harness.summary([r["encode_ms"] or 0.0 for r in cold]),
                        "decode_tok_s": harness.summary([r["decode_tok_s"] or 0.0 for r in cold]),
                        "n_new_tokens": first["n_decoded"] + 1,  # the first token comes from the prompt's logits
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in cold)},
            "sampling": sampling_note(fps, first["n_frames"], processor_frames)}
