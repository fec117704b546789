"""Parity metrics (DESIGN.md's ladder) and the checks `edgevlm verify` runs on a bundle."""
from __future__ import annotations

import numpy as np

# artifact precision -> (metric, threshold)
ENCODER_THRESHOLDS = {"fp32": ("max_rel_err", 1e-4), "fp16": ("cosine", 0.999), "int8": ("cosine", 0.99)}
DECODER_NMSE = 1e-5  # F32/F16 GGUF and fp32 MLX


def max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude (elementwise ratios explode
    where the reference is ~0)."""
    return float(np.abs(ours.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12))


def cosine(ours: np.ndarray, ref: np.ndarray) -> float:
    a, b = ours.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def nmse(ours: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(((ours.astype(np.float64) - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))


def _probe_inputs(manifest, n_tiles: int = 3, seed: int = 0) -> np.ndarray:
    """Fresh encoder inputs: real preprocessed scene tiles plus Gaussian noise tiles."""
    from . import scenes

    tile = scenes.scene_tiles(manifest.preprocess, 1, 4_000_000_000 + seed)
    noise = np.random.default_rng(seed).normal(size=(n_tiles - 1, *tile.shape[1:])).astype(np.float32)
    return np.concatenate([tile, noise])


def verify_bundle(bundle, threads: int | None = None, progress=None) -> list[dict]:
    """Every encoder and decoder artifact against the PyTorch reference (the bundle's source checkpoint)."""
    from pathlib import Path

    from . import scenes
    from .manifest import Manifest
    from .runtimes.bundle_loader import make_decoder, make_encoder, runtime_spec, source_checkpoint
    from .runtimes.session import Session
    from .runtimes.torch_backend import TorchDecoder, TorchEncoder

    bundle = Path(bundle)
    manifest = Manifest.load(bundle)
    ckpt = source_checkpoint(manifest)
    log = progress or (lambda message: None)
    rows: list[dict] = []
    pixels = _probe_inputs(manifest)
    import torch

    with torch.inference_mode():
        ref = ckpt.vision(torch.from_numpy(pixels)).numpy()
    for name in manifest.names("encoder") + manifest.names("engine"):
        log(f"encoder {name}")
        try:
            ours = make_encoder(bundle, manifest, name, threads=threads).encode(pixels)
        except Exception as exc:  # a backend missing here is a row, not a crash
            rows.append({"artifact": name, "role": "encoder", "status": "skipped", "note": str(exc)})
            continue
        precision = name.split(":")[1]
        metric, threshold = ENCODER_THRESHOLDS.get(precision, ("cosine", 0.99))
        values = {"max_rel_err": max_rel_err(ours, ref), "cosine": cosine(ours, ref)}
        ok = values[metric] <= threshold if metric == "max_rel_err" else values[metric] >= threshold
        rows.append({"artifact": name, "role": "encoder", **values, "criterion": f"{metric} {'<=' if metric == 'max_rel_err' else '>='} {threshold}",
                     "status": "pass" if ok else "FAIL"})

    spec = runtime_spec(bundle, manifest)
    scene = scenes.make_scene(4_000_000_001)
    image, question = scenes.render(scene), "Describe the image."
    reference = Session(spec, TorchEncoder(ckpt.vision, "torch"), TorchDecoder(ckpt.decoder))
    ref_result = reference.generate(image, question, max_tokens=16, stop_token_ids=[], return_logits=True)
    for name in manifest.names("decoder"):
        log(f"decoder {name}")
        precision = name.split(":")[1]
        exact = precision in ("f32", "f16", "fp32")
        try:
            decoder = make_decoder(bundle, manifest, name, threads=threads, parity=exact)
        except Exception as exc:
            rows.append({"artifact": name, "role": "decoder", "status": "skipped", "note": str(exc)})
            continue
        session = Session(spec, TorchEncoder(ckpt.vision, "torch"), decoder)
        logits = session.teacher_forced_logits(image, question, ref_result.tokens)
        error = nmse(np.stack(logits), np.stack(ref_result.logits))
        agree = float(np.mean([int(np.argmax(a) == np.argmax(b)) for a, b in zip(logits, ref_result.logits)]))
        row = {"artifact": name, "role": "decoder", "nmse": error, "greedy_agreement": agree}
        if exact:
            ok = error <= DECODER_NMSE and agree == 1.0
            row.update(criterion=f"nmse <= {DECODER_NMSE}, tokens identical", status="pass" if ok else "FAIL")
        else:
            row.update(criterion="quantized: judged by `edgevlm eval` accuracy", status="info")
        rows.append(row)
    return rows
