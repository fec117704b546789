"""Parity metrics (DESIGN.md's ladder) and the checks `edgevlm verify` runs on a bundle."""
from __future__ import annotations

import numpy as np

from .errors import BackendUnavailableError, EdgeVLMError
from .metrics import DECODER_GATES, DECODER_NMSE, ENCODER_GATES, MMPROJ_GATES, cosine, max_rel_err, nmse, top1_agreement  # noqa: F401

PROBE_SCENES = 3  # fixed probe set for decoders: scenes x one question, teacher-forced on the reference's tokens
PROBE_TOKENS = 16


def _probe_inputs(manifest, n_tiles: int = 3, seed: int = 0) -> np.ndarray:
    """Fresh encoder inputs: real preprocessed scene tiles plus Gaussian noise tiles."""
    from .reference import scenes

    tile = scenes.scene_tiles(manifest.preprocess, 1, 4_000_000_000 + seed)
    noise = np.random.default_rng(seed).normal(size=(n_tiles - 1, *tile.shape[1:])).astype(np.float32)
    return np.concatenate([tile, noise])


GRID_PROBE_SIZE = (308, 224)  # (width, height) of a grid encoder's probe scene: not square, several windows


def _grid_probe(manifest) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A native-resolution encoder's probe: one reference scene at a fixed non-square size, as the runtime
    preprocesses it: (patches (P, C*T*p*p), grid (t, h, w))."""
    from .preprocess import preprocess
    from .reference import scenes

    image = scenes.render(scenes.make_scene(4_000_000_000), size=max(GRID_PROBE_SIZE)).resize(GRID_PROBE_SIZE)
    pre = preprocess(image, manifest.preprocess)
    return pre.pixel_values, pre.grid


def _encode(encoder, pixels: np.ndarray, grid) -> np.ndarray:
    """The session's call: the grid only for a grid encoder (tile encoders take one argument)."""
    return encoder.encode(pixels) if grid is None else encoder.encode(pixels, grid=grid)


def _failure(name: str, role: str, exc: Exception) -> dict:
    """Only a backend that is not installed here is "skipped"; every other load or run failure is a FAIL."""
    if isinstance(exc, BackendUnavailableError):
        return {"artifact": name, "role": role, "status": "skipped", "note": str(exc)}
    note = str(exc) if isinstance(exc, EdgeVLMError) else f"{type(exc).__name__}: {exc}"
    return {"artifact": name, "role": role, "status": "FAIL", "note": note}


def verify_mmproj(bundle, manifest, name: str, ckpt, threads: int | None) -> dict:
    """An mmproj artifact run by libmtmd itself (with the bundle's GGUF decoder, which mtmd needs to load it) on a
    probe scene of a size whose tiles mtmd cuts exactly as edgevlm's preprocessing does, tile by tile against the
    PyTorch encoder; the worst tile is judged."""
    import torch

    from .preprocess import preprocess
    from .reference import scenes
    from .bench.peers.mtmd import MtmdPipeline

    artifact = manifest.find("encoder", name)
    artifact.verify(bundle)
    ggufs = [n for n in manifest.names("decoder") if n.startswith("gguf:")]
    if not ggufs:
        return {"artifact": name, "role": "encoder", "status": "skipped",
                "note": "libmtmd loads an mmproj only beside a GGUF decoder; export one with --decoder gguf:..."}
    spec = manifest.preprocess
    side = spec.longest_edge if manifest.image_layout.kind == "idefics3" and spec.longest_edge else spec.tile_size[0]
    image = scenes.render(scenes.make_scene(4_000_000_000), size=side)
    with torch.inference_mode():
        reference = ckpt.vision(torch.from_numpy(preprocess(image, spec).pixel_values)).numpy()  # (tiles, T, D)
    pipeline = MtmdPipeline(bundle / manifest.find("decoder", ggufs[0]).path, bundle / artifact.path, n_ctx=512,
                            threads=threads, parity=True)
    try:
        tokenized = pipeline.tokenize(f"{pipeline.marker}\n", [np.asarray(image)])
        tiles, _ = pipeline.encode(tokenized)
        pipeline.free(tokenized)
    finally:
        pipeline.close()
    gate = MMPROJ_GATES[artifact.precision]
    if len(tiles) != len(reference) or any(t.shape != r.shape for t, r in zip(tiles, reference)):
        return {"artifact": name, "role": "encoder", "status": "FAIL", "criterion": gate.criterion,
                "note": f"libmtmd made {len(tiles)} tiles of {tiles[0].shape if tiles else '-'} where edgevlm makes "
                        f"{len(reference)} of {reference.shape[1:]}"}
    worst = min(range(len(tiles)), key=lambda i: cosine(tiles[i], reference[i]))
    values = {"max_rel_err": max_rel_err(tiles[worst], reference[worst]), "cosine": cosine(tiles[worst], reference[worst])}
    return {"artifact": name, "role": "encoder", **values, "criterion": f"{gate.criterion} (worst of {len(tiles)} tiles)",
            "status": "pass" if gate.passes(values) else "FAIL"}


def verify_bundle(bundle, threads: int | None = None, progress=None) -> list[dict]:
    """Every artifact against the PyTorch reference (the bundle's source checkpoint), each judged by its gate in
    metrics.py. Rows: status "pass", "FAIL" or "skipped" (backend not installed here)."""
    from pathlib import Path

    from .reference import scenes
    from .manifest import Manifest
    from .runtimes.bundle_loader import make_decoder, make_encoder, runtime_spec, source_checkpoint
    from .runtimes.session import Session
    from .runtimes.torch_backend import TorchDecoder, TorchEncoder

    bundle = Path(bundle)
    manifest = Manifest.load(bundle)
    ckpt = source_checkpoint(manifest)
    log = progress or (lambda message: None)
    rows: list[dict] = []
    try:
        manifest.find("tokenizer").verify(bundle)
        rows.append({"artifact": "tokenizer", "role": "tokenizer", "criterion": "sha256 as in the manifest",
                     "status": "pass"})
    except Exception as exc:
        rows.append(_failure("tokenizer", "tokenizer", exc))
    pixels, grid = _grid_probe(manifest) if manifest.encoder.kind == "grid" else (_probe_inputs(manifest), None)
    ref = _encode(TorchEncoder(ckpt.vision, "torch"), pixels, grid)
    for name in manifest.mmproj_names():
        log(f"encoder {name} (through llama.cpp's libmtmd)")
        try:
            rows.append(verify_mmproj(bundle, manifest, name, ckpt, threads))
        except Exception as exc:
            rows.append(_failure(name, "encoder", exc))
    for name in manifest.names("encoder", runnable=True) + manifest.names("engine"):
        log(f"encoder {name}")
        try:
            ours = _encode(make_encoder(bundle, manifest, name, threads=threads), pixels, grid)
        except Exception as exc:
            rows.append(_failure(name, "encoder", exc))
            continue
        gate = ENCODER_GATES.get(name.split(":")[1], ENCODER_GATES["int8"])
        values = {"max_rel_err": max_rel_err(ours, ref), "cosine": cosine(ours, ref)}
        rows.append({"artifact": name, "role": "encoder", **values, "criterion": gate.criterion,
                     "status": "pass" if gate.passes(values) else "FAIL"})

    decoders = manifest.names("decoder")
    if not decoders:
        return rows
    try:
        spec = runtime_spec(bundle, manifest)
    except Exception as exc:
        return rows + [_failure(name, "decoder", exc) for name in decoders]
    probes = []
    reference = Session(spec, TorchEncoder(ckpt.vision, "torch"),
                        TorchDecoder(ckpt.decoder, position_scheme=spec.position_scheme))
    for i in range(PROBE_SCENES):
        image, question = scenes.render(scenes.make_scene(4_000_000_001 + i)), "Describe the image."
        result = reference.generate(image, question, max_tokens=PROBE_TOKENS, stop_token_ids=[], return_logits=True)
        probes.append((image, question, result))
    ref_logits = np.concatenate([np.stack(r.logits) for _, _, r in probes])  # (positions, vocab)
    for name in decoders:
        log(f"decoder {name}")
        gate = DECODER_GATES.get(name)
        if gate is None:
            rows.append({"artifact": name, "role": "decoder", "status": "FAIL",
                         "note": f"no parity gate for {name}; this edgevlm gates {', '.join(DECODER_GATES)}"})
            continue
        try:
            decoder = make_decoder(bundle, manifest, name, threads=threads, parity=gate.min_agreement == 1.0)
            session = Session(spec, TorchEncoder(ckpt.vision, "torch"), decoder)
            logits = np.concatenate([np.stack(session.teacher_forced_logits(image, question, result.tokens))
                                     for image, question, result in probes])
        except Exception as exc:
            rows.append(_failure(name, "decoder", exc))
            continue
        values = {"nmse": nmse(logits, ref_logits), "greedy_agreement": top1_agreement(logits, ref_logits)}
        rows.append({"artifact": name, "role": "decoder", **values, "criterion": gate.criterion,
                     "status": "pass" if gate.passes(values) else "FAIL"})
    return rows
