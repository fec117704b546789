"""Peers from other libraries, each in its own environment and process: mlx-vlm (converts and generates the
checkpoint itself, edgevlm.bench.peers.mlx_vlm_child run by the peer's Python) and ONNX Runtime GenAI (its model
builder decides which families it can build). A peer that cannot run is a row with the reason, never an absence."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

from ...mlx_vlm_modules import MLX_VLM_VERSION  # one pin: the seam's modules and the peer (build_mlx_vlm_env.sh)
CONVERT_RECIPE = 2  # mlx_vlm_child.adapted_checkpoint's version: a change converts afresh (2: rope_theta copied out)
MLX_VLM_ENV_VARIABLE = "EDGEVLM_MLX_VLM_PYTHON"
CHILD_SCRIPT = Path(__file__).with_name("mlx_vlm_child.py")
PROGRESS = "edgevlm-progress: "  # edgevlm.bench.run.CHILD_PROGRESS

# onnxruntime-genai 0.18.0, onnxruntime_genai/models/builder.py (create_model's architecture dispatch): the
# multimodal architectures its model builder knows. For these it builds the text decoder only (taking
# inputs_embeds); the vision and embedding models come from per-model example scripts in its repository, not from
# the builder in the wheel.
ORT_GENAI_VERSION = "0.18.0"
ORT_GENAI_VLM_ARCHITECTURES = ("Gemma3ForConditionalGeneration", "Lfm2VlForConditionalGeneration",
                               "Mistral3ForConditionalGeneration", "Phi3VForCausalLM", "Phi4MMForCausalLM",
                               "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                               "Qwen3_5ForConditionalGeneration")


def cache_root() -> Path:
    return Path(os.environ.get("EDGEVLM_PEER_CACHE", Path.home() / ".cache" / "edgevlm" / "peers"))


def default_mlx_vlm_python() -> Path:
    """Where benchmarks/build_mlx_vlm_env.sh puts the peer's virtual environment."""
    return cache_root() / f"mlx-vlm-{MLX_VLM_VERSION}" / "bin" / "python"


def find_mlx_vlm_python(explicit: str | None) -> tuple[Path | None, str]:
    """The Python that runs the mlx-vlm peer (--mlx-vlm-python, else $EDGEVLM_MLX_VLM_PYTHON, else the built
    environment), or None and why there is none."""
    chosen = explicit or os.environ.get(MLX_VLM_ENV_VARIABLE)
    python = Path(chosen) if chosen else default_mlx_vlm_python()
    how = "build it with benchmarks/build_mlx_vlm_env.sh or pass --mlx-vlm-python"
    if not chosen and not (python.parent.parent / ".edgevlm-ready").is_file():
        return None, f"no mlx-vlm environment at {python.parent.parent} ({how})"
    if python.is_file() and os.access(python, os.X_OK):
        return python, ""
    return None, f"no mlx-vlm environment: {python} is not an executable Python ({how})"


def checkpoint_architecture(checkpoint: Path) -> str:
    config = json.loads((checkpoint / "config.json").read_text())
    return (config.get("architectures") or [config.get("model_type", "?")])[0]


def ort_genai_row(checkpoint: Path) -> dict:
    """ONNX Runtime GenAI's row: a skip line with the reason for every family here (see ORT_GENAI_VLM_ARCHITECTURES)."""
    arch = checkpoint_architecture(checkpoint)
    name = f"onnxruntime-genai {ORT_GENAI_VERSION} (model builder)"
    if arch not in ORT_GENAI_VLM_ARCHITECTURES:
        return {"name": name, "kind": "onnxruntime-genai", "architecture": arch,
                "skipped": f"its model builder has no {arch} (its VLMs: {', '.join(ORT_GENAI_VLM_ARCHITECTURES)})"}
    return {"name": name, "kind": "onnxruntime-genai", "architecture": arch,
            "skipped": f"its model builder builds only {arch}'s text decoder; the vision and embedding models come "
                       "from per-model example scripts outside the wheel, not run here"}


def converted_model_path(checkpoint: Path, quantize: int | None) -> Path:
    """The folder mlx-vlm's converted copy of the checkpoint is cached in: keyed by the checkpoint's files (path,
    size, mtime), the quantization and mlx-vlm's version, so a re-made checkpoint is converted afresh."""
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint.iterdir() if p.is_file())
    key = hashlib.sha256(json.dumps([str(checkpoint.resolve()), stats, quantize, MLX_VLM_VERSION, CONVERT_RECIPE]).encode())
    return cache_root() / "mlx-vlm-models" / f"{checkpoint.name}-{'q%d' % quantize if quantize else 'dtype'}-" \
                                             f"{key.hexdigest()[:12]}"


def mlx_vlm_row(checkpoint: Path, texts: list[str], image, new_tokens: int, repeats: int, trace: str | None,
                python: Path | None, why_not: str, progress: Callable[[str], None], quantize: int | None = None,
                timeout_s: float = 3600) -> dict:
    """mlx-vlm on the same checkpoint, converted by mlx-vlm itself, generating through its own stream_generate in
    the peer's Python: TTFT cold/warm, decode rate, peak RSS, and top-1 agreement with the PyTorch reference's
    trace (teacher-forced). texts: the bench's two prompts with the image placeholder; image: a PIL image."""
    name = f"mlx-vlm {MLX_VLM_VERSION} generate ({'%d-bit' % quantize if quantize else 'checkpoint dtype'})"
    row = {"name": name, "kind": "mlx-vlm", "quantize_bits": quantize}
    if python is None:
        return row | {"skipped": why_not}
    with tempfile.TemporaryDirectory(prefix="edgevlm-mlx-vlm-") as scratch:
        image_path = Path(scratch) / "image.png"
        image.save(image_path)
        request = {"checkpoint": str(checkpoint), "mlx_path": str(converted_model_path(checkpoint, quantize)),
                   "quantize": quantize, "image": str(image_path), "texts": texts, "new_tokens": new_tokens,
                   "repeats": repeats, "trace": trace}
        converted = Path(request["mlx_path"])
        converted.parent.mkdir(parents=True, exist_ok=True)
        record, error = run_script(python, CHILD_SCRIPT, request, progress, timeout_s)
    if error:
        return row | {"skipped": f"mlx-vlm could not run it: {error}", "python": str(python)}
    if "skipped" in record:
        return row | record | {"python": str(python)}
    return row | {"metrics": record, "python": str(python), "isolated": True}


def run_script(python: Path, script: Path, request: dict, progress: Callable[[str], None],
               timeout_s: float) -> tuple[dict, str]:
    """`python -I script REQUEST` (isolated: the script's folder and PYTHONPATH stay off its sys.path); progress
    lines from its stderr, the record from its last stdout line. Returns (record, "") or ({}, why it failed)."""
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen([str(python), "-I", str(script), json.dumps(request)], stdout=out, stderr=subprocess.PIPE,
                                 text=True)
        tail: list[str] = []
        try:
            for line in child.stderr:
                if line.startswith(PROGRESS):
                    progress(line[len(PROGRESS):].strip())
                else:
                    tail = (tail + [line.rstrip()])[-6:]
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return {}, f"timed out after {timeout_s:.0f} s"
        out.seek(0)
        lines = out.read().strip().splitlines()
    if child.returncode != 0 or not lines:
        return {}, f"exit {child.returncode}: " + " | ".join(t for t in tail if t.strip())[-600:]
    return json.loads(lines[-1]), ""
