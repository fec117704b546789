"""Decoder -> MLX (mlx-lm layout) through mlx-lm's own converter and affine quantization; the vision half -> MLX
is export/mlx_encoder.py (the exporter finds both writers of the "mlx" format here).

The decoder is first written as a plain HF checkpoint folder of its own class (mlx-lm reads that), with `rope_theta` at the top level of
config.json: mlx-lm ignores transformers-5's `rope_parameters` and would silently use 10000."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from ..backends import require_mlx
from ..decoder_arch import architecture
from ..errors import CheckpointError
from ..manifest import Artifact
from .bundle import BundleWriter
from .mlx_encoder import check_encoder, check_spec, export_encoder  # noqa: F401 - the "mlx" format's encoder half

# precision -> (dtype of unquantized tensors, bits or None)
PRECISIONS = {"fp32": ("float32", None), "fp16": ("float16", None), "8bit": ("float16", 8), "4bit": ("float16", 4)}


def write_hf_decoder(ckpt, manifest, folder: Path) -> Path:
    """The decoder as a stock HF checkpoint of its own class, with the tokenizer and chat template beside it."""
    arch = architecture(manifest.decoder.architecture)
    # Gemma 3: mlx-vlm's language model (runtimes/mlx_vlm_seam.py); Gemma 2: edgevlm's masks (mlx_gemma2.py)
    if manifest.decoder.image_attention != "causal" and arch.name not in ("gemma3", "gemma2"):
        raise CheckpointError(f"the MLX decoder cannot run {manifest.family}'s {manifest.decoder.image_attention} image "
                              "attention yet; export gguf:* for this checkpoint")
    scaling = manifest.decoder.rope_scaling or {}
    linear_global = arch.name == "gemma3" and scaling.get("rope_type") == "linear"  # gemma3_text: global layers only
    if scaling and not linear_global:  # mlx-lm reads only top-level rope keys: refuse rather than drop it silently
        raise CheckpointError(f"RoPE scaling {manifest.decoder.rope_scaling} is not exported to MLX yet")
    ckpt.decoder.save_pretrained(folder)
    ckpt.tokenizer.save_pretrained(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["model_type"] = arch.mlx_model_type
    config["rope_theta"] = manifest.decoder.rope_theta
    if linear_global:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(scaling["factor"])}
    if manifest.decoder.sliding_window:  # mlx-lm's gemma3_text reads these top-level keys
        config.update(sliding_window=manifest.decoder.sliding_window,
                      sliding_window_pattern=manifest.decoder.global_every,
                      rope_local_base_freq=manifest.decoder.rope_local_theta)
    config["eos_token_id"] = manifest.tokenizer["stop_token_ids"] or config.get("eos_token_id")
    config_file.write_text(json.dumps(config, indent=2))
    return folder


def prepare_decoder(ckpt, manifest, writer: BundleWriter, precision: str, log=print, **_) -> None:
    """The part that needs the torch decoder (its HF folder, written once); runs before the exporter releases it."""
    require_mlx()
    hf_folder = writer.root / ".work" / "hf-decoder"
    if not hf_folder.exists():
        hf_folder.parent.mkdir(exist_ok=True)
        log("  writing the decoder as an HF checkpoint folder for mlx-lm")
        write_hf_decoder(ckpt, manifest, hf_folder)


def release_intermediates(writer: BundleWriter) -> None:
    import shutil

    shutil.rmtree(writer.root / ".work" / "hf-decoder", ignore_errors=True)


def export_decoder(ckpt, manifest, writer: BundleWriter, precision: str, log=print, group_size: int = 64, **_) -> Artifact:
    from mlx_lm import convert

    hf_folder = writer.root / ".work" / "hf-decoder"
    dtype, bits = PRECISIONS[precision]
    out = writer.root / "decoder" / f"mlx-{precision}"
    out.parent.mkdir(exist_ok=True)
    log(f"  converting with mlx-lm ({precision}{f', group size {group_size}' if bits else ''})")
    import mlx.core as mx

    # MLX keeps freed buffers in its own cache: without a limit the conversion's peak and everything after it
    # (the vision export) count them too (SmolVLM2-2.2B: +1.8 GB)
    previous_limit = mx.set_cache_limit(0)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints [INFO] lines; our log says what happens
            convert(str(hf_folder), mlx_path=str(out), quantize=bits is not None, q_bits=bits,
                    q_group_size=group_size if bits else None, dtype=dtype)
    finally:
        mx.clear_cache()
        mx.set_cache_limit(previous_limit)
    for stray in ("README.md",):  # mlx-lm writes a hub model card; nothing in it is true for a bundle
        (out / stray).unlink(missing_ok=True)
    config = json.loads((out / "config.json").read_text())
    if config.get("rope_theta") != manifest.decoder.rope_theta:
        raise RuntimeError("mlx-lm dropped rope_theta from config.json; the MLX decoder would be wrong")
    details = {"dtype": dtype, "bits": bits, "group_size": group_size if bits else None, "mode": "affine" if bits else None}
    return writer.artifact(f"mlx:{precision}", "decoder", "mlx", precision, f"decoder/mlx-{precision}", **details)
