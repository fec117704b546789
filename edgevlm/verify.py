"""The checks `edgevlm verify` runs on a bundle: every artifact against the PyTorch reference, each judged by its gate in
metrics.py (docs/parity-ladder.md), then every shipped encoder x decoder pair end to end (verify_pairs.py).

Row statuses: "pass", "FAIL", "skipped" (the backend is not installed here) and "unjudged" (measured, but the gate is
calibrated on trained weights and the bundle's weights are random). Every row lists its checks: metric, measured
value, gate and verdict."""
from __future__ import annotations

import numpy as np

from .metrics import (  # noqa: F401 - re-exported: tests and callers take the metrics from here
    DECODER_GATES, DECODER_NMSE, ENCODER_GATES, MMPROJ_GATES, cosine, max_rel_err, nmse, top1_agreement, worst_tile,
)
from .verify_rows import TRAINED_MIN_CONFIDENCE, failure, judged_row, refused

PROBE_SCENES = 3  # fixed probe set for decoders: scenes x one question, teacher-forced on the reference's tokens
PROBE_TOKENS = 16
PROBE_SCENE_TILES = 3  # encoder probe: reference-scene tiles, then Gaussian-noise tiles (each judged on its own)
PROBE_NOISE_TILES = 2



def _probe_inputs(manifest, seed: int = 0) -> np.ndarray:
    """Fresh encoder inputs: real preprocessed scene tiles plus Gaussian noise tiles."""
    from .reference import scenes

    tiles = scenes.scene_tiles(manifest.preprocess, PROBE_SCENE_TILES, 4_000_000_000 + seed)
    noise = np.random.default_rng(seed).normal(size=(PROBE_NOISE_TILES, *tiles.shape[1:])).astype(np.float32)
    return np.concatenate([tiles, noise])


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


def verify_mmproj(bundle, manifest, name: str, ckpt, threads: int | None, trained: bool | None = None) -> dict:
    """An mmproj artifact run by libmtmd itself (with the bundle's GGUF decoder, which mtmd needs to load it) on a
    probe scene of a size whose tiles mtmd cuts exactly as edgevlm's preprocessing does, tile by tile against the
    PyTorch encoder; the worst tile is judged."""
    import torch

    from .preprocess import preprocess, smart_resize
    from .reference import scenes
    from .bench.peers.mtmd import MtmdPipeline, image_token_bounds

    artifact = manifest.find("encoder", name)
    gate = MMPROJ_GATES.get(artifact.precision)
    if gate is None:
        return refused(name, "encoder", [f"mmproj:{p}" for p in MMPROJ_GATES])
    artifact.verify(bundle)
    ggufs = [n for n in manifest.names("decoder") if n.startswith("gguf:")]
    if not ggufs:
        return {"artifact": name, "role": "encoder", "status": "skipped", "checks": [],
                "note": "libmtmd loads an mmproj only beside a GGUF decoder; export one with --decoder gguf:..."}
    spec = manifest.preprocess
    scene = scenes.make_scene(4_000_000_000)
    if manifest.image_layout.kind == "grid":  # the probe at its own smart-resized size: neither side resizes it
        height, width = smart_resize(GRID_PROBE_SIZE[1], GRID_PROBE_SIZE[0], spec)
        image = scenes.render(scene, size=max(width, height)).resize((width, height))
    else:
        side = spec.longest_edge if manifest.image_layout.kind == "idefics3" and spec.longest_edge else spec.tile_size[0]
        image = scenes.render(scene, size=side)
    pre = preprocess(image, spec)
    with torch.inference_mode():
        pixels = torch.from_numpy(pre.pixel_values)
        reference = (ckpt.vision(pixels).float().numpy() if pre.grid is None  # (tiles, T, D)
                     else ckpt.vision(pixels, pre.grid).float().numpy()[None])  # a grid image is one (1, M, D) tile
    pipeline = MtmdPipeline(bundle / manifest.find("decoder", ggufs[0]).path, bundle / artifact.path, n_ctx=512,
                            threads=threads, parity=True, image_tokens=image_token_bounds(artifact.details))
    try:
        tokenized = pipeline.tokenize(f"{pipeline.marker}\n", [np.asarray(image)])
        tiles, _ = pipeline.encode(tokenized)
        pipeline.free(tokenized)
    finally:
        pipeline.close()
    if len(tiles) != len(reference) or any(t.shape != r.shape for t, r in zip(tiles, reference)):
        return {"artifact": name, "role": "encoder", "status": "FAIL", "criterion": gate.criterion,
                "note": f"libmtmd made {len(tiles)} tiles of {tiles[0].shape if tiles else '-'} where edgevlm makes "
                        f"{len(reference)} of {reference.shape[1:]}",
                "checks": [{"metric": "tiles", "value": len(tiles), "gate": len(reference), "verdict": "FAIL"}]}
    row = judged_row(name, "encoder", gate, worst_tile(np.stack(tiles), reference), trained)
    row["criterion"] = f"{gate.criterion} (worst of {len(tiles)} tiles)"
    return row


def _encoder_rows(bundle, manifest, ckpt, threads, log, trained: bool | None) -> list[dict]:
    from .runtimes.bundle_loader import make_encoder
    from .runtimes.torch_backend import TorchEncoder

    rows = []
    for name in manifest.mmproj_names():
        log(f"encoder {name} (through llama.cpp's libmtmd)")
        try:
            rows.append(verify_mmproj(bundle, manifest, name, ckpt, threads, trained))
        except Exception as exc:
            rows.append(failure(name, "encoder", exc))
    names = manifest.names("encoder", runnable=True) + manifest.names("engine")
    if not names:
        return rows
    pixels, grid = _grid_probe(manifest) if manifest.encoder.kind == "grid" else (_probe_inputs(manifest), None)
    ref = _encode(TorchEncoder(ckpt.vision, "torch"), pixels, grid)
    for name in names:
        log(f"encoder {name}")
        gate = ENCODER_GATES.get(name.split(":", 1)[1])
        if gate is None:
            rows.append(refused(name, "encoder", [f"{name.split(':')[0]}:{p}" for p in ENCODER_GATES]))
            continue
        try:
            ours = _encode(make_encoder(bundle, manifest, name, threads=threads), pixels, grid)
        except Exception as exc:
            rows.append(failure(name, "encoder", exc))
            continue
        # a grid encoder's probe is one image: its patch rows are judged as one tile
        values = worst_tile(ours, ref) if grid is None else worst_tile(ours[None], ref[None])
        row = judged_row(name, "encoder", gate, values, trained)
        row["criterion"] = f"{gate.criterion} (worst of {values['tiles']} tiles)"
        rows.append(row)
    return rows


def reference_confidence(logits: np.ndarray) -> float:
    """Mean top-1 softmax probability of (positions, vocab) logits: ~1/vocab for random weights."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return float(p.max(axis=-1).mean())


def verify_report(bundle, threads: int | None = None, progress=None, pairs: bool = True, decoders: bool = True) -> dict:
    """Every artifact, then every encoder x decoder pair, against the PyTorch reference (the bundle's source
    checkpoint): {"bundle", "weights": {"trained", "reference_top1_probability", ...}, "rows": [...]}. decoders=False
    checks the tokenizer and encoders only (tests)."""
    from pathlib import Path

    from .manifest import Manifest
    from .reference import scenes
    from .runtimes.bundle_loader import make_decoder, runtime_spec, source_checkpoint
    from .runtimes.session import Session
    from .runtimes.torch_backend import TorchEncoder
    from .runtimes.torch_seq2seq import torch_decoder

    bundle = Path(bundle)
    manifest = Manifest.load(bundle)
    ckpt = source_checkpoint(manifest)
    log = progress or (lambda message: None)
    rows: list[dict] = []
    report = {"bundle": str(bundle), "weights": None, "rows": rows}
    try:
        manifest.find("tokenizer").verify(bundle)
        rows.append({"artifact": "tokenizer", "role": "tokenizer", "criterion": "sha256 as in the manifest",
                     "status": "pass",
                     "checks": [{"metric": "sha256", "value": "as in the manifest", "gate": "as in the manifest",
                                 "verdict": "pass"}]})
    except Exception as exc:
        rows.append(failure("tokenizer", "tokenizer", exc))
    # the PyTorch reference's answers to the decoder probe: what the decoders are teacher-forced on, and (its
    # confidence) whether the weights are trained, which the trained-only gates need
    try:
        spec = runtime_spec(bundle, manifest)
    except Exception as exc:
        spec, spec_error = None, exc
    trained, probes, ref_logits = None, [], None
    if spec is not None:
        reference = Session(spec, TorchEncoder(ckpt.vision, "torch"),
                            torch_decoder(ckpt.decoder, position_scheme=spec.position_scheme,
                                          deepstack_layers=ckpt.deepstack_layers, image_attention=spec.image_attention))
        for i in range(PROBE_SCENES):
            image, question = scenes.render(scenes.make_scene(4_000_000_001 + i)), "Describe the image."
            result = reference.generate(image, question, max_tokens=PROBE_TOKENS, stop_token_ids=[], return_logits=True)
            probes.append((image, question, result))
        ref_logits = np.concatenate([np.stack(r.logits) for _, _, r in probes])  # (positions, vocab)
        confidence = reference_confidence(ref_logits)
        trained = confidence >= TRAINED_MIN_CONFIDENCE
        report["weights"] = {"trained": trained, "reference_top1_probability": confidence,
                             "gate": f"trained when >= {TRAINED_MIN_CONFIDENCE}",
                             "reference_model": (Path(manifest.source["path"]) / "edgevlm_reference.json").is_file()}
    rows += _encoder_rows(bundle, manifest, ckpt, threads, log, trained)

    decoder_names = manifest.names("decoder") if decoders else []
    if not decoder_names:
        return report
    if spec is None:
        rows += [failure(name, "decoder", spec_error) for name in decoder_names]
        return report
    for name in decoder_names:
        log(f"decoder {name}")
        gate = DECODER_GATES.get(name)
        if gate is None:
            rows.append(refused(name, "decoder", DECODER_GATES))
            continue
        try:
            decoder = make_decoder(bundle, manifest, name, threads=threads, parity=gate.min_agreement == 1.0)
            session = Session(spec, TorchEncoder(ckpt.vision, "torch"), decoder)
            logits = np.concatenate([np.stack(session.teacher_forced_logits(image, question, result.tokens))
                                     for image, question, result in probes])
        except Exception as exc:
            rows.append(failure(name, "decoder", exc))
            continue
        values = {"nmse": nmse(logits, ref_logits), "greedy_agreement": top1_agreement(logits, ref_logits)}
        rows.append(judged_row(name, "decoder", gate, values, trained))
    if pairs:
        from .verify_pairs import pair_rows

        rows += pair_rows(bundle, manifest, ckpt, spec, report["weights"], threads, log)
    return report


def verify_bundle(bundle, threads: int | None = None, progress=None, pairs: bool = True) -> list[dict]:
    """verify_report's rows."""
    return verify_report(bundle, threads, progress, pairs)["rows"]


def outcome(rows: list[dict], allow_skips: bool = False) -> tuple[str, int]:
    """(status, exit code): FAIL 1 if any row fails; "incomplete" 3 if any row was skipped or not judged (0 with
    allow_skips, status "pass with skips"); "pass" 0 only when every row was checked and passed."""
    if any(r["status"] == "FAIL" for r in rows):
        return "FAIL", 1
    if any(r["status"] in ("skipped", "unjudged") for r in rows):
        return ("pass with skips", 0) if allow_skips else ("incomplete", 3)
    return "pass", 0
